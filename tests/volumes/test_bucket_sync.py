"""A bucket prefix as a directory (:class:`~cloudmodal.volumes.bucket_sync.BucketCopy`, what a
``CloudBucketMount`` is in a container) against moto's S3 server, opened as a bucket mount opens it
(:func:`~cloudmodal.volumes.store.open_s3_bucket`: endpoint and path style given, keys from the environment)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from cloudmodal.volumes.bucket_sync import BucketCopy, SyncResult
from cloudmodal.volumes.store import open_s3_bucket
from tests.volumes.servers import Server


@pytest.fixture
def bucket(s3_server: Server) -> Iterator[tuple[str, object]]:
    name = s3_server.new_bucket()
    env = s3_server.env
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    yield name, client


def _objects(client: object, bucket: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):  # type: ignore[attr-defined]
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()  # type: ignore[attr-defined]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_prefix_comes_down_and_local_changes_go_back(
    s3_server: Server, bucket: tuple[str, object], tmp_path: Path
) -> None:
    name, client = bucket
    seed = {
        "in/a.txt": b"a",
        "in/sub/b.txt": b"b",
        "in/stay.txt": b"stay",
        "in/dir/": b"",  # a "directory marker": no file
        "in/x": b"x is a file",
        "in/x/y": b"and a directory",  # one of the two cannot be a file here
        "out/not-mine.txt": b"outside the prefix",
    }
    for k, v in seed.items():
        client.put_object(Bucket=name, Key=k, Body=v)  # type: ignore[attr-defined]
    store = open_s3_bucket(
        name, "in/", s3_server.env, endpoint_url=s3_server.env["AWS_ENDPOINT_URL"], force_path_style=True
    )
    copy = BucketCopy(store, tmp_path / "mnt")
    assert _files(copy.directory) == {
        "a.txt": b"a",
        "sub/b.txt": b"b",
        "stay.txt": b"stay",
        "x/y": b"and a directory",
    }
    assert copy.skipped == ["x"]  # (obstore does not list "directory markers" at all)
    assert not copy.has_changes()
    assert copy.sync() == SyncResult(0, 0)

    # another writer adds an object after the copy was made: it is never deleted by this copy
    client.put_object(Bucket=name, Key="in/theirs.txt", Body=b"theirs")  # type: ignore[attr-defined]
    (copy.directory / "a.txt").write_bytes(b"a, changed")
    (copy.directory / "new" / "c.txt").parent.mkdir()
    (copy.directory / "new" / "c.txt").write_bytes(b"c")
    (copy.directory / "sub" / "b.txt").unlink()
    assert copy.has_changes()
    assert copy.sync() == SyncResult(uploaded=2, deleted=1)
    assert _objects(client, name) == {
        "in/a.txt": b"a, changed",
        "in/new/c.txt": b"c",
        "in/stay.txt": b"stay",
        "in/dir/": b"",
        "in/x": b"x is a file",
        "in/x/y": b"and a directory",
        "in/theirs.txt": b"theirs",
        "out/not-mine.txt": b"outside the prefix",
    }
    assert copy.sync() == SyncResult(0, 0)  # nothing changed since: nothing goes


def test_wrong_credentials_fail_the_mount_with_the_store_named(
    s3_server: Server, bucket: tuple[str, object], tmp_path: Path
) -> None:
    name, _ = bucket
    store = open_s3_bucket(
        "no-such-bucket-here", "", s3_server.env, endpoint_url=s3_server.env["AWS_ENDPOINT_URL"]
    )
    with pytest.raises(Exception, match="no-such-bucket-here"):
        BucketCopy(store, tmp_path / "mnt")


S3_CONFIGS: list[tuple[dict[str, Any], dict[str, str]]] = [
    # AWS: virtual-hosted, and AWS's own endpoint even where AWS_ENDPOINT_URL (the volume store's) is set
    (
        {"env": {"AWS_REGION": "eu-west-1"}},
        {"endpoint": "https://bkt.s3.eu-west-1.amazonaws.com", "virtual_hosted_style_request": "true"},
    ),
    (
        {"force_path_style": True},
        {"endpoint": "https://s3.us-east-1.amazonaws.com", "virtual_hosted_style_request": "false"},
    ),
    ({"requester_pays": True}, {"request_payer": "true"}),
    # R2 / GCS: the endpoint given, by path, any region signs
    (
        {"endpoint_url": "https://acct.r2.cloudflarestorage.com/"},
        {
            "endpoint": "https://acct.r2.cloudflarestorage.com",
            "region": "auto",
            "virtual_hosted_style_request": "false",
        },
    ),
    (
        {"endpoint_url": "https://storage.googleapis.com", "env": {"AWS_REGION": "us-central1"}},
        {"endpoint": "https://storage.googleapis.com", "region": "us-central1"},
    ),
    (
        {"env": {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "T"}},
        {"access_key_id": "AK", "secret_access_key": "SK", "session_token": "T"},
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), S3_CONFIGS)
def test_how_a_bucket_mount_addresses_its_bucket(
    kwargs: dict[str, Any], expected: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # the volume store's, never the bucket's
    kwargs = dict(kwargs)
    env = kwargs.pop("env", {})
    store = open_s3_bucket("bkt", "in/", env, **kwargs)
    config = store._store.config  # type: ignore[attr-defined]
    assert {k: config.get(k) for k in expected} == expected
    assert store._store.prefix == "in"  # type: ignore[attr-defined]
