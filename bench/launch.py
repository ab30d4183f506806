#!/usr/bin/env python
"""Cloud launches through SkyPilot's provisioner on a moto EC2 fake: concurrency, overhead, failover.

What it measures (all on this machine, against ``tests/fakes/moto_ec2.py``: moto's server in one subprocess),
once per wire latency of ``--latency`` (default 0 and 0.15 s: every API request is held that long by the fake
before moto handles it, concurrent requests side by side; 0.15 s is an assumption, within the 0.1-0.3 s an EC2
API call takes from a client in the same region):

  moto alone   plain boto3 ``run_instances``: one at a time (median), and 50 at once from 50 threads — the
               fake's own limit, with no SkyPilot and no cloudmodal in the way
  single       one launch through ``CloudProvider.launch`` -> ``AwsNodes.create`` -> ``sky.provision``
               (``bootstrap_instances`` + ``run_instances``), median of ``--single`` launches after a warm-up
  overhead     per single launch, the time outside SkyPilot and the SDK: ``CloudProvider.launch``'s wall time
               minus the time inside SkyPilot's provisioner calls and every boto3 client creation and API call
               (outermost calls only, per thread)
  threads      ``--n`` launches submitted at once to a ``ThreadPoolExecutor`` of ``--n`` threads (the control
               plane's launch executor has ``LAUNCH_THREADS`` = 64, so its launches run as these do), and of 8
               threads (its size before), one shared driver; with the summed time inside
               ``bootstrap_instances`` over the wall time (near 1: launches queue there)
  processes    (``--procs N``, off by default) ``--n`` launches from a ``ProcessPoolExecutor`` of N forked
               processes, each with its own driver, warmed by one launch before the clock starts
  failover     the control plane's failover walk: the real ``Reconciler`` (its launch executor, placement,
               signals, blocks, spacing, hedged rounds) over a 6-zone catalog of one GPU type (5 zones of
               us-east-1, 1 of us-west-2) whose 5 cheapest zones answer ``InsufficientInstanceCapacity`` on the
               wire; from the tick that starts the launch to the successful RunInstances (the fake's log); a
               first tick (the control plane's start-up inventory) runs before the call arrives
  sky failover SkyPilot's own provisioner on the same faults: ``run_instances`` with no zone over us-east-1
               (SkyPilot's default retry count: one try per subnet), then us-west-2
  sky.launch   SkyPilot's high-level ``sky.launch`` on the same 6 candidates and faults, through its local API
               server (started once, in a sandbox HOME, its start-up timed apart): from the ``sky.launch`` call
               to the successful RunInstances; then the request is cancelled (it would wait 10 minutes for
               SSH to the fake's IP) and the cluster taken down; the server is stopped and killed at the end

Each phase starts from a fresh moto account (``reset``) and reports the client's and moto's CPU seconds, so
the report can say how much of a figure is the fake's.

    .venv/bin/python bench/launch.py                  # ~4 min on 2 cores; --json FILE for the figures
    .venv/bin/python bench/launch.py --n 20 --single 3 --latency 0 --skip-sky-launch

Nothing here asserts a timing; this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the fake lives in tests/fakes
    sys.path.insert(0, str(REPO))

from tests.fakes.moto_ec2 import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, MotoEc2  # noqa: E402

REGION = "us-east-1"
REGION2 = "us-west-2"
ITYPE = "g5.xlarge"
# (region, zone id), cheapest first in the bench's catalog: the 5 zones of us-east-1 that sell g5.xlarge (in
# EC2 and in moto's offerings; use1-az3 sells none) and one of us-west-2. The failover makes the first 5 fail.
ZONES = [
    (REGION, "use1-az1"),
    (REGION, "use1-az2"),
    (REGION, "use1-az4"),
    (REGION, "use1-az5"),
    (REGION, "use1-az6"),
    (REGION2, "usw2-az1"),
]
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Qta2V5LWZvci1jbG91ZG1vZGFs cloudmodal-bench"
REALISTIC_LATENCY_S = 0.15  # assumed time of one EC2 API call on the real wire (0.1-0.3 s is typical)
OLD_CONTROL_PLANE_THREADS = 8  # the control plane's launch threads before LAUNCH_THREADS became 64
TICK = os.sysconf("SC_CLK_TCK")
VMS_HEADER = (
    "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,"
    "AvailabilityZone,Arch"
)
GPU_INFO = (
    "\"{'Gpus': [{'Name': 'A10G', 'Manufacturer': 'NVIDIA', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 22888}}], "
    "'TotalGpuMemoryInMiB': 22888}\""
)


# --- set-up ------------------------------------------------------------------------------------------------


def write_catalog(d: Path) -> Path:
    """A small v8 catalog: ``g5.xlarge`` in the 6 zones of :data:`ZONES`, each a cent dearer than the one
    before (so placement's order is that order), and SkyPilot's GPU image of each region."""
    aws = d / "aws"
    aws.mkdir(parents=True, exist_ok=True)
    rows = [
        f"{ITYPE},A10G,1.0,4.0,16.0,{GPU_INFO},{1.0 + i / 100:.3f},{0.4 + i / 100:.3f},{region},{z},x86_64"
        for i, (region, z) in enumerate(ZONES)
    ]
    (aws / "vms.csv").write_text("\n".join([VMS_HEADER, *rows]) + "\n")
    (aws / "images.csv").write_text(
        "Tag,Region,OS,OSVersion,ImageId,CreationDate,BaseImageId\n"
        + "".join(
            f"skypilot:custom-gpu-ubuntu,{r},ubuntu,22.04,ami-0123456789abcdef0,20250910,ami-0\n"
            for r in (REGION, REGION2)
        )
    )
    return d


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Meter:
    """Wall time and CPU seconds of this process, moto's and some others' over a phase."""

    def __init__(self, fake: MotoEc2, others: Callable[[], list[int]] = list) -> None:
        self.fake, self.others = fake, others

    @contextmanager
    def run(self, out: dict[str, Any]) -> Iterator[None]:
        pids = self.others()
        c0, m0, o0 = time.process_time(), cpu_s(self.fake.proc.pid), sum(cpu_s(p) for p in pids)
        t0 = time.perf_counter()
        yield
        out["wall_s"] = time.perf_counter() - t0
        out["client_cpu_s"] = time.process_time() - c0 + sum(cpu_s(p) for p in pids) - o0
        out["moto_cpu_s"] = cpu_s(self.fake.proc.pid) - m0


def actions(fake: MotoEc2) -> dict[str, int]:
    return dict(Counter(r["action"] for r in fake.requests()))


# --- what a launch is -------------------------------------------------------------------------------------


class Launches:
    """A driver and its provider, as the control plane holds them; ``one(i)`` launches worker ``i``
    (even: on-demand, odd: spot; zones in turn)."""

    def __init__(self, catalog: Path, state: Path) -> None:
        from cloudmodal.providers.aws import AwsNodes
        from cloudmodal.providers.cloud import CloudProvider

        self.driver = AwsNodes(regions=[REGION], catalog_dir=str(catalog))
        self.provider = CloudProvider(self.driver, state_dir=state)
        self.provider.bind("cp-launch-bench", "http://127.0.0.1:1")
        self.offers = sorted(self.driver.offers(), key=lambda o: o.zone or "")  # us-east-1's 5 zones

    def one(self, i: int) -> float:
        from cloudmodal.providers.base import LaunchRequest

        req = LaunchRequest(
            worker_id=f"wk-{os.getpid()}-{i}",
            app_id="ap-bench",
            function_id="fu-bench",
            offer=self.offers[i % len(self.offers)],
            market="spot" if i % 2 else "on-demand",
        )
        t = time.perf_counter()
        self.provider.launch(req)
        return time.perf_counter() - t


# --- time outside SkyPilot and the SDK ---------------------------------------------------------------------


class External:
    """Time spent inside SkyPilot's and the SDK's entry points (outermost call per thread), installed as
    pass-through wrappers on those libraries' functions (cloudmodal's code is not touched)."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.total = 0.0
        self.by: defaultdict[str, float] = defaultdict(float)
        self.lock = threading.Lock()
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        inner = getattr(owner, attr)
        ext = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(ext.local, "depth", 0)
            ext.local.depth = depth + 1
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                ext.local.depth = depth
                if depth == 0:
                    dt = time.perf_counter() - t
                    with ext.lock:
                        ext.total += dt
                        ext.by[label] += dt

        self._undo.append((owner, attr, inner))
        setattr(owner, attr, timed)

    def install(self) -> None:
        import boto3.session
        import botocore.client
        import botocore.session
        import sky.provision

        self.wrap(sky.provision, "bootstrap_instances", "sky.provision.bootstrap_instances")
        self.wrap(sky.provision, "run_instances", "sky.provision.run_instances")
        self.wrap(botocore.client.BaseClient, "_make_api_call", "boto3 API calls (outside SkyPilot)")
        self.wrap(boto3.session.Session, "client", "boto3 client creation (outside SkyPilot)")
        self.wrap(botocore.session.Session, "create_client", "boto3 client creation (outside SkyPilot)")

    def uninstall(self) -> None:
        for owner, attr, inner in reversed(self._undo):
            setattr(owner, attr, inner)
        self._undo.clear()

    def reset(self) -> None:
        with self.lock:
            self.total = 0.0
            self.by.clear()


# --- phases ------------------------------------------------------------------------------------------------


def fresh(fake: MotoEc2, latency: float) -> None:
    """A fresh moto account with ``latency`` seconds on every API request."""
    fake.reset()
    fake.set_latency(latency)


def phase_moto_alone(fake: MotoEc2, n: int, single: int, latency: float) -> dict[str, Any]:
    """Plain boto3 RunInstances on the fake: the floor any launch through it has."""
    import boto3
    from botocore.config import Config

    fresh(fake, latency)
    ec2 = boto3.session.Session(
        aws_access_key_id=FAKE_ACCESS_KEY, aws_secret_access_key=FAKE_SECRET_KEY, region_name=REGION
    ).client(
        "ec2",
        endpoint_url=fake.endpoint,
        config=Config(retries={"total_max_attempts": 1}, max_pool_connections=n),
    )

    def run(i: int) -> float:
        t = time.perf_counter()
        ec2.run_instances(ImageId="ami-0123456789abcdef0", InstanceType=ITYPE, MinCount=1, MaxCount=1)
        return time.perf_counter() - t

    run(0)  # connection, first-call costs
    one = statistics.median(run(i) for i in range(single))
    out: dict[str, Any] = {"single_s": one}
    with Meter(fake).run(out), ThreadPoolExecutor(n) as pool:
        list(pool.map(run, range(n)))
    out["ratio"] = out["wall_s"] / one
    return out


def phase_single(fake: MotoEc2, launches: Launches, single: int, latency: float) -> dict[str, Any]:
    """Median of ``single`` launches one after another, and what of each is cloudmodal's own time."""
    fresh(fake, latency)
    launches.one(0)  # warm-up: the security group is created, the zone map read
    fake.clear_requests()
    ext = External()
    ext.install()
    walls: list[float] = []
    own: list[float] = []
    parts: defaultdict[str, float] = defaultdict(float)
    out: dict[str, Any] = {}
    try:
        with Meter(fake).run(out):
            for i in range(1, single + 1):
                ext.reset()
                w = launches.one(i)
                walls.append(w)
                own.append(w - ext.total)
                for k, v in ext.by.items():
                    parts[k] += v
    finally:
        ext.uninstall()
    out.update(
        median_s=statistics.median(walls),
        all_s=walls,
        overhead_ms=statistics.median(own) * 1000,
        overhead_all_ms=[x * 1000 for x in own],
        inside_ms={k: v / single * 1000 for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        requests_per_launch={k: v / single for k, v in actions(fake).items()},
        client_cpu_per_launch_s=out["client_cpu_s"] / single,
        moto_cpu_per_launch_s=out["moto_cpu_s"] / single,
    )
    return out


def phase_threads(
    fake: MotoEc2, launches: Launches, n: int, threads: int, one_s: float, latency: float
) -> dict[str, Any]:
    """``n`` launches at once from ``threads`` threads through one driver; and how much of the wall time
    some thread was inside ``bootstrap_instances`` (the driver runs it under a per-region lock: summed over
    the launches it can reach the wall time but not exceed it)."""
    fresh(fake, latency)
    launches.one(0)
    ext = External()
    ext.install()
    out: dict[str, Any] = {"threads": threads}
    try:
        with Meter(fake).run(out), ThreadPoolExecutor(threads) as pool:
            each = list(pool.map(launches.one, range(1, n + 1)))
    finally:
        ext.uninstall()
    boot = ext.by.get("sky.provision.bootstrap_instances", 0.0)
    out.update(
        ratio=out["wall_s"] / one_s,
        bootstrap_s=boot,
        bootstrap_share=boot / out["wall_s"],
        run_instances_s=ext.by.get("sky.provision.run_instances", 0.0),
        each_median_s=statistics.median(each),
        each_max_s=max(each),
        client_cpu_per_launch_s=out["client_cpu_s"] / n,
        moto_cpu_per_launch_s=out["moto_cpu_s"] / n,
        instances=len(live_instances(fake)) - 1,
    )
    return out


_worker: Launches | None = None


def _proc_init(catalog: str, state: str) -> None:
    """A pool process: its own driver and provider (a fork inherits SkyPilot already imported)."""
    global _worker
    logging.disable(logging.WARNING)
    _worker = Launches(Path(catalog), Path(state) / f"p{os.getpid()}")


def _proc_warm(_: int) -> int:
    assert _worker is not None
    _worker.one(-1)
    time.sleep(0.2)  # so that every process takes one warm-up
    return os.getpid()


def _proc_one(i: int) -> float:
    assert _worker is not None
    return _worker.one(i)


def phase_processes(
    fake: MotoEc2,
    launches: Launches,
    catalog: Path,
    state: Path,
    n: int,
    procs: int,
    one_s: float,
    latency: float,
) -> dict[str, Any]:
    """``n`` launches at once from a pool of ``procs`` forked processes, each with its own driver."""
    fresh(fake, latency)
    launches.one(0)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        procs, mp_context=ctx, initializer=_proc_init, initargs=(str(catalog), str(state))
    ) as pool:
        t = time.perf_counter()
        pids = set(pool.map(_proc_warm, range(procs)))
        warm_s = time.perf_counter() - t
        out: dict[str, Any] = {"procs": procs, "warm_processes": len(pids), "warm_up_s": warm_s}
        with Meter(fake, lambda: sorted(pids)).run(out):
            each = list(pool.map(_proc_one, range(1, n + 1)))
    out.update(
        ratio=out["wall_s"] / one_s,
        each_median_s=statistics.median(each),
        each_max_s=max(each),
        client_cpu_per_launch_s=out["client_cpu_s"] / n,
        moto_cpu_per_launch_s=out["moto_cpu_s"] / n,
    )
    return out


def live_instances(fake: MotoEc2, regions: tuple[str, ...] = (REGION,)) -> list[dict[str, Any]]:
    out = []
    for region in regions:
        resp = fake.client("ec2", region).describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        )
        out += [i for r in resp["Reservations"] for i in r["Instances"]]
    return out


def zone_names(fake: MotoEc2) -> dict[str, str]:
    """Zone id -> zone name in moto's account."""
    out = {}
    for region in (REGION, REGION2):
        for z in fake.client("ec2", region).describe_availability_zones()["AvailabilityZones"]:
            out[z["ZoneId"]] = z["ZoneName"]
    return out


def inject_capacity(fake: MotoEc2, zones: list[tuple[str, str]]) -> None:
    for region, z in zones:
        fake.inject("RunInstances", "InsufficientInstanceCapacity", zone=z, region=region)


def run_instances_log(fake: MotoEc2) -> list[dict[str, Any]]:
    return [r for r in fake.requests("RunInstances")]


def phase_failover(
    fake: MotoEc2, catalog: Path, state: Path, failing: int, latency: float, tag: str
) -> dict[str, Any]:
    """The control plane's walk: a ``Reconciler`` tick launches one worker of a function that wants an A10G on
    demand; the ``failing`` cheapest zones answer InsufficientInstanceCapacity."""
    from cloudmodal.gpu import parse_gpu
    from cloudmodal.providers.aws import AwsNodes
    from cloudmodal.providers.cloud import CloudProvider
    from cloudmodal.server.reconciler import Reconciler, ReconcilerSettings
    from cloudmodal.server.scaling_rules import launch_spacing
    from cloudmodal.server.service import ControlPlane, Settings
    from cloudmodal.server.spot import MarketSettings
    from cloudmodal.spec import FunctionSpec

    fake.reset()
    d = state / f"failover-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    cp = ControlPlane(
        Settings(
            database_url=f"sqlite:///{d / 'cp.db'}",
            state_dir=d,
            lease_s=3600.0,
            worker_timeout_s=3600.0,
            retention_interval_s=1e12,
        )
    )
    driver = AwsNodes(regions=[REGION, REGION2], catalog_dir=str(catalog))
    provider = CloudProvider(driver, state_dir=d / "aws")
    provider.bind(cp.control_plane_id, "http://127.0.0.1:1")
    # Warm, as a running control plane is: the security groups made, the zone maps and signals read.
    warm_up(provider)
    provider.signals()
    fake.clean()
    fake.set_latency(latency)
    # Rule 5 blocks a GPU type and market on a cloud after 3 distinct capacity failures (class_stockouts):
    # with the default the walk stops after the 3rd zone. Raised here so the walk reaches the 6th zone.
    market = MarketSettings(class_stockouts=failing + 1, type_stockouts=failing + 1)
    rec = Reconciler(
        cp,
        {"aws": provider},
        "http://127.0.0.1:1",
        settings=ReconcilerSettings(market=market, max_workers=4),
    )
    try:
        # A running control plane: its start-up inventory (every region listed for tagged machines) is done
        # by a first tick, before the call arrives.
        rec.tick(time.time())
        cp.apps.create_app("ap-failover", "failover", False)
        spec = FunctionSpec(
            name="f", module="m", qualname="f", gpu=parse_gpu(["A10G"]), cloud="aws", spot="never"
        )
        fid = cp.functions.create_function({"app_id": "ap-failover", "name": "f", "spec": spec.to_wire()})[
            "function_id"
        ]
        cp.calls.create_call("fc-1", fid, "map", [(0, None, b"x", None)])
        inject_capacity(fake, ZONES[:failing])
        fake.clear_requests()
        t0_wall = time.time()
        t0 = time.perf_counter()
        rec.tick(time.time())
        # Polled through the fake's request log (a control call: not delayed, not logged), so the poll puts
        # no API requests of its own on the wire beside the walk's.
        deadline = t0 + 120
        while time.perf_counter() < deadline:
            if any(r.get("status") == 200 for r in run_instances_log(fake)):
                break
            time.sleep(0.005)
        to_ok = time.perf_counter() - t0
        # The worker's own node (a hedged round may also start surplus nodes, which it terminates at once).
        while time.perf_counter() < deadline and not rec.handles:
            time.sleep(0.005)
        kept = next(iter(rec.handles.values()))[1].instance_id if rec.handles else None
        rec.stop(terminate_workers=False)  # the round is over: no request of the walk is in flight now
        runs = run_instances_log(fake)
        log = fake.requests()
        found = [i for i in live_instances(fake, (REGION, REGION2)) if i["InstanceId"] == kept]
    finally:
        rec.stop(terminate_workers=False)
        cp.db.dispose()
    names = zone_names(fake)
    ok = [r for r in runs if r.get("status") == 200]
    # The walk's rounds: one try, then (after that capacity failure) up to launch_hedge at once; the spacing
    # before a round grows with the rounds that failed before it.
    hedge = rec.settings.launch_hedge
    widths, left = [], failing + 1
    while left > 0:
        widths.append(min(left, 1 if not widths else hedge))
        left -= widths[-1]
    spacing = sum(launch_spacing(k) for k in range(len(widths)))
    return {
        "failing_zones": failing,
        "to_ok_run_instances_polled_s": to_ok,
        "instance_zone": found[0]["Placement"]["AvailabilityZone"] if found else None,
        "expected_zone": names.get(ZONES[failing][1]),
        "first_to_ok_run_instances_s": (ok[0]["at"] - runs[0]["at"]) if ok and runs else None,
        "tick_to_first_run_instances_s": (runs[0]["at"] - t0_wall) if runs else None,
        "tick_to_ok_run_instances_s": (ok[0]["at"] - t0_wall) if ok else None,
        # what went on the wire before the first try, and per try (the walk's requests in all / tries)
        "requests_before_first_run_instances": dict(
            Counter(r["action"] for r in log if runs and r["at"] < runs[0]["at"])
        ),
        "requests_per_try": {
            k: v / max(1, len(runs))
            for k, v in Counter(r["action"] for r in log if not ok or r["at"] <= ok[0]["at"]).items()
        },
        "run_instances": [(r["zone"], r.get("status")) for r in runs],
        "surplus_nodes": max(0, len([r for r in runs if r.get("status") == 200]) - 1),
        "walk_spacing_s": spacing,
        "rounds": widths,
        "class_stockouts": market.class_stockouts,
    }


def warm_up(provider: Any) -> None:
    """One launch in each region of the catalog (security groups made, zone maps read), then gone."""
    from cloudmodal.providers.base import LaunchRequest

    for k, region in enumerate((REGION, REGION2)):
        offer = next(o for o in provider.driver.offers() if o.region == region)
        provider.launch(LaunchRequest(worker_id=f"wk-warm{k}", app_id="ap", function_id="fu", offer=offer))


def phase_sky_failover(fake: MotoEc2, catalog: Path, state: Path, latency: float, tag: str) -> dict[str, Any]:
    """SkyPilot's provisioner failing over by itself, for comparison: ``bootstrap_instances`` with no zone and
    one ``run_instances`` over us-east-1's 5 zones, all out of capacity, with SkyPilot's own retry count (5:
    one try per subnet; cloudmodal's driver sets it to 1 for the process, restored here and set back after);
    then, as SkyPilot's failover would next, the same in us-west-2. SkyPilot's provisioner has no
    cross-region step: that is ``sky.launch``'s optimizer loop, not run here."""
    import sky.provision as prov
    import sky.provision.aws.instance as sky_aws_instance
    from sky.provision import common
    from sky.utils import annotations

    from cloudmodal.providers.aws import AwsNodes, cloud_init
    from cloudmodal.providers.cloud import CloudProvider

    fake.reset()
    driver = AwsNodes(regions=[REGION, REGION2], catalog_dir=str(catalog))
    warm = CloudProvider(driver, state_dir=state / f"sky-failover-{tag}")
    warm.bind("cp-launch-bench", "http://127.0.0.1:1")
    warm_up(warm)
    fake.clean()
    fake.set_latency(latency)

    def config(region: str, zone: str | None) -> Any:
        return common.ProvisionConfig(
            provider_config=driver._provider_config(region, zone),
            authentication_config={},
            docker_config={},
            node_config={
                "InstanceType": ITYPE,
                "ImageId": "ami-0123456789abcdef0",
                "UserData": cloud_init("ubuntu", SSH_KEY),
                "IamInstanceProfile": {},
            },
            count=1,
            tags={},
            resume_stopped_nodes=False,
            ports_to_open_on_launch=None,
        )

    inject_capacity(fake, [z for z in ZONES if z[0] == REGION])
    # SkyPilot with no zone tries every subnet, use1-az3's too, where EC2 sells no g5 (moto does not check).
    fake.inject("RunInstances", "Unsupported", zone="use1-az3", region=REGION, status=400)
    fake.clear_requests()
    before = sky_aws_instance.BOTO_CREATE_MAX_RETRIES
    sky_aws_instance.BOTO_CREATE_MAX_RETRIES = 5  # SkyPilot 0.14.1's default
    errors: list[str] = []
    steps: list[float] = []
    t0 = time.perf_counter()
    try:
        for region, zone in ((REGION, None), (REGION2, driver.zone_name(REGION2, ZONES[-1][1]))):
            t = time.perf_counter()
            try:
                annotations.clear_request_level_cache()
                cfg = prov.bootstrap_instances("aws", region, "sky-fo", config(region, zone))
                prov.run_instances("aws", region, "sky-fo", "sky-fo", cfg)
            except BaseException as e:  # SystemExit included: reported, not raised
                errors.append(f"{region}: {type(e).__name__}: {e}")
                steps.append(time.perf_counter() - t)
                continue
            steps.append(time.perf_counter() - t)
            break
    finally:
        wall = time.perf_counter() - t0
        sky_aws_instance.BOTO_CREATE_MAX_RETRIES = before
    runs = run_instances_log(fake)
    ok = [r for r in runs if r.get("status") == 200]
    found = live_instances(fake, (REGION, REGION2))
    return {
        "wall_s": wall,
        "region1_s": steps[0],
        "region2_s": steps[1] if len(steps) > 1 else None,
        "errors": errors,
        "run_instances": [(r["zone"], r.get("status")) for r in runs],
        "failures_before_ok": len([r for r in runs if r.get("status") != 200]),
        "first_to_ok_run_instances_s": (ok[0]["at"] - runs[0]["at"]) if ok and runs else None,
        "instance_zone": found[0]["Placement"]["AvailabilityZone"] if found else None,
    }


# --- sky.launch through SkyPilot's API server -------------------------------------------------------------

SKY_MARK = "@@launch-bench "  # the SDK child's answers on stdout (SkyPilot prints there too)
SKY_CLUSTER = "bench-sky"
SKY_PORT_ENV = "SKYPILOT_API_SERVER_LOCAL_PORT"
SKY_SERVER_CMD = "-m sky.server.server"  # sky.server.common.API_SERVER_CMD


def sky_sdk_child() -> int:
    """``--sky-sdk-child``: runs SkyPilot's client SDK for the parent, one JSON command a line on stdin, one
    JSON answer a line on stdout (marked with :data:`SKY_MARK`). Its environment (sandbox HOME, the fake's
    endpoint and keys, the API server's port) is the parent's choice; the API server it starts copies it."""
    import sky
    from sky.client import sdk

    def answer(**kw: Any) -> None:
        print(SKY_MARK + json.dumps(kw, default=str), flush=True)

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "start":
                from sky.server import common as server_common

                t = time.perf_counter()
                try:
                    sdk.api_start(port=int(os.environ[SKY_PORT_ENV]))
                except RuntimeError as e:
                    if "exited" in str(e):  # the server died (its log says why): nothing to wait for
                        raise
                    # SkyPilot gives its server 60 s to answer; on a loaded machine it can take longer: wait
                    # for it a while more before giving up.
                    deadline = time.perf_counter() + 120
                    healthy = server_common.ApiServerStatus.HEALTHY
                    while server_common.get_api_server_status().status != healthy:
                        if time.perf_counter() > deadline:
                            raise
                        time.sleep(1)
                start_s = time.perf_counter() - t
                t = time.perf_counter()
                enabled = sdk.get(sdk.check(("aws",), verbose=False))
                answer(start_s=start_s, check_s=time.perf_counter() - t, enabled=enabled)
            elif op == "launch":
                task = sky.Task(run="true")
                task.set_resources(sky.Resources(infra="aws", accelerators="A10G:1", use_spot=False))
                called_at = time.time()
                rid = sdk.launch(task, cluster_name=cmd["cluster"])
                answer(called_at=called_at, returned_s=time.time() - called_at, request_id=str(rid))
            elif op == "down":
                t = time.perf_counter()
                sdk.get(sdk.api_cancel(cmd["request_id"], silent=True))
                sdk.get(sdk.down(cmd["cluster"], purge=True))
                answer(down_s=time.perf_counter() - t)
            elif op == "stop":
                sdk.api_stop()
                answer(stopped=True)
                return 0
            else:
                answer(error=f"unknown op {op!r}")
        except BaseException as e:  # reported to the parent, which decides
            answer(error=f"{type(e).__name__}: {e}"[:2000])
    return 0


class SkyChild:
    """The SDK child process, driven from the bench."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.log = (cwd / "sky-child.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--sky-sdk-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(cwd),
        )

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(SKY_MARK):
                got: dict[str, Any] = json.loads(line[len(SKY_MARK) :])
                if "error" in got:
                    raise RuntimeError(f"sky.{cmd['op']}: {got['error']}")
                return got
        raise RuntimeError(f"the SkyPilot SDK child exited (rc {self.proc.wait()}) during {cmd['op']}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def kill_api_server(port: int) -> list[int]:
    """Kill the API server on ``port`` and every process under it (by pid); the pids killed."""
    import psutil

    killed: list[int] = []
    for p in psutil.process_iter(attrs=["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if SKY_SERVER_CMD not in cmdline or not re.search(rf"--port[= ]{port}\b", cmdline):
            continue
        try:
            tree = [*p.children(recursive=True), p]
        except psutil.NoSuchProcess:
            continue
        for q in tree:
            try:
                q.kill()
                killed.append(q.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)
    return killed


def write_sky_home(home: Path, amis: dict[str, str]) -> dict[str, str]:
    """A sandbox HOME for SkyPilot's client and API server: the catalog of :data:`ZONES` (SkyPilot wants one
    price per region and instance type: us-east-1 cheapest, then us-west-2), the GPU image tags of 0.14.1
    mapped to AMIs registered in moto (SkyPilot reads the image's size), a quota-code table (else it is
    downloaded), and an AWS config and credentials file for the fake's keys (``sky check`` refuses
    ``AWS_CONFIG_FILE=/dev/null``). Returns the environment entries that point there."""
    cat = home / ".sky" / "catalogs" / "v8"
    (cat / "aws").mkdir(parents=True, exist_ok=True)
    (cat / "common").mkdir(parents=True, exist_ok=True)
    rows = [
        f"{ITYPE},A10G,1.0,4.0,16.0,{GPU_INFO},{1.0 if region == REGION else 1.05:.3f},0.4,{region},{z},x86_64"
        for region, z in ZONES
    ]
    (cat / "aws" / "vms.csv").write_text("\n".join([VMS_HEADER, *rows]) + "\n")
    (cat / "aws" / "images.csv").write_text(
        "Tag,Region,OS,OSVersion,ImageId,CreationDate,BaseImageId\n"
        + "".join(
            f"skypilot:{tag},{region},ubuntu,22.04,{ami},20250910,ami-0\n"
            for tag in ("custom-gpu-ubuntu-cuda13", "custom-gpu-ubuntu")
            for region, ami in amis.items()
        )
    )
    (cat / "aws" / "instance_quota_mapping.csv").write_text(
        f"InstanceType,OnDemandInstanceCode,SpotInstanceCode\n{ITYPE},L-DB2E81BA,L-3819A6DF\n"
    )
    (cat / "common" / "accelerators.csv").write_text("AcceleratorName,Clouds\nA10G,\"['AWS']\"\n")
    aws = home / ".aws"
    aws.mkdir(parents=True, exist_ok=True)
    (aws / "credentials").write_text(
        f"[default]\naws_access_key_id = {FAKE_ACCESS_KEY}\naws_secret_access_key = {FAKE_SECRET_KEY}\n"
    )
    (aws / "config").write_text(f"[default]\nregion = {REGION}\n")
    return {
        "HOME": str(home),
        "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
    }


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_sky_port() -> int:
    """A free port for the API server whose companion is free too: SkyPilot 0.14.1 puts its request-queue
    manager on ``50000 + (11 + port - 46580) % 10000`` (``sky.server.requests.queues.mp_queue``) and refuses
    to start when that one is taken."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        queue = 50000 + (11 + port - 46580) % 10000
        if queue != port and port_free(queue):
            return port
    raise RuntimeError("no free port pair for SkyPilot's API server and its queue manager")


def phase_sky_launch(fake: MotoEc2, root: Path, failing: int, latencies: list[float]) -> dict[str, Any]:
    """``sky.launch`` of one A10G on demand over the 6 zones, the ``failing`` first out of capacity, once cold
    and then once per latency, through one local API server started by an SDK child process (start-up timed
    apart)."""
    fake.reset()
    amis = {
        region: fake.client("ec2", region).register_image(
            Name="skypilot-gpu-bench",
            RootDeviceName="/dev/sda1",
            BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 50}}],
            Architecture="x86_64",
            VirtualizationType="hvm",
        )["ImageId"]
        for region in (REGION, REGION2)
    }
    home = root / "sky-home"
    shutil.rmtree(home, ignore_errors=True)
    port = free_sky_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(fake.env(REGION))
    env.update(write_sky_home(home, amis))
    env[SKY_PORT_ENV] = str(port)
    out: dict[str, Any] = {"port": port, "runs": []}
    child = SkyChild(env, root)
    try:
        sky_launch_runs(fake, child, out, failing, latencies)
    except Exception as e:  # the other phases' figures are kept; the report says what failed
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        log = home / ".sky" / "api_server" / "server.log"
        out["server_log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else None
    finally:
        child.close()
        out["killed_after_stop"] = kill_api_server(port)  # normally none: `sky api stop` got them
        fake.clean()
    return out


def sky_launch_runs(
    fake: MotoEc2, child: SkyChild, out: dict[str, Any], failing: int, latencies: list[float]
) -> None:
    """The API server's start-up, one cold ``sky.launch``, then one per latency; each cancelled and taken
    down; the server stopped."""
    t = time.perf_counter()
    started = child.ask(op="start")
    out.update(
        server_start_s=started["start_s"],
        check_s=started["check_s"],
        startup_total_s=time.perf_counter() - t,  # with the child's `import sky`
        enabled=started["enabled"],
    )
    names = zone_names(fake)
    # The first launch, at latency 0, is the server's cold one (its security groups made, the image read,
    # the optimizer's first run): reported apart, as cloudmodal's walk is measured warm.
    for k, latency in enumerate([0.0, *latencies]):
        fake.clean()
        inject_capacity(fake, ZONES[:failing])
        fake.set_latency(latency)
        cluster = f"{SKY_CLUSTER}-{k}"
        got = child.ask(op="launch", cluster=cluster)
        run: dict[str, Any] = {
            "latency_s": latency,
            "cold": k == 0,
            "cluster": cluster,
            "returned_s": got["returned_s"],
        }
        deadline = time.time() + 120
        ok: list[dict[str, Any]] = []
        while not ok and time.time() < deadline:
            ok = [r for r in fake.requests("RunInstances") if r.get("status") == 200]
            if not ok:
                time.sleep(0.05)
        runs = run_instances_log(fake)
        fails = [r for r in runs if r.get("status") != 200]
        run.update(
            to_ok_run_instances_s=(ok[0]["at"] - got["called_at"]) if ok else None,
            to_first_run_instances_s=(runs[0]["at"] - got["called_at"]) if runs else None,
            first_to_ok_run_instances_s=(ok[0]["at"] - runs[0]["at"]) if ok and runs else None,
            run_instances=[(r["zone"], r["status"]) for r in runs],
            failures_before_ok=len(fails),
            instance_zone=ok[0]["zone"] if ok else None,
            expected_zone=names.get(ZONES[failing][1]),
            requests_before_ok=dict(
                Counter(r["action"] for r in fake.requests() if not ok or r["at"] <= ok[0]["at"])
            ),
        )
        fake.set_latency(0.0)
        run["down_s"] = child.ask(op="down", request_id=got["request_id"], cluster=cluster)["down_s"]
        out["runs"].append(run)
    child.ask(op="stop")


# --- report ------------------------------------------------------------------------------------------------


def report_latency(r: dict[str, Any], x: dict[str, Any]) -> list[str]:
    """The table and notes of one latency."""
    s = x["single"]
    one = s["median_s"]
    n = r["n"]
    lines = [
        "",
        f"## wire latency {x['latency_s']:g} s per API request",
        "",
        f"| {'what':<58} | {'wall':>9} | {'× single':>8} | {'client CPU/launch':>17} | {'moto CPU/launch':>15} |",
        f"|{'-' * 60}|{'-' * 11}|{'-' * 10}|{'-' * 19}|{'-' * 17}|",
    ]

    def row(what: str, wall: float, ratio: str, ccpu: str, mcpu: str) -> None:
        lines.append(f"| {what:<58} | {wall:>8.3f}s | {ratio:>8} | {ccpu:>17} | {mcpu:>15} |")

    m = x["moto_alone"]
    row("moto alone: boto3 run_instances, 1 (median)", m["single_s"], "1.0", "", "")
    row(
        f"moto alone: boto3 run_instances, {n} threads at once",
        m["wall_s"],
        f"{m['ratio']:.1f}",
        f"{m['client_cpu_s'] / n:.3f}s",
        f"{m['moto_cpu_s'] / n:.3f}s",
    )
    row(
        f"1 launch (CloudProvider.launch, median of {len(s['all_s'])})",
        one,
        "1.0",
        f"{s['client_cpu_per_launch_s']:.3f}s",
        f"{s['moto_cpu_per_launch_s']:.3f}s",
    )
    for t in x["threads"]:
        row(
            f"{n} launches at once, thread pool of {t['threads']}",
            t["wall_s"],
            f"{t['ratio']:.1f}",
            f"{t['client_cpu_per_launch_s']:.3f}s",
            f"{t['moto_cpu_per_launch_s']:.3f}s",
        )
    p = x.get("processes")
    if p:
        row(
            f"{n} launches at once, process pool of {p['procs']} (warm)",
            p["wall_s"],
            f"{p['ratio']:.1f}",
            f"{p['client_cpu_per_launch_s']:.3f}s",
            f"{p['moto_cpu_per_launch_s']:.3f}s",
        )
    lines += [
        "",
        f"cloudmodal's own time per launch (outside SkyPilot and boto3), median: "
        f"{s['overhead_ms']:.2f} ms (goal < 20 ms); all: "
        + ", ".join(f"{v:.2f}" for v in s["overhead_all_ms"])
        + " ms",
        "  inside, per launch: " + "; ".join(f"{k} {v:.1f} ms" for k, v in s["inside_ms"].items()),
        "  requests per launch: "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(s["requests_per_launch"].items())),
    ]
    for t in x["threads"]:
        lines.append(
            f"  {n} launches, {t['threads']} threads: inside bootstrap_instances (under the driver's per-region "
            f"lock) {t['bootstrap_s']:.2f}s summed = {t['bootstrap_share']:.0%} of the wall time; inside "
            f"run_instances {t['run_instances_s']:.2f}s summed; launch median {t['each_median_s']:.2f}s, "
            f"max {t['each_max_s']:.2f}s"
        )
    f = x.get("failover")
    if f:
        lines += [
            "",
            f"failover, cloudmodal (Reconciler walk, {f['failing_zones']} zones out of capacity, class_stockouts="
            f"{f['class_stockouts']}): tick -> successful RunInstances {f['tick_to_ok_run_instances_s']:.3f}s "
            f"(tick -> first {f['tick_to_first_run_instances_s']:.3f}s; first -> successful "
            f"{f['first_to_ok_run_instances_s']:.3f}s, of it the walk's deliberate spacing "
            f"{f['walk_spacing_s']:.2f}s); landed in "
            f"{f['instance_zone']} (expected {f['expected_zone']})",
            "  RunInstances: "
            + ", ".join(f"{z} {st}" for z, st in f["run_instances"])
            + f" (rounds of {', '.join(str(w) for w in f['rounds'])} at once; "
            f"{f['surplus_nodes']} surplus node(s) started and terminated)",
            "  requests before the first RunInstances: "
            + ", ".join(f"{a} {c}" for a, c in sorted(f["requests_before_first_run_instances"].items())),
            "  requests per try (up to the successful RunInstances): "
            + ", ".join(f"{a} {c:g}" for a, c in sorted(f["requests_per_try"].items())),
        ]
    k = x.get("sky_failover")
    if k:
        lines += [
            f"failover, SkyPilot's provisioner alone ({REGION} with no zone, its own retries, then {REGION2}): "
            f"{k['wall_s']:.3f}s ({k['region1_s']:.3f}s failing {REGION}, {k['region2_s'] or 0:.3f}s {REGION2}), "
            f"{k['failures_before_ok']} failures before success, landed in {k['instance_zone']}",
            "  RunInstances: " + ", ".join(f"{z} {st}" for z, st in k["run_instances"]),
        ]
    return lines


def report(r: dict[str, Any]) -> str:
    lines = [
        f"launch bench: {r['n']} launches, SkyPilot {r['sky_version']}, moto {r['moto_version']}, "
        f"{os.cpu_count()} CPUs, wire latency per API request: "
        + ", ".join(f"{x['latency_s']:g} s" for x in r["latencies"])
    ]
    for x in r["latencies"]:
        lines += report_latency(r, x)
    k = r.get("sky_launch")
    if k:
        lines += [
            "",
            f"## sky.launch (SkyPilot's API server, {k['failing']} zones out of capacity)",
        ]
        if "server_start_s" in k:
            lines.append(
                f"API server start-up (not in the figures below): `sky api start` {k['server_start_s']:.1f}s, "
                f"`sky check aws` {k['check_s']:.1f}s ({k['startup_total_s']:.1f}s with the client's import)"
            )
        by_latency = {x["latency_s"]: x for x in r["latencies"]}
        for run in k["runs"]:
            f = (by_latency.get(run["latency_s"]) or {}).get("failover") or {}
            cm = f.get("tick_to_ok_run_instances_s")
            sl = run["to_ok_run_instances_s"]
            lines += [
                ("cold (the server's first launch), " if run.get("cold") else "")
                + f"latency {run['latency_s']:g} s: sky.launch call -> successful RunInstances "
                + (f"{sl:.3f}s" if sl is not None else "never")
                + f" (call -> first {run['to_first_run_instances_s'] or 0:.3f}s, first -> successful "
                f"{run['first_to_ok_run_instances_s'] or 0:.3f}s); landed in {run['instance_zone']} "
                f"(expected {run['expected_zone']}); cancel + down {run['down_s']:.1f}s",
                "  RunInstances: " + ", ".join(f"{z} {st}" for z, st in run["run_instances"]),
                "  requests before the successful RunInstances: "
                + ", ".join(f"{a} {c}" for a, c in sorted(run["requests_before_ok"].items())),
            ]
            if cm is not None and sl is not None and not run.get("cold"):
                lines.append(
                    f"  cloudmodal's walk on the same candidates (tick -> successful RunInstances): {cm:.3f}s: "
                    f"{sl / cm:.1f}x faster than sky.launch (goal >= 5x)"
                )
        if k.get("error"):
            lines.append(f"FAILED: {k['error']}")
            if k.get("server_log_tail"):
                lines += [
                    "  API server log, last lines:",
                    *("    " + x for x in k["server_log_tail"].splitlines()[-15:]),
                ]
        if k.get("killed_after_stop"):
            lines.append(
                f"  processes of the API server left after `sky api stop`, killed: {k['killed_after_stop']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--sky-sdk-child"]:
        return sky_sdk_child()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="launches at once (50)")
    ap.add_argument("--procs", type=int, default=0, help="processes in a process pool (0: skip, the default)")
    ap.add_argument("--single", type=int, default=5, help="single launches for the median (5)")
    ap.add_argument(
        "--threads", default=f"{{n}},{OLD_CONTROL_PLANE_THREADS}", help="thread pool sizes ({n},8)"
    )
    ap.add_argument("--failing", type=int, default=5, help="zones out of capacity in the failover (5, max 5)")
    ap.add_argument(
        "--latency",
        default=f"0,{REALISTIC_LATENCY_S}",
        help=f"seconds each API request is held by the fake, comma-separated (0,{REALISTIC_LATENCY_S})",
    )
    ap.add_argument("--skip-failover", action="store_true")
    ap.add_argument("--skip-sky-launch", action="store_true", help="no API server, no sky.launch")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    failing = max(0, min(args.failing, len(ZONES) - 1))
    latencies = [float(v) for v in args.latency.split(",") if v.strip()]
    logging.basicConfig(level=logging.ERROR)
    logging.disable(logging.WARNING)  # SkyPilot's progress lines and urllib3's pool warnings

    with (
        tempfile.TemporaryDirectory(prefix="launch-bench-") as tmp,
        MotoEc2.start(regions=[REGION, REGION2]) as fake,
    ):
        root = Path(tmp)
        catalog = write_catalog(root / "catalog")
        # SkyPilot reads ~/.sky and boto3 ~/.aws: a sandbox HOME and the fake's keys, before sky is imported.
        os.environ["HOME"] = str(root / "home")
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            os.environ.pop(key, None)
        os.environ.update(fake.env(REGION))
        import moto
        import sky

        launches = Launches(catalog, root / "state")
        launches.one(-1)  # imports SkyPilot's provisioner, makes the SSH key
        r: dict[str, Any] = {
            "n": args.n,
            "procs": args.procs,
            "sky_version": sky.__version__,
            "moto_version": moto.__version__,
            "latencies": [],
        }
        for latency in latencies:
            tag = f"{latency:g}"
            x: dict[str, Any] = {"latency_s": latency}
            r["latencies"].append(x)
            sys.stderr.write(f"[latency {tag} s] moto alone...\n")
            x["moto_alone"] = phase_moto_alone(fake, args.n, args.single, latency)
            sys.stderr.write(f"[latency {tag} s] single...\n")
            x["single"] = phase_single(fake, launches, args.single, latency)
            one = x["single"]["median_s"]
            x["threads"] = []
            for spec in args.threads.split(","):
                t = int(spec.replace("{n}", str(args.n)))
                sys.stderr.write(f"[latency {tag} s] threads {t}...\n")
                x["threads"].append(phase_threads(fake, launches, args.n, t, one, latency))
            if args.procs > 0:
                sys.stderr.write(f"[latency {tag} s] processes {args.procs}...\n")
                x["processes"] = phase_processes(
                    fake, launches, catalog, root / "state", args.n, args.procs, one, latency
                )
            if not args.skip_failover:
                sys.stderr.write(f"[latency {tag} s] failover...\n")
                x["failover"] = phase_failover(fake, catalog, root / "state", failing, latency, tag)
                x["sky_failover"] = phase_sky_failover(fake, catalog, root / "state", latency, tag)
        launches.provider.close()
        if not args.skip_sky_launch:
            sys.stderr.write("sky.launch (API server)...\n")
            r["sky_launch"] = phase_sky_launch(fake, root, failing, latencies)
            r["sky_launch"]["failing"] = failing
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
