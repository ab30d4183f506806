"""The worker writes the shipped source only inside its cache's src/ directory, whatever the row says."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cloudmodal.exception import ExecutionError
from cloudmodal.worker.loader import load_module, source_path

SOURCE = b"VALUE = 42\n"


class BlobServer:
    """Stands in for the control plane's blob route: the one thing load_module asks of a transport."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    def request(self, method: str, path: str, **_kw: object) -> bytes:
        self.requests.append(f"{method} {path}")
        return SOURCE


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    c = tmp_path / "home" / "cache"
    monkeypatch.setenv("CLOUDMODAL_CACHE_DIR", str(c))
    return c


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize(
    "name",
    [
        "../../evil.py",
        "../evil.py",
        "..",
        ".",
        "sub/app.py",
        "/tmp/evil.py",
        "..\\evil.py",
        "app.py\0.txt",
    ],
)
def test_source_name_with_a_path_is_refused_and_nothing_written(
    tmp_path: Path, cache: Path, name: str
) -> None:
    server = BlobServer()
    defn = {"module": "shipped_mod", "source_blob": "bl-abc123", "source_name": name}
    with pytest.raises(ExecutionError, match="source_name .* not a plain file name"):
        load_module(server, defn)
    assert server.requests == []  # refused before downloading anything
    assert files_under(tmp_path) == set()
    assert "shipped_mod" not in sys.modules


@pytest.mark.parametrize("blob", ["../..", "bl-1/../../x", "..", "/abs"])
def test_source_blob_with_a_path_is_refused(tmp_path: Path, cache: Path, blob: str) -> None:
    server = BlobServer()
    with pytest.raises(ExecutionError, match="source_blob .* not a plain file name"):
        load_module(server, {"module": "shipped_mod", "source_blob": blob, "source_name": "evil.py"})
    assert server.requests == [] and files_under(tmp_path) == set()


def test_a_planted_symlink_out_of_the_cache_is_refused(tmp_path: Path, cache: Path) -> None:
    outside = tmp_path / "outside.py"
    link_dir = cache / "src" / "bl-abc123"
    link_dir.mkdir(parents=True)
    (link_dir / "app.py").symlink_to(outside)
    with pytest.raises(ExecutionError, match="outside the worker's source cache"):
        source_path(cache, "bl-abc123", "app.py")
    server = BlobServer()
    with pytest.raises(ExecutionError, match="outside"):
        load_module(server, {"module": "shipped_mod", "source_blob": "bl-abc123", "source_name": "app.py"})
    assert not outside.exists() and server.requests == []


def test_a_plain_name_is_written_privately_in_the_cache_and_imported(tmp_path: Path, cache: Path) -> None:
    server = BlobServer()
    defn = {"module": "shipped_mod_ok", "source_blob": "bl-abc123", "source_name": "app.py"}
    try:
        module = load_module(server, defn)
        assert module.VALUE == 42
    finally:
        sys.modules.pop("shipped_mod_ok", None)
        sys.path[:] = [p for p in sys.path if not p.startswith(str(cache))]
    target = cache / "src" / "bl-abc123" / "app.py"
    assert target.read_bytes() == SOURCE
    # the source, and the bytecode Python wrote beside it unless PYTHONDONTWRITEBYTECODE is set
    written = files_under(tmp_path) - {str(target.relative_to(tmp_path))}
    assert all(Path(f).parent.name == "__pycache__" and f.endswith(".pyc") for f in written), written
    for p in (cache, cache / "src", target.parent, target.parent / "__pycache__", target):
        assert os.stat(p).st_mode & 0o077 == 0, p
    for f in written:
        assert os.stat(tmp_path / f).st_mode & 0o077 == 0, f
