"""No paid node outlives the control plane's knowledge of it, and a running one is not lost either.

A control plane (a real ``cloudmodal server start`` process with the AWS provider on moto) is SIGKILLed after
SkyPilot's provisioner created a worker's instance and before the worker registered (its node never answers
SSH here, so it never does). The restarted control plane, or a standby that takes over the database, lists
the instances tagged with the control plane's id and terminates the one no live worker runs on. A worker
that did register (on a stand-in node over real SSH) is adopted instead: its tunnel re-opened, it serves on.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloud_keep_app
import httpx
import pytest
from cloud_support import REGION, moto_instances, tags_of, wait_for, write_catalog

from cloudmodal.client import session as session_mod
from cloudmodal.client.session import deploy
from cloudmodal.providers.nodes import TAG_CONTROL_PLANE, TAG_WORKER
from cloudmodal.server import models
from cloudmodal.server.db import Database
from tests.ports import reserved_port


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.fakes.moto_ec2 import MotoEc2

    with MotoEc2.start(regions=[REGION]) as fake:
        yield fake


@pytest.fixture
def aws(moto: Any) -> Any:
    moto.clean()
    return moto


def _env(aws: Any, tmp_path: Path, name: str) -> dict[str, str]:
    """A control plane process's environment: the AWS provider on moto, a catalog of our own, a HOME for
    SkyPilot, and nodes whose SSH port nothing listens on (the bootstrap never gets in)."""
    catalog = tmp_path / "catalog"
    if not catalog.exists():
        write_catalog(catalog)
    dead = reserved_port()  # never bound; no bind(0) elsewhere is handed it either (tests/ports.py)
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host *\n    HostName 127.0.0.1\n    Port {dead}\n    ConnectTimeout 2\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")}
    env.update(aws.env())
    env.update(
        HOME=str(tmp_path / f"home-{name}"),
        CLOUDMODAL_HOME=str(tmp_path / name),
        CLOUDMODAL_PROVIDERS="aws",
        CLOUDMODAL_CATALOG_DIR=str(catalog),
        CLOUDMODAL_SSH_CONFIG=str(ssh_config),
        CLOUDMODAL_RECONCILE_INTERVAL_S="0.2",
        CLOUDMODAL_HEARTBEAT_S="0.5",
    )
    return env


def _stand_in_env(env: dict[str, str], node: Any, tmp_path: Path) -> dict[str, str]:
    """Nodes that are the stand-in: its address, its login, this machine's Python (a prepared node image)."""
    from cloudmodal.providers.cloud import ensure_ssh_key

    ssh_config = tmp_path / "ssh_config_node"
    ssh_config.write_text(f"Host *\n    HostName 127.0.0.1\n    Port {node.port}\n")
    _, public_key = ensure_ssh_key(Path(env["CLOUDMODAL_HOME"]) / "clouds" / "aws" / "ssh" / "id_ed25519")
    with (node.key_path.parent / "authorized_keys").open("a") as f:
        f.write(public_key + "\n")
    return env | {
        "CLOUDMODAL_SSH_CONFIG": str(ssh_config),
        "CLOUDMODAL_NODE_SSH_USER": getpass.getuser(),
        "CLOUDMODAL_NODE_PYTHON": sys.executable,
        "CLOUDMODAL_NODE_PREPARED": "1",
    }


def _start(env: dict[str, str], port: int, database_url: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cloudmodal.cli.main", "server", "start", "--foreground"]
    argv += ["--port", str(port), "--database-url", database_url]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            assert proc.poll() is None, f"the control plane exited with {proc.returncode}"
            return False

    wait_for(up, 60, "the control plane to serve")
    return proc


def _member_token(env: dict[str, str]) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "token", "create", "--member", "--name", "leak test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().splitlines()[-1]


def _kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _deploy_and_wait_for_instance(
    aws: Any, port: int, token: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    monkeypatch.setenv("CLOUDMODAL_SERVER_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLOUDMODAL_TOKEN", token)
    session_mod.disconnect()
    try:
        deploy(cloud_keep_app.app)
    finally:
        session_mod.disconnect()
    (inst,) = wait_for(lambda: moto_instances(aws), 60, "SkyPilot to create the worker's instance")
    return inst


def _sibling_node(aws: Any, inst: dict[str, Any], worker_id: str) -> str:
    """Run another instance tagged for ``inst``'s control plane and worker, named as a later try of its
    launch walk; its id."""
    tags = tags_of(inst)
    cp_id = tags[TAG_CONTROL_PLANE]
    hashed_name = tags["Name"]
    made = aws.client("ec2", REGION).run_instances(
        ImageId=inst["ImageId"],
        InstanceType=inst["InstanceType"],
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": TAG_CONTROL_PLANE, "Value": cp_id},
                    {"Key": TAG_WORKER, "Value": worker_id},
                    {"Key": "Name", "Value": f"{hashed_name}-t1"},
                    # SkyPilot's cluster tags, as its RunInstances writes them (terminating goes by them)
                    {"Key": "ray-cluster-name", "Value": f"{hashed_name}-t1"},
                    {"Key": "skypilot-cluster-name", "Value": f"{hashed_name}-t1"},
                ],
            }
        ],
    )
    return str(made["Instances"][0]["InstanceId"])


def _orphan_events(database_url: str) -> list[str]:
    db = Database(database_url)
    try:
        with db.read() as conn:
            E = models.events  # noqa: N806
            rows = conn.execute(E.select().where(E.c.kind == "machine.orphan_terminated")).all()
        return [r.message for r in rows]
    finally:
        db.dispose()


def _the_orphan_event(database_url: str) -> str:
    """The one ``machine.orphan_terminated`` event, waited for: the control plane writes it after the cloud
    has been asked to terminate the machine, so the machine can read as gone a moment before it exists."""
    (msg,) = wait_for(lambda: _orphan_events(database_url), 30, "the machine.orphan_terminated event")
    return msg


def _gone(aws: Any, instance_id: str) -> bool:
    (inst,) = [i for i in moto_instances(aws, live=False) if i["InstanceId"] == instance_id]
    return inst["State"]["Name"] in ("shutting-down", "terminated")


def test_a_restarted_control_plane_terminates_the_node_it_never_recorded(
    aws: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database_url = f"sqlite:///{tmp_path / 'cp.db'}"
    env = _env(aws, tmp_path, "cp")
    # the port is free while the control plane is down: a reserved one (tests/ports.py), which nothing else
    # on the machine is handed out meanwhile, so the restart binds it again
    port = reserved_port()
    proc = _start(env, port, database_url)
    try:
        inst = _deploy_and_wait_for_instance(aws, port, _member_token(env), monkeypatch)
        _kill(proc)  # between RunInstances and the worker's registration
        assert not _gone(aws, inst["InstanceId"])
        proc = _start(env, port, database_url)
        wait_for(lambda: _gone(aws, inst["InstanceId"]), 60, "the restarted control plane to terminate it")
        msg = _the_orphan_event(database_url)
        assert inst["InstanceId"] in msg and tags_of(inst)[TAG_WORKER] in msg
        # min_containers=1: the restarted control plane launches a worker of its own; stopped cleanly
        # (SIGTERM), it terminates it, and no node of this control plane is left running.
        wait_for(lambda: len(moto_instances(aws, live=False)) > 1, 60, "the replacement's instance")
        _kill(proc, signal.SIGTERM)
        assert proc.returncode == 0
    finally:
        _kill(proc)
    assert all(_gone(aws, i["InstanceId"]) for i in moto_instances(aws, live=False))


def test_a_standby_taking_over_terminates_the_node_the_leader_never_recorded(
    aws: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_postgres_database: Any
) -> None:
    database_url = new_postgres_database()
    env_a, env_b = _env(aws, tmp_path, "a"), _env(aws, tmp_path, "b")
    shared = str(tmp_path / "blobs")  # control planes sharing a database share its blob store
    env_a["CLOUDMODAL_BLOB_DIR"] = env_b["CLOUDMODAL_BLOB_DIR"] = shared
    port_a, port_b = reserved_port(), reserved_port()  # b's is bound only once a serves (tests/ports.py)
    a = _start(env_a, port_a, database_url)
    b = None
    try:
        b = _start(env_b, port_b, database_url)
        inst = _deploy_and_wait_for_instance(aws, port_a, _member_token(env_a), monkeypatch)
        cp_id = tags_of(inst)[TAG_CONTROL_PLANE]
        _kill(a)
        wait_for(lambda: _gone(aws, inst["InstanceId"]), 60, "the standby to take over and terminate it")
        msg = _the_orphan_event(database_url)
        assert inst["InstanceId"] in msg
        # the standby tags its nodes with the same id: the database's, not the process's
        db = Database(database_url)
        try:
            with db.read() as conn:
                S = models.settings  # noqa: N806
                assert conn.execute(S.select()).mappings().one()["value"] == cp_id
        finally:
            db.dispose()
        if b is not None:
            _kill(b, signal.SIGTERM)
    finally:
        _kill(a)
        if b is not None:
            _kill(b)
    assert all(_gone(aws, i["InstanceId"]) for i in moto_instances(aws, live=False))


def _workers(database_url: str) -> list[dict[str, Any]]:
    db = Database(database_url)
    try:
        with db.read() as conn:
            return [dict(r) for r in conn.execute(models.workers.select()).mappings()]
    finally:
        db.dispose()


def test_a_restarted_control_plane_adopts_the_worker_that_registered(
    aws: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.sshd import sshd_missing, stand_in_node

    if sshd_missing():
        pytest.skip(sshd_missing() or "")
    import cloudmodal

    database_url = f"sqlite:///{tmp_path / 'cp.db'}"
    port = reserved_port()  # bound after the node starts, and again after the kill (tests/ports.py)
    with stand_in_node(tmp_path / "node") as node:
        env = _stand_in_env(_env(aws, tmp_path, "cp"), node, tmp_path)
        proc = _start(env, port, database_url)
        try:
            inst = _deploy_and_wait_for_instance(aws, port, _member_token(env), monkeypatch)
            (ready,) = wait_for(
                lambda: [w for w in _workers(database_url) if w["state"] == "ready"],
                90,
                "the worker to register",
            )
            _kill(proc)  # the tunnel (an ssh child of the control plane) dies with it; the worker does not
            # What a crash in the middle of a hedged launch round leaves: a sibling node tagged with the same
            # worker (named apart) that was never terminated. It is not the worker's node: terminated.
            sibling = _sibling_node(aws, inst, ready["id"])
            proc = _start(env, port, database_url)
            session_mod.disconnect()
            try:
                keep = cloudmodal.Function.from_name("cloud-keep", "keep")
                assert keep.remote(5) == 5
            finally:
                session_mod.disconnect()
            (still,) = [w for w in _workers(database_url) if w["state"] == "ready"]
            assert still["id"] == ready["id"]  # the same worker served: adopted, not replaced
            wait_for(lambda: _gone(aws, sibling), 60, "the sibling node to be terminated")
            assert [i["InstanceId"] for i in moto_instances(aws)] == [inst["InstanceId"]]
            orphaned = _the_orphan_event(database_url)
            assert sibling in orphaned and ready["id"] in orphaned
            _kill(proc, signal.SIGTERM)
            assert proc.returncode == 0
        finally:
            _kill(proc)
    assert all(_gone(aws, i["InstanceId"]) for i in moto_instances(aws, live=False))
