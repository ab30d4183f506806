"""Request ids on the dict and queue service (:mod:`cloudmodal.server.svc_kv`), on a real database (SQLite and
PostgreSQL): attempts of one request arriving together, as a retry does when the first attempt is still
running, take and store exactly once; big answers (over the pipelined size) are recorded too."""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmodal import exception as exc
from cloudmodal.server.service import ControlPlane, Settings
from cloudmodal.server.svc_kv import KV

ATTEMPTS = 6


@pytest.fixture
def svc(database_url: str, tmp_path: Path) -> Iterator[KV]:
    plane = ControlPlane(Settings(database_url=database_url, state_dir=tmp_path))
    try:
        yield KV(plane)
    finally:
        plane.db.dispose()


def _together(fn: Callable[[], Any]) -> list[Any]:
    """``fn`` on ATTEMPTS threads released at once; their answers."""
    go = threading.Barrier(ATTEMPTS)
    answers: list[Any] = []

    def attempt() -> None:
        go.wait()
        answers.append(fn())

    threads = [threading.Thread(target=attempt) for _ in range(ATTEMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == ATTEMPTS, "an attempt failed (see its thread's exception above)"
    return answers


def test_racing_attempts_of_one_request_happen_once(svc: KV) -> None:
    qid = svc.create("queue", None, "test")["id"]
    svc.queue_put(qid, "", [str(i).encode() for i in range(300)], 3600)
    for _ in range(20):
        rid = uuid.uuid4().hex
        answers = _together(functools.partial(svc.queue_get, qid, "", 3, request_id=rid))
        assert all(a == answers[0] for a in answers) and len(answers[0]) == 3, answers
        rid = uuid.uuid4().hex
        _together(functools.partial(svc.queue_put, qid, "p", [rid.encode()], 3600, request_id=rid))
    assert svc.queue_len(qid, "", False) == 300 - 20 * 3
    assert svc.queue_len(qid, "p", False) == 20

    did = svc.create("dict", None, "test")["id"]
    svc.dict_put(did, [(f"k{i}".encode(), b"v") for i in range(20)], skip_if_exists=False)
    for i in range(20):
        rid = uuid.uuid4().hex
        pop = functools.partial(svc.dict_pop, did, f"k{i}".encode(), request_id=rid)
        assert _together(pop) == [b"v"] * ATTEMPTS
        rid = uuid.uuid4().hex
        entry = [(f"n{i}".encode(), b"w")]
        put = _together(functools.partial(svc.dict_put, did, entry, skip_if_exists=True, request_id=rid))
        assert put == [1] * ATTEMPTS


def test_a_retry_of_the_get_that_emptied_the_queue_answers_its_values(svc: KV) -> None:
    """The attempt that arrives second finds the partition empty: it must answer the first one's values,
    not an empty get (the answer the client may read is the retry's)."""
    qid = svc.create("queue", None, "test")["id"]
    did = svc.create("dict", None, "test")["id"]
    for _ in range(20):
        svc.queue_put(qid, "", [b"only"], 3600)
        rid = uuid.uuid4().hex
        assert (
            _together(functools.partial(svc.queue_get, qid, "", 5, request_id=rid)) == [[b"only"]] * ATTEMPTS
        )
        svc.dict_put(did, [(b"k", b"v")], skip_if_exists=False)
        rid = uuid.uuid4().hex
        assert _together(functools.partial(svc.dict_pop, did, b"k", request_id=rid)) == [b"v"] * ATTEMPTS


def test_writers_on_many_connections_never_find_the_database_locked(svc: KV) -> None:
    """Eight threads (eight pooled connections) mixing every recorded operation and reads. On SQLite a
    statement left unfinished by one transaction kept its connection's read snapshot open, and that
    connection's next write failed at once with "database is locked" (hundreds of times in this mix before the
    fix)."""
    qid = svc.create("queue", None, "test")["id"]
    did = svc.create("dict", None, "test")["id"]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(60):
            try:
                svc.queue_put(qid, f"p{i}", [b"x"], 3600, request_id=uuid.uuid4().hex)
                svc.queue_get(qid, f"p{(i + 1) % 8}", 2, request_id=uuid.uuid4().hex)
                svc.dict_put(did, [(b"k%d" % i, b"v")], skip_if_exists=True, request_id=uuid.uuid4().hex)
                svc.dict_pop(did, b"k%d" % ((i + 1) % 8), request_id=uuid.uuid4().hex)
                svc.dict_scan(did, "", 10, keys=True, values=True)  # a read between writes, as a server's
            except Exception as e:  # collected: an exception in a thread would not fail the test
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} operations failed, the first: {errors[0]}"


def test_big_answers_are_recorded(svc: KV) -> None:
    """A get of more than the pipelined size (1 MiB) is recorded, and so is a put of it."""
    qid = svc.create("queue", None, "test")["id"]
    mb = b"x" * (1024 * 1024 - 100)
    rid = uuid.uuid4().hex
    svc.queue_put(qid, "", [mb] * 20, 3600, request_id=rid)
    svc.queue_put(qid, "", [mb] * 20, 3600, request_id=rid)
    assert svc.queue_len(qid, "", False) == 20
    rid = uuid.uuid4().hex
    first = svc.queue_get(qid, "", 20, request_id=rid)
    assert len(first) == 20 and svc.queue_get(qid, "", 20, request_id=rid) == first
    assert svc.queue_len(qid, "", False) == 0


def test_an_id_is_for_one_operation(svc: KV) -> None:
    qid = svc.create("queue", None, "test")["id"]
    rid = uuid.uuid4().hex
    svc.queue_put(qid, "", [b"a"], 3600, request_id=rid)
    with pytest.raises(exc.InvalidError, match="already used for a queue.put"):
        svc.queue_get(qid, "", 1, request_id=rid)
    assert svc.queue_len(qid, "", False) == 1  # the refused get took nothing
