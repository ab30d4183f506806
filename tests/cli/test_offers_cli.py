"""``cloudmodal offers``: table, JSON, filters and errors, on a catalog the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudmodal.cli.main import app
from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, clear_cache

HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone"
CATALOG = {
    "aws": [
        "p5.4xlarge,H100,1.0,16.0,256.0,,6.88,2.5,us-east-1,use1-az1",
        "p5.48xlarge,H100,8.0,192.0,2048.0,,55.04,12.0,us-east-1,use1-az1",
        "p4d.24xlarge,A100,8.0,96.0,1152.0,,21.96,8.1,us-west-2,usw2-az1",
        "g5.2xlarge,A10G,1.0,8.0,32.0,,1.21,0.4,us-west-2,usw2-az2",
    ],
    "lambda": [
        "gpu_1x_h100_pcie,H100,1.0,26.0,200.0,,2.49,,us-east-1,",
        "gpu_2x_a100,A100,2.0,60.0,450.0,,2.58,,us-west-1,",
    ],
}


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "v8"
    for cloud, rows in CATALOG.items():
        (d / cloud).mkdir(parents=True)
        (d / cloud / "vms.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    monkeypatch.setenv(CATALOG_DIR_ENV, str(d))
    clear_cache()
    return d


def offers(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["offers", *args], env={"COLUMNS": "200"})
    return r.exit_code, r.stdout, r.output


def test_table_lists_ranked_offers(catalog: Path) -> None:
    code, out, _ = offers("H100", "A100-40GB:2")
    assert code == 0, out
    lines = out.splitlines()[1:]  # piped: a header, then one tab-separated line per offer
    assert len(lines) == 4
    assert "gpu_1x_h100_pcie" in lines[0] and "on-demand" in lines[0]
    assert "p5.4xlarge" in lines[1] and "spot" in lines[1]
    assert "A100-40GB:2" in lines[3] and "lambda" in lines[3]
    assert "us-east-1/use1-az1" in out


def test_json_is_cheapest_first_with_both_prices(catalog: Path) -> None:
    code, out, _ = offers("H100", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["tiers"] == ["H100"] and data["total"] == 3
    got = [(c["cloud"], c["market"], c["price"]) for c in data["candidates"]]
    assert got == [("lambda", "on-demand", 2.49), ("aws", "spot", 2.5), ("aws", "on-demand", 6.88)]
    first = data["candidates"][0]
    assert (first["rank"], first["price_ondemand"], first["price_spot"], first["gpu"]) == (
        1,
        2.49,
        None,
        "H100",
    )


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--spot"], [("aws", "spot")]),
        (["--on-demand"], [("lambda", "on-demand"), ("aws", "on-demand")]),
        (["--cloud", "aws"], [("aws", "spot"), ("aws", "on-demand")]),
        (["--region", "us-east-1", "--cloud", "lambda"], [("lambda", "on-demand")]),
        (["--max-price", "2.49"], [("lambda", "on-demand")]),
        (["--top", "1"], [("lambda", "on-demand")]),
        (["--min-vcpus", "20"], [("lambda", "on-demand")]),
        (["--min-memory", "250"], [("aws", "spot"), ("aws", "on-demand")]),
    ],
)
def test_filters(catalog: Path, args: list[str], want: list[tuple[str, str]]) -> None:
    code, out, _ = offers("H100", "--json", *args)
    assert code == 0, out
    assert [(c["cloud"], c["market"]) for c in json.loads(out)["candidates"]] == want


def test_across_tiers(catalog: Path) -> None:
    code, out, _ = offers("H100:8", "A100-40GB:8", "--on-demand", "--across-tiers", "--json")
    assert code == 0
    got = [c["tier"] for c in json.loads(out)["candidates"]]
    assert got == ["A100-40GB:8", "H100:8"]


def test_a10g_is_the_a10_class(catalog: Path) -> None:
    code, out, _ = offers("A10G", "--json", "--on-demand")
    assert code == 0
    assert [c["instance_type"] for c in json.loads(out)["candidates"]] == ["g5.2xlarge"]


def test_no_match_is_not_an_error(catalog: Path) -> None:
    code, out, _ = offers("H200:8")
    assert code == 0 and "No offers for H200:8" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["H10"], "Did you mean 'H100'"),
        (["H100:9"], "1 to 8 GPUs"),
        (["A100:40GB"], "A100-40GB"),
        (["H100", "--spot", "--on-demand"], "exclude each other"),
        (["H100", "--cloud", "aws,awss"], "Unknown cloud 'awss': the catalog has aws, lambda"),
        (["H100", "--max-price", "0"], "max_price_per_hour"),
    ],
)
def test_bad_input_exits_2_with_the_fix(catalog: Path, args: list[str], message: str) -> None:
    code, _, output = offers(*args)
    assert code == 2
    assert message in output and "Traceback" not in output


def test_missing_catalog_exits_1_with_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CATALOG_DIR_ENV, str(tmp_path / "nothing"))
    clear_cache()
    code, _, output = offers("H100")
    assert code == 1
    assert "cloudmodal pricing refresh" in output and "Traceback" not in output
