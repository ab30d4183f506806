"""The dict and queue service (:mod:`cloudmodal.server.svc_kv`) on a real database (SQLite and PostgreSQL):
atomic queue gets under concurrent getters, the partition-count limit, and retention (:func:`prune`) with an
injected clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from cloudmodal import exception as exc
from cloudmodal.queue import MAX_PARTITIONS
from cloudmodal.server import models_kv as kv
from cloudmodal.server.service import ControlPlane, Settings
from cloudmodal.server.svc_kv import DICT_IDLE_S, DICT_PRUNE_EVERY_S, EPHEMERAL_IDLE_S, KV, QueueFull, prune


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(Settings(database_url=database_url, state_dir=tmp_path))
    try:
        yield plane
    finally:
        plane.db.dispose()


def test_concurrent_gets_take_each_item_exactly_once_in_order(cp: ControlPlane) -> None:
    svc = KV(cp)
    qid = svc.create("queue", None, "test")["id"]
    n = 2000
    for start in range(0, n, 500):
        svc.queue_put(qid, "", [str(i).encode() for i in range(start, start + 500)], 3600)
    got: list[list[int]] = [[] for _ in range(8)]

    def getter(me: int) -> None:
        while True:
            values = svc.queue_get(qid, "", 7)
            if not values:
                if svc.queue_len(qid, "", False) == 0:
                    return
                continue
            got[me].extend(int(v) for v in values)

    threads = [threading.Thread(target=getter, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    everything = sorted(x for g in got for x in g)
    assert everything == list(range(n)), "an item was lost or handed out twice"
    for g in got:
        assert g == sorted(g), "a getter saw items out of order"
    assert svc.queue_len(qid, "", True) == 0


def test_partition_count_limit(cp: ControlPlane) -> None:
    svc = KV(cp)
    qid = svc.create("queue", None, "test")["id"]
    svc.queue_put(qid, "", [b"kept"], 3600)
    # the partitions up to the limit, written directly (creating 100,000 through puts would take minutes)
    far = time.time() + 3600
    rows = [
        {"queue_id": qid, "partition": f"p{i}", "expires_at": far, "items": 0, "bytes": 0}
        for i in range(MAX_PARTITIONS - 1)
    ]
    with cp.db.write() as conn:
        conn.execute(kv.queue_partitions.insert(), rows)
    with pytest.raises(exc.ResourceExhaustedError, match="100,000 partitions"):
        svc.queue_put(qid, "one-too-many", [b"x"], 3600)
    svc.queue_put(qid, "p5", [b"fits"], 3600)  # an existing partition still takes puts
    assert svc.queue_get(qid, "", 10) == [b"kept"] and svc.queue_get(qid, "p5", 10) == [b"fits"]
    with cp.db.read() as conn:
        count = conn.execute(
            select(func.count()).select_from(kv.queue_partitions).where(kv.queue_partitions.c.queue_id == qid)
        ).scalar_one()
    assert count == MAX_PARTITIONS


def test_full_partition_stores_nothing(cp: ControlPlane) -> None:
    svc = KV(cp)
    qid = svc.create("queue", None, "test")["id"]
    svc.queue_put(qid, "", [b"a"] * 4999, 3600)
    with pytest.raises(QueueFull, match="Nothing was stored"):
        svc.queue_put(qid, "", [b"b", b"c"], 3600)
    assert svc.queue_len(qid, "", False) == 4999
    svc.queue_put(qid, "", [b"d"], 3600)
    assert svc.queue_len(qid, "", False) == 5000


def test_prune_removes_idle_ephemeral_expired_partitions_and_idle_entries(cp: ControlPlane) -> None:
    svc = KV(cp)
    now = time.time()
    named_dict = svc.create("dict", "named", "test")["id"]
    ephemeral_dict = svc.create("dict", None, "test")["id"]
    ephemeral_queue = svc.create("queue", None, "test")["id"]
    named_queue = svc.create("queue", "named", "test")["id"]
    svc.dict_put(named_dict, [(b"old", b"1"), (b"fresh", b"2")], skip_if_exists=False)
    svc.dict_put(ephemeral_dict, [(b"k", b"v")], skip_if_exists=False)
    svc.queue_put(named_queue, "short", [b"x", b"y"], 60)
    svc.queue_put(named_queue, "long", [b"z"], 86400)
    svc.queue_put(ephemeral_queue, "", [b"e"], 86400)
    E = kv.dict_entries
    with cp.db.write() as conn:
        conn.execute(
            update(E).where(E.c.key_hash == svc_hash(b"old")).values(updated_at=now - DICT_IDLE_S + 60)
        )  # idle 7 days a minute from now
    assert prune(cp, now) == 0  # nothing is due yet

    later = (
        now + EPHEMERAL_IDLE_S + 120
    )  # past the ephemeral objects' idle limit and the short partition's TTL
    svc.heartbeat("queue", ephemeral_queue)  # a heartbeat now keeps this one... until `later`, 12 minutes on
    removed = prune(cp, later)
    assert removed > 0
    for kind, oid in (("dict", ephemeral_dict), ("queue", ephemeral_queue)):
        with pytest.raises(exc.NotFoundError):
            svc.info(kind, oid)  # type: ignore[arg-type]
    # idle since a minute after `now`, but idle entries were looked for at `now`: not again within the hour
    # (counted, not read: a read refreshes an entry idle for over a day)
    with cp.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(E)).scalar_one() == 2
    assert svc.queue_len(named_queue, "short", False) == 0 and svc.queue_get(named_queue, "long", 5) == [b"z"]
    with cp.db.read() as conn:
        left = conn.execute(select(func.count()).select_from(kv.queue_items)).scalar_one()
        parts = [p for (p,) in conn.execute(select(kv.queue_partitions.c.partition))]
    assert left == 0 and "short" not in parts
    assert prune(cp, later) == 0  # idempotent
    hour_on = now + DICT_PRUNE_EVERY_S
    assert prune(cp, hour_on) == 1  # the idle entry, and nothing else
    assert svc.dict_get(named_dict, [b"old", b"fresh"]) == [None, b"2"]
    assert prune(cp, hour_on + DICT_PRUNE_EVERY_S) == 0


def svc_hash(key: bytes) -> bytes:
    from cloudmodal.server.svc_kv import key_hash

    return key_hash(key)
