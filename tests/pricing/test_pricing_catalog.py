"""Loading SkyPilot-v8-shaped catalogs into the offer table (small catalogs written by the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from catalog_fixtures import AWS_HEADER, GCP_HEADER, write_catalog

from cloudmodal.exception import Error
from cloudmodal.pricing import catalog
from cloudmodal.pricing.catalog import (
    CATALOG_DIR_ENV,
    CatalogNotFoundError,
    catalog_dir,
    default_catalog_dir,
    load_offer_table,
    read_catalog,
)
from cloudmodal.pricing.offers import Offer, OfferTable


def _one(table: OfferTable, **match: object) -> Offer:
    got = [o for o in table if all(getattr(o, k) == v for k, v in match.items())]
    assert len(got) == 1, (match, got)
    return got[0]


def test_every_cloud_is_read_by_header_name(tiny_catalog: Path) -> None:
    t = read_catalog(tiny_catalog)
    assert t.clouds() == ("aws", "azure", "gcp", "lambda", "runpod")
    by_cloud = {s.cloud: s for s in t.summaries}
    assert {c: s.offers for c, s in by_cloud.items()} == {
        "aws": 6,
        "azure": 2,
        "gcp": 5,
        "lambda": 2,
        "runpod": 1,
    }
    # Lambda's columns come in another order than AWS's; values land in the right fields all the same.
    lam = _one(t, cloud="lambda", instance_type="gpu_8x_h100_sxm5")
    assert (lam.gpu, lam.gpu_count, lam.vcpus, lam.memory_gb) == ("H100", 8, 208.0, 1800.0)
    assert (lam.price_ondemand, lam.price_spot, lam.zone, lam.region) == (23.92, None, None, "us-east-1")


def test_skipped_rows_are_counted_with_a_reason(tiny_catalog: Path) -> None:
    s = {x.cloud: dict(x.skipped) for x in read_catalog(tiny_catalog).summaries}
    assert s["aws"] == {catalog.FRACTIONAL: 1, catalog.NO_PRICE: 1}
    assert s["azure"] == {catalog.NO_GPU: 1}
    assert s["lambda"] == {catalog.NO_GPU: 1}
    assert s["gcp"] == {catalog.HOST_ROW: 8, catalog.NO_HOST: 1, catalog.TPU: 1}


@pytest.mark.parametrize(
    ("cloud", "instance_type", "zone", "gpu", "gpu_memory_gb"),
    [
        ("aws", "p4d.24xlarge", "use1-az1", "A100-40GB", 40.0),  # "A100" told apart by memory
        ("aws", "p4de.24xlarge", "use1-az1", "A100-80GB", 80.0),
        ("aws", "g5.xlarge", "usw2-az1", "A10", 22.4),  # A10G is the A10 class; MiB -> GB
        ("runpod", "8x_H100-SXM_SECURE", "US-TX-3", "H100", 80.0),  # RunPod's "MiB" field holds GB
        (
            "azure",
            "Standard_NC24ads_A100_v4",
            None,
            "A100-80GB",
            80.0,
        ),  # no memory in the file: from the table
        ("gcp", "a2-highgpu-1g", "us-central1-a", "A100-40GB", 40.0),
    ],
)
def test_gpu_names_and_memory_are_normalized(
    tiny_catalog: Path, cloud: str, instance_type: str, zone: str | None, gpu: str, gpu_memory_gb: float
) -> None:
    o = _one(read_catalog(tiny_catalog), cloud=cloud, instance_type=instance_type, zone=zone)
    assert (o.gpu, o.gpu_memory_gb) == (gpu, gpu_memory_gb)


def test_spot_only_offer_is_kept(tiny_catalog: Path) -> None:
    o = _one(read_catalog(tiny_catalog), cloud="aws", instance_type="p5e.48xlarge")
    assert (o.price_ondemand, o.price_spot, o.markets) == (None, 19.4, ("spot",))


@pytest.mark.parametrize(
    ("gpu", "count", "host", "ondemand", "spot"),
    [
        # N1 hosts: the cheapest with SkyPilot's default vCPUs (T4:1 -> 4, T4:4 -> 48) and 4 GB per vCPU.
        ("T4", 1, "n1-highmem-4", 0.35 + 0.2366, 0.14 + 0.05),
        ("T4", 4, "n1-standard-64", 1.4 + 3.04, 0.56 + 0.64),
        # Machine types that bundle their GPUs: the GPU row adds to the machine row.
        ("A100-40GB", 1, "a2-highgpu-1g", 3.67339, 1.80385),
        ("H100", 8, "a3-highgpu-8g", 33.6 + 11.0, 24.35 + 2.6),
        ("B200", 8, "a4-highgpu-8g", 90.216, 32.6064),  # the A4 machine row is priced 0
    ],
)
def test_gcp_offers_are_gpu_plus_host_in_the_same_zone(
    tiny_catalog: Path, gpu: str, count: int, host: str, ondemand: float, spot: float
) -> None:
    o = _one(read_catalog(tiny_catalog), cloud="gcp", gpu=gpu, gpu_count=count)
    assert (o.instance_type, o.zone, o.region) == (host, "us-central1-a", "us-central1")
    assert o.price_ondemand == pytest.approx(ondemand)
    assert o.price_spot == pytest.approx(spot)
    assert o.source.endswith("#gpu+host")


def test_gcp_host_limits_are_respected(tmp_path: Path) -> None:
    # V100:1 may attach to at most 12 vCPUs / 78 GB: the cheaper-per-spec n1-highmem-16 is not allowed.
    d = write_catalog(
        tmp_path,
        {
            "gcp/vms.csv": [
                GCP_HEADER,
                "n1-highmem-16,16.0,104.0,,,,r1,r1-a,0.9,0.2",
                "n1-highmem-8,8.0,52.0,,,,r1,r1-a,1.0,0.3",
                ",,,V100,1,,r1,r1-a,2.48,0.74",
            ]
        },
    )
    o = _one(read_catalog(d), gpu="V100")
    assert o.instance_type == "n1-highmem-8"
    assert o.price_ondemand == pytest.approx(3.48)


def test_offer_keys_are_unique(tiny_catalog: Path) -> None:
    t = read_catalog(tiny_catalog)
    keys = [o.key("spot") for o in t]
    assert len(keys) == len(set(keys))


def test_index_by_gpu_and_count(tiny_catalog: Path) -> None:
    t = read_catalog(tiny_catalog)
    h100_8 = t.for_gpu_count("H100", 8)
    assert {o.cloud for o in h100_8} == {"aws", "gcp", "azure", "lambda", "runpod"}
    assert all(o.gpu == "H100" and o.gpu_count == 8 for o in h100_8)
    assert t.for_gpu_count("H100", 1) == ()
    assert {o.gpu for o in t.for_count(1)} == {"A10", "A100-40GB", "A100-80GB", "T4"}
    ranked = t.ranked("H100", 8)
    assert [e.price for e in ranked] == sorted(e.price for e in ranked)
    assert len(ranked) == sum(len(o.markets) for o in h100_8)


def test_catalog_dir_env_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CATALOG_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("CLOUDMODAL_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert catalog_dir() == tmp_path / "home" / ".cache" / "cloudmodal" / "catalogs" / "v8"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_catalog_dir() == tmp_path / "xdg" / "cloudmodal" / "catalogs" / "v8"
    monkeypatch.setenv("CLOUDMODAL_CACHE_DIR", str(tmp_path / "cm-cache"))
    assert default_catalog_dir() == tmp_path / "cm-cache" / "catalogs" / "v8"
    monkeypatch.setenv(CATALOG_DIR_ENV, str(tmp_path / "mine"))
    assert catalog_dir() == tmp_path / "mine"


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_missing_catalog_says_how_to_get_one(tmp_path: Path, make: str) -> None:
    d = tmp_path / "v8"
    if make == "empty":
        d.mkdir()
    elif make == "file":
        d.write_text("x")
    with pytest.raises(CatalogNotFoundError) as e:
        load_offer_table(d)
    assert isinstance(e.value, Error)
    msg = str(e.value)
    assert "cloudmodal pricing refresh" in msg and CATALOG_DIR_ENV in msg and str(d) in msg


def test_default_location_is_used_without_argument(
    monkeypatch: pytest.MonkeyPatch, tiny_catalog: Path
) -> None:
    monkeypatch.setenv(CATALOG_DIR_ENV, str(tiny_catalog))
    assert len(load_offer_table()) == 16


def test_a_malformed_cloud_file_is_reported_and_the_rest_loads(tiny_catalog: Path) -> None:
    (tiny_catalog / "azure" / "vms.csv").write_text("Foo,Bar\n1,2\n")
    t = read_catalog(tiny_catalog)
    bad = next(s for s in t.summaries if s.cloud == "azure")
    assert bad.error and "missing column" in bad.error and "cloudmodal pricing refresh" in bad.error
    assert "azure" not in t.clouds() and "aws" in t.clouds()


def test_only_malformed_files_is_not_a_catalog(tmp_path: Path) -> None:
    d = write_catalog(tmp_path, {"aws/vms.csv": ["Foo,Bar", "1,2"]})
    with pytest.raises(CatalogNotFoundError, match="missing column"):
        read_catalog(d)


def test_any_cloud_folder_with_v8_headers_is_read(tmp_path: Path) -> None:
    d = write_catalog(
        tmp_path, {"nebius/vms.csv": [AWS_HEADER, "gpu-h100-sxm,H100,1,16,200,,2.95,,eu-north1,,x86_64"]}
    )
    o = _one(read_catalog(d), cloud="nebius")
    assert (o.gpu, o.gpu_count, o.price_ondemand, o.zone, o.gpu_memory_gb) == ("H100", 1, 2.95, None, 80.0)


def test_table_is_cached_until_a_file_changes(tiny_catalog: Path) -> None:
    a = load_offer_table(tiny_catalog)
    assert load_offer_table(tiny_catalog) is a
    lam = tiny_catalog / "lambda" / "vms.csv"
    lam.write_text(lam.read_text() + "gpu_1x_h100_pcie,H100,1.0,26.0,200.0,2.49,us-east-1,,\n")
    st = lam.stat()
    os.utime(lam, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    b = load_offer_table(tiny_catalog)
    assert b is not a and len(b) == len(a) + 1


def test_meta_json_gives_source_and_date(tiny_catalog: Path) -> None:
    meta = {
        "clouds": {
            "aws": {"url": "https://example.test/v8/aws/vms.csv", "fetched_at": "2026-03-04T05:06:07+00:00"}
        }
    }
    (tiny_catalog / "meta.json").write_text(json.dumps(meta))
    o = next(o for o in read_catalog(tiny_catalog) if o.cloud == "aws")
    assert (o.source, o.date) == ("https://example.test/v8/aws/vms.csv", "2026-03-04")


def test_importing_cloudmodal_and_pricing_loads_no_cloud_sdk() -> None:
    code = (
        "import sys, cloudmodal, cloudmodal.placement, cloudmodal.pricing.catalog, cloudmodal.cli.main\n"
        "heavy = [m for m in ('sky', 'boto3', 'pulumi', 'google.cloud', 'azure') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
