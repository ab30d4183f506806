"""A function with a GPU fallback list, end to end on the clouds' fakes: the failover walk (capacity errors
injected on the wire), SkyPilot's provisioner creating the node, the worker bootstrapped over real SSH through
a reverse tunnel, the result back to the caller, and every attempt in the app's events.

Real control plane, drivers, SkyPilot, boto3, ssh and worker; moto (AWS) and a spec-checked Lambda fake on
127.0.0.1; the node is a real sshd on this machine (see ``cloud_support``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloud_app
import pytest
from cloud_support import (
    REGION,
    FakeImds,
    cloud_plane,
    cloud_provider,
    cloud_sandbox,
    events,
    moto_ec2,
    moto_instances,
    tags_of,
    wait_for,
)
from sqlalchemy import text

from cloudmodal.client.session import run_app
from cloudmodal.providers.nodes import TAG_APP, TAG_CONTROL_PLANE, TAG_FUNCTION, TAG_WORKER
from cloudmodal.server import models
from tests.fakes.sshd import sshd_missing

pytestmark = pytest.mark.skipif(bool(sshd_missing()), reason=sshd_missing() or "")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """HOME for SkyPilot (it writes ~/.sky), the catalog, and the stand-in node, for the module."""
    base = tmp_path_factory.mktemp("clouds")
    with cloud_sandbox(base) as env:
        yield env


@pytest.fixture(scope="module")
def moto(sandbox: dict[str, Any]) -> Iterator[Any]:
    with moto_ec2() as fake:
        yield fake


@pytest.fixture
def aws(moto: Any) -> Any:
    moto.clean()
    return moto


@pytest.fixture(scope="module")
def lambda_api(sandbox: dict[str, Any]) -> Iterator[Any]:
    from tests.fakes.lambda_api import SPEC_HINT, LambdaFake, find_spec

    spec = find_spec()
    if spec is None:
        pytest.skip(SPEC_HINT)
    with LambdaFake(spec) as fake:
        yield fake


def aws_provider(sandbox: dict[str, Any], tmp_path: Path, **kw: Any) -> Any:
    from cloudmodal.providers.aws import AwsNodes

    driver = AwsNodes(regions=[REGION], catalog_dir=str(sandbox["catalog"]))
    return cloud_provider(driver, tmp_path / "aws", sandbox["node"], sandbox["ssh_config"], **kw)


def lambda_provider(sandbox: dict[str, Any], tmp_path: Path, fake: Any) -> Any:
    from cloudmodal.providers.lambda_cloud import LambdaNodes
    from tests.fakes.lambda_api import DEFAULT_API_KEY

    driver = LambdaNodes(
        api_endpoint=fake.url,
        api_key=DEFAULT_API_KEY,
        catalog_dir=sandbox["catalog"],
        rate_limit_backoff_s=0.01,
    )
    return cloud_provider(driver, tmp_path / "lambda", sandbox["node"], sandbox["ssh_config"])


def _attempts(handle: Any, app_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    evs = events(handle, app_id, "launch.failed", "worker.launched")
    first = next(i for i, e in enumerate(evs) if e["kind"] == "worker.launched")
    return [e["message"] for e in evs[:first]], evs[first]


def test_aws_fails_over_and_runs_the_input_on_a_bootstrapped_node(
    aws: Any, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    # use1-az1 is out of capacity once (the walk's first try), use1-az2 throughout: after the first capacity
    # failure the walk tries the next two candidates at once (a hedged round), p5 in az2 and p4de in az1.
    aws.inject("RunInstances", "InsufficientInstanceCapacity", status=500, count=1, zone="use1-az1")
    aws.inject("RunInstances", "InsufficientInstanceCapacity", status=500, zone="use1-az2")
    with cloud_plane(tmp_path, {"aws": aws_provider(sandbox, tmp_path)}) as handle:
        with run_app(cloud_app.app, show_logs=False) as running:
            got = cloud_app.where.remote(21)
            app_id = running.app_id
            fid = cloud_app.where._function_id
        failed, launched = _attempts(handle, app_id)
        with handle.cp.db.read() as conn:
            W = models.workers  # noqa: N806
            row = conn.execute(W.select().where(W.c.id == got["worker"])).mappings().one()
        cp_id = handle.cp.control_plane_id
        ranked = events(handle, app_id, "placement.ranked")
        hedged = events(handle, app_id, "launch.hedged")

    assert got["x2"] == 42
    # The two H100 zones were refused by the cloud (each try once: botocore did not retry the 500s) and the
    # walk moved on to tier 2; each attempt is in the events with the cloud's reason.
    assert len(failed) == 2, failed
    assert all("InsufficientInstanceCapacity" in m for m in failed), failed
    assert failed[0].startswith("aws use1-az1 p5.48xlarge") and failed[1].startswith(
        "aws use1-az2 p5.48xlarge"
    )
    assert "p4de.24xlarge" in launched["message"] and launched["data"]["worker_id"] == got["worker"]
    assert ranked and "1) aws use1-az1 p5.48xlarge" in ranked[0]["message"]
    assert len(aws.requests("RunInstances")) == 3
    assert len(hedged) == 1 and "trying 2 candidates at once" in hedged[0]["message"], hedged
    # SkyPilot's provisioner made the instance: the right type and market, tagged for this control plane,
    # app, function and worker; the worker row holds the handle a restarted control plane would need.
    (inst,) = [i for i in moto_instances(aws, live=False) if i["InstanceType"] == "p4de.24xlarge"]
    tags = tags_of(inst)
    assert tags[TAG_CONTROL_PLANE] == cp_id and tags[TAG_APP] == app_id and tags[TAG_FUNCTION] == fid
    assert tags[TAG_WORKER] == got["worker"]
    assert inst.get("InstanceLifecycle") != "spot" and row["market"] == "on-demand"
    assert row["provider"] == "aws" and row["handle"]["extra"]["node"]["instance_id"] == inst["InstanceId"]
    assert row["handle"]["extra"]["host"].startswith("54.")  # the node's public address (moto's range)
    # The control plane stopped: its node is gone.
    assert all(i["State"]["Name"] in ("terminated", "shutting-down") for i in moto_instances(aws, live=False))


def test_aws_out_of_capacity_fails_over_to_lambda(
    aws: Any, lambda_api: Any, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    aws.inject("RunInstances", "InsufficientInstanceCapacity", status=500, count=1, zone="use1-az1")
    aws.inject("RunInstances", "InsufficientInstanceCapacity", status=500, zone="use1-az2")
    lambda_api.reset()
    lambda_api.auto_activate_after = 1  # the instance boots, then is active with an address
    lambda_api.set_capacity("gpu_8x_h100_sxm5", REGION, 1)  # what its live signal says, too
    clouds = {
        "aws": aws_provider(sandbox, tmp_path),
        "lambda": lambda_provider(sandbox, tmp_path, lambda_api),
    }
    with cloud_plane(tmp_path, clouds) as handle:
        with run_app(cloud_app.app, show_logs=False) as running:
            got = cloud_app.where.remote(5)
            app_id = running.app_id
        failed, launched = _attempts(handle, app_id)
        launched_in_lambda = [i for i in lambda_api.instances() if i["name"].endswith("-head")]
        surplus = events(handle, app_id, "launch.hedge_surplus")
        p4de = [
            i
            for i in moto_instances(aws, live=False)
            if i["InstanceType"] == "p4de.24xlarge" and tags_of(i).get(TAG_WORKER) == got["worker"]
        ]
    assert got["x2"] == 10
    assert len(failed) == 2 and all(m.startswith("aws ") for m in failed), failed
    # The hedged round after the first failure tried p5 in az2 (refused), Lambda's H100 and AWS's p4de at once:
    # both of those started; the worker kept the better-ranked one (Lambda's H100, tier 1) and the p4de node
    # was terminated at once, as a surplus of the round.
    assert launched["message"].startswith(
        f"worker {got['worker']} launched: lambda {REGION} gpu_8x_h100_sxm5"
    )
    assert len(launched_in_lambda) == 1
    (extra,) = p4de
    assert extra["State"]["Name"] in ("shutting-down", "terminated")
    assert len(surplus) == 1 and extra["InstanceId"] in surplus[0]["message"], surplus
    assert "terminated at once" in surplus[0]["message"]
    assert not lambda_api.violations, lambda_api.violations


def test_spot_notice_requeues_at_once_and_a_replacement_finishes(
    aws: Any, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    imds = FakeImds()
    n = 30
    try:
        provider = aws_provider(sandbox, tmp_path, node_env={"CLOUDMODAL_METADATA_URL": imds.url})
        with cloud_plane(tmp_path, {"aws": provider}) as handle:
            with run_app(cloud_app.app, show_logs=False) as running:
                app_id = running.app_id
                results: list[int] = []
                it = cloud_app.slow_spot.map(range(n))
                results.append(next(it))  # the first worker is up and serving
                (first,) = moto_instances(aws)
                assert first.get("InstanceLifecycle") == "spot"
                imds.notice(at=time.time() + 120)
                preempted = wait_for(
                    lambda: events(handle, app_id, "worker.preempted"), what="the worker's preemption notice"
                )
                # The cloud reclaims the node (the drained worker has handed its inputs back and exits).
                aws.reclaim_spot(first["InstanceId"], REGION)
                results.extend(it)
            launched = events(handle, app_id, "worker.launched")
            with handle.cp.db.read() as conn:
                used = conn.execute(
                    text("select coalesce(sum(attempts), 0) from input where function_id = :f"),
                    {"f": cloud_app.slow_spot._function_id},
                ).scalar_one()
    finally:
        imds.close()
    assert sorted(results) == list(range(n))
    assert preempted[0]["data"]["requeued"] >= 0
    assert len(launched) >= 2  # the replacement
    assert used == 0  # no user retry consumed


def test_a_worker_scaled_down_gives_its_node_back(aws: Any, sandbox: dict[str, Any], tmp_path: Path) -> None:
    """The node outlives the worker's process: when the pool scales down, the control plane terminates it."""
    with cloud_plane(tmp_path, {"aws": aws_provider(sandbox, tmp_path)}) as handle:
        with run_app(cloud_app.app, show_logs=False) as running:
            assert cloud_app.brief.remote(1) == 2
            (inst,) = moto_instances(aws)
            wait_for(
                lambda: not moto_instances(aws) and not handle.reconciler.handles,
                60,
                "the idle worker's node to be terminated",
            )
            stopped = events(handle, running.app_id, "worker.stopped")
    (gone,) = [i for i in moto_instances(aws, live=False) if i["InstanceId"] == inst["InstanceId"]]
    assert gone["State"]["Name"] in ("shutting-down", "terminated")
    assert stopped and any(w in stopped[0]["message"] for w in ("idle", "drained")), stopped


def test_a_web_endpoint_on_a_cloud_node_serves_through_its_tunnel(
    aws: Any, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    """The node's worker reaches the control plane only through the reverse SSH tunnel; a request to its
    endpoint starts the node (scaling from zero) and is answered over the web tunnel the worker dials back."""
    import httpx

    with cloud_plane(tmp_path, {"aws": aws_provider(sandbox, tmp_path)}) as handle:
        with run_app(cloud_app.app, show_logs=False):
            url = cloud_app.web_where.get_web_url()
            assert url == f"{handle.url}/web/cloud-app-dev/web-where/"
            r = httpx.get(url, timeout=180)
            assert r.status_code == 200, r.text
            with handle.cp.db.read() as conn:
                W = models.workers  # noqa: N806
                row = conn.execute(W.select().where(W.c.id == r.json()["worker"])).mappings().one()
    assert row["provider"] == "aws"


def test_cloud_workers_do_not_count_against_this_machines_worker_budget(
    aws: Any, sandbox: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLOUDMODAL_LOCAL_MAX_WORKERS bounds the worker processes of the control plane's machine; a pool whose
    workers run on cloud nodes is bounded by its own max_containers only."""
    monkeypatch.setenv("CLOUDMODAL_LOCAL_MAX_WORKERS", "1")
    with cloud_plane(tmp_path, {"aws": aws_provider(sandbox, tmp_path)}) as handle:
        with run_app(cloud_app.app, show_logs=False):
            assert list(cloud_app.wide.map(range(12))) == list(range(12))
        with handle.cp.db.read() as conn:
            n = conn.execute(text("select count(*) from worker where provider = 'aws'")).scalar_one()
    assert n >= 2  # more than the budget of 1 (3 when the first decision sees every input)
