"""The sim provider: scripted capacity, quota, provisioning delays and spot preemptions over real worker processes.

Logic tests use a fake clock with ``background=False`` (time moves only when the test says so) and a long
provisioning delay where no process is needed; lifecycle tests start real subprocesses.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmodal.exception import InvalidError
from cloudmodal.gpu import GpuTier
from cloudmodal.pricing.offers import Offer
from cloudmodal.providers.base import (
    LaunchRequest,
    NoCapacityError,
    Provider,
    ProviderError,
    QuotaExceededError,
    SupportsGpuInventory,
    SupportsPreemptionNotice,
    SupportsSignals,
    WorkerHandle,
    WorkerStatus,
)
from cloudmodal.providers.sim import (
    NOTICE_FILE_ENV,
    SCENARIO_ENV,
    SEED_ENV,
    CapacityRule,
    Match,
    PreemptionRule,
    SimProvider,
    SimScenario,
)


def offer(cloud, region, zone, itype, gpu, count, ondemand, spot) -> Offer:
    return Offer(
        cloud,
        region,
        zone,
        itype,
        gpu,
        count,
        80.0,
        8.0 * count,
        64.0 * count,
        ondemand,
        spot,
        "test",
        "2025-01-01",
    )


P5 = offer("aws", "us-east-1", "us-east-1a", "p5.48xlarge", "H100", 8, 98.32, 30.0)
G5 = offer("aws", "us-east-1", "us-east-1b", "g5.xlarge", "A10G", 1, 1.01, 0.4)
A2 = offer("gcp", "us-central1", "us-central1-a", "a2-highgpu-1g", "A100-40GB", 1, 3.67, 1.1)
LAMBDA = offer("lambda", "us-east-1", None, "gpu_1x_h100_pcie", "H100", 1, 2.49, None)  # no spot market
OFFERS = [P5, G5, A2, LAMBDA]

SLEEP = ("-c", "import time; time.sleep(60)")
FOREVER = {"provisioning": {"delay_s": 1e6}}  # launches stay provisioning: no process is started

# A worker stand-in: report the sim's env vars, then sleep until stopped.
REPORT_ENV = """
import json, os, sys, time
keys = ["CLOUDMODAL_SIM_NOTICE_FILE", "CLOUDMODAL_SIM_OFFER", "CLOUDMODAL_SIM_MARKET", "CUDA_VISIBLE_DEVICES",
        "CONTROL_PLANE_URL"]
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in keys}) + "\\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def req(
    worker_id: str, o: Offer | None = P5, market: str = "on-demand", *, argv=SLEEP, **kw
) -> LaunchRequest:
    gpu = GpuTier(o.gpu, o.gpu_count) if o is not None else None
    return LaunchRequest(
        worker_id=worker_id,
        app_id="ap-1",
        function_id="fu-1",
        gpu=gpu,
        offer=o,
        market=market,
        argv=argv,
        **kw,
    )  # type: ignore[arg-type]


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[Callable[..., SimProvider]]:
    """Build sim providers on the tiny offer list; every worker process is stopped and reaped at the end."""
    made: list[SimProvider] = []

    def make(**kwargs: object) -> SimProvider:
        kwargs.setdefault("offers", OFFERS)
        kwargs.setdefault("state_dir", tmp_path / "sim")
        p = SimProvider(**kwargs)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
        assert p.live_workers() == []
        assert p._local.live_workers() == [], "a worker process outlived its test"


def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- protocol, offers, launch ----------------------------------------------------------------------------------


def test_capabilities_offers_and_name(make_sim):
    sim = make_sim()
    assert isinstance(sim, Provider) and isinstance(sim, SupportsSignals)
    assert isinstance(sim, SupportsPreemptionNotice) and not isinstance(sim, SupportsGpuInventory)
    assert sim.name == "sim"
    assert sim.offers() == OFFERS
    assert sim.signals() == []  # nothing ruled out by an empty scenario


def test_default_offers_come_from_the_catalog(make_sim, tmp_path, monkeypatch):
    header = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice\n"
    for cloud, row in {
        "lambda": "gpu_1x_h100_pcie,H100,1,26,200,2.49,us-east-1,,\n",
        "runpod": "1x_A100-80GB_SECURE,A100-80GB,1,8,80,1.99,CA,,1.05\n",
    }.items():
        (tmp_path / "cat" / cloud).mkdir(parents=True)
        (tmp_path / "cat" / cloud / "vms.csv").write_text(header + row)
    monkeypatch.setenv("CLOUDMODAL_CATALOG_DIR", str(tmp_path / "cat"))
    sim = make_sim(offers=None)
    assert sorted(o.cloud for o in sim.offers()) == ["lambda", "runpod"]
    assert {o.gpu for o in sim.offers()} == {"H100", "A100-80GB"}


def test_launch_runs_a_real_worker_with_the_price_fixed_at_launch(make_sim, tmp_path, wait_for_file):
    sim = make_sim()
    out = tmp_path / "env.json"
    h = sim.launch(
        req("w1", A2, "spot", argv=("-c", REPORT_ENV, str(out)), env={"CONTROL_PLANE_URL": "http://cp"})
    )
    assert (h.provider, h.market, h.offer, h.price_per_hour) == ("sim", "spot", A2, 1.1)
    assert h.instance_id.startswith("sim-gcp-")
    env = json.loads(wait_for_file(out))
    assert env["CONTROL_PLANE_URL"] == "http://cp"
    assert env["CLOUDMODAL_SIM_OFFER"] == str(A2.key("spot")) and env["CLOUDMODAL_SIM_MARKET"] == "spot"
    assert env[NOTICE_FILE_ENV] == h.extra["notice_file"]
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # simulated machines have no real GPU
    assert sim.describe(h).state == "running"
    assert sim.live_workers() == ["w1"] and sim.live_workers(market="on-demand") == []
    sim.terminate(h, grace_s=5)
    st = sim.describe(h)
    assert st.state == "exited" and not st.alive
    sim.terminate(h)  # idempotent
    od = sim.launch(req("w2", A2, "on-demand"))
    assert od.price_per_hour == 3.67


def test_bad_requests_are_clear_provider_errors(make_sim):
    sim = make_sim()
    with pytest.raises(ProviderError, match="not sold as spot") as e:
        sim.launch(req("w1", LAMBDA, "spot"))
    assert e.value.reason == "no-spot-price" and not isinstance(e.value, NoCapacityError)
    with pytest.raises(ProviderError, match="LaunchRequest.offer") as e:
        sim.launch(req("w1", None))
    assert e.value.reason == "no-offer"
    sim.launch(req("w1", G5))
    with pytest.raises(ProviderError) as e:
        sim.launch(req("w1", G5))
    assert e.value.reason == "duplicate-worker-id"
    st = sim.describe(WorkerHandle("nope", "sim", "x", None, "spot", 0.0, 0.0))
    assert st == WorkerStatus("unknown", None, "worker nope was not launched by this sim provider instance")


def test_a_worker_that_exits_on_its_own_is_reaped_and_frees_its_quota(make_sim):
    sim = make_sim(scenario={"quota": [{"max_instances": 1}]})
    h = sim.launch(req("w1", G5, argv=("-c", "import sys; sys.exit(3)")))
    st = wait_for(lambda: (s := sim.describe(h)).state == "exited" and s)
    assert (st.returncode, st.detail) == (3, "exited with code 3")
    sim.launch(req("w2", G5))


# --- capacity ---------------------------------------------------------------------------------------------------


def test_capacity_rule_window_for_spot_of_one_offer(make_sim):
    clock = FakeClock()
    rule = {
        "match": {"cloud": "aws", "instance_type": "p5.*", "market": "spot"},
        "mode": "none",
        "from_s": 10,
        "until_s": 40,
    }
    sim = make_sim(scenario={**FOREVER, "capacity": [rule]}, clock=clock, background=False)
    sim.launch(req("before", P5, "spot"))
    clock.advance(10)
    with pytest.raises(NoCapacityError) as e:
        sim.launch(req("during", P5, "spot"))
    assert e.value.offer is P5 and e.value.reason == "InsufficientInstanceCapacity" and e.value.retryable
    assert "spot" in str(e.value) and "from t=10 s until t=40 s" in str(e.value)
    sim.launch(req("od", P5, "on-demand"))  # on-demand of the same offer has capacity
    sim.launch(req("other", G5, "spot"))  # so does spot of another instance type
    clock.advance(29.9)
    with pytest.raises(NoCapacityError):
        sim.launch(req("during2", P5, "spot"))
    clock.advance(0.1)
    sim.launch(req("after", P5, "spot"))


def test_fail_prob_is_seeded_and_reproducible(make_sim):
    scenario = {
        **FOREVER,
        "capacity": [{"match": {"cloud": "gcp"}, "mode": "fail_prob", "p": 0.5, "reason": "STOCKOUT"}],
    }

    def outcomes(seed: int, prefix: str) -> list[bool]:
        sim = make_sim(scenario=scenario, seed=seed, background=False)
        got = []
        for i in range(40):
            try:
                sim.launch(req(f"{prefix}{i}", A2, "spot"))
                got.append(True)
            except NoCapacityError as e:
                assert e.reason == "STOCKOUT"
                got.append(False)
        return got

    first = outcomes(7, "a")
    assert 5 < sum(first) < 35
    assert outcomes(7, "b") == first  # same seed: same draws, whatever the worker ids
    assert outcomes(8, "a") != first


def test_set_capacity_overrides_the_scenario_and_shows_in_signals(make_sim):
    scenario = {**FOREVER, "capacity": [{"match": {"cloud": "gcp"}, "mode": "none"}]}
    sim = make_sim(scenario=scenario, background=False)
    [sig] = sim.signals()  # the gcp offer is out in both markets
    assert (sig.cloud, sig.instance_type, sig.available) == ("gcp", "a2-highgpu-1g", False)
    sim.set_capacity({"cloud": "gcp", "market": "spot"}, True)
    sim.launch(req("w1", A2, "spot"))
    with pytest.raises(NoCapacityError):
        sim.launch(req("w2", A2, "on-demand"))
    assert sim.signals() == []  # a spot-only outage is no offer-wide signal
    sim.set_capacity(Match(gpu="H100"), False)
    with pytest.raises(NoCapacityError, match="set_capacity") as e:
        sim.launch(req("w3", LAMBDA))
    assert e.value.reason == "insufficient-capacity"
    assert {s.instance_type for s in sim.signals()} == {"p5.48xlarge", "gpu_1x_h100_pcie"}
    sim.clear_capacity()
    sim.launch(req("w4", LAMBDA))
    with pytest.raises(NoCapacityError):
        sim.launch(req("w5", A2, "spot"))


# --- quota --------------------------------------------------------------------------------------------------------


def test_quota_caps_live_gpus_and_is_released_when_workers_end(make_sim):
    scenario = {**FOREVER, "quota": [{"match": {"cloud": "aws"}, "max_gpus": 9}]}
    sim = make_sim(scenario=scenario, background=False)
    big = sim.launch(req("big", P5))
    small = sim.launch(req("small", G5, "spot"))  # 8 + 1 = 9 GPUs: at the cap
    with pytest.raises(QuotaExceededError) as e:
        sim.launch(req("more", G5))
    assert e.value.reason == "VcpuLimitExceeded" and not e.value.retryable and e.value.offer is G5
    assert "9 of 9 GPUs in use" in str(e.value)
    sim.launch(req("gcp", A2))  # other clouds are not counted
    assert {(s.instance_type, s.quota_left_gpus, s.available) for s in sim.signals()} == {
        ("p5.48xlarge", 0, None),
        ("g5.xlarge", 0, None),
    }
    sim.terminate(big)
    sim.launch(req("more", G5))
    sim.terminate(small)
    assert sim.describe(small).detail == "terminated while provisioning"


def test_quota_per_bucket_and_max_instances(make_sim):
    scenario = {**FOREVER, "quota": [{"max_instances": 1, "per": ["cloud"]}]}
    sim = make_sim(scenario=scenario, background=False)
    sim.launch(req("a", G5))
    sim.launch(req("g", A2))  # another cloud, another bucket
    with pytest.raises(QuotaExceededError, match=r"1 of 1 instances in use \(cloud=aws\)"):
        sim.launch(req("a2", P5))


def test_concurrent_launches_respect_the_quota(make_sim):
    sim = make_sim(scenario={**FOREVER, "quota": [{"max_gpus": 10}]}, background=False)
    results: list[str] = []

    def go(i: int) -> None:
        try:
            sim.launch(req(f"w{i}", G5, "spot"))
            results.append("ok")
        except QuotaExceededError:
            results.append("quota")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 10 and len(sim.live_workers()) == 10


# --- provisioning -------------------------------------------------------------------------------------------------


def test_provisioning_then_running_on_the_clock(make_sim):
    clock = FakeClock()
    scenario = {"provisioning": {"delay_s": 5, "rules": [{"match": {"cloud": "gcp"}, "delay_s": 30}]}}
    sim = make_sim(scenario=scenario, clock=clock, background=False)
    h = sim.launch(req("w1", P5, "spot"))
    g = sim.launch(req("w2", A2))
    assert h.extra["provisioning_s"] == 5 and g.extra["provisioning_s"] == 30
    st = sim.describe(h)
    assert st.state == "provisioning" and st.alive and "5.0 s left" in st.detail
    assert sim.live_workers() == ["w1", "w2"] and sim._local.live_workers() == []
    clock.advance(5)
    assert sim.describe(h).state == "running"
    assert sim.describe(g).state == "provisioning"
    assert sim._local.live_workers() == ["w1"]


def test_a_delayed_worker_is_started_by_the_background_thread(make_sim, tmp_path, wait_for_file):
    sim = make_sim(scenario={"provisioning": {"delay_s": 0.3}})
    out = tmp_path / "env.json"
    h = sim.launch(req("w1", G5, argv=("-c", REPORT_ENV, str(out))))
    assert h.extra["ready_at"] == pytest.approx(h.launched_at + 0.3)
    json.loads(wait_for_file(out))  # nobody called describe: the timer started it
    assert sim.describe(h).state == "running"


def test_terminate_while_provisioning_never_starts_the_process(make_sim):
    clock = FakeClock()
    sim = make_sim(scenario={"provisioning": {"delay_s": 5}}, clock=clock, background=False)
    h = sim.launch(req("w1", G5))
    sim.terminate(h)
    clock.advance(10)
    assert sim.describe(h) == WorkerStatus("exited", None, "terminated while provisioning")
    assert sim._local.live_workers() == []


def test_jitter_is_seeded(make_sim):
    scenario = {"provisioning": {"delay_s": 100, "jitter_s": 50}}

    def delays(seed: int, prefix: str) -> list[float]:
        sim = make_sim(scenario=scenario, seed=seed, background=False)
        return [
            sim.launch(req(f"{prefix}{i}", o)).extra["provisioning_s"] for i, o in enumerate([G5, A2, G5, P5])
        ]

    first = delays(3, "x")
    assert all(50 <= d <= 150 for d in first) and len(set(first)) == 4
    assert delays(3, "y") == first
    assert delays(4, "x") != first


# --- preemption ---------------------------------------------------------------------------------------------------


def test_scheduled_preemption_notice_then_sigkill(make_sim):
    clock = FakeClock()
    rule = {"match": {"cloud": "aws"}, "every_s": 20, "notice_s": 5, "reason": "capacity-rebalance"}
    sim = make_sim(scenario={"preemption": [rule]}, clock=clock, background=False)
    spot = sim.launch(req("spot", G5, "spot"))
    od = sim.launch(req("od", G5, "on-demand"))
    gcp = sim.launch(req("gcp", A2, "spot"))  # not matched
    pid = sim._workers["spot"].pid
    clock.advance(19.9)
    assert sim.preemption_notice(spot) is None
    clock.advance(0.1)
    assert sim.preemption_notice(spot) == pytest.approx(spot.launched_at + 25)
    notice = json.loads(Path(spot.extra["notice_file"]).read_text())
    assert notice["reclaim_at"] == pytest.approx(spot.launched_at + 25) and notice["notice_s"] == 5
    st = sim.describe(spot)
    assert st.state == "running" and "reclaimed in 5.0 s" in st.detail and alive(pid)
    clock.advance(5)
    st = sim.describe(spot)
    assert st.state == "preempted" and not st.alive
    assert "capacity-rebalance" in st.detail and "notice given 5 s before" in st.detail
    final = wait_for(lambda: (s := sim.describe(spot)).returncode is not None and s)
    assert final.returncode == -9 and final.state == "preempted"
    assert not alive(pid)
    assert sim.preemption_notice(spot) is None  # no notice pending for a reclaimed worker
    clock.advance(100)
    assert sim.describe(od).state == "running" and sim.preemption_notice(od) is None
    assert sim.describe(gcp).state == "running" and sim.preemption_notice(gcp) is None


def test_preempt_on_demand(make_sim):
    sim = make_sim(scenario={"notice_s": 0.3})
    h = sim.launch(req("w1", A2, "spot"))
    pid = sim._workers["w1"].pid
    at = sim.preempt("w1")
    assert at is not None
    assert sim.preemption_notice(h) == at
    assert sim.describe(h).state == "running"
    wait_for(lambda: not alive(pid))  # killed and reaped by the background thread: nobody asked
    st = sim.describe(h)
    assert (st.state, st.returncode) == ("preempted", -9) and "preempt() called" in st.detail
    assert sim.preempt(h) is None  # already gone

    od = sim.launch(req("w2", A2, "on-demand"))
    with pytest.raises(ProviderError, match="only spot workers") as e:
        sim.preempt(od)
    assert e.value.reason == "not-spot"
    with pytest.raises(ProviderError, match="No worker nope"):
        sim.preempt("nope")


def test_preempt_with_zero_notice_reclaims_at_once(make_sim):
    sim = make_sim(background=False)
    h = sim.launch(req("w1", G5, "spot"))
    sim.preempt(h, notice_s=0, reason="host maintenance")
    st = sim.describe(h)
    assert st.state == "preempted" and "host maintenance" in st.detail


def test_preempting_a_provisioning_worker_means_it_never_runs(make_sim):
    clock = FakeClock()
    sim = make_sim(scenario={"provisioning": {"delay_s": 10}}, clock=clock, background=False)
    h = sim.launch(req("w1", G5, "spot"))
    sim.preempt(h, notice_s=2)
    clock.advance(2)
    assert sim.describe(h).state == "preempted"
    clock.advance(10)
    assert sim.describe(h).state == "preempted" and sim._local.live_workers() == []


def test_fleet_preemptions_at_explicit_times_pick_seeded_victims(make_sim):
    def victims(seed: int) -> list[str]:
        clock = FakeClock()
        scenario = {"preemption": [{"at_s": [5, 6, 7], "notice_s": 100}]}
        sim = make_sim(scenario=scenario, clock=clock, background=False, seed=seed)
        for i in range(4):
            sim.launch(req(f"w{i}", G5, "spot"))
        sim.launch(req("od", G5, "on-demand"))
        got = []
        for _ in range(3):
            clock.advance(1 if got else 5)
            got.append(sorted(w for w in sim.live_workers() if sim._workers[w].reclaim_at is not None))
        sim.close()
        return got

    run = victims(1)
    assert [len(v) for v in run] == [1, 2, 3] and "od" not in run[-1]
    assert victims(1) == run


def test_fleet_every_and_preempt_any(make_sim):
    clock = FakeClock()
    scenario = {"preemption": [{"scope": "fleet", "every_s": 10, "until_s": 25, "notice_s": 1}]}
    sim = make_sim(scenario=scenario, clock=clock, background=False)
    hs = [sim.launch(req(f"w{i}", G5, "spot")) for i in range(4)]
    clock.advance(10)
    sim.poll()
    assert len([h for h in hs if sim.preemption_notice(h) is not None]) == 1
    clock.advance(10)
    sim.poll()
    clock.advance(10)  # t=30: past until_s, no third notice
    states = [sim.describe(h).state for h in hs]
    assert states.count("preempted") == 2 and states.count("running") == 2
    [chosen] = sim.preempt_any({"cloud": "aws"}, notice_s=0)
    assert sim._workers[chosen].state == "preempted"
    assert sim.preempt_any({"cloud": "gcp"}) == []


def test_worker_preemption_rate_is_seeded(make_sim):
    def notices(seed: int) -> list[float]:
        clock = FakeClock()
        scenario = {"preemption": [{"rate_per_hour": 3600, "notice_s": 1000}]}
        sim = make_sim(scenario=scenario, clock=clock, background=False, seed=seed)
        hs = [sim.launch(req(f"w{i}", G5, "spot")) for i in range(3)]
        clock.advance(50)  # ~1 s per notice on average; reclaims come 1000 s later
        got = [sim.preemption_notice(h) for h in hs]
        sim.close()
        return got

    assert all(n is not None for n in notices(0))
    assert notices(0) == notices(0) != notices(1)


def test_close_kills_everything_and_refuses_launches(make_sim):
    sim = make_sim(scenario={"provisioning": {"rules": [{"match": {"cloud": "gcp"}, "delay_s": 60}]}})
    a = sim.launch(req("a", G5, "spot"))
    b = sim.launch(req("b", P5))
    c = sim.launch(req("c", A2))
    pids = [sim._workers[w].pid for w in ("a", "b")]
    assert all(alive(p) for p in pids)
    sim.close()
    assert not any(alive(p) for p in pids)
    assert [sim.describe(h).state for h in (a, b, c)] == ["exited", "exited", "exited"]
    assert sim._local.live_workers() == [] and sim._thread is not None and not sim._thread.is_alive()
    with pytest.raises(ProviderError, match="closed"):
        sim.launch(req("d", G5))
    sim.close()  # idempotent


# --- scenarios ----------------------------------------------------------------------------------------------------

EXAMPLE = {
    "notice_s": 30,
    "provisioning": {"delay_s": 20, "jitter_s": 5, "rules": [{"match": {"cloud": "lambda"}, "delay_s": 60}]},
    "capacity": [
        {
            "match": {"cloud": "aws", "instance_type": "p5.48xlarge", "market": "spot"},
            "mode": "none",
            "from_s": 10,
            "until_s": 40,
        },
        {"match": {"cloud": "gcp", "gpu": "H100"}, "mode": "fail_prob", "p": 0.3},
    ],
    "quota": [{"match": {"cloud": "azure"}, "max_gpus": 8, "per": ["region"]}],
    "preemption": [{"match": {"gpu": ["A100-*", "H100"]}, "every_s": 30, "jitter_s": 10, "notice_s": 5}],
}

EXAMPLE_TOML = """
notice_s = 30

[provisioning]
delay_s = 20
jitter_s = 5
rules = [{ match = { cloud = "lambda" }, delay_s = 60 }]

[[capacity]]
match = { cloud = "aws", instance_type = "p5.48xlarge", market = "spot" }
mode = "none"
from_s = 10
until_s = 40

[[capacity]]
match = { cloud = "gcp", gpu = "H100" }
mode = "fail_prob"
p = 0.3

[[quota]]
match = { cloud = "azure" }
max_gpus = 8
per = ["region"]

[[preemption]]
match = { gpu = ["A100-*", "H100"] }
every_s = 30
jitter_s = 10
notice_s = 5
"""


def test_scenario_from_dict_json_toml_and_round_trip(tmp_path):
    sc = SimScenario.from_dict(EXAMPLE)
    assert sc.capacity[0] == CapacityRule(
        match=Match(cloud="aws", instance_type="p5.48xlarge", market="spot"),
        mode="none",
        from_s=10.0,
        until_s=40.0,
    )
    assert sc.preemption[0].scope == "worker" and sc.preemption[0].match.matches(A2, "spot")
    assert not sc.preemption[0].match.matches(G5, "spot")
    assert SimScenario.from_dict(sc.to_dict()) == sc
    (tmp_path / "s.json").write_text(json.dumps(EXAMPLE))
    (tmp_path / "s.toml").write_text(EXAMPLE_TOML)
    (tmp_path / "s.conf").write_text(EXAMPLE_TOML)  # unknown suffix: JSON, then TOML
    for name in ("s.json", "s.toml", "s.conf"):
        assert SimScenario.load(str(tmp_path / name)) == sc
    assert SimScenario.load(json.dumps(EXAMPLE)) == sc
    assert SimScenario.from_dict({"preemption": {"at_s": [3, 1]}}).preemption[0] == PreemptionRule(
        at_s=(1.0, 3.0), scope="fleet"
    )


def test_from_env(tmp_path, monkeypatch):
    (tmp_path / "s.toml").write_text(EXAMPLE_TOML)
    env = {SCENARIO_ENV: str(tmp_path / "s.toml"), SEED_ENV: "42"}
    sim = SimProvider.from_env(env, offers=OFFERS, state_dir=tmp_path / "sim")
    assert sim.seed == 42 and sim.scenario == SimScenario.from_dict(EXAMPLE)
    monkeypatch.setenv(SCENARIO_ENV, ' {"notice_s": 3}')
    monkeypatch.delenv(SEED_ENV, raising=False)
    sim = SimProvider.from_env(offers=OFFERS, state_dir=tmp_path / "sim")
    assert sim.scenario.notice_s == 3 and sim.seed == 0
    with pytest.raises(InvalidError, match="CLOUDMODAL_SIM_SEED=.x. is invalid"):
        SimProvider.from_env({SEED_ENV: "x"}, offers=OFFERS)
    with pytest.raises(InvalidError, match="Cannot read the sim scenario"):
        SimProvider.from_env({SCENARIO_ENV: str(tmp_path / "missing.json")}, offers=OFFERS)


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ({"capacty": []}, "unknown key(s) capacty; valid keys: provisioning, capacity"),
        (
            {"capacity": [{"mode": "sometimes"}]},
            "capacity[0].mode: must be one of none, fail_prob, got 'sometimes'",
        ),
        ({"capacity": [{"mode": "fail_prob", "p": 1.5}]}, "capacity[0].p: must be between 0 and 1, got 1.5"),
        (
            {"capacity": [{"from_s": 40, "until_s": 10}]},
            "capacity[0]: until_s (10) must be after from_s (40)",
        ),
        (
            {"capacity": [{"match": {"cloud": "aws", "gpus": "H100"}}]},
            "capacity[0].match: unknown key(s) gpus; valid keys: cloud, region, zone, instance_type, gpu,",
        ),
        (
            {"capacity": [{"match": {"market": "reserved"}}]},
            "capacity[0].match.market: must be one of spot, on-demand",
        ),
        (
            {"capacity": [{"match": {"cloud": []}}]},
            "capacity[0].match.cloud: must be a pattern or a non-empty list",
        ),
        (
            {"capacity": [{"match": {"gpu_count": 0}}]},
            "match.gpu_count: must be a whole number of GPUs (1 or more)",
        ),
        ({"capacity": 5}, "capacity: must be a list of tables (JSON objects), got int"),
        ({"quota": [{"match": {"cloud": "aws"}}]}, "quota[0]: a quota rule needs max_gpus or max_instances"),
        (
            {"quota": [{"max_gpus": 4, "per": ["account"]}]},
            "quota[0].per: unknown field(s) account; valid: cloud,",
        ),
        (
            {"quota": [{"max_gpus": True}]},
            "quota[0].max_gpus: must be a whole number of GPUs (0 or more), got True",
        ),
        (
            {"preemption": [{"notice_s": 5}]},
            "needs exactly one of every_s, rate_per_hour or at_s, e.g. every_s =",
        ),
        ({"preemption": [{"every_s": 5, "at_s": [1]}]}, "(got every_s, at_s); keep one"),
        ({"preemption": [{"every_s": 5, "match": {"market": "on-demand"}}]}, "spot workers only"),
        (
            {"preemption": {"at_s": [1], "scope": "worker"}},
            "preemption[0]: at_s are times since the provider",
        ),
        ({"provisioning": {"delay_s": -1}}, "provisioning.delay_s: must be at least 0, got -1"),
        (
            {"provisioning": {"delay_s": "slow"}},
            "provisioning.delay_s: must be a number, got 'slow'; write it without",
        ),
        (
            {"provisioning": {"rules": {"matcher": 2}}},
            "provisioning.rules[0]: unknown key(s) matcher; valid keys: match,",
        ),
        ({"notice_s": float("nan")}, "notice_s: must be a number, got nan"),
    ],
)
def test_invalid_scenarios_name_the_problem(scenario, message):
    with pytest.raises(InvalidError) as e:
        SimScenario.from_dict(scenario)
    assert message in str(e.value)


def test_invalid_scenario_lists_every_problem_and_names_the_file(tmp_path):
    bad = {"capacity": [{"mode": "none", "p": 2, "reason": 3}], "quota": [{"match": {}}]}
    with pytest.raises(InvalidError) as e:
        SimScenario.from_dict(bad)
    msg = str(e.value)
    assert "capacity[0].p: must be between 0 and 1, got 2" in msg
    assert "capacity[0].reason:" in msg and "quota[0]: a quota rule needs max_gpus" in msg
    path = tmp_path / "bad.toml"
    path.write_text('[[capacity]]\nmode = "sometimes"\n')
    with pytest.raises(
        InvalidError, match=r"Invalid sim scenario .*bad\.toml: capacity\[0\]\.mode: must be one of"
    ):
        SimScenario.load(str(path))


def test_null_tables_mean_defaults():
    sc = SimScenario.from_dict({"provisioning": None, "capacity": [{"match": None}], "preemption": None})
    assert sc.provisioning == SimScenario().provisioning and sc.preemption == ()
    assert sc.capacity[0].match == Match() and sc.capacity[0].mode == "none"


def test_invalid_scenario_text():
    with pytest.raises(InvalidError, match="not valid JSON"):
        SimScenario.load("{not json")


def test_match_patterns():
    m = Match(cloud=["aws", "gcp"], zone="us-*", gpu="h100")
    assert m.matches(P5, "spot") and not m.matches(G5, "spot") and not m.matches(LAMBDA, "spot")  # no zone
    assert Match(gpu_count=8).matches(P5, "on-demand") and not Match(gpu_count=8).matches(G5, "on-demand")
    assert Match().matches(LAMBDA, "on-demand")
