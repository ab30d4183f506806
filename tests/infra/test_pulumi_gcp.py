"""The GCP program under Pulumi's mocks: the bucket is private (uniform access, public access prevention
enforced), versioned, with its lifecycle; firewall rules open nothing to the world but the control plane's port;
the workers' service account has one role, on the bucket only; everything that takes labels is labelled. Each
checker also fails on a spoiled copy of the record."""

from __future__ import annotations

from typing import Any

import pytest

from cloudmodal.infra.common import (
    OUT_BUCKET_URL,
    OUT_CONTROL_PLANE_URL,
    OUT_NETWORK,
    OUT_WORKER_IDENTITY,
    InfraConfig,
)
from tests.infra.pulumi_harness import Ingress, Run, check_ingress, check_tagged, program_fixtures, spoil

# the SDKs' deprecated classes warn as their modules load
pytestmark = pytest.mark.filterwarnings("ignore:.*has been deprecated in favor of:DeprecationWarning")

PLAIN = InfraConfig("gcp", project="team-project-42", control_plane_cidrs=("203.0.113.7/32",))
HOSTED = InfraConfig(
    "gcp",
    project="team-project-42",
    control_plane_cidrs=("203.0.113.7/32",),
    with_control_host=True,
    admin_cidrs=("198.51.100.0/24",),
    ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample admin@example",
)
BUCKET = "gcp:storage/bucket:Bucket"
FIREWALL = "gcp:compute/firewall:Firewall"


plain_run, hosted_run = program_fixtures(PLAIN, HOSTED)


def check_bucket(run: Run, cfg: InfraConfig) -> None:
    b = run.one(BUCKET).inputs
    assert b.get("uniformBucketLevelAccess") is True, "object ACLs allowed"
    assert b.get("publicAccessPrevention") == "enforced", (
        f"public access prevention {b.get('publicAccessPrevention')}"
    )
    # Google-managed encryption always applies; a CMEK, if named, must name a key
    assert "encryption" not in b or b["encryption"].get("defaultKmsKeyName"), (
        "an encryption block without a key"
    )
    assert b.get("versioning", {}).get("enabled") is True, "versioning off"
    rules = b.get("lifecycleRules", [])
    blobs = [r for r in rules if r["condition"].get("matchesPrefixes") == ["blobs/"]]
    assert blobs and blobs[0]["condition"].get("daysSinceNoncurrentTime") == cfg.blob_expiry_days, rules
    assert blobs[0]["condition"].get("withState") == "ARCHIVED", "current blobs must not expire by age"
    assert any(r["action"]["type"] == "AbortIncompleteMultipartUpload" for r in rules)
    for m in run.resources:
        if m.type.startswith("gcp:storage/bucketIAM") or m.type.startswith("gcp:storage/bucketAccessControl"):
            members = m.inputs.get("members") or [m.inputs.get("member") or m.inputs.get("entity")]
            assert not {"allUsers", "allAuthenticatedUsers"} & set(members), (
                f"{m.name} makes the bucket public"
            )


def check_identity(run: Run) -> None:
    accounts = {
        f"serviceAccount:{a.inputs['accountId']}@{a.inputs['project']}.iam.gserviceaccount.com"
        for a in run.of_type("gcp:serviceaccount/account:Account")
    }
    bucket = run.one(BUCKET).inputs["name"]
    for r in run.resources:
        if "IAM" in r.type or "iam" in r.type.split(":")[1]:
            assert r.type == "gcp:storage/bucketIAMMember:BucketIAMMember", (
                f"{r.type} {r.name}: IAM outside the bucket"
            )
            assert r.inputs["bucket"] == bucket and r.inputs["role"] == "roles/storage.objectAdmin", r.inputs
            assert r.inputs["member"] in accounts, r.inputs["member"]
    assert run.of_type("gcp:storage/bucketIAMMember:BucketIAMMember")


def ingress_rules(run: Run, control_tag: str = "cloudmodal-control") -> list[Ingress]:
    out = []
    for fw in run.of_type(FIREWALL):
        i = fw.inputs
        if i.get("direction", "INGRESS") != "INGRESS":
            continue
        assert not i.get("denies") or i.get("allows"), fw.name
        where = "control" if i.get("targetTags") == [control_tag] else "nodes"
        sources = list(i.get("sourceRanges", [])) + [f"group:{t}" for t in i.get("sourceTags", [])]
        for allow in i.get("allows", []):
            ports = allow.get("ports")
            if allow["protocol"] == "all" or not ports:
                out.append(Ingress(where, "all", None, sources))
                continue
            for p in ports:
                lo, _, hi = p.partition("-")
                out.append(Ingress(where, allow["protocol"], (int(lo), int(hi or lo)), sources))
    return out


@pytest.mark.parametrize("which", ["plain", "hosted"])
def test_security_properties(which: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(which)
    cfg = PLAIN if which == "plain" else HOSTED
    check_bucket(run, cfg)
    check_identity(run)
    check_ingress(ingress_rules(run), cfg, internal=["10.74.0.0/20"])
    check_tagged(run)


def test_outputs_and_host(plain: Run, hosted: Run) -> None:
    assert plain.outputs[OUT_BUCKET_URL] == "gs://team-project-42-cloudmodal-store"
    assert plain.outputs[OUT_WORKER_IDENTITY] == "cloudmodal-worker@team-project-42.iam.gserviceaccount.com"
    assert plain.outputs[OUT_NETWORK] == "cloudmodal-net"
    assert OUT_CONTROL_PLANE_URL not in plain.outputs
    assert hosted.outputs[OUT_CONTROL_PLANE_URL] == "https://198.51.100.20:8765"
    host = hosted.one("gcp:compute/instance:Instance").inputs
    assert host["metadata"]["block-project-ssh-keys"] == "true"
    assert host["shieldedInstanceConfig"]["enableSecureBoot"] is True
    assert "gs://team-project-42-cloudmodal-store/blobs" in host["metadata"]["user-data"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda i: i.update(publicAccessPrevention="inherited"), "public access prevention"),
        (lambda i: i.update(uniformBucketLevelAccess=False), "ACLs"),
        (lambda i: i.update(versioning={"enabled": False}), "versioning"),
        (lambda i: i.update(encryption={}), "encryption"),
        (lambda i: i["lifecycleRules"][0]["condition"].update(withState="ANY"), "current blobs"),
    ],
)
def test_bucket_check_fails_on_a_bad_bucket(plain: Run, change: Any, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_bucket(spoil(plain, BUCKET, change), PLAIN)


def test_bucket_check_fails_on_all_users(plain: Run) -> None:
    bad = spoil(plain, "gcp:storage/bucketIAMMember:BucketIAMMember", lambda i: i.update(member="allUsers"))
    with pytest.raises(AssertionError, match="public"):
        check_bucket(bad, PLAIN)


def test_identity_check_fails_on_a_project_role(plain: Run) -> None:
    bad = plain.bad_copy()
    member = bad.one("gcp:storage/bucketIAMMember:BucketIAMMember")
    bad.resources.append(
        type(member)(
            "gcp:projects/iAMMember:IAMMember", "too-much", {**member.inputs, "role": "roles/editor"}
        )
    )
    with pytest.raises(AssertionError, match="IAM outside the bucket"):
        check_identity(bad)


def test_identity_check_fails_on_a_wider_bucket_role(plain: Run) -> None:
    bad = spoil(
        plain, "gcp:storage/bucketIAMMember:BucketIAMMember", lambda i: i.update(role="roles/storage.admin")
    )
    with pytest.raises(AssertionError):
        check_identity(bad)


def test_ingress_check_fails_on_ssh_from_the_world(plain: Run) -> None:
    bad = spoil(
        plain,
        FIREWALL,
        lambda i: (
            i.update(sourceRanges=["0.0.0.0/0"]) if i["name"].endswith("ssh-from-control-plane") else None
        ),
    )
    with pytest.raises(AssertionError, match="no control host"):
        check_ingress(ingress_rules(bad), PLAIN, internal=["10.74.0.0/20"])


def test_ingress_check_fails_on_the_port_open_to_every_instance(hosted: Run) -> None:
    bad = spoil(
        hosted,
        FIREWALL,
        lambda i: i.pop("targetTags", None) if i["name"].endswith("-control-plane") else None,
    )
    with pytest.raises(AssertionError, match="opens a worker to the world"):
        check_ingress(ingress_rules(bad), HOSTED, internal=["10.74.0.0/20"])


def test_ingress_check_fails_on_all_protocols_from_outside(plain: Run) -> None:
    bad = spoil(
        plain,
        FIREWALL,
        lambda i: i.update(sourceRanges=["192.0.2.0/24"]) if i["name"].endswith("internal") else None,
    )
    with pytest.raises(AssertionError, match="192.0.2.0/24"):
        check_ingress(ingress_rules(bad), PLAIN, internal=["10.74.0.0/20"])


def test_tag_check_fails_on_an_unlabelled_bucket(plain: Run) -> None:
    with pytest.raises(AssertionError, match="cloudmodal-infra"):
        check_tagged(spoil(plain, BUCKET, lambda i: i.update(labels={})))
