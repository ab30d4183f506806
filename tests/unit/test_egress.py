"""Egress rates and data locations (cloudmodal.pricing.egress): tables of cases on the pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudmodal.exception import InvalidError
from cloudmodal.pricing.egress import (
    DEFAULT_RATES,
    LOCAL,
    DataLocation,
    EgressRate,
    custom_endpoint,
    egress_cost,
    egress_rate,
    load_rates,
    parse_location,
    store_location,
)

AWS_E1 = DataLocation("aws", "us-east-1")
GCP_C1 = DataLocation("gcp", "us-central1")
AZ_EUS = DataLocation("azure", "eastus")
AWS_ANY = DataLocation("aws", None, "region not in the URL")
UNKNOWN = DataLocation(None, None, "custom endpoint")
HERE = DataLocation(LOCAL)


@pytest.mark.parametrize(
    ("src", "cloud", "region", "gb", "usd"),
    [
        (AWS_E1, "aws", "us-east-1", 100, 0.0),  # same region: free
        (AWS_E1, "aws", "us-west-2", 100, 2.0),  # another AWS region: $0.02/GB
        (AWS_E1, "gcp", "us-central1", 100, 9.0),  # out of AWS: the internet rate, $0.09/GB
        (AWS_E1, "lambda", "us-east-1", 100, 9.0),  # Lambda charges no ingress; AWS bills the egress
        (AWS_E1, "azure", "eastus", 0, 0.0),  # nothing read, nothing paid
        (GCP_C1, "gcp", "us-central1", 50, 0.0),
        (GCP_C1, "gcp", "us-east4", 50, 1.0),
        (GCP_C1, "aws", "us-east-1", 50, 6.0),  # GCP's internet rate, $0.12/GB
        (AZ_EUS, "azure", "westus2", 10, 0.2),
        (AZ_EUS, "aws", "us-east-1", 10, 0.87),
        (DataLocation("lambda", "us-east-1"), "aws", "us-east-1", 1000, 0.0),  # Lambda: no egress at all
        (HERE, "aws", "us-east-1", 1000, 0.0),  # the control plane's directory: no cloud bills it
        (UNKNOWN, "gcp", "us-central1", 1000, 0.0),  # unknown: never a penalty
        (AWS_ANY, "aws", "us-west-2", 1000, 0.0),  # same cloud, region unknown: free or not, not counted
        (AWS_ANY, "gcp", "us-central1", 100, 9.0),  # ... but leaving AWS costs the same from any region
        (DataLocation("oci", "us-ashburn-1"), "aws", "us-east-1", 100, 0.0),  # a cloud without rates
    ],
)
def test_egress_cost(src: DataLocation, cloud: str, region: str, gb: float, usd: float) -> None:
    assert egress_cost(src, cloud, region, gb) == pytest.approx(usd)


@pytest.mark.parametrize(
    ("src", "cloud", "region", "rate"),
    [
        (AWS_E1, "aws", "us-east-1", 0.0),
        (AWS_E1, "aws", "eu-west-1", 0.02),
        (AWS_ANY, "aws", "eu-west-1", None),
        (UNKNOWN, "aws", "eu-west-1", None),
        (HERE, "gcp", "us-central1", 0.0),
    ],
)
def test_egress_rate_says_when_it_cannot_tell(
    src: DataLocation, cloud: str, region: str, rate: float | None
) -> None:
    assert egress_rate(src, cloud, region) == rate


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(InvalidError, match="0 or more"):
        egress_cost(AWS_E1, "aws", "us-east-1", -1)


def test_every_cloud_has_a_source_and_lambda_and_local_are_free() -> None:
    assert {"aws", "gcp", "azure", "lambda", LOCAL} <= set(DEFAULT_RATES)
    assert all(r.source for r in DEFAULT_RATES.values())
    for free in ("lambda", LOCAL):
        r = DEFAULT_RATES[free]
        assert (r.same_region, r.inter_region, r.internet) == (0.0, 0.0, 0.0)
    for cloud in ("aws", "gcp", "azure"):
        r = DEFAULT_RATES[cloud]
        assert r.same_region == 0.0 < r.inter_region < r.internet


@pytest.mark.parametrize(
    ("url", "region", "endpoint", "want"),
    [
        ("s3://bucket/vols", None, False, "aws:?"),
        ("s3://bucket/vols", "aws:eu-west-1", False, "aws:eu-west-1"),
        ("s3://bucket/vols", "AWS:EU-WEST-1", False, "aws:eu-west-1"),
        ("s3://bucket/vols", None, True, "unknown"),  # MinIO, moto: s3:// is not AWS
        ("s3://bucket/vols", "aws:us-east-2", True, "aws:us-east-2"),  # told explicitly: believed
        ("gs://bucket", None, False, "gcp:?"),
        ("gcs://bucket", None, False, "gcp:?"),
        ("az://container/p", None, False, "azure:?"),
        ("az://container/p", "azure:eastus", False, "azure:eastus"),
        ("/srv/cloudmodal/volumes", None, False, "local"),
        ("file:///srv/volumes", None, False, "local"),
        ("relative/dir", None, False, "local"),
        ("/mnt/s3-bucket", "aws:us-east-1", False, "aws:us-east-1"),  # a mounted bucket, said so
        ("r2://bucket", None, False, "unknown"),
    ],
)
def test_store_location(url: str, region: str | None, endpoint: bool, want: str) -> None:
    got = store_location(url, region, custom_endpoint=endpoint)
    assert str(got) == want
    if want in ("unknown", "aws:?", "gcp:?", "azure:?"):
        assert not got.known and "CLOUDMODAL_VOLUME_STORE_REGION" in got.why
    else:
        assert got.known


@pytest.mark.parametrize("bad", ["us-east-1", "aws:", ":us-east-1", "aws:us:east", ""])
def test_a_bad_location_says_how_to_write_one(bad: str) -> None:
    with pytest.raises(InvalidError, match="CLOUD:REGION, e.g. aws:us-east-1"):
        parse_location(bad, what="CLOUDMODAL_VOLUME_STORE_REGION")


@pytest.mark.parametrize(
    ("url", "env", "custom"),
    [
        ("s3://b/p", {}, False),
        ("s3://b/p", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, True),
        ("s3://b/p", {"AWS_ENDPOINT_URL_S3": "http://minio:9000"}, True),
        ("gs://b", {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023"}, True),
        ("gs://b", {"AWS_ENDPOINT_URL": "http://x"}, False),
        (
            "az://c",
            {"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;BlobEndpoint=http://127.0.0.1:10000/a"},
            True,
        ),
        ("az://c", {"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=k"}, False),
        ("/srv/volumes", {"AWS_ENDPOINT_URL": "http://x"}, False),
    ],
)
def test_custom_endpoint(url: str, env: dict[str, str], custom: bool) -> None:
    assert custom_endpoint(url, env) is custom


def test_an_egress_file_replaces_the_clouds_it_lists(tmp_path: Path) -> None:
    f = tmp_path / "egress.csv"
    f.write_text(
        "# negotiated rates, 2026\ncloud,same_region,inter_region,internet\naws,0,0.01,0.05\nOCI,0,0,0.0085\n"
    )
    rates = load_rates(f)
    assert rates["aws"] == EgressRate(same_region=0, inter_region=0.01, internet=0.05, source=str(f))
    assert rates["oci"].internet == 0.0085
    assert rates["gcp"] == DEFAULT_RATES["gcp"]  # not listed: the built-in rate
    assert egress_cost(AWS_E1, "gcp", "us-central1", 100, rates) == pytest.approx(5.0)
    assert load_rates(tmp_path / "absent.csv") is DEFAULT_RATES
    assert load_rates(None) is DEFAULT_RATES


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cloud,same_region,internet\naws,0,0.09\n", "missing column"),
        ("cloud,same_region,inter_region,internet\naws,0,cheap,0.09\n", "data row 1"),
        ("cloud,same_region,inter_region,internet\naws,0,0.02,0.09\ngcp,0,-1,0.12\n", "data row 2"),
        ("cloud,same_region,inter_region,internet\n,0,0.02,0.09\n", "empty cloud"),
    ],
)
def test_a_bad_egress_file_names_the_file_and_row(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "egress.csv"
    f.write_text(text)
    with pytest.raises(InvalidError, match=match) as e:
        load_rates(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize(
    ("store_url", "configured", "region", "env", "want"),
    [
        # the region setting describes the configured store: a volume there is placed by it
        ("s3://team/vols", "s3://team/vols/", "aws:eu-west-1", {}, "aws:eu-west-1"),
        # a volume created before the store changed keeps its own store, which the setting does not describe
        ("s3://old/vols", "s3://team/vols", "aws:eu-west-1", {}, "aws:?"),
        ("gs://old", "s3://team/vols", "aws:eu-west-1", {}, "gcp:?"),
        ("s3://team/vols", "s3://team/vols", None, {"AWS_ENDPOINT_URL": "http://minio:9000"}, "unknown"),
        ("/home/cp/.cloudmodal/volumes", "/home/cp/.cloudmodal/volumes", None, {}, "local"),
    ],
)
def test_a_volumes_location_on_the_control_plane(
    store_url: str, configured: str, region: str | None, env: dict[str, str], want: str
) -> None:
    from cloudmodal.server.volume_locality import volume_data_location

    assert str(volume_data_location(store_url, configured, region, env)) == want
