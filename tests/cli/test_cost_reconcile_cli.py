"""`cloudmodal cost --reconcile aws`: a real control plane whose ledger comes from running a function on the
sim cloud (an aws offer), beside a stub Cost Explorer (tests/fakes/cost_explorer.py) that boto3 reaches
through ``AWS_ENDPOINT_URL_COST_EXPLORER`` with fake credentials.

The stub, not moto: moto 5.2.6's ``ce:GetCostAndUsage`` answers from a queue of canned results keyed by the
request body and checks nothing in the request, so it would not catch a wrong grouping, granularity, metric,
period or page token; the stub validates each and builds its answer (and pages) from the period asked.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import select

from cloudmodal import cost_reconcile as cr
from cloudmodal.cli.cost_reconcile import reconcile_command
from cloudmodal.client.session import current_session, run_app
from cloudmodal.pricing.offers import Offer
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle
from tests.fakes.cost_explorer import CostExplorerFake

INTEGRATION = Path(__file__).resolve().parent.parent / "integration"
sys.path.insert(0, str(INTEGRATION / "apps"))
sys.path.insert(0, str(INTEGRATION))

import sim_app  # noqa: E402
from support import sim_plane  # noqa: E402

# $60/h: AWS's 60 s minimum alone makes the run cost a dollar, well above rounding.
PRICEY = Offer(
    "aws", "us-east-1", "use1-az1", "g5.xlarge", "A10", 1, 24, 4, 16, 60.0, 20.0, "test", "2026-01-01"
)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIATESTTESTTESTTEST",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def ledger_closed(handle: ServerHandle, app_id: str) -> bool:
    """Every worker of ``app_id`` stopped and its last span written (its ledger is final)."""
    w = models.workers
    with handle.cp.db.read() as conn:
        closed = conn.execute(select(w.c.billing_closed).where(w.c.app_id == app_id)).scalars().all()
    return bool(closed) and all(closed)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A control plane with one stopped app that ran on the sim's aws offer: its id and ledger cost today."""
    tmp = tmp_path_factory.mktemp("reconcile")
    with sim_plane(tmp, {}, offers=[PRICEY]) as (handle, _sim):
        with run_app(sim_app.app, show_logs=False) as running:
            assert sim_app.on_demand_fallback_list.remote(7) == 7
            app_id = running.app_id
        deadline = time.time() + 60
        while not ledger_closed(handle, app_id):  # from then on the ledger of the app never changes
            assert time.time() < deadline, "the app's workers were not billed to their end"
            time.sleep(0.1)
        report = current_session().transport.get("/v1/cost", by="day", app=app_id, since=time.time() - 86400)
        today = [g for g in report["groups"] if g["key"] == _today()]
        assert len(today) == 1 and today[0]["cost"] >= 1.0, report["groups"]
        yield {"app_id": app_id, "cost": today[0]["cost"]}


@pytest.fixture
def ce(monkeypatch: pytest.MonkeyPatch) -> Iterator[CostExplorerFake]:
    with CostExplorerFake() as fake:
        for k, v in AWS_ENV.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL_COST_EXPLORER", fake.url)
        yield fake
        assert fake.violations == []


def run_json(capsys: pytest.CaptureFixture[str], app: str | None = None) -> dict[str, Any]:
    now = time.time()
    reconcile_command("aws", now - 2 * 86400, now, app, "json")
    return json.loads(capsys.readouterr().out)


def test_matching_app_foreign_app_and_untagged(
    plane: dict[str, Any], ce: CostExplorerFake, capsys: Any
) -> None:
    today, app_id = _today(), plane["app_id"]
    ce.set_cost(today, app_id, plane["cost"] + 0.004)  # within rounding of the ledger
    ce.set_cost(today, "ap-another-control-plane", 3.0)
    ce.set_cost(today, "", 12.5)
    out = run_json(capsys)
    rows = {r["app_id"]: r for r in out["rows"]}
    assert set(rows) == {app_id, "ap-another-control-plane", ""}
    mine = rows[app_id]
    assert mine["app"] == "sim-app" and mine["status"] == "match" and mine["day"] == today
    assert mine["ledger_usd"] == pytest.approx(plane["cost"], abs=1e-6)
    assert cr.R_MATCH in mine["explanation"] and cr.R_LAG in mine["explanation"]  # today: not final
    assert rows["ap-another-control-plane"]["status"] == "only-in-bill"
    assert rows["ap-another-control-plane"]["explanation"][0] == cr.R_FOREIGN
    assert rows[""]["status"] == "untagged" and rows[""]["bill_usd"] == 12.5
    s = out["summary"]
    assert s["bill_untagged_usd"] == 12.5 and s["apps_only_in_bill"] == ["ap-another-control-plane"]
    assert s["days_not_final"] == [today] and any("1 Cost Explorer request " in n for n in s["notes"])
    # what boto3 sent: 3 days (two ago .. today), daily, unblended, by the app tag
    (body,) = ce.requests
    start = (dt.date.fromisoformat(today) - dt.timedelta(days=2)).isoformat()
    end = (dt.date.fromisoformat(today) + dt.timedelta(days=1)).isoformat()
    assert body["TimePeriod"] == {"Start": start, "End": end}
    assert body["Granularity"] == "DAILY" and body["Metrics"] == ["UnblendedCost"]
    assert body["GroupBy"] == [{"Type": "TAG", "Key": "cloudmodal-app"}]


def test_a_difference_is_seen_and_explained(plane: dict[str, Any], ce: CostExplorerFake, capsys: Any) -> None:
    """Negative control of the match above: the same app billed 50 cents more is not a match."""
    ce.set_cost(_today(), plane["app_id"], plane["cost"] + 0.5)
    (row,) = run_json(capsys)["rows"]
    assert row["status"] == "bill-higher" and row["difference_usd"] == pytest.approx(0.5, abs=1e-6)
    assert cr.R_HIGHER in row["explanation"] and cr.R_MATCH not in row["explanation"]


def test_pages_are_followed(plane: dict[str, Any], ce: CostExplorerFake, capsys: Any) -> None:
    ce.page_size = 1
    today = _today()
    ce.set_cost(today, plane["app_id"], plane["cost"])
    for i in range(3):
        ce.set_cost(today, f"ap-elsewhere-{i}", 1.0)
    out = run_json(capsys)
    assert len(ce.requests) == 4 and all("NextPageToken" in b for b in ce.requests[1:])
    assert sorted(r["app_id"] for r in out["rows"]) == sorted(
        [plane["app_id"], "ap-elsewhere-0", "ap-elsewhere-1", "ap-elsewhere-2"]
    )
    assert any("4 Cost Explorer requests" in n for n in out["summary"]["notes"])


def test_one_app_by_name(plane: dict[str, Any], ce: CostExplorerFake, capsys: Any) -> None:
    ce.set_cost(_today(), plane["app_id"], plane["cost"])
    ce.set_cost(_today(), "", 9.0)
    out = run_json(capsys, app="sim-app")
    assert [(r["app_id"], r["status"]) for r in out["rows"]] == [(plane["app_id"], "match")]


def test_tag_not_activated(plane: dict[str, Any], ce: CostExplorerFake, capsys: Any) -> None:
    ce.set_cost(_today(), "", plane["cost"] + 40.0)  # everything untagged
    out = run_json(capsys)
    mine = next(r for r in out["rows"] if r["app_id"] == plane["app_id"])
    assert mine["status"] == "only-in-ledger" and cr.R_NO_TAGS in mine["explanation"]
    assert any("activate it as a cost allocation tag" in n for n in out["summary"]["notes"])


def test_table_output(plane: dict[str, Any], ce: CostExplorerFake, capsys: Any) -> None:
    ce.set_cost(_today(), plane["app_id"], plane["cost"])
    now = time.time()
    reconcile_command("aws", now - 86400, now, None, "table")
    out = capsys.readouterr().out
    assert "Day\tApp\tLedger (USD)" in out  # piped: tab-separated
    assert f"sim-app ({plane['app_id']})" in out and "\tmatch\t" in out


@pytest.mark.parametrize(
    "code, expect",
    [
        ("AccessDeniedException", "needs ce:GetCostAndUsage"),
        ("DataUnavailableException", "no data for this period"),
    ],
)
def test_aws_errors_say_what_to_do(
    plane: dict[str, Any], ce: CostExplorerFake, capsys: Any, code: str, expect: str
) -> None:
    ce.fail_next(code, "refused", times=3)
    now = time.time()
    with pytest.raises(typer.Exit) as e:
        reconcile_command("aws", now - 86400, now, None, "json")
    assert e.value.exit_code == 1
    err = capsys.readouterr().err
    assert code in err and expect in err


def test_no_credentials(plane: dict[str, Any], ce: CostExplorerFake, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    now = time.time()
    with pytest.raises(typer.Exit):
        reconcile_command("aws", now - 86400, now, None, "json")
    assert "No AWS credentials found" in capsys.readouterr().err
    assert ce.requests == []


def test_no_boto3(plane: dict[str, Any], capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "botocore.config", None)  # import fails as if not installed
    now = time.time()
    with pytest.raises(typer.Exit):
        reconcile_command("aws", now - 86400, now, None, "json")
    assert "pip install 'cloudmodal[aws]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cloud, expect",
    [("gcp", "BigQuery"), ("azure", "Cost Management"), ("lambda", "no billing API"), ("ibm", "not a cloud")],
)
def test_other_clouds_are_refused_with_what_exists(cloud: str, expect: str) -> None:
    now = time.time()
    with pytest.raises(typer.BadParameter, match=expect) as e:
        reconcile_command(cloud, now - 86400, now, None, "json")
    assert "only aws" in str(e.value)
