"""Smoke test of ``bench/web.py --quick``: a control plane in its own process with the bench app deployed, the
same app on uvicorn, the load generator against both; no timing is asserted. And the load generator refuses an
answer that is not the app's (a negative control: the bench cannot pass off a 404 as a measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "web.py"


def test_web_bench_quick_runs_and_prints_both_targets(tmp_path: Path) -> None:
    out = tmp_path / "web.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["target"], r["route"]) for r in rows] == [
        ("direct", "/ping"),
        ("proxy", "/ping"),
        ("direct", "/big"),
        ("proxy", "/big"),
    ]
    for r in rows:
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["rps"] > 0, r
    assert set(rows[1]["cpu_us"]) == {"control plane", "workers", "load generator"}
    for target, route in (("direct", "/ping"), ("proxy", "/ping"), ("direct", "/big"), ("proxy", "/big")):
        assert any(line.startswith(f"| {target:6} | {route:5} |") for line in proc.stdout.splitlines()), (
            target
        )
    assert "proxy added p50 ms" in proc.stdout and "proxy req/s ÷ direct" in proc.stdout


@pytest.fixture
def static_404() -> Iterator[int]:
    """A plain HTTP server that answers 404 to every path the bench app serves."""
    server = HTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_load_generator_refuses_a_wrong_answer(static_404: int) -> None:
    args = {
        "host": "127.0.0.1",
        "port": static_404,
        "path": "/ping-not-here",
        "mode": "latency",
        "n": 3,
        "warmup": 0,
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--loadgen", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "status 404" in proc.stderr
