"""The GCP driver through SkyPilot's real GCP provisioner and google-api-python-client, against a local fake.

Everything on the wire is real: SkyPilot builds its clients with ``sky.adaptors.gcp.build`` (sent to the fake
by the driver's own ``api_endpoint`` option), google.auth signs a JWT with a freshly generated service-account
key and fetches tokens from the fake's ``/token``, and faults are GCP error bodies answered by the fake, so
googleapiclient's and SkyPilot's error handling runs unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cloudmodal.pricing.offers import Offer
from cloudmodal.providers.base import (
    CredentialsError,
    LaunchRequest,
    Market,
    NoCapacityError,
    ProviderError,
    QuotaExceededError,
)
from cloudmodal.providers.gcp import ENDPOINT_ENV, GcpNodes
from cloudmodal.providers.gcp_endpoint import endpoint_for, use_api_endpoint
from cloudmodal.providers.gcp_errors import CREDENTIALS_FIX, map_gcp_error
from cloudmodal.providers.gcp_labels import decode_label, encode_label
from cloudmodal.providers.nodes import TAG_CONTROL_PLANE, TAG_WORKER, node_name, node_tags

pytest.importorskip("sky")
pytest.importorskip("googleapiclient")


def _load_fake() -> ModuleType:
    """tests/fakes/gcp_compute.py, loaded by path (tests/ is not a package)."""
    name = "cloudmodal_tests_fake_gcp_compute"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "fakes" / "gcp_compute.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fake_gcp = _load_fake()
SHARED_CATALOG = Path(__file__).resolve().parents[3] / "shared" / "pricing" / "catalogs" / "v8"
CP = "cp-Test_1"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests cloudmodal@test"
T4_IMAGE = "projects/sky-dev-465/global/images/skypilot-gcp-gpu-ubuntu-260603"
V100_IMAGE = "projects/sky-dev-465/global/images/skypilot-gcp-gpu-ubuntu-241030"

VMS = """InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,SpotPrice
n1-standard-8,8.0,30.0,,,,us-central1,us-central1-a,0.38,0.08
n1-highmem-8,8.0,52.0,,,,us-central1,us-central1-b,0.47,0.10
g2-standard-4,4.0,16.0,,,,us-central1,us-central1-b,0.70,0.28
n1-standard-8,8.0,30.0,,,,europe-west4,europe-west4-a,0.42,0.09
,,,T4,1,"{'Gpus': [{'MemoryInfo': {'SizeInMiB': 16384}}]}",us-central1,us-central1-a,0.35,0.14
,,,V100,1,"{'Gpus': [{'MemoryInfo': {'SizeInMiB': 16384}}]}",us-central1,us-central1-b,2.48,0.99
,,,L4,1,"{'Gpus': [{'MemoryInfo': {'SizeInMiB': 24576}}]}",us-central1,us-central1-b,0.56,0.22
,,,T4,1,"{'Gpus': [{'MemoryInfo': {'SizeInMiB': 16384}}]}",europe-west4,europe-west4-a,0.35,0.14
"""
IMAGES = f"""Tag,Region,OS,OSVersion,ImageId,CreationDate,BaseImageId
skypilot:custom-gpu-ubuntu-2204,,ubuntu,22.04,{V100_IMAGE},20241030,
skypilot:custom-gpu-ubuntu-2204-cuda13,,ubuntu,22.04,{T4_IMAGE},20260603,
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[Any]:
    with fake_gcp.FakeGcp() as f:
        yield f


@pytest.fixture(scope="module")
def key_file(fake: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake.write_credentials(tmp_path_factory.mktemp("gcp") / "key.json")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalog") / "v8"
    (root / "gcp").mkdir(parents=True)
    (root / "gcp" / "vms.csv").write_text(VMS)
    (root / "gcp" / "images.csv").write_text(IMAGES)
    return root


@pytest.fixture(autouse=True)
def _env(fake: Any, key_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.reset()
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # never the developer's gcloud
    for var in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT", "GCLOUD_PROJECT", ENDPOINT_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def driver(fake: Any, catalog: Path) -> Iterator[GcpNodes]:
    d = GcpNodes(regions=["us-central1", "europe-west4"], catalog_dir=catalog, api_endpoint=fake.url)
    yield d
    d.close()


def _offer(driver: GcpNodes, gpu: str, zone: str) -> Offer:
    return next(o for o in driver.offers() if o.gpu == gpu and o.zone == zone)


def _request(offer: Offer, market: Market = "on-demand", worker: str = "wk-AbCdEf012") -> LaunchRequest:
    return LaunchRequest(
        worker_id=worker,
        app_id="ap-Xy1",
        function_id="fu-Zz2",
        offer=offer,
        market=market,
    )


def _create(
    driver: GcpNodes, offer: Offer, market: Market = "on-demand", worker: str = "wk-AbCdEf012", cp: str = CP
):
    req = _request(offer, market, worker)
    return driver.create(req, name=node_name(cp, worker), tags=node_tags(cp, req), ssh_public_key=SSH_KEY)


def _bulk_body(fake: Any) -> dict[str, Any]:
    calls = fake.calls("/instances/bulkInsert", "POST")
    assert len(calls) == 1, [c[1] for c in fake.requests]
    return calls[0][3]


# --- check ---------------------------------------------------------------------------------------------


def test_check_reads_the_project_once(driver: GcpNodes, fake: Any) -> None:
    ok, who = driver.check()
    assert ok, who
    assert "cloudmodal-test@cm-test-project.iam.gserviceaccount.com" in who and "cm-test-project" in who
    assert [c[1] for c in fake.calls("/compute/")] == ["/compute/compute/v1/projects/cm-test-project"]


def test_check_without_credentials_says_how_to_fix(driver: GcpNodes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    ok, why = driver.check()
    assert not ok
    assert "gcloud auth application-default login" in why and "GOOGLE_APPLICATION_CREDENTIALS" in why


def test_check_finds_gcloud_adc_file(
    driver: GcpNodes, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    (tmp_path / "gcloud").mkdir()
    (tmp_path / "gcloud" / "application_default_credentials.json").write_text(key_file.read_text())
    ok, who = driver.check()
    assert ok and "gcloud application-default credentials" in who


def test_check_missing_key_file(driver: GcpNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "nope.json"))
    ok, why = driver.check()
    assert not ok and "does not exist" in why


def test_check_refused_token_is_a_credentials_problem(driver: GcpNodes, fake: Any) -> None:
    fake.fail_token(times=10)
    ok, why = driver.check()
    assert not ok
    assert "invalid_grant" in why and CREDENTIALS_FIX in why
    assert "ya29" not in why and "PRIVATE KEY" not in why


def test_project_needed(fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "user.json"
    key.write_text(
        json.dumps({"type": "authorized_user", "client_id": "x", "client_secret": "y", "refresh_token": "z"})
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    d = GcpNodes(api_endpoint=fake.url)
    try:
        ok, why = d.check()
        assert not ok and "GOOGLE_CLOUD_PROJECT" in why
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "from-env")
        assert d.project == "from-env"
        assert GcpNodes(project="explicit").project == "explicit"
    finally:
        d.close()


# --- offers and create ----------------------------------------------------------------------------------


def test_offers_are_the_catalogs_gcp_offers(driver: GcpNodes) -> None:
    offers = driver.offers()
    assert {(o.instance_type, o.gpu, o.zone) for o in offers} == {
        ("n1-standard-8", "T4", "us-central1-a"),
        ("n1-highmem-8", "V100", "us-central1-b"),
        ("g2-standard-4", "L4", "us-central1-b"),
        ("n1-standard-8", "T4", "europe-west4-a"),
    }
    assert all(o.cloud == "gcp" for o in offers)


def test_offers_from_the_shared_snapshot() -> None:
    if not (SHARED_CATALOG / "gcp" / "vms.csv").exists():
        pytest.skip(f"the shared pricing snapshot ({SHARED_CATALOG}) is not present")
    offers = GcpNodes(regions=["us-central1"], catalog_dir=SHARED_CATALOG).offers()
    assert offers and all(o.cloud == "gcp" and o.region == "us-central1" for o in offers)
    assert any(o.gpu == "T4" and o.instance_type.startswith("n1-") for o in offers)


def test_create_spot_t4(driver: GcpNodes, fake: Any) -> None:
    offer = _offer(driver, "T4", "us-central1-a")
    ref = _create(driver, offer, market="spot")

    assert (ref.cloud, ref.region, ref.zone) == ("gcp", "us-central1", "us-central1-a")
    assert ref.cluster == node_name(CP, "wk-AbCdEf012") and ref.instance_id
    props = _bulk_body(fake)["instanceProperties"]
    assert props["machineType"] == "n1-standard-8"
    assert props["guestAccelerators"] == [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]
    assert props["scheduling"]["provisioningModel"] == "SPOT" and props["scheduling"]["preemptible"] is True
    assert props["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert props["disks"][0]["initializeParams"]["sourceImage"] == T4_IMAGE
    meta = {i["key"]: i["value"] for i in props["metadata"]["items"]}
    assert meta["ssh-keys"] == f"gcpuser:{SSH_KEY}"
    # tags as GCP labels (upper case encoded), plus SkyPilot's cluster labels
    assert props["labels"][TAG_CONTROL_PLANE] == encode_label(CP) == "cp-_test__1"
    assert props["labels"][TAG_WORKER] == "wk-_ab_cd_ef012"
    assert props["labels"]["ray-cluster-name"] == ref.cluster
    # SkyPilot's bootstrap ran on the wire: service account and subnet from the fake
    assert props["serviceAccounts"][0]["email"].startswith("skypilot-v1@")
    assert props["networkInterfaces"][0]["subnetwork"].endswith("/regions/us-central1/subnetworks/default")
    inst = fake.instance(ref.instance_id)
    assert inst["status"] == "RUNNING" and inst["labels"]["ray-node-type"] == "head"


def test_create_on_demand_legacy_gpu_image(driver: GcpNodes, fake: Any) -> None:
    ref = _create(driver, _offer(driver, "V100", "us-central1-b"))
    props = _bulk_body(fake)["instanceProperties"]
    assert props["guestAccelerators"][0]["acceleratorType"] == "nvidia-tesla-v100"
    assert props["scheduling"] == {"onHostMaintenance": "TERMINATE"}  # no SPOT model
    assert props["disks"][0]["initializeParams"]["sourceImage"] == V100_IMAGE
    assert driver.query(ref).market == "on-demand"


# --- list, query, terminate, preemption ----------------------------------------------------------------


def test_list_filters_on_the_control_plane_tag(driver: GcpNodes, fake: Any) -> None:
    mine = _create(driver, _offer(driver, "T4", "us-central1-a"), market="spot")
    _create(driver, _offer(driver, "T4", "europe-west4-a"), worker="wk-Other1", cp="cp-other")
    found = driver.list({TAG_CONTROL_PLANE: CP})
    assert [n.ref.instance_id for n in found] == [mine.instance_id]
    node = found[0]
    assert node.ref.cluster == mine.cluster and node.ref.zone == "us-central1-a"
    assert node.tags[TAG_CONTROL_PLANE] == CP and node.tags[TAG_WORKER] == "wk-AbCdEf012"  # decoded
    assert (node.state, node.market, node.instance_type, node.ssh_user) == (
        "running",
        "spot",
        "n1-standard-8",
        "gcpuser",
    )
    assert node.public_ip and node.private_ip
    assert len(driver.list({})) == 2
    # a driver limited to one region does not see the other region's node
    eu_only = GcpNodes(regions=["europe-west4"], api_endpoint=fake.url)
    try:
        assert [n.tags[TAG_CONTROL_PLANE] for n in eu_only.list({})] == ["cp-other"]
    finally:
        eu_only.close()


def test_query_preemption_and_idempotent_terminate(driver: GcpNodes, fake: Any) -> None:
    ref = _create(driver, _offer(driver, "T4", "us-central1-a"), market="spot")
    info = driver.query(ref)
    assert (info.state, info.market) == ("running", "spot") and info.ref.instance_id == ref.instance_id

    fake.preempt(ref.instance_id)  # TERMINATED + a compute.instances.preempted operation
    info = driver.query(ref)
    assert info.state == "preempted" and info.public_ip is None
    assert "compute.instances.preempted" in info.detail
    assert [n.state for n in driver.list({TAG_CONTROL_PLANE: CP})] == ["preempted"]  # it still holds a disk

    driver.terminate(ref)
    assert fake.instance(ref.instance_id) is None
    assert driver.query(ref).state == "terminated"
    driver.terminate(ref)  # nothing left: no error, no second delete
    assert len(fake.calls(f"/instances/{ref.instance_id}", "DELETE")) == 1
    assert driver.list({TAG_CONTROL_PLANE: CP}) == []


# --- errors on the wire --------------------------------------------------------------------------------


def _launch_error(driver: GcpNodes, offer: Offer) -> ProviderError:
    with pytest.raises(ProviderError) as e:
        _create(driver, offer, market="spot")
    assert "ya29" not in e.value.message and "PRIVATE KEY" not in e.value.message
    return e.value


@pytest.mark.parametrize(
    "code", ["ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"]
)
def test_stockout_on_the_operation(driver: GcpNodes, fake: Any, code: str) -> None:
    fake.fail_operation(code)
    offer = _offer(driver, "T4", "us-central1-a")
    err = _launch_error(driver, offer)
    assert isinstance(err, NoCapacityError) and err.reason == code and err.retryable
    assert err.offer is offer
    assert len(fake.calls("/bulkInsert")) == 1  # no retry: the control plane's failover is the retry
    assert driver.list({TAG_CONTROL_PLANE: CP}) == []


def test_gpu_not_offered_in_zone(driver: GcpNodes, fake: Any) -> None:
    fake.set_accelerators("us-central1-a", [("nvidia-l4", 8)])
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert isinstance(err, NoCapacityError) and err.reason == "UNSUPPORTED_OPERATION"


def test_resource_pool_exhausted_http_error(driver: GcpNodes, fake: Any) -> None:
    fake.fail_request("bulkInsert", 503, "resourcePoolExhausted")
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert isinstance(err, NoCapacityError) and err.reason == "resourcePoolExhausted"
    assert len(fake.calls("/bulkInsert")) == 1


def test_quota_is_a_synchronous_403(driver: GcpNodes, fake: Any) -> None:
    fake.fail_request("bulkInsert", 403, "quotaExceeded")
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert isinstance(err, QuotaExceededError) and err.reason == "quotaExceeded"
    assert "GPUS_ALL_REGIONS" in err.message and "console.cloud.google.com/iam-admin/quotas" in err.message
    assert len(fake.calls("/bulkInsert")) == 1


def test_quota_on_the_operation(driver: GcpNodes, fake: Any) -> None:
    fake.fail_operation("QUOTA_EXCEEDED")
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert isinstance(err, QuotaExceededError) and err.reason == "QUOTA_EXCEEDED"


def test_permission_denied_on_create(driver: GcpNodes, fake: Any) -> None:
    fake.fail_request("bulkInsert", 403, "forbidden")
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert isinstance(err, CredentialsError) and err.reason == "forbidden"
    assert "roles/compute.admin" in err.message


def test_unauthenticated_everywhere(driver: GcpNodes, fake: Any) -> None:
    fake.fail_request("*", 401, "authError", times=50)
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert isinstance(err, CredentialsError) and err.reason == "authError"
    with pytest.raises(CredentialsError):
        driver.list({TAG_CONTROL_PLANE: CP})


def test_refused_token_on_create(driver: GcpNodes, fake: Any) -> None:
    fake.fail_token(times=50)
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert isinstance(err, CredentialsError) and err.reason == "invalid_grant"


# --- signals -------------------------------------------------------------------------------------------


def test_signals_availability_and_quota(driver: GcpNodes, fake: Any) -> None:
    sig = driver.signals()
    by = {(s.zone, s.gpu): s for s in sig}
    t4 = by[("us-central1-a", "T4")]
    assert t4.available is True and t4.quota_left_gpus == 8 and t4.observed_at > 0
    assert "PREEMPTIBLE_NVIDIA_T4_GPUS left 16" in t4.detail
    assert by[("us-central1-a", "L4")].quota_left_gpus == 3  # limit 4, usage 1
    assert by[("us-central1-a", "A100-40GB")].quota_left_gpus == 0
    # the catalog sells L4 in us-central1-b, but GCP lists no L4 there now
    assert by[("us-central1-b", "L4")].available is False
    assert by[("europe-west4-a", "H100")].available is True
    assert all(s.region in ("us-central1", "europe-west4") for s in sig)
    # cached for 5 minutes: a second call does not reach GCP
    before = len(fake.requests)
    assert driver.signals() == sig
    assert len(fake.requests) == before


# --- the endpoint option and labels --------------------------------------------------------------------


def test_endpoint_from_env(fake: Any, catalog: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, fake.url)
    d = GcpNodes(catalog_dir=catalog)
    try:
        assert d.api_endpoint == fake.url
        assert d.check()[0]
    finally:
        d.close()


def test_endpoint_layout_and_one_per_process(driver: GcpNodes, fake: Any) -> None:
    assert endpoint_for("http://h:1", "compute", "v1") == "http://h:1/compute/compute/v1/"
    assert endpoint_for("http://h:1/", "cloudresourcemanager", "v1") == "http://h:1/cloudresourcemanager/"
    driver.check()  # installs the driver's endpoint
    with pytest.raises(ValueError, match="one api_endpoint per process"):
        use_api_endpoint("http://127.0.0.1:1")


@pytest.mark.parametrize("value", ["cp-Test_1", "wk-AbCdEf012", "plain-1", "a__B_"])
def test_label_round_trip(value: str) -> None:
    encoded = encode_label(value)
    assert encoded == encoded.lower() and decode_label(encoded) == value


def test_bad_tag_value(driver: GcpNodes) -> None:
    with pytest.raises(ProviderError, match="cannot hold"):
        driver.list({TAG_CONTROL_PLANE: "a.b"})


def test_no_credentials_at_all_maps_to_credentials_error() -> None:
    from google.auth.exceptions import DefaultCredentialsError

    err = map_gcp_error(DefaultCredentialsError("Your default credentials were not found."), doing="listing")
    assert isinstance(err, CredentialsError) and err.reason == "DefaultCredentialsError"
    assert "gcloud auth application-default login" in err.message


def test_unknown_operation_error_stays_a_provider_error(driver: GcpNodes, fake: Any) -> None:
    fake.fail_operation("RESOURCE_NOT_READY", "The resource is not ready")
    err = _launch_error(driver, _offer(driver, "T4", "us-central1-a"))
    assert type(err) is ProviderError and err.reason == "RESOURCE_NOT_READY" and not err.retryable


def test_nodes_run_as_the_configured_service_account(fake: Any, catalog: Path) -> None:
    account = "cloudmodal-worker@cm-test-project.iam.gserviceaccount.com"
    d = GcpNodes(regions=["us-central1"], catalog_dir=catalog, api_endpoint=fake.url, service_account=account)
    try:
        _create(d, _offer(d, "T4", "us-central1-a"), market="spot")
    finally:
        d.close()
    props = _bulk_body(fake)["instanceProperties"]
    # not SkyPilot's project-wide skypilot-v1 account (test_create_spot_t4 shows that one without the option)
    assert [a["email"] for a in props["serviceAccounts"]] == [account]
