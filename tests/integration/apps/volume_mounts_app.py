"""Functions that mount a volume with options (read-only, one directory of it) and an S3 bucket (moto's
server) writable and read-only: imported by tests/integration/test_volume_mounts.py and by the real worker
processes (which mount what the registered spec says; the endpoint and bucket read here only matter to the
test process, which sets them before importing this module)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import cloudmodal

# Sorted by path, the read-only mounts come before the marker: a container commits in that order at exit.
RO = "/mnt/cloudmodal-test-a-ro"
SUB = "/mnt/cloudmodal-test-a-sub"
BUCKET = "/mnt/cloudmodal-test-b-bucket"
BUCKET_RO = "/mnt/cloudmodal-test-b-bucket-ro"
MARKER = "/mnt/cloudmodal-test-z-marker"

ENDPOINT = os.environ.get("CLOUDMODAL_TEST_S3_ENDPOINT", "http://127.0.0.1:9")
BUCKET_NAME = os.environ.get("CLOUDMODAL_TEST_BUCKET", "unset")
# moto accepts any keys; they travel as an inline secret, as a user's would.
creds = cloudmodal.Secret.from_dict(
    {
        "AWS_ACCESS_KEY_ID": "AKIAFAKEMOTOTESTKEY0",
        "AWS_SECRET_ACCESS_KEY": "fake-secret-for-moto",
        "AWS_REGION": "us-east-1",
    }
)

app = cloudmodal.App("volume-mounts-app")
vol = cloudmodal.Volume.from_name("mount-options-data", create_if_missing=True)
marker = cloudmodal.Volume.from_name("mount-options-marker", create_if_missing=True)
sub = vol.with_mount_options(sub_path="models/v2")
bucket = cloudmodal.CloudBucketMount(
    BUCKET_NAME, bucket_endpoint_url=ENDPOINT, key_prefix="in/", secret=creds, force_path_style=True
)
bucket_ro = cloudmodal.CloudBucketMount(
    BUCKET_NAME, bucket_endpoint_url=ENDPOINT, key_prefix="in/", secret=creds, read_only=True
)


def _refused(fn: Any) -> str:
    """What ``fn()`` raised: an errno name, an exception's class name, or "allowed"."""
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, type(e).__name__)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "allowed"


@app.function(
    volumes={RO: vol.with_mount_options(read_only=True), BUCKET_RO: bucket_ro, MARKER: marker},
    max_containers=1,
)
def try_writes(name: str) -> dict[str, str]:
    """Try to change the read-only volume and the read-only bucket; leave a file (uncommitted) in the
    writable marker volume, which the container's exit commits."""
    out = {
        "volume_top": Path(RO, "top.txt").read_text(),
        "volume_write": _refused(lambda: Path(RO, name).write_text("x")),
        "volume_change": _refused(lambda: Path(RO, "top.txt").write_text("changed")),
        "volume_delete": _refused(lambda: Path(RO, "top.txt").unlink()),
        "volume_commit": _refused(vol.commit),
        "volume_reload": _refused(vol.reload),
        "bucket_seed": Path(BUCKET_RO, "seed.txt").read_text(),
        "bucket_write": _refused(lambda: Path(BUCKET_RO, name).write_text("x")),
        "bucket_change": _refused(lambda: Path(BUCKET_RO, "seed.txt").write_text("changed")),
        "bucket_delete": _refused(lambda: Path(BUCKET_RO, "seed.txt").unlink()),
    }
    Path(MARKER, name).write_text("this container exited")
    return out


@app.function(volumes={SUB: sub})
def in_sub_path(name: str) -> list[str]:
    """The files the mount of models/v2 shows; then a new file there, committed."""
    seen = sorted(str(p.relative_to(SUB)) for p in Path(SUB).rglob("*"))
    Path(SUB, name).write_text("written under the sub path")
    sub.commit()
    return seen


@app.function(volumes={BUCKET: bucket})
def bucket_read_write(name: str) -> dict[str, Any]:
    """Read the seeded object; write a new file and change another (uploaded in the background or at exit)."""
    seed = Path(BUCKET, "seed.txt").read_text()
    Path(BUCKET, "written").mkdir(exist_ok=True)
    Path(BUCKET, "written", name).write_text("from the function")
    Path(BUCKET, "change-me.txt").write_text("changed by the function")
    return {"seed": seed, "files": sorted(str(p.relative_to(BUCKET)) for p in Path(BUCKET).rglob("*"))}
