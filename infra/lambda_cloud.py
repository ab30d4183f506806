"""Lambda Cloud has no standing infrastructure for ``cloudmodal infra`` to make, so its "program" refuses to run
and says what to do instead.

What Lambda Cloud lacks, and why nothing here stands in for it:

- **no buckets**: its persistent filesystems are NFS volumes of one region, mounted only on its own instances,
  not an object store reachable from a control plane or another cloud. Volumes and blobs of Lambda's workers
  live in a bucket on AWS, GCP or Azure: make it with ``cloudmodal infra up --cloud aws`` (or gcp, azure);
- **no IAM**: an instance has no identity a bucket could trust, so a Lambda worker reaches that bucket with
  credentials handed to it — a named secret (``cloudmodal secret create``) holding keys limited to that bucket
  (on AWS an IAM user with the same bucket-only policy as the worker role, ``infra.aws.bucket_policy_document``;
  on GCP an HMAC key of the worker service account; on Azure a SAS limited to the container), attached to the
  functions that run on Lambda. Keys are long-lived, unlike the other clouds' instance identities: rotate them;
- **no Pulumi provider**: its firewall (one account-wide rule list, applied to every instance) is set through
  Lambda's own API and dashboard, which this program cannot drive. Lambda's default lets SSH in from anywhere;
  restrict it there to the control plane's address (``control_plane_cidrs``) by hand.
"""

from __future__ import annotations

from .common import InfraConfig

GUIDANCE = (
    "Lambda Cloud has no buckets, IAM or Pulumi provider, so `cloudmodal infra` has nothing to make there. "
    "Make the bucket for Lambda's workers on another cloud (cloudmodal infra up --cloud aws|gcp|azure), give "
    "Lambda's workers keys limited to that bucket through a named secret (cloudmodal secret create), and "
    "restrict SSH in Lambda's firewall (its dashboard or API) to the control plane's address."
)


class NoLambdaInfra(ValueError):
    """What ``program`` raises: Lambda Cloud has nothing for Pulumi to make (:data:`GUIDANCE`)."""


def program(cfg: InfraConfig) -> None:
    cfg.validate()
    raise NoLambdaInfra(GUIDANCE)
