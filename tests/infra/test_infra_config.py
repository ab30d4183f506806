"""``InfraConfig.validate`` refuses what no program should run with, naming the fix; ``program_for`` picks the
cloud's program; Lambda Cloud's says what to do instead. Needs no Pulumi SDK except where it imports one."""

from __future__ import annotations

import pytest

from cloudmodal.infra.common import CLOUDS, InfraConfig, control_host_user_data, program_for

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample admin@example"


@pytest.mark.parametrize(
    "cfg",
    [
        InfraConfig("aws"),
        InfraConfig("aws", region="eu-west-1", control_plane_cidrs=("203.0.113.7/32", "2001:db8::7/128")),
        InfraConfig("aws", control_plane_cidrs=("203.0.113.7",)),  # a bare address is its /32
        InfraConfig("gcp", project="team-project-42", name="team-a"),
        InfraConfig("azure", with_control_host=True, ssh_public_key=KEY, admin_cidrs=("198.51.100.0/24",)),
        InfraConfig("lambda"),
    ],
)
def test_good_configurations_pass(cfg: InfraConfig) -> None:
    cfg.validate()


@pytest.mark.parametrize(
    "cfg, match",
    [
        (InfraConfig("oracle"), "unknown cloud 'oracle': use one of aws, gcp, azure, lambda"),
        (InfraConfig("gcp"), "GCP needs a project"),
        (InfraConfig("gcp", project="My Project"), "not a project id"),
        (InfraConfig("aws", control_plane_cidrs=("0.0.0.0/0",)), "whole internet SSH"),
        (InfraConfig("aws", control_plane_cidrs=("::/0",)), "whole internet SSH"),
        (InfraConfig("aws", control_plane_cidrs=("0.0.0.0/4",)), "wider than a /8"),
        (InfraConfig("aws", control_plane_cidrs=("203.0.113.300/32",)), "not a CIDR block"),
        (InfraConfig("aws", control_plane_cidrs=("203.0.113.7/24",)), "not a CIDR block"),  # host bits set
        (InfraConfig("aws", control_plane_cidrs=("example.com",)), "not a CIDR block"),
        (
            InfraConfig("aws", with_control_host=True, admin_cidrs=("0.0.0.0/0",)),
            "admin_cidrs.*whole internet",
        ),
        (InfraConfig("aws", admin_cidrs=("198.51.100.0/24",)), "only apply to the control host"),
        (InfraConfig("aws", control_plane_port=22), "would open SSH to the world"),
        (InfraConfig("aws", control_plane_port=70000), "not a port"),
        (InfraConfig("aws", name="Cloud_Modal"), "cannot prefix bucket and role names"),
        (InfraConfig("aws", region="US East"), "not a region name"),
        (InfraConfig("aws", blob_expiry_days=0), "at least 1 day"),
        (InfraConfig("aws", ssh_public_key="-----BEGIN OPENSSH PRIVATE KEY-----"), "never a private key"),
        (InfraConfig("azure", with_control_host=True), "needs ssh_public_key"),
        (InfraConfig("lambda", with_control_host=True), "no Pulumi provider"),
    ],
)
def test_bad_configurations_are_refused_naming_the_fix(cfg: InfraConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_cidrs_are_canonical() -> None:
    cfg = InfraConfig("aws", control_plane_cidrs=(" 203.0.113.7 ", "2001:db8::7"))
    assert cfg.ssh_cidrs() == ["203.0.113.7/32", "2001:db8::7/128"]
    assert InfraConfig("gcp").resolved_region == "us-central1"


def test_program_for_each_cloud() -> None:
    pytest.importorskip(
        "pulumi", reason="the pulumi extra is not installed: pip install 'cloudmodal[pulumi]'"
    )
    for cloud in CLOUDS:
        module = "lambda_cloud" if cloud == "lambda" else cloud
        assert program_for(cloud).__module__.endswith(f"infra.{module}")
    with pytest.raises(ValueError, match="unknown cloud"):
        program_for("oracle")


def test_lambda_says_what_to_do_instead() -> None:
    pytest.importorskip(
        "pulumi", reason="the pulumi extra is not installed: pip install 'cloudmodal[pulumi]'"
    )
    with pytest.raises(ValueError, match="use another cloud|on another cloud") as e:
        program_for("lambda")(InfraConfig("lambda"))
    assert "cloudmodal secret create" in str(e.value)


def test_control_host_script_holds_no_secret() -> None:
    cfg = InfraConfig("aws", with_control_host=True)
    script = control_host_user_data(cfg, bucket_url="s3://b", address="198.51.100.10", env={})
    assert "CLOUDMODAL_NODE_SERVER_URL=https://198.51.100.10:8765" in script
    assert (
        "CLOUDMODAL_VOLUME_STORE=s3://b/volumes" in script and "CLOUDMODAL_BLOB_STORE=s3://b/blobs" in script
    )
    assert 'permissions: "0600"' in script
    assert "password" not in script.lower() and "secret" not in script.lower()
