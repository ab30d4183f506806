"""The user's code in a real worker process does not see the worker's control-plane token (nor the control
plane's own secrets): not in ``os.environ``, not in a subprocess's environment, not in
``/proc/<pid>/environ``, not on stdin; nested ``.remote()`` calls from the user's code still authenticate.

The test recognizes a token by its hash in the control plane's tokens table (the token itself is never
stored), so it needs no back door into the worker; a positive control checks that the recognizer finds the
worker's real token where the worker legitimately keeps it (its own process memory).
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select
from support import use_server

from cloudmodal.client.session import run_app
from cloudmodal.providers.local import LocalProvider
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle, default_settings
from cloudmodal.server.auth import hash_token

# The app runs in the worker; it reports everything an attacker's function could look at cheaply.
PROBE_APP = """
import os
import subprocess
import sys

import cloudmodal

app = cloudmodal.App("credentials-probe")


@app.function()
def double(x: int) -> int:
    return 2 * x


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\\0", b"\\n").decode(errors="replace")
    except OSError as e:
        return f"<unreadable: {e}>"


@app.function()
def look() -> dict:
    from cloudmodal import config
    from cloudmodal.worker import runtime

    ref = config.configured_server()
    creds = getattr(runtime, "credentials", lambda: None)()
    child = subprocess.run(
        [sys.executable, "-c", "import sys; sys.stdout.write(open('/proc/self/environ', 'rb').read()"
         ".replace(bytes(1), b'\\\\n').decode(errors='replace'))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {
        "env": dict(os.environ),
        "env_cmd": subprocess.run(["env"], capture_output=True, text=True, check=True).stdout,
        "proc_self": _read("/proc/self/environ"),
        "child_proc": child,
        "parent_proc": _read(f"/proc/{os.getppid()}/environ"),
        "stdin": sys.stdin.read() if sys.stdin is not None else "",
        "configured_token": (ref.token or "") if ref is not None else "",
        "argv": list(sys.argv),
        "worker_id": os.environ.get("CLOUDMODAL_WORKER_ID"),
        # Where the worker legitimately keeps its token: in its own memory (the positive control).
        "in_process_token": creds.token if creds is not None else os.environ.get("CLOUDMODAL_TOKEN"),
        "nested": double.remote(21),
    }
"""

TOKEN_RE = re.compile(r"cm_[A-Za-z0-9_\-]{20,}")
SECRET_KEY = Fernet.generate_key().decode()
DB_PASSWORD = "pg-password-" + "q7Zx" * 4


@pytest.fixture
def probe_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    d = tmp_path / "app"
    d.mkdir()
    (d / "credentials_probe.py").write_text(PROBE_APP)
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("credentials_probe", None)
    yield importlib.import_module("credentials_probe")
    sys.modules.pop("credentials_probe", None)


def _token_hashes(handle: ServerHandle) -> dict[str, str]:
    """token hash -> scope, for every token the control plane knows."""
    t = models.tokens
    with handle.cp.db.read() as conn:
        return {h: s for h, s in conn.execute(select(t.c.token_hash, t.c.scope))}


def _tokens_in(text: str, known: dict[str, str]) -> list[str]:
    """Scopes of the known tokens whose value appears in ``text``."""
    return [known[hash_token(c)] for c in TOKEN_RE.findall(text) if hash_token(c) in known]


@pytest.mark.parametrize("standby", [True, False], ids=["standby-worker", "spawned-worker"])
def test_user_code_cannot_see_the_worker_token(
    tmp_path: Path, probe_app: ModuleType, monkeypatch: pytest.MonkeyPatch, standby: bool
) -> None:
    # The control plane's own secrets, in its environment: the worker inherits the rest of that environment.
    monkeypatch.setenv("CLOUDMODAL_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("PGPASSWORD", DB_PASSWORD)
    state = tmp_path / "state"
    settings = default_settings(
        state,
        database_url=f"sqlite:///{state / 'cloudmodal.db'}",
        lease_s=6.0,
        heartbeat_s=0.5,
        worker_timeout_s=10.0,
        reconcile_interval_s=0.1,
    )
    provider = LocalProvider(state_dir=state / "workers", gpus=[], standby=standby)
    if standby:  # make the first worker the pre-started interpreter (the embedded default's path)
        deadline = time.monotonic() + 60
        while provider._standby is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert provider._standby is not None, "the standby interpreter did not start"
    handle = ServerHandle(settings, providers={"local": provider}).start_in_thread()
    try:
        with use_server(handle), run_app(probe_app.app, show_logs=False):
            seen = probe_app.look.remote()
        known = _token_hashes(handle)
    finally:
        handle.stop()

    worker_scope = f"worker:{seen['worker_id']}"
    assert ("--standby" in seen["argv"]) == standby  # the path this case is about was the one taken
    # Negative control: the worker had a token, it authenticated with it (nested call), and the recognizer
    # finds it where it does live.
    assert seen["nested"] == 42
    assert worker_scope in known.values()
    assert _tokens_in(seen["in_process_token"] or "", known) == [worker_scope]

    env_text = "\n".join(f"{k}={v}" for k, v in seen["env"].items())
    for where in ("env_cmd", "proc_self", "child_proc", "stdin", "configured_token"):
        text = seen[where]
        assert _tokens_in(text, known) == [], f"a control-plane token is visible to user code in {where}"
        assert "CLOUDMODAL_TOKEN=" not in text, where
        assert SECRET_KEY not in text and DB_PASSWORD not in text, f"a control-plane secret in {where}"
    assert _tokens_in(env_text, known) == [], "a control-plane token is in the user function's os.environ"
    assert "CLOUDMODAL_TOKEN" not in seen["env"]
    assert SECRET_KEY not in env_text and DB_PASSWORD not in env_text
    # The worker's parent is the control plane (this process): it never holds the worker's token.
    assert worker_scope not in _tokens_in(seen["parent_proc"], known)
