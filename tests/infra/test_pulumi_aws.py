"""The AWS program under Pulumi's mocks: its bucket is private, encrypted, versioned and has its lifecycle; its
security groups open nothing to the world but the control plane's port; the workers' role reaches the bucket
and nothing else; everything is tagged. Each checker also fails on a spoiled copy of the record."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cloudmodal.infra.aws import VPC_CIDR
from cloudmodal.infra.common import (
    OUT_BUCKET_URL,
    OUT_CONTROL_PLANE_URL,
    OUT_NETWORK,
    OUT_WORKER_IDENTITY,
    InfraConfig,
)
from tests.infra.pulumi_harness import (
    Ingress,
    Run,
    check_ingress,
    check_tagged,
    program_fixtures,
    run_program,
    spoil,
)

CALLS: dict[str, dict[str, Any]] = {
    "aws:index/getAvailabilityZones:getAvailabilityZones": {
        "names": ["us-east-1a", "us-east-1b"],
        "id": "zones",
    },
    "aws:ec2/getAmi:getAmi": {"id": "ami-0123456789abcdef0", "architecture": "x86_64"},
}
# the SDKs' deprecated classes warn as their modules load
pytestmark = pytest.mark.filterwarnings("ignore:.*has been deprecated in favor of:DeprecationWarning")

PLAIN = InfraConfig("aws", control_plane_cidrs=("203.0.113.7/32",))
HOSTED = InfraConfig(
    "aws",
    control_plane_cidrs=("203.0.113.7/32", "2001:db8::7/128"),
    with_control_host=True,
    admin_cidrs=("198.51.100.0/24",),
    ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample admin@example",
)

SG = "aws:ec2/securityGroup:SecurityGroup"


plain_run, hosted_run = program_fixtures(PLAIN, HOSTED, CALLS)


# --- checkers (pure functions of the record) ----------------------------------------------------------------


def check_bucket(run: Run, cfg: InfraConfig) -> None:
    (bucket,) = run.of_type("aws:s3/bucket:Bucket")
    assert bucket.inputs.get("acl") in (None, "private"), f"bucket ACL {bucket.inputs.get('acl')}"
    block = run.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    for switch in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"):
        assert block.get(switch) is True, f"public access block: {switch} is {block.get(switch)}"
    ownership = run.one("aws:s3/bucketOwnershipControls:BucketOwnershipControls").inputs
    assert ownership["rule"]["objectOwnership"] == "BucketOwnerEnforced"
    for policy in run.of_type("aws:s3/bucketPolicy:BucketPolicy"):
        for st in json.loads(policy.inputs["policy"])["Statement"]:
            assert st["Effect"] == "Deny", f"bucket policy allows something: {st}"
    sse = run.one(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    ).inputs
    algos = [r["applyServerSideEncryptionByDefault"]["sseAlgorithm"] for r in sse["rules"]]
    assert algos and all(a in ("AES256", "aws:kms", "aws:kms:dsse") for a in algos), algos
    versioning = run.one("aws:s3/bucketVersioning:BucketVersioning").inputs
    assert versioning["versioningConfiguration"]["status"] == "Enabled"
    rules = run.one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration").inputs["rules"]
    by_prefix = {r.get("filter", {}).get("prefix"): r for r in rules if r["status"] == "Enabled"}
    blobs = by_prefix.get("blobs/")
    assert blobs and blobs["noncurrentVersionExpiration"]["noncurrentDays"] == cfg.blob_expiry_days, rules
    assert "expiration" not in blobs, (
        "current blobs must not expire by age (retention knows what is referenced)"
    )
    assert "volumes/" in by_prefix and "noncurrentVersionExpiration" in by_prefix["volumes/"]
    assert any("abortIncompleteMultipartUpload" in r for r in rules)


def ingress_rules(run: Run) -> list[Ingress]:
    out = []
    for sg in run.of_type(SG):
        where = "control" if sg.name.endswith("-control") else "nodes"
        for rule in sg.inputs.get("ingress", []):
            sources = list(rule.get("cidrBlocks", [])) + list(rule.get("ipv6CidrBlocks", []))
            sources += [f"group:{g}" for g in rule.get("securityGroups", [])]
            if rule.get("self"):
                sources.append("group:self")
            everything = rule["protocol"] == "-1"
            ports = None if everything else (int(rule["fromPort"]), int(rule["toPort"]))
            out.append(Ingress(where, "all" if everything else rule["protocol"], ports, sources))
    # rules declared on their own would count too: the program makes none
    assert not [r for r in run.resources if "ingressRule" in r.type or "securityGroupRule" in r.type]
    return out


def check_worker_policy(run: Run) -> None:
    bucket_arn = "arn:aws:s3:::" + next(iter(run.of_type("aws:s3/bucket:Bucket"))).inputs["bucketPrefix"]
    allowed = None
    for role in run.of_type("aws:iam/role:Role"):
        trust = json.loads(role.inputs["assumeRolePolicy"])["Statement"]
        assert [s["Principal"] for s in trust] == [{"Service": "ec2.amazonaws.com"}], trust
        assert not role.inputs.get("managedPolicyArns"), "a role with managed policies"
    assert not run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment"), "a managed policy attached"
    policies = run.of_type("aws:iam/rolePolicy:RolePolicy")
    assert policies
    for pol in policies:
        for st in json.loads(pol.inputs["policy"])["Statement"]:
            assert st["Effect"] == "Allow"
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            assert all(a.startswith("s3:") and "*" not in a for a in actions), f"actions {actions}"
            if allowed is None:  # the bucket's ARN as the mocks named it
                allowed = {r for r in resources if not r.endswith("/*")} or {r[:-2] for r in resources}
                (arn,) = allowed
                assert arn.startswith(bucket_arn), arn
                allowed = {arn, f"{arn}/*"}
            assert set(resources) <= allowed and "*" not in resources, f"resources {resources}"


# --- the program's record passes ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "hosted"])
def test_security_properties(which: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(which)
    cfg = PLAIN if which == "plain" else HOSTED
    check_bucket(run, cfg)
    check_ingress(ingress_rules(run), cfg, internal=[VPC_CIDR])
    check_worker_policy(run)
    check_tagged(run)


def test_without_control_host_nothing_is_open_to_the_world(plain: Run) -> None:
    rules = ingress_rules(plain)
    assert not [r for r in rules for s in r.sources if s in ("0.0.0.0/0", "::/0")]
    assert [sg.name for sg in plain.of_type(SG)] == ["cloudmodal-nodes"]
    assert OUT_CONTROL_PLANE_URL not in plain.outputs


def test_outputs(plain: Run, hosted: Run) -> None:
    assert plain.outputs[OUT_BUCKET_URL].startswith("s3://cloudmodal-store-")
    assert plain.outputs["volume_store"] == plain.outputs[OUT_BUCKET_URL] + "/volumes"
    assert plain.outputs["blob_store"] == plain.outputs[OUT_BUCKET_URL] + "/blobs"
    assert plain.outputs["volume_store_region"] == "aws:us-east-1"
    assert plain.outputs[OUT_WORKER_IDENTITY] == "cloudmodal-worker"  # the instance profile's name
    assert plain.outputs[OUT_NETWORK] == "cloudmodal-nodes"  # the security group's name
    assert hosted.outputs[OUT_CONTROL_PLANE_URL] == "https://198.51.100.10:8765"


def test_control_host(hosted: Run) -> None:
    host = hosted.one("aws:ec2/instance:Instance").inputs
    assert host["metadataOptions"]["httpTokens"] == "required"  # IMDSv2 only
    assert host["rootBlockDevice"]["encrypted"] is True
    data = host["userData"]
    assert "postgresql" in data and "--port 8765" in data
    assert "CLOUDMODAL_BLOB_STORE=s3://" in data and "password" not in data.lower()


def test_no_state_leaks_between_runs(plain: Run, hosted: Run) -> None:
    again = run_program(PLAIN, CALLS)
    assert sorted((r.type, r.name) for r in again.resources) == sorted(
        (r.type, r.name) for r in plain.resources
    )
    assert again.outputs == plain.outputs


# --- negative controls: each checker fails on a spoiled record ----------------------------------------------


def test_bucket_check_fails_on_public_access_allowed(plain: Run) -> None:
    bad = spoil(
        plain,
        "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
        lambda i: i.update(blockPublicPolicy=False),
    )
    with pytest.raises(AssertionError, match="blockPublicPolicy"):
        check_bucket(bad, PLAIN)


def test_bucket_check_fails_on_public_acl(plain: Run) -> None:
    bad = spoil(plain, "aws:s3/bucket:Bucket", lambda i: i.update(acl="public-read"))
    with pytest.raises(AssertionError, match="ACL"):
        check_bucket(bad, PLAIN)


def test_bucket_check_fails_without_encryption(plain: Run) -> None:
    bad = plain.bad_copy()
    bad.resources = [r for r in bad.resources if "ServerSideEncryption" not in r.type]
    with pytest.raises(AssertionError):
        check_bucket(bad, PLAIN)


def test_bucket_check_fails_without_versioning(plain: Run) -> None:
    bad = spoil(
        plain,
        "aws:s3/bucketVersioning:BucketVersioning",
        lambda i: i["versioningConfiguration"].update(status="Suspended"),
    )
    with pytest.raises(AssertionError):
        check_bucket(bad, PLAIN)


def test_bucket_check_fails_when_current_blobs_expire(plain: Run) -> None:
    def expire(inputs: dict[str, Any]) -> None:
        for r in inputs["rules"]:
            if r.get("filter", {}).get("prefix") == "blobs/":
                r["expiration"] = {"days": 7}

    bad = spoil(plain, "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", expire)
    with pytest.raises(AssertionError, match="current blobs"):
        check_bucket(bad, PLAIN)


def _add_ingress(run: Run, group: str, rule: dict[str, Any]) -> Run:
    bad = run.bad_copy()
    (sg,) = [r for r in bad.of_type(SG) if r.name == group]
    sg.inputs["ingress"].append(rule)
    return bad


def test_ingress_check_fails_on_ssh_from_the_world(plain: Run) -> None:
    bad = _add_ingress(
        plain,
        "cloudmodal-nodes",
        {"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["0.0.0.0/0"]},
    )
    with pytest.raises(AssertionError, match="no control host"):
        check_ingress(ingress_rules(bad), PLAIN, internal=[VPC_CIDR])


def test_ingress_check_fails_on_ipv6_world_to_workers(hosted: Run) -> None:
    bad = _add_ingress(
        hosted,
        "cloudmodal-nodes",
        {"protocol": "tcp", "fromPort": 8765, "toPort": 8765, "ipv6CidrBlocks": ["::/0"]},
    )
    with pytest.raises(AssertionError, match="opens a worker to the world"):
        check_ingress(ingress_rules(bad), HOSTED, internal=[VPC_CIDR])


def test_ingress_check_fails_on_more_than_the_port_on_the_control_host(hosted: Run) -> None:
    bad = _add_ingress(
        hosted,
        "cloudmodal-control",
        {"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["0.0.0.0/0"]},
    )
    with pytest.raises(AssertionError, match="more than the control plane's port"):
        check_ingress(ingress_rules(bad), HOSTED, internal=[VPC_CIDR])


def test_ingress_check_fails_on_ssh_from_elsewhere(plain: Run) -> None:
    bad = _add_ingress(
        plain,
        "cloudmodal-nodes",
        {"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["192.0.2.0/24"]},
    )
    with pytest.raises(AssertionError, match="192.0.2.0/24"):
        check_ingress(ingress_rules(bad), PLAIN, internal=[VPC_CIDR])


def test_ingress_check_fails_when_the_control_plane_cannot_ssh(plain: Run) -> None:
    bad = plain.bad_copy()
    for sg in bad.of_type(SG):
        sg.inputs["ingress"] = [r for r in sg.inputs["ingress"] if r.get("fromPort") != 22]
    with pytest.raises(AssertionError, match="no rule lets the control plane"):
        check_ingress(ingress_rules(bad), PLAIN, internal=[VPC_CIDR])


def _policy(run: Run, change: Any) -> Run:
    bad = run.bad_copy()
    pol = bad.of_type("aws:iam/rolePolicy:RolePolicy")[0]
    doc = json.loads(pol.inputs["policy"])
    change(doc["Statement"])
    pol.inputs["policy"] = json.dumps(doc)
    return bad


def test_policy_check_fails_on_star_resource(plain: Run) -> None:
    bad = _policy(plain, lambda sts: sts[1].update(Resource="*"))
    with pytest.raises(AssertionError, match="resources"):
        check_worker_policy(bad)


def test_policy_check_fails_on_another_bucket(plain: Run) -> None:
    bad = _policy(plain, lambda sts: sts[1]["Resource"].append("arn:aws:s3:::someone-elses/*"))
    with pytest.raises(AssertionError, match="resources"):
        check_worker_policy(bad)


def test_policy_check_fails_on_non_s3_action(plain: Run) -> None:
    bad = _policy(plain, lambda sts: sts[0]["Action"].append("ec2:RunInstances"))
    with pytest.raises(AssertionError, match="actions"):
        check_worker_policy(bad)


def test_policy_check_fails_on_s3_star(plain: Run) -> None:
    bad = _policy(plain, lambda sts: sts[1].update(Action="s3:*"))
    with pytest.raises(AssertionError, match="actions"):
        check_worker_policy(bad)


def test_policy_check_fails_on_attached_managed_policy(plain: Run) -> None:
    bad = spoil(
        plain,
        "aws:iam/role:Role",
        lambda i: i.update(managedPolicyArns=["arn:aws:iam::aws:policy/AdministratorAccess"]),
    )
    with pytest.raises(AssertionError, match="managed"):
        check_worker_policy(bad)


def test_tag_check_fails_on_an_untagged_resource(plain: Run) -> None:
    bad = spoil(plain, "aws:ec2/subnet:Subnet", lambda i: i["tags"].pop("cloudmodal-infra"))
    with pytest.raises(AssertionError, match="cloudmodal-infra"):
        check_tagged(bad)
