"""The spot market policy and the block list: tables of event scripts on a simulated clock."""

from __future__ import annotations

from collections import deque

import pytest

from cloudmodal.exception import InvalidError
from cloudmodal.pricing.offers import Offer, OfferKey
from cloudmodal.server.spot import BlockList, MarketPolicy, MarketSettings, PoolMarketState, quota_scope

SETTINGS = MarketSettings(
    failure_threshold=3,
    preemption_threshold=3,
    window_s=600.0,
    probe_interval_s=120.0,
    block_capacity_s=300.0,
    block_quota_s=1800.0,
    preemption_fraction=0.25,
    replace_margin=0.1,
    replace_interval_s=10.0,
)


def run(script: list[tuple], settings: MarketSettings = SETTINGS) -> tuple[list, PoolMarketState]:
    """Play ``(t, action, *args)`` steps against one pool's state; returns what each step returned.

    Actions: ``fail``, ``preempt`` (optional live spot workers), ``ok`` (a spot success) return whether an
    event message came back ("enter"/"leave"/None); ``mode`` returns ``spot_mode("allow")``.
    """
    policy, state = MarketPolicy(settings), PoolMarketState()
    out: list = []
    for t, action, *args in script:
        if action == "fail":
            msg = policy.record_spot_failure(state, t)
            out.append("enter" if msg else None)
        elif action == "preempt":
            msg = policy.record_preemption(state, t, *args)
            out.append("enter" if msg else None)
        elif action == "ok":
            msg = policy.record_spot_success(state, t)
            out.append("leave" if msg else None)
        elif action == "mode":
            out.append(policy.spot_mode("allow", state, t))
        else:  # pragma: no cover - a typo in a table
            raise AssertionError(action)
    return out, state


SCRIPTS = [
    # id, script, expected results
    ("no history: spot allowed", [(0, "mode")], ["allow"]),
    (
        "three failures in the window fall back",
        [(0, "fail"), (10, "fail"), (20, "mode"), (30, "fail"), (40, "mode")],
        [None, None, "allow", "enter", "never"],
    ),
    (
        "a success in between clears the count",
        [(0, "fail"), (10, "fail"), (15, "ok"), (20, "fail"), (30, "fail"), (40, "mode")],
        [None, None, None, None, None, "allow"],
    ),
    (
        "failures older than the window do not count",
        [(0, "fail"), (10, "fail"), (610, "fail"), (611, "mode")],
        [None, None, None, "allow"],
    ),
    (
        "failure exactly a window old has left it",
        [(0, "fail"), (300, "fail"), (600, "fail"), (601, "mode")],
        [None, None, None, "allow"],
    ),
    (
        "one probe per interval while fallen back",
        [(0, "fail"), (1, "fail"), (2, "fail"), (121, "mode"), (122, "mode"), (123, "mode"), (241, "mode")],
        [None, None, "enter", "never", "allow", "never", "never"],
    ),
    (
        "next probe an interval after the last one",
        [(0, "fail"), (1, "fail"), (2, "fail"), (122, "mode"), (241, "mode"), (242, "mode")],
        [None, None, "enter", "allow", "never", "allow"],
    ),
    (
        "a failed probe keeps the fallback, quietly",
        [(0, "fail"), (1, "fail"), (2, "fail"), (122, "mode"), (123, "fail"), (124, "mode")],
        [None, None, "enter", "allow", None, "never"],
    ),
    (
        "a spot success ends the fallback",
        [(0, "fail"), (1, "fail"), (2, "fail"), (122, "mode"), (125, "ok"), (126, "mode"), (127, "ok")],
        [None, None, "enter", "allow", "leave", "allow", None],
    ),
    (
        "after coming back, three new failures are needed",
        [(0, "fail"), (1, "fail"), (2, "fail"), (125, "ok"), (126, "fail"), (127, "fail"), (128, "mode")],
        [None, None, "enter", "leave", None, None, "allow"],
    ),
    (
        "three preemptions in the window fall back",
        [(0, "preempt"), (100, "preempt"), (200, "mode"), (300, "preempt"), (301, "mode")],
        [None, None, "allow", "enter", "never"],
    ),
    (
        "preemptions spread beyond the window do not",
        [(0, "preempt"), (400, "preempt"), (800, "preempt"), (801, "mode")],
        [None, None, None, "allow"],
    ),
    (
        "a big pool counts preemptions as a rate",
        [(0, "preempt", 40), (1, "preempt", 40), (2, "preempt", 40), (3, "mode")],
        [None, None, None, "allow"],
    ),
    (
        "a reclaim wave in a big pool falls back",
        [(t, "preempt", 40) for t in range(10)] + [(11, "mode")],
        [None] * 9 + ["enter", "never"],
    ),
    (
        "no probe while preemptions are still heavy",
        [(0, "preempt"), (1, "preempt"), (2, "preempt"), (200, "mode"), (601, "mode")],
        [None, None, "enter", "never", "allow"],
    ),
    (
        "a spot launch during a preemption wave does not end the fallback",
        [
            (0, "preempt"),
            (1, "preempt"),
            (2, "preempt"),
            (50, "ok"),
            (51, "mode"),
            (602, "ok"),
            (603, "mode"),
        ],
        [None, None, "enter", None, "never", "leave", "allow"],
    ),
    (
        "failures while preempted-out do not re-enter",
        [(0, "preempt"), (1, "preempt"), (2, "preempt"), (3, "fail"), (4, "fail"), (5, "fail")],
        [None, None, "enter", None, None, None],
    ),
]


@pytest.mark.parametrize("script,expected", [pytest.param(s, e, id=i) for i, s, e in SCRIPTS])
def test_market_scripts(script, expected):
    got, _ = run(script)
    assert got == expected


@pytest.mark.parametrize(
    "requested,fallen_back,probe_due,expected",
    [
        ("never", False, False, "never"),
        ("never", True, True, "never"),
        ("require", False, False, "require"),
        ("require", True, False, "require"),
        ("require", True, True, "require"),
        ("allow", False, False, "allow"),
        ("allow", True, False, "never"),
        ("allow", True, True, "allow"),
    ],
)
def test_spot_mode_passes_user_choices_through(requested, fallen_back, probe_due, expected):
    state = PoolMarketState()
    if fallen_back:
        state.fallback_since, state.fallback_reason = 0.0, "launch failures"
    now = 500.0 if probe_due else 10.0
    assert MarketPolicy(SETTINGS).spot_mode(requested, state, now) == expected


def test_messages_say_what_happened_and_what_next():
    policy, state = MarketPolicy(SETTINGS), PoolMarketState()
    policy.record_spot_failure(state, 0.0)
    policy.record_spot_failure(state, 1.0)
    enter = policy.record_spot_failure(state, 2.0)
    assert enter == (
        "spot → on-demand: 3 spot launch failures in the last 10 min; new workers launch on demand, "
        "trying spot again once every 2 min"
    )
    leave = policy.record_spot_success(state, 2.0 + 300)
    assert leave is not None and leave.startswith("on-demand → spot: a spot launch succeeded after 5 min")
    state = PoolMarketState()
    for t in range(3):
        msg = policy.record_preemption(state, float(t))
    assert msg is not None and "3 preemptions in the last 10 min" in msg


def test_state_is_plain_and_defaults_are_independent():
    a, b = PoolMarketState(), PoolMarketState()
    a.spot_failures.append(1.0)
    assert b.spot_failures == deque() and not b.fallen_back
    assert MarketPolicy().settings == MarketSettings()


def test_windows_prune_old_entries():
    policy, state = MarketPolicy(SETTINGS), PoolMarketState()
    for t in range(0, 100_000, 1000):
        policy.record_spot_failure(state, float(t))
        policy.record_preemption(state, float(t))
    assert len(state.spot_failures) == 1 and len(state.preemptions) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"preemption_threshold": 1.5},
        {"window_s": 0},
        {"probe_interval_s": -1},
        {"block_capacity_s": float("inf")},
        {"block_quota_s": "1800"},
        {"preemption_fraction": 1.0},
        {"replace_margin": -0.1},
        {"replace_interval_s": -1},
    ],
)
def test_settings_are_validated(kwargs):
    with pytest.raises(InvalidError, match="Invalid MarketSettings"):
        MarketSettings(**kwargs)


@pytest.mark.parametrize(
    "min_od,live_od,expected",
    [(0, 0, 0), (0, 3, 0), (2, 0, 2), (2, 1, 1), (2, 2, 0), (2, 5, 0), (1, -1, 1)],
)
def test_on_demand_floor(min_od, live_od, expected):
    assert MarketPolicy().on_demand_floor(min_od, live_od) == expected


OD, SPOT = "on-demand", "spot"
W = [("od-cheap", OD, 2.0), ("od-dear", OD, 3.0), ("s1", SPOT, 1.0)]

REPLACE = [
    # id, workers, min_on_demand, spot price, state kwargs, now, expected
    ("most expensive on-demand first", W, 0, 1.0, {}, 1000.0, ["od-dear"]),
    ("floor keeps the cheapest on-demand", W, 1, 1.0, {}, 1000.0, ["od-dear"]),
    ("nothing above the floor", W, 2, 1.0, {}, 1000.0, []),
    ("no spot offer", W, 0, None, {}, 1000.0, []),
    ("spot not cheaper", W, 0, 3.0, {}, 1000.0, []),
    ("spot cheaper by less than the margin", [("od", OD, 3.0)], 0, 2.75, {}, 1000.0, []),
    ("spot cheaper by the margin", [("od", OD, 3.0)], 0, 2.7, {}, 1000.0, ["od"]),
    ("only spot workers", [("s1", SPOT, 1.0), ("s2", SPOT, 1.0)], 0, 0.5, {}, 1000.0, []),
    ("not while fallen back", W, 0, 1.0, {"fallback_since": 900.0}, 1000.0, []),
    ("not right after coming back", W, 0, 1.0, {"restored_at": 950.0}, 1000.0, []),
    ("once spot has held a probe interval", W, 0, 1.0, {"restored_at": 880.0}, 1000.0, ["od-dear"]),
    ("one per replace interval", W, 0, 1.0, {"last_replace": 995.0}, 1000.0, []),
    ("the next after the interval", W, 0, 1.0, {"last_replace": 990.0}, 1000.0, ["od-dear"]),
    ("ties break on the id", [("b", OD, 2.0), ("a", OD, 2.0)], 0, 1.0, {}, 1000.0, ["b"]),
]


@pytest.mark.parametrize(
    "workers,min_od,spot_price,state_kwargs,now,expected",
    [pytest.param(*row[1:], id=row[0]) for row in REPLACE],
)
def test_to_replace(workers, min_od, spot_price, state_kwargs, now, expected):
    state = PoolMarketState(**state_kwargs)
    got = MarketPolicy(SETTINGS).to_replace(state, workers, min_od, spot_price, now)
    assert got == expected
    if got:
        assert state.last_replace == now


def test_to_replace_is_gradual():
    policy, state = MarketPolicy(SETTINGS), PoolMarketState()
    workers = [(f"od{i}", OD, 3.0) for i in range(5)]
    picked = []
    for t in range(0, 60, 5):  # a caller asking every 5 s
        got = policy.to_replace(state, workers, 0, 1.0, float(t))
        picked += got
        workers = [w for w in workers if w[0] not in got]
    assert picked == ["od4", "od3", "od2", "od1", "od0"][: len(picked)] and len(picked) == 5


# -- blocking ---------------------------------------------------------------------------------------------


def key(zone: str = "a", market: str = SPOT, gpu: str = "A10", cloud: str = "aws") -> OfferKey:
    return OfferKey(cloud, "us-east-1", f"us-east-1{zone}", "g5.xlarge", gpu, 1, market)  # type: ignore[arg-type]


def test_block_list_expiry_and_reasons():
    b = BlockList()
    k1, k2 = key("a"), key("b")
    b.block(k1, 100.0, "capacity")
    b.block(k2, 200.0, "quota")
    assert b.active(0.0) == {k1, k2}
    assert b.reason(k1) == "capacity" and b.until(k2) == 200.0 and len(b) == 2
    assert b.active(99.9) == {k1, k2}
    assert b.active(100.0) == {k2}  # active while now < until
    assert b.reason(k1) is None and len(b) == 1
    assert b.active(250.0) == frozenset()
    assert b.entries(250.0) == []


@pytest.mark.parametrize(
    "first,second,expected_until,expected_reason",
    [
        ((100.0, "one"), (200.0, "two"), 200.0, "two"),  # a later expiry extends
        ((200.0, "one"), (100.0, "two"), 200.0, "one"),  # an earlier one is ignored
        ((100.0, "one"), (100.0, "two"), 100.0, "one"),
    ],
)
def test_block_twice_keeps_the_later_expiry(first, second, expected_until, expected_reason):
    b, k = BlockList(), key()
    b.block(k, *first)
    b.block(k, *second)
    assert (b.until(k), b.reason(k)) == (expected_until, expected_reason)
    assert k in b.active(expected_until - 1) and k not in b.active(expected_until)


def test_active_set_is_reused_until_something_changes():
    b = BlockList()
    b.block(key("a"), 100.0, "x")
    first = b.active(1.0)
    assert b.active(50.0) is first  # nothing changed: same object, no rebuild
    b.block(key("b"), 300.0, "y")
    second = b.active(51.0)
    assert second is not first and second == {key("a"), key("b")}
    assert b.active(150.0) == {key("b")}
    b.unblock(key("b"))
    assert b.active(151.0) == frozenset()


def test_active_set_works_as_placement_blocked():
    from cloudmodal.gpu import parse_gpu
    from cloudmodal.placement import PlacementPolicy, rank

    cheap = Offer("aws", "us-east-1", "us-east-1a", "g5.xlarge", "A10", 1, 24, 4, 16, 1.0, 0.3, "t", "d")
    dear = Offer("aws", "us-east-1", "us-east-1b", "g5.xlarge", "A10", 1, 24, 4, 16, 1.2, 0.4, "t", "d")
    b = BlockList()
    b.block(cheap.key(SPOT), 300.0, "NoCapacityError")
    got = rank(parse_gpu("A10"), [cheap, dear], policy=PlacementPolicy(spot="require"), blocked=b.active(0.0))
    assert [c.offer.zone for c in got.candidates] == ["us-east-1b"]


OFFERS = [
    Offer("aws", "us-east-1", "us-east-1a", "g5.xlarge", "A10", 1, 24, 4, 16, 1.0, 0.3, "t", "d"),
    Offer("aws", "us-west-2", "us-west-2a", "g5.2xlarge", "A10", 1, 24, 8, 32, 1.2, None, "t", "d"),
    Offer("aws", "us-east-1", "us-east-1a", "g6.xlarge", "L4", 1, 24, 4, 16, 0.8, 0.25, "t", "d"),
    Offer("gcp", "us-east1", "us-east1-b", "n1-standard-8", "A10", 1, 24, 8, 30, 1.1, 0.35, "t", "d"),
]


@pytest.mark.parametrize(
    "market,expected",
    [
        (SPOT, {("us-east-1a", "g5.xlarge", SPOT)}),  # the spot-less west offer and other GPUs/clouds stay
        (OD, {("us-east-1a", "g5.xlarge", OD), ("us-west-2a", "g5.2xlarge", OD)}),
    ],
)
def test_quota_scope_is_cloud_gpu_and_market(market, expected):
    got = quota_scope(OFFERS[0].key(market), OFFERS)
    assert {(k.zone, k.instance_type, k.market) for k in got} == expected


@pytest.mark.parametrize(
    "quota,expected_until,expected_blocked",
    [(False, 1300.0, 1), (True, 2800.0, 2)],
)
def test_block_failed_launch(quota, expected_until, expected_blocked):
    policy, b = MarketPolicy(SETTINGS), BlockList()
    k = OFFERS[0].key(OD)
    until = policy.block_failed_launch(b, k, 1000.0, "why", quota=quota, offers=OFFERS)
    assert until == expected_until
    assert len(b.active(1000.0)) == expected_blocked and b.reason(k) == "why"
    assert b.active(until) == frozenset()


def test_docstring_examples():
    import doctest

    import cloudmodal.server.spot as spot

    assert doctest.testmod(spot).failed == 0


A, B = key("a"), key("b")

OFFER_SCRIPTS = [
    # id, [(t, offer)], expected messages, offers reclaimed after the last step
    ("a storm from one offer blocks it, no fallback", [(0, A), (1, A), (2, A), (3, A)], [None] * 4, {A}),
    ("two offers make it the market's", [(0, A), (1, A), (2, B)], [None, None, "enter"], set()),
    ("an unknown offer counts as another", [(0, A), (1, A), (2, None)], [None, None, "enter"], set()),
    (
        "below the threshold, nothing is reclaimed",
        [(0, A), (1, A), (2, B), (3, B)],
        [None, None, "enter", None],
        set(),
    ),
    ("reclaim ages out of the window", [(0, A), (1, A), (2, A), (700, B)], [None] * 4, set()),
]


@pytest.mark.parametrize(
    "steps,expected,reclaimed", [pytest.param(s, e, r, id=i) for i, s, e, r in OFFER_SCRIPTS]
)
def test_preemptions_by_offer(steps, expected, reclaimed):
    policy, state = MarketPolicy(SETTINGS), PoolMarketState()
    got = []
    for t, offer in steps:
        got.append("enter" if policy.record_preemption(state, float(t), 0, offer) else None)
    assert got == expected
    now = float(steps[-1][0])
    assert {k for k in (A, B) if policy.reclaimed(state, k, now)} == reclaimed
    assert len(state.preempted_offers) == len(state.preemptions)


def test_market_state_survives_its_wire_form():
    """A pool's market history is written to its row and read back by a control plane taking over."""
    import json

    from cloudmodal.pricing.offers import OfferKey
    from cloudmodal.server.spot import PoolMarketState

    key = OfferKey("aws", "us-east-1", "use1-az1", "g5.xlarge", "A10", 1, "spot")
    s = PoolMarketState()
    s.spot_failures.extend([10.0, 12.5])
    s.preemptions.extend([11.0, 13.0])
    s.preempted_offers.extend([key, None])
    s.fallback_since, s.fallback_reason, s.preemption_limit, s.last_probe = 13.0, "preemptions", 3, 20.0
    back = PoolMarketState.from_wire(json.loads(json.dumps(s.to_wire())))
    assert back == s and back.fingerprint() == s.fingerprint() and back.fallen_back
    assert PoolMarketState.from_wire({}) == PoolMarketState()
    back.preemptions.append(30.0)
    assert back.fingerprint() != s.fingerprint()
