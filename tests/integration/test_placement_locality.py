"""Placement near a volume's data, end to end: a real control plane launches a pool's worker on the sim cloud,
and the pool of a function that mounts a volume goes to the offer in the volume's region although another
cloud's offer is cheaper; the same GPU without the volume goes to the cheaper offer (the negative control), and
so does a function that mounts only a small directory of the volume (a mount reads only its ``sub_path``).

The volume is a few MiB in a local directory that ``CLOUDMODAL_VOLUME_STORE_REGION`` places in aws:us-east-1;
``egress.csv`` beside the catalog prices leaving AWS at $1000/GB so that those MiB weigh what hundreds of GB
would at list rates (the ranking is the pure function's, tested with list rates in tests/test_placement_locality.py).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import locality_app
from sqlalchemy import select
from support import sim_plane

import cloudmodal
from cloudmodal.client.session import run_app
from cloudmodal.pricing.offers import Offer, OfferTable
from cloudmodal.server.models import functions as F

MIB = 1024 * 1024
SIZE = 2 * MIB  # the volume's big file
SMALL = 1024  # its file under small/
RATE = 1000.0  # USD per GB out of AWS, from egress.csv


def offer(cloud: str, region: str, zone: str, itype: str, price: float) -> Offer:
    return Offer(cloud, region, zone, itype, "H100", 1, 80, 16, 128, price, None, "test", "2026-01-01")


FAR = offer("gcp", "us-central1", "us-central1-a", "a3-highgpu-1g", 2.00)  # cheapest, another cloud
NEAR = offer("aws", "us-east-1", "us-east-1a", "p5.4xlarge", 2.50)  # where the volume is


def wait_for(
    pred: Callable[[], object], timeout: float, what: str, explain: Callable[[], str] = str
) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{explain()}")


def test_a_pool_that_mounts_a_volume_launches_near_its_data(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "egress.csv").write_text(f"cloud,same_region,inter_region,internet\naws,0,0.02,{RATE:g}\n")
    env = {
        "CLOUDMODAL_CATALOG_DIR": str(catalog),
        "CLOUDMODAL_VOLUME_STORE": str(tmp_path / "volumes"),
        "CLOUDMODAL_VOLUME_STORE_REGION": "aws:us-east-1",
    }
    with sim_plane(tmp_path, {"provisioning": {"delay_s": 0.1}}, offers=OfferTable([FAR, NEAR]), **env) as (
        handle,
        _sim,
    ):
        vol = cloudmodal.Volume.from_name("locality-data", create_if_missing=True)
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"w" * SIZE), "/weights.bin")
            b.put_file(io.BytesIO(b"s" * SMALL), "/small/config.json")
        with run_app(locality_app.app, show_logs=False) as running:
            app_id = running.app_id

            def launched() -> dict[str, dict]:
                evs = handle.cp.activity.events(app_id, limit=10_000)
                fns = (
                    {f["id"]: f["name"] for f in handle.cp.functions.list_functions(app_id)} if False else {}
                )
                del fns
                out = {}
                for e in evs:
                    if e["kind"] == "worker.launched":
                        out[e["function_id"]] = e
                return out if len(out) == 3 else {}

            def log() -> str:
                evs = handle.cp.activity.events(app_id, limit=10_000)
                return "\n".join(f"{e['kind']}: {e['message'][:300]}" for e in evs[-30:])

            got = wait_for(launched, 30, "a worker launched for each function", log)
            evs = handle.cp.activity.events(app_id, limit=10_000)
            with handle.cp.db.read() as conn:
                fns = conn.execute(select(F.c.id, F.c.name).where(F.c.app_id == app_id)).all()
    assert isinstance(got, dict)
    by_name = {f.name: got[f.id] for f in fns}
    clouds = {name: e["data"]["offer"]["cloud"] for name, e in by_name.items()}
    assert clouds == {"near": "aws", "anywhere": "gcp", "small": "gcp"}, [e["message"] for e in got.values()]
    near, anywhere, small = by_name["near"], by_name["anywhere"], by_name["small"]
    # the pool with the volume: the offer in the volume's region, and its egress (none: same region) recorded
    assert near["data"]["offer"]["region"] == "us-east-1"
    assert near["data"]["offer"]["egress_usd"] == 0.0 and near["data"]["egress_usd"] == 0.0
    # the pool without: the cheapest offer, and no egress anywhere in its event (nothing to read)
    assert anywhere["data"]["offer"]["price_per_hour"] == FAR.price_ondemand
    assert "egress_usd" not in anywhere["data"] and "egress_usd" not in anywhere["data"]["offer"]
    # the pool that mounts small/ only: 1 KiB to read, a tenth of a cent even at $1000/GB: the cheaper offer
    assert (
        small["data"]["egress_usd"]
        == small["data"]["offer"]["egress_usd"]
        == round(SMALL / 1024**3 * RATE, 6)
    )
    # the ranking event says where the data is, how much a start reads, and why the dearer offer won
    ranked = [e for e in evs if e["kind"] == "placement.ranked" and e["function_id"] == near["function_id"]]
    assert ranked, [e["kind"] for e in evs]
    data = ranked[0]["data"]["data"]
    (vol_read,) = data["volumes"]
    assert vol_read["name"] == "locality-data" and vol_read["location"] == "aws:us-east-1"
    assert vol_read["gb"] * 1024**3 == SIZE + SMALL
    far_egress = (SIZE + SMALL) / 1024**3 * RATE  # about $1.95: 2.00 + 1.95 > 2.50
    assert f"+ ${far_egress:.2f} egress" in ranked[0]["message"]
    (note,) = ranked[0]["data"]["notes"]
    assert note.startswith("near the data: aws us-east-1a p5.4xlarge H100 on-demand $2.50/h ranks above the ")
    assert "cheaper gcp us-central1-a a3-highgpu-1g H100 on-demand $2.00/h + $1.95 egress" in note
    assert "locality-data (2.0 MB in aws:us-east-1)" in note and "($3.95/h against $2.50/h" in note
