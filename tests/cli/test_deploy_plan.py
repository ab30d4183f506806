"""``cloudmodal deploy APP.py --dry-run``: the real CLI on small app files and the shared catalog snapshot.

The chosen offer and the fallbacks must be ``rank(...)``'s candidates for the function's tiers and policy, the
$/h figures the chosen price times the container bounds, and nothing may be contacted or created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloudmodal.cli.main import app
from cloudmodal.gpu import parse_gpu
from cloudmodal.placement import PlacementPolicy, rank
from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, clear_cache, load_offer_table

# The real catalog snapshot beside the repository (as tests/pricing/catalog_fixtures.py finds it).
SHARED_CATALOG = Path(__file__).resolve().parents[3] / "shared" / "pricing" / "catalogs" / "v8"

APP = """
import cloudmodal

app = cloudmodal.App("plan-demo")


@app.function(gpu=["H100", "A100-80GB"], min_containers=1, max_containers=3)
def train(x: int) -> int:
    return x


@app.function(gpu="L4", spot="never", region=["us-east4", "us-central1"], max_price_per_hour=1.0)
def infer(x: int) -> int:
    return x


@app.function(gpu="A100-80GB", cloud="gcp")
def tune(x: int) -> int:
    return x


@app.function()
def prep(x: int) -> int:
    return x
"""


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
    p = tmp_path / "plan_demo_app.py"
    p.write_text(APP)
    home = tmp_path / "cloudmodal-home"
    monkeypatch.setenv("CLOUDMODAL_HOME", str(home))
    monkeypatch.setenv("CLOUDMODAL_SERVER_URL", "http://127.0.0.1:9")  # discard port: nothing answers
    monkeypatch.setenv("CLOUDMODAL_TOKEN", "unused")
    monkeypatch.setenv("CLOUDMODAL_FAKE_GPUS", "none")
    monkeypatch.delenv("CLOUDMODAL_PROVIDERS", raising=False)
    return p


def plan(app_file: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = CliRunner().invoke(app, ["deploy", str(app_file), "--dry-run", "--json", *args], env=env)
    assert r.exit_code == 0, r.output
    out: dict[str, Any] = json.loads(r.stdout)
    # a dry run creates no state (no embedded control plane) and contacts nothing
    assert not (app_file.parent / "cloudmodal-home").exists()
    return out


def functions(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["function"]: f for f in out["functions"]}


def test_chosen_offer_and_fallbacks_are_ranks_candidates(app_file: Path, catalog: Path) -> None:
    out = plan(app_file, "--all-clouds")
    table = load_offer_table(catalog)
    assert out["dry_run"] is True and out["app"] == "plan-demo"
    assert out["clouds"] == list(table.clouds()) and "--all-clouds" in out["scope"]
    train = functions(out)["train"]
    assert train["gpu"] == ["H100", "A100-80GB"]
    expected = rank(parse_gpu(["H100", "A100-80GB"]), table, policy=PlacementPolicy(), limit=6).candidates
    assert train["chosen"] == expected[0].to_dict()
    assert train["fallbacks"] == [c.to_dict() for c in expected[1:6]]
    price = expected[0].price
    assert train["price_per_hour_at_min"] == pytest.approx(price * 1)
    assert train["price_per_hour_at_max"] == pytest.approx(price * 3)


def test_the_functions_policy_is_used(app_file: Path, catalog: Path) -> None:
    out = functions(plan(app_file, "--all-clouds", "--fallbacks", "2"))
    table = load_offer_table(catalog)
    infer = out["infer"]
    policy = PlacementPolicy(
        spot="never", regions=frozenset(["us-east4", "us-central1"]), max_price_per_hour=1.0
    )
    expected = rank(parse_gpu("L4"), table, policy=policy, limit=3).candidates
    assert infer["policy"] == policy.to_dict()
    assert [infer["chosen"], *infer["fallbacks"]] == [c.to_dict() for c in expected]
    assert all(
        c["market"] == "on-demand" and c["price"] <= 1.0 for c in [infer["chosen"], *infer["fallbacks"]]
    )
    assert infer["price_per_hour_at_min"] == 0.0  # min_containers=0
    assert infer["max_containers"] is None and infer["price_per_hour_at_max"] == "unbounded"

    tune = out["tune"]
    gcp = rank(
        parse_gpu("A100-80GB"), table, policy=PlacementPolicy(clouds=frozenset(["gcp"])), limit=1
    ).candidates
    assert tune["chosen"] == gcp[0].to_dict()

    prep = out["prep"]
    assert prep["cpu_only"] is True and prep["chosen"] is None and "local/CPU" in prep["note"]


def test_only_enabled_clouds_are_planned(app_file: Path, catalog: Path) -> None:
    out = plan(app_file, env={"CLOUDMODAL_PROVIDERS": "local,lambda"})
    assert out["clouds"] == ["lambda"] and "enabled" in out["scope"]
    got = functions(out)
    table = load_offer_table(catalog)
    lam = rank(
        parse_gpu(["H100", "A100-80GB"]), table, policy=PlacementPolicy(clouds=frozenset(["lambda"])), limit=6
    )
    assert got["train"]["chosen"] == lam.candidates[0].to_dict()
    assert {c["cloud"] for c in got["train"]["fallbacks"]} == {"lambda"}
    assert got["tune"]["chosen"] is None and "cloud='gcp', which is not enabled" in got["tune"]["note"]

    # the default: no cloud enabled, so no cloud offer, and the hint to look at all of them
    out = plan(app_file)
    assert out["clouds"] == [] and "--all-clouds" in out["scope"]
    assert functions(out)["train"]["chosen"] is None
    assert functions(out)["train"]["note"] == "no cloud offer: no cloud is enabled"


def test_a_local_gpu_is_named(app_file: Path, catalog: Path) -> None:
    out = plan(app_file, "--all-clouds", env={"CLOUDMODAL_FAKE_GPUS": "A100-80GB:1"})
    assert functions(out)["train"]["local_tier"] == "A100-80GB"
    assert functions(out)["infer"]["local_tier"] is None


def test_no_offer_says_why(app_file: Path, catalog: Path, tmp_path: Path) -> None:
    p = tmp_path / "plan_capped_app.py"
    p.write_text(
        "import cloudmodal\napp = cloudmodal.App('capped')\n"
        "@app.function(gpu='H100:8', max_price_per_hour=0.5)\ndef f() -> None: ...\n"
    )
    f = functions(plan(p, "--all-clouds"))["f"]
    assert f["chosen"] is None and "max_price" in f["note"] and f["rejections"]["max_price"] > 0


def test_table_view(app_file: Path, catalog: Path) -> None:
    r = CliRunner().invoke(app, ["deploy", str(app_file), "--dry-run", "--all-clouds", "--fallbacks", "1"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["function", "#", "cloud"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [(row[0], row[1]) for row in rows] == [
        ("train", "chosen"),
        ("train", "1"),
        ("infer", "chosen"),
        ("infer", "1"),
        ("tune", "chosen"),
        ("tune", "1"),
    ]
    # the summaries (stderr when piped): bounds, the CPU-only function, what was planned over
    assert "Dry run: app 'plan-demo' is not deployed" in r.stderr
    assert "train: gpu H100 → A100-80GB; at min_containers=1:" in r.stderr
    assert "infer: gpu L4; at min_containers=0: $0.00/h, at max_containers=None: unbounded" in r.stderr
    assert "prep: runs on local/CPU" in r.stderr


def test_an_app_without_a_name_is_refused_as_deploy_would(tmp_path: Path, app_file: Path) -> None:
    p = tmp_path / "plan_nameless_app.py"
    p.write_text("import cloudmodal\napp = cloudmodal.App()\n@app.function()\ndef f() -> None: ...\n")
    r = CliRunner().invoke(app, ["deploy", str(p), "--dry-run"])
    assert r.exit_code == 2 and "needs a name" in r.stderr
    r = CliRunner().invoke(app, ["deploy", str(p), "--dry-run", "--json", "--name", "given"])
    assert r.exit_code == 0 and json.loads(r.stdout)["app"] == "given"


def test_plan_options_need_dry_run(app_file: Path) -> None:
    r = CliRunner().invoke(app, ["deploy", str(app_file), "--json"])
    assert r.exit_code == 2 and "go with --dry-run" in r.stderr
    assert not (app_file.parent / "cloudmodal-home").exists()
