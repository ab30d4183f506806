"""The local provider with real worker subprocesses and pretend GPUs (CLOUDMODAL_FAKE_GPUS)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from cloudmodal.gpu import GpuTier
from cloudmodal.providers.base import (
    ImageBuildError,
    LaunchRequest,
    NoCapacityError,
    Provider,
    ProviderError,
    SupportsGpuInventory,
    SupportsPreemptionNotice,
    WorkerHandle,
)
from cloudmodal.providers.gpu import parse_fake_gpus
from cloudmodal.providers.local import LocalProvider, local_offer_for

# A worker stand-in: write selected env vars to a file, then sleep until stopped.
REPORT_ENV = """
import json, os, sys, time
keys = ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CLOUDMODAL_IS_REMOTE", "CLOUDMODAL_WORKER_ID",
        "CONTROL_PLANE_URL", "CLOUDMODAL_CPU_FALLBACK"]
print("worker says hello", flush=True)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in keys}) + "\\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

IGNORE_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("ready\\n")
time.sleep(60)
"""

SPAWN_GRANDCHILD = """
import subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(f"{p.pid}\\n")
time.sleep(60)
"""


def req(
    worker_id: str, gpu: str | None = None, *, argv=("-c", "import time; time.sleep(60)"), **kw
) -> LaunchRequest:
    tier = None
    if gpu is not None:
        name, _, count = gpu.partition(":")
        tier = GpuTier(name, int(count or 1))
    return LaunchRequest(worker_id=worker_id, app_id="ap-1", function_id="fu-1", gpu=tier, argv=argv, **kw)


def launch_reporting(provider: LocalProvider, tmp_path: Path, wait_for_file, worker_id: str, gpu=None, **kw):
    out = tmp_path / f"{worker_id}.json"
    handle = provider.launch(req(worker_id, gpu, argv=("-c", REPORT_ENV, str(out)), **kw))
    return handle, json.loads(wait_for_file(out))


def test_capabilities_are_discovered_with_isinstance(make_provider):
    p = make_provider(gpus=[])
    assert isinstance(p, Provider) and isinstance(p, SupportsGpuInventory)
    assert not isinstance(p, SupportsPreemptionNotice)
    assert p.name == "local"


def test_gpu_allocation_release_and_cuda_visible_devices(make_provider, fake_gpus, tmp_path, wait_for_file):
    fake_gpus("H100:2")
    p = make_provider()
    h1, env1 = launch_reporting(
        p, tmp_path, wait_for_file, "w1", "H100", env={"CONTROL_PLANE_URL": "http://cp"}
    )
    h2, env2 = launch_reporting(p, tmp_path, wait_for_file, "w2", "H100")
    assert (h1.gpu_indices, h2.gpu_indices) == ((0,), (1,))
    assert env1 == {
        "CUDA_VISIBLE_DEVICES": "0",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CLOUDMODAL_IS_REMOTE": "1",
        "CLOUDMODAL_WORKER_ID": "w1",
        "CONTROL_PLANE_URL": "http://cp",
        "CLOUDMODAL_CPU_FALLBACK": None,
    }
    assert env2["CUDA_VISIBLE_DEVICES"] == "1"
    assert p.gpu_usage() == {0: "w1", 1: "w2"}

    with pytest.raises(NoCapacityError) as info:
        p.launch(req("w3", "H100"))
    err = info.value
    assert err.retryable and err.reason == "gpu-busy"
    assert "No free H100 on the local machine" in str(err)
    assert "it has 2× H100 (GPU 0, 1)" in str(err)
    assert "busy: GPU 0 (worker w1), GPU 1 (worker w2)" in str(err)

    p.terminate(h1, grace_s=5)
    assert p.gpu_usage() == {1: "w2"}
    h3, env3 = launch_reporting(p, tmp_path, wait_for_file, "w3", "H100")
    assert h3.gpu_indices == (0,) and env3["CUDA_VISIBLE_DEVICES"] == "0"


def test_multi_gpu_and_any(make_provider, tmp_path, wait_for_file):
    p = make_provider(gpus=parse_fake_gpus("A10G,H100:2"))  # A10 is GPU 0, H100s are GPU 1 and 2
    h, env = launch_reporting(p, tmp_path, wait_for_file, "pair", "H100:2")
    assert h.gpu_indices == (1, 2) and env["CUDA_VISIBLE_DEVICES"] == "1,2"
    h_any, env_any = launch_reporting(p, tmp_path, wait_for_file, "any", "ANY")
    assert h_any.gpu_indices == (0,) and env_any["CUDA_VISIBLE_DEVICES"] == "0"
    with pytest.raises(NoCapacityError, match="No free ANY"):
        p.launch(req("more", "ANY"))


def test_any_needs_count_gpus_of_one_type(make_provider):
    p = make_provider(gpus=parse_fake_gpus("A10G,H100"))
    with pytest.raises(NoCapacityError) as info:
        p.launch(req("w", "ANY:2"))
    assert info.value.reason == "gpu-not-present" and not info.value.retryable


def test_gpu_not_present_is_not_retryable(make_provider, fake_gpus):
    fake_gpus("H100:2")
    p = make_provider()
    with pytest.raises(NoCapacityError) as info:
        p.launch(req("w", "B200"))
    assert not info.value.retryable and info.value.reason == "gpu-not-present"
    assert str(info.value) == (
        "Cannot run B200 on the local machine: it has 2× H100 (GPU 0, 1). Ask for a GPU it has, "
        "or enable a cloud provider that offers this one."
    )
    with pytest.raises(NoCapacityError, match="Cannot run H100:4"):
        p.launch(req("w", "H100:4"))
    assert p.gpu_usage() == {}


def test_parent_cuda_visible_devices_limits_inventory(make_provider, monkeypatch, tmp_path, wait_for_file):
    monkeypatch.setenv("CLOUDMODAL_FAKE_GPUS", "H100:4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    p = make_provider()
    assert [d.index for d in p.gpu_inventory()] == [2, 3]
    h, env = launch_reporting(p, tmp_path, wait_for_file, "w", "H100:2")
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_cpu_worker_sees_no_gpu_unless_opted_in(
    make_provider, fake_gpus, monkeypatch, tmp_path, wait_for_file
):
    fake_gpus("H100")
    _, env = launch_reporting(make_provider(), tmp_path, wait_for_file, "cpu")
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    _, env = launch_reporting(
        make_provider(expose_gpus_to_cpu_workers=True), tmp_path, wait_for_file, "cpu-exposed"
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # inherited from the parent


def test_cpu_fallback_opt_in(make_provider, tmp_path, wait_for_file):
    assert not make_provider(gpus=[]).can_satisfy([GpuTier("H100")])
    p = make_provider(gpus=[], cpu_fallback=True)
    assert p.can_satisfy([GpuTier("H100")])
    h, env = launch_reporting(p, tmp_path, wait_for_file, "fallback", "H100")
    assert h.gpu_indices == () and h.extra["cpu_fallback"] is True
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["CLOUDMODAL_CPU_FALLBACK"] == "1"


def test_terminate_escalates_to_sigkill_after_grace(make_provider, tmp_path, wait_for_file):
    p = make_provider(gpus=parse_fake_gpus("H100"))
    ready = tmp_path / "ready"
    h = p.launch(req("stubborn", "H100", argv=("-c", IGNORE_SIGTERM, str(ready))))
    wait_for_file(ready)
    p.terminate(h, grace_s=0.5)
    status = p.describe(h)
    assert status.state == "exited" and status.returncode == -signal.SIGKILL
    assert status.detail == "killed by SIGKILL"
    assert p.gpu_usage() == {}
    p.terminate(h)  # idempotent
    assert p.describe(h).state == "exited"


def test_terminate_sigterm_is_enough_for_a_cooperative_worker(make_provider, tmp_path, wait_for_file):
    p = make_provider(gpus=[])
    h, _ = launch_reporting(p, tmp_path, wait_for_file, "polite")
    p.terminate(h, grace_s=30)
    assert p.describe(h).returncode == -signal.SIGTERM


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init is gone too
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_terminate_stops_the_whole_process_group(make_provider, tmp_path, wait_for_file):
    p = make_provider(gpus=[])
    pid_file = tmp_path / "grandchild"
    h = p.launch(req("parent", argv=("-c", SPAWN_GRANDCHILD, str(pid_file))))
    grandchild = int(wait_for_file(pid_file))
    assert not _gone(grandchild)
    p.terminate(h, grace_s=5)
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild)


def test_worker_that_exits_by_itself_is_reaped_and_releases_gpus(make_provider):
    p = make_provider(gpus=parse_fake_gpus("H100"))
    h = p.launch(req("short", "H100", argv=("-c", "raise SystemExit(3)")))
    deadline = time.monotonic() + 15
    while (status := p.describe(h)).state == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert status.state == "exited" and status.returncode == 3 and status.detail == "exited with code 3"
    assert p.gpu_usage() == {}
    assert p.launch(req("next", "H100")).gpu_indices == (0,)


def test_describe_and_terminate_unknown_worker(make_provider):
    p = make_provider(gpus=[])
    stranger = WorkerHandle("w-x", "local", "pid-1", None, "on-demand", 0.0, 0.0)
    assert p.describe(stranger).state == "unknown"
    p.terminate(stranger)  # no error, nothing signalled


def test_handle_and_log_file(make_provider, tmp_path, wait_for_file):
    p = make_provider(
        gpus=parse_fake_gpus("H100"), price_per_hour=0.5, price_per_gpu_hour=2.0, clock=lambda: 1234.0
    )
    h, _ = launch_reporting(p, tmp_path, wait_for_file, "logged", "H100")
    assert h.provider == "local" and h.market == "on-demand"
    assert h.price_per_hour == 2.5 and h.launched_at == 1234.0
    assert h.instance_id == f"pid-{h.extra['pid']}" and h.extra["python"] == sys.executable
    assert p.describe(h).state == "running"
    log = Path(h.extra["log_path"])
    assert log.parent == tmp_path / "state" / "logs"
    p.terminate(h, grace_s=5)
    assert "worker says hello" in log.read_text()


def test_duplicate_worker_id_is_refused(make_provider):
    p = make_provider(gpus=[])
    p.launch(req("same"))
    with pytest.raises(ProviderError, match="already running"):
        p.launch(req("same"))


def test_concurrent_launches_never_share_a_gpu(make_provider):
    p = make_provider(gpus=parse_fake_gpus("H100:2"))
    results: list[object] = []
    barrier = threading.Barrier(8)

    def go(i: int) -> None:
        barrier.wait()
        try:
            results.append(p.launch(req(f"t{i}", "H100")))
        except NoCapacityError as e:
            results.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handles = [r for r in results if isinstance(r, WorkerHandle)]
    assert sorted(h.gpu_indices for h in handles) == [(0,), (1,)]
    assert sum(isinstance(r, NoCapacityError) for r in results) == 6


def test_failed_image_build_releases_gpus(make_provider):
    def broken(pip_packages, image_hash):
        raise ImageBuildError("pip said no", reason="pip-failed")

    p = make_provider(gpus=parse_fake_gpus("H100"), python_resolver=broken)
    with pytest.raises(ImageBuildError):
        p.launch(req("w", "H100", pip_packages=("nope",)))
    assert p.gpu_usage() == {}


def test_resolver_picks_the_interpreter(make_provider, tmp_path, wait_for_file):
    seen = []

    def resolver(pip_packages, image_hash):
        seen.append((tuple(pip_packages), image_hash))
        return sys.executable

    p = make_provider(gpus=[], python_resolver=resolver)
    launch_reporting(p, tmp_path, wait_for_file, "img", pip_packages=("numpy==1.0",), image_hash="im-1")
    assert seen == [(("numpy==1.0",), "im-1")]


def test_spawn_failure_is_a_provider_error(make_provider):
    p = make_provider(gpus=parse_fake_gpus("H100"), python_resolver=lambda pkgs, h: "/nonexistent/python")
    with pytest.raises(ProviderError, match="Could not start worker w") as info:
        p.launch(req("w", "H100"))
    assert info.value.reason == "spawn-failed"
    assert p.gpu_usage() == {}


def test_offers(make_provider):
    p = make_provider(gpus=parse_fake_gpus("H100:2,A10G"), price_per_gpu_hour=1.0)
    offers = p.offers()
    summary = [(o.gpu, o.gpu_count, o.price_ondemand, o.instance_type) for o in offers]
    assert summary == [
        (None, 0, 0.0, "local"),
        ("H100", 1, 1.0, "local-H100x1"),
        ("H100", 2, 2.0, "local-H100x2"),
        ("A10", 1, 1.0, "local-A10x1"),
    ]
    assert all(o.cloud == "local" and o.price_spot is None and o.source == "local" for o in offers)
    assert offers[1].gpu_memory_gb == 80.0
    assert offers[2].price("on-demand") == 2.0 and offers[2].price("spot") is None
    assert local_offer_for(offers, GpuTier("H100", 2)) is offers[2]
    assert local_offer_for(offers, GpuTier("ANY")) is offers[1]
    assert local_offer_for(offers, None) is offers[0]
    assert local_offer_for(offers, GpuTier("B200")) is None


@pytest.mark.parametrize(
    "gpus, tiers, ok, text",
    [
        ("H100:2", [], True, "The local machine can run CPU-only functions."),
        (
            "H100:2",
            ["H100:2"],
            True,
            "The local machine (2× H100 (GPU 0, 1)) can run H100:2 of the request [H100:2].",
        ),
        ("H100:2", ["B200", "H100"], True, "can run H100 of the request [B200, H100]."),
        (
            "H100:2",
            ["H100:4", "A100-80GB"],
            False,
            "The local machine has 2× H100 (GPU 0, 1); none of [H100:4, A100-80GB] fits.",
        ),
        ("none", ["H100"], False, "The local machine has no GPU: no NVIDIA driver or GPU was found"),
        ("A10G", ["ANY"], True, "can run ANY"),
    ],
)
def test_can_satisfy_and_explain(make_provider, gpus, tiers, ok, text):
    p = make_provider(gpus=parse_fake_gpus(gpus))
    parsed = [GpuTier(*(t.split(":")[0], int(t.split(":")[1]) if ":" in t else 1)) for t in tiers]
    assert p.can_satisfy(parsed) is ok
    assert text in p.explain(parsed)


def test_close_stops_every_worker(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with LocalProvider(state_dir=tmp_path, gpus=[]) as p:
        handles = [p.launch(req(f"w{i}")) for i in range(3)]
        assert len(p.live_workers()) == 3
    assert p.live_workers() == []
    assert all(p.describe(h).state == "exited" for h in handles)
    for h in handles:
        with pytest.raises(ProcessLookupError):
            os.kill(h.extra["pid"], 0)


def _standby_pid(p: LocalProvider) -> int | None:
    with p._lock:
        return p._standby[0].pid if p._standby is not None else None


def test_standby_started_ahead_is_the_first_worker(make_provider, tmp_path):
    """The embedded control plane starts the standby interpreter before its own imports; the provider
    created afterwards on the same state directory adopts it, and its first default worker is that process.
    The next standby follows a moment later, not while the first worker starts."""
    from cloudmodal.providers import local

    state = tmp_path / "state"
    local.start_standby(state)
    early = local._early_standby[state][0]
    p = make_provider(state_dir=state, standby=True)
    assert state not in local._early_standby and _standby_pid(p) == early.pid
    env = {"CLOUDMODAL_SERVER_URL": "http://127.0.0.1:9", "CLOUDMODAL_WORKER_RECONNECT_S": "0.2"}
    handle = p.launch(req("w-first", argv=("-m", "cloudmodal.worker"), env=env))
    assert handle.extra["pid"] == early.pid
    assert _standby_pid(p) is None  # the replacement waits STANDBY_RESPAWN_DELAY_S
    deadline = time.monotonic() + local.STANDBY_RESPAWN_DELAY_S + 10
    while _standby_pid(p) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _standby_pid(p) not in (None, early.pid)


def test_standby_for_another_directory_is_not_adopted(make_provider, tmp_path):
    from cloudmodal.providers import local

    local.start_standby(tmp_path / "elsewhere")
    early = local._early_standby.pop(tmp_path / "elsewhere")[0]
    try:
        p = make_provider(state_dir=tmp_path / "state", standby=True)
        deadline = time.monotonic() + 10
        while _standby_pid(p) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _standby_pid(p) not in (None, early.pid)
    finally:
        early.stdin.close()  # a standby exits when its stdin closes
        assert early.wait(timeout=30) == 0
