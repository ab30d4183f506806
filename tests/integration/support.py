"""Helpers shared by the integration tests: control planes on SQLite, and on the simulated cloud."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloudmodal.client import session as session_mod
from cloudmodal.pricing.offers import Offer
from cloudmodal.providers.local import LocalProvider
from cloudmodal.providers.sim import SimProvider
from cloudmodal.server.app import ServerHandle, default_settings
from cloudmodal.server.service import ControlPlane
from cloudmodal.spec import FunctionSpec


def start_server(state_dir: Path, database_url: str, **settings: object) -> ServerHandle:
    base = dict(
        lease_s=6.0, heartbeat_s=0.5, worker_timeout_s=10.0, client_timeout_s=60.0, reconcile_interval_s=0.1
    )
    base.update(settings)
    return ServerHandle(default_settings(state_dir, database_url=database_url, **base)).start_in_thread()


@contextmanager
def client_env(url: str, token: str | None) -> Iterator[None]:
    """Point this process's client at ``url``, authenticated with ``token``, for the duration; the previous
    settings come back after."""
    keys = ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["CLOUDMODAL_SERVER_URL"] = url
    if token is None:
        os.environ.pop("CLOUDMODAL_TOKEN", None)
    else:
        os.environ["CLOUDMODAL_TOKEN"] = token
    session_mod.disconnect()
    try:
        yield
    finally:
        session_mod.disconnect()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def use_server(handle: ServerHandle) -> Iterator[ServerHandle]:
    """Point this process's client at ``handle``, authenticated with its owner token, for the duration."""
    with client_env(handle.url, handle.token):
        yield handle


D = "2026-01-01"
# Tier 1 (A10): cheapest A on aws us-east-1, then B on aws us-west-2, then D on lambda. Tier 2 (L4): C on gcp,
# cheaper than all of tier 1 (so picking it while tier 1 has capacity would be wrong).
A = Offer("aws", "us-east-1", "use1-az1", "g5.xlarge", "A10", 1, 24, 4, 16, 1.00, 0.30, "test", D)
B = Offer("aws", "us-west-2", "usw2-az1", "g5.xlarge", "A10", 1, 24, 4, 16, 1.10, 0.40, "test", D)
DL = Offer("lambda", "us-east-1", None, "gpu_1x_a10", "A10", 1, 24, 30, 200, 1.50, None, "test", D)
C = Offer("gcp", "us-central1", "us-central1-a", "g2-standard-4", "L4", 1, 24, 4, 16, 0.80, 0.25, "test", D)
OFFERS = [A, B, DL, C]


@contextmanager
def sim_plane(
    tmp_path: Path, scenario: dict, *, offers: Any = None, **env: str
) -> Iterator[tuple[ServerHandle, SimProvider]]:
    """A control plane with the local provider (no GPUs) and a sim cloud selling ``offers`` (default
    :data:`OFFERS`) under ``scenario``; ``env`` is set while it runs."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sim = SimProvider(
        offers=OFFERS if offers is None else offers, scenario=scenario, state_dir=tmp_path / "sim", seed=1
    )
    providers = {"local": LocalProvider(state_dir=tmp_path / "local", gpus=[]), "sim": sim}
    settings = default_settings(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'cp.db'}",
        lease_s=6.0,
        heartbeat_s=0.5,
        worker_timeout_s=15.0,
        reconcile_interval_s=0.1,
    )
    handle = ServerHandle(settings, providers=providers).start_in_thread()
    try:
        with client_env(handle.url, handle.token):
            yield handle, sim
    finally:
        handle.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def bare_plane(state_dir: Path, database_url: str, app_id: str, **settings: Any) -> Iterator[ControlPlane]:
    """A control plane object with no server nor reconciler (its Python API only), with one running app."""
    plane = ControlPlane(default_settings(state_dir, database_url=database_url, **settings))
    assert plane.apps.create_app(app_id, app_id, True)["state"] == "running"
    try:
        yield plane
    finally:
        plane.commits.close()
        plane.db.dispose()


def function_with_workers(cp: ControlPlane, app_id: str, name: str, workers: list[str]) -> str:
    """A function of ``app_id`` with these workers registered and ready: its id."""
    spec = FunctionSpec(name=name, module="m", qualname=name).to_wire()
    fid = cp.functions.create_function({"app_id": app_id, "name": name, "spec": spec})["function_id"]
    for wid in workers:
        cp.workers.add_worker(wid, app_id, fid)
        cp.workers.worker_ready(wid)
    return fid


def stop_child(proc: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    """End a control plane run in a child process that stops when its stdin closes (killed if it does not
    within ``timeout``)."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
