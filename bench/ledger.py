"""The cost ledger at scale: a cost report over millions of ledger rows on PostgreSQL, and the write cost of
one accrual per worker on PostgreSQL and SQLite.

1. **Reports.** A fresh PostgreSQL database gets a control plane's schema (``Database(url)``), then a synthetic
   ledger: ``--apps`` apps (1-4 functions each, sizes skewed), workers over ``--days`` days on AWS, GCP,
   Azure, Lambda, RunPod and the local provider (CPU, T4/L4/A10G, A100, H100, 8-GPU machines; on-demand and
   spot, a few spot offers with no known on-demand price), lives from seconds (billing minimums) to weeks,
   idle tails before scale-down. Their time is cut as :func:`cloudmodal.server.ledger.plan` cuts it: at every
   accrual tick (``--span-s``; the control plane's default is 30 s, 120 s here makes the fleet four times
   larger for the same rows: more rollup rows, the harder case for a report) and at every hour; a stopped
   worker's last span ends at its stop and its billing minimum is a ``minimum`` span. ``--rows`` spans in
   all (about), generated an hour at a time in time order (the order accruals write them) and streamed into
   ``COPY``; the span table's secondary indexes are dropped for the load and rebuilt from their own
   definitions after it, then ``VACUUM ANALYZE`` (what autovacuum does to a table written over weeks). The
   rollup ``ledger_hour`` is one ``INSERT ... SELECT ... GROUP BY`` over the spans with the sums
   ``ledger._add_to_hour`` makes; a sample of hours is rebuilt through ``_add_to_hour`` itself and compared.
   Worker rows: every worker, the running ones accrued up to ``now`` (their last accrual, 25 minutes into the last hour).

   Timed, ``--repeat`` times each, min and median: ``CostReports(cp).report(...)`` for typical reports, and
   beside each the naive plan, the same cost summed straight from ``ledger_span`` (each span's share inside
   the range, ``GROUP BY`` app or function or day) in one SQL statement. Both must agree to the cent (per app
   for the reports by app, in total otherwise). Each report's statements are recorded (time per statement);
   the slowest ones run once more under ``EXPLAIN (ANALYZE, BUFFERS)`` and their plans are printed.

2. **Accrual.** ``Ledger.accrue()`` on ``--accrual-workers`` running workers (rows put straight into
   ``worker``), on a fresh PostgreSQL database and a fresh SQLite file: the first accrual (launch to now), a
   steady one 30 s later, and the last one after they all stopped (last span and billing minimums). Each
   worker's accrual is its own transaction: the compare-and-swap on its row, its spans, their rollup upserts.
   Printed: µs per worker per accrual, spans written.

Run (the full size takes several minutes, mostly generating and loading)::

    .venv/bin/python bench/ledger.py                      # 10,000,000 spans, 500 apps, 60 days
    .venv/bin/python bench/ledger.py --quick              # 200,000 spans: a smoke run of seconds
    .venv/bin/python bench/ledger.py --rows 2000000 --repeat 7 --json /tmp/ledger.json

``--database-url`` (default ``$CLOUDMODAL_TEST_POSTGRES_URL`` or ``postgresql://postgres@127.0.0.1:5432/test``)
is where the scratch databases are made (``CREATE DATABASE``) and dropped at the end (``--keep`` keeps the big
one and prints its URL). Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pricing.billing import billed_seconds  # noqa: E402

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

HOUR = 3600.0
DAY = 86400.0
START = 1788220800.0  # 2026-09-01 00:00 UTC: the ledger's first day
DEFAULT_URL = os.environ.get(
    "CLOUDMODAL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
).replace("postgresql+psycopg://", "postgresql://")

SPAN_COLUMNS = (
    "worker_id",
    "app_id",
    "function_id",
    "provider",
    "cloud",
    "region",
    "instance_type",
    "gpu",
    "gpu_count",
    "market",
    "price_per_hour",
    "on_demand_per_hour",
    "t0",
    "t1",
    "seconds",
    "idle_seconds",
    "cost",
    "kind",
    "recorded_at",
)
WORKER_COPY_COLUMNS = (
    "id",
    "app_id",
    "function_id",
    "provider",
    "instance_id",
    "state",
    "function_version",
    "started_at",
    "last_heartbeat",
    "in_flight",
    "stopped_at",
    "idle_since",
    "offer",
    "market",
    "price_per_hour",
    "gpu",
    "host",
    "launched_at",
    "billed_until",
    "billing_closed",
)

# (cloud, region, instance type, GPU tier, on-demand $/h, spot $/h as a share of on-demand or None)
OFFERS: tuple[tuple[str, str, str, str, float, float | None], ...] = (
    ("aws", "us-east-1", "c6i.2xlarge", "", 0.34, 0.40),
    ("aws", "us-east-1", "g4dn.xlarge", "T4", 0.526, 0.30),
    ("aws", "us-west-2", "g6.xlarge", "L4", 0.805, 0.40),
    ("aws", "us-east-1", "g5.xlarge", "A10G", 1.006, 0.35),
    ("aws", "us-east-1", "p4de.24xlarge", "A100-80GB:8", 40.97, 0.45),
    ("aws", "us-east-2", "p5.48xlarge", "H100:8", 98.32, 0.45),
    ("gcp", "us-central1", "n2-standard-8", "", 0.388, 0.30),
    ("gcp", "us-central1", "g2-standard-4", "L4", 0.707, 0.35),
    ("gcp", "us-central1", "a2-highgpu-1g", "A100", 3.673, 0.30),
    ("gcp", "europe-west4", "a3-highgpu-8g", "H100:8", 88.25, 0.40),
    ("azure", "eastus", "Standard_D8s_v5", "", 0.384, 0.25),
    ("azure", "eastus", "Standard_NV36ads_A10_v5", "A10", 3.20, 0.35),
    ("azure", "eastus", "Standard_NC24ads_A100_v4", "A100", 3.673, 0.40),
    ("lambda", "us-west-1", "gpu_1x_a10", "A10", 0.75, None),
    ("lambda", "us-east-1", "gpu_1x_a100_sxm4", "A100", 1.29, None),
    ("lambda", "us-east-1", "gpu_1x_h100_pcie", "H100", 2.49, None),
    ("lambda", "us-south-1", "gpu_8x_h100_sxm5", "H100:8", 23.92, None),
    ("runpod", "US-TX-3", "1x_H100_SECURE", "H100", 2.69, 0.55),
    ("runpod", "EU-RO-1", "1x_L4_SECURE", "L4", 0.43, 0.55),
    ("local", "", "", "", 0.0, None),
)
# GPU tier -> weight of the functions that use it
TIERS = {
    "": 30,
    "T4": 8,
    "L4": 12,
    "A10G": 8,
    "A10": 7,
    "A100": 14,
    "A100-80GB:8": 3,
    "H100": 12,
    "H100:8": 6,
}


# -- the synthetic fleet ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class Fn:
    id: str
    app_id: str
    name: str
    offers: list[tuple[str, str, str, str, float, float | None]]
    spot_share: float
    weight: float


@dataclass(slots=True)
class Worker:
    id: str
    fn: Fn
    provider: str
    cloud: str
    region: str
    instance_type: str
    gpu: str
    market: str
    price: float
    on_demand: float | None  # the ledger's on_demand_per_hour (None: a spot offer that had none)
    launch: float
    end: float  # its stop, or ``now`` while it runs
    stopped: bool
    idle_from: float | None
    top_up: float  # the billing minimum's seconds (0: none)
    prefix: str = ""  # the span row's first columns, COPY text


@dataclass
class Fleet:
    apps: list[dict[str, Any]]
    functions: list[Fn]
    workers: list[Worker]  # by launch
    now: float
    span_s: float
    expected_rows: int


def _wid(rng: random.Random, prefix: str) -> str:
    return f"{prefix}-{rng.getrandbits(64):016x}"


def make_fleet(rows: int, days: int, n_apps: int, span_s: float, budget_share: float, seed: int) -> Fleet:
    """Apps, functions and workers whose spans, cut as the ledger cuts them, number about ``rows``."""
    if HOUR % span_s:
        raise SystemExit(f"--span-s must divide an hour (3600 s); got {span_s}")
    rng = random.Random(seed)
    now = (
        START + days * DAY - HOUR + 25 * 60
    )  # the running workers' last accrual, 25 minutes into the last hour
    teams = ["search", "vision", "speech", "ads", "research", "infra", "growth", "risk"]
    apps: list[dict[str, Any]] = []
    fns: list[Fn] = []
    by_tier: dict[str, list[tuple[str, str, str, str, float, float | None]]] = defaultdict(list)
    for o in OFFERS:
        by_tier[o[3]].append(o)
    tiers = list(TIERS)
    for i in range(n_apps):
        app_id = _wid(rng, "ap")
        app_weight = rng.paretovariate(1.2)
        budget = None
        if rng.random() < budget_share:
            budget = {"max_total": float(rng.choice([500, 2000, 10000, 50000])), "period": "month"}
            if rng.random() < 0.5:
                budget["max_per_hour"] = float(rng.choice([20, 100, 400]))
        apps.append(
            {
                "id": app_id,
                "name": f"app-{i:04d}",
                "state": "deployed",
                "ephemeral": False,
                "created_at": START - 30 * DAY,
                "tags": {"team": rng.choice(teams), "env": rng.choice(["prod", "prod", "dev"])},
                "budget": budget,
            }
        )
        n_fns = rng.choice([1, 1, 2, 2, 3, 4])
        for j in range(n_fns):
            tier = rng.choices(tiers, weights=[TIERS[t] for t in tiers])[0]
            offers = by_tier[tier]
            if tier == "":
                offers = offers if rng.random() < 0.9 else [o for o in offers if o[0] == "local"]
            k = min(len(offers), rng.choice([1, 1, 2, 3]))
            chosen = rng.sample(offers, k)
            spot = 0.0 if all(o[5] is None for o in chosen) else rng.choice([0.0, 0.0, 0.3, 0.6, 0.9])
            fns.append(Fn(_wid(rng, "fn"), app_id, f"f{j}", chosen, spot, app_weight * rng.uniform(0.2, 1.0)))
    # lives: (share, low, high) seconds, log-uniform between
    lives = (
        (0.25, 20.0, 600.0),
        (0.45, 600.0, 4 * HOUR),
        (0.25, 4 * HOUR, 2 * DAY),
        (0.05, 2 * DAY, 20 * DAY),
    )
    fn_weights = [f.weight for f in fns]
    workers: list[Worker] = []
    expected = 0
    t_first = START
    while expected < rows:
        fn = rng.choices(fns, weights=fn_weights)[0]
        share = rng.random()
        for p, lo, hi in lives:  # noqa: B007 (the matched bucket is used after the loop)
            if share < p:
                break
            share -= p
        life = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        launch = rng.uniform(t_first, now - 1.0)
        stop = launch + life
        stopped = stop <= now
        end = stop if stopped else now
        cloud, region, itype, gpu, od, spot_ratio = rng.choice(fn.offers)
        market = "spot" if spot_ratio is not None and rng.random() < fn.spot_share else "on-demand"
        price = round(od * spot_ratio * rng.uniform(0.85, 1.15), 4) if market == "spot" and spot_ratio else od
        if cloud == "local":
            provider, cloud, price = "local", "", 0.0
        else:
            provider = cloud
        on_demand: float | None = od if market == "spot" else price
        if market == "spot" and rng.random() < 0.05:
            on_demand = None  # an offer that had no on-demand price at launch
        idle_from = None
        if stopped:
            idle_from = max(launch, stop - rng.uniform(0.0, 900.0))
        elif rng.random() < 0.3:
            idle_from = max(launch, now - rng.uniform(0.0, 900.0))
        top_up = billed_seconds(cloud, end - launch) - (end - launch) if stopped else 0.0
        w = Worker(
            _wid(rng, "wk"),
            fn,
            provider,
            cloud,
            region,
            itype,
            gpu,
            market,
            price,
            on_demand,
            launch,
            end,
            stopped,
            idle_from,
            top_up if top_up > 1e-9 else 0.0,
        )
        w.prefix = "\t".join(
            [
                w.id,
                fn.app_id,
                fn.id,
                provider,
                cloud,
                region,
                itype,
                gpu,
                str(_gpu_count(gpu)),
                market,
                repr(price),
                "\\N" if on_demand is None else repr(on_demand),
                "",
            ]
        )
        workers.append(w)
        expected += int((end - launch) // span_s) + 2 + (1 if w.top_up else 0)
    workers.sort(key=lambda w: w.launch)
    return Fleet(apps, fns, workers, now, span_s, expected)


def _gpu_count(tier: str) -> int:
    if not tier:
        return 0
    _, _, n = tier.partition(":")
    return int(n) if n.isdigit() else 1


def hour_rows(w: Worker, h0: float, h1: float, span_s: float, out: list[str]) -> int:
    """Append worker ``w``'s spans that start in ``[h0, h1)`` (COPY text lines) to ``out``; their number.

    Cut as the ledger cuts them: at each accrual tick (a multiple of ``span_s``), at each hour, at the stop;
    a running worker's first tick less than a second after its launch writes nothing (``plan``)."""
    a = max(w.launch, h0)
    b = min(w.end, h1)
    n = 0
    if b > a:
        price = w.price
        idle_from = w.idle_from
        prefix = w.prefix
        t = (math.floor(a / span_s) + 1) * span_s
        if w.launch >= h0 and t - w.launch < 1.0 and t < b and t % HOUR:
            t += span_s
        t0 = a
        while True:
            t1 = t if t < b else b
            sec = t1 - t0
            idle = max(0.0, t1 - max(t0, idle_from)) if idle_from is not None else 0.0
            cost = price * sec / HOUR
            out.append(f"{prefix}{t0!r}\t{t1!r}\t{sec!r}\t{idle!r}\t{cost!r}\tcompute\t{t1!r}\n")
            n += 1
            if t1 >= b:
                break
            t0 = t1
            t += span_s
    if w.stopped and w.top_up and h0 <= w.end < h1:
        e = w.end
        cost = w.price * w.top_up / HOUR
        out.append(f"{w.prefix}{e!r}\t{e!r}\t{w.top_up!r}\t0.0\t{cost!r}\tminimum\t{e!r}\n")
        n += 1
    return n


def span_chunks(fleet: Fleet) -> Iterator[tuple[str, int]]:
    """The ledger's spans an hour at a time, in time order: (COPY text, rows)."""
    workers = fleet.workers
    i = 0
    active: list[Worker] = []
    h0 = START
    while h0 < fleet.now:
        h1 = h0 + HOUR
        while i < len(workers) and workers[i].launch < h1:
            active.append(workers[i])
            i += 1
        out: list[str] = []
        n = 0
        for w in active:
            n += hour_rows(w, h0, h1, fleet.span_s, out)
        active = [w for w in active if w.end >= h1]
        yield "".join(out), n
        h0 = h1


# -- loading ----------------------------------------------------------------------------------------------------
ROLLUP_SQL = """
INSERT INTO ledger_hour (hour, app_id, function_id, gpu, cloud, market, cost, seconds, gpu_seconds,
                         idle_seconds, idle_cost, spot_cost, spot_on_demand_cost, minimum_cost, spans)
SELECT floor(t0 / 3600.0) * 3600.0, app_id, function_id, gpu, cloud, market,
       sum(cost), sum(seconds), sum(seconds * gpu_count), sum(idle_seconds),
       sum(price_per_hour * idle_seconds / 3600.0),
       sum(CASE WHEN market = 'spot' AND on_demand_per_hour IS NOT NULL THEN cost ELSE 0.0 END),
       sum(CASE WHEN market = 'spot' AND on_demand_per_hour IS NOT NULL
                THEN on_demand_per_hour * seconds / 3600.0 ELSE 0.0 END),
       sum(CASE WHEN kind = 'minimum' THEN cost ELSE 0.0 END),
       count(*)
FROM ledger_span {where}
GROUP BY 1, 2, 3, 4, 5, 6
"""
HOUR_SUMS = (
    "cost",
    "seconds",
    "gpu_seconds",
    "idle_seconds",
    "idle_cost",
    "spot_cost",
    "spot_on_demand_cost",
    "minimum_cost",
    "spans",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def scratch_database(base_url: str, keep: bool = False) -> Iterator[str]:
    """A new database on the server of ``base_url`` (dropped on the way out unless ``keep``)."""
    import psycopg

    name = "cm_bench_ledger_" + secrets.token_hex(4)
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base_url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        if keep:
            log(f"kept {url}")
        else:
            with psycopg.connect(base_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def control_plane(url: str, state_dir: Path) -> ControlPlane:
    from cloudmodal.server.service import ControlPlane, Settings

    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return ControlPlane(Settings(database_url=sa_url, state_dir=state_dir, retention_interval_s=1e12))


def load(url: str, fleet: Fleet, cp: ControlPlane) -> dict[str, Any]:
    """Apps, functions, workers and spans into the database at ``url`` (schema made by ``cp``), then the
    rollup; returns the figures of the load."""
    import psycopg
    from sqlalchemy import insert

    from cloudmodal.server import models

    figures: dict[str, Any] = {}
    t = time.perf_counter()
    with cp.db.write() as conn:
        conn.execute(insert(models.apps), fleet.apps)
        conn.execute(
            insert(models.functions),
            [
                {"id": f.id, "app_id": f.app_id, "name": f.name, "created_at": START - 30 * DAY}
                for f in fleet.functions
            ],
        )
    with psycopg.connect(url) as pg, pg.cursor() as cur:
        cols = ", ".join(WORKER_COPY_COLUMNS)
        with cur.copy(f"COPY worker ({cols}) FROM STDIN") as copy:
            buf: list[str] = []
            for w in fleet.workers:
                offer = {"cloud": w.cloud, "region": w.region, "instance_type": w.instance_type, "gpu": w.gpu}
                if w.market == "spot" and w.on_demand is not None:
                    offer["on_demand_per_hour"] = w.on_demand  # type: ignore[assignment]
                buf.append(
                    "\t".join(
                        [
                            w.id,
                            w.fn.app_id,
                            w.fn.id,
                            w.provider,
                            "i-" + w.id[3:],
                            "stopped" if w.stopped else "ready",
                            "1",
                            repr(w.launch),
                            repr(w.end),
                            "0",
                            repr(w.end) if w.stopped else "\\N",
                            "\\N" if w.idle_from is None else repr(w.idle_from),
                            json.dumps(offer),
                            w.market,
                            repr(w.price),
                            w.gpu or "\\N",
                            "",
                            repr(w.launch),
                            repr(w.end),
                            "t" if w.stopped else "f",
                        ]
                    )
                    + "\n"
                )
                if len(buf) >= 10_000:
                    copy.write("".join(buf))
                    buf.clear()
            copy.write("".join(buf))
        pg.commit()
    figures["workers"] = len(fleet.workers)
    figures["workers_running"] = sum(not w.stopped for w in fleet.workers)
    log(f"apps, functions, {len(fleet.workers):,} workers in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    rows = 0
    gen_s = 0.0
    with psycopg.connect(url) as pg, pg.cursor() as cur:
        # secondary indexes off for the load, rebuilt from their own definitions after it
        cons = cur.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'ledger_span'::regclass AND contype = 'u'"
        ).fetchall()
        idx = cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'ledger_span' "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'ledger_span'::regclass)"
        ).fetchall()
        for name, _ in cons:
            cur.execute(f"ALTER TABLE ledger_span DROP CONSTRAINT {name}")
        for name, _ in idx:
            cur.execute(f"DROP INDEX {name}")
        pg.commit()
        cols = ", ".join(SPAN_COLUMNS)
        with cur.copy(f"COPY ledger_span ({cols}) FROM STDIN") as copy:
            g = time.perf_counter()
            for text, n in span_chunks(fleet):
                gen_s += time.perf_counter() - g
                copy.write(text)
                rows += n
                if rows // 1_000_000 != (rows - n) // 1_000_000:
                    log(f"  {rows:,} spans")
                g = time.perf_counter()
        pg.commit()
        figures["copy_s"] = time.perf_counter() - t
        figures["generate_s"] = gen_s
        log(f"{rows:,} spans copied in {figures['copy_s']:.1f} s ({gen_s:.1f} s of it generating)")
        t = time.perf_counter()
        cur.execute("SET maintenance_work_mem = '512MB'")
        for name, definition in cons:
            cur.execute(f"ALTER TABLE ledger_span ADD CONSTRAINT {name} {definition}")
        for _name, definition in idx:
            cur.execute(definition)
        pg.commit()
        figures["index_s"] = time.perf_counter() - t
        log(f"span indexes rebuilt in {figures['index_s']:.1f} s")
        t = time.perf_counter()
        cur.execute(ROLLUP_SQL.format(where=""))
        pg.commit()
        figures["rollup_s"] = time.perf_counter() - t
        log(f"rollup built in {figures['rollup_s']:.1f} s")
    t = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("VACUUM (ANALYZE) ledger_span")
        pg.execute("VACUUM (ANALYZE) ledger_hour")
        pg.execute("VACUUM (ANALYZE) worker")
        sizes = pg.execute(
            "SELECT (SELECT count(*) FROM ledger_span), (SELECT count(*) FROM ledger_hour), "
            "(SELECT count(*) FROM ledger_span WHERE kind = 'minimum'), "
            "pg_total_relation_size('ledger_span'), pg_total_relation_size('ledger_hour')"
        ).fetchone()
    assert sizes is not None
    figures["vacuum_s"] = time.perf_counter() - t
    figures["spans"], figures["hour_rows"], figures["minimum_spans"] = sizes[0], sizes[1], sizes[2]
    figures["span_bytes"], figures["hour_bytes"] = sizes[3], sizes[4]
    if sizes[0] != rows:
        raise SystemExit(f"copied {rows} spans but the table has {sizes[0]}")
    log(f"vacuum analyze in {figures['vacuum_s']:.1f} s")
    return figures


def check_rollup(cp: ControlPlane, n_hours: int, rng: random.Random) -> dict[str, Any]:
    """Rebuild ``n_hours`` sampled hours through ``ledger._add_to_hour`` (the per-span upsert the ledger
    runs) and compare with the bulk rollup's rows; rolled back."""
    from sqlalchemy import text

    from cloudmodal.server.ledger import HOUR as HOUR_T
    from cloudmodal.server.ledger import SPAN, _add_to_hour

    with cp.db.read() as conn:
        hours = [r[0] for r in conn.execute(text("SELECT DISTINCT hour FROM ledger_hour ORDER BY hour"))]
    picked = rng.sample(hours[len(hours) // 4 :], min(n_hours, len(hours)))
    compared = spans = 0
    worst = 0.0
    for h in picked:
        with cp.db.engine.connect() as conn:
            tx = conn.begin()
            key = ("app_id", "function_id", "gpu", "cloud", "market")
            bulk = {
                tuple(r[k] for k in key): r
                for r in conn.execute(HOUR_T.select().where(HOUR_T.c.hour == h)).mappings()
            }
            conn.execute(HOUR_T.delete().where(HOUR_T.c.hour == h))
            for m in conn.execute(SPAN.select().where(SPAN.c.t0 >= h, SPAN.c.t0 < h + HOUR)).mappings().all():
                _add_to_hour(conn, False, dict(m))
                spans += 1
            again = {
                tuple(r[k] for k in key): r
                for r in conn.execute(HOUR_T.select().where(HOUR_T.c.hour == h)).mappings()
            }
            tx.rollback()
        if bulk.keys() != again.keys():
            raise SystemExit(f"rollup check: hour {h} has other keys built span by span")
        for k, r in bulk.items():
            for s in HOUR_SUMS:
                a, b = float(r[s]), float(again[k][s])
                diff = abs(a - b) / max(1.0, abs(a))
                worst = max(worst, diff)
                if diff > 1e-9:
                    raise SystemExit(f"rollup check: hour {h} {k} {s}: bulk {a} vs per span {b}")
            compared += 1
    return {"hours": len(picked), "rollup_rows": compared, "spans": spans, "worst_rel_diff": worst}


# -- reports ----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    by: str
    since: float
    until: float
    app: str | None = None
    app_id: str | None = None


NAIVE_SQL = """
SELECT {key} AS k, sum(cost * CASE
         WHEN t1 <= t0 THEN CASE WHEN t0 >= %(since)s AND t0 < %(until)s THEN 1.0 ELSE 0.0 END
         ELSE greatest(0.0, least(t1, %(until)s) - greatest(t0, %(since)s)) / (t1 - t0) END)
FROM ledger_span
WHERE t0 < %(until)s AND t0 >= %(lo)s {app}
GROUP BY 1
"""


def naive(url: str, c: Case) -> dict[str, float]:
    """The report's cost summed straight from the spans: each span's share inside the range (the same
    arithmetic as ``cost_report.overlap``), one statement."""
    import psycopg

    key = {"app": "app_id", "function": "function_id", "day": "floor(t0 / 86400.0)"}[c.by]
    sql = NAIVE_SQL.format(key=key, app="AND app_id = %(app_id)s" if c.app_id else "")
    params = {"since": c.since, "until": c.until, "lo": math.floor(c.since / HOUR) * HOUR, "app_id": c.app_id}
    with psycopg.connect(url) as conn:
        return {str(k): float(v) for k, v in conn.execute(sql, params).fetchall()}


@dataclass
class Recorded:
    statement: str
    parameters: Any
    seconds: float
    rows: int


@contextmanager
def recording(cp: ControlPlane) -> Iterator[list[Recorded]]:
    """Every statement the control plane's engine runs meanwhile, with its time."""
    from sqlalchemy import event

    out: list[Recorded] = []
    started: dict[int, float] = {}

    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        started[id(cursor)] = time.perf_counter()

    def after(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        t = time.perf_counter() - started.pop(id(cursor), time.perf_counter())
        out.append(Recorded(statement, parameters, t, cursor.rowcount))

    event.listen(cp.db.engine, "before_cursor_execute", before)
    event.listen(cp.db.engine, "after_cursor_execute", after)
    try:
        yield out
    finally:
        event.remove(cp.db.engine, "before_cursor_execute", before)
        event.remove(cp.db.engine, "after_cursor_execute", after)


def explain(cp: ControlPlane, r: Recorded) -> list[str]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of a recorded statement, as compact lines (one per plan node)."""
    with cp.db.engine.connect() as conn:
        raw = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + r.statement, r.parameters)
        doc = raw.scalar()
    plan: dict[str, Any] = (json.loads(doc) if isinstance(doc, str) else doc or [{}])[0]
    lines = [f"execution {plan['Execution Time']:.1f} ms, planning {plan['Planning Time']:.1f} ms"]

    def walk(node: dict[str, Any], depth: int) -> None:
        what = node["Node Type"]
        if node.get("Strategy") and node["Node Type"] == "Aggregate":
            what = f"{node['Strategy']} Aggregate"
        if "Index Name" in node:
            what += f" using {node['Index Name']}"
        if "Relation Name" in node:
            what += f" on {node['Relation Name']}"
        cond = node.get("Index Cond") or node.get("Recheck Cond") or node.get("Filter")
        loops = node.get("Actual Loops", 1)
        bufs = f"hit {node.get('Shared Hit Blocks', 0)} read {node.get('Shared Read Blocks', 0)}"
        extra = (
            f" removed by filter {node['Rows Removed by Filter']:,}"
            if node.get("Rows Removed by Filter")
            else ""
        )
        lines.append(
            f"{'  ' * depth}{what}: rows {node.get('Actual Rows', 0) * loops:,}{extra}, "
            f"{node.get('Actual Total Time', 0.0):.1f} ms, {bufs}" + (f"  [{cond[:110]}]" if cond else "")
        )
        for child in node.get("Plans", []):
            walk(child, depth + 1)

    walk(plan["Plan"], 1)
    return lines


def short_sql(statement: str) -> str:
    s = " ".join(statement.split())
    if " IN (" in s:  # an expanded list of app ids
        head, _, tail = s.partition(" IN (")
        n = tail.split(")", 1)[0].count(",") + 1
        s = f"{head} IN ({n} ids){tail.split(')', 1)[1] if ')' in tail else ''}"
    return s if len(s) <= 200 else s[:197] + "..."


def report_cases(fleet: Fleet, biggest_app: dict[str, Any]) -> list[Case]:
    now = fleet.now
    first = START
    days = (now - first) / DAY
    cases = [
        Case("last 7 days by app", "app", now - 7 * DAY, now),
        Case("last 30 days by day", "day", now - min(30, days) * DAY, now),
        Case(
            f"last 30 days by function, {biggest_app['name']}",
            "function",
            now - min(30, days) * DAY,
            now,
            biggest_app["name"],
            biggest_app["id"],
        ),
        Case("unaligned range by app", "app", now - days * 0.6 * DAY + 1234.567, now - 2 * DAY - 777.7),
        Case("whole ledger by app", "app", first, now),
    ]
    return cases


def time_reports(
    url: str, cp: ControlPlane, fleet: Fleet, repeat: int, explain_top: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from cloudmodal.server.cost_report import CostReports

    reports = CostReports(cp)
    # the app with the most spans: the biggest report by function
    app_rows: dict[str, float] = defaultdict(float)
    for w in fleet.workers:
        app_rows[w.fn.app_id] += w.end - w.launch
    big_id = max(app_rows, key=lambda a: app_rows[a])
    biggest = next(a for a in fleet.apps if a["id"] == big_id)
    names = {a["id"]: a["name"] for a in fleet.apps}
    fn_names = {f.id: f"{names[f.app_id]}/{f.name}" for f in fleet.functions}
    results: list[dict[str, Any]] = []
    plans: list[dict[str, Any]] = []
    for c in report_cases(fleet, biggest):
        runs: list[float] = []
        naive_runs: list[float] = []
        out: dict[str, Any] = {}
        peer: dict[str, float] = {}
        statements: list[Recorded] = []
        for i in range(repeat):
            # alternate which goes first: neither always finds the other's pages in the cache
            order = ("report", "naive") if i % 2 == 0 else ("naive", "report")
            for which in order:
                if which == "report":
                    with recording(cp) as rec:
                        t = time.perf_counter()
                        out = reports.report(by=c.by, since=c.since, until=c.until, app=c.app, now=fleet.now)
                        runs.append(time.perf_counter() - t)
                    if i == repeat - 1:
                        statements = rec
                else:
                    t = time.perf_counter()
                    peer = naive(url, c)
                    naive_runs.append(time.perf_counter() - t)
        # the same cost both ways, to the cent
        peer_total = sum(peer.values())
        total = out["total"]["cost"]
        agree = abs(total - peer_total) < 0.005
        group_diff = 0.0
        if c.by in ("app", "function"):
            keyed = {(names if c.by == "app" else fn_names).get(k, k): v for k, v in peer.items()}
            got = {g["key"]: g["cost"] for g in out["groups"]}
            for k in set(keyed) | set(got):
                group_diff = max(group_diff, abs(keyed.get(k, 0.0) - got.get(k, 0.0)))
            agree = agree and group_diff < 0.005
        elif c.by == "day":
            got_days = {g["key"]: g["cost"] for g in out["groups"]}
            keyed = {time.strftime("%Y-%m-%d", time.gmtime(float(k) * DAY)): v for k, v in peer.items()}
            for k in set(keyed) | set(got_days):
                group_diff = max(group_diff, abs(keyed.get(k, 0.0) - got_days.get(k, 0.0)))
            agree = agree and group_diff < 0.005
        by_stmt: dict[str, list[Recorded]] = defaultdict(list)
        for r in statements:
            by_stmt[short_sql(r.statement)].append(r)
        breakdown = sorted(
            (
                {
                    "sql": k,
                    "count": len(v),
                    "ms": sum(r.seconds for r in v) * 1000,
                    "rows": sum(max(r.rows, 0) for r in v),
                }
                for k, v in by_stmt.items()
            ),
            key=lambda d: -float(d["ms"]),
        )
        results.append(
            {
                "case": c.name,
                "by": c.by,
                "since": c.since,
                "until": c.until,
                "report_s": runs,
                "naive_s": naive_runs,
                "report_min_s": min(runs),
                "report_median_s": statistics.median(runs),
                "naive_min_s": min(naive_runs),
                "naive_median_s": statistics.median(naive_runs),
                "total_cost": total,
                "naive_total_cost": peer_total,
                "max_group_diff": group_diff,
                "agree": agree,
                "groups": len(out["groups"]),
                "budgets": len(out["budgets"]),
                "statements": len(statements),
                "statement_ms": sum(r.seconds for r in statements) * 1000,
                "breakdown": breakdown[:6],
            }
        )
        log(
            f"{c.name}: report median {statistics.median(runs) * 1000:.0f} ms, naive "
            f"{statistics.median(naive_runs) * 1000:.0f} ms, ${total:,.2f} vs ${peer_total:,.2f}"
        )
        # the slowest statements of this report, explained once
        if explain_top:
            slow = sorted(statements, key=lambda r: -r.seconds)
            seen: set[str] = set()
            for r in slow:
                k = short_sql(r.statement)
                if k in seen or not k.upper().startswith("SELECT"):
                    continue
                seen.add(k)
                plans.append({"case": c.name, "sql": k, "ms": r.seconds * 1000, "plan": explain(cp, r)})
                if len(seen) >= explain_top:
                    break
    # the naive plan of the biggest case, for the record
    c = report_cases(fleet, biggest)[0]
    key_sql = NAIVE_SQL.format(key="app_id", app="")
    params = {"since": c.since, "until": c.until, "lo": math.floor(c.since / HOUR) * HOUR}
    plans.append(
        {
            "case": f"naive: {c.name}",
            "sql": short_sql(key_sql),
            "ms": 0.0,
            "plan": explain(cp, Recorded(key_sql, params, 0.0, 0)),
        }
    )
    return results, plans


# -- accrual ----------------------------------------------------------------------------------------------------
def time_accrual(cp: ControlPlane, n: int, seed: int) -> list[dict[str, Any]]:
    """``Ledger.accrue()`` over ``n`` running workers: first accrual, steady (+30 s), last after a stop."""
    from sqlalchemy import func, insert, select, update

    from cloudmodal.server import models
    from cloudmodal.server.ledger import Ledger
    from cloudmodal.server.models_ledger import LedgerSpan

    rng = random.Random(seed)
    W = models.workers
    t_launch = START + 10 * DAY + 1000.0
    app_id, fn_id = _wid(rng, "ap"), _wid(rng, "fn")
    with cp.db.write() as conn:
        conn.execute(insert(models.apps).values(id=app_id, name="accrual-bench", state="deployed"))
        conn.execute(insert(models.functions).values(id=fn_id, app_id=app_id, name="f"))
        rows = []
        for i in range(n):
            cloud, region, itype, gpu, od, spot = OFFERS[i % (len(OFFERS) - 1)]
            market = "spot" if spot is not None and i % 3 == 0 else "on-demand"
            price = od * spot if market == "spot" and spot else od
            offer: dict[str, Any] = {"cloud": cloud, "region": region, "instance_type": itype, "gpu": gpu}
            if market == "spot":
                offer["on_demand_per_hour"] = od
            rows.append(
                {
                    "id": f"wk-accrual-{i:06d}",
                    "app_id": app_id,
                    "function_id": fn_id,
                    "provider": cloud,
                    "state": "ready",
                    "started_at": t_launch,
                    "launched_at": t_launch + rng.uniform(0.0, 5.0),
                    "offer": offer,
                    "market": market,
                    "price_per_hour": price,
                    "gpu": gpu or None,
                }
            )
        conn.execute(insert(W), rows)
    ledger = Ledger(cp)
    out: list[dict[str, Any]] = []
    now = t_launch + 95.0
    for step in (
        "first accrual (launch to now)",
        "steady accrual (+30 s)",
        "last accrual (stopped, minimums)",
    ):
        if step.startswith("last"):
            with cp.db.write() as conn:
                conn.execute(
                    update(W).where(W.c.app_id == app_id).values(state="stopped", stopped_at=now - 4.5)
                )
        t = time.perf_counter()
        written = ledger.accrue(now=now)
        dt = time.perf_counter() - t
        out.append(
            {"step": step, "workers": n, "spans": written, "seconds": dt, "us_per_worker": dt / n * 1e6}
        )
        now += 30.0
    with cp.db.read() as conn:
        in_table = conn.execute(
            select(func.count()).select_from(LedgerSpan.__table__)  # type: ignore[attr-defined]
        ).scalar()
        still_open = conn.execute(
            select(func.count()).select_from(W).where(W.c.billing_closed.is_(False))
        ).scalar()
    if in_table != sum(r["spans"] for r in out) or still_open:
        raise SystemExit(f"accrual: {in_table} spans in the table, {still_open} workers still open: {out}")
    return out


# -- output -----------------------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        + " |"
        for r in rows
    ]
    return "\n".join([line, sep, *body])


def ms(s: float) -> str:
    return f"{s * 1000:,.1f}"


def print_reports(reports: list[dict[str, Any]], plans: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title} (ms; naive: one SUM over ledger_span):\n")
    rows = []
    for r in reports:
        rows.append(
            [
                r["case"],
                ms(r["report_min_s"]),
                ms(r["report_median_s"]),
                ms(r["naive_min_s"]),
                ms(r["naive_median_s"]),
                f"{r['naive_median_s'] / r['report_median_s']:.1f}×",
                f"{r['total_cost']:,.2f}",
                "yes" if r["agree"] else f"NO ({r['max_group_diff']:.4f})",
                f"{r['statements']} / {r['statement_ms']:.0f}",
            ]
        )
    headers = ["report", "min", "median", "naive min", "naive median", "naive ÷ report", "total $"]
    print(table([*headers, "same to the cent", "statements / ms"], rows))
    print("\nWhere each report's time goes (its last run; statements by total time):")
    for r in reports:
        print(f"\n  {r['case']} ({r['groups']} groups, {r['budgets']} budgets):")
        for b in r["breakdown"][:4]:
            print(f"    {b['ms']:8.1f} ms  ×{b['count']:<4} rows {b['rows']:>8,}  {b['sql']}")
    print("\nPlans (EXPLAIN ANALYZE, BUFFERS) of the slowest statements:")
    for pl in plans:
        print(f"\n  {pl['case']}: {pl['sql']}")
        for line in pl["plan"]:
            print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=10_000_000, help="ledger spans to make (about)")
    p.add_argument("--quick", action="store_true", help="200,000 spans, 50 apps, 14 days, fewer repeats")
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--apps", type=int, default=500)
    p.add_argument("--span-s", type=float, default=120.0, help="accrual tick: spans' length (divides 3600)")
    p.add_argument("--budget-share", type=float, default=0.1, help="share of apps with a budget")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--explain", type=int, default=2, help="slowest statements explained per report")
    p.add_argument("--accrual-workers", type=int, default=2000)
    p.add_argument("--check-hours", type=int, default=3, help="hours rebuilt span by span for the check")
    p.add_argument("--database-url", default=DEFAULT_URL)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--also-index",
        action="append",
        default=[],
        metavar="SQL",
        help="after the reports, run this DDL on the big database (a proposed index) and time them again",
    )
    p.add_argument("--keep", action="store_true", help="keep the big database")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    a.database_url = a.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    if a.quick:
        a.rows = min(a.rows, 200_000) if "--rows" not in (argv or sys.argv) else a.rows
        a.apps, a.days, a.repeat, a.accrual_workers, a.check_hours = 50, 14, 2, 100, 2
    try:
        import psycopg

        psycopg.connect(a.database_url, connect_timeout=3).close()
    except Exception as e:
        print(f"PostgreSQL at {a.database_url} does not answer ({type(e).__name__}: {e})", file=sys.stderr)
        return 2

    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}}
    t = time.perf_counter()
    fleet = make_fleet(a.rows, a.days, a.apps, a.span_s, a.budget_share, a.seed)
    log(
        f"fleet: {len(fleet.apps)} apps, {len(fleet.functions)} functions, {len(fleet.workers):,} workers, "
        f"~{fleet.expected_rows:,} spans ({time.perf_counter() - t:.1f} s)"
    )
    with tempfile.TemporaryDirectory() as tmp, scratch_database(a.database_url, a.keep) as url:
        cp = control_plane(url, Path(tmp) / "big")
        try:
            result["load"] = load(url, fleet, cp)
            t = time.perf_counter()
            result["rollup_check"] = check_rollup(cp, a.check_hours, random.Random(a.seed))
            log(f"rollup check: {result['rollup_check']} ({time.perf_counter() - t:.1f} s)")
            result["reports"], result["plans"] = time_reports(url, cp, fleet, a.repeat, a.explain)
            if a.also_index:
                import psycopg

                with psycopg.connect(url, autocommit=True) as conn:
                    for ddl in a.also_index:
                        t = time.perf_counter()
                        conn.execute(ddl.encode())
                        log(f"{ddl} ({time.perf_counter() - t:.1f} s)")
                    conn.execute("ANALYZE ledger_span")
                result["reports_indexed"], result["plans_indexed"] = time_reports(
                    url, cp, fleet, a.repeat, a.explain
                )
        finally:
            cp.db.dispose()
        accrual: dict[str, list[dict[str, Any]]] = {}
        with scratch_database(a.database_url) as small:
            cp = control_plane(small, Path(tmp) / "pg")
            try:
                accrual["postgresql"] = time_accrual(cp, a.accrual_workers, a.seed)
            finally:
                cp.db.dispose()
        cp = control_plane(f"sqlite:///{Path(tmp) / 'accrual.db'}", Path(tmp) / "sqlite")
        try:
            accrual["sqlite"] = time_accrual(cp, a.accrual_workers, a.seed)
        finally:
            cp.db.dispose()
        result["accrual"] = accrual

    ld = result["load"]
    print(
        f"\nLedger: {ld['spans']:,} spans ({ld['minimum_spans']:,} billing minimums) of {ld['workers']:,} workers "
        f"({ld['workers_running']:,} running at the end), {len(fleet.apps)} apps, {len(fleet.functions)} "
        f"functions, {a.days} days, accrual tick {a.span_s:g} s; rollup {ld['hour_rows']:,} hour rows. "
        f"Sizes with indexes: spans {ld['span_bytes'] / 2**30:.2f} GiB, rollup {ld['hour_bytes'] / 2**20:.1f} MiB."
    )
    print(
        f"Load: COPY {ld['copy_s']:.0f} s ({ld['generate_s']:.0f} s of it generating rows in Python), "
        f"indexes {ld['index_s']:.0f} s, rollup INSERT ... SELECT {ld['rollup_s']:.0f} s, "
        f"VACUUM ANALYZE {ld['vacuum_s']:.0f} s."
    )
    rc = result["rollup_check"]
    print(
        f"Rollup check: {rc['hours']} hours ({rc['spans']:,} spans, {rc['rollup_rows']:,} rollup rows) rebuilt "
        f"through ledger._add_to_hour equal the bulk rollup (worst relative difference {rc['worst_rel_diff']:.1e})."
    )
    print_reports(result["reports"], result["plans"], f"Reports on PostgreSQL, {a.repeat} runs each")
    if a.also_index:
        print_reports(
            result["reports_indexed"],
            result["plans_indexed"],
            f"The same reports after {'; '.join(a.also_index)}",
        )
    print(
        "\nAccrual: Ledger.accrue(), 200 workers to a transaction (compare-and-swap, spans, rollup upserts):\n"
    )
    rows = []
    for db, steps in result["accrual"].items():
        for s in steps:
            rows.append([db, s["step"], f"{s['workers']:,}", f"{s['spans']:,}", f"{s['us_per_worker']:,.0f}"])
    print(table(["database", "accrual", "workers", "spans written", "µs per worker"], rows))
    bad = [r["case"] for r in [*result["reports"], *result.get("reports_indexed", [])] if not r["agree"]]
    if bad:
        print(f"\nREPORT AND NAIVE SUM DISAGREE: {bad}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
