"""Idle workers' claims at scale: what a fleet of workers long-polling for work with nothing to do costs the
control plane. Their claims park until inputs come; the database is re-read for inputs nobody announced by one
parked claim per function at a time, so neither the claim transactions nor the wake-ups grow with the number
of idle workers (issue 11: 1,000 connected workers on one control plane)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest

from cloudmodal.ids import new_id
from cloudmodal.providers.local import LocalProvider
from cloudmodal.server.app import ServerHandle, default_settings
from cloudmodal.server.service import REREAD_S
from cloudmodal.spec import AutoscalerSettings, FunctionSpec

WORKERS = 30
WAIT_S = 4.0  # each claim's long poll


@pytest.fixture(params=["sqlite", "postgres"])
def fleet(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ServerHandle, str, list[list[str]]]]:
    """A control plane (HTTP, the reconciler) with one function whose pool is pinned at WORKERS pretend
    workers, made as the reconciler makes them before a launch (a row and a ``worker:<id>`` token), and a
    worker budget of 0 so that nothing real is launched: (handle, function id, [[worker id, token], ...])."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cloudmodal.db'}"
    else:
        url = request.getfixturevalue("new_postgres_database")()
    settings = default_settings(tmp_path, database_url=url)
    provider = LocalProvider(state_dir=tmp_path / "workers", standby=False)
    handle = ServerHandle(settings, host="127.0.0.1", port=0, providers={"local": provider})
    handle.reconciler.max_workers = 0
    handle.start_in_thread()
    try:
        deadline = time.monotonic() + 30
        while handle.reconciler.leadership.holding is not True:  # a new leader writes off unregistered rows
            assert time.monotonic() < deadline, "the reconciler did not take leadership"
            time.sleep(0.02)
        cp = handle.cp
        app_id = new_id("ap")
        cp.apps.create_app(app_id, "idlefleet", ephemeral=False)
        spec = FunctionSpec(
            name="noop",
            module="idlefleet",
            qualname="noop",
            autoscaler=AutoscalerSettings(min_containers=WORKERS, max_containers=WORKERS),
        )
        fid = cp.functions.create_function(
            {"app_id": app_id, "name": "noop", "spec": spec.to_wire(), "module": "idlefleet"}
        )["function_id"]
        workers = []
        for _ in range(WORKERS):
            wid = new_id("ta")
            token = cp.tokens.create(scope=f"worker:{wid}", name=wid)
            cp.workers.add_worker(wid, app_id, fid, provider="idlefleet", market="", function_version=1)
            workers.append([wid, token])
        yield handle, fid, workers
    finally:
        handle.stop()


async def _idle_claims(handle: ServerHandle, fid: str, workers: list[list[str]]) -> tuple[int, int, float]:
    """Every worker registers and long-polls one claim with nothing to claim; counted from the moment all are
    parked until all have answered: (claim transactions, parks, seconds that took)."""
    cp = handle.cp
    async with httpx.AsyncClient(
        base_url=handle.url, timeout=60, limits=httpx.Limits(max_connections=100)
    ) as c:

        async def post(wid: str, token: str, what: str, body: dict[str, object]) -> object:
            r = await c.post(
                f"/v1/workers/{wid}/{what}",
                content=msgpack.packb(body),
                headers={"authorization": f"Bearer {token}", "content-type": "application/msgpack"},
            )
            assert r.status_code == 200, r.text
            return msgpack.unpackb(r.content)

        for wid, token in workers:
            await post(wid, token, "register", {"pid": 1, "host": "test"})
            await post(wid, token, "ready", {})
        claims = [
            asyncio.ensure_future(post(wid, token, "claim", {"max": 1, "wait": WAIT_S}))
            for wid, token in workers
        ]
        deadline = time.monotonic() + 60
        while True:
            with cp._lock:
                parked = len(cp._parked.get(fid, ()))
            if parked == len(workers):
                break
            assert time.monotonic() < deadline, f"only {parked} of {len(workers)} claims parked"
            await asyncio.sleep(0.01)
        reads, parks, t0 = cp.claim_reads, cp.claim_parks, time.monotonic()
        answers = await asyncio.gather(*claims)
        took = time.monotonic() - t0
        assert all(a == {"inputs": [], "drain": False} for a in answers)
        return cp.claim_reads - reads, cp.claim_parks - parks, took


def test_idle_parked_claims_do_not_each_read_the_database(fleet):
    """While WORKERS claims wait with nothing to claim, the database is re-read about once a second for all
    of them (at most one claim transaction per REREAD_S plus one), and only the claim woken for that re-read
    parks again; each parked claim does not wake, read and re-park every second of its wait."""
    handle, fid, workers = fleet
    reads, parks, took = asyncio.run(_idle_claims(handle, fid, workers))
    # One re-read per REREAD_S of the window, plus one, however long a busy machine stretches the window;
    # per worker and second it would be ~WORKERS per REREAD_S (128 here before).
    bound = took / REREAD_S + 1
    assert reads <= bound, (reads, took)
    assert parks <= bound, (parks, took)
