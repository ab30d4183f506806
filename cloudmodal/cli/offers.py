"""``cloudmodal offers H100 A100-40GB:2 ...``: the ranked cloud offers for a GPU fallback list."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from cloudmodal.cli.tables import WIDE_HELP, Cell, Column, print_table

DEFAULT_TOP = 20  # rows in the table view; JSON lists every candidate unless --top is given

# What a narrow terminal keeps (keep 0), then adds while there is room: where to launch and what it costs first.
OFFER_COLUMNS = (
    Column("#", "right"),
    Column("cloud"),
    Column("region/zone"),
    Column("instance type"),
    Column("$/h", "right"),
    Column("market", keep=1),
    Column("GPUs", keep=2),
    Column("vCPUs", "right", keep=3),
    Column("RAM GB", "right", keep=3),
    Column("tier", keep=4),
    Column("on-demand $/h", "right", keep=5),
    Column("spot $/h", "right", keep=5),
)


def _split(values: list[str] | None) -> frozenset[str] | None:
    out = frozenset(v.strip() for item in values or [] for v in item.split(",") if v.strip())
    return out or None


def _money(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def _fail(message: str, code: int) -> typer.Exit:
    Console(stderr=True).print(f"[red]Error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def offers_command(
    gpus: list[str] = typer.Argument(..., help="GPU tiers in order of preference, e.g. H100 A100-40GB:2."),
    spot: bool = typer.Option(False, "--spot", help="Spot offers only."),
    on_demand: bool = typer.Option(False, "--on-demand", help="On-demand offers only."),
    cloud: list[str] = typer.Option(None, "--cloud", help="Allowed clouds, comma-separated (e.g. aws,gcp)."),
    region: list[str] = typer.Option(None, "--region", help="Allowed regions or zones, comma-separated."),
    max_price: float = typer.Option(None, "--max-price", help="Highest $/h to list."),
    across_tiers: bool = typer.Option(
        False, "--across-tiers", help="Rank all tiers together by price instead of tier by tier."
    ),
    top: int = typer.Option(None, "--top", min=1, help=f"Show the first N (table default {DEFAULT_TOP})."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (every candidate unless --top is given)."),
    min_vcpus: float = typer.Option(0.0, "--min-vcpus", min=0, help="Minimum vCPUs of the machine."),
    min_memory: float = typer.Option(0.0, "--min-memory", min=0, help="Minimum RAM of the machine, GB."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Rank cloud GPU offers for a fallback list of GPU types, cheapest first within each tier."""
    from cloudmodal.exception import Error, InvalidError
    from cloudmodal.gpu import parse_gpu
    from cloudmodal.placement import PlacementPolicy, rank
    from cloudmodal.pricing.catalog import catalog_dir, load_offer_table

    try:
        if spot and on_demand:
            raise InvalidError("--spot and --on-demand exclude each other: give at most one.")
        tiers = parse_gpu(list(gpus))
        policy = PlacementPolicy(
            spot="require" if spot else "never" if on_demand else "allow",
            clouds=_split(cloud),
            regions=_split(region),
            max_price_per_hour=max_price,
            across_tiers=across_tiers,
        )
    except InvalidError as e:
        raise _fail(str(e), 2) from None
    try:
        table = load_offer_table()
    except Error as e:
        raise _fail(str(e), 1) from None
    unknown = sorted((policy.clouds or set()) - set(table.clouds()))
    if unknown:
        raise _fail(
            f"Unknown cloud {', '.join(map(repr, unknown))}: the catalog has {', '.join(table.clouds())}.", 2
        )
    placement = rank(tiers, table, min_vcpus=min_vcpus, min_memory_gb=min_memory, policy=policy)
    candidates = placement.candidates
    shown = candidates[: top or (None if as_json else DEFAULT_TOP)]

    if as_json:
        out: dict[str, Any] = {
            "tiers": [str(t) for t in tiers],
            "policy": policy.to_dict(),
            "min_vcpus": min_vcpus,
            "min_memory_gb": min_memory,
            "catalog": str(catalog_dir()),
            "total": len(candidates),
            "candidates": [{"rank": i + 1, **c.to_dict()} for i, c in enumerate(shown)],
        }
        typer.echo(json.dumps(out, indent=2))
        return

    console = Console()
    if not candidates:
        console.print(
            f"No offers for {' '.join(map(str, tiers))} with these filters. "
            "Try other GPU types, more clouds or regions, or a higher --max-price.",
            highlight=False,
        )
        return
    rows: list[list[Cell]] = []
    for i, c in enumerate(shown, 1):
        o = c.offer
        price = o.price_spot if c.market == "spot" else o.price_ondemand
        od, sp = Text(_money(o.price_ondemand)), Text(_money(o.price_spot))
        (sp if c.market == "spot" else od).stylize("bold")  # the price this candidate is ranked by
        rows.append(
            [
                str(i),
                o.cloud,
                o.location,
                o.instance_type,
                _money(price),
                c.market,
                f"{o.gpu_count}×{o.gpu}",
                f"{o.vcpus:g}",
                f"{o.memory_gb:g}",
                str(c.tier),
                od,
                sp,
            ]
        )
    more = len(candidates) - len(shown)
    print_table(
        OFFER_COLUMNS,
        rows,
        wide=wide,
        title=f"Offers for {' → '.join(map(str, tiers))}",
        notes=[f"{more:,} more; use --top N to see them."] if more > 0 else [],
        console=console,
    )
