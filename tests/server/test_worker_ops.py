"""ControlPlane.worker_ops: many workers' outputs, claims and heartbeats in one transaction, on both databases
(SQLite: plain SQL per row; PostgreSQL: one statement with arrays per kind of work), and through the group
commit from many threads at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from support import bare_plane, function_with_workers

from cloudmodal.server.queue import OutputItem
from cloudmodal.server.service import ControlPlane, WorkerOp
from cloudmodal.server.states import InputState, OutputStatus

LEASE_S = 30.0


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    with bare_plane(tmp_path, database_url, "ap-w", lease_s=LEASE_S) as plane:
        yield plane


def _function(cp: ControlPlane, name: str, workers: list[str]) -> str:
    return function_with_workers(cp, "ap-w", name, workers)


def _call(cp: ControlPlane, call_id: str, fid: str, n: int) -> None:
    cp.calls.create_call(call_id, fid, "map", [(i, None, b"x%d" % i, None) for i in range(n)])


def _inputs(cp: ControlPlane) -> dict[int, tuple[str, int, str | None, float]]:
    """input id -> (call id, state, worker id, lease expires)"""
    with cp.db.read() as conn:
        rows = conn.execute(
            text('SELECT id, call_id, state, worker_id, lease_expires FROM "input" ORDER BY id')
        ).all()
    return {r[0]: (r[1], int(r[2]), r[3], float(r[4])) for r in rows}


def _outputs(cp: ControlPlane) -> list[tuple[int, str, bytes]]:
    with cp.db.read() as conn:
        rows = conn.execute(text('SELECT input_id, status, data FROM "output" ORDER BY id')).all()
    return [(r[0], r[1], bytes(r[2])) for r in rows]


def _ids(rows: list[Any]) -> list[int]:
    return [r.input_id for r in rows]


def test_claims_in_one_batch_are_disjoint_oldest_first_in_takers_order(cp: ControlPlane) -> None:
    fid = _function(cp, "f", ["wk-a", "wk-b", "wk-c", "wk-d"])
    other = _function(cp, "g", ["wk-g"])
    _call(cp, "ca-1", fid, 5)
    _call(cp, "ca-2", other, 1)
    ids = sorted(_inputs(cp))
    f_ids = [i for i in ids if _inputs(cp)[i][0] == "ca-1"]
    (g_id,) = [i for i in ids if _inputs(cp)[i][0] == "ca-2"]
    ops = [
        WorkerOp("wk-a", claim=(fid, 2)),
        WorkerOp("wk-g", claim=(other, 3)),  # another function in the same batch
        WorkerOp("wk-b", claim=(fid, 2)),
        WorkerOp("wk-c", claim=(fid, 2)),
        WorkerOp("wk-d", claim=(fid, 2)),  # nothing left for it
    ]
    before = cp.claim_reads
    res = cp.worker_ops(ops)
    assert [_ids(r.claimed) for r in res] == [f_ids[0:2], [g_id], f_ids[2:4], f_ids[4:5], []]
    assert all(r.beat is None for r in res)
    a0 = res[0].claimed[0]
    assert (a0.call_id, a0.idx, a0.method, a0.args, a0.args_blob, a0.attempt) == (
        "ca-1",
        0,
        None,
        b"x0",
        None,
        0,
    )
    assert [c.idx for r in res for c in r.claimed if c.call_id == "ca-1"] == [0, 1, 2, 3, 4]
    assert [c.args for c in res[3].claimed] == [b"x4"]
    assert cp.claim_reads - before == 5
    # the database says the same: each claimed by its taker, with a lease
    rows = _inputs(cp)
    holder = {"wk-a": f_ids[0:2], "wk-b": f_ids[2:4], "wk-c": f_ids[4:5], "wk-g": [g_id]}
    for wid, held in holder.items():
        for iid in held:
            _, state, worker, lease = rows[iid]
            assert (state, worker) == (InputState.CLAIMED, wid)
            assert lease > 0.0
    leases = {rows[i][3] for i in ids}
    assert len(leases) == 1  # one lease for the whole batch: now + lease_s
    # served: one claim of each function found fewer than asked, so both are marked empty
    assert not cp.claim_may_find(fid)
    assert not cp.claim_may_find(other)


def test_a_worker_named_twice_in_one_batch_gets_its_inputs_once(cp: ControlPlane) -> None:
    fid = _function(cp, "f", ["wk-a"])
    _call(cp, "ca-1", fid, 3)
    res = cp.worker_ops([WorkerOp("wk-a", claim=(fid, 2)), WorkerOp("wk-a", claim=(fid, 2))])
    got = _ids(res[0].claimed) + _ids(res[1].claimed)
    assert sorted(got) == sorted(_inputs(cp))  # all three, none twice
    assert len(set(got)) == 3
    assert all(r[2] == "wk-a" for r in _inputs(cp).values())


def test_the_empty_mark_follows_the_last_batch_that_found_too_few(cp: ControlPlane) -> None:
    fid = _function(cp, "f", ["wk-a", "wk-b"])
    assert cp.claim_may_find(fid)  # never claimed: look
    _call(cp, "ca-1", fid, 5)
    res = cp.worker_ops([WorkerOp("wk-a", claim=(fid, 2)), WorkerOp("wk-b", claim=(fid, 2))])
    assert [len(r.claimed) for r in res] == [2, 2]
    assert cp.claim_may_find(fid)  # fully served: there may be more
    (one,) = cp.worker_ops([WorkerOp("wk-a", claim=(fid, 3))])
    assert len(one.claimed) == 1
    assert not cp.claim_may_find(fid)  # fewer than asked (though not none): empty
    assert cp.claim_may_find(fid, within_s=-1.0)  # the mark is only trusted for a moment
    _call(cp, "ca-2", fid, 1)  # inputs arrived: look again at once
    assert cp.claim_may_find(fid)
    (last,) = cp.worker_ops([WorkerOp("wk-b", claim=(fid, 1))])
    assert len(last.claimed) == 1
    assert cp.claim_may_find(fid)
    (none,) = cp.worker_ops([WorkerOp("wk-b", claim=(fid, 1))])
    assert none.claimed == []
    assert not cp.claim_may_find(fid)


def test_a_worker_claiming_twice_in_one_batch_gets_each_claim_up_to_its_own_n(cp: ControlPlane) -> None:
    # a request still in flight from before a reconnect can meet the next one in a batch: a worker that asked
    # for one input (a single-use worker, say) must not be handed the other request's inputs too
    fid = _function(cp, "f", ["wk-a"])
    _call(cp, "ca-1", fid, 6)
    res = cp.worker_ops([WorkerOp("wk-a", claim=(fid, 1)), WorkerOp("wk-a", claim=(fid, 5))])
    first, second = (_ids(r.claimed) for r in res)
    assert len(first) == 1 and len(second) == 5
    assert first[0] < min(second)  # in order: the first request gets the oldest


def test_a_claim_served_in_full_clears_the_empty_mark(cp: ControlPlane) -> None:
    fid = _function(cp, "f", ["wk-a"])
    _call(cp, "ca-1", fid, 1)
    (short,) = cp.worker_ops([WorkerOp("wk-a", claim=(fid, 2))])
    assert len(short.claimed) == 1 and not cp.claim_may_find(fid)
    # inputs that arrive unannounced (another control plane wrote them): a claim that finds them says so
    cp.queue.put("ca-1", fid, [(i, None, b"y", None) for i in range(1, 4)])
    (full,) = cp.worker_ops([WorkerOp("wk-a", claim=(fid, 2))])
    assert len(full.claimed) == 2
    assert cp.claim_may_find(fid)


def test_inputs_announced_while_an_empty_claim_commits_are_not_hidden(cp: ControlPlane) -> None:
    # the empty mark is set after the claim's transaction; an arrival announced in between must still make
    # the next claim look (else a parked worker waits for the periodic re-read)
    fid = _function(cp, "f", ["wk-a"])
    claim_in = cp.queue.claim_in

    def claim_then_an_arrival(*args: Any, **kw: Any) -> Any:
        got = claim_in(*args, **kw)
        cp.inputs_pending(fid)  # another thread's call committed and announced its inputs meanwhile
        return got

    cp.queue.claim_in = claim_then_an_arrival  # type: ignore[method-assign]
    (empty,) = cp.worker_ops([WorkerOp("wk-a", claim=(fid, 1))])
    assert empty.claimed == []
    assert cp.claim_may_find(fid)


def test_only_the_holder_s_outputs_are_recorded_in_a_batch(cp: ControlPlane) -> None:
    fid = _function(cp, "f", ["wk-a", "wk-b"])
    _call(cp, "ca-1", fid, 3)
    a = _ids(cp.claim("wk-a", fid, 2))
    b = _ids(cp.claim("wk-b", fid, 1))
    ok = OutputStatus.SUCCESS
    res = cp.worker_ops(
        [
            WorkerOp("wk-b", outputs=[OutputItem(a[0], ok, b"forged-0")]),  # before the holder's answer
            WorkerOp("wk-a", outputs=[OutputItem(a[0], ok, b"a-0")]),
            WorkerOp("wk-b", outputs=[OutputItem(a[1], ok, b"forged-1"), OutputItem(b[0], ok, b"b-0")]),
            WorkerOp("wk-a", outputs=[OutputItem(a[0], ok, b"a-0-again")]),  # a duplicate delivery
            WorkerOp("wk-x", outputs=[OutputItem(b[0], ok, b"unknown")]),  # no such worker
        ]
    )
    assert [(r.claimed, r.beat) for r in res] == [([], None)] * 5
    assert _outputs(cp) == [(a[0], "success", b"a-0"), (b[0], "success", b"b-0")]
    rows = _inputs(cp)
    assert (rows[a[0]][1], rows[b[0]][1]) == (InputState.DONE, InputState.DONE)
    assert rows[a[1]][1:3] == (InputState.CLAIMED, "wk-a")  # the forgery changed nothing


def test_outputs_are_recorded_before_the_claims_of_the_same_batch(cp: ControlPlane) -> None:
    """One op's outputs and claim together (a long-poll carrying what it finished): the output counts even
    though the same op claims more, and another worker's claim in the batch does not take the answered input."""
    fid = _function(cp, "f", ["wk-a", "wk-b"])
    _call(cp, "ca-1", fid, 3)
    (first,) = _ids(cp.claim("wk-a", fid, 1))
    res = cp.worker_ops(
        [
            WorkerOp("wk-a", outputs=[OutputItem(first, OutputStatus.SUCCESS, b"y")], claim=(fid, 1)),
            WorkerOp("wk-b", claim=(fid, 5)),
        ]
    )
    rest = [i for i in sorted(_inputs(cp)) if i != first]
    assert [_ids(r.claimed) for r in res] == [rest[:1], rest[1:]]
    assert _outputs(cp) == [(first, "success", b"y")]


def test_heartbeats_in_a_batch_renew_only_the_beating_worker_s_leases(cp: ControlPlane) -> None:
    fid = _function(cp, "f", ["wk-a", "wk-b", "wk-c"])
    _call(cp, "ca-1", fid, 6)
    a = _ids(cp.claim("wk-a", fid, 2))
    b = _ids(cp.claim("wk-b", fid, 1))
    c = _ids(cp.claim("wk-c", fid, 1))
    # claimed under an id no worker row has (say, one deleted since): its heartbeat renews nothing
    ghost = _ids(cp.claim("wk-ghost", fid, 1))
    (pending,) = [i for i, r in _inputs(cp).items() if r[1] == InputState.PENDING]
    cp.workers.drain_worker("wk-c", "test")
    cp.workers.request_cancel([(a[1], "wk-a")])
    with cp.db.write() as conn:  # leases at a known value: a renewed one is far past it
        conn.execute(text('UPDATE "input" SET lease_expires = 5.0'))
        conn.execute(text("UPDATE worker SET in_flight = 0, idle_since = NULL, last_heartbeat = 1.0"))
    res = cp.worker_ops(
        [
            # wk-a says it holds b's input too, and a pending one: neither is its to renew
            WorkerOp("wk-a", beat=(2, False, [a[0], a[1], b[0], pending], 2, 3.0)),
            WorkerOp("wk-ghost", beat=(1, False, [*ghost, b[0]], 0, 0.0)),  # unknown: renews nothing
            WorkerOp("wk-c", beat=(1, True, c, 0, 0.0)),  # draining: finishes (and renews) what it holds
        ]
    )
    assert [r.claimed for r in res] == [[], [], []]
    assert res[0].beat == {"drain": False, "cancel": [a[1]]}
    assert res[1].beat == {"drain": True, "cancel": []}
    assert res[2].beat == {"drain": True, "cancel": []}
    rows = _inputs(cp)
    renewed = {i for i, r in rows.items() if r[3] > 5.0}
    assert renewed == {a[0], a[1], c[0]}
    assert rows[b[0]][3] == 5.0 and rows[pending][3] == 5.0 and rows[ghost[0]][3] == 5.0
    assert all(rows[i][3] > 1e9 for i in renewed)  # now + lease_s
    # the heartbeats themselves: in flight, idle since, and what was served feeds the service estimate
    with cp.db.read() as conn:
        workers = {
            r[0]: (r[1], r[2], float(r[3]))
            for r in conn.execute(text("SELECT id, in_flight, idle_since, last_heartbeat FROM worker")).all()
        }
    assert workers["wk-a"][:2] == (2, None) and workers["wk-a"][2] > 1.0
    assert workers["wk-b"] == (0, None, 1.0)  # did not beat
    assert workers["wk-c"][0] == 1 and workers["wk-c"][1] is not None
    assert cp.workers.service_time_estimate(fid) == pytest.approx(1.5)
    # cancel requests are answered once
    (again,) = cp.worker_ops([WorkerOp("wk-a", beat=(2, False, a, 0, 0.0))])
    assert again.beat == {"drain": False, "cancel": []}


def test_an_idle_heartbeat_keeps_the_first_idle_time(cp: ControlPlane) -> None:
    fid = _function(cp, "f", ["wk-a"])
    del fid
    cp.worker_ops([WorkerOp("wk-a", beat=(0, True, [], 0, 0.0))])
    with cp.db.write() as conn:
        conn.execute(text("UPDATE worker SET idle_since = 7.0"))
    cp.worker_ops([WorkerOp("wk-a", beat=(0, True, [], 0, 0.0))])
    with cp.db.read() as conn:
        assert float(conn.execute(text("SELECT idle_since FROM worker")).scalar_one()) == 7.0
    cp.worker_ops([WorkerOp("wk-a", beat=(1, False, [], 0, 0.0))])
    with cp.db.read() as conn:
        assert conn.execute(text("SELECT idle_since FROM worker")).scalar_one() is None


def test_many_threads_through_the_group_commit_claim_and_answer_each_input_once(cp: ControlPlane) -> None:
    threads_n, rounds = 8, 25
    workers = [f"wk-{t}" for t in range(threads_n)]
    fid = _function(cp, "f", workers)
    for k in range(4):
        _call(cp, f"ca-{k}", fid, threads_n * rounds // 4)
    claimed: dict[str, list[int]] = {w: [] for w in workers}
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def worker(wid: str) -> None:
        try:
            start.wait()
            held: list[int] = []
            for _ in range(rounds):
                outs = [OutputItem(i, OutputStatus.SUCCESS, wid.encode()) for i in held]
                res = cp.commits.submit(WorkerOp(wid, outputs=outs, claim=(fid, 1))).result(30)
                held = _ids(res.claimed)
                claimed[wid].extend(held)
            outs = [OutputItem(i, OutputStatus.SUCCESS, wid.encode()) for i in held]
            cp.commits.submit(WorkerOp(wid, outputs=outs)).result(30)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(w,)) for w in workers]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in ts)
    every = sorted(_inputs(cp))
    assert len(every) == threads_n * rounds
    # one writer: every claim of one found exactly one input, and no input went to two claims
    assert all(len(v) == rounds for v in claimed.values())
    assert sorted(i for v in claimed.values() for i in v) == every
    rows = _inputs(cp)
    assert all(r[1] == InputState.DONE for r in rows.values())
    outs = _outputs(cp)
    assert sorted(o[0] for o in outs) == every  # each recorded exactly once
    by_worker = {i: w for w, v in claimed.items() for i in v}
    assert all(data == by_worker[iid].encode() for iid, _, data in outs)  # by the worker that held it
    assert all(rows[i][2] == w for i, w in by_worker.items())
    assert cp.commits.ops == threads_n * (rounds + 1)
