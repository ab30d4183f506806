"""Old volume versions collected by the control plane (:func:`cloudmodal.server.svc_volumes.gc_versions`) on a
real database (SQLite and PostgreSQL) and the default store (a directory): what is kept (the head, the newest
versions, versions that were the head recently), what goes (older manifests, parts no kept version uses), and
that the head and a kept version still read whole afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmodal.server.security import Identity
from cloudmodal.server.service import ControlPlane, Settings
from cloudmodal.server.svc_volumes import VersionsGc, Volumes, gc_versions
from cloudmodal.volumes import Snapshot, VolumeData, open_store
from cloudmodal.volumes.engine import blob_key
from cloudmodal.volumes.errors import CorruptDataError

OWNER = Identity("owner", "tk-owner", "owner")
HOUR = 3600.0


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(Settings(database_url=database_url, state_dir=tmp_path))
    try:
        yield plane
    finally:
        plane.db.dispose()


class _SvcHead:
    """The volume's head through the service, as the HTTP routes reach it."""

    def __init__(self, vols: Volumes, volume_id: str) -> None:
        self.vols, self.id = vols, volume_id

    def read(self) -> tuple[int, str | None]:
        h = self.vols.head(OWNER, self.id)
        return h["version"], h["manifest"]

    def swap(self, expected: int, manifest_key: str) -> bool:
        return bool(self.vols.swap(OWNER, self.id, expected, manifest_key)["swapped"])


def _put(data: VolumeData, tmp_path: Path, path: str, content: bytes) -> None:
    src = tmp_path / "src"
    src.write_bytes(content)
    with data.batch() as b:
        b.put_file(src, path)


def _digest(content: bytes) -> str:
    import hashlib

    return hashlib.sha256(content).hexdigest()


def test_gc_keeps_the_newest_and_recent_versions_and_drops_the_rest(cp: ControlPlane, tmp_path: Path) -> None:
    vols = Volumes(cp, None)
    row = vols.create(OWNER, "data", "create")
    store = open_store(row["location"])
    data = VolumeData(store, _SvcHead(vols, row["id"]))
    _put(data, tmp_path, "/b.txt", b"kept by every version")  # v1
    _put(data, tmp_path, "/a.txt", b"one")  # v2
    _put(data, tmp_path, "/a.txt", b"two")  # v3
    _put(data, tmp_path, "/a.txt", b"three")  # v4
    _put(data, tmp_path, "/c.txt", b"four")  # v5
    assert data.version == 5
    chain = []  # (version, manifest key), newest first
    version, key = data.head.read()
    while key is not None:
        m = data.load_manifest(key)
        chain.append((m.version, key))
        key = m.parent
    assert [v for v, _ in chain] == [5, 4, 3, 2, 1]
    blobs_before = set(store.list("blobs/"))
    now = time.time() + 60  # every object is older than grace_s=0 then

    # Every version was the head within the last hour: all are kept, however few keep_versions says.
    r = gc_versions(cp, now, keep_versions=2, keep_s=HOUR, grace_s=0)
    assert r == VersionsGc(volumes=1, manifests=0, blobs=0)
    assert set(store.list("blobs/")) == blobs_before

    # Unchanged since that pass: not looked at again until every_s has passed.
    assert gc_versions(cp, now + 10, keep_versions=2, keep_s=HOUR, grace_s=0) == VersionsGc()

    # Two hours on: only the 2 newest versions are kept (v5, v4); v1-v3's manifests go, and the parts only
    # they used ("one", "two"); "kept by every version" is still used by v4 and v5.
    later = now + 2 * HOUR
    r = gc_versions(cp, later, keep_versions=2, keep_s=HOUR, grace_s=0)
    assert r == VersionsGc(volumes=1, manifests=3, blobs=2)
    assert set(store.list("blobs/")) == blobs_before - {blob_key(_digest(b"one")), blob_key(_digest(b"two"))}
    assert set(store.list("manifests/")) == {chain[0][1], chain[1][1]}

    # The head reads whole, and so does the kept older version v4.
    head = data.snapshot()
    assert {p: head.read_bytes(p) for p in ("a.txt", "b.txt", "c.txt")} == {
        "a.txt": b"three", "b.txt": b"kept by every version", "c.txt": b"four",
    }  # fmt: skip
    v4 = Snapshot(VolumeData(open_store(row["location"]), data.head), data.load_manifest(chain[1][1]))
    assert v4.read_bytes("a.txt") == b"three"
    assert v4.read_bytes("b.txt") == b"kept by every version"
    # (negative control: a version gc dropped no longer reads)
    fresh = VolumeData(open_store(row["location"]), data.head)
    with pytest.raises(CorruptDataError):
        fresh.load_manifest(chain[3][1])

    # A commit after gc works on top of the kept head (v6); the next pass drops v4, now third newest, whose
    # parts v5 and v6 all still use.
    _put(data, tmp_path, "/d.txt", b"five")
    r = gc_versions(cp, later + 60, keep_versions=2, keep_s=0, grace_s=HOUR)
    assert r == VersionsGc(volumes=1, manifests=1, blobs=0)
    head = data.snapshot()
    assert (head.version, head.read_bytes("d.txt"), head.read_bytes("a.txt")) == (6, b"five", b"three")


def test_a_young_unreferenced_object_is_left_for_a_commit_in_flight(cp: ControlPlane, tmp_path: Path) -> None:
    vols = Volumes(cp, None)
    row = vols.create(OWNER, "inflight", "create")
    store = open_store(row["location"])
    data = VolumeData(store, _SvcHead(vols, row["id"]))
    _put(data, tmp_path, "/a.txt", b"one")
    _put(data, tmp_path, "/a.txt", b"two")
    store.put(blob_key(_digest(b"uploaded, not yet published")), b"uploaded, not yet published")
    now = time.time()
    # v1 is beyond keep_versions=1 and was superseded long ago as far as keep_s=0 goes, but every object is
    # younger than the grace period: nothing is deleted.
    assert gc_versions(cp, now, keep_versions=1, keep_s=0, grace_s=HOUR) == VersionsGc(volumes=1)
    # past the grace period v1's manifest and its part go, and so does the orphan part
    r = gc_versions(cp, now + 2 * HOUR, keep_versions=1, keep_s=0, grace_s=HOUR)
    assert r == VersionsGc(volumes=1, manifests=1, blobs=2)
    assert data.snapshot().read_bytes("a.txt") == b"two"


def test_a_volume_whose_store_fails_is_counted_and_the_others_go_on(cp: ControlPlane, tmp_path: Path) -> None:
    vols = Volumes(cp, None)
    ok = vols.create(OWNER, "ok", "create")
    bad = vols.create(OWNER, "bad", "create")
    for row in (ok, bad):
        data = VolumeData(open_store(row["location"]), _SvcHead(vols, row["id"]))
        _put(data, tmp_path, "/a.txt", b"one")
        _put(data, tmp_path, "/a.txt", b"two")
    # the head of "bad" names a manifest that is gone from its store
    for k in list(open_store(bad["location"]).list("manifests/")):
        open_store(bad["location"]).delete(k)
    r = gc_versions(cp, time.time() + 60, keep_versions=1, keep_s=0, grace_s=0)
    assert r == VersionsGc(volumes=1, manifests=1, blobs=1, failed=1)
