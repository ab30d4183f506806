"""`cloudmodal server start` is locked by default and `cloudmodal token` manages who gets in: real
`cloudmodal` processes, a real background control plane on 127.0.0.1, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cloudmodal.cli.main import app as cli_app


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"cloudmodal {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def until(cond: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a user whose state dir does not exist yet; the server is stopped after."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")}
    env["CLOUDMODAL_HOME"] = str(tmp_path / "state")
    yield env
    info = Path(env["CLOUDMODAL_HOME"]) / "server.json"
    pid = json.loads(info.read_text())["pid"] if info.exists() else None
    cli("server", "stop", env=env, check=False)
    if pid is not None:  # the test killed it, or stop failed: never leave a server behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def server_info(env: dict[str, str]) -> dict[str, object]:
    return json.loads((Path(env["CLOUDMODAL_HOME"]) / "server.json").read_text())


def test_server_start_requires_tokens_and_tokens_can_be_managed(home: dict[str, str]) -> None:
    start = cli("server", "start", "--port", "0", env=home)
    assert "WARNING" not in start.stderr
    state = Path(home["CLOUDMODAL_HOME"])
    info = server_info(home)
    url, owner = str(info["url"]), str(info["token"])
    assert mode(state) == 0o700
    assert mode(state / "server.json") == 0o600
    assert mode(state / "server.log") == 0o600
    assert mode(state / "cloudmodal.db") & 0o077 == 0  # the server runs with umask 077

    # Anonymous loopback is refused (the old default let it in as admin); the owner token works.
    r = httpx.get(url + "/v1/apps")
    assert r.status_code == 401, r.text
    assert httpx.get(url + "/v1/apps", headers=bearer(owner)).status_code == 200

    # A member token: lists apps, may not manage tokens.
    made = cli("token", "create", "--member", "--name", "ci", env=home)
    member = made.stdout.strip().splitlines()[-1]
    assert member.startswith("cm_") and member != owner
    assert "shown only this once" in made.stderr
    assert httpx.get(url + "/v1/apps", headers=bearer(member)).status_code == 200
    assert httpx.get(url + "/v1/tokens", headers=bearer(member)).status_code == 403
    assert httpx.post(url + "/v1/tokens", headers=bearer(member)).status_code == 403

    # Listing shows ids, names and kinds, never a token.
    listed = json.loads(cli("token", "list", "--json", env=home).stdout)
    row = next(t for t in listed if t["name"] == "ci")
    assert row["kind"] == "member" and not row["revoked"] and not row.get("apps")
    assert row["id"] in made.stderr
    table = cli("token", "list", env=home).stdout
    assert row["id"] in table and "ci" in table
    assert member not in table and owner not in table and "cm_" not in json.dumps(listed)

    # The CLI with the member token: token management is refused with a clear error.
    as_member = dict(home, CLOUDMODAL_SERVER_URL=url, CLOUDMODAL_TOKEN=member)
    refused = cli("token", "list", env=as_member, check=False)
    assert refused.returncode == 1 and "Error:" in refused.stderr

    # A member token scoped to named apps.
    scoped = json.loads(cli("token", "create", "--app", "b-app", "--app", "a-app", "--json", env=home).stdout)
    assert scoped["kind"] == "member" and sorted(scoped["apps"]) == ["a-app", "b-app"]

    # A proxy-auth token: for web endpoints' Modal-Key/Modal-Secret headers; the API refuses it.
    proxy = cli("token", "create", "--proxy", "--app", "a-app", env=home).stdout.strip().splitlines()
    key = next(line.split(": ", 1)[1] for line in proxy if line.startswith("Modal-Key: "))
    secret = next(line.split(": ", 1)[1] for line in proxy if line.startswith("Modal-Secret: "))
    assert key.startswith("tk") and secret.startswith("cm_")
    refused_api = httpx.get(url + "/v1/apps", headers=bearer(secret))
    assert refused_api.status_code == 403 and "proxy-auth token" in refused_api.text
    listed_proxy = next(
        t for t in json.loads(cli("token", "list", "--json", env=home).stdout) if t["id"] == key
    )
    assert listed_proxy["kind"] == "proxy" and listed_proxy["apps"] == ["a-app"]

    # `server token`: the shortcut for a new owner token.
    extra_owner = cli("server", "token", env=home).stdout.strip().splitlines()[-1]
    assert httpx.get(url + "/v1/tokens", headers=bearer(extra_owner)).status_code == 200

    # Revoked: refused within seconds.
    cli("token", "revoke", row["id"], env=home)
    assert until(lambda: httpx.get(url + "/v1/apps", headers=bearer(member)).status_code == 401)
    listed = json.loads(cli("token", "list", "--json", env=home).stdout)
    assert next(t for t in listed if t["id"] == row["id"])["revoked"]

    cli("server", "stop", env=home)
    assert not (state / "server.json").exists()


def test_a_restarted_server_revokes_the_owner_tokens_of_earlier_starts(home: dict[str, str]) -> None:
    """The owner token lives only in server.json: a server that stops revokes its own, and one that starts
    after a server was killed (server.json left behind) revokes that one."""
    # In the foreground, as our child: killed, it is reaped here (a background one's zombie looks alive).
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudmodal.cli.main", "server", "start", "--foreground", "--port", "0"],
        env=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        state = Path(home["CLOUDMODAL_HOME"])
        assert until(lambda: (state / "server.json").exists(), timeout=60), "the control plane did not start"
        first = server_info(home)
        url = str(first["url"])

        def healthy() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        assert until(healthy, timeout=60)
    finally:
        proc.kill()  # no chance to clean up: server.json stays
        proc.wait()
    cli("server", "start", "--port", "0", env=home)
    second = server_info(home)
    url = str(second["url"])
    assert second["token"] != first["token"]
    assert httpx.get(url + "/v1/apps", headers=bearer(str(first["token"]))).status_code == 401
    assert httpx.get(url + "/v1/apps", headers=bearer(str(second["token"]))).status_code == 200
    kept = cli("token", "create", "--member", env=home).stdout.strip().splitlines()[-1]
    cli("server", "stop", env=home)

    cli("server", "start", "--port", "0", env=home)
    url = str(server_info(home)["url"])
    assert httpx.get(url + "/v1/apps", headers=bearer(str(second["token"]))).status_code == 401
    assert httpx.get(url + "/v1/apps", headers=bearer(kept)).status_code == 200  # made tokens stay


def test_anonymous_loopback_only_with_the_flag_and_a_warning(home: dict[str, str]) -> None:
    """The control for the 401 above: with the explicit opt-in, the same request gets in."""
    start = cli("server", "start", "--port", "0", "--allow-anonymous-loopback", env=home)
    assert "WARNING" in start.stderr and "any request from this machine's loopback" in start.stderr
    url = str(server_info(home)["url"])
    assert httpx.get(url + "/v1/apps").status_code == 200


@pytest.mark.parametrize(
    "args, message",
    [
        (["token", "create", "--owner", "--app", "x"], "--app limits member tokens only"),
        (["token", "create", "--app", " "], "may not be empty"),
        (["token", "create", "--app", "a,b"], "not an app name"),
        (["token", "create", "--admin"], "No such option"),
        (["token", "create", "--proxy", "--owner"], "not both"),
        (["token", "revoke", "cm_abc"], "looks like a token"),
        (["token", "revoke", "../v1/apps"], "not a token id"),
    ],
)
def test_token_arguments_are_checked_before_anything_is_sent(args: list[str], message: str) -> None:
    # No control plane is configured here: a request would fail differently (and exit 1, not 2).
    r = CliRunner().invoke(cli_app, args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.replace("│", " ").split())  # the error box may wrap the message
