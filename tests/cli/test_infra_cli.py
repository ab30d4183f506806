"""``cloudmodal infra preview|up|destroy|outputs`` through typer's runner, against a stand-in for the ``pulumi``
executable (``tests/infra/pulumi_standin.py``: the CLI boundary only; it does not run the program), with the
real Automation API, state directory, outputs file and settings mapping; and the missing-CLI error in a real
subprocess with an empty PATH."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cloudmodal.cli import infra_cmd
from cloudmodal.infra import outputs

STANDIN = Path(__file__).parents[1] / "infra" / "pulumi_standin.py"


def _load_standin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pulumi_standin_cli", STANDIN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


standin = _load_standin()

OUTS = {
    "bucket_url": "s3://cloudmodal-store-9f8e",
    "bucket_region": "eu-west-1",
    "volume_store": "s3://cloudmodal-store-9f8e/volumes",
    "blob_store": "s3://cloudmodal-store-9f8e/blobs",
    "volume_store_region": "aws:eu-west-1",
    "worker_identity": "cloudmodal-worker",
    "network": "sg-0abc",
    "db_password": "not-for-your-eyes",
}


class Sandbox:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.dir = tmp_path / "standin"
        self.home = tmp_path / "cmhome"
        self.orig_path = os.environ.get("PATH", os.defpath)
        standin.install(self.bin, self.dir)
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{self.orig_path}")
        monkeypatch.setenv("PULUMI_STANDIN_DIR", str(self.dir))
        monkeypatch.setenv("HOME", str(tmp_path / "userhome"))
        monkeypatch.setenv("CLOUDMODAL_HOME", str(self.home))
        for k in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE", "PULUMI_BACKEND_URL"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
        (self.dir / "outputs.json").write_text(json.dumps({"outputs": OUTS, "secret": ["db_password"]}))

    def run(self, *args: str, code: int = 0, input: str | None = None) -> Result:
        r = CliRunner().invoke(infra_cmd.app, list(args), input=input)
        assert r.exit_code == code, (
            f"infra {' '.join(args)} -> {r.exit_code}\n{r.stdout}\n{r.stderr}\n{r.exception!r}"
        )
        return r

    def commands(self) -> list[list[str]]:
        return standin.commands(self.dir)

    def ops(self) -> list[str]:
        """The operations asked of the CLI: preview, up, destroy."""
        return [c[0] for c in self.commands() if c[0] in ("preview", "up", "destroy")]

    def calls(self) -> list[dict[str, Any]]:
        return standin.calls(self.dir)


@pytest.fixture
def sb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    return Sandbox(tmp_path, monkeypatch)


def test_unknown_cloud_lists_the_clouds(sb: Sandbox) -> None:
    r = sb.run("preview", "--cloud", "oracle", code=2)
    assert "unknown cloud 'oracle'" in r.stderr and "aws, gcp, azure, lambda" in r.stderr
    assert sb.commands() == []  # refused before Pulumi was asked anything
    sb.run("preview", "--cloud", "AWS")  # negative control: a known one (any case) goes through
    assert sb.ops() == ["preview"]


def test_lambda_says_what_to_use_instead_without_asking_pulumi(sb: Sandbox) -> None:
    r = sb.run("up", "--cloud", "lambda", "--yes", code=2)
    assert "Lambda Cloud has no buckets" in r.stderr and "--cloud aws|gcp|azure" in r.stderr
    assert sb.commands() == []


def test_bad_options_are_refused_before_pulumi(sb: Sandbox) -> None:
    r = sb.run("up", "--cloud", "gcp", "--yes", code=2)
    assert "GCP needs a project" in r.stderr
    r = sb.run("up", "--cloud", "aws", "--control-plane-cidr", "0.0.0.0/0", "--yes", code=2)
    assert "whole internet" in r.stderr
    r = sb.run("up", "--cloud", "aws", "--backend", "ftp://x/y", "--yes", code=2)
    assert "s3://bucket" in r.stderr
    key = sb.tmp / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxxx\n-----END OPENSSH PRIVATE KEY-----\n")
    r = sb.run("up", "--cloud", "aws", "--with-control-host", "--ssh-public-key", str(key), "--yes", code=2)
    assert "is a private key" in r.stderr
    assert sb.ops() == []


def test_missing_cli_in_a_real_process(sb: Sandbox) -> None:
    """An empty PATH and HOME: the command names the CLI and how to install it, and writes no state."""
    code = "from cloudmodal.cli.infra_cmd import app; app()"
    env = {**os.environ, "PATH": str(sb.tmp / "empty"), "HOME": str(sb.tmp / "nohome")}
    r = subprocess.run(
        [sys.executable, "-c", code, "up", "--cloud", "aws", "--yes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Pulumi CLI (`pulumi`) is not installed" in r.stderr
    assert (
        "https://www.pulumi.com/docs/install/" in r.stderr
        and "curl -fsSL https://get.pulumi.com | sh" in r.stderr
    )
    assert "Traceback" not in r.stderr
    assert not (sb.home / "infra" / "passphrase").exists() and not (sb.home / "infra" / "state").exists()
    # negative control: the same process with the stand-in on PATH succeeds
    env["PATH"] = f"{sb.bin}{os.pathsep}{sb.orig_path}"
    r = subprocess.run(
        [sys.executable, "-c", code, "up", "--cloud", "aws", "--yes", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["volume_store"] == OUTS["volume_store"]


def test_up_yes_writes_the_outputs(sb: Sandbox) -> None:
    r = sb.run("up", "--cloud", "aws", "--region", "eu-west-1", "--yes", "--json")
    assert sb.ops() == ["up"]  # --yes: no preview first
    shown = json.loads(r.stdout)
    assert shown["bucket_url"] == OUTS["bucket_url"] and shown["db_password"] == "[secret]"
    assert "not-for-your-eyes" not in r.stdout + r.stderr
    assert "CLOUDMODAL_VOLUME_STORE=s3://cloudmodal-store-9f8e/volumes" in r.stderr
    assert "Updating (stand-in):" in r.stderr  # Pulumi's own output streams to stderr

    path = sb.home / "infra" / "aws.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["outputs"] == OUTS and doc["secret"] == ["db_password"]
    assert doc["backend"] == (sb.home / "infra" / "state").resolve().as_uri()
    assert doc["config"]["region"] == "eu-west-1" and doc["project"] == "cloudmodal"
    set_all = next(c for c in sb.commands() if c[:2] == ["config", "set-all"])
    assert "aws:region=eu-west-1" in set_all

    # the control plane's settings, from the file just written
    assert outputs.settings_overrides(sb.home) == {
        "volume_store": "s3://cloudmodal-store-9f8e/volumes",
        "blob_store": "s3://cloudmodal-store-9f8e/blobs",
        "volume_store_region": "aws:eu-west-1",
    }


def test_up_shows_a_preview_and_asks(sb: Sandbox) -> None:
    r = sb.run("up", "--cloud", "aws", input="n\n", code=1)
    assert sb.ops() == ["preview"]  # previewed, then refused: nothing applied
    assert "create\t7" in r.stdout and "Apply these changes to aws?" in r.stdout and "Aborted." in r.stderr
    assert not (sb.home / "infra" / "aws.json").exists()
    sb.run("up", "--cloud", "aws", input="y\n")  # negative control: accepted, applied
    assert sb.ops() == ["preview", "preview", "up"]
    assert (sb.home / "infra" / "aws.json").exists()
    # nothing left to change: the preview shows it and `up` runs without asking (it refreshes the outputs)
    r = sb.run("up", "--cloud", "aws")
    assert sb.ops()[-2:] == ["preview", "up"] and "Apply these changes" not in r.stdout


def test_preview_changes_nothing(sb: Sandbox) -> None:
    r = sb.run("preview", "--cloud", "azure", "--region", "westeurope", "--json")
    doc = json.loads(r.stdout)
    assert doc["changes"] == {"create": 7} and doc["stack"] == "azure"
    assert sb.ops() == ["preview"] and not (sb.home / "infra" / "azure.json").exists()
    assert any(
        "azure-native:location=westeurope" in c for c in sb.commands() if c[:2] == ["config", "set-all"]
    )


def test_destroy_asks_unless_yes(sb: Sandbox) -> None:
    sb.run("up", "--cloud", "aws", "--yes")
    r = sb.run("destroy", "--cloud", "aws", input="n\n", code=1)
    assert "Destroy every resource" in r.stdout and "Aborted." in r.stderr
    assert "destroy" not in sb.ops() and (sb.home / "infra" / "aws.json").exists()
    r = sb.run("destroy", "--cloud", "aws", "--yes")
    assert sb.ops()[-1] == "destroy" and "delete\t7" in r.stdout
    assert not (sb.home / "infra" / "aws.json").exists()  # the control plane forgets the bucket
    assert outputs.settings_overrides(sb.home) == {}


def test_destroy_of_nothing_names_up(sb: Sandbox) -> None:
    r = sb.run("destroy", "--cloud", "gcp", "--project", "my-project-123", "--yes", code=1)
    assert "no stack 'gcp'" in r.stderr and "cloudmodal infra up --cloud gcp" in r.stderr


def test_later_commands_reuse_what_up_used(sb: Sandbox) -> None:
    """`up` with a project, a region and an s3 backend; `outputs` and `destroy` name none of them again."""
    sb.run(
        "up", "--cloud", "gcp", "--project", "my-project-123", "--region", "europe-west1",
        "--backend", "s3://team-state/pulumi", "--yes",
    )  # fmt: skip
    sb.run("outputs", "--cloud", "gcp", "--json")
    sb.run("destroy", "--cloud", "gcp", "--yes")
    stack_calls = [c for c in sb.calls() if c["argv"][-2:] == ["--stack", "gcp"]]
    assert len(stack_calls) >= 8  # select/init/config/up/outputs/history, outputs, select/destroy/history
    assert {c["env"]["PULUMI_BACKEND_URL"] for c in stack_calls} == {"s3://team-state/pulumi"}
    assert [c["argv"][1] for c in stack_calls if c["argv"][1] in ("up", "destroy")] == ["up", "destroy"]
    assert not (sb.home / "infra" / "state").exists()  # no local state for a bucket backend
    # negative control: an explicit --backend elsewhere finds no stack there
    sb.run("up", "--cloud", "gcp", "--project", "my-project-123", "--yes")
    r = sb.run("outputs", "--cloud", "gcp", "--backend", "gs://other-state", code=1)
    assert "no stack 'gcp'" in r.stderr


def test_outputs_table_json_write_and_cached(sb: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    sb.run("up", "--cloud", "aws", "--yes")
    path = sb.home / "infra" / "aws.json"
    path.unlink()
    r = sb.run("outputs", "--cloud", "aws")
    assert "bucket_url\ts3://cloudmodal-store-9f8e" in r.stdout and "db_password\t[secret]" in r.stdout
    assert not path.exists()  # reading does not write ...
    r = sb.run("outputs", "--cloud", "aws", "--json", "--show-secrets", "--write")
    assert json.loads(r.stdout)["db_password"] == "not-for-your-eyes"
    assert json.loads(path.read_text())["outputs"] == OUTS  # ... --write does

    # --cached reads the file, without the Pulumi CLI
    before = len(sb.calls())
    monkeypatch.setenv("PATH", str(sb.tmp / "empty"))
    r = sb.run("outputs", "--cloud", "aws", "--cached", "--json")
    assert json.loads(r.stdout)["network"] == "sg-0abc" and len(sb.calls()) == before
    r = sb.run("outputs", "--cloud", "aws", code=1)  # negative control: without --cached it needs the CLI
    assert "Pulumi CLI (`pulumi`) is not installed" in r.stderr
    r = sb.run("outputs", "--cloud", "azure", "--cached", code=2)
    assert "no outputs of azure" in r.stderr


def test_a_pulumi_failure_is_one_clear_line(sb: Sandbox) -> None:
    (sb.dir / "fail").write_text("up\nerror: creating S3 Bucket (cloudmodal-store): AccessDenied\n")
    r = sb.run("up", "--cloud", "aws", "--yes", code=1)
    assert "pulumi up of stack 'aws' failed" in r.stderr and "AccessDenied" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (sb.home / "infra" / "aws.json").exists()
