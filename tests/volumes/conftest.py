"""The backends the volume conformance suite runs against: a local directory, S3 on moto's server, GCS on
gcp-storage-emulator and Azure Blob on Azurite. Servers start once per session (per xdist worker); every test
gets a fresh prefix in a bucket of its own backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.volumes.servers import Server, start_azurite, start_gcs, start_s3
from tests.volumes.support import Backend

BACKENDS = ["local", "s3", "gcs", "azure"]


def _server(name: str, factory: Any, *args: Any) -> Iterator[Server]:
    try:
        server = factory(*args)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Server]:
    yield from _server("s3", start_s3)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[Server]:
    yield from _server("gcs", start_gcs)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server("azure", start_azurite, tmp_path_factory.mktemp("azurite"))


@pytest.fixture(scope="session")
def buckets() -> dict[str, str]:
    return {}  # server name → the session's bucket on it


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, buckets: dict[str, str]) -> Backend:
    name: str = request.param
    if name == "local":
        return Backend(name, str(tmp_path / "store"), {}, tmp_path)
    server: Server = request.getfixturevalue(f"{name}_server")
    if name not in buckets:
        buckets[name] = server.new_bucket()
    prefix = f"vols/{uuid.uuid4().hex[:10]}"
    return Backend(name, f"{server.scheme}://{buckets[name]}/{prefix}", server.env, tmp_path)
