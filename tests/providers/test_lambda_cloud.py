"""LambdaNodes through SkyPilot's real Lambda client against a spec-validating fake of Lambda's API v1.

The fake (``tests/fakes/lambda_api.py``) runs on 127.0.0.1 for the module; errors are injected on the wire in
Lambda's real envelope, so SkyPilot's own error handling runs before the driver maps it. Every test ends by
asserting that the fake saw no request or response outside the OpenAPI 1.8.3 spec.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from catalog_fixtures import LAMBDA_HEADER, aws_info, find_shared_pricing, write_catalog

from cloudmodal.pricing.offers import Offer
from cloudmodal.providers import nodes
from cloudmodal.providers.base import (
    CredentialsError,
    LaunchRequest,
    Market,
    NoCapacityError,
    ProviderError,
    QuotaExceededError,
)
from cloudmodal.providers.lambda_cloud import (
    API_KEY_ENV,
    ENDPOINT_ENV,
    LambdaNodes,
    error_from_lambda,
    ssh_key_name,
)
from tests.fakes.lambda_api import DEFAULT_API_KEY, SPEC_HINT, LambdaFake, find_spec

CP = "control-plane-1"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICN+lJwsONkwrdsSnQsu1ydUkIuIg5oOC+Eslvmtt60T cloudmodal"
A10 = Offer(
    cloud="lambda",
    region="us-east-1",
    zone=None,
    instance_type="gpu_1x_a10",
    gpu="A10",
    gpu_count=1,
    gpu_memory_gb=24.0,
    vcpus=30.0,
    memory_gb=200.0,
    price_ondemand=1.29,
    price_spot=None,
    source="test",
    date="2025-01-01",
)


@pytest.fixture(scope="module")
def fake() -> Iterator[LambdaFake]:
    spec = find_spec()
    if spec is None:
        pytest.skip(f"the Lambda Cloud OpenAPI spec ({SPEC_HINT}/openapi-1.8.3.json) is not present")
    with LambdaFake(spec) as f:
        yield f


@pytest.fixture(autouse=True)
def _clean(fake: LambdaFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh fake and a HOME with no Lambda key file; after the test, no spec violation on the wire."""
    fake.reset()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    yield
    assert fake.violations == [], fake.violations


@pytest.fixture
def make_driver(fake: LambdaFake, monkeypatch: pytest.MonkeyPatch) -> Callable[..., LambdaNodes]:
    """Drivers on the fake with the key in $LAMBDA_API_KEY and SkyPilot's 429 backoff cut to milliseconds."""
    monkeypatch.setenv(API_KEY_ENV, DEFAULT_API_KEY)

    def make(**kwargs: Any) -> LambdaNodes:
        kwargs.setdefault("api_endpoint", fake.url)
        kwargs.setdefault("rate_limit_backoff_s", 0.001)
        return LambdaNodes(**kwargs)

    return make


@pytest.fixture
def driver(make_driver: Callable[..., LambdaNodes]) -> LambdaNodes:
    return make_driver()


def request(worker: str = "w-1", offer: Any = A10, market: Market = "on-demand") -> LaunchRequest:
    return LaunchRequest(worker_id=worker, app_id="app", function_id="fn", offer=offer, market=market)


def create(driver: LambdaNodes, worker: str = "w-1", cp: str = CP, **kw: Any) -> nodes.NodeRef:
    req = request(worker, **kw)
    name = nodes.node_name(cp, worker)
    return driver.create(req, name=name, tags=nodes.node_tags(cp, req), ssh_public_key=PUBKEY)


def wait_state(driver: LambdaNodes, ref: nodes.NodeRef, state: str, timeout: float = 10.0) -> nodes.NodeInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = driver.query(ref)
        if info.state == state or time.monotonic() > deadline:
            assert info.state == state, info
            return info
        time.sleep(0.01)


# --- the fake keeps both sides honest -------------------------------------------------------------------


def test_fake_records_spec_violations(fake: LambdaFake) -> None:
    import requests

    r = requests.post(
        fake.url + "/instance-operations/launch",
        json={"region_name": "atlantis-1", "instance_type_name": "gpu_1x_a10"},
        headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
        timeout=5,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "global/invalid-parameters"
    assert any("ssh_key_names" in v for v in fake.violations)
    assert any("atlantis-1" in v for v in fake.violations)
    r = requests.get(fake.url + "/instances", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "global/invalid-api-key"
    fake.violations.clear()  # they were the point of this test


# --- check ----------------------------------------------------------------------------------------------


def test_check_ok_with_env_key(driver: LambdaNodes, fake: LambdaFake) -> None:
    ok, msg = driver.check()
    assert ok, msg
    assert API_KEY_ENV in msg and DEFAULT_API_KEY not in msg
    assert [r.op_id for r in fake.requests] == ["listInstanceTypes"]


def test_check_ok_with_skypilot_keys_file(fake: LambdaFake) -> None:
    keys = Path(os.path.expanduser("~/.lambda_cloud/lambda_keys"))
    keys.parent.mkdir()
    keys.write_text(f"api_key = {DEFAULT_API_KEY}\n")
    keys.chmod(0o600)
    ok, msg = LambdaNodes(api_endpoint=fake.url).check()
    assert ok, msg
    assert str(keys) in msg
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600  # read, never rewritten


def test_check_missing_key_says_how_to_fix(fake: LambdaFake) -> None:
    ok, msg = LambdaNodes(api_endpoint=fake.url).check()
    assert not ok
    assert "LAMBDA_API_KEY" in msg and "~/.lambda_cloud/lambda_keys" in msg and "cloud.lambda.ai" in msg
    assert fake.requests == []
    with pytest.raises(CredentialsError) as e:
        create(LambdaNodes(api_endpoint=fake.url))
    assert e.value.reason == "no-api-key"
    assert not list(Path(os.path.expanduser("~")).iterdir())  # nothing written to HOME


def test_check_bad_key(fake: LambdaFake) -> None:
    ok, msg = LambdaNodes(api_endpoint=fake.url, api_key="not-the-key").check()
    assert not ok
    assert "global/invalid-api-key" in msg and "not-the-key" not in msg


def test_endpoint_from_environment(fake: LambdaFake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, fake.url)
    monkeypatch.setenv(API_KEY_ENV, DEFAULT_API_KEY)
    d = LambdaNodes()
    assert d.api_endpoint == fake.url
    assert d.check()[0]


# --- offers ---------------------------------------------------------------------------------------------


def test_offers_from_catalog(make_driver: Callable[..., LambdaNodes], tmp_path: Path) -> None:
    tiny = write_catalog(tmp_path / "v8")
    offers = make_driver(catalog_dir=tiny).offers()
    assert {o.instance_type for o in offers} == {"gpu_8x_h100_sxm5", "gpu_1x_a10"}
    assert all(o.cloud == "lambda" and o.price_spot is None for o in offers)


def test_offers_from_shared_catalog(make_driver: Callable[..., LambdaNodes]) -> None:
    shared = find_shared_pricing()
    if shared is None:
        pytest.skip("the shared pricing snapshot (../shared/pricing) is not present")
    offers = make_driver(catalog_dir=shared / "catalogs" / "v8").offers()
    assert offers and all(o.cloud == "lambda" for o in offers)
    assert any(o.instance_type == "gpu_1x_a10" and o.region == "us-east-1" for o in offers)


# --- create, list, query, terminate ----------------------------------------------------------------------


def test_create_returns_before_active(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 2)
    ref = create(driver)
    assert ref.cloud == "lambda" and ref.region == "us-east-1" and ref.zone is None
    assert ref.cluster == nodes.node_name(CP, "w-1")
    (inst,) = fake.instances()
    assert inst["id"] == ref.instance_id and inst["status"] == "booting"  # nobody waited for "active"
    assert inst["name"] == ref.cluster + "-head"  # SkyPilot's name for a one-node cluster
    # The key was registered once under its fingerprint name and passed as ssh_key_names.
    assert [k["name"] for k in fake.ssh_keys()] == [ssh_key_name(PUBKEY)]
    (launch,) = fake.calls("launchInstance")
    assert launch.body["ssh_key_names"] == [ssh_key_name(PUBKEY)]
    assert launch.body["region_name"] == "us-east-1" and launch.body["instance_type_name"] == "gpu_1x_a10"
    create(driver, "w-2")
    assert len(fake.calls("addSSHKey")) == 1
    # A fresh driver finds the registered key instead of adding it again.
    fake.set_capacity("gpu_1x_a10", "us-east-1", 1)
    create(LambdaNodes(api_endpoint=fake.url), "w-3")
    assert len(fake.calls("addSSHKey")) == 1 and len(fake.ssh_keys()) == 1


def test_list_finds_nodes_by_name(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 3)
    a = create(driver, "w-A")
    b = create(driver, "w-b")
    create(driver, "w-c", cp="another-control-plane")
    got = driver.list({nodes.TAG_CONTROL_PLANE: CP})
    assert sorted(i.ref.instance_id or "" for i in got) == sorted([a.instance_id or "", b.instance_id or ""])
    by_id = {i.ref.instance_id: i for i in got}
    assert by_id[a.instance_id].tags == {
        nodes.TAG_CONTROL_PLANE: CP,
        nodes.TAG_WORKER: nodes.worker_key("w-A"),
    }
    assert by_id[a.instance_id].ref.cluster == a.cluster and by_id[a.instance_id].state == "pending"
    one = driver.list({nodes.TAG_CONTROL_PLANE: CP, nodes.TAG_WORKER: "w-b"})
    assert [i.ref.instance_id for i in one] == [b.instance_id]
    with pytest.raises(ValueError):
        driver.list({})


def test_query_progression_to_running(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 2)
    fake.auto_activate_after = 2
    ref = create(driver)
    assert driver.query(ref).state == "pending"
    info = wait_state(driver, ref, "running")
    assert info.public_ip and info.private_ip and info.instance_type == "gpu_1x_a10"
    assert info.market == "on-demand" and info.ssh_user == "ubuntu"
    # Explicit activation, and a query by name alone (a ref saved before the id was known).
    fake.auto_activate_after = None
    ref2 = create(driver, "w-2")
    by_name = nodes.NodeRef(cloud="lambda", region="us-east-1", zone=None, cluster=ref2.cluster)
    assert driver.query(by_name).state == "pending"
    fake.activate(ref2.instance_id or "")
    assert driver.query(by_name).state == "running"


def test_terminate_is_idempotent(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 1)
    ref = create(driver)
    assert fake.capacity("gpu_1x_a10", "us-east-1") == 0
    driver.terminate(ref)
    assert driver.query(ref).state in ("stopping", "terminated")
    driver.terminate(ref)  # terminating already: nothing sent
    assert len(fake.calls("terminateInstance")) == 1
    wait_state(driver, ref, "terminated")
    driver.terminate(ref)
    assert len(fake.calls("terminateInstance")) == 1
    assert driver.list({nodes.TAG_CONTROL_PLANE: CP}) == []
    assert fake.capacity("gpu_1x_a10", "us-east-1") == 1
    never = nodes.NodeRef(
        cloud="lambda", region="us-east-1", zone=None, cluster="cm-00000000-x", instance_id="nope"
    )
    driver.terminate(never)
    assert driver.query(never).state == "terminated"


def test_preempted_and_unhealthy_status(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 2)
    ref = create(driver)
    fake.activate(ref.instance_id or "")
    fake.preempt(ref.instance_id or "")
    info = driver.query(ref)
    assert info.state == "preempted" and "preempted" in info.detail
    assert [i.state for i in driver.list({nodes.TAG_CONTROL_PLANE: CP})] == ["preempted"]
    ref2 = create(driver, "w-2")
    fake.set_status(ref2.instance_id or "", "unhealthy")
    info = driver.query(ref2)
    assert info.state == "unknown" and "unhealthy" in info.detail


# --- errors, on the wire ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "cls", "retryable"),
    [
        ("instance-operations/launch/insufficient-capacity", None, NoCapacityError, True),
        ("global/quota-exceeded", None, QuotaExceededError, False),
        ("global/invalid-api-key", None, CredentialsError, False),
        ("global/account-inactive", None, CredentialsError, False),
        ("global/invalid-address", None, CredentialsError, False),
        ("global/invalid-parameters", None, ProviderError, False),
        # Codes Lambda documents elsewhere but not for this operation in the spec: sent deliberately off-spec.
        ("global/unauthorized", 401, CredentialsError, False),
        ("global/internal-error", 500, ProviderError, True),
    ],
)
def test_launch_errors_are_mapped(
    driver: LambdaNodes,
    fake: LambdaFake,
    code: str,
    status: int | None,
    cls: type[ProviderError],
    retryable: bool,
) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 1)  # SkyPilot's capacity pre-check passes: the launch fails
    sent = fake.inject_error(code, status=status)
    with pytest.raises(ProviderError) as e:
        create(driver)
    assert type(e.value) is cls
    assert e.value.reason == code and e.value.retryable is retryable and e.value.offer is A10
    assert DEFAULT_API_KEY not in str(e.value)
    launches = fake.calls("launchInstance")
    assert [r.status for r in launches] == [sent]  # one attempt: SkyPilot does not retry these
    assert fake.instances() == []


def test_no_capacity_from_instance_types(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-west-1", 1)  # capacity elsewhere only
    with pytest.raises(NoCapacityError) as e:
        create(driver)
    assert e.value.reason == "instance-operations/launch/insufficient-capacity"
    assert "us-west-1" in e.value.message
    assert fake.calls("launchInstance") == []  # SkyPilot read GET /instance-types and did not try


def test_unknown_instance_type(driver: LambdaNodes, fake: LambdaFake) -> None:
    gone = Offer(**{**A10.to_dict(), "instance_type": "gpu_1x_retired"})
    with pytest.raises(NoCapacityError) as e:
        create(driver, offer=gone)
    assert e.value.reason == "instance-type-not-offered"


def test_rate_limit_then_success(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 1)
    fake.rate_limit(times=1)
    ref = create(driver)
    assert ref.instance_id
    assert [r.status for r in fake.calls("launchInstance")] == [429, 200]  # SkyPilot's own backoff retried


def test_rate_limit_exhausted_is_retryable(driver: LambdaNodes, fake: LambdaFake) -> None:
    fake.set_capacity("gpu_1x_a10", "us-east-1", 1)
    fake.rate_limit(times=100)
    with pytest.raises(ProviderError) as e:
        create(driver)
    assert type(e.value) is ProviderError
    assert e.value.reason == "rate-limited" and e.value.retryable
    assert {r.status for r in fake.calls("launchInstance")} == {429}


def test_spot_is_refused(driver: LambdaNodes, fake: LambdaFake) -> None:
    with pytest.raises(ProviderError) as e:
        create(driver, market="spot")
    assert type(e.value) is ProviderError
    assert e.value.reason == "no-spot-market" and not e.value.retryable
    assert "on-demand" in e.value.message
    assert fake.requests == []


def test_bad_ssh_key_and_long_name(driver: LambdaNodes, fake: LambdaFake) -> None:
    with pytest.raises(ProviderError) as e:
        driver.create(request(), name=nodes.node_name(CP, "w-1"), tags={}, ssh_public_key="not a key")
    assert e.value.reason == "invalid-ssh-key"
    with pytest.raises(ProviderError) as e:
        driver.create(request(), name="cm-" + "x" * 60, tags={}, ssh_public_key=PUBKEY)
    assert e.value.reason == "name-too-long"
    with pytest.raises(ValueError):  # a name list() could never find again
        driver.create(request(), name="my-node", tags={nodes.TAG_CONTROL_PLANE: CP}, ssh_public_key=PUBKEY)
    assert fake.requests == []


def test_error_texts_from_skypilot() -> None:
    """SkyPilot's other LambdaCloudError texts (no wire needed: these are its fixed sentences)."""
    e = error_from_lambda(
        "Response cannot be parsed into JSON. Status code: 502; reason: Bad Gateway; content: x"
    )
    assert e.reason == "bad-response" and e.retryable
    e = error_from_lambda("Your API requests are being rate limited.")
    assert e.reason == "rate-limited" and e.retryable
    e = error_from_lambda("instance-operations/launch/quota-exceeded: too many")
    assert isinstance(e, QuotaExceededError)
    e = error_from_lambda("something/new-code: what")
    assert type(e) is ProviderError and e.reason == "something/new-code" and not e.retryable


# --- signals ----------------------------------------------------------------------------------------------


def test_signals_reflect_capacity(
    make_driver: Callable[..., LambdaNodes], fake: LambdaFake, tmp_path: Path
) -> None:
    info = aws_info("A10", 1, 24576)
    catalog = write_catalog(
        tmp_path / "v8",
        {
            "lambda/vms.csv": [
                LAMBDA_HEADER,
                f"gpu_1x_a10,A10,1.0,30.0,200.0,1.29,us-east-1,{info},",
                f"gpu_1x_a10,A10,1.0,30.0,200.0,1.29,us-west-1,{info},",
            ]
        },
    )
    fake.set_capacity("gpu_1x_a10", "us-east-1", 1)
    before = time.time()
    d = make_driver(catalog_dir=catalog)
    sigs = {(s.instance_type, s.region): s for s in d.signals()}
    assert sigs[("gpu_1x_a10", "us-east-1")].available is True
    assert sigs[("gpu_1x_a10", "us-west-1")].available is False  # sold there, no capacity now
    a10 = sigs[("gpu_1x_a10", "us-east-1")]
    assert a10.cloud == "lambda" and a10.gpu == "A10" and a10.price_ondemand == 1.29
    assert a10.observed_at >= before
    # Cached: a capacity change is not seen within the TTL, and no second request is made.
    fake.set_capacity("gpu_1x_a10", "us-east-1", 0)
    fake.set_capacity("gpu_1x_a10", "us-west-1", 1)
    again = {(s.instance_type, s.region): s.available for s in d.signals()}
    assert again[("gpu_1x_a10", "us-east-1")] is True
    assert len(fake.calls("listInstanceTypes")) == 1
    fresh = {
        (s.instance_type, s.region): s.available
        for s in make_driver(catalog_dir=catalog, signals_ttl_s=0).signals()
    }
    assert fresh[("gpu_1x_a10", "us-east-1")] is False and fresh[("gpu_1x_a10", "us-west-1")] is True


def test_signals_without_catalog(
    make_driver: Callable[..., LambdaNodes], fake: LambdaFake, tmp_path: Path
) -> None:
    fake.set_capacity("gpu_8x_h100_sxm5", "us-south-1", 1)
    sigs = make_driver(catalog_dir=tmp_path / "none").signals()
    assert [(s.instance_type, s.region, s.available) for s in sigs] == [
        ("gpu_8x_h100_sxm5", "us-south-1", True)
    ]
    assert sigs[0].gpu == "H100 (80 GB SXM5)"  # Lambda's own description when no catalog names it


def test_unreachable_endpoint(make_driver: Callable[..., LambdaNodes]) -> None:
    from tests.ports import reserved_port

    port = reserved_port()  # nothing listens on it (nor takes it: not an ephemeral port)
    d = make_driver(api_endpoint=f"http://127.0.0.1:{port}/api/v1")
    ok, msg = d.check()
    assert not ok and "could not be checked" in msg
    with pytest.raises(ProviderError) as e:
        d.list({nodes.TAG_CONTROL_PLANE: CP})
    assert e.value.reason == "connection-error" and e.value.retryable
