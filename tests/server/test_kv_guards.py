"""The pipelined writes of the dict and queue service (:mod:`cloudmodal.server.svc_kv`) on a real database
(SQLite and PostgreSQL): a write sent before the checks it depends on are read must do nothing when they fail
(a missing object, a request answered before, an expired partition), and the opt-in non-durable commit stays
within its own transactions."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.pool import QueuePool

from cloudmodal import exception as exc
from cloudmodal.server import models_kv as kv
from cloudmodal.server.kv_tx import transaction
from cloudmodal.server.service import ControlPlane, Settings
from cloudmodal.server.svc_kv import KV


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(Settings(database_url=database_url, state_dir=tmp_path))
    try:
        yield plane
    finally:
        plane.db.dispose()


def _rows_of(cp: ControlPlane, oid: str) -> dict[str, int]:
    """How many rows of each kv table belong to object ``oid``."""
    columns = {
        "entries": kv.dict_entries.c.dict_id,
        "items": kv.queue_items.c.queue_id,
        "partitions": kv.queue_partitions.c.queue_id,
        "requests": kv.requests.c.object_id,
    }
    with cp.db.read() as conn:
        return {
            name: int(conn.execute(select(func.count()).where(c == oid)).scalar_one())
            for name, c in columns.items()
        }


def test_writes_to_a_missing_object_store_nothing(cp: ControlPlane) -> None:
    svc = KV(cp)
    did = svc.create("dict", None, "test")["id"]
    qid = svc.create("queue", None, "test")["id"]
    many = [(b"k%d" % i, b"v") for i in range(50)]
    svc.dict_put(did, many, skip_if_exists=False)
    svc.queue_put(qid, "", [b"x"] * 50, 3600)
    # control: the same calls on live objects leave rows, so the counts below can tell
    assert _rows_of(cp, did)["entries"] == 50 and _rows_of(cp, qid)["items"] == 50

    svc.delete("dict", did)
    svc.delete("queue", qid)
    calls = [
        lambda: svc.dict_put(did, many, skip_if_exists=False),
        lambda: svc.dict_put(did, many[:1], skip_if_exists=False),
        lambda: svc.dict_put(did, many[:1], skip_if_exists=True, request_id=uuid.uuid4().hex),
        lambda: svc.dict_pop(did, b"k1", request_id=uuid.uuid4().hex),
        lambda: svc.queue_put(qid, "", [b"x"] * 50, 3600, request_id=uuid.uuid4().hex),
        lambda: svc.queue_get(qid, "", 10, request_id=uuid.uuid4().hex),
    ]
    for call in calls:
        with pytest.raises(exc.NotFoundError):
            call()
    assert (
        _rows_of(cp, did) == _rows_of(cp, qid) == {"entries": 0, "items": 0, "partitions": 0, "requests": 0}
    )


def test_a_retried_get_answers_its_values_and_takes_no_more(cp: ControlPlane) -> None:
    svc = KV(cp)
    qid = svc.create("queue", None, "test")["id"]
    svc.queue_put(qid, "", [b"%d" % i for i in range(10)], 3600)
    rid = uuid.uuid4().hex
    first = svc.queue_get(qid, "", 3, request_id=rid)
    assert first == [b"0", b"1", b"2"]
    svc.queue_put(qid, "", [b"new"], 3600)
    assert svc.queue_get(qid, "", 3, request_id=rid) == first
    assert svc.queue_len(qid, "", False) == 8  # 7 left of the 10, and the new one
    assert svc.queue_get(qid, "", 100) == [b"%d" % i for i in range(3, 10)] + [b"new"]  # in order


def test_a_retried_pop_answers_its_value_and_pops_no_more(cp: ControlPlane) -> None:
    svc = KV(cp)
    did = svc.create("dict", None, "test")["id"]
    svc.dict_put(did, [(b"k", b"first")], skip_if_exists=False)
    rid = uuid.uuid4().hex
    assert svc.dict_pop(did, b"k", request_id=rid) == b"first"
    svc.dict_put(did, [(b"k", b"second")], skip_if_exists=False)
    assert svc.dict_pop(did, b"k", request_id=rid) == b"first"
    assert svc.dict_get(did, [b"k"]) == [b"second"]


def test_a_get_takes_nothing_from_an_expired_partition(cp: ControlPlane) -> None:
    svc = KV(cp)
    qid = svc.create("queue", None, "test")["id"]
    svc.queue_put(qid, "old", [b"a", b"b"], 3600)
    svc.queue_put(qid, "live", [b"c"], 3600)
    P = kv.queue_partitions
    with cp.db.write() as conn:  # as if its TTL had passed
        conn.execute(update(P).where(P.c.queue_id == qid, P.c.partition == "old").values(expires_at=0.0))
    assert svc.queue_get(qid, "old", 10) == []
    assert _rows_of(cp, qid)["items"] == 1  # the expired partition was emptied, the live one kept
    assert svc.queue_get(qid, "live", 10) == [b"c"]  # control: a live partition's get takes
    svc.queue_put(qid, "old", [b"d"], 3600)  # the partition lives again, without its expired items
    assert svc.queue_get(qid, "old", 10) == [b"d"]


def test_non_durable_writes_keep_the_setting_to_their_transactions(cp: ControlPlane) -> None:
    svc = KV(cp, durable=False)
    qid = svc.create("queue", None, "test")["id"]
    did = svc.create("dict", None, "test")["id"]
    for i in range(5):
        svc.queue_put(qid, "", [b"%d" % i] * 3, 3600, request_id=uuid.uuid4().hex)
        assert svc.queue_get(qid, "", 3, request_id=uuid.uuid4().hex) == [b"%d" % i] * 3
        svc.dict_put(did, [(b"k", b"%d" % i)], skip_if_exists=False)
    assert svc.dict_get(did, [b"k"]) == [b"4"]
    if cp.db.is_sqlite:
        return
    pool = cp.db.engine.pool
    assert isinstance(pool, QueuePool)
    conns = [cp.db.engine.connect() for _ in range(max(pool.checkedin(), 1))]  # every pooled connection
    try:
        settings = {c.execute(text("SHOW synchronous_commit")).scalar_one() for c in conns}
    finally:
        for c in conns:
            c.close()
    assert settings == {"on"}, "a non-durable kv write left its setting on a pooled connection"


def test_a_non_durable_transaction_commits_without_waiting_for_the_disk(cp: ControlPlane) -> None:
    """``durable=False`` turns PostgreSQL's synchronous_commit off inside the kv transaction (and only there:
    see the test above); the default leaves it on. SQLite has no such setting: its transactions are as
    ever."""
    if cp.db.is_sqlite:
        return
    seen = {}
    for durable in (False, True):
        with cp.db.write() as conn, transaction(cp.db, conn, durable=durable) as tx:
            seen[durable] = tx.run("SHOW synchronous_commit").fetchone()[0]
            tx.commit()
    assert seen == {False: "off", True: "on"}


@pytest.mark.parametrize(
    ("value", "durable"), [(None, True), ("on", True), ("off", False), (" off ", None), ("0", None)]
)
def test_the_synchronous_commit_setting_reaches_the_control_plane(
    value: str | None, durable: bool | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CLOUDMODAL_KV_SYNCHRONOUS_COMMIT`` becomes ``Settings.kv_durable`` (what the kv routes build their
    service with); a value other than on/off is refused with the variable named."""
    from cloudmodal.server.app import default_settings

    monkeypatch.delenv("CLOUDMODAL_KV_SYNCHRONOUS_COMMIT", raising=False)
    if value is not None:
        monkeypatch.setenv("CLOUDMODAL_KV_SYNCHRONOUS_COMMIT", value)
    if durable is None:
        with pytest.raises(exc.InvalidError, match="CLOUDMODAL_KV_SYNCHRONOUS_COMMIT"):
            default_settings(tmp_path, database_url="sqlite://")
        return
    assert default_settings(tmp_path, database_url="sqlite://").kv_durable is durable


def test_deleting_an_object_while_it_is_written_leaves_no_rows(cp: ControlPlane) -> None:
    """Writers race the deletion of their objects: every write lands before the deletion (and is deleted
    with the object) or fails with NotFoundError; none leaves rows behind it."""
    svc = KV(cp)
    errors: list[str] = []

    def writer(i: int, did: str, qid: str, under_way: threading.Event) -> None:
        try:
            # until the deletion shows (bounded by time, not a count: a deleter waiting for SQLite's write
            # lock behind four writers may take many of their rounds to get it)
            deadline = time.monotonic() + 120
            j = -1
            while time.monotonic() < deadline:
                j += 1
                svc.queue_put(qid, f"p{i}", [b"x"] * 20, 3600, request_id=uuid.uuid4().hex)
                svc.queue_get(qid, f"p{i}", 5, request_id=uuid.uuid4().hex)
                svc.dict_put(did, [(b"k%d-%d-%d" % (i, j, n), b"v") for n in range(20)], skip_if_exists=False)
                svc.dict_pop(did, b"k%d-%d-0" % (i, j), request_id=uuid.uuid4().hex)
                if j == 2:
                    under_way.set()
        except exc.NotFoundError:
            return
        except Exception as e:  # collected: an exception in a thread would not fail the test
            errors.append(repr(e))
            return
        errors.append(f"writer {i} never saw its objects deleted")

    for _ in range(3):
        did = svc.create("dict", None, "test")["id"]
        qid = svc.create("queue", None, "test")["id"]
        under_way = threading.Event()
        threads = [threading.Thread(target=writer, args=(i, did, qid, under_way)) for i in range(4)]
        for t in threads:
            t.start()
        assert under_way.wait(60), errors
        svc.delete("dict", did)
        svc.delete("queue", qid)
        for t in threads:
            t.join()
        assert not errors, errors
        assert (
            _rows_of(cp, did)
            == _rows_of(cp, qid)
            == {"entries": 0, "items": 0, "partitions": 0, "requests": 0}
        )
