"""Smoke test of ``bench/ledger.py --quick`` on PostgreSQL (skipped when it does not answer), and a check that
the bench's synthetic spans are cut exactly as the ledger's own ``plan`` cuts a worker's time. No timing is
asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from cloudmodal.server.ledger import plan

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ledger.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ledger_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ledger_bench"] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_ledger_bench_quick_runs_and_both_sums_agree(postgres_database: str, tmp_path: Path) -> None:
    out = tmp_path / "ledger.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--database-url", postgres_database, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    load = result["load"]
    assert 150_000 < load["spans"] < 250_000 and load["minimum_spans"] > 0 and load["hour_rows"] > 0
    assert result["rollup_check"]["rollup_rows"] > 0 and result["rollup_check"]["spans"] > 0
    reports = result["reports"]
    assert len(reports) == 5
    for r in reports:
        assert r["agree"] and r["total_cost"] > 0 and len(r["report_s"]) == 2, r["case"]
        assert r["statements"] > 0 and r["breakdown"], r["case"]
    assert result["plans"] and all(p["plan"][0].startswith("execution") for p in result["plans"])
    for db in ("postgresql", "sqlite"):
        first, steady, last = result["accrual"][db]
        assert first["spans"] == steady["spans"] == first["workers"] == 100, db
        assert last["spans"] > last["workers"], db  # the last spans, and the billing minimums on top
    assert "| last 7 days by app " in proc.stdout and "Accrual: Ledger.accrue()" in proc.stdout


def _worker(bench: ModuleType, **kw: Any) -> Any:
    base = {
        "id": "wk-1",
        "fn": bench.Fn("fn-1", "ap-1", "f", [], 0.0, 1.0),
        "provider": "aws",
        "cloud": "aws",
        "region": "us-east-1",
        "instance_type": "g5.xlarge",
        "gpu": "A10G",
        "market": "on-demand",
        "price": 1.006,
        "on_demand": 1.006,
        "launch": bench.START + 1000.4,
        "end": bench.START + 9000.7,
        "stopped": True,
        "idle_from": None,
        "top_up": 0.0,
    }
    base.update(kw)
    w = bench.Worker(**base)
    if w.stopped:
        ran = w.end - w.launch
        w.top_up = max(0.0, bench.billed_seconds(w.cloud, ran) - ran)
    w.prefix = "\t".join(["x"] * 12) + "\t"
    return w


def _generated(
    bench: ModuleType, w: Any, span_s: float
) -> list[tuple[float, float, float, float, float, str]]:
    out: list[str] = []
    h = bench.START
    while h < w.end + bench.HOUR:
        bench.hour_rows(w, h, h + bench.HOUR, span_s, out)
        h += bench.HOUR
    rows = []
    for line in out:
        f = line.rstrip("\n").split("\t")[12:]
        rows.append((float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[4]), f[5]))
    return rows


def _planned(w: Any, span_s: float) -> list[tuple[float, float, float, float, float, str]]:
    """What the ledger writes for ``w`` accrued at every tick, and once more just after its stop."""
    row = SimpleNamespace(
        id=w.id,
        app_id="ap-1",
        function_id="fn-1",
        provider=w.provider,
        state="ready",
        started_at=w.launch,
        launched_at=w.launch,
        billed_until=None,
        stopped_at=None,
        idle_since=w.idle_from,
        offer={"cloud": w.cloud, "region": w.region, "instance_type": w.instance_type, "gpu": w.gpu},
        market=w.market,
        price_per_hour=w.price,
        gpu=w.gpu,
    )
    rows: list[dict[str, Any]] = []
    tick = (w.launch // span_s + 1) * span_s
    while tick < w.end or (not w.stopped and tick <= w.end):
        end, spans = plan(row, tick)
        if end is not None:
            row.billed_until = end
            rows += spans
        tick += span_s
    if w.stopped:
        row.state, row.stopped_at = "stopped", w.end
        rows += plan(row, w.end + 3.0)[1]
    return [(r["t0"], r["t1"], r["seconds"], r["idle_seconds"], r["cost"], r["kind"]) for r in rows]


@pytest.mark.parametrize(
    "case",
    [
        {},  # aws, runs over two hours: spans at every tick and every hour
        {"end": _load().START + 1000.4 + 35.0},  # under AWS's 60 s minimum: a minimum span
        {"cloud": "lambda", "provider": "lambda", "end": _load().START + 1000.4 + 200.0},  # per minute
        {"launch": _load().START + 3599.5, "end": _load().START + 4000.0},  # first tick 0.5 s after launch
        {"launch": _load().START + 1199.6, "end": _load().START + 2000.0},  # ...and not an hour: skipped
        {"idle_from": _load().START + 8000.2},  # an idle tail before scale-down
        {"stopped": False, "end": _load().START + 3600.0 + 24 * 60},  # running, accrued at every tick
    ],
)
def test_the_bench_cuts_spans_as_the_ledger_does(case: dict[str, Any]) -> None:
    bench = _load()
    w = _worker(bench, **case)
    got = _generated(bench, w, 120.0)
    want = _planned(w, 120.0)
    assert got == want
    assert len(got) > 1


def test_the_comparison_sees_a_different_cut() -> None:
    """Negative control: spans cut at another tick than the ledger's are told apart."""
    bench = _load()
    w = _worker(bench)
    assert _generated(bench, w, 60.0) != _planned(w, 120.0)
