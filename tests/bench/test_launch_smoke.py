"""Smoke test of ``bench/launch.py`` at a tiny size: the moto fake (with and without wire latency), launches
through SkyPilot's provisioner from threads, and the failover walk with one zone out of capacity. Checks only
that the benchmark completes, prints its tables and writes its figures; no timing is asserted. The
``sky.launch`` phase (a SkyPilot API server, ~40 s) is left out here; run the bench itself for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "launch.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fakes.moto_ec2 import MotoEc2  # noqa: E402


def test_launch_bench_runs_and_prints_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "launch.json"
    # The bench sets its own sandbox HOME and fake AWS keys; nothing of a developer's AWS set-up is read.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    args = ["--n", "2", "--single", "1", "--threads", "2", "--failing", "1", "--latency", "0,0.02"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--skip-sky-launch", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for latency in ("0", "0.02"):
        assert f"## wire latency {latency} s per API request" in proc.stdout
    assert "| 1 launch (CloudProvider.launch" in proc.stdout
    assert "2 launches at once, thread pool of 2" in proc.stdout
    assert "cloudmodal's own time per launch" in proc.stdout
    assert "failover, cloudmodal" in proc.stdout
    figures = json.loads(out.read_text())
    assert [x["latency_s"] for x in figures["latencies"]] == [0.0, 0.02]
    for x in figures["latencies"]:
        # the failover's instance landed where the walk should have gone: the first zone not out of capacity
        assert x["failover"]["instance_zone"] == x["failover"]["expected_zone"]
        # one zone out of capacity: the first try fails, then the walk tries the next four at once (a hedged
        # round) and keeps the best-ranked node that started; the others are the round's surplus
        statuses = [s for _, s in x["failover"]["run_instances"]]
        assert statuses[0] == 500 and statuses[1:] == [200] * (len(statuses) - 1), statuses
        assert x["failover"]["surplus_nodes"] == len(statuses) - 2
        assert x["threads"][0]["instances"] == 2


@pytest.fixture(scope="module")
def fake() -> Iterator[MotoEc2]:
    with MotoEc2.start() as f:
        yield f


def test_fake_latency_is_set_read_and_reset(fake: MotoEc2) -> None:
    fake.set_latency(0.01)
    assert fake.latency() == 0.01
    ec2 = fake.client("ec2")
    ec2.describe_vpcs()  # still answered, and logged
    assert [r["action"] for r in fake.requests()][-1:] == ["DescribeVpcs"]
    fake.clean()
    assert fake.latency() == 0.0
    fake.set_latency(0.01)
    fake.reset()
    assert fake.latency() == 0.0
