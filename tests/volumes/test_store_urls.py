"""``open_store``: which backend a URL picks and the errors for URLs it cannot use; the local-directory store's
own guarantees (key checks, atomic puts). The backends' behaviour is the conformance suite's."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cloudmodal.volumes import (
    FileHead,
    KeyNotFoundError,
    LocalStore,
    StoreError,
    VolumeBusyError,
    VolumeData,
    open_store,
)
from cloudmodal.volumes.store import CloudStore, GcsStore


def test_local_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "a")), LocalStore)
    store = open_store(f"file://{tmp_path}/b")
    assert isinstance(store, LocalStore) and store.url == str(tmp_path / "b")


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://host/x", "unsupported store URL"),
        ("s3:///prefix", "names no bucket"),
        ("file://somehost/x", "names a local path"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        open_store(url, env={})


def test_cloud_urls_pick_their_backend() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    assert isinstance(open_store("s3://bucket/p", env=env), CloudStore)
    conn = "AccountName=a;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:1/a"
    assert isinstance(
        open_store("az://container/p", env={"AZURE_STORAGE_CONNECTION_STRING": conn}), CloudStore
    )
    assert isinstance(open_store("gs://bucket/p", env={"STORAGE_EMULATOR_HOST": "127.0.0.1:1"}), GcsStore)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_local_store_refuses_bad_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        LocalStore(tmp_path).put(key, b"x")


def test_local_store_basics(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b", io.BytesIO(b"streamed"))
    store.put("a/c", b"bytes")
    assert store.get("a/b") == b"streamed" and b"".join(store.open_read("a/c")) == b"bytes"
    assert sorted(store.list("a/")) == ["a/b", "a/c"] and list(store.list("a/b")) == ["a/b"]
    store.delete("a/b")
    store.delete("a/b")  # missing: not an error
    with pytest.raises(KeyNotFoundError):
        store.get("a/b")
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]  # no temporary left


def test_reload_refuses_while_a_file_is_open(tmp_path: Path) -> None:
    vol = VolumeData(LocalStore(tmp_path / "store"), FileHead(tmp_path / "head.json"))
    with vol.batch() as b:
        b.put_file(io.BytesIO(b"x"), "f.txt")
    wc = vol.working_copy(tmp_path / "mnt")
    with (tmp_path / "mnt" / "f.txt").open("rb"):
        with pytest.raises(VolumeBusyError, match="open file"):
            wc.reload()
    assert wc.reload() == 1
    vol.close()
