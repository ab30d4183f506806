"""Realism checks on the shared catalog snapshot (``../shared/pricing``); skipped where it is absent."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, load_offer_table
from cloudmodal.pricing.gpus import catalog_name
from cloudmodal.pricing.offers import Offer

Key = tuple[str, str, str | None, str]


def _f(text: str) -> float | None:
    return float(text) if text else None


def _same(a: float | None, b: float | None) -> bool:
    # gpu_offers.csv rounds to 5 decimals
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-4 * max(1.0, b))


def _reference(shared: Path) -> dict[Key, list[dict[str, str]]]:
    out: dict[Key, list[dict[str, str]]] = {}
    with open(shared / "gpu_offers.csv", newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault((r["cloud"], r["region"], r["zone"] or None, r["instance_type"]), []).append(r)
    return out


def _matches(offers: list[Offer], r: dict[str, str]) -> bool:
    """Some offer has the row's GPU, count and both prices."""
    return any(
        float(r["gpu_count"]) == o.gpu_count
        and _same(o.price_ondemand, _f(r["price_ondemand"]))
        and _same(o.price_spot, _f(r["price_spot"]))
        and catalog_name(r["gpu"], float(r["gpu_memory_gb"])) == o.gpu
        for o in offers
    )


def test_gcp_composed_prices_agree_with_the_uniform_table(shared_pricing: Path) -> None:
    table = load_offer_table(shared_pricing / "catalogs" / "v8")
    ref = _reference(shared_pricing)
    gcp = [o for o in table if o.cloud == "gcp"]
    assert len(gcp) > 700
    bad = [
        o
        for o in gcp
        if not any(_matches([o], r) for r in ref.get((o.cloud, o.region, o.zone, o.instance_type), []))
    ]
    assert bad == []
    # The few GCP rows of the uniform table that we lack are GPUs whose host machine type has no usable row
    # in that zone (none, or a negative price): SkyPilot cannot launch those either.
    host_zones = set()
    with open(shared_pricing / "catalogs" / "v8" / "gcp" / "vms.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["InstanceType"] and r["Price"] and float(r["Price"]) >= 0:
                host_zones.add((r["AvailabilityZone"], r["InstanceType"]))
    mine = {(o.region, o.zone, o.instance_type) for o in gcp}
    missing = [k for k, rows in ref.items() if k[0] == "gcp" and (k[1], k[2], k[3]) not in mine]
    assert all((zone, it) not in host_zones for _, _, zone, it in missing), missing
    assert len(missing) <= 5


@pytest.mark.parametrize("cloud", ["aws", "lambda", "runpod", "azure"])
def test_other_clouds_agree_with_the_uniform_table(shared_pricing: Path, cloud: str) -> None:
    table = load_offer_table(shared_pricing / "catalogs" / "v8")
    mine: dict[Key, list[Offer]] = {}
    for o in table:
        if o.cloud == cloud:
            mine.setdefault((o.cloud, o.region, o.zone, o.instance_type), []).append(o)
    checked = 0
    for key, rows in _reference(shared_pricing).items():
        for r in rows:
            if key[0] != cloud or not float(r["gpu_count"]).is_integer():
                continue  # we drop partial GPUs
            if not (r["price_ondemand"] or r["price_spot"]):
                continue  # and rows with no price
            if r["gpu"] == "RADEON-MI25":
                continue  # Azure NVv4: fractions of an MI25 in the uniform table, "1" in the catalog file
            # The uniform table folds H100 NVL into H100; our name table keeps H100-NVL apart.
            offers = [replace(o, gpu=o.gpu.replace("H100-NVL", "H100")) for o in mine.get(key, [])]
            assert _matches(offers, r), (key, r, mine.get(key))
            checked += 1
    assert checked > 100


def test_real_catalog_offer_keys_are_unique(shared_pricing: Path) -> None:
    table = load_offer_table(shared_pricing / "catalogs" / "v8")
    keys = {o.key("on-demand") for o in table}  # GCP N1 hosts carry several GPU types: the key names the GPU
    assert len(keys) == len(table) > 13000


def _csv_price(catalogs: Path, c: dict[str, object]) -> float | None:
    """The candidate's price read straight from the per-cloud CSV (GCP: GPU row + host row, same zone)."""
    market = "SpotPrice" if c["market"] == "spot" else "Price"
    with open(catalogs / str(c["cloud"]) / "vms.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    zone_ok = lambda r: (r.get("AvailabilityZone") or None) == c["zone"]  # noqa: E731
    if c["cloud"] == "gcp":
        host = [r for r in rows if r["InstanceType"] == c["instance_type"] and zone_ok(r)]
        gpu = [
            r
            for r in rows
            if not r["InstanceType"]
            and r["AcceleratorName"] in ("H100", "H100-MEGA")
            and float(r["AcceleratorCount"]) == c["gpu_count"]
            and zone_ok(r)
            and r["Region"] == c["region"]
        ]
        gpu_price = {float(r[market]) for r in gpu if r[market]}
        assert len(host) == 1 and len(gpu_price) == 1
        return float(host[0][market]) + gpu_price.pop()
    got = [
        r
        for r in rows
        if r["InstanceType"] == c["instance_type"] and r["Region"] == c["region"] and zone_ok(r)
    ]
    assert len(got) == 1, (c, got)
    return float(got[0][market])


def test_must_show_offers_h100_json_on_the_shared_catalog(shared_pricing: Path) -> None:
    catalogs = shared_pricing / "catalogs" / "v8"
    env = {**os.environ, CATALOG_DIR_ENV: str(catalogs)}
    proc = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "offers", "H100", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    cands = out["candidates"]
    assert out["total"] == len(cands) > 100
    every_cloud = {p.name for p in catalogs.iterdir() if (p / "vms.csv").is_file()}
    assert {c["cloud"] for c in cands} == every_cloud
    prices = [c["price"] for c in cands]
    assert prices == sorted(prices)
    assert all(c["gpu"] == "H100" and c["gpu_count"] == 1 for c in cands)
    # Each cloud's cheapest candidate, and the overall first few, carry the CSV's price for their market.
    firsts = {}
    for c in cands:
        firsts.setdefault(c["cloud"], c)
    for c in [*firsts.values(), *cands[:5]]:
        assert c["price"] == pytest.approx(_csv_price(catalogs, c), abs=1e-6), c
