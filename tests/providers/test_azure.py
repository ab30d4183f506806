"""The Azure node driver through SkyPilot's real Azure provisioner and the real azure-mgmt SDK, over HTTPS,
against the stateful fake ARM endpoint in ``tests/fakes/azure_arm.py``.

Credentials are test fixtures: a fake ``az`` first on PATH (prints a token) and a fake
``$AZURE_CONFIG_DIR/azureProfile.json``. The endpoint is the driver's own ``arm_endpoint`` /
``arm_ca_bundle`` options, so the product's client seam is what the tests run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sky")
pytest.importorskip("azure.mgmt.compute")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cloudmodal.pricing.offers import Offer  # noqa: E402
from cloudmodal.providers.azure import AzureNodes  # noqa: E402
from cloudmodal.providers.base import (  # noqa: E402
    CredentialsError,
    LaunchRequest,
    NoCapacityError,
    ProviderError,
    QuotaExceededError,
)
from cloudmodal.providers.nodes import NodeRef, node_name, node_tags  # noqa: E402
from tests.fakes.azure_arm import SUBSCRIPTION, FakeArm, write_cli_login  # noqa: E402

CP = "cp-azure-test"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyOnly cloudmodal@test"
SHARED_CATALOG = Path(__file__).resolve().parents[3] / "shared" / "pricing" / "catalogs" / "v8"


def _offer(instance_type: str = "Standard_NC24ads_A100_v4", region: str = "eastus") -> Offer:
    return Offer(
        "azure",
        region,
        None,
        instance_type,
        "A100-80GB",
        1,
        80.0,
        24.0,
        220.0,
        3.673,
        0.44,
        "test",
        "2026-01-01",
    )


def _req(worker: str, market: str = "spot", offer: Offer | None = None) -> LaunchRequest:
    return LaunchRequest(
        worker_id=worker,
        app_id="app-1",
        function_id="fn-1",
        offer=offer or _offer(),
        market=market,
    )


@pytest.fixture(scope="module")
def login(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_cli_login(tmp_path_factory.mktemp("az-login"))


@pytest.fixture(scope="module")
def server() -> Iterator[FakeArm]:
    with FakeArm() as arm:
        yield arm


@pytest.fixture
def arm(server: FakeArm, login: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FakeArm:
    server.reset()
    monkeypatch.setenv("PATH", login["bin"] + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("AZURE_CONFIG_DIR", login["AZURE_CONFIG_DIR"])
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_SUBSCRIPTION_ID"):
        monkeypatch.delenv(var, raising=False)
    return server


@pytest.fixture
def driver(arm: FakeArm, monkeypatch: pytest.MonkeyPatch) -> AzureNodes:
    # The documented environment variables, as a user would set them for a non-default ARM endpoint.
    monkeypatch.setenv("CLOUDMODAL_AZURE_ARM_ENDPOINT", arm.url)
    monkeypatch.setenv("CLOUDMODAL_AZURE_ARM_CA_BUNDLE", arm.ca_bundle)
    return AzureNodes(regions=["eastus"], arm_retry_total=0, arm_polling_interval=0)


def _create(driver: AzureNodes, worker: str, market: str = "spot", offer: Offer | None = None) -> NodeRef:
    req = _req(worker, market, offer)
    return driver.create(req, name=node_name(CP, worker), tags=node_tags(CP, req), ssh_public_key=SSH_KEY)


# --- check ------------------------------------------------------------------------------------------------


def test_check_with_az_login_makes_one_read(driver: AzureNodes, arm: FakeArm) -> None:
    ok, who = driver.check()
    assert ok, who
    assert SUBSCRIPTION in who and "az CLI login tester@example.com" in who
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in arm.requests] == [("GET", "resourcegroups")]


def test_check_without_login_says_az_login(
    driver: AzureNodes, arm: FakeArm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path))  # no azureProfile.json: never logged in
    ok, why = driver.check()
    assert not ok and "`az login`" in why and "AZURE_CLIENT_SECRET" in why
    assert arm.requests == []


def test_check_refused_token_is_a_credentials_message(driver: AzureNodes, arm: FakeArm) -> None:
    arm.reject(
        401,
        "InvalidAuthenticationToken",
        "The access token is invalid.",
        method="GET",
        path=r"/resourcegroups$",
    )
    ok, why = driver.check()
    assert not ok and "InvalidAuthenticationToken" in why and "`az login`" in why
    assert "fake-token" not in why


# --- create / list / query / terminate ------------------------------------------------------------------


def test_create_spot_sends_size_priority_tags_and_key(driver: AzureNodes, arm: FakeArm) -> None:
    ref = _create(driver, "w-spot-1")
    assert ref.cloud == "azure" and ref.region == "eastus" and ref.cluster == node_name(CP, "w-spot-1")
    # SkyPilot's bootstrap ran its template deployment and built the VM from the outputs.
    assert arm.find("PUT", r"/deployments/skypilot-config$")
    (vm,) = arm.vms()
    props = vm["properties"]
    assert vm["name"] == ref.instance_id
    assert props["hardwareProfile"]["vmSize"] == "Standard_NC24ads_A100_v4"
    assert props["priority"] == "Spot"
    assert "evictionPolicy" not in props  # SkyPilot 0.14.1 sends none: Azure's default (Deallocate) applies
    assert vm["tags"]["cloudmodal-control-plane"] == CP and vm["tags"]["cloudmodal-worker"] == "w-spot-1"
    assert vm["tags"]["cloudmodal-market"] == "spot"
    (key,) = props["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"]
    assert key["keyData"] == SSH_KEY and key["path"] == "/home/azureuser/.ssh/authorized_keys"
    assert vm["identity"]["type"] == "UserAssigned"  # the managed identity from the deployment's outputs

    info = driver.query(ref)
    assert info.state == "running" and info.market == "spot"
    assert info.instance_type == "Standard_NC24ads_A100_v4"
    assert info.public_ip and info.public_ip.startswith("198.51.100.") and info.private_ip
    assert info.ssh_user == "azureuser"


def test_create_on_demand_has_no_priority(driver: AzureNodes, arm: FakeArm) -> None:
    ref = _create(driver, "w-od-1", market="on-demand")
    (vm,) = arm.vms()
    assert vm["properties"].get("priority") is None
    assert driver.query(ref).market == "on-demand"


def test_list_finds_nodes_by_tags(driver: AzureNodes, arm: FakeArm) -> None:
    a = _create(driver, "w-a")
    _create(driver, "w-b", market="on-demand")
    mine = driver.list({"cloudmodal-control-plane": CP})
    assert sorted(n.ref.cluster for n in mine) == sorted([a.cluster, node_name(CP, "w-b")])
    assert {n.state for n in mine} == {"running"}
    only_a = driver.list({"cloudmodal-worker": "w-a"})
    assert [(n.ref.cluster, n.ref.instance_id, n.market, n.instance_type) for n in only_a] == [
        (a.cluster, a.instance_id, "spot", "Standard_NC24ads_A100_v4")
    ]
    assert driver.list({"cloudmodal-control-plane": "someone-else"}) == []


def test_concurrent_creates_from_threads(driver: AzureNodes, arm: FakeArm) -> None:
    workers = [f"w-par-{i}" for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        refs = list(pool.map(lambda w: _create(driver, w), workers))
    assert len({r.instance_id for r in refs}) == 3
    assert len(arm.vms()) == 3 and len(arm.resource_groups) == 3
    assert (
        sorted(n.tags["cloudmodal-worker"] for n in driver.list({"cloudmodal-control-plane": CP})) == workers
    )


def test_terminate_deletes_the_resource_group_and_is_idempotent(driver: AzureNodes, arm: FakeArm) -> None:
    ref = _create(driver, "w-term")
    driver.terminate(ref)
    assert arm.find("DELETE", r"/resourcegroups/" + ref.cluster + "-eastus$")
    assert arm.vms() == [] and arm.resource_groups == {}
    assert driver.query(ref).state == "terminated"
    driver.terminate(ref)  # already gone: no error
    assert driver.list({"cloudmodal-worker": "w-term"}) == []


def test_query_unknown_node_is_terminated(driver: AzureNodes) -> None:
    info = driver.query(NodeRef("azure", "eastus", None, "cm-00000000-nothing"))
    assert info.state == "terminated"


def test_spot_eviction_reads_as_preempted(driver: AzureNodes, arm: FakeArm) -> None:
    ref = _create(driver, "w-evict")
    assert ref.instance_id is not None
    arm.evict(ref.instance_id)
    info = driver.query(ref)
    assert info.state == "preempted" and "deallocated" in info.detail
    assert arm.evicted(ref.instance_id)
    (listed,) = driver.list({"cloudmodal-worker": "w-evict"})
    assert listed.state == "preempted"


# --- errors on the wire -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest"]
)
def test_allocation_failure_on_the_operation_is_no_capacity(
    driver: AzureNodes, arm: FakeArm, code: str
) -> None:
    arm.fail_async(code)
    with pytest.raises(NoCapacityError) as ei:
        _create(driver, "w-cap")
    assert ei.value.reason == code and ei.value.retryable
    assert ei.value.offer is not None and ei.value.offer.instance_type == "Standard_NC24ads_A100_v4"
    # The failed VM, its NIC and IP went with the node's resource group.
    assert arm.vms() == [] and arm.resource_groups == {}


def test_restricted_sku_is_no_capacity(driver: AzureNodes, arm: FakeArm) -> None:
    arm.restrict_sku("Standard_NC24ads_A100_v4", "eastus")
    with pytest.raises(NoCapacityError) as ei:
        _create(driver, "w-sku")
    assert ei.value.reason == "SkuNotAvailable"


def test_family_quota_is_quota_exceeded(driver: AzureNodes, arm: FakeArm) -> None:
    arm.set_quota("eastus", "standardNCADSA100v4Family", 0)
    with pytest.raises(QuotaExceededError) as ei:
        _create(driver, "w-quota", market="on-demand")
    assert ei.value.reason == "OperationNotAllowed" and not ei.value.retryable
    assert "quota increase" in ei.value.message


def test_spot_quota_is_quota_exceeded(driver: AzureNodes, arm: FakeArm) -> None:
    arm.set_quota("eastus", "lowPriorityCores", 10)
    with pytest.raises(QuotaExceededError):
        _create(driver, "w-spotquota")


def test_quota_exceeded_code(driver: AzureNodes, arm: FakeArm) -> None:
    arm.reject(409, "QuotaExceeded", "Quota exceeded for this subscription.")
    with pytest.raises(QuotaExceededError) as ei:
        _create(driver, "w-q2")
    assert ei.value.reason == "QuotaExceeded"


def test_operation_not_allowed_without_quota_is_not_quota(driver: AzureNodes, arm: FakeArm) -> None:
    arm.reject(409, "OperationNotAllowed", "The operation is not allowed on a VM being deleted.")
    with pytest.raises(ProviderError) as ei:
        _create(driver, "w-ona")
    assert type(ei.value) is ProviderError and ei.value.reason == "OperationNotAllowed"


def test_refused_token_on_create_is_credentials(driver: AzureNodes, arm: FakeArm) -> None:
    # SkyPilot's bootstrap wraps the SDK's ClientAuthenticationError in NoClusterLaunchedError.
    arm.reject(
        401,
        "ExpiredAuthenticationToken",
        "The access token expiry UTC time is earlier than current UTC time.",
        method="PUT",
        path=r"/resourcegroups/[^/]+$",
    )
    with pytest.raises(CredentialsError) as ei:
        _create(driver, "w-auth")
    assert ei.value.reason == "ExpiredAuthenticationToken" and "`az login`" in ei.value.message
    assert "fake-token" not in ei.value.message


# --- signals ---------------------------------------------------------------------------------------------


def test_signals_restrictions_and_quota(driver: AzureNodes, arm: FakeArm) -> None:
    arm.restrict_sku("Standard_NC40ads_H100_v5", "eastus")
    arm.restrict_sku("Standard_NC24ads_A100_v4", "eastus", zones=("2",))
    arm.set_quota("eastus", "standardNCADSA100v4Family", 100)
    _create(driver, "w-sig", market="on-demand")  # uses 24 of the family's 100 vCPUs

    sigs = driver.signals()
    by: dict[tuple[Any, Any], Any] = {(s.instance_type, s.zone): s for s in sigs}
    assert all(s.cloud == "azure" and s.region == "eastus" and s.observed_at > 0 for s in sigs)
    assert ("Standard_D2s_v5", None) not in by  # no GPUs: not an offer
    h100 = by[("Standard_NC40ads_H100_v5", None)]
    assert h100.available is False and "NotAvailableForSubscription" in h100.detail
    a100 = by[("Standard_NC24ads_A100_v4", None)]
    assert a100.available is True and a100.quota_left_gpus == (100 - 24) // 24
    assert by[("Standard_NC24ads_A100_v4", "2")].available is False
    a100x2 = by[("Standard_NC48ads_A100_v4", None)]
    assert a100x2.quota_left_gpus == ((100 - 24) // 48) * 2

    # Cached for five minutes: a second read makes no request.
    before = len(arm.requests)
    assert driver.signals() == sigs
    assert len(arm.requests) == before


def test_signals_auth_failure_is_credentials(driver: AzureNodes, arm: FakeArm) -> None:
    arm.reject(401, "InvalidAuthenticationToken", method="GET", path=r"/skus$")
    with pytest.raises(CredentialsError):
        driver.signals()


# --- offers ----------------------------------------------------------------------------------------------


def test_offers_from_the_catalog() -> None:
    if not (SHARED_CATALOG / "azure" / "vms.csv").exists():
        pytest.skip(f"the shared catalog snapshot ({SHARED_CATALOG}) is not present")
    offers = AzureNodes(regions=["eastus"], catalog_dir=SHARED_CATALOG).offers()
    assert offers and {o.cloud for o in offers} == {"azure"} and {o.region for o in offers} == {"eastus"}
    assert any(o.instance_type == "Standard_NC24ads_A100_v4" for o in offers)
