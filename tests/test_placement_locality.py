"""Placement with data locality: a function that mounts volumes prefers offers near them by the egress a
worker's start would cost. Tables of cases on a small offer set, a negative control (the same offers without
a volume rank by price), and a check over the real catalog snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudmodal.exception import InvalidError
from cloudmodal.gpu import parse_gpu
from cloudmodal.placement import DataLocality, DataRead, PlacementPolicy, rank
from cloudmodal.pricing.egress import DEFAULT_RATES, LOCAL, DataLocation, EgressRate, egress_cost
from cloudmodal.pricing.offers import Offer, OfferTable


def offer(
    cloud: str, region: str, itype: str, gpu: str, od: float | None, spot: float | None = None
) -> Offer:
    return Offer(cloud, region, None, itype, gpu, 1, 80, 16, 128, od, spot, "test", "2026-01-01")


GCP_FAR = offer("gcp", "us-central1", "a3-highgpu-1g", "H100", 2.00)  # the cheapest, far from the data
AWS_WEST = offer("aws", "us-west-2", "p5.4xlarge", "H100", 2.20)  # same cloud as the data, another region
AWS_EAST = offer("aws", "us-east-1", "p5.4xlarge", "H100", 2.50)  # where the data is
LAMBDA = offer("lambda", "us-east-1", "gpu_1x_h100", "H100", 2.10)
A100_EAST = offer("aws", "us-east-1", "p4de.24xlarge", "A100-80GB", 1.50)
A100_FAR = offer("gcp", "us-central1", "a2-ultragpu-1g", "A100-80GB", 1.20)
TABLE = OfferTable([GCP_FAR, AWS_WEST, AWS_EAST, LAMBDA, A100_EAST, A100_FAR])

EAST = DataLocation("aws", "us-east-1")


def data(gb: float | None, where: DataLocation = EAST, hours: float = 1.0) -> DataLocality:
    return DataLocality(reads=(DataRead("weights", where, gb),), worker_hours=hours)


def order(p: object) -> list[str]:
    return [f"{c.offer.cloud}:{c.offer.region}" for c in p.candidates]  # type: ignore[attr-defined]


ALL_BY_PRICE = ["gcp:us-central1", "lambda:us-east-1", "aws:us-west-2", "aws:us-east-1"]


@pytest.mark.parametrize(
    ("locality", "want"),
    [
        # the negative control: no volume mounted, the cheapest offer first (price order)
        (None, ALL_BY_PRICE),
        # 100 GB in aws:us-east-1 over a 1 h worker: gcp 2.00+9.00, lambda 2.10+9.00, west 2.20+2.00, east 2.50
        (data(100), ["aws:us-east-1", "aws:us-west-2", "gcp:us-central1", "lambda:us-east-1"]),
        # 1 GB: egress is cents, the price decides again (gcp 2.09, lambda 2.19, west 2.22, east 2.50)
        (data(1), ALL_BY_PRICE),
        # 100 GB over a 100 h worker: $9 spread over 100 h is $0.09/h (gcp 2.09 < lambda 2.19 < west 2.22)
        (data(100, hours=100), ALL_BY_PRICE),
        # 10 GB over 1 h: gcp 2.90, lambda 3.00, west 2.40, east 2.50: the other AWS region wins
        (data(10), ["aws:us-west-2", "aws:us-east-1", "gcp:us-central1", "lambda:us-east-1"]),
        # region unknown: leaving AWS still costs $9, but within AWS nothing is counted (west 2.20 < east 2.50)
        (
            data(100, DataLocation("aws", None, "no region")),
            ["aws:us-west-2", "aws:us-east-1", "gcp:us-central1", "lambda:us-east-1"],
        ),
        # location unknown, size unknown, nothing to read, or a local directory: price order, not penalized
        (data(100, DataLocation(None, None, "custom endpoint")), ALL_BY_PRICE),
        (data(None), ALL_BY_PRICE),
        (data(0), ALL_BY_PRICE),
        (data(1000, DataLocation(LOCAL)), ALL_BY_PRICE),
        # data on Lambda (no egress there): nothing to pay anywhere
        (data(1000, DataLocation("lambda", "us-east-1")), ALL_BY_PRICE),
    ],
)
def test_egress_reorders_offers(locality: DataLocality | None, want: list[str]) -> None:
    p = rank(parse_gpu("H100"), TABLE, locality=locality)
    assert order(p) == want
    if locality is None:
        assert all(c.egress is None for c in p.candidates) and p.notes == ()
    else:
        # each candidate carries what its worker's start costs in transfer, as egress_cost prices it
        for c in p.candidates:
            want_usd = sum(
                egress_cost(r.location, c.offer.cloud, c.offer.region, r.gb or 0) for r in locality.reads
            )
            assert c.egress == pytest.approx(want_usd)
        costs = [locality.per_hour(c) for c in p.candidates]
        assert costs == sorted(costs)


def test_the_near_offer_wins_and_the_ranking_says_why() -> None:
    p = rank(parse_gpu("H100"), TABLE, locality=data(100))
    best = p.best
    assert best is not None and best.offer is AWS_EAST and best.egress == 0.0
    assert best.to_dict()["egress_usd"] == 0.0
    far = next(c for c in p.candidates if c.offer is GCP_FAR)
    assert far.egress == pytest.approx(9.0) and far.to_dict()["egress_usd"] == pytest.approx(9.0)
    (note,) = p.notes
    assert note.startswith("near the data: aws us-east-1 p5.4xlarge (on-demand) ranks first at $2.50/h")
    assert "the cheaper gcp us-central1 a3-highgpu-1g (on-demand) at $2.00/h would add $9.00 egress" in note
    assert "weights (100.0 GB in aws:us-east-1)" in note and "= $11.00/h" in note

    # negative control: the same offers with no volume mounted: the cheap far one wins, nothing to explain
    plain = rank(parse_gpu("H100"), TABLE)
    assert plain.best is not None and plain.best.offer is GCP_FAR
    assert plain.notes == () and "egress_usd" not in plain.best.to_dict()


def test_unknowns_are_said_and_not_counted() -> None:
    reads = (
        DataRead("weights", DataLocation(None, None, "s3:// at a custom endpoint: set X"), 100.0),
        DataRead("cache", EAST, None, "its manifest could not be read"),
        DataRead("ckpt", DataLocation("aws", None, "the bucket's region is not in its URL"), 5.0),
    )
    p = rank(parse_gpu("H100"), TABLE, locality=DataLocality(reads=reads))
    notes = "\n".join(p.notes)
    assert "volume 'weights': location not known (s3:// at a custom endpoint: set X)" in notes
    assert "volume 'cache': size not known (its manifest could not be read)" in notes
    assert "volume 'ckpt': in aws, region not known" in notes
    # only ckpt can be priced: leaving AWS costs 5 GB x $0.09
    assert {c.offer.cloud: c.egress for c in p.candidates} == pytest.approx(
        {"gcp": 0.45, "lambda": 0.45, "aws": 0.0}
    )


def test_tiers_keep_the_users_order() -> None:
    # A100 near the data is cheaper than any H100, but H100 is the first tier: it stays first
    p = rank(parse_gpu(["H100", "A100-80GB"]), TABLE, locality=data(100))
    assert [c.offer.gpu for c in p.candidates] == ["H100"] * 4 + ["A100-80GB"] * 2
    assert p.candidates[0].offer is AWS_EAST and p.candidates[4].offer is A100_EAST
    # across tiers, price plus egress decides: A100 in us-east-1 (1.50) first, then H100 there (2.50)
    across = rank(
        parse_gpu(["H100", "A100-80GB"]),
        TABLE,
        policy=PlacementPolicy(across_tiers=True),
        locality=data(100),
    )
    assert [c.offer for c in across.candidates[:3]] == [A100_EAST, AWS_EAST, AWS_WEST]
    plain = rank(parse_gpu(["H100", "A100-80GB"]), TABLE, policy=PlacementPolicy(across_tiers=True))
    assert plain.candidates[0].offer is A100_FAR  # negative control


def test_a_limit_still_sees_the_near_offer_behind_cheaper_far_ones() -> None:
    p = rank(parse_gpu("H100"), TABLE, locality=data(100), limit=1)
    assert [c.offer for c in p.candidates] == [AWS_EAST]
    assert p.notes and "near the data" in p.notes[0]  # the note knew the cheaper one the limit cut off
    assert rank(parse_gpu("H100"), TABLE, limit=1).candidates[0].offer is GCP_FAR


def test_any_tiers_list_each_offer_once() -> None:
    tiers = parse_gpu(["H100", "ANY"])
    p = rank(tiers, TABLE, locality=data(100), explain=True)
    keys = [c.key for c in p.candidates]
    assert len(keys) == len(set(keys)) == 6
    assert [c.tier_index for c in p.candidates] == [0, 0, 0, 0, 1, 1]  # H100s under their own tier
    assert p.rejection_counts().get("duplicate") == 4


def test_the_price_cap_applies_to_the_price_alone() -> None:
    cap = PlacementPolicy(max_price_per_hour=2.3)
    p = rank(parse_gpu("H100"), TABLE, policy=cap, locality=data(100))
    # us-east-1 costs $2.50/h: over the cap, whatever it saves in egress; west (2.20 + 2.00 egress) is kept
    assert order(p) == ["aws:us-west-2", "gcp:us-central1", "lambda:us-east-1"]


def test_spot_and_on_demand_both_carry_egress() -> None:
    t = OfferTable(
        [offer("gcp", "us-central1", "a3", "H100", 3.0, 1.0), offer("aws", "us-east-1", "p5", "H100", 4.0)]
    )
    p = rank(parse_gpu("H100"), t, locality=data(100))
    assert [(c.offer.cloud, c.market, c.egress) for c in p.candidates] == [
        ("aws", "on-demand", 0.0),
        ("gcp", "spot", pytest.approx(9.0)),
        ("gcp", "on-demand", pytest.approx(9.0)),
    ]


def test_custom_rates_change_the_ranking() -> None:
    # negotiated: leaving AWS costs nothing, so the cheapest offer wins again
    free = {**DEFAULT_RATES, "aws": EgressRate(same_region=0, inter_region=0, internet=0, source="deal")}
    loc = DataLocality(reads=(DataRead("weights", EAST, 100.0),), rates=free)
    assert order(rank(parse_gpu("H100"), TABLE, locality=loc)) == ALL_BY_PRICE


@pytest.mark.parametrize("hours", [0, -1, float("nan")])
def test_worker_hours_must_be_positive(hours: float) -> None:
    with pytest.raises(InvalidError, match="worker_hours"):
        DataLocality(reads=(), worker_hours=hours)


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(InvalidError, match="0 or more"):
        DataRead("weights", EAST, -1.0)


# The real catalog snapshot beside the repository (as tests/cli/test_deploy_plan.py finds it).
SHARED_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "pricing" / "catalogs" / "v8"


def test_over_the_real_catalog() -> None:
    if not SHARED_CATALOG.is_dir():
        pytest.skip(f"the shared pricing snapshot ({SHARED_CATALOG}) is not present")
    from cloudmodal.pricing.catalog import load_offer_table

    table = load_offer_table(SHARED_CATALOG)
    tiers = parse_gpu(["H100", "A100-80GB"])
    plain = rank(tiers, table)
    cheapest = plain.candidates[0].offer
    # 200 GB where the cheapest H100 of a big cloud other than the cheapest offer's is: leaving that cloud costs
    # $18 or more, which no cheaper offer elsewhere makes up for
    near = next(
        c.offer
        for c in plain.candidates
        if c.offer.cloud in ("aws", "gcp", "azure") and c.offer.cloud != cheapest.cloud and c.tier_index == 0
    )
    loc = data(200, DataLocation(near.cloud, near.region))
    full = rank(tiers, table, locality=loc)
    limited = rank(tiers, table, locality=loc, limit=6)
    assert limited.candidates == full.candidates[:6]  # the limit cuts the same order
    assert len(full.candidates) == len(plain.candidates)  # same offers, another order
    assert {c.key for c in full.candidates} == {c.key for c in plain.candidates}
    best = full.candidates[0]
    assert (best.offer.cloud, best.offer.region) == (near.cloud, near.region) and best.egress == 0.0
    for ti in (0, 1):
        costs = [loc.per_hour(c) for c in full.candidates if c.tier_index == ti]
        assert costs == sorted(costs)
    assert any("near the data" in n for n in full.notes)


def test_a_limit_cuts_the_full_order_whatever_the_offers() -> None:
    """Ranking with a limit stops reading a tier early; it must give the full ranking's first ``limit``."""
    import random

    rng = random.Random(7)
    clouds = {"aws": ["us-east-1", "us-west-2"], "gcp": ["us-central1"], "azure": ["eastus"], "lambda": ["x"]}
    gpus = ["H100", "A100-80GB", "L4"]
    for case in range(60):
        offers = []
        for n in range(rng.randint(1, 700)):
            cloud = rng.choice(list(clouds))
            od = round(rng.uniform(0.5, 10), 2) if rng.random() < 0.9 else None
            spot = round(rng.uniform(0.2, 5), 2) if rng.random() < 0.5 or od is None else None
            offers.append(offer(cloud, rng.choice(clouds[cloud]), f"t{n}", rng.choice(gpus), od, spot))
        table = OfferTable(offers)
        where = DataLocation(
            rng.choice(["aws", "gcp", "azure"]), rng.choice(["us-east-1", "us-central1", None])
        )
        loc = data(rng.choice([1, 10, 100, 1000]), where, hours=rng.choice([0.5, 1, 8]))
        tiers = parse_gpu(rng.choice([["H100"], ["H100", "ANY"], ["ANY", "L4"], ["L4", "A100-80GB"]]))
        policy = PlacementPolicy(
            across_tiers=rng.random() < 0.5, spot=rng.choice(["allow", "never", "require"])
        )
        full = rank(tiers, table, policy=policy, locality=loc).candidates
        keys = [c.key for c in full]
        assert len(keys) == len(set(keys)), case
        for limit in (1, 3, 32):
            assert rank(tiers, table, policy=policy, locality=loc, limit=limit).candidates == full[:limit], (
                case,
                limit,
            )
