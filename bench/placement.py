"""Placement benchmark: cloudmodal's ranking vs SkyPilot's optimizer on the same catalog.

Run with the bench venv (SkyPilot 0.14.1 lives there, never in .venv)::

    .venv-bench/bin/python bench/placement.py [--catalog-dir DIR] [--tiers H100:8 A100-80GB:8 A100-40GB:8]

Cold = a fresh subprocess (interpreter start, imports, catalog load, one ranking), median of ``--cold-reps``.
Warm = median of many rankings in one process with everything loaded. Both tools rank on-demand offers
(SkyPilot's default market). SkyPilot runs offline as TESTING.md's checked recipe says: a sandbox HOME with
the catalogs copied to ``$HOME/.sky/catalogs/v8``, the clouds marked enabled by patching
``sky.check.get_cached_enabled_clouds_or_refresh``, and AWS's zone-id mapping (which shells out to the AWS
CLI) patched to the identity. Nothing here reaches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIERS = ("H100:8", "A100-80GB:8", "A100-40GB:8")
# cloudmodal's canonical names -> SkyPilot's accelerator names that we fold into them (SkyPilot matches
# names exactly; "A100" there is our A100-40GB).
SKY_NAMES: dict[str, tuple[str, ...]] = {
    "H100": ("H100", "H100-SXM", "H100-MEGA"),
    "A100-80GB": ("A100-80GB", "A100-80GB-SXM"),
    "A100-40GB": ("A100",),
    "H200": ("H200", "H200-SXM"),
}


def default_catalog_dir() -> Path:
    """``CLOUDMODAL_CATALOG_DIR``, else the shared snapshot beside the repository (``../shared``)."""
    return Path(
        os.environ.get("CLOUDMODAL_CATALOG_DIR") or REPO.parent / "shared" / "pricing" / "catalogs" / "v8"
    )


# --- cloudmodal ------------------------------------------------------------------------------------------

CM_COLD = """
import json, sys, time
t0 = time.perf_counter()
from cloudmodal.gpu import parse_gpu
from cloudmodal.placement import PlacementPolicy, rank
from cloudmodal.pricing.catalog import load_offer_table
t1 = time.perf_counter()
table = load_offer_table(sys.argv[1])
t2 = time.perf_counter()
p = rank(parse_gpu(sys.argv[2:]), table, policy=PlacementPolicy(spot="never"))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "rank": t3 - t2, "price": p.best.price, "n": len(p.candidates)}))
"""

SKY_COLD = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import placement as bench
sky = bench.sky_setup()
t1 = time.perf_counter()
price, _ = bench.sky_optimize(sky, sys.argv[2:])
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "optimize": t2 - t1, "price": price}))
"""


def run_cold(
    code: str, args: list[str], env: dict[str, str], reps: int
) -> tuple[list[float], dict[str, Any]]:
    """Wall time of ``reps`` fresh interpreters running ``code``; also the last run's own report."""
    walls: list[float] = []
    report: dict[str, Any] = {}
    for _ in range(reps):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        walls.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise SystemExit(f"cold run failed:\n{out.stderr[-3000:]}")
        report = json.loads(out.stdout.strip().splitlines()[-1])
    return walls, report


def cloudmodal_warm(catalog: Path, tiers: list[str], reps: int) -> tuple[list[float], float, int, str]:
    from cloudmodal.gpu import parse_gpu
    from cloudmodal.placement import PlacementPolicy, rank
    from cloudmodal.pricing.catalog import load_offer_table

    table = load_offer_table(catalog)
    parsed = parse_gpu(tiers)
    policy = PlacementPolicy(spot="never")
    p = rank(parsed, table, policy=policy)  # builds the per-(GPU, count) sorted lists once
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rank(parsed, table, policy=policy)
        times.append(time.perf_counter() - t0)
    assert p.best is not None
    o = p.best.offer
    return times, p.best.price, len(p.candidates), f"{o.cloud} {o.location} {o.instance_type}"


# --- SkyPilot --------------------------------------------------------------------------------------------


def sky_sandbox(catalog: Path) -> Path:
    """A HOME for SkyPilot with the catalogs where it looks for them (no .meta md5: it never re-downloads)."""
    home = Path(tempfile.mkdtemp(prefix="cm-bench-sky-"))
    shutil.copytree(catalog, home / ".sky" / "catalogs" / "v8")
    return home


def sky_setup() -> Any:
    """Import sky offline with every catalog cloud enabled. HOME must already point at a sandbox."""
    os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    import sky
    from sky import check as sky_check
    from sky.catalog import aws_catalog

    catalogs = Path(os.environ["HOME"]) / ".sky" / "catalogs" / "v8"
    names = {"aws": "AWS", "gcp": "GCP", "azure": "Azure", "lambda": "Lambda", "runpod": "RunPod"}
    enabled = [
        sky.CLOUD_REGISTRY.from_str(names[p.name]) for p in sorted(catalogs.iterdir()) if p.name in names
    ]
    # Private seams (pinned to skypilot 0.14.1): no credentials here, so say the clouds are enabled ...
    sky_check.get_cached_enabled_clouds_or_refresh = lambda *a, **k: list(enabled)
    # ... and keep AWS zone ids as they are instead of asking the AWS CLI for this account's mapping.
    aws_catalog._fetch_and_apply_az_mapping = lambda df: df  # noqa: SLF001
    return sky


def _sky_dag(sky: Any, resources: list[Any] | set[Any]) -> Any:
    from sky.utils import dag_utils

    task = sky.Task(run="true")
    task.set_resources(resources)
    return dag_utils.convert_entrypoint_to_dag(task)


def sky_optimize(sky: Any, tiers: list[str]) -> tuple[float, Any]:
    """SkyPilot's pick for the tiers as an ordered list (its name for each of our types): ($/h, resources)."""
    res = []
    for t in tiers:
        name, _, count = t.partition(":")
        res.append(sky.Resources(accelerators={SKY_NAMES.get(name, (name,))[0]: int(count or 1)}))
    dag = _sky_dag(sky, res)
    sky.Optimizer.optimize(dag, quiet=True)
    best = dag.tasks[0].best_resources
    return best.get_cost(3600), best


def sky_cheapest_of(sky: Any, tier: str) -> tuple[float, Any]:
    """SkyPilot's cheapest offer among every name we fold into the tier's type (a set = cheapest of)."""
    name, _, count = tier.partition(":")
    res = {sky.Resources(accelerators={n: int(count or 1)}) for n in SKY_NAMES.get(name, (name,))}
    dag = _sky_dag(sky, res)
    sky.Optimizer.optimize(dag, quiet=True)
    best = dag.tasks[0].best_resources
    return best.get_cost(3600), best


def _where(r: Any) -> str:
    return f"{r.cloud} {r.region}/{r.zone or '-'} {r.instance_type}"


def sky_warm(tiers: list[str], reps: int) -> dict[str, Any]:
    import contextlib
    import io
    import logging

    sky = sky_setup()
    logging.disable(logging.WARNING)
    # SkyPilot's spinner writes control lines to stdout in-process; keep them out of the report.
    with contextlib.redirect_stdout(io.StringIO()):
        price, best = sky_optimize(sky, tiers)  # warm-up: loads the catalogs
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sky_optimize(sky, tiers)
            times.append(time.perf_counter() - t0)
        cheapest, cbest = sky_cheapest_of(sky, tiers[0])
    return {
        "warm_ms": _ms(times),
        "ordered_list_price": price,
        "ordered_list_pick": _where(best),
        "first_tier_cheapest_price": cheapest,
        "first_tier_cheapest": _where(cbest),
    }


# --- report ----------------------------------------------------------------------------------------------


def _ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog-dir", type=Path, default=default_catalog_dir())
    ap.add_argument("--tiers", nargs="+", default=list(DEFAULT_TIERS))
    ap.add_argument("--cold-reps", type=int, default=5)
    ap.add_argument("--warm-reps", type=int, default=2000, help="cloudmodal warm rankings")
    ap.add_argument("--sky-warm-reps", type=int, default=20)
    ap.add_argument("--skip-sky", action="store_true", help="only cloudmodal (no SkyPilot installed)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    catalog: Path = args.catalog_dir.resolve()
    if not (catalog / "aws" / "vms.csv").is_file():
        raise SystemExit(f"No catalog at {catalog}: pass --catalog-dir or set CLOUDMODAL_CATALOG_DIR.")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"catalog: {catalog}\ntiers: {' '.join(args.tiers)} (on-demand)", highlight=False)
    env = {k: v for k, v in os.environ.items() if k != "CLOUDMODAL_CATALOG_DIR"}

    cm_cold, cm_report = run_cold(CM_COLD, [str(catalog), *args.tiers], env, args.cold_reps)
    cm_warm, cm_price, cm_n, cm_pick = cloudmodal_warm(catalog, args.tiers, args.warm_reps)
    results: dict[str, Any] = {
        "tiers": args.tiers,
        "cloudmodal": {
            "cold_ms": _ms(cm_cold),
            "cold_parts_ms": {k: v * 1000 for k, v in cm_report.items() if k in ("import", "load", "rank")},
            "warm_ms": _ms(cm_warm),
            "first_price": cm_price,
            "first_pick": cm_pick,
            "candidates": cm_n,
        },
    }
    if not args.skip_sky:
        home = sky_sandbox(catalog)
        old_home = os.environ.get("HOME")
        os.environ["HOME"] = str(home)
        try:
            sky_env = {**env, "HOME": str(home), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
            sky_env["AWS_EC2_METADATA_DISABLED"] = "true"
            sky_cold, _ = run_cold(SKY_COLD, [str(REPO / "bench"), *args.tiers], sky_env, args.cold_reps)
            sky_results = sky_warm(args.tiers, args.sky_warm_reps)
        finally:
            if old_home is not None:
                os.environ["HOME"] = old_home
            shutil.rmtree(home, ignore_errors=True)
        results["skypilot"] = {"cold_ms": _ms(sky_cold), **sky_results}

    t = Table(title="Placement: 3-tier request over the full catalog (median)", title_justify="left")
    for col in ("", "cloudmodal", "SkyPilot 0.14.1", "SkyPilot / cloudmodal"):
        t.add_column(col, justify="right" if col else "left")
    sp = results.get("skypilot")
    cm = results["cloudmodal"]

    def row(label: str, a: float, b: float | None, unit: str = "ms") -> None:
        fmt = (lambda x: f"{x:.3f} {unit}") if a < 1 else (lambda x: f"{x:.1f} {unit}")
        t.add_row(
            label, fmt(a), "-" if b is None else f"{b:.1f} {unit}", "-" if b is None else f"{b / a:,.0f}×"
        )

    row("cold (new process: import + load + rank)", cm["cold_ms"], sp["cold_ms"] if sp else None)
    row("warm (one ranking)", cm["warm_ms"], sp["warm_ms"] if sp else None)
    console.print(t)
    parts = cm["cold_parts_ms"]
    console.print(
        f"cloudmodal cold parts: import {parts['import']:.1f} ms, load {parts['load']:.1f} ms, "
        f"rank {parts['rank']:.2f} ms; {cm['candidates']} ranked candidates.",
        highlight=False,
    )
    first = args.tiers[0]
    console.print(
        f"first tier {first}, cheapest on-demand: cloudmodal ${cm['first_price']:.4f}/h ({cm['first_pick']})",
        highlight=False,
    )
    if sp:
        same = abs(sp["ordered_list_price"] - cm["first_price"]) < 1e-6
        results["same_first_price"] = same
        console.print(
            f"  SkyPilot (ordered list): ${sp['ordered_list_price']:.4f}/h ({sp['ordered_list_pick']}) -> "
            f"{'same price' if same else 'DIFFERENT price'}",
            highlight=False,
        )
        names = "/".join(SKY_NAMES.get(first.split(":")[0], (first,)))
        note = ""
        if sp["first_tier_cheapest_price"] < 0:
            note = " (a negative price: that catalog row is broken; cloudmodal refuses negative host prices)"
        console.print(
            f"  SkyPilot cheapest of {names}: ${sp['first_tier_cheapest_price']:.4f}/h "
            f"({sp['first_tier_cheapest']}){note}",
            highlight=False,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
