"""The pure core: path normalization, manifest encoding, and operations replayed onto a manifest (tables)."""

from __future__ import annotations

import json

import pytest

from cloudmodal.volumes.manifest import (
    Copy,
    DeletePath,
    DirRecord,
    FileRecord,
    MakeDir,
    Manifest,
    Op,
    PutFile,
    Remove,
    apply_ops,
    manifest_key,
    normalize_path,
)


def rec(tag: str, size: int = 1) -> FileRecord:
    return FileRecord(size=size, mode=0o644, mtime=1.0, parts=(tag,), part_size=8)


D = DirRecord(0o755, 1.0)


@pytest.mark.parametrize(
    "raw, norm",
    [("/", ""), ("", ""), ("/a//b/./c/", "a/b/c"), ("a", "a"), ("\\x\\y", "x/y"), ("/a/.", "a")],
)
def test_normalize_path(raw: str, norm: str) -> None:
    assert normalize_path(raw) == norm


@pytest.mark.parametrize("bad", ["../x", "/a/../../b", "a/..", "a\x00b"])
def test_normalize_path_refuses_escapes(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_path(bad)


def test_manifest_round_trip_and_key() -> None:
    m = Manifest(3, {"a/b": rec("ab" * 32, 5), "e": D}, parent="manifests/x", created=2.5)
    data = m.encode()
    assert Manifest.decode(data) == m
    key = manifest_key(3, data)
    assert key.startswith("manifests/000000000003-") and key.endswith(".json")
    assert manifest_key(3, data + b" ") != key  # two racers' manifests never share a key


def _doc(path: str, parts: list[str], mode: int = 0o644) -> bytes:
    good = Manifest(1, {"ok": rec("ab" * 32)}).encode()
    doc = json.loads(good)
    doc["entries"] = {path: {"file": {"size": 1, "mode": mode, "mtime": 1.0, "parts": parts, "part_size": 8}}}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "path, parts",
    [
        ("../etc/passwd", ["ab" * 32]),  # climbs out of the mount
        ("/abs", ["ab" * 32]),  # not normal
        ("a/./b", ["ab" * 32]),
        ("", ["ab" * 32]),
        ("ok", ["../../outside"]),  # a part name becomes a store key
        ("ok", ["AB" * 32]),
    ],
)
def test_a_manifest_read_from_the_store_is_checked(path: str, parts: list[str]) -> None:
    """Anyone holding the bucket's credentials can write a manifest: its paths become files under a mount and
    its part names store keys, so a bad one is refused when read, not followed."""
    with pytest.raises(ValueError, match="invalid manifest"):
        Manifest.decode(_doc(path, parts))


def test_a_manifest_keeps_only_permission_bits() -> None:
    (r,) = Manifest.decode(_doc("ok", ["ab" * 32], mode=0o4755)).entries.values()
    assert isinstance(r, FileRecord) and r.mode == 0o755  # no setuid from a volume


BASE = Manifest(1, {"f": rec("f"), "d/x": rec("x"), "d/y": rec("y"), "e": D})

CASES: list[tuple[str, list[Op], dict[str, str] | type[Exception]]] = [
    ("put new", [PutFile("n", rec("n"))], {"f": "f", "d/x": "x", "d/y": "y", "e": "dir", "n": "n"}),
    ("put replaces", [PutFile("f", rec("g"))], {"f": "g", "d/x": "x", "d/y": "y", "e": "dir"}),
    ("put no-overwrite", [PutFile("f", rec("g"), overwrite=False)], FileExistsError),
    ("put file over dir", [PutFile("d", rec("z"))], {"f": "f", "d": "z", "e": "dir"}),
    ("put under a file", [PutFile("f/z", rec("z"))], {"f/z": "z", "d/x": "x", "d/y": "y", "e": "dir"}),
    ("put at root", [PutFile("", rec("z"))], IsADirectoryError),
    ("mkdir", [MakeDir("m", D)], {"f": "f", "d/x": "x", "d/y": "y", "e": "dir", "m": "dir"}),
    ("delete exact", [DeletePath("d/x"), DeletePath("nope")], {"f": "f", "d/y": "y", "e": "dir"}),
    ("rm file", [Remove("f")], {"d/x": "x", "d/y": "y", "e": "dir"}),
    ("rm dir needs -r", [Remove("d")], IsADirectoryError),
    ("rm empty dir", [Remove("e")], {"f": "f", "d/x": "x", "d/y": "y"}),
    ("rm -r dir", [Remove("d", recursive=True)], {"f": "f", "e": "dir"}),
    ("rm missing", [Remove("zz")], FileNotFoundError),
    ("rm root needs -r", [Remove("")], IsADirectoryError),
    ("rm -r root", [Remove("", recursive=True)], {}),
    ("cp file to new path", [Copy(("f",), "g")], {"f": "f", "g": "f", "d/x": "x", "d/y": "y", "e": "dir"}),
    ("cp into existing dir", [Copy(("f",), "e")], {"f": "f", "e": "dir", "e/f": "f", "d/x": "x", "d/y": "y"}),
    ("cp into dir by slash", [Copy(("f",), "n", dst_is_dir_hint=True)],
     {"f": "f", "n/f": "f", "d/x": "x", "d/y": "y", "e": "dir"}),
    ("cp many needs dir", [Copy(("f", "d/x"), "g")], NotADirectoryError),
    ("cp dir needs -r", [Copy(("d",), "c")], IsADirectoryError),
    ("cp -r dir", [Copy(("d",), "c", recursive=True)],
     {"f": "f", "d/x": "x", "d/y": "y", "c/x": "x", "c/y": "y", "e": "dir"}),
    ("cp -r into itself", [Copy(("d",), "d/sub", recursive=True)], ValueError),
    ("cp missing", [Copy(("zz",), "c")], FileNotFoundError),
    ("ops in order", [PutFile("n", rec("n")), Copy(("n",), "m"), Remove("n")],
     {"f": "f", "d/x": "x", "d/y": "y", "e": "dir", "m": "n"}),
]  # fmt: skip


@pytest.mark.parametrize("name, ops, expected", CASES, ids=[c[0] for c in CASES])
def test_apply_ops(name: str, ops: list[Op], expected: dict[str, str] | type[Exception]) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            apply_ops(BASE, ops, version=2, now=9.0, parent="p")
        return
    out = apply_ops(BASE, ops, version=2, now=9.0, parent="p")
    got = {p: (r.parts[0] if isinstance(r, FileRecord) else "dir") for p, r in out.entries.items()}
    assert got == expected
    assert (out.version, out.parent, out.created) == (2, "p", 9.0)
    assert BASE.entries["f"] == rec("f")  # the base is never changed


def test_replaying_a_diff_onto_a_newer_version_keeps_both() -> None:
    """The rule for racing commits: each one's own changes land; the same path: the later replay wins."""
    winner = apply_ops(BASE, [PutFile("f", rec("w")), PutFile("w", rec("w"))], version=2, now=1, parent=None)
    loser_diff: list[Op] = [PutFile("f", rec("l")), DeletePath("d/x"), PutFile("l", rec("l"))]
    out = apply_ops(winner, loser_diff, version=3, now=2, parent=None)
    got = {p: (r.parts[0] if isinstance(r, FileRecord) else "dir") for p, r in out.entries.items()}
    assert got == {"f": "l", "w": "w", "l": "l", "d/y": "y", "e": "dir"}
