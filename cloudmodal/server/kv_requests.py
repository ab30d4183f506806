"""Request ids of Dict and Queue writes: a request sent again answers its first answer and changes nothing.

The client's transport sends a request again when its connection breaks, including after the control plane
committed it but before the answer arrived. A queue put would then store its values twice and a get (or a dict
pop) lose what it took. So the client gives each such request an id, the same on every retry, and the
transaction that changes the data also records (object, request id) -> its answer in ``kv_request``; a request
whose id is recorded answers the recorded answer and changes nothing.

Each attempt claims the id first (inserts its row with an empty answer, which it fills before committing): a
second attempt arriving while the first still runs waits on that row's key until the first commits (then
answers its record) or rolls back (then goes ahead itself), so attempts of one request run one after the other.
A committed row always holds an answer, so within a transaction "the row's answer is empty" means "this
attempt holds the claim": :func:`claim_guard` makes a write sent before the claim is read (pipelined) do
nothing for an attempt that found a record. Answers that changed nothing (an empty get, a pop of an absent
key) are rolled back with their claim: running such a request again is as good as running it once.

Records are kept ``REQUEST_KEEP_S`` (10 minutes), well past the longest a client keeps retrying one request
(its transport's ``reconnect_timeout``, 120 s by default, plus one request's 75 s read timeout), and pruned by
:func:`prune`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from cloudmodal import exception as exc
from cloudmodal.server import models_kv as kv
from cloudmodal.server.kv_tx import Tx

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

REQUEST_KEEP_S = 600.0  # a request's recorded answer is kept this long (see the module's docstring)
PRUNE_BATCH = 500  # records per pruning transaction
# An answer this big is stored out of line and compressed by PostgreSQL; lz4 (where the server has it) does
# that several times faster than its default pglz (a 75 KB answer: 0.41 -> 0.14 ms)
LZ4_FROM_BYTES = 2000


@dataclass(frozen=True)
class Recorded:
    """A recorded answer (a wrapper, since the answer itself may be None)."""

    answer: Any


@dataclass(frozen=True)
class Claim:
    """A claim sent with :func:`send_claim`, read with :func:`recorded`."""

    oid: str
    rid: str
    op: str
    inserted: Any  # the claim's cursor: a row when this attempt made the request's row


def send_claim(tx: Tx, oid: str, rid: str | None, op: str, now: float) -> Claim | None:
    """Send the claim of request id ``rid`` (its row, answer still empty); read it with :func:`recorded`.
    The claim waits while another attempt of the request holds it."""
    if rid is None:
        return None
    inserted = tx.run(
        "INSERT INTO kv_request (object_id, request_id, op, result, created_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (object_id, request_id) DO NOTHING RETURNING object_id",
        (oid, rid, op, b"", now),
    )
    return Claim(oid, rid, op, inserted)


def claim_guard(claim: Claim | None) -> tuple[str, tuple[Any, ...]]:
    """A condition (`` AND ...``, and its parameters) for a write sent after :func:`send_claim` and before
    :func:`recorded`: true only while this attempt holds the claim (empty without a request id)."""
    if claim is None:
        return "", ()
    return (
        " AND EXISTS (SELECT 1 FROM kv_request WHERE object_id = ? AND request_id = ? AND result = ?)",
        (claim.oid, claim.rid, b""),
    )


def recorded(tx: Tx, claim: Claim | None) -> Recorded | None:
    """The answer another attempt of the request recorded, if any; else this one holds the claim."""
    if claim is None:
        return None
    if claim.inserted.fetchone() is not None:
        tx.claimed = True
        return None
    # only a retry gets here (one more round trip). A statement after the claim: on PostgreSQL a new snapshot,
    # which sees the row of an attempt the claim waited for.
    row = tx.run(
        "SELECT op, result FROM kv_request WHERE object_id = ? AND request_id = ?", (claim.oid, claim.rid)
    ).fetchone()
    assert row is not None  # the claim collided with a committed row
    if row[0] != claim.op:
        raise exc.InvalidError(
            f"Request id {claim.rid} was already used for a {row[0]} of {claim.oid}, not this {claim.op}: every "
            "request needs an id of its own (the client makes one per call)."
        )
    return Recorded(msgpack.unpackb(row[1], raw=False))


def record(tx: Tx, claim: Claim | None, answer: Any) -> None:
    """In the transaction that made ``answer``: fill the request's claimed row with it."""
    if claim is None:
        return
    result = msgpack.packb(answer, use_bin_type=True)
    if tx.lz4 and len(result) >= LZ4_FROM_BYTES:
        tx.run("SELECT set_config('default_toast_compression', 'lz4', true)")  # this transaction only
    tx.run(
        "UPDATE kv_request SET result = ? WHERE object_id = ? AND request_id = ?",
        (result, claim.oid, claim.rid),
        size=len(result),
    )
    tx.recorded = True


def prune(cp: ControlPlane, now: float) -> int:
    """Forget recorded answers older than REQUEST_KEEP_S, PRUNE_BATCH at a time; returns how many."""
    R_ = kv.requests
    removed = 0
    while True:
        with cp.db.read() as conn:
            old = conn.execute(
                select(R_.c.object_id, R_.c.request_id)
                .where(R_.c.created_at < now - REQUEST_KEEP_S)
                .limit(PRUNE_BATCH)
            ).all()
        if not old:
            return removed
        by_object: dict[str, list[str]] = {}
        for oid, rid in old:
            by_object.setdefault(oid, []).append(rid)
        with cp.db.write() as conn:
            got = _drop(conn, by_object)
        removed += got
        if got == 0 or len(old) < PRUNE_BATCH:
            return removed


def _drop(conn: Connection, by_object: dict[str, list[str]]) -> int:
    R_ = kv.requests
    return sum(
        int(conn.execute(delete(R_).where(R_.c.object_id == oid, R_.c.request_id.in_(rids))).rowcount)
        for oid, rids in by_object.items()
    )


__all__ = ["REQUEST_KEEP_S", "Claim", "Recorded", "claim_guard", "prune", "record", "recorded", "send_claim"]
