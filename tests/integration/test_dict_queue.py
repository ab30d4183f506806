"""Dict and Queue end to end: a real control plane (SQLite and PostgreSQL), real HTTP, real worker processes.

Modal's semantics (get/put/pop/update/iteration, FIFO partitions, blocking gets and puts), eight workers at
once (no lost update, each queue item consumed exactly once, FIFO per partition), every limit's error with
nothing already stored lost, ephemeral objects, access, and contents surviving a control-plane restart."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import kv_app
import pytest
from support import client_env, start_server, use_server

from cloudmodal import exception as exc
from cloudmodal.client.session import run_app
from cloudmodal.dict import Dict
from cloudmodal.queue import MAX_PARTITION_ITEMS, Queue
from cloudmodal.server.app import ServerHandle


@pytest.fixture(scope="module", autouse=True)
def room_for_eight_workers() -> Iterator[None]:
    """This machine's local worker budget (2 x its cores by default) may be under eight: the control plane
    of this module (started after this fixture) may run as many workers as the concurrency test needs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOUDMODAL_LOCAL_MAX_WORKERS", str(kv_app.WORKERS + 2))
        yield


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- Dict -------------------------------------------------------------------------------------------------------
def test_dict_semantics(control_plane: ServerHandle) -> None:
    name = _name("d")
    with pytest.raises(exc.NotFoundError, match="create_if_missing=True"):
        Dict.from_name(name).get("x")
    d = Dict.from_name(name, create_if_missing=True)
    d["a"] = {"nested": [1, 2]}
    assert d["a"] == {"nested": [1, 2]} and d.get("missing") is None and d.get("missing", 5) == 5
    with pytest.raises(KeyError):
        _ = d["missing"]
    assert d.put("b", 1, skip_if_exists=True) is True
    assert d.put("b", 2, skip_if_exists=True) is False and d["b"] == 1
    assert d.put("b", 3) is True and d["b"] == 3
    assert "b" in d and d.contains("a") and "zz" not in d
    d.update({("t", 1): b"bytes", 7: None}, kw=1.5)
    assert d[("t", 1)] == b"bytes" and d[7] is None and 7 in d and d["kw"] == 1.5
    assert d.pop("kw") == 1.5 and d.pop("kw", "gone") == "gone"
    with pytest.raises(KeyError):
        d.pop("kw")
    del d["b"]
    assert "b" not in d
    assert d.len() == 3
    assert sorted(map(repr, d.keys())) == sorted(map(repr, ["a", ("t", 1), 7]))
    assert dict(d.items())[7] is None and len(list(d.values())) == 3
    # Paged iteration: more entries than a page.
    d.update({f"k{i}": i for i in range(2500)})
    assert d.len() == 2503 and sum(1 for _ in d.keys()) == 2503
    assert {k: v for k, v in d.items() if isinstance(k, str) and k.startswith("k")} == {
        f"k{i}": i for i in range(2500)
    }
    d.clear()
    assert d.len() == 0 and list(d.items()) == []

    # Another handle to the same name, and one by id, see the same entries; info() names it.
    d["x"] = 1
    assert Dict.from_name(name)["x"] == 1 and Dict.from_id(d.object_id)["x"] == 1
    info = d.info()
    assert info.name == name and info.created_by

    async def aio() -> None:
        assert await d.put.aio("y", 2) is True
        assert await d.get.aio("y") == 2 and await d.contains.aio("y") and await d.len.aio() == 2
        assert sorted([k async for k in d.keys.aio()]) == ["x", "y"]
        assert await d.pop.aio("y") == 2

    asyncio.run(aio())


def test_dict_objects_and_ephemeral(control_plane: ServerHandle) -> None:
    name = _name("objs")
    Dict.objects.create(name)
    with pytest.raises(exc.AlreadyExistsError, match="allow_existing=True"):
        Dict.objects.create(name)
    Dict.objects.create(name, allow_existing=True)
    assert name in [o.name for o in Dict.objects.list()]
    Dict.from_name(name)["k"] = 1
    Dict.objects.delete(name)
    assert name not in [o.name for o in Dict.objects.list()]
    with pytest.raises(exc.NotFoundError):
        Dict.objects.delete(name)
    Dict.objects.delete(name, allow_missing=True)

    with Dict.ephemeral() as e:
        e["k"] = "v"
        eid = e.object_id
        assert Dict.from_id(eid)["k"] == "v"
    with pytest.raises(exc.NotFoundError, match="does not exist"):
        Dict.from_id(eid).get("k")

    async def aio() -> None:
        async with Queue.ephemeral() as q:
            await q.put.aio(1)
            assert await q.get.aio() == 1

    asyncio.run(aio())


# -- Queue ------------------------------------------------------------------------------------------------------
def test_queue_semantics(control_plane: ServerHandle) -> None:
    q = Queue.from_name(_name("q"), create_if_missing=True)
    q.put_many(list(range(1000)))
    q.put("a", partition="p1")
    q.put_many(["b", "c"], partition="p1")
    assert q.len() == 1000 and q.len(partition="p1") == 3 and q.len(total=True) == 1003
    assert (
        list(q.iterate(partition="p1")) == ["a", "b", "c"] and q.len(partition="p1") == 3
    )  # non-destructive
    got: list[int] = []
    while len(got) < 1000:
        got += q.get_many(300)
    assert got == list(range(1000))  # FIFO
    assert q.get(block=False) is None and q.get_many(5, block=False) == []
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    with pytest.raises(queue.Empty):
        q.get_many(3, timeout=0.2)
    assert q.get(partition="p1") == "a"
    q.clear(partition="p1")
    assert q.len(partition="p1") == 0
    q.put_many([1, 2], partition="x")
    q.put(3)
    q.clear(all=True)
    assert q.len(total=True) == 0
    with pytest.raises(exc.InvalidError, match="1 to 64 characters"):
        q.put(1, partition="x" * 65)
    with pytest.raises(exc.InvalidError, match="1 to 64 characters"):
        q.get(partition="")
    with pytest.raises(exc.InvalidError, match="partition_ttl"):
        q.put(1, partition_ttl=0)

    # A blocking get is woken by a put (from another thread, through the control plane).
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(q.get(timeout=60)))
    t.start()
    _wait_for(lambda: t.is_alive(), "the getter to start")
    q.put("wake")
    t.join(60)
    assert out == ["wake"]

    # iterate() with item_poll_timeout sees an item put while it waits.
    q.put(1, partition="it")
    seen: list[object] = []

    def consume() -> None:
        for item in q.iterate(partition="it", item_poll_timeout=15):  # a wait far longer than the put's
            seen.append(item)
            if item == 2:
                return

    it = threading.Thread(target=consume)
    it.start()
    _wait_for(lambda: seen == [1], "iterate to yield the first item")
    q.put(2, partition="it")
    _wait_for(lambda: seen == [1, 2], "iterate to yield the item put while it waited")
    # and iterate ends once nothing comes within item_poll_timeout
    assert list(q.iterate(partition="nothing", item_poll_timeout=0.5)) == []

    async def aio() -> None:
        await q.put_many.aio([1, 2, 3], partition="aio")
        assert await q.get_many.aio(2, partition="aio") == [1, 2]
        assert [v async for v in q.iterate.aio(partition="aio")] == [3]
        assert await q.len.aio(partition="aio") == 1
        await q.clear.aio(partition="aio")

    asyncio.run(aio())
    it.join(60)
    assert not it.is_alive()


def test_queue_full_partition_blocks_then_fits(control_plane: ServerHandle) -> None:
    q = Queue.from_name(_name("full"), create_if_missing=True)
    q.put_many(list(range(MAX_PARTITION_ITEMS)))
    with pytest.raises(queue.Full, match="5,000 items"):
        q.put("x", block=False)
    with pytest.raises(queue.Full, match="Nothing was stored"):
        q.put_many(["x", "y"], timeout=0.3)
    assert q.len() == MAX_PARTITION_ITEMS
    # A blocked put fits once a consumer makes room.
    done = threading.Event()

    def producer() -> None:
        q.put("last", timeout=60)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert q.get() == 0
    t.join(60)
    assert done.is_set() and q.len() == MAX_PARTITION_ITEMS
    got: list[object] = []
    while len(got) < MAX_PARTITION_ITEMS:
        got += q.get_many(MAX_PARTITION_ITEMS)
    assert got == list(range(1, MAX_PARTITION_ITEMS)) + ["last"]


# -- limits ----------------------------------------------------------------------------------------------------
def test_every_limit_errors_clearly_and_loses_nothing(control_plane: ServerHandle) -> None:
    d = Dict.from_name(_name("lim"), create_if_missing=True)
    d.update({"keep": "me", "n": 1})
    with pytest.raises(exc.RequestSizeError, match="over the limit of 65,536"):
        d.put("k" * 70_000, 1)
    with pytest.raises(exc.RequestSizeError, match=r"8 MiB\). Store large data in a Volume"):
        d["big"] = b"x" * (9 * 1024 * 1024)
    with pytest.raises(exc.RequestSizeError, match="Split it into several smaller updates"):
        d.update({f"v{i}": b"x" * (7 * 1024 * 1024) for i in range(5)})
    assert d.len() == 2 and d["keep"] == "me" and "big" not in d and "v0" not in d

    q = Queue.from_name(_name("lim"), create_if_missing=True)
    q.put_many(["a", "b"])
    with pytest.raises(exc.RequestSizeError, match=r"1 MiB\)"):
        q.put(b"x" * (1024 * 1024 + 1))
    with pytest.raises(exc.RequestSizeError, match=r"1 MiB\)"):
        q.put_many(["c", b"x" * (1024 * 1024 + 1)])
    with pytest.raises(exc.InvalidError, match="at most 5,000 items"):
        q.put_many(list(range(MAX_PARTITION_ITEMS + 1)))
    # 64 MiB per partition: 63 items of ~1 MiB fit, the next batch does not (and stores nothing)
    mb = b"x" * (1024 * 1024 - 100)
    q.put_many([mb] * 63, partition="bytes")
    with pytest.raises(queue.Full, match="64 MiB"):
        q.put_many(["small", mb, mb], partition="bytes", block=False)
    assert q.len(partition="bytes") == 63
    assert q.get_many(10) == ["a", "b"]  # the default partition kept its items through all of it
    q.clear(all=True)


# -- access -----------------------------------------------------------------------------------------------------
def test_app_scoped_member_is_refused(control_plane: ServerHandle) -> None:
    d = Dict.from_name(_name("acc"), create_if_missing=True)
    d["x"] = 1
    did = d.object_id
    scoped = control_plane.cp.tokens.create("member:some-app", "scoped")
    member = control_plane.cp.tokens.create("member", "member")
    with client_env(control_plane.url, scoped):
        with pytest.raises(exc.AuthError, match="may not use dicts or queues"):
            Dict.from_id(did).get("x")
        with pytest.raises(exc.AuthError, match="may not"):
            Queue.from_name(_name("q"), create_if_missing=True).put(1)
    with client_env(control_plane.url, member):
        assert Dict.from_id(did)["x"] == 1  # an unscoped member reads it
    with use_server(control_plane):
        assert Dict.from_id(did)["x"] == 1


# -- eight workers at once -------------------------------------------------------------------------------------
def test_eight_concurrent_workers(control_plane: ServerHandle) -> None:
    dname, qname = _name("hammer"), _name("hammer")
    d = Dict.from_name(dname, create_if_missing=True)
    q = Queue.from_name(qname, create_if_missing=True)
    d.hydrate()
    q.hydrate()
    n = kv_app.WORKERS
    with run_app(kv_app.app, show_logs=False):
        results = list(kv_app.hammer.map([(dname, qname, i) for i in range(n)]))
    assert len({r["pid"] for r in results}) == n, (
        "each worker should run in a process of its own, all at once"
    )
    # No lost update: every worker's distinct keys are there with their values.
    for i in range(n):
        for j in range(kv_app.KEYS):
            assert d[f"w{i}-{j}"] == (i, j)
    # skip_if_exists races: exactly one winner per key, and the stored value is the winner's.
    for r in range(kv_app.RACES):
        winners = [res["worker"] for res in results if r in res["won"]]
        assert len(winners) == 1, (r, winners)
        assert d[f"race-{r}"] == winners[0]
    # Every item consumed exactly once, and, per consumer, in the order its producer put them (FIFO).
    consumed = [c for res in results for c in res["consumed"]]
    expected = {("", i, j) for i in range(n) for j in range(kv_app.ITEMS)} | {
        (f"p{i}", i, j) for i in range(n) for j in range(kv_app.ITEMS)
    }
    assert len(consumed) == len(expected) and set(consumed) == expected
    for res in results:
        last: dict[tuple[str, int], int] = {}
        for part, producer, seq in res["consumed"]:
            assert seq > last.get((part, producer), -1), "a consumer got a partition's items out of order"
            last[part, producer] = seq
    assert q.len(total=True) == 0
    d.clear()


def test_handles_travel_to_workers(control_plane: ServerHandle) -> None:
    d = Dict.from_name(_name("travel"), create_if_missing=True)
    q = Queue.from_name(_name("travel"), create_if_missing=True)
    q.put("request")
    with run_app(kv_app.app, show_logs=False):
        assert kv_app.through_handles.remote(d, q) == 42
    assert d["from-worker"] == "request" and q.get(timeout=10) == "reply"


# -- restart ----------------------------------------------------------------------------------------------------
def test_contents_survive_a_restart(database_url: str, tmp_path: Path) -> None:
    shared = {"blob_dir": tmp_path / "blobs"}
    first = start_server(tmp_path / "a", database_url, **shared)
    try:
        with use_server(first):
            d = Dict.from_name("kept", create_if_missing=True)
            d.update({"a": 1, ("t", 2): [3]})
            q = Queue.from_name("kept", create_if_missing=True)
            q.put_many([1, 2, 3])
            q.put("p", partition="part")
    finally:
        first.stop()
    second = start_server(tmp_path / "b", database_url, **shared)
    try:
        with use_server(second):
            d = Dict.from_name("kept")
            assert d["a"] == 1 and d[("t", 2)] == [3] and d.len() == 2
            q = Queue.from_name("kept")
            assert q.len(total=True) == 4
            assert q.get_many(10) == [1, 2, 3] and q.get(partition="part") == "p"
    finally:
        second.stop()
