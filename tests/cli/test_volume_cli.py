"""`cloudmodal volume ...` against a real control plane over HTTP (on SQLite and PostgreSQL): create, put a
file and a directory, ls, get (to a file, a directory and stdout), cp, rm, rename, delete, and the refusals."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cloudmodal.cli.main import app as cli_app
from cloudmodal.client import session as session_mod
from cloudmodal.server.app import ServerHandle, default_settings


@pytest.fixture
def plane(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerHandle]:
    monkeypatch.delenv("CLOUDMODAL_VOLUME_STORE", raising=False)
    handle = ServerHandle(default_settings(tmp_path / "state", database_url=database_url)).start_in_thread()
    monkeypatch.setenv("CLOUDMODAL_SERVER_URL", handle.url)
    monkeypatch.setenv("CLOUDMODAL_TOKEN", handle.token)
    session_mod.disconnect()
    try:
        yield handle
    finally:
        session_mod.disconnect()
        handle.stop()


def vol(*args: str, ok: bool = True) -> Result:
    session_mod.disconnect()  # each command as a fresh process would: its own session
    r = CliRunner().invoke(cli_app, ["volume", *args])
    if ok:
        assert r.exit_code == 0, f"volume {' '.join(args)} -> {r.exit_code}\n{r.output}"
    return r


def test_put_ls_get_cp_rm_rename_delete(plane: ServerHandle, tmp_path: Path) -> None:
    assert "Created volume 'files'" in vol("create", "files").output
    assert "already exists" in vol("create", "files", ok=False).output
    names = json.loads(vol("list", "--json").output)
    assert [v["name"] for v in names] == ["files"]

    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello volume\n")
    vol("put", "files", str(src))  # to the root, under its own name
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(os.urandom(3000))
    (tree / "sub" / "b.txt").write_text("b")
    vol("put", "files", str(tree), "/tree")
    assert "Use --force" in vol("put", "files", str(src), ok=False).output
    vol("put", "files", str(src), "-f")

    listing = json.loads(vol("ls", "files", "--json").output)
    assert {(e["path"], e["type"]) for e in listing} == {("hello.txt", "file"), ("tree", "directory")}
    sub = json.loads(vol("ls", "files", "/tree", "--json").output)
    assert [(e["path"], e["size"]) for e in sub] == [("tree/a.bin", 3000), ("tree/sub", 0)]
    plain = vol("ls", "files").output  # not a terminal: tab-separated lines
    assert "hello.txt" in plain and "tree/" in plain
    assert "not in volume" in vol("ls", "files", "/nope", ok=False).output

    out = tmp_path / "out"
    out.mkdir()
    vol("get", "files", "/hello.txt", str(out))
    assert (out / "hello.txt").read_bytes() == b"hello volume\n"
    assert "Use --force" in vol("get", "files", "/hello.txt", str(out), ok=False).output
    vol("get", "files", "/tree", str(out))
    assert (out / "tree" / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
    assert (out / "tree" / "sub" / "b.txt").read_text() == "b"
    assert vol("get", "files", "/hello.txt", "-").stdout_bytes == b"hello volume\n"

    vol("cp", "files", "/hello.txt", "/copy.txt")
    assert "-r" in vol("cp", "files", "/tree", "/tree2", ok=False).output
    vol("cp", "-r", "files", "/tree", "/tree2")
    assert "-r" in vol("rm", "files", "/tree", ok=False).output
    vol("rm", "-r", "files", "/tree")
    vol("rm", "files", "/copy.txt")
    listing = json.loads(vol("ls", "files", "--json").output)
    assert sorted(e["path"] for e in listing) == ["hello.txt", "tree2"]

    vol("rename", "files", "files2", "-y")
    assert [v["name"] for v in json.loads(vol("list", "--json").output)] == ["files2"]
    assert "not found" in vol("ls", "files", ok=False).output
    vol("delete", "files2", "-y")
    assert json.loads(vol("list", "--json").output) == []
    assert "not found" in vol("delete", "files2", "-y", ok=False).output
    vol("delete", "files2", "-y", "--allow-missing")


def test_delete_asks_first(plane: ServerHandle) -> None:
    vol("create", "keep")
    r = CliRunner().invoke(cli_app, ["volume", "delete", "keep"], input="n\n")
    assert r.exit_code != 0 and "cannot be undone" in r.output
    assert [v["name"] for v in json.loads(vol("list", "--json").output)] == ["keep"]


def test_a_token_scoped_to_apps_is_refused(plane: ServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    vol("create", "team-data")
    monkeypatch.setenv("CLOUDMODAL_TOKEN", plane.cp.tokens.create("member:some-app", "scoped"))
    for args in (["list"], ["ls", "team-data"], ["create", "mine"], ["delete", "team-data", "-y"]):
        r = vol(*args, ok=False)
        assert r.exit_code == 1 and "scoped to apps" in r.output, r.output
