"""The Azure program under Pulumi's mocks: the storage account refuses public access, shared keys and plain
HTTP, encrypts, versions, and has its lifecycle policy; NSGs open nothing to the world but the control plane's
port; the managed identities hold one role, scoped to the container; everything that takes tags is tagged.
Each checker also fails on a spoiled copy of the record."""

from __future__ import annotations

from typing import Any

import pytest

from cloudmodal.infra.common import OUT_BUCKET_URL, OUT_CONTROL_PLANE_URL, OUT_STORAGE_ACCOUNT, InfraConfig
from tests.infra.pulumi_harness import Ingress, Run, check_ingress, check_tagged, program_fixtures, spoil

pytestmark = pytest.mark.filterwarnings("ignore:.*has been deprecated in favor of:DeprecationWarning")

CALLS = {
    "azure-native:authorization:getClientConfig": {
        "subscriptionId": "00000000-1111-2222-3333-444444444444",
        "tenantId": "t",
        "clientId": "c",
        "objectId": "o",
    }
}
PLAIN = InfraConfig("azure", control_plane_cidrs=("203.0.113.7/32",))
HOSTED = InfraConfig(
    "azure",
    control_plane_cidrs=("203.0.113.7/32",),
    with_control_host=True,
    admin_cidrs=("198.51.100.0/24",),
    ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample admin@example",
)
ACCOUNT = "azure-native:storage:StorageAccount"
NSG = "azure-native:network:NetworkSecurityGroup"
ROLE = "azure-native:authorization:RoleAssignment"
BLOB_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"


plain_run, hosted_run = program_fixtures(PLAIN, HOSTED, CALLS)


def check_storage(run: Run, cfg: InfraConfig) -> None:
    a = run.one(ACCOUNT).inputs
    assert a.get("allowBlobPublicAccess") is False, "public blob access allowed"
    assert a.get("allowSharedKeyAccess") is False, "shared keys allowed"
    assert a.get("enableHttpsTrafficOnly") is True, "plain HTTP allowed"
    assert a.get("minimumTlsVersion") == "TLS1_2", f"TLS {a.get('minimumTlsVersion')}"
    enc = a.get("encryption", {})
    assert enc.get("keySource") in ("Microsoft.Storage", "Microsoft.Keyvault"), "encryption"
    assert enc.get("services", {}).get("blob", {}).get("enabled") is True, "encryption of blobs"
    for c in run.of_type("azure-native:storage:BlobContainer"):
        assert c.inputs.get("publicAccess") == "None", (
            f"container public access {c.inputs.get('publicAccess')}"
        )
    assert run.one("azure-native:storage:BlobServiceProperties").inputs.get("isVersioningEnabled") is True, (
        "versioning"
    )
    rules = run.one("azure-native:storage:ManagementPolicy").inputs["policy"]["rules"]
    blobs = [r for r in rules if r["definition"]["filters"]["prefixMatch"] == ["cloudmodal/blobs/"]]
    assert blobs, rules
    actions = blobs[0]["definition"]["actions"]
    assert actions["version"]["delete"]["daysAfterCreationGreaterThan"] == cfg.blob_expiry_days
    assert "baseBlob" not in actions, "current blobs must not expire by age"


def check_roles(run: Run) -> None:
    containers = {
        f"/mock/azure-native:storage:BlobContainer/{c.name}"
        for c in run.of_type("azure-native:storage:BlobContainer")
    }
    roles = run.of_type(ROLE)
    assert roles
    for r in roles:
        assert r.inputs["roleDefinitionId"].endswith(f"/roleDefinitions/{BLOB_CONTRIBUTOR}"), r.inputs[
            "roleDefinitionId"
        ]
        assert r.inputs["scope"] in containers, f"role assignment scoped to {r.inputs['scope']}"


def ingress_rules(run: Run) -> list[Ingress]:
    out = []
    for nsg in run.of_type(NSG):
        where = "control" if nsg.name.endswith("-control") else "nodes"
        for rule in nsg.inputs.get("securityRules", []):
            if rule["direction"] != "Inbound" or rule["access"] != "Allow":
                continue
            sources = list(rule.get("sourceAddressPrefixes", []))
            if rule.get("sourceAddressPrefix"):
                sources.append(rule["sourceAddressPrefix"])
            port = rule.get("destinationPortRange", "*")
            ports = None if port == "*" else tuple(int(p) for p in (port.split("-") * 2)[:2])
            out.append(Ingress(where, rule["protocol"], ports, sources))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("which", ["plain", "hosted"])
def test_security_properties(which: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(which)
    cfg = PLAIN if which == "plain" else HOSTED
    check_storage(run, cfg)
    check_roles(run)
    check_ingress(ingress_rules(run), cfg, internal=["10.75.0.0/16"])
    check_tagged(run)


def test_outputs_and_host(plain: Run, hosted: Run) -> None:
    assert plain.outputs[OUT_BUCKET_URL] == "az://cloudmodal"
    assert plain.outputs[OUT_STORAGE_ACCOUNT]
    assert OUT_CONTROL_PLANE_URL not in plain.outputs
    assert hosted.outputs[OUT_CONTROL_PLANE_URL] == "https://198.51.100.30:8765"
    vm = hosted.one("azure-native:compute:VirtualMachine").inputs
    assert vm["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda i: i.update(allowBlobPublicAccess=True), "public blob access"),
        (lambda i: i.update(allowSharedKeyAccess=True), "shared keys"),
        (lambda i: i.update(enableHttpsTrafficOnly=False), "plain HTTP"),
        (lambda i: i.update(minimumTlsVersion="TLS1_0"), "TLS"),
        (lambda i: i["encryption"]["services"]["blob"].update(enabled=False), "encryption of blobs"),
    ],
)
def test_storage_check_fails_on_a_bad_account(plain: Run, change: Any, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_storage(spoil(plain, ACCOUNT, change), PLAIN)


def test_storage_check_fails_on_a_public_container(plain: Run) -> None:
    bad = spoil(plain, "azure-native:storage:BlobContainer", lambda i: i.update(publicAccess="Blob"))
    with pytest.raises(AssertionError, match="container public access"):
        check_storage(bad, PLAIN)


def test_storage_check_fails_without_versioning(plain: Run) -> None:
    bad = spoil(
        plain, "azure-native:storage:BlobServiceProperties", lambda i: i.update(isVersioningEnabled=False)
    )
    with pytest.raises(AssertionError, match="versioning"):
        check_storage(bad, PLAIN)


def test_role_check_fails_at_subscription_scope(plain: Run) -> None:
    bad = spoil(plain, ROLE, lambda i: i.update(scope="/subscriptions/00000000-1111-2222-3333-444444444444"))
    with pytest.raises(AssertionError, match="scoped to /subscriptions"):
        check_roles(bad)


def test_role_check_fails_on_owner(plain: Run) -> None:
    owner = "/providers/Microsoft.Authorization/roleDefinitions/8e3af657-a8ff-443c-a75c-2fe8c4bcb635"
    bad = spoil(plain, ROLE, lambda i: i.update(roleDefinitionId=owner))
    with pytest.raises(AssertionError, match="8e3af657"):
        check_roles(bad)


def _add_rule(run: Run, nsg: str, rule: dict[str, Any]) -> Run:
    bad = run.bad_copy()
    (g,) = [r for r in bad.of_type(NSG) if r.name == nsg]
    g.inputs["securityRules"].append(rule)
    return bad


def _allow_in(protocol: str, source: str, port: str) -> dict[str, Any]:
    """An inbound allow rule, as an NSG's ``securityRules`` holds it."""
    return {
        "direction": "Inbound",
        "access": "Allow",
        "protocol": protocol,
        "sourceAddressPrefix": source,
        "destinationPortRange": port,
    }


def test_ingress_check_fails_on_ssh_from_internet(plain: Run) -> None:
    rule = _allow_in("Tcp", "Internet", "22")
    with pytest.raises(AssertionError, match="no control host"):
        check_ingress(
            ingress_rules(_add_rule(plain, "cloudmodal-nodes", rule)), PLAIN, internal=["10.75.0.0/16"]
        )


def test_ingress_check_fails_on_every_port_to_the_control_host(hosted: Run) -> None:
    rule = _allow_in("*", "*", "*")
    with pytest.raises(AssertionError, match="more than the control plane's port"):
        check_ingress(
            ingress_rules(_add_rule(hosted, "cloudmodal-control", rule)), HOSTED, internal=["10.75.0.0/16"]
        )


def test_tag_check_fails_on_an_untagged_nsg(plain: Run) -> None:
    with pytest.raises(AssertionError, match="cloudmodal-infra"):
        check_tagged(spoil(plain, NSG, lambda i: i.update(tags={})))
