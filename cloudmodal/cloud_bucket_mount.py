"""``cloudmodal.CloudBucketMount``: an S3-compatible bucket (S3, Cloudflare R2, GCS through its S3 endpoint)
at a path of a function's containers, declared in ``volumes=`` as in Modal."""

from __future__ import annotations

import urllib.parse
from typing import Any

from cloudmodal._frozen import Frozen
from cloudmodal.exception import InvalidError
from cloudmodal.secret import Secret
from cloudmodal.spec import BucketMountSpec


class CloudBucketMount(Frozen):
    """A bucket (or a prefix of one) at a mount path, as Modal's ``CloudBucketMount``.

    ```python
    creds = cloudmodal.Secret.from_name("aws-creds")  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION

    @app.function(volumes={"/data": cloudmodal.CloudBucketMount("my-bucket", key_prefix="in/", secret=creds)})
    def f():
        print(open("/data/part-0.csv").read())
    ```

    **A synced copy, not a live mount.** Modal mounts the bucket with mountpoint-s3 (FUSE); cloudmodal's
    workers have no such driver, so when a container starts its worker downloads every object under
    ``key_prefix`` into the mount path, and the function sees plain files:

    - start-up time and the container's disk grow with the size of the prefix: mount the narrowest
      ``key_prefix`` that holds what the function reads (a bucket of terabytes is not a fit);
    - objects written to the bucket by others after the container started are not seen by it;
    - ``read_only=True``: the files are read-only (writes fail with ``EROFS`` or ``PermissionError``) and
      nothing is ever written to the bucket;
    - writable (the default): files the function creates or changes are uploaded to the bucket in the
      background every few seconds (the cadence of volume commits) and when the container exits; a file it
      deletes is deleted from the bucket. Objects it did not delete locally are never deleted, and there is
      no locking: two containers writing one key, the later upload wins. A container killed outright loses
      what it wrote since the last upload.

    Credentials: the keys ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``,
    ``AWS_REGION``) of ``secret``, which — as every secret of the function — are also in the function's
    environment; without ``secret`` the worker's own credentials (its instance role, its environment).
    ``bucket_endpoint_url`` points at another S3-compatible service: ``https://<account>.r2.cloudflarestorage.com``
    for R2, ``https://storage.googleapis.com`` for GCS (with HMAC keys in the secret).
    """

    __slots__ = (
        "bucket_name",
        "bucket_endpoint_url",
        "key_prefix",
        "secret",
        "oidc_auth_role_arn",
        "read_only",
        "requester_pays",
        "force_path_style",
    )
    _immutable_message = "CloudBucketMount is immutable"

    bucket_name: str
    bucket_endpoint_url: str | None
    key_prefix: str | None
    secret: Secret | None
    oidc_auth_role_arn: str | None
    read_only: bool
    requester_pays: bool
    force_path_style: bool

    def __init__(
        self,
        bucket_name: str,
        bucket_endpoint_url: str | None = None,
        key_prefix: str | None = None,
        secret: Secret | None = None,
        oidc_auth_role_arn: str | None = None,
        read_only: bool = False,
        requester_pays: bool = False,
        force_path_style: bool = False,
    ) -> None:
        if (
            not isinstance(bucket_name, str)
            or not bucket_name
            or "/" in bucket_name
            or bucket_name != bucket_name.strip()
        ):
            raise InvalidError(
                f"CloudBucketMount: bucket_name {bucket_name!r} is not a bucket name: give the name alone "
                "(e.g. 'my-bucket'), and put a path inside it in key_prefix='path/'."
            )
        if bucket_endpoint_url is not None:
            url = urllib.parse.urlsplit(bucket_endpoint_url) if isinstance(bucket_endpoint_url, str) else None
            if url is None or url.scheme not in ("http", "https") or not url.netloc:
                raise InvalidError(
                    f"CloudBucketMount: bucket_endpoint_url {bucket_endpoint_url!r} is not an http(s) URL, "
                    "e.g. 'https://<account>.r2.cloudflarestorage.com'."
                )
        if key_prefix is not None:
            if not isinstance(key_prefix, str) or not key_prefix.endswith("/"):
                raise InvalidError(
                    f"CloudBucketMount: key_prefix {key_prefix!r} must end with '/' (it names a 'directory' "
                    "of the bucket), e.g. key_prefix='data/'."
                )
            parts = key_prefix[:-1].split("/")
            if key_prefix.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise InvalidError(
                    f"CloudBucketMount: key_prefix {key_prefix!r} must be relative, without empty, '.' or '..' "
                    "components, e.g. key_prefix='data/2024/'."
                )
        if secret is not None and not isinstance(secret, Secret):
            raise InvalidError(
                f"CloudBucketMount: secret must be a cloudmodal.Secret, not {type(secret).__name__}."
            )
        if oidc_auth_role_arn is not None:
            raise InvalidError(
                "CloudBucketMount: oidc_auth_role_arn is not supported by cloudmodal (workers have no Modal "
                "OIDC identity to assume the role with). Pass secret= with AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or leave it out to use the worker's own role."
            )
        for name, value in (
            ("read_only", read_only),
            ("requester_pays", requester_pays),
            ("force_path_style", force_path_style),
        ):
            if not isinstance(value, bool):
                raise InvalidError(f"CloudBucketMount: {name} must be True or False, not {value!r}.")
        if requester_pays and secret is None:
            raise InvalidError(
                "CloudBucketMount: requester_pays=True needs credentials to bill: pass secret= with "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
            )
        for k, v in (
            ("bucket_name", bucket_name),
            ("bucket_endpoint_url", bucket_endpoint_url),
            ("key_prefix", key_prefix),
            ("secret", secret),
            ("oidc_auth_role_arn", None),
            ("read_only", read_only),
            ("requester_pays", requester_pays),
            ("force_path_style", force_path_style),
        ):
            object.__setattr__(self, k, v)

    def to_spec(self, mount_path: str) -> BucketMountSpec:
        """Its wire form, mounted at ``mount_path`` (the secret by name: its values never travel in a spec)."""
        return BucketMountSpec(
            path=mount_path,
            bucket_name=self.bucket_name,
            endpoint_url=self.bucket_endpoint_url,
            key_prefix=self.key_prefix or "",
            secret=self.secret.name if self.secret is not None else None,
            read_only=self.read_only,
            requester_pays=self.requester_pays,
            force_path_style=self.force_path_style,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CloudBucketMount) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash((self.bucket_name, self.bucket_endpoint_url, self.key_prefix, self.read_only))

    def __repr__(self) -> str:
        args: list[str] = [repr(self.bucket_name)]
        for k in ("bucket_endpoint_url", "key_prefix"):
            v: Any = getattr(self, k)
            if v is not None:
                args.append(f"{k}={v!r}")
        for k in ("read_only", "requester_pays", "force_path_style"):
            if getattr(self, k):
                args.append(f"{k}=True")
        return f"CloudBucketMount({', '.join(args)})"
