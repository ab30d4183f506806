"""How a launch walk groups its candidates into rounds (``launcher._next_round`` / ``_try_round``): one at a
time until a capacity failure, then up to ``launch_hedge`` at once, only on providers that allow hedged tries;
every outcome of a round comes back in ranked order, a crash included."""

from __future__ import annotations

import threading
from typing import Any

from cloudmodal.server.launcher import _Choice, _next_round, _try_round


class _Prov:
    def __init__(self, name: str, hedged: bool, fail: set[int] | None = None) -> None:
        self.name = name
        self.hedged_tries = hedged
        self.fail = fail or set()
        self.threads: list[str] = []

    def launch(self, req: Any) -> str:
        self.threads.append(threading.current_thread().name)
        if req in self.fail:
            raise RuntimeError(f"try {req} crashed")
        return f"handle-{req}"


def _choices(*provs: _Prov) -> list[_Choice]:
    return [_Choice(provider=p, tier=None, key=i) for i, p in enumerate(provs)]


def _never(_c: _Choice) -> bool:
    return False


def test_a_round_is_one_candidate_until_widened() -> None:
    cloud = _Prov("aws", True)
    cs = _choices(cloud, cloud, cloud)
    walk = iter(cs)
    held: list[_Choice] = []
    assert _next_round(walk, held, 1, _never) == cs[:1]
    assert _next_round(walk, held, 4, _never) == cs[1:]
    assert _next_round(walk, held, 4, _never) == []


def test_a_provider_without_hedged_tries_runs_alone_and_waits_its_turn() -> None:
    cloud, local = _Prov("aws", True), _Prov("local", False)
    cs = _choices(cloud, local, cloud, cloud)
    walk = iter(cs)
    held: list[_Choice] = []
    assert _next_round(walk, held, 4, _never) == cs[:1]  # local cannot join aws's round: held back
    assert held == [cs[1]]
    assert _next_round(walk, held, 4, _never) == [cs[1]]  # alone
    assert _next_round(walk, held, 4, _never) == cs[2:]


def test_a_held_candidate_blocked_meanwhile_is_dropped() -> None:
    cloud, local = _Prov("aws", True), _Prov("local", False)
    cs = _choices(cloud, local, cloud)
    walk = iter(cs)
    held: list[_Choice] = []
    _next_round(walk, held, 4, _never)
    assert _next_round(walk, held, 4, lambda c: c is cs[1]) == [cs[2]]


def test_a_round_runs_its_tries_at_once_and_reports_each_in_order() -> None:
    cloud = _Prov("aws", True, fail={2})
    cs = _choices(cloud, cloud, cloud)
    out = _try_round(cs, [0, 1, 2])
    assert [c for c, _, _ in out] == cs
    assert [h for _, h, _ in out] == ["handle-0", "handle-1", None]
    assert isinstance(out[2][2], RuntimeError) and out[0][2] is None
    # the first try ran on the walk's own thread, the others on threads of their own
    assert sorted(cloud.threads) == sorted([threading.current_thread().name, "launch-try-1", "launch-try-2"])
