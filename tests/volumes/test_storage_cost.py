"""Volumes' storage in the cost ledger: a volume in S3 (moto's server) is charged by the hour at S3's list price
per GB-month for its head version's size, written once per hour however often the ledger accrues; a volume in
a local directory (no price) is not charged."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloudmodal.pricing.billing import STORAGE_USD_PER_GB_MONTH
from cloudmodal.pricing.egress import GIB
from cloudmodal.server.app import default_settings
from cloudmodal.server.cost_report import CostReports
from cloudmodal.server.ledger import MONTH_HOURS, SPAN, Ledger
from cloudmodal.server.models_volumes import volumes as V
from cloudmodal.server.service import ControlPlane
from cloudmodal.volumes import FileHead, VolumeData, open_store

H = 3600.0
T0 = 1_800_000_000.0  # an hour boundary


def _volume(cp: ControlPlane, vid: str, url: str, tmp: Path, size: int) -> None:
    data = VolumeData(open_store(url, env=dict(os.environ)), FileHead(tmp / f"{vid}.json"))
    with data.batch() as b:
        b.put_file(io.BytesIO(b"x" * size), "/weights.bin")
    version, manifest = FileHead(tmp / f"{vid}.json").read()
    with cp.db.write() as conn:
        conn.execute(
            V.insert().values(
                id=vid,
                name=vid,
                created_at=T0 - 30,
                store_url=url,
                prefix="",
                version=version,
                manifest=manifest,
            )
        )


def test_a_volume_in_s3_is_charged_by_the_hour(
    s3_server: Any, buckets: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "s3" not in buckets:
        buckets["s3"] = s3_server.new_bucket()
    url = f"s3://{buckets['s3']}/vols/{uuid.uuid4().hex[:10]}"
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CLOUDMODAL_VOLUME_STORE", url)
    monkeypatch.setenv("CLOUDMODAL_VOLUME_STORE_REGION", "aws:us-east-1")  # moto's endpoint names no cloud
    cp = ControlPlane(default_settings(tmp_path / "cp", database_url=f"sqlite:///{tmp_path / 'cp.db'}"))
    try:
        size = 3 * 1024 * 1024 + 17
        _volume(cp, "vo-s3", url, tmp_path, size)
        _volume(cp, "vo-local", str(tmp_path / "local-store"), tmp_path, 1024)
        ledger = Ledger(cp)
        assert (
            ledger.accrue_storage(T0 + 2 * H + 5) == 3
        )  # hours begun at T0-30 s: [T0-30, T0), then two whole
        assert ledger.accrue_storage(T0 + 2 * H + 50) == 0  # the same hours: not again
        assert ledger.accrue_storage(T0 + 3 * H + 1) == 1
        with cp.db.read() as conn:
            rows = conn.execute(select(SPAN).where(SPAN.c.kind == "storage")).mappings().all()
        assert {r["worker_id"] for r in rows} == {"volume:vo-s3"}  # the local directory has no price
        per_hour = size / GIB * STORAGE_USD_PER_GB_MONTH["aws"] / MONTH_HOURS
        assert sum(r["cost"] for r in rows) == pytest.approx(per_hour * (3 * H + 30) / H)
        report = CostReports(cp).report(since=T0 - H, until=T0 + 3 * H, now=T0 + 3 * H + 2)
        (group,) = report["groups"]
        assert group["key"] == "(volume storage)"
        assert group["hours"] == 0  # hours are machines' hours; money is shown to 1e-6 USD
        assert group["cost"] == pytest.approx(per_hour * (3 * H + 30) / H, abs=1e-6)
    finally:
        cp.db.dispose()
