"""Smoke test of ``bench/volume_io.py`` at a tiny size: moto's server, boto3's transfer manager, the volume
engine and obstore each upload and download a file (contents checked by the bench). Checks only that the
benchmark completes, prints its tables and writes its figures; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "volume_io.py"


def test_volume_io_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "volume_io.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the bench brings its own
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--size", "3", "--repeat", "1", "--part-size", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| upload MB/s |" in proc.stdout and "| download MB/s |" in proc.stdout
    figures = json.loads(out.read_text())
    assert set(figures["phases"]) == {"boto3", "engine", "obstore"}
    for phase in figures["phases"].values():
        assert set(phase) == {"upload", "download"}
        assert all(op["mb_per_s"] > 0 for op in phase.values())
