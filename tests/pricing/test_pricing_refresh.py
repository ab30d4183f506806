"""``cloudmodal pricing refresh`` against a local HTTP server serving a catalog tree the test writes."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from catalog_fixtures import TINY, write_catalog
from typer.testing import CliRunner

from cloudmodal.cli.main import app
from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, load_offer_table
from cloudmodal.pricing.refresh import RefreshError, refresh_catalogs


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served root): ``<root>/v8/<cloud>/vms.csv`` + ``<root>/v8/common/accelerators.csv``."""
    root = tmp_path / "served"
    write_catalog(
        root / "v8", {**TINY, "common/accelerators.csv": ["AcceleratorName,Clouds", "H100,\"['AWS']\""]}
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v8", root / "v8"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_refresh_downloads_catalogs_and_meta(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    dest = tmp_path / "cache" / "v8"
    seen: list[str] = []
    meta = refresh_catalogs(
        dest, base_url=base, clouds=["aws", "gcp"], progress=lambda n, d, t: seen.append(n)
    )
    assert (dest / "aws" / "vms.csv").read_text() == "\n".join(TINY["aws/vms.csv"]) + "\n"
    assert (dest / "common" / "accelerators.csv").is_file()
    assert not (dest / "lambda").exists()
    assert set(seen) == {"aws/vms.csv", "gcp/vms.csv", "common/accelerators.csv"}
    on_disk = json.loads((dest / "meta.json").read_text())
    assert on_disk == meta
    assert meta["clouds"]["aws"]["url"] == f"{base}/aws/vms.csv"
    assert meta["clouds"]["aws"]["rows"] == len(TINY["aws/vms.csv"]) - 1
    assert meta["files"]["common/accelerators.csv"]["rows"] == 1
    assert not list(dest.rglob("*.part"))
    table = load_offer_table(dest)
    assert table.clouds() == ("aws", "gcp")
    aws = next(s for s in table.summaries if s.cloud == "aws")
    assert aws.source == f"{base}/aws/vms.csv"
    assert aws.date == datetime.now(UTC).date().isoformat()


def test_failed_files_are_named_and_old_files_kept(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    dest = tmp_path / "cache"
    refresh_catalogs(dest, base_url=base, clouds=["aws", "gcp"])
    before = (dest / "gcp" / "vms.csv").read_bytes()
    (served / "gcp" / "vms.csv").write_text("<html>not a catalog</html>\n")
    with pytest.raises(RefreshError) as e:
        refresh_catalogs(dest, base_url=base, clouds=["aws", "gcp", "oracle"])
    msg = str(e.value)
    assert "gcp/vms.csv" in msg and "missing column" in msg
    assert "oracle/vms.csv" in msg and "404" in msg
    assert "Updated: aws/vms.csv" in msg
    assert (dest / "gcp" / "vms.csv").read_bytes() == before  # a bad download never replaces a good file
    assert not (dest / "oracle").exists()
    assert not list(dest.rglob("*.part"))


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RefreshError, match="failed"):
        refresh_catalogs(tmp_path, base_url="http://127.0.0.1:9/v8", clouds=["aws"], timeout=2)
    assert not (tmp_path / "meta.json").exists()


def test_cli_refresh_then_info(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = server
    dest = tmp_path / "cache" / "v8"
    monkeypatch.setenv(CATALOG_DIR_ENV, str(dest))
    runner = CliRunner()
    r = runner.invoke(app, ["pricing", "refresh", "--url", base, "--clouds", "aws,lambda"])
    assert r.exit_code == 0, r.output
    assert "aws, lambda" in r.output and (dest / "lambda" / "vms.csv").is_file()
    r = runner.invoke(app, ["pricing", "info", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    clouds = {c["cloud"]: c for c in info["clouds"]}
    assert set(clouds) == {"aws", "lambda"}
    assert clouds["lambda"]["offers"] == 2 and clouds["lambda"]["skipped"] == {"no GPU": 1}
    assert clouds["aws"]["source"] == f"{base}/aws/vms.csv"
    assert "H100" in clouds["aws"]["gpu_types"]
    r = runner.invoke(app, ["pricing", "info"])
    assert r.exit_code == 0 and "lambda" in r.stdout


def test_cli_refresh_failure_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CATALOG_DIR_ENV, str(tmp_path))
    r = CliRunner().invoke(app, ["pricing", "refresh", "--url", "http://127.0.0.1:9/v8", "--clouds", "aws"])
    assert r.exit_code == 1
    assert "Could not refresh" in r.output


def test_cli_info_without_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CATALOG_DIR_ENV, str(tmp_path / "none"))
    r = CliRunner().invoke(app, ["pricing", "info"])
    assert r.exit_code == 1
    assert "cloudmodal pricing refresh" in r.output
