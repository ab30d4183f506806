"""The blob store's contract, the same for every backend: a directory (files, the default), and a bucket
through the volumes' storage protocol — a directory seen as objects, S3 on moto's server, GCS on
gcp-storage-emulator and Azure Blob on Azurite (real servers, as the volume suite runs them). And retention's
blob pruning against a bucket."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from cloudmodal.exception import NotFoundError
from cloudmodal.server import models
from cloudmodal.server.blobs import (
    BLOB_PREFIX,
    TOUCH_PREFIX,
    WRITE_CHUNK,
    BlobStore,
    DirectoryBlobStore,
    ObjectBlobStore,
    iterate,
    open_blob_store,
)
from cloudmodal.server.retention import prune
from cloudmodal.server.service import ControlPlane, Settings
from cloudmodal.volumes.store import LocalStore, open_store
from tests.volumes.servers import Server, start_azurite, start_gcs, start_s3

BACKENDS = ["dir", "objects", "s3", "gcs", "azure"]
MISSING = "bl-" + "0" * 40


def _server(factory: Callable[..., Server], *args: Any) -> Iterator[Server]:
    try:
        server = factory(*args)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[Server]:
    yield from _server(start_s3)


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[Server]:
    yield from _server(start_gcs)


@pytest.fixture(scope="module")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(start_azurite, tmp_path_factory.mktemp("azurite"))


def _bucket_url(server: Server) -> str:
    return f"{server.scheme}://{server.new_bucket()}/cp/{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=BACKENDS)
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    name: str = request.param
    if name == "dir":
        return DirectoryBlobStore(tmp_path / "blobs")
    if name == "objects":
        return ObjectBlobStore(LocalStore(tmp_path / "bucket"), tmp_path / "spool")
    server: Server = request.getfixturevalue(f"{name}_server")
    return ObjectBlobStore(open_store(_bucket_url(server), env=server.env), tmp_path / "spool")


async def _run(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def _put_stream(blobs: BlobStore, data: bytes, piece: int = 64 * 1024) -> str:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), piece):
            yield data[i : i + piece]

    return asyncio.run(blobs.put_stream(chunks(), _run))


def _read_all(blobs: BlobStore, blob_id: str) -> list[bytes]:
    return list(blobs.open_read(blob_id))


def _expected_id(data: bytes) -> str:
    return "bl-" + hashlib.sha256(data).hexdigest()[:40]


def _spooled(blobs: BlobStore) -> list[Path]:
    return [*blobs.spool_dir.glob(".tmp-*"), *blobs.spool_dir.glob("*/.tmp-*")]


def _modified(blobs: BlobStore, blob_id: str) -> float:
    (t,) = [b.modified for b in blobs.list_blobs() if b.blob_id == blob_id]
    return t


def test_a_streamed_upload_is_stored_under_its_content_address_and_streams_back(blobs: BlobStore) -> None:
    data = bytes(range(256)) * (3 * WRITE_CHUNK // 256) + b"tail"  # parts, and a short last one
    before = time.time()
    blob_id = _put_stream(blobs, data)
    after = time.time()
    assert blob_id == _expected_id(data)
    assert blobs.exists(blob_id)
    assert blobs.get(blob_id) == data
    assert b"".join(_read_all(blobs, blob_id)) == data
    (info,) = list(blobs.list_blobs())
    assert info.blob_id == blob_id
    assert before - 2 <= info.modified <= after + 2  # object stores keep whole seconds
    assert info.size in (None, len(data))
    assert not _spooled(blobs), "the upload's temporary file was left behind"


def test_put_and_the_empty_blob(blobs: BlobStore) -> None:
    assert blobs.get(blobs.put(b"small")) == b"small"
    assert blobs.put(b"") == _expected_id(b"")
    if blobs.url.startswith("gs://"):
        # gcp-storage-emulator answers an empty object's download with "206, bytes 0--1/0", which
        # google-cloud-storage refuses (GCS itself answers 200); blobs are never empty in use (over 2 MiB).
        # What the emulator can show: the empty blob was stored under its address.
        assert _expected_id(b"") in {b.blob_id for b in blobs.list_blobs()}
        return
    assert blobs.get(_expected_id(b"")) == b""
    assert b"".join(_read_all(blobs, _expected_id(b""))) == b""


def test_a_large_blob_is_read_in_several_chunks(blobs: BlobStore) -> None:
    data = b"x" * (17 * 1024 * 1024 + 1)  # over two of any backend's read chunks (8 MiB from buckets)
    blob_id = blobs.put(data)
    chunks = _read_all(blobs, blob_id)
    assert len(chunks) >= 2 and b"".join(chunks) == data
    assert max(len(c) for c in chunks) < len(data)


def test_an_upload_is_spooled_to_disk_as_it_arrives(blobs: BlobStore) -> None:
    """The body is written out as it comes (a write buffer in memory, not the blob)."""
    seen: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * WRITE_CHUNK
            # put_stream asks for the next chunk only once the part it just got is written
            seen.append(sum(p.stat().st_size for p in _spooled(blobs)))

    blob_id = asyncio.run(blobs.put_stream(chunks(), _run))
    assert blobs.get(blob_id) == b"y" * 4 * WRITE_CHUNK
    assert seen == [WRITE_CHUNK, 2 * WRITE_CHUNK, 3 * WRITE_CHUNK, 4 * WRITE_CHUNK]


def test_a_missing_blob_is_not_found_before_any_chunk(blobs: BlobStore) -> None:
    assert not blobs.exists(MISSING)
    with pytest.raises(NotFoundError, match="not found"):
        blobs.get(MISSING)
    with pytest.raises(NotFoundError, match="not found"):
        blobs.open_read(MISSING)  # at the call, not at the first next(): the API can still answer 404
    for bad in ("bl-XYZ", "../etc/passwd", "bl-" + "a" * 41):
        with pytest.raises(NotFoundError, match="Invalid blob id"):
            blobs.get(bad)


def test_the_same_content_twice_is_one_blob(blobs: BlobStore) -> None:
    data = b"twice" * 1000
    assert _put_stream(blobs, data) == _put_stream(blobs, data) == blobs.put(data)
    assert [b.blob_id for b in blobs.list_blobs()] == [_expected_id(data)]
    assert not _spooled(blobs)


def test_delete_if_idle_removes_one_blob(blobs: BlobStore) -> None:
    keep, gone = blobs.put(b"keep"), blobs.put(b"gone")
    t_gone = _modified(blobs, gone)
    assert blobs.delete_if_idle(gone, cutoff=t_gone + 1)
    assert not blobs.exists(gone)
    with pytest.raises(NotFoundError):
        blobs.get(gone)
    assert [b.blob_id for b in blobs.list_blobs()] == [keep]
    assert not blobs.delete_if_idle(gone, cutoff=t_gone + 1)  # already gone: nothing removed
    assert blobs.get(keep) == b"keep"


def _uploaded_again_until_newer(blobs: BlobStore, data: bytes, first: float) -> float:
    """Upload ``data`` again until its listed time moves past ``first`` (object stores keep whole seconds)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert blobs.put(data) == _expected_id(data)
        now = _modified(blobs, _expected_id(data))
        if now > first:
            return now
        time.sleep(0.2)
    raise AssertionError(f"an upload again never made {blobs!r}'s blob newer than {first}")


def test_uploading_again_makes_a_blob_new_again_without_copying_it(blobs: BlobStore) -> None:
    data = b"again" * 100
    blob_id = blobs.put(data)
    first = _modified(blobs, blob_id)
    second = _uploaded_again_until_newer(blobs, data, first)
    # retention listed it before the upload again (cutoff past its first upload): it stays
    assert not blobs.delete_if_idle(blob_id, cutoff=second)
    assert blobs.get(blob_id) == data
    if isinstance(blobs, ObjectBlobStore):
        # the object itself was not written again: only the marker is newer
        (own,) = [t for k, t in blobs.store.list_modified(BLOB_PREFIX) if k.endswith(blob_id)]
        assert own == first < second
        blobs.tidy(cutoff=second)  # a marker not older than the cutoff stays
        assert _modified(blobs, blob_id) == second
        blobs.tidy(cutoff=second + 1)  # an old marker goes; the blob is as old as its own upload again
        assert not list(blobs.store.list(TOUCH_PREFIX))
        assert _modified(blobs, blob_id) == first
    assert blobs.delete_if_idle(blob_id, cutoff=second + 1)  # negative control: idle past that, it goes
    assert not blobs.exists(blob_id)


def test_iterate_streams_the_chunks_and_closes_them() -> None:
    closed: list[bool] = []

    def gen() -> Iterator[bytes]:
        try:
            yield b"a"
            yield b"b"
            yield b"c"
        finally:
            closed.append(True)

    async def first_two() -> list[bytes]:
        out = []
        stream = iterate(gen(), _run)
        async for chunk in stream:
            out.append(chunk)
            if len(out) == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return out

    assert asyncio.run(first_two()) == [b"a", b"b"]
    assert closed == [True]  # a download cut short releases its connection


@pytest.mark.parametrize(
    ("location", "kind"),
    [
        ("{tmp}/plain", DirectoryBlobStore),
        ("file://{tmp}/as-url", DirectoryBlobStore),
    ],
)
def test_open_blob_store_picks_the_directory_store_for_paths(
    tmp_path: Path, location: str, kind: type
) -> None:
    store = open_blob_store(location.format(tmp=tmp_path), tmp_path / "spool")
    assert type(store) is kind
    assert store.get(store.put(b"z")) == b"z"


def test_open_blob_store_refuses_an_unknown_scheme(tmp_path: Path) -> None:
    from cloudmodal.exception import InvalidError

    with pytest.raises(InvalidError, match=r"CLOUDMODAL_BLOB_STORE: unsupported store URL.*s3://"):
        open_blob_store("ftp://host/dir", tmp_path / "spool")


def test_open_blob_store_opens_a_bucket(s3_server: Server, tmp_path: Path, monkeypatch: Any) -> None:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    store = open_blob_store(_bucket_url(s3_server), tmp_path / "spool")
    assert isinstance(store, ObjectBlobStore)
    assert store.get(store.put(b"in the bucket")) == b"in the bucket"


def test_a_bucket_that_cannot_be_listed_is_refused_at_start(
    s3_server: Server, tmp_path: Path, monkeypatch: Any
) -> None:
    from cloudmodal.exception import InvalidError

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(
        InvalidError,
        match=r"CLOUDMODAL_BLOB_STORE s3://no-such-bucket-[0-9a-f]+/cp: cannot list it .*NoSuchBucket",
    ):
        open_blob_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/cp", tmp_path / "spool")


# -- retention against a bucket ------------------------------------------------------------------------------
DAY = 86400.0


def test_retention_prunes_unreferenced_blobs_from_a_bucket(
    s3_server: Server, tmp_path: Path, monkeypatch: Any
) -> None:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    url = _bucket_url(s3_server)
    cp = ControlPlane(
        Settings(database_url=f"sqlite:///{tmp_path / 'cp.db'}", state_dir=tmp_path, blob_store=url)
    )
    try:
        assert isinstance(cp.blobs, ObjectBlobStore) and cp.blobs.url == url
        referenced, garbage = cp.blobs.put(b"referenced" * 10), cp.blobs.put(b"garbage" * 10)
        with cp.db.write() as conn:
            conn.execute(insert(models.apps).values(id="ap-1", name="a", state="running", ephemeral=True))
            conn.execute(
                insert(models.functions).values(
                    id="fu-1", app_id="ap-1", name="f", spec={}, source_blob=referenced, state="active"
                )
            )
        later = time.time() + 2 * DAY  # both blobs are past every grace then
        fresh = prune(cp, now=time.time())
        assert fresh.removed_blobs == []  # negative control: just uploaded, both stay
        report = prune(cp, now=later)
        assert report.removed_blobs == [garbage] and report.blobs == 1
        assert cp.blobs.exists(referenced) and not cp.blobs.exists(garbage)
        keys = set(open_store(url).list(""))
        assert keys == {ObjectBlobStore.key(referenced)}
        assert not (tmp_path / "blobs").exists()  # nothing went to the state directory

        # a bucket is looked at hourly (its listing is billed): garbage found within the hour waits
        more = cp.blobs.put(b"more garbage")
        assert prune(cp, now=later + 60).removed_blobs == []
        assert prune(cp, now=later + 3601).removed_blobs == [more]
    finally:
        cp.db.dispose()
