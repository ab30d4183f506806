"""Local stand-ins for the clouds' object stores, each a real server in a subprocess on 127.0.0.1:

- S3: moto's server (``moto_server``, PyPI ``moto[server]``);
- GCS: gcp-storage-emulator (PyPI), in memory;
- Azure Blob: Azurite (npm ``azurite``; ``azurite-blob`` on PATH), data in a temporary directory.

Each ``start_*`` returns a :class:`Server` whose ``env`` is what a process needs to reach it through
:func:`cloudmodal.volumes.open_store` (the same variables the clouds' own tools read) and whose ``new_bucket``
makes a fresh bucket/container. A server dies with its :meth:`Server.stop` (and never outlives the test
process: stdin is a pipe it is not reading, and the fixture stops it).

Checked here (moto 5.2.6, gcp-storage-emulator 2026.7.19, Azurite 3.x):

- A server's output must not go to an undrained pipe: moto's server logs a line per request and stops
  answering (every client times out) once 64 KiB of log fill the pipe — it looks like a deadlock of moto.
- gcp-storage-emulator answers a plain ``PUT /bucket/object`` without an ``ETag``, which obstore's GCS client
  (Rust object_store) refuses: GCS goes through google-cloud-storage (JSON API), which works against it.
- Azurite takes seconds to act on SIGTERM: it is killed (its data directory is throwaway).

A server's port is picked before the server (seconds of imports later) binds it: it is a
:func:`tests.ports.reserved_port`, which nothing else on the machine is handed out meanwhile.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import reserved_port

# Azurite's fixed development account (published in Azure's documentation; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_INSTALL_HINT = (
    "Azurite is not installed: npm install -g azurite (needs Node.js), then azurite-blob is on PATH"
)
VENV_BIN = Path(sys.executable).parent


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, deadline_s: float = 90.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            log = _LOGS.get(proc.pid)
            out = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}:\n{out}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {deadline_s:.0f} s")


@dataclass
class Server:
    name: str  # "s3" | "gcs" | "azure"
    scheme: str  # URL scheme of open_store
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    make_bucket: Callable[[str], None]
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def new_bucket(self) -> str:
        bucket = f"vol-{uuid.uuid4().hex[:12]}"
        self.make_bucket(bucket)
        return bucket

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the data is throwaway; Azurite ignores SIGTERM for seconds
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fn in self.cleanup:
            fn()
        log = _LOGS.pop(self.proc.pid, None)
        if log is not None:
            log.unlink(missing_ok=True)


def _popen(args: list[str]) -> subprocess.Popen[bytes]:
    # Output goes to a file, never to a pipe nobody drains: a server logging a line per request blocks
    # (and stops answering) once a pipe's 64 KiB buffer is full.
    log = tempfile.NamedTemporaryFile(prefix="volume-server-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    _LOGS[proc.pid] = Path(log.name)
    return proc


_LOGS: dict[int, Path] = {}  # server pid → its output file


def start_s3() -> Server:
    port = reserved_port()  # bound by the server once it has started (seconds): tests/ports.py
    proc = _popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
    wait_for_port(port, proc, "moto_server")
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "AKIAFAKEMOTOTESTKEY0",
        "AWS_SECRET_ACCESS_KEY": "fake-secret-for-moto",
        "AWS_REGION": "us-east-1",
    }

    def make_bucket(bucket: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        ).create_bucket(Bucket=bucket)

    return Server("s3", "s3", env, proc, make_bucket)


def start_gcs() -> Server:
    exe = VENV_BIN / "gcp-storage-emulator"
    if not exe.exists():
        raise FileNotFoundError("gcp-storage-emulator is not installed: pip install gcp-storage-emulator")
    port = reserved_port()  # bound by the server once it has started (seconds): tests/ports.py
    proc = _popen([str(exe), "start", "-H", "127.0.0.1", "--port", str(port), "--in-memory", "-q"])
    wait_for_port(port, proc, "gcp-storage-emulator")
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "test"}

    def make_bucket(bucket: str) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": env["STORAGE_EMULATOR_HOST"]},
        )
        client.create_bucket(bucket)

    return Server("gcs", "gs", env, proc, make_bucket)


def start_azurite(data_dir: Path) -> Server:
    exe = shutil.which("azurite-blob")
    if exe is None:
        raise FileNotFoundError(AZURITE_INSTALL_HINT)
    port = reserved_port()  # bound by the server once it has started (seconds): tests/ports.py
    proc = _popen(
        [exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data_dir), "--silent",
         "--skipApiVersionCheck", "--loose", "--disableTelemetry"]
    )  # fmt: skip
    wait_for_port(port, proc, "azurite-blob")
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )
    env = {"AZURE_STORAGE_CONNECTION_STRING": conn}

    def make_bucket(container: str) -> None:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(conn).create_container(container)

    return Server("azure", "az", env, proc, make_bucket)
