"""After a run with an inline secret, the control plane's state directory (database, WAL, logs, blobs, worker
logs) and the worker's cache hold the secret's value nowhere, and nothing there is open to other users."""

from __future__ import annotations

import hashlib
import importlib
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from support import start_server, use_server

from cloudmodal.client.session import run_app

# The secret's value reaches the app through this process's environment, so that the app's source (which
# is shipped to the control plane as a blob) does not contain it.
SECRET_APP = """
import hashlib
import os

import cloudmodal

app = cloudmodal.App("state-files-probe")
secret = cloudmodal.Secret.from_dict({"PROBE_API_KEY": os.environ.get("STATE_FILES_PROBE_SECRET", "unset")})


@app.function(secrets=[secret])
def fingerprint() -> str:
    # Only a hash goes back (results are stored too): the test compares it to the value it chose.
    return hashlib.sha256(os.environ["PROBE_API_KEY"].encode()).hexdigest()
"""


@pytest.fixture
def secret_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, str]]:
    value = "cm-probe-secret-" + secrets.token_hex(16)
    monkeypatch.setenv("STATE_FILES_PROBE_SECRET", value)
    d = tmp_path / "app"
    d.mkdir()
    (d / "state_files_probe.py").write_text(SECRET_APP)
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("state_files_probe", None)
    module = importlib.import_module("state_files_probe")
    # The worker process inherits this process's environment, where the value is (it is the app's, not
    # ours): drop it now that the app is built, so only the control plane's handling can put it in a file.
    monkeypatch.delenv("STATE_FILES_PROBE_SECRET")
    yield module, value
    sys.modules.pop("state_files_probe", None)


def _audit(roots: list[Path], needle: bytes) -> tuple[list[str], list[str]]:
    """(files containing ``needle``, files or directories open to group/others with their modes)."""
    leaks: list[str] = []
    exposed: list[str] = []
    for root in roots:
        paths = [root, *sorted(root.rglob("*"))]
        for p in paths:
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue  # a temporary file gone since the listing
            if stat.S_IMODE(st.st_mode) & 0o077 and not stat.S_ISLNK(st.st_mode):
                exposed.append(f"{p} ({stat.S_IMODE(st.st_mode):o})")
            if stat.S_ISREG(st.st_mode):
                try:
                    data = p.read_bytes()
                except FileNotFoundError:
                    continue
                if needle in data:
                    leaks.append(str(p))
    return leaks, exposed


def test_no_secret_value_in_any_state_file_and_none_open_to_others(
    tmp_path: Path, secret_app: tuple[ModuleType, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, value = secret_app
    state = tmp_path / "state"
    cache = tmp_path / "worker-cache"
    monkeypatch.setenv("CLOUDMODAL_CACHE_DIR", str(cache))  # the workers' cache (shipped source), inherited
    handle = start_server(state, f"sqlite:///{state / 'cloudmodal.db'}")
    try:
        with use_server(handle), run_app(app.app, show_logs=False):
            got = app.fingerprint.remote()
        # The control plane is still up: its database's write-ahead log and shared memory exist now.
        assert any(p.name.endswith("-wal") for p in state.iterdir())
        during = _audit([state, cache], value.encode())
    finally:
        handle.stop()
    after = _audit([state, cache], value.encode())

    # Negative control: the secret did reach the function (it is stored somewhere, in some form).
    assert got == hashlib.sha256(value.encode()).hexdigest()
    assert (state / "cloudmodal.db").exists() and any(cache.rglob("state_files_probe.py"))

    leaks = sorted(set(during[0] + after[0]))
    exposed = sorted(set(during[1] + after[1]))
    assert not leaks and not exposed, (
        f"files holding the secret's value: {leaks or 'none'}; "
        f"files or directories open to other users: {exposed or 'none'}"
    )
