"""`cloudmodal dict ...` and `cloudmodal queue ...` against a real control plane (SQLite, real HTTP), run
in-process through typer's runner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cloudmodal.cli.main import app as cli_app
from cloudmodal.client import session as session_mod
from cloudmodal.dict import Dict
from cloudmodal.queue import Queue
from cloudmodal.server.app import ServerHandle, default_settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    state = tmp_path_factory.mktemp("kvcli")
    handle = ServerHandle(
        default_settings(state, database_url=f"sqlite:///{state / 'cp.db'}")
    ).start_in_thread()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOUDMODAL_SERVER_URL", handle.url)
        mp.setenv("CLOUDMODAL_TOKEN", handle.token)
        session_mod.disconnect()
        try:
            yield handle
        finally:
            session_mod.disconnect()
            handle.stop()


def run(*args: str, code: int = 0, stdin: str | None = None) -> Result:
    result = CliRunner().invoke(cli_app, list(args), input=stdin)
    assert result.exit_code == code, (args, result.exit_code, result.output)
    return result


def test_dict_commands(server: ServerHandle, tmp_path: Path) -> None:
    run("dict", "create", "cli-d")
    assert "already exists" in run("dict", "create", "cli-d", code=1).output
    d = Dict.from_name("cli-d")
    d.update({"a": 1, "b": "two", "c": [3]})
    listed = json.loads(run("dict", "list", "--json").output)
    assert [r["name"] for r in listed] == ["cli-d"]
    assert "cli-d" in run("dict", "list").output
    assert run("dict", "get", "cli-d", "b").output.strip() == "two"
    assert "has no key 'zz'" in run("dict", "get", "cli-d", "zz", code=1).output
    assert "does not exist" in run("dict", "get", "nope", "a", code=1).output
    items = json.loads(run("dict", "items", "cli-d", "--all", "--repr", "--json").output)
    assert sorted(map(tuple, items)) == [("'a'", "1"), ("'b'", "'two'"), ("'c'", "[3]")]
    assert len(json.loads(run("dict", "items", "cli-d", "2", "--json").output)) == 2
    assert "'two'" in run("dict", "items", "cli-d", "-r").output
    # destructive commands ask first: "no" keeps everything
    run("dict", "clear", "cli-d", stdin="n\n", code=1)
    assert d.len() == 3
    run("dict", "clear", "cli-d", "-y")
    assert d.len() == 0
    run("dict", "delete", "cli-d", "-y")
    assert "does not exist" in run("dict", "delete", "cli-d", "-y", code=1).output
    run("dict", "delete", "cli-d", "-y", "--allow-missing")


def test_queue_commands(server: ServerHandle) -> None:
    run("queue", "create", "cli-q")
    q = Queue.from_name("cli-q")
    q.put_many([1, "two", 3])
    q.put_many(["p1", "p2"], partition="part")
    assert run("queue", "len", "cli-q").output.strip() == "3"
    assert run("queue", "len", "cli-q", "-p", "part").output.strip() == "2"
    assert run("queue", "len", "cli-q", "--total").output.strip() == "5"
    assert run("queue", "peek", "cli-q", "2").output.splitlines() == ["1", "'two'"]
    assert run("queue", "peek", "cli-q", "-p", "part").output.splitlines() == ["'p1'"]
    assert q.len(total=True) == 5  # peeking takes nothing
    listed = json.loads(run("queue", "list", "--json").output)
    assert [(r["name"], r["items"]) for r in listed] == [("cli-q", 5)]
    run("queue", "clear", "cli-q", "-p", "part", stdin="n\n", code=1)
    run("queue", "clear", "cli-q", "-p", "part", "-y")
    assert q.len(partition="part") == 0 and q.len() == 3
    run("queue", "clear", "cli-q", "--all", "-y")
    assert q.len(total=True) == 0
    run("queue", "delete", "cli-q", "-y")
    assert json.loads(run("queue", "list", "--json").output) == []
