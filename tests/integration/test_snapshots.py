"""Memory snapshots on the local provider, with real processes: a function version's ``@enter(snap=True)``
hooks run once per node, in a zygote; each container is a fork of it that runs its ``@enter(snap=False)``
hooks and serves under its own identity; a snapshot that a fork would break is refused with a clear error;
the zygote does not outlive the control plane."""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from support import use_server

from cloudmodal.client.session import run_app
from cloudmodal.exception import ExecutionError
from cloudmodal.providers.local import LocalProvider
from cloudmodal.server.app import ServerHandle, default_settings
from cloudmodal.worker.snapshot import SnapshotError, check_fork_safe, cuda_initialized

WAIT_S = 120.0
# Each class runs on two pools here, the class's and its instance's (``Snapped()``: see cloudmodal.functions.Obj),
# both with min_containers=3: six containers of two functions.
POOLS, PER_POOL = 2, 3


@pytest.fixture
def out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "notes"
    out.mkdir()
    monkeypatch.setenv("SNAPSHOT_TEST_DIR", str(out))  # workers and zygotes inherit it
    return out


@pytest.fixture
def snapshot_app(out_dir: Path) -> ModuleType:
    return importlib.import_module("snapshot_app")


@pytest.fixture
def plane(
    tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServerHandle, LocalProvider]]:
    # room for both pools of a class at once (the default budget is max(4, 2 x cores))
    monkeypatch.setenv("CLOUDMODAL_LOCAL_MAX_WORKERS", str(2 * POOLS * PER_POOL))
    state = tmp_path / "state"
    settings = default_settings(
        state,
        database_url=f"sqlite:///{state / 'cloudmodal.db'}",
        lease_s=6.0,
        heartbeat_s=0.5,
        worker_timeout_s=20.0,
        reconcile_interval_s=0.1,
    )
    provider = LocalProvider(state_dir=state / "workers", gpus=[])
    handle = ServerHandle(settings, providers={"local": provider}).start_in_thread()
    try:
        with use_server(handle):
            yield handle, provider
    finally:
        handle.stop()


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(what: str, cond: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie has exited too
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_snap_hooks_run_once_per_node_and_containers_are_forks(
    plane: tuple[ServerHandle, LocalProvider], snapshot_app: ModuleType, out_dir: Path
) -> None:
    handle, provider = plane
    with run_app(snapshot_app.snap_app, show_logs=False):
        result = snapshot_app.Snapped().info.remote(21)
        wait_for("six containers", lambda: len(lines(out_dir / "post_hooks.jsonl")) >= POOLS * PER_POOL)
        snap = lines(out_dir / "snap_hooks.jsonl")
        post = lines(out_dir / "post_hooks.jsonl")
        imports = lines(out_dir / "imports.jsonl")
        zygotes = provider.zygotes()

    # once per function on the node, not once per container: one zygote per pool, one snap hook run each
    assert len(zygotes) == POOLS and sorted(zygotes.values()) == sorted(s["pid"] for s in snap), (
        snap,
        zygotes,
    )
    assert sorted(i["pid"] for i in imports) == sorted(zygotes.values())  # the module imported only there
    assert all(s["worker"] is None for s in snap)  # a zygote is no worker: it has no worker identity
    workers = {p["worker"] for p in post}
    pids = {p["pid"] for p in post}
    assert len(post) == len(workers) == len(pids) == POOLS * PER_POOL  # each container its own identity
    assert not pids & set(zygotes.values())
    for zygote_pid in zygotes.values():  # each container started from its pool's snapshot
        assert sum(p["warmed_in"] == zygote_pid for p in post) == PER_POOL
    # the container that served the call: the snap hook's state, its own snap=False hook's identity
    assert result["x2"] == 42
    assert result["state"]["table"] == [0, 1, 4, 9, 16] and result["state"]["warmed_in"] in zygotes.values()
    assert result["worker"] in workers and result["pid"] in pids
    assert result["private_env"] == []  # neither its token nor the agent's socket in the user's environment

    handle.stop()  # the control plane's shutdown stops the zygotes and their containers
    wait_for("the zygotes to exit", lambda: all(gone(p) for p in zygotes.values()), 30)
    wait_for("the containers to exit", lambda: all(gone(p) for p in pids), 30)


def test_without_snapshot_each_container_runs_its_hooks(
    plane: tuple[ServerHandle, LocalProvider], snapshot_app: ModuleType, out_dir: Path
) -> None:
    """The negative control: the same pools without enable_memory_snapshot run the hook per container."""
    _handle, provider = plane
    with run_app(snapshot_app.plain_app, show_logs=False):
        assert snapshot_app.Plain().info.remote(4) == 8
        wait_for("six containers", lambda: len(lines(out_dir / "plain_hooks.jsonl")) >= POOLS * PER_POOL)
        hooks = lines(out_dir / "plain_hooks.jsonl")
        imports = lines(out_dir / "imports.jsonl")
        assert provider.zygotes() == {}
    assert len({h["worker"] for h in hooks}) == POOLS * PER_POOL
    assert len(imports) >= POOLS * PER_POOL  # each container imported the module itself


def test_zygote_stops_when_its_pools_scale_to_zero(
    plane: tuple[ServerHandle, LocalProvider], snapshot_app: ModuleType, out_dir: Path
) -> None:
    _handle, provider = plane
    provider.snapshot_idle_s = 0.5
    with run_app(snapshot_app.snap_app, show_logs=False):
        assert snapshot_app.Snapped().info.remote(1)["x2"] == 2
        zygotes = provider.zygotes()
        assert len(zygotes) >= 1
    # the app stopped: its workers are gone, and the zygotes follow once idle, with the control plane still up
    wait_for("the idle zygotes to stop", lambda: all(gone(p) for p in zygotes.values()), 60)
    assert provider.zygotes() == {}


VERSIONED_APP = """
import os

import cloudmodal

app = cloudmodal.App("snapshot-versions")
VERSION = {version!r}


@app.function(enable_memory_snapshot=True)
def which() -> tuple:
    return VERSION, os.getpid()
"""


def test_a_new_version_replaces_the_snapshot(
    plane: tuple[ServerHandle, LocalProvider], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloudmodal import Function
    from cloudmodal.client.session import deploy

    src = tmp_path / "src"
    src.mkdir()
    monkeypatch.syspath_prepend(str(src))
    _handle, provider = plane
    seen: list[tuple[str, dict[str, int], int]] = []
    for version in ("v1", "v2"):
        (src / "snapshot_versions.py").write_text(VERSIONED_APP.format(version=version))
        sys.modules.pop("snapshot_versions", None)
        importlib.invalidate_caches()
        deploy(importlib.import_module("snapshot_versions").app)
        if seen:  # the reconciler drains the old version's container; until then it may answer the call
            wait_for("the old version's container to stop", lambda: gone(seen[0][2]), 60)
        got, pid = Function.from_name("snapshot-versions", "which").remote()
        seen.append((got, provider.zygotes(), pid))
    (v1, zygotes_1, _), (v2, zygotes_2, _) = seen
    assert (v1, v2) == ("v1", "v2")
    assert zygotes_1.keys() == zygotes_2.keys() and len(zygotes_1) == 1  # one function, two versions
    old = set(zygotes_1.values())
    assert not old & set(zygotes_2.values())  # a new snapshot for the new version
    wait_for("the old version's zygote to stop", lambda: all(gone(p) for p in old), 60)


def test_a_thread_left_running_refuses_the_snapshot(
    plane: tuple[ServerHandle, LocalProvider], snapshot_app: ModuleType
) -> None:
    with run_app(snapshot_app.leaky_app, show_logs=False):
        with pytest.raises(ExecutionError, match=r"failed to start.*'leaky-poller' \(daemon\)") as info:
            snapshot_app.Leaky().ping.remote()
    assert "@enter(snap=False)" in str(info.value)  # and it says what to do instead


def test_fork_safety_checks() -> None:
    def torch_with(initialized: bool) -> dict[str, object]:
        return {"torch": SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: initialized))}

    assert cuda_initialized({}) is False  # torch never imported: nothing initialized through it
    assert cuda_initialized(torch_with(False)) is False
    assert cuda_initialized(torch_with(True)) is True
    check_fork_safe("f", threads=[], modules=torch_with(False))
    with pytest.raises(SnapshotError, match=r"CUDA was initialized.*@enter\(snap=False\)"):
        check_fork_safe("f", threads=[], modules=torch_with(True))

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="poller-1")
    t.start()
    try:
        with pytest.raises(SnapshotError, match=r"still running: 'poller-1'\."):
            check_fork_safe("f", threads=[t], modules={})
    finally:
        stop.set()
        t.join()
