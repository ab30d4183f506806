"""A control plane whose blob store is a bucket (``CLOUDMODAL_BLOB_STORE=s3://…`` on moto's server): a real
``cloudmodal server start`` process and a real worker run a function whose argument and result are over the
inline limit. The payloads are objects in the bucket, the API streams them back from it, and nothing lands in
the control plane's blob directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import basic
import httpx
import msgpack
import pytest
from sqlalchemy import create_engine, select
from support import client_env

from cloudmodal.client.session import run_app
from cloudmodal.server import models
from cloudmodal.server.blobs import BLOB_PREFIX, INLINE_LIMIT, ObjectBlobStore
from cloudmodal.volumes.store import open_store
from tests.volumes.servers import Server, start_s3

BIG = INLINE_LIMIT + 1024 * 1024  # over the inline limit: travels as a blob


@dataclass
class Plane:
    proc: subprocess.Popen[bytes]
    home: Path
    url: str
    token: str
    blob_store: str
    store_env: dict[str, str]


@pytest.fixture(scope="module")
def s3() -> Iterator[Server]:
    server = start_s3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def plane(s3: Server, tmp_path: Path) -> Iterator[Plane]:
    blob_store = f"s3://{s3.new_bucket()}/control-plane/{uuid.uuid4().hex[:8]}"
    home = tmp_path / "home"
    env = dict(os.environ, **s3.env, CLOUDMODAL_HOME=str(home), CLOUDMODAL_PROVIDERS="local")
    env["CLOUDMODAL_BLOB_STORE"] = blob_store
    for key in (
        "CLOUDMODAL_SERVER_URL",
        "CLOUDMODAL_TOKEN",
        "CLOUDMODAL_DATABASE_URL",
        "CLOUDMODAL_BLOB_DIR",
    ):
        env.pop(key, None)
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudmodal.cli.main", "server", "start", "--foreground", "--port", "0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        info = _wait_for_server_json(proc, home / "server.json", log_path)
        yield Plane(proc, home, info["url"], info["token"], blob_store, s3.env)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_for_server_json(proc: subprocess.Popen[bytes], path: Path, log_path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"`server start` exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
            )
        try:
            info: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid and info.get("url"):
            return info
        time.sleep(0.05)
    raise AssertionError(f"`server start` wrote no server.json within 60 s: {log_path.read_text()[-3000:]}")


def _blob_refs(home: Path) -> tuple[set[str], set[str]]:
    """The blobs the control plane's inputs and outputs reference (its SQLite database, read beside it)."""
    engine = create_engine(f"sqlite:///{home / 'cloudmodal.db'}")
    try:
        with engine.connect() as conn:
            args = {r[0] for r in conn.execute(select(models.inputs.c.args_blob)).all() if r[0]}
            outs = {r[0] for r in conn.execute(select(models.outputs.c.data_blob)).all() if r[0]}
    finally:
        engine.dispose()
    return args, outs


def test_payloads_over_the_inline_limit_live_in_the_bucket(plane: Plane) -> None:
    big = os.urandom(BIG)  # random: its blobs are this test's, whatever else ran against the bucket
    with client_env(plane.url, plane.token), run_app(basic.app, show_logs=False):
        assert basic.echo_bytes.remote(big) == big

    args, outs = _blob_refs(plane.home)
    assert len(args) == 1 and len(outs) == 1, (args, outs)  # the argument and the result went as blobs
    bucket = open_store(plane.blob_store, env=plane.store_env)
    in_bucket = {key.rpartition("/")[2]: key for key in bucket.list(BLOB_PREFIX)}
    assert args | outs <= set(in_bucket), (
        f"blobs missing from {plane.blob_store}: {args | outs} vs {in_bucket}"
    )

    headers = {"Authorization": f"Bearer {plane.token}"}
    for blob_id in args | outs:
        stored = bucket.get(in_bucket[blob_id])
        assert big in stored  # the pickled argument, the pickled result
        # the API streams it from the bucket (chunked, no length known up front), whole
        with httpx.stream("GET", f"{plane.url}/v1/blobs/{blob_id}", headers=headers, timeout=30) as r:
            assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
            got = b"".join(r.iter_bytes())
        assert got == stored
    # one larger than the bucket's read chunks (8 MiB) goes up and comes back whole, in parts
    large = os.urandom(20 * 1024 * 1024 + 3)
    r = httpx.post(f"{plane.url}/v1/blobs", content=large, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    large_id = msgpack.unpackb(r.content)["blob_id"]
    assert bucket.get(ObjectBlobStore.key(large_id)) == large
    with httpx.stream("GET", f"{plane.url}/v1/blobs/{large_id}", headers=headers, timeout=60) as r:
        parts = list(r.iter_raw())
    assert b"".join(parts) == large and len(parts) > 1
    # a blob the bucket lacks is a 404 answer, not a broken response
    r = httpx.get(f"{plane.url}/v1/blobs/bl-{'0' * 40}", headers=headers, timeout=30)
    assert r.status_code == 404 and "not found" in r.text

    # nothing in the local blob directory; no upload left in the spool
    assert not list((plane.home / "blobs").glob("**/bl-*"))
    assert not list((plane.home / "blob-uploads").glob("**/.tmp-*"))
