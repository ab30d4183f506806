"""`cloudmodal secret create|list|delete` against a real control plane (HTTP on 127.0.0.1, SQLite): values
from arguments, a .env file, a JSON file and stdin; --force; list shows names and dates, never values; and
no output or error message of the CLI ever holds a value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import start_server, use_server
from typer.testing import CliRunner, Result

from cloudmodal.cli.main import app as cli_app
from cloudmodal.server.app import ServerHandle
from cloudmodal.server.svc_secrets import NamedSecrets

V1 = "cli-value-one-5b0e7d"
V2 = "cli-value-two-91ac3f"
V3 = "cli-value-three-c2d4e8"
V4 = "cli-value-four-77f1aa"
VALUES = (V1, V2, V3, V4)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    state = tmp_path_factory.mktemp("secret-cli")
    handle = start_server(state, f"sqlite:///{state / 'cp.db'}")
    try:
        with use_server(handle):
            yield handle
    finally:
        handle.stop()


@pytest.fixture
def run(plane: ServerHandle) -> Iterator[list[Result]]:
    """Results of every CLI invocation of a test, checked for values after it."""
    results: list[Result] = []
    yield results
    for r in results:
        for v in VALUES:
            assert v not in r.stdout and v not in r.stderr, (r.stdout, r.stderr)


def cli(results: list[Result], *args: str, input: str | None = None) -> Result:
    r = CliRunner().invoke(cli_app, ["secret", *args], input=input, env={"COLUMNS": "300"})
    results.append(r)
    return r


def stored(plane: ServerHandle, name: str) -> dict[str, str]:
    return NamedSecrets(plane.cp).resolve([name])


def test_create_from_every_source_list_and_delete(
    plane: ServerHandle, run: list[Result], tmp_path: Path
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"# comment\nexport FROM_DOTENV={V1}\nSHARED=dotenv\n")
    js = tmp_path / "v.json"
    js.write_text(json.dumps({"FROM_JSON": V2, "SHARED": "json"}))
    r = cli(
        run,
        "create",
        "cli-all",
        f"FROM_ARG={V3}",
        "SHARED=arg",
        "-",
        "--from-dotenv",
        str(dotenv),
        "--from-json",
        str(js),
        input=f"FROM_STDIN={V4}\n",
    )
    assert r.exit_code == 0, r.output
    assert (
        "Created secret 'cli-all' with 5 key(s): FROM_ARG, FROM_DOTENV, FROM_JSON, FROM_STDIN, SHARED."
        in r.stdout
    )
    assert stored(plane, "cli-all") == {
        "FROM_DOTENV": V1,
        "FROM_JSON": V2,
        "FROM_ARG": V3,
        "FROM_STDIN": V4,
        "SHARED": "arg",  # arguments win over files and stdin
    }

    # JSON on stdin, with --from-stdin
    assert cli(run, "create", "cli-stdin", "--from-stdin", input=json.dumps({"K": V1})).exit_code == 0
    assert stored(plane, "cli-stdin") == {"K": V1}

    # an existing name: refused without --force; --force replaces the values
    r = cli(run, "create", "cli-stdin", f"K={V2}")
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    r = cli(run, "create", "cli-stdin", f"OTHER={V2}", "--force")
    assert r.exit_code == 0 and "Overwrote secret 'cli-stdin'" in r.stdout
    assert stored(plane, "cli-stdin") == {"OTHER": V2}

    r = cli(run, "list", "--json")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert {x["name"] for x in rows} == {"cli-all", "cli-stdin"}
    assert set(rows[0]) == {"id", "name", "created_at", "updated_at", "created_by", "last_used_at"}
    r = cli(run, "list")  # the table (plain when not a terminal)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].split("\t") == ["Name", "Created", "Updated", "Last used", "Created by"]
    assert "cli-all" in r.stdout and "FROM_ARG" not in r.stdout  # names and dates, not even key names

    r = cli(run, "delete", "cli-all", "-y")
    assert r.exit_code == 0 and "Deleted secret 'cli-all'." in r.stdout
    r = cli(run, "delete", "cli-all", "-y")
    assert r.exit_code == 1 and "not found" in r.stderr
    r = cli(run, "delete", "cli-all", "-y", "--allow-missing")
    assert r.exit_code == 0 and "nothing to delete" in r.stdout
    r = cli(run, "delete", "cli-stdin", input="n\n")  # the confirmation, declined
    assert r.exit_code == 1 and "cli-stdin" in {x["name"] for x in NamedSecrets(plane.cp).list()}
    assert cli(run, "delete", "cli-stdin", input="y\n").exit_code == 0
    assert NamedSecrets(plane.cp).list() == []


def test_bad_input_is_refused_without_echoing_values(
    plane: ServerHandle, run: list[Result], tmp_path: Path
) -> None:
    r = cli(run, "create", "bad", V1)  # a value where KEY=VALUE belongs
    assert r.exit_code == 2 and "argument 1 is not KEY=VALUE" in r.output
    r = cli(run, "create", "bad", f"=={V1}")
    assert r.exit_code == 2 and "argument 1 has no key" in r.output
    r = cli(run, "create", "bad", f"1BAD={V1}")
    assert r.exit_code == 2 and "invalid key '1BAD'" in r.output
    r = cli(run, "create", "bad")
    assert r.exit_code == 2 and "at least one key" in r.output
    broken = tmp_path / "broken.env"
    broken.write_text(f"GOOD=1\n{V2}\n")
    r = cli(run, "create", "bad", "--from-dotenv", str(broken))
    assert r.exit_code == 2 and "not KEY=VALUE" in r.output
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"K": 12345, "V": V3}))
    r = cli(run, "create", "bad", "--from-json", str(bad_json))
    assert r.exit_code == 2 and "the value of 'K' must be a string" in r.output
    r = cli(run, "create", "bad/name", f"K={V4}")
    assert r.exit_code == 2 and "Invalid Secret name" in r.output
    assert NamedSecrets(plane.cp).list() == []


def test_the_installed_command_reads_values_from_stdin(plane: ServerHandle) -> None:
    """A real `cloudmodal` process: the values never appear in its arguments, and it prints none of them."""
    env = dict(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "secret", "create", "cli-proc", "-"],
        input=f"API_KEY={V1}\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert V1 not in p.stdout + p.stderr and "API_KEY" in p.stdout
    assert stored(plane, "cli-proc") == {"API_KEY": V1}
    NamedSecrets(plane.cp).delete("cli-proc")
