"""One conformance suite for the volume engine, run against every backend (``backend`` fixture: a local
directory, S3 on moto, GCS on gcp-storage-emulator, Azure Blob on Azurite).

The crash and race cases run committers as separate processes (tests/volumes/child.py) that pause at a chosen
point of a commit by waiting for a file; the parent kills or releases them. No timing is asserted.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from cloudmodal.volumes import CorruptDataError, FileEntryType, VolumeData
from cloudmodal.volumes.engine import blob_key
from tests.volumes.support import Backend, finish, kill

KIB = 1024


def wait_for_file(path: Path, proc: object, what: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not path.exists():
        poll = getattr(proc, "poll", lambda: None)()
        if poll is not None:
            err = proc.stderr.read() if getattr(proc, "stderr", None) else ""  # type: ignore[attr-defined]
            raise AssertionError(f"committer exited ({poll}) before {what}:\n{err}")
        if time.monotonic() > end:
            raise AssertionError(f"committer never reached {what} within {deadline_s:.0f} s")
        time.sleep(0.01)


def contents(vol: VolumeData) -> dict[str, bytes]:
    """Every file of one pinned version."""
    snap = vol.snapshot()
    return {
        e.path: snap.read_bytes(e.path)
        for e in snap.listdir("/", recursive=True)
        if e.type == FileEntryType.FILE
    }


def seed(vol: VolumeData, files: dict[str, bytes]) -> int:
    with vol.batch() as b:
        for path, data in files.items():
            b.put_file(io.BytesIO(data), path)
    assert b.committed is not None
    return b.committed


def test_put_list_read_remove_copy(backend: Backend) -> None:
    vol = backend.volume()
    src = backend.tmp / "src"
    (src / "sub").mkdir(parents=True)
    (src / "top.txt").write_bytes(b"top")
    (src / "sub" / "deep.txt").write_bytes(b"deep")
    os.chmod(src / "top.txt", 0o600)

    assert vol.version == 0 and vol.listdir("/") == []
    with vol.batch() as b:
        b.put_file(io.BytesIO(b"hello"), "/a/hello.txt")
        b.put_directory(src, "/dir")
    assert vol.version == 1

    entries = {e.path: e for e in vol.listdir("/", recursive=True)}
    assert set(entries) == {"a", "a/hello.txt", "dir", "dir/top.txt", "dir/sub", "dir/sub/deep.txt"}
    assert entries["a/hello.txt"].type == FileEntryType.FILE and entries["a/hello.txt"].size == 5
    assert entries["dir/sub"].type == FileEntryType.DIRECTORY
    assert [e.path for e in vol.listdir("/")] == ["a", "dir"]
    assert [e.path for e in vol.listdir("/dir")] == ["dir/sub", "dir/top.txt"]
    assert b"".join(vol.read_file("/dir/sub/deep.txt")) == b"deep"
    assert vol.snapshot().stat("dir/top.txt").mode == 0o600  # type: ignore[union-attr]
    with pytest.raises(FileNotFoundError):
        vol.read_file("/nope.txt")
    with pytest.raises(IsADirectoryError):
        vol.read_file("/dir")

    # force=False refuses to overwrite (Modal's batch_upload default); nothing is published.
    b = vol.batch(force=False)
    b.put_file(io.BytesIO(b"other"), "/a/hello.txt")
    with pytest.raises(FileExistsError):
        b.commit()
    assert vol.version == 1

    with vol.batch() as b:
        b.copy(["/a/hello.txt"], "/a/copy.txt")  # onto a new path
        b.copy(["/a/hello.txt", "/dir/top.txt"], "/flat/")  # several into a directory
        b.copy(["/dir"], "/dir2", recursive=True)
    got = contents(vol)
    assert (
        got["a/copy.txt"] == b"hello" and got["flat/hello.txt"] == b"hello" and got["flat/top.txt"] == b"top"
    )
    assert got["dir2/sub/deep.txt"] == b"deep"

    b = vol.batch()
    b.remove("/dir")
    with pytest.raises(IsADirectoryError):
        b.commit()
    with vol.batch() as b:
        b.remove("/dir", recursive=True)
        b.remove("/a/copy.txt")
    assert {e.path for e in vol.listdir("/")} == {"a", "dir2", "flat"}
    with pytest.raises(FileNotFoundError):
        vol.listdir("/dir")
    b = vol.batch()
    b.remove("/missing")
    with pytest.raises(FileNotFoundError):
        b.commit()
    vol.close()


def test_large_file_in_parts_with_checksums(backend: Backend) -> None:
    part = 64 * KIB
    vol = backend.volume(part_size=part, cache=True)
    big = os.urandom(5 * part + 123)  # 6 parts, the last one short
    seed(vol, {"big.bin": big, "small.txt": b"small"})
    rec = vol.snapshot().stat("big.bin")
    assert rec is not None and len(rec.parts) == 6  # type: ignore[union-attr]
    assert b"".join(vol.read_file("big.bin")) == big

    # A damaged part in the store is caught by its checksum on a fresh reader (no cache)...
    store = backend.store()
    store.put(blob_key(rec.parts[2]), b"x" * part)  # type: ignore[union-attr]
    fresh = backend.volume(part_size=part)
    with pytest.raises(CorruptDataError, match="damaged"):
        b"".join(fresh.read_file("big.bin"))
    assert b"".join(fresh.read_file("small.txt")) == b"small"  # other files are unaffected
    # ...while the first reader's verified local cache still serves the good copy.
    assert b"".join(vol.read_file("big.bin")) == big
    # A damaged cache file is not trusted either: the part is fetched again (and found damaged in the store).
    cached = vol._parts.cache / rec.parts[2]  # type: ignore[operator, union-attr]
    cached.write_bytes(b"y" * part)
    with pytest.raises(CorruptDataError, match="damaged"):
        b"".join(vol.read_file("big.bin"))
    # A part gone from the store is reported, not returned as a hole.
    store.delete(blob_key(rec.parts[0]))  # type: ignore[union-attr]
    with pytest.raises(CorruptDataError, match="missing"):
        b"".join(fresh.read_file("big.bin"))
    vol.close()
    fresh.close()


def test_working_copy_commit_and_reload(backend: Backend) -> None:
    vol = backend.volume()
    seed(vol, {"keep.txt": b"keep", "gone.txt": b"gone", "d/x.txt": b"x"})
    a = vol.working_copy(backend.tmp / "a")
    b = vol.working_copy(backend.tmp / "b")
    assert (backend.tmp / "a" / "d" / "x.txt").read_bytes() == b"x"

    (backend.tmp / "a" / "new.txt").write_bytes(b"from a")
    (backend.tmp / "a" / "gone.txt").unlink()
    (backend.tmp / "a" / "empty").mkdir()
    v = a.commit()
    assert v == 2 and a.commit() == 2  # nothing new: no version
    assert {e.path for e in vol.listdir("/")} == {"keep.txt", "new.txt", "d", "empty"}

    # b has an uncommitted local edit: reload brings a's changes and keeps b's edit.
    (backend.tmp / "b" / "keep.txt").write_bytes(b"b's uncommitted edit")
    assert b.reload() == 2
    assert (backend.tmp / "b" / "new.txt").read_bytes() == b"from a"
    assert not (backend.tmp / "b" / "gone.txt").exists()
    assert (backend.tmp / "b" / "empty").is_dir()
    assert (backend.tmp / "b" / "keep.txt").read_bytes() == b"b's uncommitted edit"
    assert b.commit() == 3
    assert contents(vol)["keep.txt"] == b"b's uncommitted edit"
    vol.close()


@pytest.mark.parametrize("pause_at", ["blob", "swap"])
def test_committer_killed_mid_commit_leaves_old_version(backend: Backend, pause_at: str) -> None:
    vol = backend.volume()
    old = {"model.bin": os.urandom(100 * KIB), "notes.txt": b"v1"}
    seed(vol, old)
    marker = backend.tmp / "paused"
    proc = backend.spawn(
        mode="working_copy",
        workdir=str(backend.tmp / "wc"),
        writes={"model.bin": "new weights ", "notes.txt": "v2", "extra.txt": "extra"},
        repeat=20000,  # ~240 KiB: several parts
        pause_at=pause_at,
        pause_after=2,
        marker=str(marker),
    )
    try:
        wait_for_file(marker, proc, f"the {pause_at} pause")
    finally:
        kill(proc)  # SIGKILL in the middle of the commit
    assert proc.returncode == -9

    assert vol.version == 1
    assert contents(backend.volume()) == old  # a fresh reader sees the old version, whole
    # The volume still takes commits.
    seed(vol, {"notes.txt": b"v2"})
    assert contents(vol)["notes.txt"] == b"v2" and contents(vol)["model.bin"] == old["model.bin"]
    vol.close()


def test_two_committers_at_once(backend: Backend) -> None:
    vol = backend.volume()
    seed(vol, {"shared.txt": b"base", "del0.txt": b"0", "del1.txt": b"1", "keep.txt": b"keep"})
    barrier = [str(backend.tmp / "ready0"), str(backend.tmp / "ready1")]
    procs = [
        backend.spawn(
            mode="working_copy",
            workdir=str(backend.tmp / f"wc{i}"),
            writes={f"own{i}.txt": f"mine {i}", "shared.txt": f"writer {i}"},
            deletes=[f"del{i}.txt"],
            barrier=barrier if i == 0 else barrier[::-1],
        )
        for i in range(2)
    ]
    results = [finish(p) for p in procs]

    assert sorted(r["version"] for r in results) == [2, 3]  # both published, one after the other
    assert max(r["swaps"] for r in results) >= 2  # one lost the race and re-applied its changes
    later = max(range(2), key=lambda i: results[i]["version"])
    got = contents(vol)
    assert got == {
        "own0.txt": b"mine 0",
        "own1.txt": b"mine 1",
        "keep.txt": b"keep",
        "shared.txt": f"writer {later}".encode(),  # the same file: the later commit wins, whole
    }
    vol.close()


def test_reader_during_commit_sees_old_or_new(backend: Backend) -> None:
    part = 64 * KIB
    vol = backend.volume(part_size=part)
    names = ["a.bin", "b.bin", "c/d.bin"]
    seed(vol, {n: b"1" * (3 * part) for n in names})
    marker, release = backend.tmp / "paused", backend.tmp / "release"
    proc = backend.spawn(
        mode="batch",
        writes={n: "2" for n in names},
        repeat=3 * part,
        part_size=part,
        pause_at="swap",
        marker=str(marker),
        release=str(release),
    )
    try:
        wait_for_file(marker, proc, "the swap")
        # Every new part and the new manifest are in the store; readers still see version 1, whole.
        during = vol.snapshot()
        assert during.version == 1
        assert all(during.read_bytes(n) == b"1" * (3 * part) for n in names)
        # A reader that pinned version 1 keeps reading it after the swap.
        stream = during.read_file("a.bin")
        first = next(stream)
        release.touch()
        assert finish(proc)["version"] == 2
        assert first + b"".join(stream) == b"1" * (3 * part)
    finally:
        kill(proc)
    after = contents(vol)
    assert after == {n: b"2" * (3 * part) for n in names}
    vol.close()


def test_readers_racing_commits_never_see_a_mix(backend: Backend) -> None:
    """Commits of versions whose files all carry the version's digit, read continuously meanwhile."""
    vol = backend.volume(part_size=16 * KIB)
    names = ["x.bin", "y/z.bin"]
    seed(vol, {n: b"1" * (40 * KIB) for n in names})
    procs = [
        backend.spawn(mode="batch", writes={n: str(k) for n in names}, repeat=40 * KIB, part_size=16 * KIB)
        for k in range(2, 5)
    ]
    seen: set[int] = set()
    reads = 0
    while any(p.poll() is None for p in procs) or reads < 3:
        snap = vol.snapshot()
        digits = {snap.read_bytes(n) for n in names}
        assert len(digits) == 1, f"version {snap.version} mixes contents: {[d[:1] for d in digits]}"
        (data,) = digits
        assert data == data[:1] * (40 * KIB)  # no file is a mix of two writers either
        seen.add(snap.version)
        reads += 1
    for p in procs:
        finish(p)
    assert vol.version == 4 and len({contents(vol)[n] for n in names}) == 1
    vol.close()


def test_gc_keeps_recent_versions_and_their_parts(backend: Backend) -> None:
    vol = backend.volume(part_size=16 * KIB)
    seed(vol, {"a.bin": b"1" * (20 * KIB)})  # v1
    seed(vol, {"a.bin": b"2" * (20 * KIB)})  # v2
    seed(vol, {"b.txt": b"b"})  # v3: a.bin still v2's
    store = backend.store()
    store.put("blobs/00/" + "0" * 64, b"orphan of a crashed commit")
    assert vol.gc(keep_versions=2) == (0, 0)  # everything is younger than the grace period
    assert vol.gc(keep_versions=2, grace_s=-60) == (1, 3)  # v1's manifest; v1's two parts and the orphan
    assert contents(vol) == {"a.bin": b"2" * (20 * KIB), "b.txt": b"b"}
    assert len(list(store.list("manifests/"))) == 2
    with pytest.raises(ValueError):
        vol.gc(keep_versions=0)
    vol.close()


def test_working_copy_tracks_implicit_directories_and_removals(backend: Backend) -> None:
    vol = backend.volume()
    seed(vol, {"d/e/x.txt": b"x", "top.txt": b"t"})
    wc = vol.working_copy(backend.tmp / "wc")
    assert wc.commit() == 1 and not wc.has_changes()  # parents made on disk are not changes
    with vol.batch() as b:
        b.remove("/d", recursive=True)
    assert wc.reload() == 2
    assert not (backend.tmp / "wc" / "d").exists()  # emptied parents go with their files
    assert not wc.has_changes()
    vol.close()
