"""The AWS node driver against a moto EC2/IAM/STS server, through SkyPilot's real provisioner and boto3.

Faults are injected on the wire (the fake answers EC2's real error XML), so botocore's parsing and retries and
SkyPilot's wrapping all run. The fake runs in a subprocess shared by the module and is reset before each test.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmodal.providers.aws import TAG_MARKET, AwsNodes
from cloudmodal.providers.aws_errors import map_aws_error
from cloudmodal.providers.base import (
    CredentialsError,
    LaunchRequest,
    Market,
    NoCapacityError,
    ProviderError,
    QuotaExceededError,
)
from cloudmodal.providers.nodes import TAG_CONTROL_PLANE, NodeRef, node_name, node_tags

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the fakes live in tests/fakes (not on pytest's pythonpath)
    sys.path.insert(0, str(REPO))
from tests.fakes.moto_ec2 import MotoEc2  # noqa: E402

REGIONS = ["us-east-1", "us-west-2"]
CP = "cp-aws-test"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Qta2V5LWZvci1jbG91ZG1vZGFs cloudmodal-test"
# Catalog zone ids and what moto's account calls them.
AZ1, AZ1_NAME = "use1-az1", "us-east-1b"
AZ2, AZ2_NAME = "use1-az2", "us-east-1c"


def _catalog() -> Path | None:
    """``$CLOUDMODAL_CATALOG_DIR``, else the shared snapshot next to the repo; None when it lacks AWS."""
    env = os.environ.get("CLOUDMODAL_CATALOG_DIR")
    d = Path(env) if env else REPO.parent / "shared" / "pricing" / "catalogs" / "v8"
    if (d / "aws" / "vms.csv").is_file() and (d / "aws" / "images.csv").is_file():
        return d
    return None


@pytest.fixture(scope="module")
def catalog() -> Path:
    d = _catalog()
    if d is None:
        pytest.skip("no price catalog with aws/vms.csv and aws/images.csv (set CLOUDMODAL_CATALOG_DIR)")
    return d


@pytest.fixture(scope="module")
def aws(catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoEc2]:
    """The fake, and this process pointed at it: HOME in a sandbox (SkyPilot reads ~/.sky), fake keys."""
    with MotoEc2.start(regions=REGIONS) as fake, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(key, raising=False)
        for key, value in fake.env().items():
            mp.setenv(key, value)
        yield fake


@pytest.fixture
def fake(aws: MotoEc2) -> MotoEc2:
    aws.clean()  # every instance terminated, no faults, an empty request log
    return aws


@pytest.fixture(scope="module")
def shared_driver(aws: MotoEc2, catalog: Path) -> Iterator[AwsNodes]:
    d = AwsNodes(regions=REGIONS, catalog_dir=str(catalog))
    yield d
    d.close()


@pytest.fixture
def driver(fake: MotoEc2, shared_driver: AwsNodes) -> AwsNodes:
    """One driver for the module (as the control plane keeps one); tests of caches make their own. The fake's
    account may have been reset (new VPCs): the driver bootstraps afresh for each test."""
    shared_driver.forget_network()
    return shared_driver


def offer(
    driver: AwsNodes, zone: str = AZ1, instance_type: str = "g5.xlarge", region: str = "us-east-1"
) -> Any:
    for o in driver.offers():
        if (o.region, o.zone, o.instance_type) == (region, zone, instance_type):
            return o
    raise AssertionError(f"the catalog has no {instance_type} in {region}/{zone}")


def request(o: Any, worker: str = "wk-1", market: Market = "spot") -> LaunchRequest:
    return LaunchRequest(worker_id=worker, app_id="ap-1", function_id="fu-1", offer=o, market=market)


def launch(driver: AwsNodes, req: LaunchRequest) -> NodeRef:
    return driver.create(
        req, name=node_name(CP, req.worker_id), tags=node_tags(CP, req), ssh_public_key=SSH_KEY
    )


def instances(fake: MotoEc2, region: str = "us-east-1") -> list[dict[str, Any]]:
    """The live (not terminated) instances in moto."""
    resp = fake.client("ec2", region).describe_instances()
    return [i for r in resp["Reservations"] for i in r["Instances"] if i["State"]["Name"] != "terminated"]


# --- check ------------------------------------------------------------------------------------------------


def test_check_names_the_account(driver: AwsNodes) -> None:
    ok, who = driver.check()
    assert ok, who
    assert "123456789012" in who and "arn:aws:" in who


def test_check_without_credentials_says_how_to_fix(
    fake: MotoEc2, catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    ok, why = AwsNodes(regions=REGIONS, catalog_dir=str(catalog)).check()
    assert not ok
    assert "aws configure" in why and "AWS_PROFILE" in why and "AWS_ACCESS_KEY_ID" in why
    assert fake.requests() == []  # nothing was sent


def test_check_maps_a_refused_token(driver: AwsNodes, fake: MotoEc2) -> None:
    fake.inject("GetCallerIdentity", "InvalidClientTokenId", service="sts")
    ok, why = driver.check()
    assert not ok
    assert "InvalidClientTokenId" in why and "aws configure" in why


def test_missing_boto3_names_the_extra(catalog: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an environment without the extra looks like
    ok, why = AwsNodes(regions=REGIONS, catalog_dir=str(catalog)).check()
    assert not ok and "pip install 'cloudmodal[aws]'" in why


# --- offers -----------------------------------------------------------------------------------------------


def test_offers_are_the_catalogs_aws_offers_in_the_regions(driver: AwsNodes, catalog: Path) -> None:
    got = driver.offers()
    assert got and {o.cloud for o in got} == {"aws"} and {o.region for o in got} <= set(REGIONS)
    everywhere = AwsNodes(catalog_dir=str(catalog)).offers()
    assert len({o.region for o in everywhere}) > len(REGIONS)


def test_default_regions_are_the_catalogs_enabled_ones(fake: MotoEc2, catalog: Path) -> None:
    d = AwsNodes(catalog_dir=str(catalog))
    got = d.regions()
    assert "us-east-1" in got and set(got) <= {o.region for o in d.offers()}
    assert [r["action"] for r in fake.requests()] == ["DescribeRegions"]
    assert d.regions() == got  # cached


# --- create / list / query / terminate ----------------------------------------------------------------------


def test_spot_node_lifecycle(driver: AwsNodes, fake: MotoEc2) -> None:
    o = offer(driver)
    req = request(o, market="spot")
    ref = launch(driver, req)
    name = node_name(CP, req.worker_id)
    assert (ref.cloud, ref.region, ref.zone, ref.cluster) == ("aws", "us-east-1", AZ1, name)
    assert ref.instance_id

    [inst] = instances(fake)
    assert inst["InstanceId"] == ref.instance_id
    assert inst["InstanceType"] == "g5.xlarge"
    assert inst["InstanceLifecycle"] == "spot"
    assert inst["Placement"]["AvailabilityZone"] == AZ1_NAME
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["Name"] == name
    assert {k: tags[k] for k in node_tags(CP, req)} == node_tags(CP, req)
    assert tags[TAG_MARKET] == "spot"

    [info] = driver.list({TAG_CONTROL_PLANE: CP})
    assert info.ref.instance_id == ref.instance_id and info.ref.cluster == name and info.ref.zone == AZ1
    assert info.state in ("pending", "running") and info.market == "spot"
    assert info.public_ip and info.private_ip and info.ssh_user == "ubuntu"
    assert info.instance_type == "g5.xlarge" and info.tags[TAG_CONTROL_PLANE] == CP
    assert driver.list({TAG_CONTROL_PLANE: "another-control-plane"}) == []

    q = driver.query(ref)
    assert q.state in ("pending", "running") and q.ref == ref
    by_name = driver.query(NodeRef("aws", "us-east-1", AZ1, name))
    assert by_name.ref.instance_id == ref.instance_id

    driver.terminate(ref)
    assert driver.list({TAG_CONTROL_PLANE: CP}) == []
    assert driver.query(ref).state == "terminated"
    driver.terminate(ref)  # idempotent


def test_on_demand_node_image_key_and_identity(driver: AwsNodes, fake: MotoEc2, catalog: Path) -> None:
    ref = launch(driver, request(offer(driver, AZ2), market="on-demand"))
    [inst] = instances(fake)
    assert "InstanceLifecycle" not in inst
    assert inst["Placement"]["AvailabilityZone"] == AZ2_NAME
    assert "IamInstanceProfile" not in inst  # nodes get no AWS identity unless one is configured
    ami = next(
        line.split(",")[4]
        for line in (catalog / "aws" / "images.csv").read_text().splitlines()
        if line.startswith("skypilot:custom-gpu-ubuntu,us-east-1,")
    )
    assert inst["ImageId"] == ami
    attr = fake.client("ec2").describe_instance_attribute(InstanceId=ref.instance_id, Attribute="userData")
    user_data = base64.b64decode(attr["UserData"]["Value"]).decode()
    assert user_data.startswith("#cloud-config") and "name: ubuntu" in user_data and SSH_KEY in user_data
    assert driver.query(ref).market == "on-demand"


def test_nodes_in_two_regions_are_listed(driver: AwsNodes) -> None:
    a = launch(driver, request(offer(driver), worker="wk-east", market="on-demand"))
    b = launch(
        driver, request(offer(driver, "usw2-az1", region="us-west-2"), worker="wk-west", market="spot")
    )
    got = {i.ref.instance_id: i for i in driver.list({TAG_CONTROL_PLANE: CP})}
    assert set(got) == {a.instance_id, b.instance_id}
    assert got[b.instance_id].ref.region == "us-west-2" and got[b.instance_id].market == "spot"


def test_query_of_a_node_aws_does_not_know_is_terminated(driver: AwsNodes, fake: MotoEc2) -> None:
    ref = launch(driver, request(offer(driver), market="on-demand"))
    fake.reset()  # a fresh account: the cloud forgot the node
    assert driver.query(ref).state == "terminated"
    assert driver.query(NodeRef("aws", "us-east-1", AZ1, "cm-00000000-none")).state == "terminated"


def test_spot_reclaim_reads_as_preempted(driver: AwsNodes, fake: MotoEc2) -> None:
    ref = launch(driver, request(offer(driver), market="spot"))
    assert ref.instance_id is not None
    fake.reclaim_spot(ref.instance_id, "us-east-1")
    info = driver.query(ref)
    assert info.state == "preempted"
    assert info.detail == "Server.SpotInstanceTermination"
    assert driver.list({TAG_CONTROL_PLANE: CP}) == []


# --- errors on the wire -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind", "market"),
    [
        ("InsufficientInstanceCapacity", NoCapacityError, "on-demand"),
        ("InsufficientHostCapacity", NoCapacityError, "on-demand"),
        ("SpotMaxPriceTooLow", NoCapacityError, "spot"),
        ("Unsupported", NoCapacityError, "on-demand"),
        ("VcpuLimitExceeded", QuotaExceededError, "on-demand"),
        ("MaxSpotInstanceCountExceeded", QuotaExceededError, "spot"),
        ("InstanceLimitExceeded", QuotaExceededError, "on-demand"),
        ("UnauthorizedOperation", CredentialsError, "on-demand"),
        ("AuthFailure", CredentialsError, "on-demand"),
    ],
)
def test_launch_errors_map_to_kinds(
    driver: AwsNodes, fake: MotoEc2, code: str, kind: type[ProviderError], market: Market
) -> None:
    o = offer(driver)
    fake.inject("RunInstances", code)
    with pytest.raises(kind) as e:
        launch(driver, request(o, market=market))
    assert type(e.value) is kind
    assert e.value.reason == code and e.value.offer is o
    assert code in e.value.message
    assert e.value.retryable is (kind is NoCapacityError)
    assert instances(fake) == []


def test_an_unknown_code_is_a_provider_error_with_the_code(driver: AwsNodes, fake: MotoEc2) -> None:
    fake.inject("RunInstances", "SomethingNew", status=400)
    with pytest.raises(ProviderError) as e:
        launch(driver, request(offer(driver)))
    assert type(e.value) is ProviderError and e.value.reason == "SomethingNew"


def test_capacity_500_is_sent_once(driver: AwsNodes, fake: MotoEc2, monkeypatch: pytest.MonkeyPatch) -> None:
    """EC2 answers InsufficientInstanceCapacity with HTTP 500, which botocore retries by default; neither
    botocore nor SkyPilot's own loop may resend it, even with retries asked for in the environment."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    fake.inject("RunInstances", "InsufficientInstanceCapacity", status=500)
    with pytest.raises(NoCapacityError):
        launch(driver, request(offer(driver), market="on-demand"))
    sent = fake.requests("RunInstances")
    assert [(r["status"], r["zone"]) for r in sent] == [(500, AZ1_NAME)]


def test_a_failing_zone_does_not_stop_the_next(driver: AwsNodes, fake: MotoEc2) -> None:
    fake.inject("RunInstances", "InsufficientInstanceCapacity", zone=AZ1)  # by zone id
    with pytest.raises(NoCapacityError) as e:
        launch(driver, request(offer(driver, AZ1), market="on-demand"))
    assert e.value.reason == "InsufficientInstanceCapacity"
    ref = launch(driver, request(offer(driver, AZ2), market="on-demand"))
    assert ref.zone == AZ2
    [inst] = instances(fake)
    assert inst["Placement"]["AvailabilityZone"] == AZ2_NAME
    assert [(r["zone"], r["status"]) for r in fake.requests("RunInstances")] == [
        (AZ1_NAME, 500),
        (AZ2_NAME, 200),
    ]


def test_skypilots_system_exit_is_mapped(driver: AwsNodes, fake: MotoEc2) -> None:
    """SkyPilot answers some boto errors in its subnet checks with ``SystemExit(1)``: it must not escape."""
    fake.inject("DescribeRouteTables", "UnauthorizedOperation")
    with pytest.raises(CredentialsError) as e:
        launch(driver, request(offer(driver), market="on-demand"))
    assert e.value.reason == "UnauthorizedOperation"
    assert fake.requests("RunInstances") == []


@pytest.mark.parametrize(
    ("code", "kind", "retryable"),
    [
        ("InsufficientInstanceCapacity", NoCapacityError, True),
        ("VcpuLimitExceeded", QuotaExceededError, False),
        ("ExpiredToken", CredentialsError, False),
        ("InvalidPermission.Duplicate", ProviderError, True),
        ("Whatever", ProviderError, False),
    ],
)
def test_error_table_unwraps_skypilots_wrapping(
    code: str, kind: type[ProviderError], retryable: bool
) -> None:
    from botocore.exceptions import ClientError

    def wrapped() -> BaseException:
        try:
            try:
                raise ClientError({"Error": {"Code": code, "Message": "m"}}, "RunInstances")
            except ClientError as exc:
                raise RuntimeError("Failed to launch instances. Max attempts exceeded.") from exc
        except RuntimeError as outer:
            return outer

    err = map_aws_error(wrapped())
    assert type(err) is kind and err.reason == code and err.retryable is retryable


def test_missing_credentials_are_reported_without_a_request(
    fake: MotoEc2, catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    d = AwsNodes(regions=REGIONS, catalog_dir=str(catalog))
    with pytest.raises(CredentialsError) as e:
        launch(d, request(offer(d)))
    assert "aws configure" in e.value.message
    assert fake.requests() == []


def test_describe_errors_are_mapped(driver: AwsNodes, fake: MotoEc2) -> None:
    fake.inject("DescribeInstances", "UnauthorizedOperation")
    with pytest.raises(CredentialsError) as e:
        driver.list({TAG_CONTROL_PLANE: CP})
    assert e.value.reason == "UnauthorizedOperation"


def test_missing_image_is_a_clear_error(driver: AwsNodes, tmp_path: Path, catalog: Path) -> None:
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "vms.csv").write_text((catalog / "aws" / "vms.csv").read_text())
    (tmp_path / "aws" / "images.csv").write_text("Tag,Region,OS,OSVersion,ImageId,CreationDate,BaseImageId\n")
    d = AwsNodes(regions=REGIONS, catalog_dir=str(tmp_path))
    with pytest.raises(ProviderError) as e:
        launch(d, request(offer(d), market="on-demand"))
    assert e.value.reason == "no-image" and "cloudmodal pricing refresh" in e.value.message


# --- signals ------------------------------------------------------------------------------------------------


def test_signals_report_offerings_and_spot_prices(fake: MotoEc2, catalog: Path) -> None:
    driver = AwsNodes(regions=REGIONS, catalog_dir=str(catalog))
    before = time.time()
    got = driver.signals()
    assert got and {s.cloud for s in got} == {"aws"} and {s.region for s in got} == set(REGIONS)
    assert all(s.observed_at >= before - 1 for s in got)
    g5 = {s.zone: s for s in got if s.instance_type == "g5.xlarge" and s.region == "us-east-1"}
    assert g5[AZ1].available is True and g5[AZ1].gpu == offer(driver).gpu
    assert isinstance(g5[AZ1].price_spot, float)
    assert all(s.available in (True, False) for s in got)
    catalog_zones = {o.zone for o in driver.offers()}
    assert {s.zone for s in got} <= catalog_zones | {s.zone for s in got if s.available}
    seen = len(fake.requests())
    assert driver.signals() is got  # cached for five minutes: no new request
    assert len(fake.requests()) == seen


def test_signal_errors_are_mapped(fake: MotoEc2, catalog: Path) -> None:
    driver = AwsNodes(regions=REGIONS, catalog_dir=str(catalog))
    fake.inject("DescribeSpotPriceHistory", "AuthFailure")
    with pytest.raises(CredentialsError) as e:
        driver.signals()
    assert e.value.reason == "AuthFailure"


# --- concurrency --------------------------------------------------------------------------------------------


def test_parallel_creates_from_threads(driver: AwsNodes) -> None:
    """The control plane launches from several threads at once, through one driver."""
    errors: list[BaseException] = []
    refs: list[NodeRef] = []
    zones = [AZ1, AZ2, AZ1]

    def one(i: int) -> None:
        try:
            refs.append(
                launch(driver, request(offer(driver, zones[i]), worker=f"wk-par{i}", market="on-demand"))
            )
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(zones))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    listed = {i.ref.instance_id for i in driver.list({TAG_CONTROL_PLANE: CP})}
    assert listed == {r.instance_id for r in refs} and len(listed) == len(zones)


def test_a_region_is_bootstrapped_once_and_a_vanished_subnet_bootstraps_again(
    driver: AwsNodes, fake: MotoEc2
) -> None:
    launch(driver, request(offer(driver), worker="wk-1", market="on-demand"))
    bootstraps = len(fake.requests("DescribeVpcs"))
    launch(driver, request(offer(driver), worker="wk-2", market="on-demand"))
    assert len(fake.requests("DescribeVpcs")) == bootstraps  # the second launch reused the bootstrap
    fake.reset()  # a new account: the cached subnet and security group are gone
    ref = launch(driver, request(offer(driver), worker="wk-3", market="on-demand"))
    statuses = [r["status"] for r in fake.requests("RunInstances")]
    assert (
        statuses == [400, 200] and ref.instance_id
    )  # refused once (InvalidSubnetID.NotFound), then launched
