#!/usr/bin/env python
"""Container start with and without a memory snapshot, on the local provider (a fork server per function).

The function is a class whose start-up imports the heaviest libraries installed here (pandas and sympy: about
0.6 s in a fresh process with a warm disk cache; no torch or scikit-learn in this environment) and builds a
small DataFrame. With ``enable_memory_snapshot=True`` that work is an ``@enter(snap=True)`` hook; without, the
same work is an ``@enter()`` hook. Each sample starts from a pool with no container: the previous container is
drained through the control plane and the sample waits until its process is gone, then times

  launch to first result   ``.remote()`` on the empty pool, until the result is back (the reconciler's tick,
                           the launch, the worker's start and registration, the hooks, the call)
  start to ready           the worker row's ``ready_at - started_at`` (from its launch to its ``/ready``)

The first container of the snapshotted class creates the snapshot (a cold start plus the zygote's own start);
it is reported apart and left out of the p50. The embedded default's warm standby interpreter is on for both,
and each sample waits until it is up and has had ``STANDBY_SETTLE_S`` for its imports (the baseline's best
case: without that wait a start often takes a standby still importing, about 0.45 s slower here).

    .venv/bin/python bench/snapshot.py            # ~1 min on 2 cores
    .venv/bin/python bench/snapshot.py --n 9 --json out.json

Nothing here asserts a timing; this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APP = """
import cloudmodal

app = cloudmodal.App("snapshot-bench")


def _warm():
    import pandas
    import sympy

    frame = pandas.DataFrame({"x": range(1000)})
    return {"rows": len(frame), "pi": str(sympy.pi.evalf(10))}


@app.cls(enable_memory_snapshot=True, scaledown_window=600)
class Snapped:
    @cloudmodal.enter(snap=True)
    def warm(self):
        self.state = _warm()

    @cloudmodal.method()
    def ping(self, x: int) -> int:
        return x + self.state["rows"]


@app.cls(scaledown_window=600)
class Cold:
    @cloudmodal.enter()
    def warm(self):
        self.state = _warm()

    @cloudmodal.method()
    def ping(self, x: int) -> int:
        return x + self.state["rows"]
"""


STANDBY_SETTLE_S = 1.5


def _live_workers(cp: Any, function_id: str) -> list[tuple[str, float | None, float | None]]:
    from sqlalchemy import select

    from cloudmodal.server import models

    W = models.workers
    with cp.db.snapshot() as conn:
        rows = conn.execute(
            select(W.c.id, W.c.state, W.c.started_at, W.c.ready_at).where(W.c.function_id == function_id)
        ).all()
    return [(r.id, r.started_at, r.ready_at) for r in rows if r.state != "stopped"]


def _row(cp: Any, worker_id: str) -> tuple[float | None, float | None]:
    from sqlalchemy import select

    from cloudmodal.server import models

    W = models.workers
    with cp.db.snapshot() as conn:
        r = conn.execute(select(W.c.started_at, W.c.ready_at).where(W.c.id == worker_id)).first()
    return (r.started_at, r.ready_at) if r is not None else (None, None)


def _empty_pool(cp: Any, provider: Any, function_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for worker_id, *_ in _live_workers(cp, function_id):
        cp.workers.drain_worker(worker_id, "bench: next sample starts from an empty pool")
    while time.monotonic() < deadline:
        live = [w for w in provider.live_workers() if provider.function_of(w) == function_id]
        rows = _live_workers(cp, function_id)
        if not rows and not live and provider._standby is not None:
            time.sleep(STANDBY_SETTLE_S)  # the standby interpreter's imports finish: the baseline's best case
            return
        time.sleep(0.02)
    raise RuntimeError(f"the pool did not empty: rows {rows}, processes {live}")


def sample(handle: Any, provider: Any, obj: Any) -> tuple[float, float | None]:
    fid = obj._function_id()
    _empty_pool(handle.cp, provider, fid)
    before = {w for w, *_ in _live_workers(handle.cp, fid)}
    t0 = time.perf_counter()
    assert obj.ping.remote(1) == 1001
    wall = time.perf_counter() - t0
    new = [w for w, *_ in _live_workers(handle.cp, fid) if w not in before]
    ready = None
    if new:
        started, ready_at = _row(handle.cp, new[0])
        if started and ready_at:
            ready = ready_at - started
    return wall, ready


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=7, help="samples per variant")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from support import use_server

    from cloudmodal.client.session import run_app
    from cloudmodal.providers.local import LocalProvider
    from cloudmodal.server.app import ServerHandle, default_settings

    work = Path(tempfile.mkdtemp(prefix="cm-snapbench-"))
    (work / "snapshot_bench_app.py").write_text(APP)
    sys.path.insert(0, str(work))
    app_mod = importlib.import_module("snapshot_bench_app")
    state = work / "state"
    settings = default_settings(
        state,
        database_url=f"sqlite:///{state / 'cloudmodal.db'}",
        lease_s=6.0,
        heartbeat_s=0.2,
        worker_timeout_s=20.0,
        reconcile_interval_s=0.05,
    )
    provider = LocalProvider(state_dir=state / "workers", gpus=[], standby=True)
    handle = ServerHandle(settings, providers={"local": provider}).start_in_thread()
    results: dict[str, Any] = {}
    try:
        with use_server(handle), run_app(app_mod.app, show_logs=False):
            for name, obj in (("no snapshot", app_mod.Cold()), ("snapshot", app_mod.Snapped())):
                first = sample(handle, provider, obj)  # the snapshot's creation / the first cold start
                runs = [sample(handle, provider, obj) for _ in range(args.n)]
                results[name] = {
                    "first_wall_s": first[0],
                    "first_ready_s": first[1],
                    "wall_s": [r[0] for r in runs],
                    "ready_s": [r[1] for r in runs if r[1] is not None],
                }
    finally:
        handle.stop()

    cold, snap = results["no snapshot"], results["snapshot"]
    print(f"container start, p50 of {args.n} starts from an empty pool (first start apart)")
    print(f"{'variant':<14}{'launch->result p50':>20}{'start->ready p50':>18}{'first start':>14}")
    for name, r in results.items():
        print(
            f"{name:<14}{p50(r['wall_s']) * 1000:>17.0f} ms{p50(r['ready_s']) * 1000:>15.0f} ms"
            f"{r['first_wall_s'] * 1000:>11.0f} ms"
        )
    print(
        f"speed-up       {p50(cold['wall_s']) / p50(snap['wall_s']):>17.1f} x"
        f"{p50(cold['ready_s']) / p50(snap['ready_s']):>16.1f} x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
