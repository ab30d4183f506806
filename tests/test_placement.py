"""Placement: table-driven cases on a small offer set built in the test."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from cloudmodal.exception import InvalidError
from cloudmodal.gpu import GpuTier, parse_gpu
from cloudmodal.placement import (
    BLOCKED,
    CLOUD,
    COUNT,
    DUPLICATE,
    MAX_PRICE,
    MIN_MEMORY,
    MIN_VCPUS,
    NO_PRICE,
    QUOTA,
    REGION,
    UNAVAILABLE,
    PlacementPolicy,
    rank,
)
from cloudmodal.pricing.offers import Offer, OfferTable


def offer(
    cloud: str,
    region: str,
    instance_type: str,
    gpu: str,
    count: int,
    od: float | None,
    spot: float | None,
    *,
    zone: str | None = None,
    vcpus: float = 8,
    mem: float = 64,
) -> Offer:
    return Offer(
        cloud, region, zone, instance_type, gpu, count, 80, vcpus, mem, od, spot, "test", "2026-01-01"
    )


OFFERS = (
    offer("aws", "us-east-1", "p5.48xlarge", "H100", 8, 55.04, 12.0, zone="use1-az1", vcpus=192, mem=2048),
    offer("aws", "us-east-1", "p5.4xlarge", "H100", 1, 6.88, 2.5, zone="use1-az1", vcpus=16, mem=256),
    offer(
        "gcp", "us-central1", "a3-highgpu-1g", "H100", 1, 5.38, 3.35, zone="us-central1-a", vcpus=26, mem=234
    ),
    offer("lambda", "us-east-1", "gpu_1x_h100", "H100", 1, 2.49, None, vcpus=26, mem=200),
    offer("runpod", "US", "1x_H100_SECURE", "H100", 1, 2.69, None, zone="US-TX-3", vcpus=16, mem=188),
    offer("azure", "eastus", "Standard_NC24ads_A100_v4", "A100-80GB", 1, 3.67, 0.73, vcpus=24, mem=220),
    offer("lambda", "us-west-1", "gpu_2x_a100", "A100-40GB", 2, 2.58, None, vcpus=60, mem=450),
    offer("aws", "us-west-2", "p5e.48xlarge", "H200", 8, None, 19.4, zone="usw2-az1", vcpus=192, mem=2048),
    offer("gcp", "us-central1", "n1-highmem-8", "T4", 2, 1.17, 0.38, zone="us-central1-a", vcpus=8, mem=52),
    offer("gcp", "us-central1", "n1-highmem-8", "V100", 1, 2.95, 0.84, zone="us-central1-a", vcpus=8, mem=52),
)
TABLE = OfferTable(OFFERS)


def picks(tiers: str | list[str], **kw: Any) -> list[tuple[str, str, str]]:
    """(tier, cloud/instance type, market) of each candidate, in order."""
    p = rank(parse_gpu(tiers), TABLE, **kw)
    return [(str(c.tier), f"{c.offer.cloud}/{c.offer.instance_type}", c.market) for c in p.candidates]


@dataclass(frozen=True)
class Case:
    name: str
    tiers: str | list[str]
    kw: dict[str, Any]
    want: list[tuple[str, str, str]]


P = PlacementPolicy
CASES = [
    Case(
        "spot and on-demand compete on price within a tier",
        "H100",
        {},
        [
            ("H100", "lambda/gpu_1x_h100", "on-demand"),
            ("H100", "aws/p5.4xlarge", "spot"),
            ("H100", "runpod/1x_H100_SECURE", "on-demand"),
            ("H100", "gcp/a3-highgpu-1g", "spot"),
            ("H100", "gcp/a3-highgpu-1g", "on-demand"),
            ("H100", "aws/p5.4xlarge", "on-demand"),
        ],
    ),
    Case(
        "spot required drops on-demand and unpriced spot",
        "H100",
        {"policy": P(spot="require")},
        [("H100", "aws/p5.4xlarge", "spot"), ("H100", "gcp/a3-highgpu-1g", "spot")],
    ),
    Case(
        "spot never",
        "H100",
        {"policy": P(spot="never"), "limit": 2},
        [("H100", "lambda/gpu_1x_h100", "on-demand"), ("H100", "runpod/1x_H100_SECURE", "on-demand")],
    ),
    Case(
        "exact count: H100:8 is not H100:1",
        "H100:8",
        {},
        [("H100:8", "aws/p5.48xlarge", "spot"), ("H100:8", "aws/p5.48xlarge", "on-demand")],
    ),
    Case("no offer with that count", "H100:2", {}, []),
    Case(
        "tiers in the user's order, even when a later one is cheaper",
        ["A100-80GB", "A100-40GB:2"],
        {"policy": P(spot="never")},
        [
            ("A100-80GB", "azure/Standard_NC24ads_A100_v4", "on-demand"),
            ("A100-40GB:2", "lambda/gpu_2x_a100", "on-demand"),
        ],
    ),
    Case(
        "across tiers: all by price",
        ["A100-80GB", "A100-40GB:2"],
        {"policy": P(spot="never", across_tiers=True)},
        [
            ("A100-40GB:2", "lambda/gpu_2x_a100", "on-demand"),
            ("A100-80GB", "azure/Standard_NC24ads_A100_v4", "on-demand"),
        ],
    ),
    Case(
        "clouds filter (case-insensitive)",
        "H100",
        {"policy": P(clouds=["GCP", "runpod"], spot="never")},
        [("H100", "runpod/1x_H100_SECURE", "on-demand"), ("H100", "gcp/a3-highgpu-1g", "on-demand")],
    ),
    Case(
        "regions filter matches a region or a zone",
        "H100",
        {"policy": P(regions=["us-central1-a", "us"], spot="never")},
        [("H100", "runpod/1x_H100_SECURE", "on-demand"), ("H100", "gcp/a3-highgpu-1g", "on-demand")],
    ),
    Case(
        "max price caps the candidate's own market price",
        "H100",
        {"policy": P(max_price_per_hour=2.6)},
        [("H100", "lambda/gpu_1x_h100", "on-demand"), ("H100", "aws/p5.4xlarge", "spot")],
    ),
    Case(
        "minimum vCPUs and RAM",
        "H100",
        {"min_vcpus": 20, "min_memory_gb": 210, "policy": P(spot="never")},
        [("H100", "gcp/a3-highgpu-1g", "on-demand")],
    ),
    Case("spot-only offer with spot allowed", "H200:8", {}, [("H200:8", "aws/p5e.48xlarge", "spot")]),
    Case("spot-only offer with spot never", "H200:8", {"policy": P(spot="never")}, []),
    Case(
        "ANY matches every GPU type with that count",
        "any:2",
        {"policy": P(spot="never")},
        [("ANY:2", "gcp/n1-highmem-8", "on-demand"), ("ANY:2", "lambda/gpu_2x_a100", "on-demand")],
    ),
    Case(
        "same host type with different GPUs are different offers (GCP N1)",
        ["T4:2", "V100"],
        {"policy": P(spot="require")},
        [("T4:2", "gcp/n1-highmem-8", "spot"), ("V100", "gcp/n1-highmem-8", "spot")],
    ),
    Case(
        "an offer already ranked for an earlier tier is not repeated for ANY",
        ["A100-40GB:2", "any:2"],
        {"policy": P(spot="never")},
        [("A100-40GB:2", "lambda/gpu_2x_a100", "on-demand"), ("ANY:2", "gcp/n1-highmem-8", "on-demand")],
    ),
    Case(
        "limit across tiers",
        ["H100", "A100-80GB"],
        {"policy": P(across_tiers=True), "limit": 2},
        [
            ("A100-80GB", "azure/Standard_NC24ads_A100_v4", "spot"),
            ("H100", "lambda/gpu_1x_h100", "on-demand"),
        ],
    ),
    Case(
        "limit with ANY duplicates across tiers still fills up",
        ["any:2", "T4:2"],
        {"policy": P(across_tiers=True, spot="never"), "limit": 2},
        [("ANY:2", "gcp/n1-highmem-8", "on-demand"), ("ANY:2", "lambda/gpu_2x_a100", "on-demand")],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ranking(case: Case) -> None:
    assert picks(case.tiers, **case.kw) == case.want


def test_blocked_offer_is_skipped_in_that_market_only() -> None:
    first = rank(parse_gpu("H100"), TABLE).candidates
    aws_spot = next(c for c in first if c.offer.cloud == "aws" and c.market == "spot")
    assert aws_spot.key == aws_spot.offer.key("spot")
    got = picks("H100", blocked={aws_spot.key})
    assert ("H100", "aws/p5.4xlarge", "spot") not in got
    assert ("H100", "aws/p5.4xlarge", "on-demand") in got
    assert len(got) == len(first) - 1


def test_ties_break_on_more_vcpus_then_names_and_input_order_does_not_matter() -> None:
    same = [
        offer("b", "r1", "small", "L4", 1, 1.0, None, vcpus=4),
        offer("a", "r2", "small", "L4", 1, 1.0, None, vcpus=4),
        offer("a", "r1", "small", "L4", 1, 1.0, None, vcpus=4),
        offer("z", "r9", "big", "L4", 1, 1.0, None, vcpus=16),
        offer("c", "r1", "same-price-spot", "L4", 1, None, 1.0, vcpus=4, mem=64),
    ]
    want = ["z/r9/big", "a/r1/small", "a/r2/small", "b/r1/small", "c/r1/same-price-spot"]
    for seed in range(5):
        shuffled = same[:]
        random.Random(seed).shuffle(shuffled)
        got = rank(parse_gpu("L4"), shuffled).candidates
        assert [f"{c.offer.cloud}/{c.offer.region}/{c.offer.instance_type}" for c in got] == want


def test_equal_price_prefers_on_demand_over_spot_of_the_same_offer() -> None:
    o = offer("azure", "eastus", "Standard_NC40ads_H100_v5", "H100", 1, 6.98, 6.98)
    assert [c.market for c in rank(parse_gpu("H100"), [o]).candidates] == ["on-demand", "spot"]


def test_iterable_and_table_give_the_same_ranking() -> None:
    tiers = parse_gpu(["H100", "A100-80GB", "any:2"])
    assert rank(tiers, list(OFFERS)).candidates == rank(tiers, TABLE).candidates


@dataclass
class Sig:
    cloud: str
    region: str
    zone: str | None = None
    instance_type: str | None = None
    gpu: str | None = None
    available: bool | None = None
    quota_left_gpus: int | None = None


def test_live_signals_rule_offers_out() -> None:
    sigs = [
        Sig("lambda", "us-east-1", instance_type="gpu_1x_h100", available=False),
        Sig("gcp", "us-central1", quota_left_gpus=0),
        Sig("aws", "us-east-1", zone="use1-az9", available=False),  # another zone: no effect
        Sig("runpod", "US", available=True),  # good news never rules out
    ]
    p = rank(parse_gpu("H100"), TABLE, signals=sigs, explain=True)
    assert {c.offer.cloud for c in p.candidates} == {"aws", "runpod"}
    codes = {(r.offer.cloud, r.code) for r in p.rejections if r.code in (UNAVAILABLE, QUOTA)}
    assert codes == {("lambda", UNAVAILABLE), ("gcp", QUOTA)}


def test_explain_gives_a_reason_for_each_dropped_offer() -> None:
    blocked = {OFFERS[2].key("spot")}
    p = rank(
        parse_gpu(["H100", "H200:8"]),
        TABLE,
        policy=PlacementPolicy(spot="require", clouds=["aws", "gcp", "lambda"], max_price_per_hour=3.0),
        blocked=blocked,
        min_vcpus=10,
        explain=True,
    )
    assert [(c.offer.instance_type, c.market) for c in p.candidates] == [("p5.4xlarge", "spot")]
    reasons = {(r.offer.instance_type, r.code) for r in p.rejections}
    assert (("p5.48xlarge", COUNT)) in reasons  # H100:8 is not H100:1
    assert ("1x_H100_SECURE", NO_PRICE) in reasons  # no spot price: dropped before the cloud filter
    assert ("a3-highgpu-1g", BLOCKED) in reasons
    assert ("gpu_1x_h100", NO_PRICE) in reasons  # spot required, Lambda has none
    assert ("p5e.48xlarge", MAX_PRICE) in reasons
    assert all(r.reason for r in p.rejections)
    assert p.rejection_counts()[COUNT] >= 1
    blocked_r = next(r for r in p.rejections if r.code == BLOCKED)
    assert blocked_r.market == "spot" and blocked_r.tier_index == 0
    p = rank(parse_gpu("H100"), TABLE, policy=PlacementPolicy(clouds=["aws"]), explain=True)
    cloud_r = [r for r in p.rejections if r.code == CLOUD]
    assert {r.offer.cloud for r in cloud_r} == {"gcp", "lambda", "runpod"} and len(cloud_r) == 3
    assert "not allowed (allowed: aws)" in cloud_r[0].reason


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"policy": PlacementPolicy(regions=["eu-west-1"])}, REGION),
        ({"min_vcpus": 1000}, MIN_VCPUS),
        ({"min_memory_gb": 10_000}, MIN_MEMORY),
    ],
)
def test_offer_level_rejections_are_listed_once_per_offer(kw: dict[str, Any], code: str) -> None:
    p = rank(parse_gpu("H100"), TABLE, explain=True, **kw)
    assert p.candidates == ()
    dropped = [r for r in p.rejections if r.code == code]
    assert len(dropped) == len(TABLE.for_gpu_count("H100", 1))
    assert all(r.market is None for r in dropped)


def test_explain_reports_any_duplicates() -> None:
    p = rank(parse_gpu(["A100-40GB:2", "any:2"]), TABLE, explain=True)
    assert any(r.code == DUPLICATE and r.tier_index == 1 for r in p.rejections)


def test_empty_request_and_empty_table() -> None:
    assert rank((), TABLE).candidates == ()
    p = rank(parse_gpu("H100"), [])
    assert p.best is None and not p


def test_candidate_wire_form() -> None:
    c = rank(parse_gpu("H100"), TABLE).candidates[0]
    d = c.to_dict()
    assert (d["tier"], d["market"], d["price"], d["cloud"]) == ("H100", "on-demand", 2.49, "lambda")
    assert "key" not in d


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"spot": "sometimes"}, "spot policy"),
        ({"max_price_per_hour": 0}, "max_price_per_hour"),
        ({"max_price_per_hour": -1.5}, "max_price_per_hour"),
        ({"clouds": []}, "Empty cloud list"),
    ],
)
def test_policy_validates(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidError, match=match):
        PlacementPolicy(**kw)


def test_bad_limit() -> None:
    with pytest.raises(InvalidError, match="limit"):
        rank(parse_gpu("H100"), TABLE, limit=0)


def test_policy_from_spec() -> None:
    from cloudmodal.spec import FunctionSpec

    spec = FunctionSpec(
        name="f",
        module="m",
        qualname="f",
        gpu=(GpuTier("H100", 1),),
        cloud="aws",
        region=("us-east-1",),
        spot="require",
        max_price_per_hour=9.0,
    )
    p = PlacementPolicy.from_spec(spec)
    assert (p.spot, p.clouds, p.regions, p.max_price_per_hour) == ("require", {"aws"}, {"us-east-1"}, 9.0)
    from dataclasses import replace

    assert PlacementPolicy.from_spec(replace(spec, nonpreemptible=True)).spot == "never"
