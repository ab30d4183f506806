"""Mount options and bucket mounts as values (``Volume.with_mount_options``, ``CloudBucketMount``): their checks,
the spec fields they become and the control plane's check of those; and the engine's side of them — a working
copy of one directory of a volume (``sub_path``) and a read-only one — on a local store."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

import cloudmodal
from cloudmodal.exception import InvalidError
from cloudmodal.server.wire_spec import validate_wire_spec
from cloudmodal.spec import BucketMountSpec
from cloudmodal.volume import check_sub_path
from cloudmodal.volumes import FileHead, LocalStore, VolumeData, VolumeError

# -- sub_path -------------------------------------------------------------------------------------------------

GOOD_SUB_PATHS = ["a", "models/v2", "a.b/c-d_e", "x/y/z"]
BAD_SUB_PATHS: list[tuple[Any, str]] = [
    ("/abs", "absolute"),
    ("../up", "'..'"),
    ("a/../b", "'..'"),
    ("a/..", "'..'"),
    ("", "whole volume"),
    (".", "whole volume"),
    ("a//b", "not normalized"),
    ("a/./b", "not normalized"),
    ("a/", "not normalized"),
    ("./a", "not normalized"),
    ("a\\b", "backslash"),
    ("a\x00b", "NUL"),
    (3, "must be a string"),
    ("x" * 1025, "at most 1024"),
]


@pytest.mark.parametrize("sub_path", GOOD_SUB_PATHS)
def test_a_normalized_relative_sub_path_is_accepted(sub_path: str) -> None:
    assert check_sub_path(sub_path) == sub_path


@pytest.mark.parametrize(("sub_path", "says"), BAD_SUB_PATHS)
def test_a_bad_sub_path_is_refused_with_the_reason(sub_path: Any, says: str) -> None:
    with pytest.raises(InvalidError, match=says):
        check_sub_path(sub_path)


def test_with_mount_options_makes_a_view_and_leaves_the_handle_alone() -> None:
    vol = cloudmodal.Volume.from_name("data")
    ro = vol.with_mount_options(read_only=True)
    sub = ro.with_mount_options(sub_path="models/v2")
    assert (vol.read_only, vol.sub_path) == (False, None)
    assert (ro.read_only, ro.sub_path) == (True, None)
    assert (sub.read_only, sub.sub_path) == (True, "models/v2")  # options left None are kept
    assert sub.with_mount_options(read_only=False).read_only is False
    assert repr(sub) == "Volume.from_name('data').with_mount_options(read_only=True, sub_path='models/v2')"
    back = pickle.loads(pickle.dumps(sub))  # a handle travels to workers pickled
    assert (back.name, back.read_only, back.sub_path) == ("data", True, "models/v2")
    with pytest.raises(InvalidError, match="read_only must be True or False"):
        vol.with_mount_options(read_only="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="'..'"):
        vol.with_mount_options(sub_path="../etc")


# -- CloudBucketMount -----------------------------------------------------------------------------------------

CREDS = cloudmodal.Secret.from_dict({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
BAD_MOUNTS: list[tuple[dict[str, Any], str]] = [
    ({"bucket_name": ""}, "not a bucket name"),
    ({"bucket_name": "b/path"}, "not a bucket name"),
    ({"bucket_name": "b", "key_prefix": "data"}, "must end with '/'"),
    ({"bucket_name": "b", "key_prefix": "/data/"}, "must be relative"),
    ({"bucket_name": "b", "key_prefix": "a//b/"}, "must be relative"),
    ({"bucket_name": "b", "key_prefix": "../x/"}, "must be relative"),
    ({"bucket_name": "b", "requester_pays": True}, "requester_pays=True needs credentials"),
    ({"bucket_name": "b", "oidc_auth_role_arn": "arn:aws:iam::1:role/r"}, "not supported"),
    ({"bucket_name": "b", "bucket_endpoint_url": "r2.example.com"}, "not an http"),
    ({"bucket_name": "b", "secret": {"AWS_ACCESS_KEY_ID": "k"}}, "must be a cloudmodal.Secret"),
    ({"bucket_name": "b", "read_only": "yes"}, "read_only must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "says"), BAD_MOUNTS)
def test_a_bad_bucket_mount_is_refused_with_the_reason(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidError, match=says):
        cloudmodal.CloudBucketMount(**kwargs)


def test_a_bucket_mount_is_a_value() -> None:
    m = cloudmodal.CloudBucketMount(
        "b", bucket_endpoint_url="https://x.r2.cloudflarestorage.com", key_prefix="in/", secret=CREDS,
        read_only=True, requester_pays=True,
    )  # fmt: skip
    assert m == pickle.loads(pickle.dumps(m))
    assert m.to_spec("/data") == BucketMountSpec(
        "/data", "b", "https://x.r2.cloudflarestorage.com", "in/", CREDS.name, True, True, False
    )
    with pytest.raises(AttributeError):
        m.read_only = False  # type: ignore[misc]


# -- what the spec carries ------------------------------------------------------------------------------------


def _spec(volumes: dict[str, Any]) -> Any:
    app = cloudmodal.App("mount-options")

    @app.function(volumes=volumes, serialized=True)
    def f() -> None: ...

    assert f.spec is not None
    return f.spec


def test_the_spec_carries_the_options_the_bucket_and_its_secret() -> None:
    vol = cloudmodal.Volume.from_name("data", create_if_missing=True)
    other = cloudmodal.Volume.from_name("other")
    bucket = cloudmodal.CloudBucketMount("b", key_prefix="in/", secret=CREDS, read_only=True)
    spec = _spec(
        {"/data": vol.with_mount_options(read_only=True, sub_path="m"), "/other": other, "/b": bucket}
    )
    assert spec.volumes == (("/data", "data"), ("/other", "other"))
    assert spec.volume_options == (("/data", True, "m"),)  # plain mounts add nothing
    assert spec.mount_options("/data") == (True, "m")
    assert spec.mount_options("/other") == (False, "")
    assert spec.create_volumes == ("data",)
    assert spec.bucket_mounts == (BucketMountSpec("/b", "b", None, "in/", CREDS.name, True),)
    assert CREDS.name in spec.secrets  # its keys reach the worker as every secret's do
    assert spec.has_mounts
    # the control plane accepts it, and the worker reads it back as it was
    wire = validate_wire_spec(spec.to_wire())
    assert type(spec).from_wire(wire) == spec


def test_bucket_mounts_with_two_different_secrets_are_refused() -> None:
    other = cloudmodal.Secret.from_dict({"AWS_ACCESS_KEY_ID": "k2", "AWS_SECRET_ACCESS_KEY": "s2"})
    with pytest.raises(InvalidError, match="different secrets"):
        _spec(
            {
                "/a": cloudmodal.CloudBucketMount("a", secret=CREDS),
                "/b": cloudmodal.CloudBucketMount("b", secret=other),
            }
        )


def test_a_non_mount_value_names_both_kinds() -> None:
    with pytest.raises(InvalidError, match="not a cloudmodal.Volume or CloudBucketMount"):
        _spec({"/a": "bucket-name"})


def _wire(**changes: Any) -> dict[str, Any]:
    spec = _spec({"/data": cloudmodal.Volume.from_name("data"), "/b": cloudmodal.CloudBucketMount("b")})
    return spec.to_wire() | changes  # type: ignore[no-any-return]


HAND_BUILT: list[tuple[dict[str, Any], str]] = [
    ({"volume_options": [["/elsewhere", True, ""]]}, "not mounted in spec.volumes"),
    ({"volume_options": [["/data", True, "../x"]]}, "'..'"),
    ({"volume_options": [["/data", "yes", ""]]}, "volume_options"),
    ({"bucket_mounts": [{"path": "/data", "bucket_name": "b"}]}, "mount path"),
    ({"bucket_mounts": [{"path": "/c", "bucket_name": "b", "key_prefix": "x"}]}, "must end with '/'"),
    ({"bucket_mounts": [{"path": "/c", "bucket_name": "b", "secret": "creds"}]}, "not in spec.secrets"),
    ({"bucket_mounts": [{"path": "/c", "bucket_name": "b", "requester_pays": True}]}, "requester_pays"),
    ({"bucket_mounts": [{"path": "/c", "bucket_name": "b", "extra": 1}]}, "extra"),
]


@pytest.mark.parametrize(("changes", "says"), HAND_BUILT)
def test_the_control_plane_refuses_a_hand_built_mount(changes: dict[str, Any], says: str) -> None:
    validate_wire_spec(_wire())  # the unchanged spec passes: the refusal is the change's
    with pytest.raises(InvalidError, match=says):
        validate_wire_spec(_wire(**changes))


# -- the engine: a directory of the volume, and a read-only copy ----------------------------------------------


@pytest.fixture
def data(tmp_path: Path) -> VolumeData:
    return VolumeData(LocalStore(tmp_path / "store"), FileHead(tmp_path / "head.json"))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_sub_path_copy_holds_that_directory_and_commits_under_it(data: VolumeData, tmp_path: Path) -> None:
    with data.batch() as b:
        b.put_file(_src(tmp_path, b"w"), "/models/v2/w.bin")
        b.put_file(_src(tmp_path, b"top"), "/top.txt")
        b.put_file(_src(tmp_path, b"v1"), "/models/v1/w.bin")
    wc = data.working_copy(tmp_path / "wc", sub_path="models/v2")
    assert _files(wc.directory) == {"w.bin": b"w"}
    (wc.directory / "new.txt").write_bytes(b"new")
    (wc.directory / "w.bin").unlink()
    wc.commit()
    snap = data.snapshot()
    assert {e.path for e in snap.listdir("/", recursive=True) if e.type == 1} == {
        "top.txt", "models/v1/w.bin", "models/v2/new.txt",
    }  # fmt: skip
    # another writer's change inside the directory comes in on reload; one outside never shows
    with data.batch() as b:
        b.put_file(_src(tmp_path, b"other"), "/models/v2/other.txt")
        b.put_file(_src(tmp_path, b"out"), "/models/out.txt")
    wc.reload(check_open_files=False)
    assert _files(wc.directory) == {"new.txt": b"new", "other.txt": b"other"}


def test_a_missing_sub_path_mounts_empty_and_a_file_is_refused(data: VolumeData, tmp_path: Path) -> None:
    with data.batch() as b:
        b.put_file(_src(tmp_path, b"f"), "/file")
    wc = data.working_copy(tmp_path / "wc", sub_path="not/yet")
    assert _files(wc.directory) == {}
    (wc.directory / "a.txt").write_bytes(b"a")
    wc.commit()
    assert data.snapshot().read_bytes("/not/yet/a.txt") == b"a"
    with pytest.raises(NotADirectoryError, match="is a file"):
        data.working_copy(tmp_path / "wc2", sub_path="file")


def test_a_read_only_copy_never_commits_and_reload_brings_the_latest(
    data: VolumeData, tmp_path: Path
) -> None:
    with data.batch() as b:
        b.put_file(_src(tmp_path, b"one"), "/a.txt")
    wc = data.working_copy(tmp_path / "wc", read_only=True)
    (wc.directory / "a.txt").write_bytes(b"changed here")  # the mount is what stops this; the copy ignores it
    (wc.directory / "b.txt").write_bytes(b"added here")
    assert not wc.has_changes()
    with pytest.raises(VolumeError, match="read-only"):
        wc.commit()
    assert data.version == 1
    with data.batch() as b:
        b.put_file(_src(tmp_path, b"two"), "/a.txt")
    wc.reload(check_open_files=False)
    assert (wc.directory / "a.txt").read_bytes() == b"two"


def _src(tmp_path: Path, content: bytes) -> Path:
    p = tmp_path / f"src-{content.hex()[:16]}"
    p.write_bytes(content)
    return p
