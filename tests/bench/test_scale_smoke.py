"""Smoke test of ``bench/scale.py`` at a tiny size: a real control plane on PostgreSQL, 10 simulated workers over
the real worker protocol, one caller's ``.map`` of 200 inputs. Checks what the benchmark's figures rest on:
every input put was claimed exactly once, every output came back right, and nothing failed on the way.
No timing is asserted. Skipped when PostgreSQL does not answer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
POSTGRES_URL = os.environ.get(
    "CLOUDMODAL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_bench"] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_every_input_is_claimed_once_and_every_output_arrives(tmp_path: Path) -> None:
    missing = _load().postgres_missing(POSTGRES_URL)
    if missing:
        pytest.skip(f"the scale bench needs PostgreSQL: {missing}")
    out = tmp_path / "scale.json"
    env = os.environ | {"CLOUDMODAL_BENCH_POSTGRES_URL": POSTGRES_URL}
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--workers",
            "10",
            "--worker-procs",
            "2",
            "--callers",
            "1",
            "--inputs",
            "200",
            "--paced-fraction",
            "0",
            "--idle-s",
            "0.5",
            "--settle-s",
            "0.5",
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    flat = res["phases"]["flat out"]
    assert flat["inputs"] == 200
    assert flat["claimed_once"] == 200
    assert flat["claimed_more_than_once"] == 0
    assert flat["never_claimed"] == 0
    assert flat["outputs_received"] == 200
    assert flat["outputs_wrong"] == 0
    assert flat["caller_errors"] == []
    assert res["errors"] == []
    assert res["rss_connected_kb"] > 0 and res["rss_idle_kb"] > 0
    assert "put -> claim p99" in proc.stdout  # the table is printed
