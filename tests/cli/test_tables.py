"""Every table of the CLI fits a terminal of 80, 100 and 200 columns without breaking an identifier, shows
every column with ``--wide``, and is plain tab-separated text when stdout is not a terminal."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudmodal.cli.main import app
from cloudmodal.client import session as session_mod
from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, clear_cache, load_offer_table
from cloudmodal.server.app import ServerHandle, default_settings

SHARED_V8 = Path(__file__).resolve().parents[2].parent / "shared" / "pricing" / "catalogs" / "v8"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BOX = set("│┃┏┓┗┛┡┩└┘├┤┬┴┼━╇╋")
WIDTHS = (80, 100, 200)
APP_ID = "ap-" + "x" * 22


def render(args: list[str], width: int | None) -> str:
    """stdout of ``cloudmodal ARGS`` in a terminal ``width`` columns wide, or piped when ``width`` is None."""
    if width is None:  # CliRunner's stdout is not a tty; nothing may force rich to treat it as one
        env: dict[str, str | None] = {"TTY_COMPATIBLE": None, "FORCE_COLOR": None, "COLUMNS": "80"}
    else:
        env = {"TTY_COMPATIBLE": "1", "COLUMNS": str(width), "TERM": "xterm-256color"}
    r = CliRunner().invoke(app, args, env=env)
    assert r.exit_code == 0, r.output
    return ANSI.sub("", r.stdout)


def assert_fits(out: str, width: int, whole: list[str]) -> None:
    lines = out.splitlines()
    too_long = [ln for ln in lines if len(ln) > width]
    assert not too_long, f"{len(too_long)} lines wider than {width}:\n" + "\n".join(too_long)
    for ident in whole:
        assert any(ident in ln for ln in lines), (
            f"{ident!r} is not whole on one line at {width} columns:\n{out}"
        )


def assert_plain(out: str, header: list[str], rows: int) -> list[list[str]]:
    assert not BOX & set(out), f"box drawing in piped output:\n{out}"
    assert "\x1b" not in out
    lines = [ln.split("\t") for ln in out.splitlines()]
    assert lines[0] == header and len(lines) == rows + 1
    assert all(len(ln) == len(header) for ln in lines)
    return lines[1:]


@pytest.fixture
def shared_catalog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not SHARED_V8.is_dir():
        pytest.skip(f"the shared catalog snapshot ({SHARED_V8}) is not present")
    monkeypatch.setenv(CATALOG_DIR_ENV, str(SHARED_V8))
    clear_cache()
    yield
    clear_cache()


OFFER_IDS = ["europe-north1/europe-north1-c", "a3-highgpu-1g", "gcp"]


@pytest.mark.parametrize("width", WIDTHS)
def test_offers_fit_the_terminal(shared_catalog: None, width: int) -> None:
    out = render(["offers", "H100", "--top", "3", "--cloud", "gcp"], width)
    assert_fits(out, width, OFFER_IDS)
    assert "spot" in out and "1.54" in out  # where it runs and what it costs survive at every width
    # Azure's instance names are the longest: they stay whole too.
    out = render(["offers", "H100", "--cloud", "azure", "--top", "3"], width)
    assert_fits(out, width, ["Standard_NC40ads_H100_v5"])


def test_offers_wide_and_piped(shared_catalog: None) -> None:
    wide = render(["offers", "H100", "--top", "3", "--cloud", "gcp", "--wide"], 80)
    header = next(ln for ln in wide.splitlines() if "region/zone" in ln)
    for col in ("tier", "GPUs", "vCPUs", "RAM GB", "on-demand $/h", "spot $/h", "market"):
        assert col in header
    assert_fits(wide, 200, OFFER_IDS)  # one line per row however wide

    rows = assert_plain(
        render(["offers", "H100", "--top", "3", "--cloud", "gcp"], None),
        ["#", "cloud", "region/zone", "instance type", "$/h", "market", "GPUs", "vCPUs", "RAM GB", "tier"]
        + ["on-demand $/h", "spot $/h"],
        3,
    )
    assert rows[0][:6] == ["1", "gcp", "europe-north1/europe-north1-c", "a3-highgpu-1g", "1.54", "spot"]


@pytest.mark.parametrize("width", WIDTHS)
def test_pricing_info_fits_the_terminal(shared_catalog: None, width: int) -> None:
    out = render(["pricing", "info"], width)
    # the catalog's date: its fetch time where recorded, else its file's mtime (a copy of the shared catalog has
    # the copy's), as the loader reads it
    runpod = next(s for s in load_offer_table(SHARED_V8).summaries if s.cloud == "runpod")
    assert_fits(out, width, ["runpod", runpod.date, "10,656"])
    wide = render(["pricing", "info", "--wide"], width)
    assert str(SHARED_V8 / "runpod" / "vms.csv") in wide and "RTX-PRO-6000-WK" in wide
    rows = assert_plain(
        render(["pricing", "info"], None),
        ["cloud", "date", "offers", "rows", "GPU types", "skipped", "source"],
        5,
    )
    assert [r[0] for r in rows] == ["aws", "azure", "gcp", "lambda", "runpod"]


@pytest.fixture
def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerHandle]:
    """A control plane with a deployed app of many functions and a member token scoped to several apps."""
    handle = ServerHandle(default_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'cp.db'}"))
    handle.start_in_thread()
    monkeypatch.setenv("CLOUDMODAL_SERVER_URL", handle.url)
    monkeypatch.setenv("CLOUDMODAL_TOKEN", handle.token)
    session_mod.disconnect()
    try:
        t = session_mod.current_session().transport
        made = t.post("/v1/apps", {"app_id": APP_ID, "name": "image-embeddings-nightly", "ephemeral": False})
        t.post(f"/v1/apps/{made['id']}/deployments", {"functions": [f"embed_batch_{i}" for i in range(12)]})
        t.post("/v1/tokens", {"kind": "member", "apps": [f"team-app-{i}" for i in range(10)], "name": "ci"})
        yield handle
    finally:
        session_mod.disconnect()
        handle.stop()


def test_app_and_token_tables_fit_the_terminal(plane: ServerHandle) -> None:
    app_id = APP_ID
    tokens = session_mod.current_session().transport.get("/v1/tokens")
    token_id = next(t["id"] for t in tokens if t["name"] == "ci")
    tables = [
        (["app", "list"], [app_id, "image-embeddings-nightly"], "Created"),
        (["app", "history", "image-embeddings-nightly"], ["embed_batch_0"], "embed_batch_11"),
        (["token", "list"], [token_id], "team-app-9"),
    ]
    for args, whole, only_wide in tables:
        for width in WIDTHS:
            assert_fits(render(args, width), width, whole)
        assert only_wide in render([*args, "--wide"], 80)
        piped = render(args, None)
        assert not BOX & set(piped) and "\x1b" not in piped
        lines = [ln.split("\t") for ln in piped.splitlines()]
        assert len({len(ln) for ln in lines}) == 1  # a header and one line per row, same fields each
        assert all(any(ident in ln for ln in piped.splitlines()[1:]) for ident in whole), piped
