"""``cloudmodal setup``: every cloud's verdict, with a sandboxed HOME and no credentials, and with drivers of
this file registered in cloudmodal's own cloud registry (``clouds.DRIVERS``) for a passing, raising and
hanging check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloudmodal.cli.main import app
from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, clear_cache
from cloudmodal.providers import clouds
from cloudmodal.providers.base import CredentialsError, LaunchRequest
from cloudmodal.providers.nodes import NodeDriver, NodeInfo, NodeRef

HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone"
CATALOG = {
    "aws": ["p5.4xlarge,H100,1.0,16.0,256.0,,6.88,2.5,us-east-1,use1-az1"],
    "gcp": [],  # a file with no offers: "none"
}

RELEASE = threading.Event()  # lets a hanging check end when its test is over


class _Driver(NodeDriver):
    """The parts of a driver `setup` does not use."""

    def offers(self) -> list[Any]:
        return []

    def create(self, req: LaunchRequest, *, name: str, tags: dict[str, str], ssh_public_key: str) -> NodeRef:
        raise NotImplementedError

    def list(self, tags: dict[str, str]) -> list[NodeInfo]:
        return []

    def query(self, ref: NodeRef) -> NodeInfo:
        raise NotImplementedError

    def terminate(self, ref: NodeRef) -> None:
        return None


class PassingDriver(_Driver):
    closed = 0

    def check(self) -> tuple[bool, str]:
        return True, "account 123456789012 (arn:aws:iam::123456789012:user/test)"

    def close(self) -> None:
        type(self).closed += 1


class RaisingDriver(_Driver):
    def check(self) -> tuple[bool, str]:
        raise RuntimeError("the SDK fell over")


class NoCredentialsDriver(_Driver):
    def __init__(self) -> None:
        raise CredentialsError("No key: run `export TESTCLOUD_KEY=<key>`.", reason="no-key")

    def check(self) -> tuple[bool, str]:
        raise AssertionError("never reached")


class HangingDriver(_Driver):
    def check(self) -> tuple[bool, str]:
        RELEASE.wait(60)
        return True, "too late"


def register(monkeypatch: pytest.MonkeyPatch, cloud: str, cls: type | str) -> None:
    """Point ``cloud`` at a driver class of this module (or at a module path that does not exist)."""
    if isinstance(cls, str):
        monkeypatch.setitem(clouds.DRIVERS, cloud, (cls, "Nodes", cloud))
    else:
        monkeypatch.setitem(clouds.DRIVERS, cloud, (__name__, cls.__name__, cloud))


@pytest.fixture(autouse=True)
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No credentials of the developer's, a small catalog, no fake GPUs, the default providers."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("CLOUDMODAL_PROVIDERS", "CLOUDMODAL_FAKE_GPUS", "LAMBDA_API_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    d = tmp_path / "v8"
    for cloud, rows in CATALOG.items():
        (d / cloud).mkdir(parents=True)
        (d / cloud / "vms.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    monkeypatch.setenv(CATALOG_DIR_ENV, str(d))
    clear_cache()
    RELEASE.clear()
    yield home
    RELEASE.set()
    clear_cache()


def setup(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    r = CliRunner().invoke(app, ["setup", "--json", *args], env=env)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r.exit_code, json.loads(r.stdout)


def by_cloud(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["cloud"]: c for c in out["clouds"]}


def test_no_credentials_every_cloud_says_what_is_missing(tmp_path: Path, sandbox: Path) -> None:
    """The real command in a fresh process with nothing but PATH and a sandboxed HOME."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(sandbox),
        "CLOUDMODAL_HOME": str(tmp_path / "cm"),
        "CLOUDMODAL_CACHE_DIR": str(tmp_path / "cache"),
        CATALOG_DIR_ENV: os.environ[CATALOG_DIR_ENV],
        "CLOUDMODAL_FAKE_GPUS": "none",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe for credentials
        "NO_GCE_CHECK": "true",  # nor a GCE metadata-server probe
    }
    proc = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "setup", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr  # this machine is usable for CPU work
    out = json.loads(proc.stdout)
    got = by_cloud(out)
    assert list(got) == [*clouds.CLOUDS, "local"]
    for cloud in clouds.CLOUDS:
        assert got[cloud]["usable"] is False, got[cloud]
        assert len(got[cloud]["detail"]) > 20, got[cloud]  # what is missing and how to fix it
        assert "Traceback" not in got[cloud]["detail"]
    assert got["local"]["usable"] is True and "no GPUs" in got["local"]["detail"]
    assert got["aws"]["catalog_offers"] == 1 and got["gcp"]["catalog_offers"] == 0
    assert got["lambda"]["catalog_offers"] == 0
    assert out["enabled"] == ["local"] and out["enable"] is None


def test_a_passing_driver_shows_usable_and_how_to_enable_it(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "aws", PassingDriver)
    PassingDriver.closed = 0
    code, out = setup("--cloud", "aws")
    assert code == 0
    aws = by_cloud(out)["aws"]
    assert aws["usable"] is True and "123456789012" in aws["detail"]
    assert aws["enabled"] is False and aws["catalog_offers"] == 1
    assert out["enable"] == "export CLOUDMODAL_PROVIDERS=local,aws"
    assert PassingDriver.closed == 1  # the driver is closed after its check

    code, out = setup("--cloud", "aws", env={"CLOUDMODAL_PROVIDERS": "local,aws"})
    assert by_cloud(out)["aws"]["enabled"] is True and out["enable"] is None


def test_table_view_marks_each_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "aws", PassingDriver)
    register(monkeypatch, "gcp", "cloudmodal.providers.no_such_driver")
    r = CliRunner().invoke(
        app, ["setup", "--cloud", "aws,gcp,local"], env={"CLOUDMODAL_PROVIDERS": "local,gcp"}
    )
    assert r.exit_code == 0
    lines = {line.split("\t")[0]: line.split("\t") for line in r.stdout.splitlines()[1:]}
    assert lines["aws"][1:4] == ["✓", "no", "1"]
    assert lines["gcp"][1:4] == ["✗", "yes", "none"]
    assert "no driver for cloud 'gcp'" in lines["gcp"][4]
    assert lines["local"][1] == "✓"
    # notes (stderr when piped): what is enabled, what is broken, how to enable the usable one
    assert "Enabled now (CLOUDMODAL_PROVIDERS): local, gcp." in r.stderr
    assert "Enabled but not usable: gcp" in r.stderr
    assert "export CLOUDMODAL_PROVIDERS=local,gcp,aws" in r.stderr


def test_raising_check_and_constructor_are_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "aws", RaisingDriver)
    register(monkeypatch, "lambda", NoCredentialsDriver)
    code, out = setup("--cloud", "aws", "--cloud", "lambda")
    assert code == 1  # nothing checked is usable
    got = by_cloud(out)
    assert got["aws"]["usable"] is False
    assert "RuntimeError: the SDK fell over" in got["aws"]["detail"]
    assert got["lambda"] == {
        "cloud": "lambda",
        "usable": False,
        "detail": "No key: run `export TESTCLOUD_KEY=<key>`.",
        "enabled": False,
        "catalog_offers": 0,
    }


def test_a_hanging_check_does_not_hold_up_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "aws", PassingDriver)
    register(monkeypatch, "lambda", HangingDriver)
    code, out = setup("--cloud", "lambda,aws", "--timeout", "0.5")
    assert code == 0
    got = by_cloud(out)
    assert got["aws"]["usable"] is True
    assert got["lambda"]["usable"] is False
    assert "no answer within 0.5 s" in got["lambda"]["detail"]
    assert "cloudmodal setup --cloud lambda --timeout 60" in got["lambda"]["detail"]


def test_unknown_cloud_is_a_usage_error() -> None:
    r = CliRunner().invoke(app, ["setup", "--cloud", "oracle"])
    assert r.exit_code == 2
    assert "Unknown cloud 'oracle'" in r.stderr and "aws" in r.stderr


def test_local_reports_this_machines_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = setup("--cloud", "local", env={"CLOUDMODAL_FAKE_GPUS": "H100:2"})
    assert code == 0
    local = by_cloud(out)["local"]
    assert local["usable"] is True and "2× H100" in local["detail"]
    assert local["catalog_offers"] is None and local["enabled"] is True
