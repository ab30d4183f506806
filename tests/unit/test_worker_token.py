"""How a worker takes its control-plane token: whichever way it came, it leaves the environment."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cloudmodal.worker.runtime import take_token

TOKEN = "cm_" + "t0k3n" * 8


def test_from_stdin_line_removes_the_marker_and_any_env_copy() -> None:
    env = {"CLOUDMODAL_CREDENTIALS": "stdin", "CLOUDMODAL_TOKEN": "cm_stale", "KEEP": "1"}
    stdin = io.StringIO(json.dumps({"CLOUDMODAL_TOKEN": TOKEN}) + "\nnot for us\n")
    assert take_token(env, stdin) == TOKEN
    assert env == {"KEEP": "1"}
    assert stdin.readline() == "not for us\n"  # exactly one line consumed


def test_from_the_environment_is_accepted_and_removed() -> None:
    env = {"CLOUDMODAL_TOKEN": TOKEN, "KEEP": "1"}
    assert take_token(env, io.StringIO()) == TOKEN
    assert env == {"KEEP": "1"}


def test_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    env = {"CLOUDMODAL_TOKEN_FILE": str(path)}
    assert take_token(env, io.StringIO()) == TOKEN
    assert env == {}
    with pytest.raises(RuntimeError, match="CLOUDMODAL_TOKEN_FILE"):
        take_token({"CLOUDMODAL_TOKEN_FILE": str(tmp_path / "missing")}, io.StringIO())


def test_none_and_malformed() -> None:
    assert take_token({}, io.StringIO()) is None
    assert take_token({"CLOUDMODAL_CREDENTIALS": "stdin"}, io.StringIO("")) is None
    with pytest.raises(RuntimeError, match="not a JSON object"):
        take_token({"CLOUDMODAL_CREDENTIALS": "stdin"}, io.StringIO("[1]\n"))
    with pytest.raises(RuntimeError, match="Unknown CLOUDMODAL_CREDENTIALS"):
        take_token({"CLOUDMODAL_CREDENTIALS": "fd:3"}, io.StringIO())


def test_a_token_given_in_the_environment_leaves_the_process_environ_block(tmp_path):
    """What /proc/<pid>/environ shows (the block copied at exec) loses the token once the worker took it, so
    the user's code and what it starts cannot read it there; the other variables stay."""
    import os
    import subprocess
    import sys

    probe = (
        "from pathlib import Path\n"
        "from cloudmodal.worker.runtime import take_token\n"
        "before = Path('/proc/self/environ').read_bytes()\n"
        "token = take_token()\n"
        "after = Path('/proc/self/environ').read_bytes()\n"
        "print(token, b'cm_secret_value' in before, b'cm_secret_value' in after, b'KEEP_ME=1' in after)\n"
    )
    env = {**os.environ, "CLOUDMODAL_TOKEN": "cm_secret_value", "KEEP_ME": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    # before: the control (the probe sees the token where it was); after: gone, the rest kept
    assert out.stdout.split() == ["cm_secret_value", "True", "False", "True"]
