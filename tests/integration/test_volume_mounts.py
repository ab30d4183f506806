"""Mount options and bucket mounts end to end, through real worker processes on SQLite and PostgreSQL: a volume
mounted read-only refuses writes and is never committed (while a writable mount in the same container is, at
exit: the negative control); a volume's directory mounted alone (``sub_path``) shows only it and commits under
it; an S3 bucket (moto's server) mounted writable comes down into the container and the function's files go
back up, and mounted read-only refuses writes and leaves the bucket as it was."""

from __future__ import annotations

import importlib
import io
import os
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import boto3
import pytest

from cloudmodal.client.session import run_app
from cloudmodal.server.app import ServerHandle
from cloudmodal.volume import Volume
from tests.volumes.servers import Server, start_s3

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the workers bind-mount at /mnt (read-only by a read-only bind): needs root"
)


def _eventually(what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[Server, str, Any]]:
    try:
        server = start_s3()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    try:
        bucket = server.new_bucket()
        client = boto3.client(
            "s3",
            endpoint_url=server.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
            region_name=server.env["AWS_REGION"],
        )
        yield server, bucket, client
    finally:
        server.stop()


def _objects(client: Any, bucket: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for o in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.fixture(scope="module")
def app_module(s3: tuple[Server, str, Any]) -> ModuleType:
    server, bucket, _ = s3
    os.environ["CLOUDMODAL_TEST_S3_ENDPOINT"] = server.env["AWS_ENDPOINT_URL"]
    os.environ["CLOUDMODAL_TEST_BUCKET"] = bucket
    import volume_mounts_app

    return importlib.reload(volume_mounts_app)  # the module's mounts name this module's bucket


def test_mount_options_and_buckets_in_real_workers(
    control_plane: ServerHandle, app_module: ModuleType, s3: tuple[Server, str, Any]
) -> None:
    m = app_module
    _, bucket, client = s3
    seed = {"in/seed.txt": b"seeded", "in/change-me.txt": b"original", "out/elsewhere.txt": b"outside"}
    for k, v in seed.items():
        client.put_object(Bucket=bucket, Key=k, Body=v)
    vol = Volume.from_name("mount-options-data", create_if_missing=True)
    with vol.batch_upload() as b:
        b.put_file(io.BytesIO(b"top"), "/top.txt")
        b.put_file(io.BytesIO(b"w"), "/models/v2/w.txt")
        b.put_file(io.BytesIO(b"v1"), "/models/v1/w.txt")
    version_before = vol.info().version

    with run_app(m.app, show_logs=False):
        # -- read-only volume and read-only bucket, with a writable marker volume beside them
        got = m.try_writes.remote("attempt.txt")
        assert got["volume_top"] == "top"
        assert got["volume_write"] == got["volume_change"] == got["volume_delete"] == "EROFS"
        assert got["volume_commit"].startswith("InvalidError: ") and "read-only" in got["volume_commit"]
        assert got["volume_reload"] == "allowed"  # others' commits still come in
        assert got["bucket_seed"] == "seeded"
        assert got["bucket_write"] == got["bucket_change"] == got["bucket_delete"] == "EROFS"

        # -- one directory of the volume
        assert m.in_sub_path.remote("from-sub.txt") == ["w.txt"]
        assert b"".join(vol.read_file("/models/v2/from-sub.txt")) == b"written under the sub path"

        # -- a writable bucket: the seeded objects come down, the function's files go up (in the background)
        rw = m.bucket_read_write.remote("out.txt")
        assert rw["seed"] == "seeded"
        assert rw["files"] == ["change-me.txt", "seed.txt", "written", "written/out.txt"]  # only in/
        _eventually(
            "the function's files in the bucket",
            lambda: (
                _objects(client, bucket).get("in/written/out.txt") == b"from the function"
                and _objects(client, bucket).get("in/change-me.txt") == b"changed by the function"
            ),
        )

    # The containers exit: the marker volume's uncommitted file is committed then (so the exit commits ran) ...
    marker = Volume.from_name("mount-options-marker")
    _eventually(
        "the exiting container's commit", lambda: "attempt.txt" in {e.path for e in marker.listdir("/")}
    )
    # ... and the read-only volume was never committed: one version more, the sub_path commit's.
    assert vol.info().version == version_before + 1
    assert {e.path for e in vol.listdir("/", recursive=True)} == {
        "top.txt", "models", "models/v1", "models/v1/w.txt", "models/v2", "models/v2/w.txt",
        "models/v2/from-sub.txt",
    }  # fmt: skip
    # The bucket holds the seed, the writable mount's writes, and nothing from the read-only one.
    assert _objects(client, bucket) == {
        "in/seed.txt": b"seeded",
        "in/change-me.txt": b"changed by the function",
        "in/written/out.txt": b"from the function",
        "out/elsewhere.txt": b"outside",
    }
