"""`cloudmodal server start --tls`, `cloudmodal login` and `cloudmodal profile`: real processes, a real
background control plane serving HTTPS with its generated certificate on 127.0.0.1.

`login` and `profile` run as a small program that mounts exactly the commands of
:mod:`cloudmodal.cli.login_cmd` (so these tests do not depend on where the main CLI registers them).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmodal import tls

LOGIN_CLI = """
import typer
from cloudmodal.cli import login_cmd
app = typer.Typer()
app.command("login")(login_cmd.login_command)
app.add_typer(login_cmd.profile_app, name="profile")
app()
"""

CLEAR = ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN", "CLOUDMODAL_TLS_FINGERPRINT", "CLOUDMODAL_PROFILE")


def cloudmodal(
    *args: str, env: dict[str, str], check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"cloudmodal {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def login_cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`login ...` / `profile ...` in a process whose stdin is a pipe (``stdin``) or /dev/null: no tty."""
    return subprocess.run(
        [sys.executable, "-c", LOGIN_CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def server_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A background `cloudmodal server start --tls` with its own state dir; stopped after."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAR}
    env["CLOUDMODAL_HOME"] = str(tmp_path / "server-home")
    yield env
    info = Path(env["CLOUDMODAL_HOME"]) / "server.json"
    pid = json.loads(info.read_text())["pid"] if info.exists() else None
    cloudmodal("server", "stop", env=env, check=False)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def client_env(tmp_path: Path) -> dict[str, str]:
    """Another user's machine: its own CLOUDMODAL_HOME, nothing configured."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAR}
    env["CLOUDMODAL_HOME"] = str(tmp_path / "client-home")
    return env


@pytest.fixture
def tls_server(server_env: dict[str, str]) -> dict[str, str]:
    started = cloudmodal("server", "start", "--tls", "--port", "0", env=server_env)
    info = json.loads((Path(server_env["CLOUDMODAL_HOME"]) / "server.json").read_text())
    return {
        "url": info["url"],
        "owner": info["token"],
        "fingerprint": info["tls_fingerprint"],
        "stdout": started.stdout,
    }


def _member_token(server_env: dict[str, str], name: str) -> str:
    made = cloudmodal("token", "create", "--member", "--name", name, env=server_env)
    return made.stdout.strip().splitlines()[-1]


def test_server_start_tls_generates_a_private_certificate_and_shows_its_fingerprint(
    server_env: dict[str, str], tls_server: dict[str, str]
) -> None:
    state = Path(server_env["CLOUDMODAL_HOME"])
    fp = tls_server["fingerprint"]
    assert tls_server["url"].startswith("https://")
    assert fp == tls.cert_fingerprint(state / "tls" / "cert.pem")
    assert tls.display_fingerprint(fp) in tls_server["stdout"]
    assert f"--fingerprint {fp}" in tls_server["stdout"]
    assert mode(state / "tls" / "key.pem") == 0o600 and mode(state / "tls" / "cert.pem") == 0o600
    status = cloudmodal("server", "status", env=server_env).stdout
    assert "up" in status and f"(pinned): {tls.display_fingerprint(fp)}" in status
    # Restarted: the same certificate (clients' pins stay valid).
    cloudmodal("server", "stop", env=server_env)
    cloudmodal("server", "start", "--tls", "--port", "0", env=server_env)
    again = json.loads((state / "server.json").read_text())
    assert again["tls_fingerprint"] == fp and again["url"].startswith("https://")


def test_login_trust_on_first_use_refuses_without_a_terminal(
    client_env: dict[str, str], server_env: dict[str, str], tls_server: dict[str, str]
) -> None:
    token = _member_token(server_env, "alice")
    profiles = Path(client_env["CLOUDMODAL_HOME"]) / "profiles.json"
    refused = login_cli("login", tls_server["url"], env=client_env, stdin=token + "\n")
    assert refused.returncode == 2, refused.stderr
    assert "without a terminal" in refused.stderr and tls_server["fingerprint"] in refused.stderr
    assert tls.display_fingerprint(tls_server["fingerprint"]) in refused.stderr
    assert not profiles.exists()
    # A wrong --fingerprint: refused, naming both.
    wrong = "ab" * 32
    bad = login_cli("login", tls_server["url"], "--fingerprint", wrong, env=client_env, stdin=token + "\n")
    assert bad.returncode == 1 and tls.display_fingerprint(wrong) in bad.stderr
    assert tls.display_fingerprint(tls_server["fingerprint"]) in bad.stderr and not profiles.exists()
    # The controls: --yes trusts what is presented; --fingerprint (colons, as printed) pins with no question.
    yes = login_cli(
        "login", tls_server["url"], "--yes", "--profile", "tofu", env=client_env, stdin=token + "\n"
    )
    assert yes.returncode == 0, yes.stderr
    shown = tls.display_fingerprint(tls_server["fingerprint"])
    pinned = login_cli(
        "login", tls_server["url"], "--fingerprint", shown, "--profile", "team", env=client_env, stdin=token
    )
    assert pinned.returncode == 0, pinned.stderr
    saved = json.loads(profiles.read_text())
    assert saved["active"] == "team"
    assert {p["fingerprint"] for p in saved["profiles"].values()} == {tls_server["fingerprint"]}
    assert mode(profiles) == 0o600


def test_login_checks_the_token(
    client_env: dict[str, str], server_env: dict[str, str], tls_server: dict[str, str]
) -> None:
    fp = tls_server["fingerprint"]
    bad = login_cli("login", tls_server["url"], "--fingerprint", fp, env=client_env, stdin="cm_not-a-token\n")
    assert bad.returncode == 1 and "refused this token" in bad.stderr, bad.stderr
    assert not (Path(client_env["CLOUDMODAL_HOME"]) / "profiles.json").exists()
    good = login_cli(
        "login", tls_server["url"], "--fingerprint", fp, env=client_env, stdin=tls_server["owner"]
    )
    assert good.returncode == 0, good.stderr


def test_login_asks_on_a_terminal(client_env: dict[str, str], tls_server: dict[str, str]) -> None:
    """Trust on first use with a terminal: the fingerprint is shown and a "y" accepts it (an "n" saves
    nothing: the control)."""
    outputs = {}
    for answer in ("n", "y"):
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-c", LOGIN_CLI, "login", tls_server["url"], "--token", tls_server["owner"]],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=client_env,
            start_new_session=True,
        )
        os.close(slave)
        out = b""
        deadline = time.monotonic() + 60
        answered = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            if not answered and b"Trust this certificate" in out:
                os.write(master, answer.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
        proc.wait(30)
        os.close(master)
        outputs[answer] = (proc.returncode, out.decode(errors="replace"))
        saved = Path(client_env["CLOUDMODAL_HOME"]) / "profiles.json"
        assert saved.exists() == (answer == "y"), outputs[answer]
    assert outputs["n"][0] != 0 and "Not trusted" in outputs["n"][1]
    assert outputs["y"][0] == 0, outputs["y"][1]
    assert tls.display_fingerprint(tls_server["fingerprint"]) in outputs["y"][1].replace("\r\n", "\n")


def test_profiles_round_trip_switch_and_drive_the_client(
    client_env: dict[str, str], server_env: dict[str, str], tls_server: dict[str, str]
) -> None:
    fp = tls_server["fingerprint"]
    alice, bob = _member_token(server_env, "alice"), _member_token(server_env, "bob")
    for name, token in (("alice", alice), ("bob", bob)):
        p = login_cli(
            "login", tls_server["url"], "--fingerprint", fp, "--profile", name, env=client_env, stdin=token
        )
        assert p.returncode == 0, p.stderr
    listed = login_cli("profile", "list", "--wide", env=client_env)
    assert listed.returncode == 0, listed.stderr
    assert (
        "alice" in listed.stdout and "bob" in listed.stdout and tls.display_fingerprint(fp) in listed.stdout
    )
    assert alice not in listed.stdout and bob not in listed.stdout and "cm_" not in listed.stdout
    saved = Path(client_env["CLOUDMODAL_HOME"]) / "profiles.json"
    assert alice in saved.read_text()  # the control: the token is there to be hidden

    probe = "from cloudmodal import config; r = config.configured_server(); print(r.source, r.token[-6:])"

    def which(env: dict[str, str]) -> str:
        return subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
        ).stdout.strip()

    assert which(client_env) == f"profile:bob {bob[-6:]}"  # the last login is active
    assert login_cli("profile", "activate", "alice", env=client_env).returncode == 0
    assert which(client_env) == f"profile:alice {alice[-6:]}"
    assert which(dict(client_env, CLOUDMODAL_PROFILE="bob")) == f"profile:bob {bob[-6:]}"
    missing = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=dict(client_env, CLOUDMODAL_PROFILE="x"),
    )
    assert missing.returncode != 0 and "No profile named 'x'" in missing.stderr
    # CLOUDMODAL_SERVER_URL still comes first.
    env_first = dict(client_env, CLOUDMODAL_SERVER_URL="http://127.0.0.1:9", CLOUDMODAL_TOKEN="cm_envtok")
    assert which(env_first) == "env envtok"

    # A real client command through the active profile: HTTPS, pinned, the profile's token.
    apps = cloudmodal("app", "list", env=client_env)
    assert apps.returncode == 0, apps.stderr
    # A profile whose pin is wrong is refused, with the way to fix it (no fall-back to anything else).
    data = json.loads(saved.read_text())
    data["profiles"]["alice"]["fingerprint"] = "ab" * 32
    saved.write_text(json.dumps(data))
    refused = cloudmodal("app", "list", env=client_env, check=False)
    assert refused.returncode != 0 and "refusing to connect" in refused.stderr
    assert f"--fingerprint {fp}" in refused.stderr

    assert login_cli("profile", "remove", "alice", env=client_env).returncode == 0
    left = json.loads(saved.read_text())
    assert list(left["profiles"]) == ["bob"] and left["active"] is None
    assert login_cli("profile", "activate", "alice", env=client_env).returncode == 2
