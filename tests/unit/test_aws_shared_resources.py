"""``providers._sky.SharedResources``, the stand-in for SkyPilot's ``sky.adaptors.aws.resource``: a new boto3
resource object per call, on one botocore client per (service, options, ``AWS_*`` environment)."""

from __future__ import annotations

from typing import Any

import pytest

boto3 = pytest.importorskip("boto3")

from cloudmodal.providers._sky import SharedResources  # noqa: E402


def _counting_build() -> tuple[list[tuple[str, dict[str, Any]]], Any]:
    built: list[tuple[str, dict[str, Any]]] = []

    def build(service: str, **kwargs: Any) -> Any:
        built.append((service, dict(kwargs)))
        kwargs.pop("max_attempts", None)  # SkyPilot's resource() turns it into a botocore Config
        session = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s")
        return session.resource(service, **kwargs)

    return built, build


def test_one_client_per_key_and_a_fresh_resource_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    built, build = _counting_build()
    shared = SharedResources(build)
    a = shared("ec2", region_name="us-east-1")
    b = shared("ec2", region_name="us-east-1")
    assert len(built) == 1
    assert a is not b and type(a) is type(b)  # boto3 resources are not thread-safe: one per call
    assert a.meta.client is b.meta.client  # botocore clients are: shared
    assert b.meta.client.meta.region_name == "us-east-1"
    c = shared("ec2", region_name="us-west-2")  # other options: another client
    assert len(built) == 2 and c.meta.client.meta.region_name == "us-west-2"
    shared("ec2", region_name="us-east-1", max_attempts=0)
    assert len(built) == 3


def test_a_changed_aws_environment_builds_a_new_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    built, build = _counting_build()
    shared = SharedResources(build)
    shared("ec2", region_name="us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    shared("ec2", region_name="us-east-1")
    assert len(built) == 2


def test_a_client_is_rebuilt_after_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    built, build = _counting_build()
    shared = SharedResources(build)
    now = [1000.0]
    monkeypatch.setattr("cloudmodal.providers._sky.time.monotonic", lambda: now[0])
    shared("ec2", region_name="us-east-1")
    now[0] += SharedResources.TTL_S - 1
    shared("ec2", region_name="us-east-1")
    assert len(built) == 1
    now[0] += 2
    shared("ec2", region_name="us-east-1")
    assert len(built) == 2
