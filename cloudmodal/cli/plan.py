"""``cloudmodal deploy APP.py --dry-run``: where each function of an app would run now, and what it costs.

Nothing is contacted and nothing launches: the app file is imported, and each function's GPU tiers are ranked
by :func:`cloudmodal.placement.rank` (the control plane's own placement) with the function's policy (spot
setting, ``cloud``, ``region``, ``max_price_per_hour``) over the price catalog, restricted to the clouds
``CLOUDMODAL_PROVIDERS`` enables (every catalog cloud with ``--all-clouds``). The first candidate is the offer a
launch would try first, the next ones its fallbacks in order. Live signals (capacity, quota, recent failures)
are the control plane's and are not known here: the plan is the catalog's view.

A function that mounts volumes is ranked with their data locality, as the control plane ranks it: each
candidate's egress is what a worker's start would cost to read the volumes there. Where the volumes are comes
from this machine's ``CLOUDMODAL_VOLUME_STORE`` and ``CLOUDMODAL_VOLUME_STORE_REGION`` (set them as the
control plane has them); how much a start reads is the control plane's to know (the volumes' current
versions), so the plan takes it from ``volume_gb`` (``--volume-gb NAME=GB``) and, without it, shows each
candidate's egress rate per GB instead of a sum, and ranks by price.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from cloudmodal.cli.tables import Cell, Column, print_table
from cloudmodal.gpu import GpuTier
from cloudmodal.placement import Candidate, DataLocality, DataRead, PlacementPolicy, rank
from cloudmodal.pricing.egress import DataLocation, egress_rate
from cloudmodal.pricing.gpus import ANY
from cloudmodal.pricing.offers import OfferTable
from cloudmodal.spec import FunctionSpec

DEFAULT_FALLBACKS = 5

PLAN_COLUMNS = (
    Column("function"),
    Column("#", "right"),
    Column("cloud"),
    Column("region/zone"),
    Column("instance type"),
    Column("$/h", "right"),
    Column("market", keep=1),
    Column("GPUs", keep=2),
    Column("tier", keep=3),
)
EGRESS_COLUMN = Column("egress", "right")  # shown when a function mounts volumes


@dataclass(frozen=True)
class FunctionPlan:
    """One function's plan: the offer placement chooses now, its fallbacks, and the cost at each bound."""

    name: str
    tiers: tuple[GpuTier, ...]
    policy: PlacementPolicy | None  # None: CPU-only
    candidates: tuple[Candidate, ...] = ()  # chosen first, then the fallbacks in order
    min_containers: int = 0
    max_containers: int | None = None
    local_tier: GpuTier | None = None  # a tier this machine's GPUs can run (tried before any cloud)
    note: str = ""  # why there is no candidate, or where a CPU-only function runs
    rejections: dict[str, int] = field(default_factory=dict)  # reason code -> offers dropped for it
    locality: DataLocality | None = None  # the volumes it mounts: where they are, GB a worker's start reads
    notes: tuple[str, ...] = ()  # placement's notes on the data (unknowns, an offer near the data winning)

    @property
    def chosen(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    @property
    def fallbacks(self) -> tuple[Candidate, ...]:
        return self.candidates[1:]

    def cost_at(self, containers: int | None) -> float | None:
        """$/h with ``containers`` workers on the chosen offer; None when unbounded or nothing is chosen."""
        if containers is None or self.chosen is None:
            return None
        return self.chosen.price * containers

    def to_dict(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "function": self.name,
            "gpu": [str(t) for t in self.tiers],
            "cpu_only": not self.tiers,
            "policy": self.policy.to_dict() if self.policy is not None else None,
            "chosen": self.candidate_dict(c) if c is not None else None,
            "fallbacks": [self.candidate_dict(f) for f in self.fallbacks],
            "min_containers": self.min_containers,
            "max_containers": self.max_containers,
            "price_per_hour_at_min": self.cost_at(self.min_containers) if c is not None else None,
            "price_per_hour_at_max": (
                None
                if c is None
                else "unbounded"
                if self.max_containers is None
                else self.cost_at(self.max_containers)
            ),
            "local_tier": str(self.local_tier) if self.local_tier is not None else None,
            "note": self.note,
            "rejections": self.rejections,
            "data": self.locality.to_dict() if self.locality is not None else None,
            "data_notes": list(self.notes),
        }

    def egress_per_gb(self, c: Candidate) -> float | None:
        """USD per GB read from the volumes, summed, for a worker on ``c`` (None: no volume, or none priced)."""
        if self.locality is None:
            return None
        o = c.offer
        rates = [egress_rate(r.location, o.cloud, o.region, self.locality.rates) for r in self.locality.reads]
        known = [r for r in rates if r is not None]
        return sum(known) if known else None

    def candidate_dict(self, c: Candidate) -> dict[str, Any]:
        d = c.to_dict()
        if self.locality is not None:
            d["egress_usd_per_gb"] = self.egress_per_gb(c)
        return d

    def egress_cell(self, c: Candidate) -> str:
        """The table's egress: USD per worker start when every volume's size is known, else USD per GB."""
        if self.locality is None:
            return ""
        if all(r.gb is not None for r in self.locality.reads):
            return f"{c.egress or 0.0:,.2f}"
        rate = self.egress_per_gb(c)
        return "?" if rate is None else f"{rate:g}/GB"


def local_tier(tiers: Sequence[GpuTier], gpus: Iterable[Any]) -> GpuTier | None:
    """The first tier this machine's GPUs (``GpuDevice``s) can run, as the local provider decides it."""
    counts: dict[str, int] = {}
    for d in gpus:
        counts[d.name] = counts.get(d.name, 0) + 1
    for t in tiers:
        if any(n >= t.count for n in counts.values()) if t.type == ANY else counts.get(t.type, 0) >= t.count:
            return t
    return None


def policy_for(spec: FunctionSpec, clouds: frozenset[str] | None) -> PlacementPolicy | str:
    """The function's placement policy, limited to ``clouds`` (None: any); a string says why no cloud is left."""
    allowed: frozenset[str] | None = frozenset({spec.cloud}) if spec.cloud else None
    if clouds is not None:
        allowed = clouds if allowed is None else allowed & clouds
        if not allowed:
            if spec.cloud:
                return f"it asks for cloud={spec.cloud!r}, which is not enabled"
            return "no cloud is enabled"
    return PlacementPolicy(
        spot="never" if spec.nonpreemptible else spec.spot,
        clouds=allowed,
        regions=frozenset(spec.region) if spec.region else None,
        max_price_per_hour=spec.max_price_per_hour,
    )


def plan_function(
    name: str,
    spec: FunctionSpec,
    table: OfferTable | None,
    clouds: frozenset[str] | None,
    *,
    fallbacks: int = DEFAULT_FALLBACKS,
    gpus: Sequence[Any] = (),
    locality: DataLocality | None = None,
) -> FunctionPlan:
    """The plan of one function (``table`` may be None only for a CPU-only function); ``locality``: the data
    its workers read at start (see :func:`data_locality`)."""
    a = spec.autoscaler
    base: dict[str, Any] = {
        "name": name,
        "tiers": spec.gpu,
        "min_containers": a.min_containers,
        "max_containers": a.max_containers,
    }
    if not spec.gpu:
        return FunctionPlan(**base, policy=None, note="runs on local/CPU (this machine; no GPU, no cloud)")
    here = local_tier(spec.gpu, gpus)
    policy = policy_for(spec, clouds)
    if isinstance(policy, str):
        return FunctionPlan(**base, policy=None, local_tier=here, note=f"no cloud offer: {policy}")
    assert table is not None
    placement = rank(spec.gpu, table, policy=policy, limit=1 + fallbacks, locality=locality)
    if not placement.candidates:
        # Ranked again with explanations only when there is nothing to show: it walks every offer.
        why = rank(spec.gpu, table, policy=policy, explain=True).rejection_counts()
        reasons = (
            ", ".join(f"{n} {code}" for code, n in why.items()) or "the catalog has no offer of these GPUs"
        )
        return FunctionPlan(
            **base,
            policy=policy,
            local_tier=here,
            note=f"no cloud offer matches (offers dropped: {reasons})",
            rejections=why,
            locality=locality,
        )
    return FunctionPlan(
        **base,
        policy=policy,
        candidates=placement.candidates,
        local_tier=here,
        locality=locality,
        notes=placement.notes,
    )


def parse_volume_gb(items: Iterable[str]) -> dict[str, float]:
    """``["weights=120", "data=0.5"]`` → ``{"weights": 120.0, "data": 0.5}`` (``--volume-gb NAME=GB``)."""
    from cloudmodal.exception import InvalidError

    out: dict[str, float] = {}
    for item in items:
        name, sep, gb = item.partition("=")
        try:
            size = float(gb)
        except ValueError:
            size = -1.0
        if not sep or not name.strip() or not 0 <= size < 1e12:
            raise InvalidError(
                f"Invalid --volume-gb {item!r}: write NAME=GB, e.g. --volume-gb weights=120 (the GB a worker "
                "reads from that volume when it starts)."
            )
        out[name.strip()] = size
    return out


def data_locality(
    spec: FunctionSpec, where: DataLocation, volume_gb: Mapping[str, float]
) -> DataLocality | None:
    """The volumes ``spec`` mounts, all at ``where`` (the configured store), sized from ``volume_gb``."""
    refs = list(dict.fromkeys(ref for _path, ref in spec.volumes))
    if not refs:
        return None
    return DataLocality(
        reads=tuple(
            DataRead(
                ref,
                where,
                volume_gb.get(ref),
                "" if ref in volume_gb else f"a dry run does not read it: pass --volume-gb {ref}=GB",
            )
            for ref in refs
        )
    )


def store_data_location() -> tuple[DataLocation, str]:
    """Where volumes are, from this machine's settings, and which settings said so."""
    import os

    from cloudmodal.pricing.egress import custom_endpoint, store_location
    from cloudmodal.settings import settings

    s = settings()
    url = s.volume_store
    region = s.volume_store_region
    told = f"CLOUDMODAL_VOLUME_STORE={url}" if url else "CLOUDMODAL_VOLUME_STORE unset: a local directory"
    if region:
        told += f", CLOUDMODAL_VOLUME_STORE_REGION={region}"
    if url is None:
        return store_location("", region), told
    return store_location(url, region, custom_endpoint=custom_endpoint(url, os.environ)), told


def _money(v: float | None) -> str:
    return "-" if v is None else f"${v:,.2f}/h"


def _summary(p: FunctionPlan) -> str:
    """One line: tiers, and $/h at min and max containers."""
    if not p.tiers:
        return f"{p.name}: {p.note}"
    head = f"{p.name}: gpu {' → '.join(map(str, p.tiers))}"
    if p.local_tier is not None:
        head += f"; this machine has {p.local_tier} (tried first, no cloud cost)"
    if p.chosen is None:
        return f"{head}; {p.note}"
    at_max = "unbounded" if p.max_containers is None else _money(p.cost_at(p.max_containers))
    return (
        f"{head}; at min_containers={p.min_containers}: {_money(p.cost_at(p.min_containers))}, "
        f"at max_containers={p.max_containers if p.max_containers is not None else 'None'}: {at_max}"
    )


def deploy_plan(
    app_ref: str,
    *,
    name: str | None,
    fallbacks: int,
    all_clouds: bool,
    as_json: bool,
    wide: bool,
    volume_gb: Sequence[str] = (),
) -> None:
    """Print the plan of ``cloudmodal deploy APP_REF --dry-run`` (see the module docstring); ``volume_gb``:
    ``NAME=GB`` items, the GB a worker reads from each volume at start."""
    from cloudmodal.cli.imports import find_app, import_file, parse_ref
    from cloudmodal.cli.setup_cmd import enabled_providers
    from cloudmodal.client.unsupported import check_app
    from cloudmodal.exception import InvalidError
    from cloudmodal.providers.clouds import CLOUDS
    from cloudmodal.providers.gpu import detect_gpus

    path, _ = parse_ref(app_ref)
    module = import_file(path)
    app = find_app(module, path)
    deploy_name = name or app.name
    if not deploy_name:  # the same refusal as a real deploy, before anything would be sent
        raise InvalidError(
            'A deployed app needs a name: `cloudmodal.App("my-app")` or `cloudmodal deploy --name NAME`.'
        )
    check_app(app, "deploy")
    handles = [*app.registered_functions.values(), *app.registered_classes.values()]
    specs: list[FunctionSpec] = [h.spec for h in handles]
    needs_gpu = any(s.gpu for s in specs)

    table: OfferTable | None = None
    catalog = None
    if needs_gpu:
        from cloudmodal.pricing.catalog import catalog_dir, load_offer_table

        table = load_offer_table()  # CatalogNotFoundError says how to get one
        catalog = str(catalog_dir())
    enabled = enabled_providers()
    clouds: frozenset[str] | None
    if all_clouds:
        clouds = None
        scope = "all catalog clouds (--all-clouds)"
        shown_clouds = list(table.clouds()) if table is not None else []
    elif "sim" in enabled:  # the simulated provider sells every catalog cloud's offers
        clouds = None
        scope = "all catalog clouds, simulated (CLOUDMODAL_PROVIDERS has sim)"
        shown_clouds = list(table.clouds()) if table is not None else []
    else:
        clouds = frozenset(p for p in enabled if p in CLOUDS)
        shown_clouds = sorted(clouds)
        scope = (
            "the enabled clouds (CLOUDMODAL_PROVIDERS)"
            if clouds
            else "no cloud is enabled (CLOUDMODAL_PROVIDERS): pass --all-clouds to plan over every catalog cloud, "
            "and see `cloudmodal setup` to enable one"
        )
    gpus = detect_gpus() if needs_gpu else []
    sizes = parse_volume_gb(volume_gb)
    mounted = {ref for s in specs for _path, ref in s.volumes}
    unknown = sorted(set(sizes) - mounted)
    if unknown:
        raise InvalidError(
            f"--volume-gb names {', '.join(map(repr, unknown))}, which no function mounts "
            f"(mounted: {', '.join(sorted(mounted)) or 'none'})."
        )
    where, store = store_data_location() if mounted else (DataLocation(None), "")
    plans = [
        plan_function(
            s.name,
            s,
            table,
            clouds,
            fallbacks=fallbacks,
            gpus=gpus,
            locality=data_locality(s, where, sizes) if s.gpu else None,
        )
        for s in specs
    ]

    if as_json:
        out = {
            "app": deploy_name,
            "dry_run": True,
            "clouds": shown_clouds,
            "scope": scope,
            "catalog": catalog,
            "fallbacks": fallbacks,
            "volume_store": {"store": store, "location": str(where), "known": where.known}
            if mounted
            else None,
            "functions": [p.to_dict() for p in plans],
        }
        typer.echo(json.dumps(out, indent=2))
        return

    console = Console()
    header = [
        f"Dry run: app {deploy_name!r} is not deployed and nothing is launched.",
        f"Clouds: {', '.join(shown_clouds) or 'none'} — {scope}.",
    ]
    if mounted:
        header.append(f"Volumes: {', '.join(sorted(mounted))} in {where} ({_where_from(where, store)}).")
    with_egress = any(p.locality is not None for p in plans)
    rows: list[list[Cell]] = []
    for p in plans:
        for i, c in enumerate(p.candidates):
            o = c.offer
            row: list[Cell] = [
                p.name,
                "chosen" if i == 0 else str(i),
                o.cloud,
                o.location,
                o.instance_type,
                f"{c.price:,.2f}",
            ]
            if with_egress:
                row.append(p.egress_cell(c))
            rows.append([*row, c.market, f"{o.gpu_count}×{o.gpu}", str(c.tier)])
    columns: tuple[Column, ...] = PLAN_COLUMNS
    if with_egress:
        columns = (*PLAN_COLUMNS[:6], EGRESS_COLUMN, *PLAN_COLUMNS[6:])
    notes = [_summary(p) for p in plans]
    notes += [f"{p.name}: {n}" for p in plans for n in p.notes]
    if with_egress:
        notes.append(
            "egress: USD to read the mounted volumes when a worker starts there (per GB where sizes are not "
            "given: --volume-gb NAME=GB); offers compare on $/h + egress over a 1 h worker."
        )
    if catalog is not None:
        notes.append(f"Prices from the catalog at {catalog}; live capacity and quota are not checked.")
    _print_lines(console, header)
    if rows:
        print_table(
            columns,
            rows,
            wide=wide,
            title="Placement now (chosen, then fallbacks in order)",
            console=console,
        )
    _print_lines(console, notes)


def _where_from(where: DataLocation, told: str) -> str:
    """Which settings said where the volumes are, and what to set when they could not."""
    if where.known:
        return f"{told}; set as the control plane has them"
    return f"{told}; {where.why}"


def _print_lines(console: Console, lines: Iterable[str]) -> None:
    """Lines beside a table: on the terminal, or on stderr when stdout is piped (as tables' notes are)."""
    for line in lines:
        if console.is_terminal:
            console.print(escape(line), highlight=False)
        else:
            typer.echo(line, err=True)
