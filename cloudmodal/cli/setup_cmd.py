"""``cloudmodal setup``: which clouds (and this machine) cloudmodal can use here, and how to fix the others.

Like ``sky check``: every cloud's :class:`~cloudmodal.providers.nodes.NodeDriver` is built with its defaults
and asked ``check()`` (read-only: who am I, or what is missing and the exact fix). The checks run at once,
each in a daemon thread with its own deadline, so one cloud whose API hangs does not hold up the others (nor
the exit of the process). A cloud whose driver cannot be imported or built is "not usable" with the reason,
never a crash. The table also says which clouds the price catalog has offers for, and which providers
``CLOUDMODAL_PROVIDERS`` enables now.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from cloudmodal.cli.tables import WIDE_HELP, Cell, Column, print_table

LOCAL = "local"
DEFAULT_TIMEOUT_S = 20.0
_MAX_DETAIL = 400  # characters of an unexpected error's message that are shown

SETUP_COLUMNS = (
    Column("cloud"),
    Column("usable"),
    Column("enabled", keep=2),
    Column("catalog offers", "right", keep=1),
    Column("found / missing", keep=0, shrink=True),
)


@dataclass(frozen=True)
class CheckResult:
    """What ``cloudmodal setup`` found for one cloud (or ``local``)."""

    cloud: str
    usable: bool
    detail: str  # who you are on that cloud, or what is missing and the exact fix
    enabled: bool  # named in CLOUDMODAL_PROVIDERS (local: always)
    catalog_offers: int | None  # GPU offers the price catalog has for it; None: no catalog here (or local)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text[:_MAX_DETAIL] + ("…" if len(text) > _MAX_DETAIL else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def probe_cloud(cloud: str) -> tuple[bool, str]:
    """Build ``cloud``'s driver with its defaults and ask ``check()``; any failure is ``(False, why)``."""
    from cloudmodal.providers import clouds
    from cloudmodal.providers.base import ProviderError

    try:
        cls = clouds.driver_class(cloud)
    except ProviderError as e:  # unknown cloud, or its SDK (or driver module) cannot be imported
        return False, e.message
    driver: Any = None
    try:
        driver = cls()
        ok, message = driver.check()
        return bool(ok), str(message)
    except ProviderError as e:  # e.g. a CredentialsError from the constructor: its message says the fix
        return False, e.message
    except Exception as e:  # a driver's bug or an SDK surprise: shown, never a crash of `setup`
        return False, f"the check failed ({_short(e)}); report this as a bug of cloudmodal's {cloud} driver."
    finally:
        if driver is not None:
            try:
                driver.close()
            except Exception:  # closing is best effort: the verdict is already known
                pass


def check_clouds(names: Sequence[str], timeout_s: float) -> dict[str, tuple[bool, str]]:
    """:func:`probe_cloud` for each cloud at once; one that has no answer within ``timeout_s`` (from the
    start of all checks) is not usable. Its thread is a daemon, left to finish or die with the process."""
    results: dict[str, tuple[bool, str]] = {}
    lock = threading.Lock()

    def run(name: str) -> None:
        got = probe_cloud(name)
        with lock:
            results[name] = got

    threads = [threading.Thread(target=run, args=(n,), name=f"setup-check-{n}", daemon=True) for n in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    out: dict[str, tuple[bool, str]] = {}
    with lock:
        for n in names:
            out[n] = results.get(n) or (
                False,
                f"no answer within {timeout_s:g} s (is the cloud's API reachable from here?). Check the network "
                f"or proxy settings, or wait longer: `cloudmodal setup --cloud {n} --timeout 60`.",
            )
    return out


def check_local() -> tuple[bool, str]:
    """This machine: always usable (CPU functions run here); its GPUs come from the usual detection."""
    from cloudmodal.providers.gpu import detect_gpus, summarize

    try:
        gpus = summarize(detect_gpus())
    except Exception as e:  # a malformed CLOUDMODAL_FAKE_GPUS: shown, the machine still runs CPU work
        return True, f"this machine runs CPU functions; its GPUs could not be listed ({_short(e)})"
    if gpus == "no GPUs":
        return True, "this machine: no GPUs (CPU functions run here; GPU functions need a cloud)"
    return True, f"this machine: {gpus}"


def _catalog_offers() -> tuple[dict[str, int] | None, str | None]:
    """GPU offers per cloud in the price catalog, and the catalog's path (None, None: no catalog here)."""
    from cloudmodal.exception import Error
    from cloudmodal.pricing.catalog import catalog_dir, load_offer_table

    try:
        table = load_offer_table()
    except Error:
        return None, None
    return {s.cloud: s.offers for s in table.summaries}, str(catalog_dir())


def enabled_providers() -> tuple[str, ...]:
    """The providers ``CLOUDMODAL_PROVIDERS`` enables now (``local`` is always one of them)."""
    from cloudmodal.settings import settings

    names = list(settings().providers)
    return tuple(dict.fromkeys([*names, LOCAL]))


def _fail(message: str, code: int) -> typer.Exit:
    Console(stderr=True).print(f"[red]Error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _mark(ok: bool) -> Text:
    return Text("✓", style="green") if ok else Text("✗", style="red")


def setup_command(
    cloud: list[str] = typer.Option(
        None, "--cloud", help="Check only this cloud (or 'local'); repeat for several."
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--timeout", min=0.01, help="Seconds to wait for each cloud's check."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Check which clouds cloudmodal can use here (credentials, SDKs, prices) and say how to fix the rest.

    Exits 0 when at least one checked cloud (or this machine) is usable, 1 otherwise."""
    from cloudmodal.exception import Error
    from cloudmodal.providers import clouds

    known = (*clouds.CLOUDS, LOCAL)
    wanted = list(
        dict.fromkeys(c.strip().lower() for item in cloud or [] for c in item.split(",") if c.strip())
    )
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise _fail(f"Unknown cloud {', '.join(map(repr, unknown))}: choose from {', '.join(known)}.", 2)
    names = wanted or list(known)
    try:
        enabled = enabled_providers()
    except Error as e:  # a malformed CLOUDMODAL_PROVIDERS
        raise _fail(str(e), 2) from None

    verdicts = check_clouds([n for n in names if n != LOCAL], timeout)
    if LOCAL in names:
        verdicts[LOCAL] = check_local()
    offers, catalog = _catalog_offers()
    results = [
        CheckResult(
            cloud=n,
            usable=verdicts[n][0],
            detail=verdicts[n][1],
            enabled=n in enabled,
            catalog_offers=None if offers is None or n == LOCAL else offers.get(n, 0),
        )
        for n in names
    ]
    usable_off = [r.cloud for r in results if r.usable and not r.enabled]
    enable_hint = f"export CLOUDMODAL_PROVIDERS={','.join([*enabled, *usable_off])}" if usable_off else None
    code = 0 if any(r.usable for r in results) else 1

    if as_json:
        out = {
            "clouds": [r.to_dict() for r in results],
            "enabled": list(enabled),
            "catalog": catalog,
            "enable": enable_hint,
        }
        typer.echo(json.dumps(out, indent=2))
        raise typer.Exit(code)

    rows: list[list[Cell]] = []
    for r in results:
        if r.cloud == LOCAL:
            priced = "free"
        elif r.catalog_offers is None:
            priced = "no catalog"
        else:
            priced = f"{r.catalog_offers:,}" if r.catalog_offers else "none"
        rows.append([r.cloud, _mark(r.usable), "yes" if r.enabled else "no", priced, r.detail])
    notes = [f"Enabled now (CLOUDMODAL_PROVIDERS): {', '.join(enabled)}."]
    for r in results:
        if not r.usable:
            notes.append(f"✗ {r.cloud}: {r.detail}")
        elif r.enabled and r.catalog_offers == 0:
            notes.append(
                f"! {r.cloud} is usable but the price catalog has no offers for it: nothing is placed there."
            )
    broken = [r.cloud for r in results if r.enabled and not r.usable]
    if broken:
        notes.append(f"! Enabled but not usable: {', '.join(broken)}. Launches there fail until fixed.")
    if enable_hint:
        notes.append(
            f"To use {', '.join(usable_off)}: {enable_hint} (restart `cloudmodal server start` if one runs)."
        )
    if catalog is None:
        notes.append("No price catalog here: run `cloudmodal pricing refresh` so GPU offers can be placed.")
    console = Console()
    print_table(SETUP_COLUMNS, rows, wide=wide, title="Clouds cloudmodal can use here", console=console)
    for note in notes:  # as print_table's notes, but never read as markup (`pip install 'cloudmodal[aws]'`)
        if console.is_terminal:
            console.print(escape(note), highlight=False)
        else:
            typer.echo(note, err=True)
    raise typer.Exit(code)
