"""The dashboard (``GET /dashboard``) in a real browser: headless Chromium renders the page against a control
plane whose sim cloud ran a spot and an on-demand worker, and the numbers it shows are the ones
``cloudmodal cost --format json`` prints, to the cent. A refused or missing token shows a message, no numbers.

The page is loaded with the address ``cloudmodal dashboard`` prints; its screenshot is left in
``$CLOUDMODAL_ARTIFACTS_DIR`` (else the test's tmp dir) for a person to look at."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import sim_app
import typer
from sqlalchemy import select
from support import D, sim_plane
from typer.testing import CliRunner

from cloudmodal.cli.dashboard_cmd import dashboard_command
from cloudmodal.client.session import run_app
from cloudmodal.pricing.offers import Offer
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium for a headless browser (Debian: apt-get install chromium)"
)

# One A10 machine type sold both ways, at prices whose cents differ in every total the page shows.
PRICED = Offer("aws", "us-east-1", "use1-az1", "g5.xlarge", "A10", 1, 24, 4, 16, 31.46, 9.87, "test", D)
RENDER_MS = 3000  # virtual time for the page after it loaded: its first refresh, before the next poll


class Rendered(HTMLParser):
    """What a test reads from the rendered page: ``data-usd`` amounts by element id, by app row and by
    worker row; the chart's bars; the events listed; the body's ``data-state``; the error message's text."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.state = ""
        self.by_id: dict[str, str] = {}
        self.apps: dict[str, dict[str, str]] = {}
        self.workers: dict[str, dict[str, str]] = {}
        self.bars: list[dict[str, str]] = []
        self.events: list[str] = []
        self.amounts = 0  # elements with data-usd, anywhere
        self.message = ""
        self._row: dict[str, str] | None = None
        self._message_depth = 0
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.state = a.get("data-state", "")
        if self._message_depth:
            self._message_depth += 1
        elif a.get("id") == "message" and "hidden" not in a:
            self._message_depth = 1
        if tag == "tr":
            self._row = None
            if "data-app" in a:
                self._row = self.apps.setdefault(a["data-app"], {})
            elif "data-worker" in a:
                self._row = self.workers.setdefault(a["data-worker"], {})
            if "data-event" in a:
                self.events.append(a["data-event"])
        if tag == "rect" and "data-app" in a:
            self.bars.append(a)
        if "data-usd" in a:
            self.amounts += 1
            if "id" in a:
                self.by_id[a["id"]] = a["data-usd"]
            elif self._row is not None and "data-field" in a:
                self._row[a["data-field"]] = a["data-usd"]

    def handle_endtag(self, tag: str) -> None:
        if self._message_depth:
            self._message_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._message_depth:
            self.message += data


def browse(url: str, profile: Path, *extra: str) -> str:
    """The page at ``url`` as headless Chromium renders it (its DOM, or what ``extra`` asks for)."""
    assert CHROMIUM is not None
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={RENDER_MS}",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def render(url: str, profile: Path) -> Rendered:
    return Rendered(browse(url, profile, "--dump-dom"))


def cli_cost(handle: ServerHandle, *args: str) -> dict[str, Any]:
    """``cloudmodal cost --format json ARGS`` run as the user would, in its own process."""
    env = dict(os.environ, CLOUDMODAL_SERVER_URL=handle.url, CLOUDMODAL_TOKEN=handle.token)
    out = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "cost", "--format", "json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def usd(x: float) -> str:
    """A JSON amount as the page must show it: rounded to the cent."""
    return f"{round(x, 2):.2f}".replace("-0.00", "0.00")


def printed_url() -> str:
    """The address ``cloudmodal dashboard`` prints for this process's session (CLOUDMODAL_SERVER_URL/TOKEN)."""
    cli = typer.Typer()
    cli.command()(dashboard_command)
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[0]


def wait_until(pred: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_dashboard_shows_the_cost_reports_numbers(tmp_path: Path) -> None:
    artifacts = Path(os.environ.get("CLOUDMODAL_ARTIFACTS_DIR") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    profile = tmp_path / "chromium"
    with sim_plane(tmp_path, {}, offers=[PRICED]) as (handle, _sim):
        url = printed_url()
        assert url == f"{handle.url}/dashboard#token={handle.token}"

        # The shell page: public, no data, and headers that keep it to itself.
        shell = httpx.get(f"{handle.url}/dashboard")
        assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
        csp = shell.headers["content-security-policy"]
        for directive in ("default-src 'none'", "connect-src 'self'", "frame-ancestors 'none'"):
            assert directive in csp
        assert "script-src 'sha256-" in csp and "unsafe" not in csp
        assert shell.headers["cache-control"] == "no-store"
        assert shell.headers["referrer-policy"] == "no-referrer"

        with run_app(sim_app.app, show_logs=False) as running:
            assert sim_app.spot_work.remote(1) == 1  # a spot worker
            assert sim_app.on_demand_fallback_list.remote(2) == 2  # an on-demand one
            # While they run, the page lists them at their $/h (fixed at launch, so the CLI agrees).
            live = render(url, profile)
            report = cli_cost(handle)
            assert live.state == "ready"
            assert {w["worker_id"] for w in report["running"]["workers"]} == set(live.workers) != set()
            for w in report["running"]["workers"]:
                assert live.workers[w["worker_id"]]["price_per_hour"] == usd(w["price_per_hour"])
            assert live.by_id["running-per-hour"] == usd(report["running"]["per_hour"]) == "41.33"
            app_id = running.app_id
        assert "sim-app" not in shell.text and handle.token not in shell.text

        # Stopped, and every worker's billing closed: the numbers no longer move.
        def billing_closed() -> bool:
            with handle.cp.db.read() as conn:
                rows = conn.execute(
                    select(models.workers.c.billing_closed).where(models.workers.c.app_id == app_id)
                ).all()
            return len(rows) == 2 and all(r.billing_closed for r in rows)

        wait_until(billing_closed, "both workers' billing to close")
        report, by_day = cli_cost(handle), cli_cost(handle, "--by", "day")
        page = render(url, profile)
        assert page.state == "ready", page.message
        total = report["total"]
        assert total["cost"] > 0 and total["spot_savings"] > 0 and report["running"]["workers"] == []
        assert page.by_id["total-cost"] == usd(total["cost"])
        assert page.by_id["spot-savings"] == usd(total["spot_savings"])
        assert page.by_id["idle-cost"] == usd(total["idle_cost"])
        assert page.by_id["running-per-hour"] == usd(report["running"]["per_hour"]) == "0.00"
        assert page.workers == {}
        assert {g["key"] for g in report["groups"]} == {"sim-app"}
        for g in report["groups"]:
            assert page.apps[g["key"]] == {"cost": usd(g["cost"]), "spot_savings": usd(g["spot_savings"])}
        # The chart: one bar per app and UTC day, each the day's cost.
        bars = {(b["data-app"], b["data-day"]): b["data-usd"] for b in page.bars}
        assert bars == {("sim-app", d["key"]): usd(d["cost"]) for d in by_day["groups"]}
        # The placement log: where each worker went, and why there.
        assert page.events.count("worker.launched") == 2 and "placement.ranked" in page.events
        assert "worker.ready" not in page.events  # not a placement event

        shot = artifacts / "dashboard.png"
        browse(url, profile, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"dashboard screenshot: {shot}")

        # A refused token: the message, and not one number.
        refused = render(f"{handle.url}/dashboard#token=cm_not-a-token", profile)
        assert refused.state == "refused" and "refused this token" in refused.message
        assert refused.amounts == 0 and refused.apps == {} and refused.bars == []
        # No token at all: told how to get the address.
        bare = render(f"{handle.url}/dashboard", profile)
        assert bare.state == "no-token" and "cloudmodal dashboard" in bare.message and bare.amounts == 0
