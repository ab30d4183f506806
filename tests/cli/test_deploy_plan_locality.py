"""``cloudmodal deploy APP.py --dry-run`` for a function that mounts a volume: the volume's location, each
candidate's egress, and the ranking by price plus egress, on the real CLI and the shared catalog snapshot.

Sizes come from ``--volume-gb NAME=GB`` (a dry run contacts no control plane, which is what knows them): the
sized cases call :func:`cloudmodal.cli.plan.deploy_plan`, the function the CLI's ``--dry-run`` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloudmodal.cli.main import app
from cloudmodal.cli.plan import deploy_plan
from cloudmodal.exception import InvalidError
from cloudmodal.gpu import parse_gpu
from cloudmodal.placement import DataLocality, DataRead, PlacementPolicy, rank
from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, clear_cache, load_offer_table
from cloudmodal.pricing.egress import DataLocation

SHARED_CATALOG = Path(__file__).resolve().parents[3] / "shared" / "pricing" / "catalogs" / "v8"

APP = """
import cloudmodal

app = cloudmodal.App("plan-data")
weights = cloudmodal.Volume.from_name("weights", create_if_missing=True)


@app.function(gpu="H100", volumes={"/weights": weights})
def train(x: int) -> int:
    return x


@app.function(gpu="H100")
def plain(x: int) -> int:
    return x
"""

STORE_REGION = "aws:us-east-1"


@pytest.fixture
def catalog(monkeypatch: pytest.MonkeyPatch) -> Path:
    d = SHARED_CATALOG
    if not d.is_dir():
        pytest.skip(f"the shared pricing snapshot ({d}) is not present")
    monkeypatch.setenv(CATALOG_DIR_ENV, str(d))
    clear_cache()
    return d


@pytest.fixture
def app_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The app file, and an environment where contacting a control plane would fail loudly."""
    p = tmp_path / "plan_data_app.py"
    p.write_text(APP)
    monkeypatch.setenv("CLOUDMODAL_HOME", str(tmp_path / "cloudmodal-home"))
    monkeypatch.setenv("CLOUDMODAL_SERVER_URL", "http://127.0.0.1:9")  # discard port: nothing answers
    monkeypatch.setenv("CLOUDMODAL_TOKEN", "unused")
    monkeypatch.setenv("CLOUDMODAL_FAKE_GPUS", "none")
    monkeypatch.setenv("CLOUDMODAL_VOLUME_STORE", "s3://team-bucket/volumes")
    monkeypatch.setenv("CLOUDMODAL_VOLUME_STORE_REGION", STORE_REGION)
    for var in ("CLOUDMODAL_PROVIDERS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    return p


def functions(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["function"]: f for f in out["functions"]}


def cli_plan(app_file: Path, *args: str) -> dict[str, Any]:
    r = CliRunner().invoke(app, ["deploy", str(app_file), "--dry-run", "--json", "--all-clouds", *args])
    assert r.exit_code == 0, r.output
    out: dict[str, Any] = json.loads(r.stdout)
    assert not (app_file.parent / "cloudmodal-home").exists()  # no state made, nothing contacted
    return out


def test_the_volume_location_and_egress_rates_without_sizes(app_file: Path, catalog: Path) -> None:
    out = cli_plan(app_file)
    assert out["volume_store"] == {
        "store": "CLOUDMODAL_VOLUME_STORE=s3://team-bucket/volumes, CLOUDMODAL_VOLUME_STORE_REGION=aws:us-east-1",
        "location": STORE_REGION,
        "known": True,
    }
    got = functions(out)
    train, plain = got["train"], got["plain"]
    assert train["data"] == {
        "worker_hours": 1.0,
        "volumes": [{"name": "weights", "location": STORE_REGION, "known": True, "gb": None}],
    }
    assert any("size not known" in n and "--volume-gb weights=GB" in n for n in train["data_notes"])
    # without a size nothing can be counted: the price order stands, and each offer shows its rate per GB
    assert {k: v for k, v in train["chosen"].items() if not k.startswith("egress")} == plain["chosen"]
    for c in [train["chosen"], *train["fallbacks"]]:
        assert c["egress_usd"] == 0.0
        near = (c["cloud"], c["region"]) == ("aws", "us-east-1")
        want = 0.0 if near else 0.02 if c["cloud"] == "aws" else 0.09  # AWS bills what leaves the region
        assert c["egress_usd_per_gb"] == pytest.approx(want)
    # a function without volumes: nothing about data
    assert plain["data"] is None and plain["data_notes"] == []
    assert "egress_usd" not in plain["chosen"] and "egress_usd_per_gb" not in plain["chosen"]


def sized_plan(capsys: pytest.CaptureFixture[str], app_file: Path, *sizes: str) -> dict[str, Any]:
    deploy_plan(
        str(app_file),
        name=None,
        fallbacks=3,
        all_clouds=True,
        as_json=True,
        wide=False,
        volume_gb=sizes,
    )
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert not (app_file.parent / "cloudmodal-home").exists()
    return out


def test_a_sized_volume_moves_the_choice_near_the_data(
    capsys: pytest.CaptureFixture[str], app_file: Path, catalog: Path
) -> None:
    got = functions(sized_plan(capsys, app_file, "weights=500"))
    train, plain = got["train"], got["plain"]
    table = load_offer_table(catalog)
    locality = DataLocality(reads=(DataRead("weights", DataLocation("aws", "us-east-1"), 500.0),))
    want = rank(parse_gpu("H100"), table, policy=PlacementPolicy(), limit=4, locality=locality).candidates
    assert [
        {k: v for k, v in c.items() if k != "egress_usd_per_gb"}
        for c in [train["chosen"], *train["fallbacks"]]
    ] == [c.to_dict() for c in want]
    assert (train["chosen"]["cloud"], train["chosen"]["region"]) == ("aws", "us-east-1")
    assert train["chosen"]["egress_usd"] == 0.0
    assert train["data"]["volumes"][0]["gb"] == 500.0
    assert any(n.startswith("near the data: aws us-east-1") for n in train["data_notes"])
    # the negative control: the same GPU without the volume goes to the cheapest offer, elsewhere
    cheapest = rank(parse_gpu("H100"), table, policy=PlacementPolicy(), limit=1).candidates[0]
    assert plain["chosen"] == cheapest.to_dict()
    assert (plain["chosen"]["cloud"], plain["chosen"]["region"]) != ("aws", "us-east-1")
    assert cheapest.price < train["chosen"]["price"]


def test_the_table_shows_the_location_and_egress(
    capsys: pytest.CaptureFixture[str], app_file: Path, catalog: Path
) -> None:
    deploy_plan(
        str(app_file),
        name=None,
        fallbacks=1,
        all_clouds=True,
        as_json=False,
        wide=True,
        volume_gb=["weights=500"],
    )
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Volumes: weights in aws:us-east-1 (CLOUDMODAL_VOLUME_STORE=s3://team-bucket/volumes" in text
    header = next(line for line in captured.out.splitlines() if line.startswith("function\t"))
    assert header.split("\t")[5:8] == ["$/h", "egress", "market"]
    rows = [line.split("\t") for line in captured.out.splitlines() if line.startswith("train\t")]
    assert rows[0][1] == "chosen" and rows[0][2] == "aws" and rows[0][6] == "0.00"
    plain_rows = [line.split("\t") for line in captured.out.splitlines() if line.startswith("plain\t")]
    assert plain_rows and all(r[6] == "" for r in plain_rows)  # no volume, no egress
    assert "train: near the data" in text


def test_an_unknown_region_is_said(app_file: Path, catalog: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDMODAL_VOLUME_STORE_REGION")
    out = cli_plan(app_file)
    assert out["volume_store"]["location"] == "aws:?" and out["volume_store"]["known"] is False
    train = functions(out)["train"]
    assert train["data"]["volumes"][0]["known"] is False
    # within AWS the rate cannot be told (free in the bucket's region, $0.02 elsewhere); out of AWS it can
    for c in [train["chosen"], *train["fallbacks"]]:
        assert c["egress_usd_per_gb"] == (None if c["cloud"] == "aws" else pytest.approx(0.09))


def test_volume_gb_must_name_a_mounted_volume(
    capsys: pytest.CaptureFixture[str], app_file: Path, catalog: Path
) -> None:
    with pytest.raises(
        InvalidError, match=r"--volume-gb names 'cache', which no function mounts \(mounted: weights\)"
    ):
        sized_plan(capsys, app_file, "cache=5")
    with pytest.raises(InvalidError, match="write NAME=GB"):
        sized_plan(capsys, app_file, "weights")


def test_volume_gb_on_the_command_line(app_file: Path, catalog: Path) -> None:
    train = functions(cli_plan(app_file, "--volume-gb", "weights=500"))["train"]
    assert (train["chosen"]["cloud"], train["chosen"]["region"]) == ("aws", "us-east-1")
    assert train["data"]["volumes"][0]["gb"] == 500.0
    r = CliRunner().invoke(app, ["deploy", str(app_file), "--volume-gb", "weights=1"])
    assert r.exit_code == 2 and "go with --dry-run" in r.stderr
