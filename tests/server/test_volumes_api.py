"""Volumes' control-plane routes over real HTTP, on SQLite and PostgreSQL: names (create, look up, list,
rename, delete), the head's compare-and-swap, who may do what, and the client ``Volume`` reading and writing
through the storage engine with the control plane as its head."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmodal import exception as exc
from cloudmodal.client import session as session_mod
from cloudmodal.client.transport import Transport
from cloudmodal.server.app import ServerHandle, default_settings
from cloudmodal.volume import ControlPlaneHead, Volume
from cloudmodal.volumes.engine import FileEntryType


@pytest.fixture
def plane(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerHandle]:
    monkeypatch.delenv("CLOUDMODAL_VOLUME_STORE", raising=False)
    handle = ServerHandle(default_settings(tmp_path / "state", database_url=database_url)).start_in_thread()
    monkeypatch.setenv("CLOUDMODAL_SERVER_URL", handle.url)
    monkeypatch.setenv("CLOUDMODAL_TOKEN", handle.token)
    session_mod.disconnect()
    try:
        yield handle
    finally:
        session_mod.disconnect()
        handle.stop()


def _t(handle: ServerHandle, scope: str | None = None) -> Transport:
    token = handle.token if scope is None else handle.cp.tokens.create(scope, "test")
    return Transport(handle.url, token, reconnect_timeout=5)


def test_names_create_lookup_list_rename_delete(plane: ServerHandle) -> None:
    t = _t(plane)
    made = t.post("/v1/volumes", {"name": "weights"})
    assert made["created"] and made["id"].startswith("vo-") and made["version"] == 0
    assert made["location"].endswith("/volumes/" + made["id"])  # the state dir's volumes/ by default
    with pytest.raises(exc.AlreadyExistsError):
        t.post("/v1/volumes", {"name": "weights"})
    again = t.post("/v1/volumes", {"name": "weights", "allow_existing": True})
    assert again["id"] == made["id"] and not again["created"]
    with pytest.raises(exc.NotFoundError, match="create_if_missing"):
        t.post("/v1/volumes", {"name": "other", "mode": "lookup"})
    other = t.post("/v1/volumes", {"name": "other", "mode": "lookup", "create_if_missing": True})
    assert other["created"]
    assert t.post("/v1/volumes", {"name": "other", "mode": "lookup"})["id"] == other["id"]
    eph = t.post("/v1/volumes", {})
    assert eph["ephemeral"] and eph["name"] is None
    # a function's spec mounts an ephemeral volume by its id: the look-up takes one
    assert t.post("/v1/volumes", {"name": eph["id"], "mode": "lookup"})["id"] == eph["id"]
    assert [v["name"] for v in t.get("/v1/volumes")] == ["other", "weights"]  # newest first, no ephemeral
    assert t.get(f"/v1/volumes/{made['id']}")["name"] == "weights"  # by id or by name
    assert t.get("/v1/volumes/weights")["id"] == made["id"]

    t.post("/v1/volumes/weights/rename", {"name": "weights2"})
    assert t.get(f"/v1/volumes/{made['id']}")["name"] == "weights2"
    with pytest.raises(exc.NotFoundError):
        t.get("/v1/volumes/weights")
    with pytest.raises(exc.AlreadyExistsError):
        t.post("/v1/volumes/weights2/rename", {"name": "other"})
    with pytest.raises(exc.InvalidError):
        t.post("/v1/volumes", {"name": "vo-" + "a" * 22})  # would be ambiguous with ids

    assert t.post("/v1/volumes/weights2/delete", {})["deleted"] == made["id"]
    with pytest.raises(exc.NotFoundError):
        t.post("/v1/volumes/weights2/delete", {})
    assert t.post("/v1/volumes/weights2/delete", {"allow_missing": True})["deleted"] is None
    # its name is free again
    assert t.post("/v1/volumes", {"name": "weights2"})["id"] != made["id"]


def test_the_head_is_a_compare_and_swap(plane: ServerHandle) -> None:
    t = _t(plane)
    vid = t.post("/v1/volumes", {"name": "cas"})["id"]
    head = ControlPlaneHead(t, vid)
    assert head.read() == (0, None)
    assert head.swap(0, "manifests/1-a.json")
    assert not head.swap(0, "manifests/1-b.json")  # lost: the head stays the winner's
    assert head.read() == (1, "manifests/1-a.json")
    for bad in ("../other-volume/manifests/1-a.json", "manifests/../../x", "blobs/aa/bb", "manifests/a/b"):
        with pytest.raises(exc.InvalidError):
            head.swap(1, bad)  # a head names a manifest of this volume, nothing else

    # eight committers racing from the same version: exactly one wins each round
    wins: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def racer(i: int) -> None:
        mine = ControlPlaneHead(_t(plane), vid)
        start.wait()
        for _ in range(50):
            v, _key = mine.read()
            if mine.swap(v, f"manifests/{v + 1}-{i}.json"):
                with lock:
                    wins.append(f"{v + 1}-{i}")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    versions = [int(w.split("-")[0]) for w in wins]
    assert len(versions) == len(set(versions)), "two commits won the same version"
    final, key = head.read()
    assert final == 1 + len(wins) and key == f"manifests/{max(wins, key=lambda w: int(w.split('-')[0]))}.json"


def test_who_may_do_what(plane: ServerHandle) -> None:
    owner = _t(plane)
    vid = owner.post("/v1/volumes", {"name": "team"})["id"]
    member = _t(plane, "member")
    assert member.post("/v1/volumes", {"name": "team", "mode": "lookup"})["id"] == vid
    assert [v["name"] for v in member.get("/v1/volumes")] == ["team"]

    scoped = _t(plane, "member:some-app")
    for call in (
        lambda: scoped.post("/v1/volumes", {"name": "team", "mode": "lookup"}),
        lambda: scoped.post("/v1/volumes", {"name": "new"}),
        lambda: scoped.get("/v1/volumes"),
        lambda: scoped.get(f"/v1/volumes/{vid}/head"),
        lambda: scoped.post(f"/v1/volumes/{vid}/commit", {"expected": 0, "manifest": "manifests/1-s.json"}),
        lambda: scoped.post("/v1/volumes/team/delete", {}),
    ):
        with pytest.raises(exc.PermissionDeniedError, match="scoped to apps"):
            call()

    worker = _t(plane, "worker:ta-volumetest")
    assert worker.post("/v1/volumes", {"name": "team", "mode": "lookup"})["id"] == vid
    made = worker.post("/v1/volumes", {"name": "by-worker", "mode": "lookup", "create_if_missing": True})
    assert made["created"] and made["created_by"] == "worker:ta-volumetest"
    assert ControlPlaneHead(worker, vid).swap(0, "manifests/1-w.json")  # function code commits
    with pytest.raises(exc.PermissionDeniedError):
        worker.get("/v1/volumes")
    with pytest.raises(exc.PermissionDeniedError):
        worker.post("/v1/volumes/team/rename", {"name": "mine"})
    with pytest.raises(exc.PermissionDeniedError, match="only volumes it created"):
        worker.post("/v1/volumes/team/delete", {})
    eph = worker.post("/v1/volumes", {})
    assert worker.post(f"/v1/volumes/{eph['id']}/delete", {})["deleted"] == eph["id"]

    anonymous = Transport(plane.url, None, reconnect_timeout=5)
    with pytest.raises(exc.AuthError):
        anonymous.get("/v1/volumes")


def _wait_gone(path: Path) -> None:
    import time

    deadline = time.monotonic() + 10
    while path.exists():
        assert time.monotonic() < deadline, f"{path} was not removed after the volume was deleted"
        time.sleep(0.05)


def test_client_volume_reads_and_writes_through_the_engine(plane: ServerHandle, tmp_path: Path) -> None:
    Volume.objects.create("data")
    vol = Volume.from_name("data")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"hello"), "/hello.txt")
        batch.put_directory(src, "/dir")
    assert b"".join(vol.read_file("/hello.txt")) == b"hello"
    entries = {e.path: e for e in vol.listdir("/", recursive=True)}
    assert set(entries) == {"hello.txt", "dir", "dir/a.txt", "dir/sub", "dir/sub/b.txt"}
    assert entries["dir"].type == FileEntryType.DIRECTORY and entries["dir/a.txt"].size == 5
    assert [e.path for e in vol.listdir("/dir")] == ["dir/a.txt", "dir/sub"]
    with pytest.raises(FileExistsError):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"again"), "/hello.txt")
    with vol.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(b"again"), "/hello.txt")
    buf = io.BytesIO()
    assert vol.read_file_into_fileobj("/hello.txt", buf) == 5 and buf.getvalue() == b"again"
    vol.copy_files(["/hello.txt"], "/copy.txt")
    vol.remove_file("/dir", recursive=True)
    assert sorted(e.path for e in vol.iterdir("/")) == ["copy.txt", "hello.txt"]
    info = vol.info()
    assert info.name == "data" and info.version == 4  # the refused batch published nothing
    # another handle (another process, in effect) sees the same committed version
    assert b"".join(Volume.from_id(info.id).read_file("/copy.txt")) == b"again"
    assert [v.name for v in Volume.objects.list()] == ["data"]

    location = Path(info.location)
    assert location.is_dir()
    Volume.objects.delete("data")
    _wait_gone(location)  # the files go with the name
    with pytest.raises(exc.NotFoundError):
        Volume.from_name("data").info()
    Volume.objects.delete("data", allow_missing=True)


def test_ephemeral_volume_and_aio(plane: ServerHandle) -> None:
    import asyncio

    with Volume.ephemeral() as vol:
        assert vol.name is None and vol.object_id.startswith("vo-")
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"x" * 1000), "/x.bin")

        async def read() -> tuple[list[Any], bytes]:
            entries = await vol.listdir.aio("/")
            chunks = [c async for c in vol.read_file.aio("/x.bin")]
            return entries, b"".join(chunks)

        entries, data = asyncio.run(read())
        assert [e.path for e in entries] == ["x.bin"] and data == b"x" * 1000
        location = Path(vol.info().location)
        vid = vol.object_id
    with pytest.raises(exc.NotFoundError):
        Volume.from_id(vid)
    _wait_gone(location)


def test_an_ephemeral_volume_whose_client_stopped_beating_is_pruned(plane: ServerHandle) -> None:
    """A client that died inside ``Volume.ephemeral()`` never deletes its volume: the retention pass does, ten
    minutes after the last heartbeat (or commit), files included; a beating one and named ones stay."""
    import time

    from sqlalchemy import update

    from cloudmodal.server import retention, svc_volumes
    from cloudmodal.server.models_volumes import volumes as V

    t = _t(plane)
    named = t.post("/v1/volumes", {"name": "kept"})
    dead, alive = t.post("/v1/volumes", {}), t.post("/v1/volumes", {})
    Path(dead["location"]).mkdir(parents=True, exist_ok=True)
    (Path(dead["location"]) / "blob").write_bytes(b"x")
    idle = svc_volumes.EPHEMERAL_IDLE_S
    with plane.cp.db.write() as conn:  # all three were made 11 minutes ago
        conn.execute(update(V).values(created_at=V.c.created_at - idle - 60))
    t.post(f"/v1/volumes/{alive['id']}/heartbeat")  # only `alive` still has a client
    assert retention.prune(plane.cp, time.time()).volumes == 1
    with pytest.raises(exc.NotFoundError):
        t.get(f"/v1/volumes/{dead['id']}")
    assert not Path(dead["location"]).exists()
    assert t.get(f"/v1/volumes/{alive['id']}")["ephemeral"]
    assert t.get(f"/v1/volumes/{named['id']}")["name"] == "kept"  # named volumes are never pruned
    assert svc_volumes.prune(plane.cp, time.time() + idle + 1) == 1  # `alive` stops beating too
    with pytest.raises(exc.NotFoundError, match="idle too long"):
        t.post(f"/v1/volumes/{alive['id']}/heartbeat")


def test_a_volume_handle_pickles_without_its_connection(plane: ServerHandle) -> None:
    import pickle

    vol = Volume.from_name("pickled", create_if_missing=True)
    vid = vol.object_id
    copy = pickle.loads(pickle.dumps(vol))
    assert copy == vol and copy.name == "pickled" and copy.object_id == vid


def test_a_directory_store_is_refused_where_it_is_not_the_control_planes(plane: ServerHandle) -> None:
    """The default store is a directory of the control plane's machine: a client or worker elsewhere finds no
    marker at that path and is told to use a bucket, instead of writing files nobody else will see."""
    vol = Volume.from_name("here", create_if_missing=True)
    location = Path(vol.info().location)
    (location / ".cloudmodal-volume").unlink()  # as the path looks from another machine: not this volume's
    with pytest.raises(exc.InvalidError, match="CLOUDMODAL_VOLUME_STORE"):
        Volume.from_name("here").listdir("/")


def test_the_volume_store_setting_places_new_volumes(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "team-volumes"
    monkeypatch.setenv("CLOUDMODAL_VOLUME_STORE", str(store))
    handle = ServerHandle(default_settings(tmp_path / "state", database_url=database_url)).start_in_thread()
    try:
        row = _t(handle).post("/v1/volumes", {"name": "placed"})
        assert row["store_url"] == str(store) and row["location"] == f"{store}/{row['id']}"
        head = ControlPlaneHead(_t(handle), row["id"])
        from cloudmodal.volume import open_volume_data

        with open_volume_data(_t(handle), row).batch() as b:
            b.put_file(io.BytesIO(b"in the team store"), "/f.txt")
        assert head.read()[0] == 1
        assert any((store / row["id"] / "blobs").rglob("*"))
    finally:
        handle.stop()
