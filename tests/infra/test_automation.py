"""The Automation API seam (``infra/automation.py``) and the outputs file (``infra/outputs.py``).

The real ``pulumi.automation`` runs against a stand-in for the ``pulumi`` executable (``pulumi_standin.py``, the
CLI boundary only): it logs every argv and answers with canned results. The stand-in does not run the program
(see its docstring); everything on our side (backend, stack, config, secrets provider, error mapping, outputs
file, settings) is real."""

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

from cloudmodal.exception import ConflictError, InvalidError, NotFoundError
from cloudmodal.infra import automation, outputs
from cloudmodal.infra.automation import InfraError, PulumiMissingError
from cloudmodal.infra.common import InfraConfig
from cloudmodal.settings import Settings

HERE = Path(__file__).parent


def load_standin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pulumi_standin", HERE / "pulumi_standin.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


standin = load_standin()

AWS_OUTPUTS = {
    "bucket_url": "s3://cloudmodal-store-1a2b3c",
    "bucket_region": "us-east-1",
    "volume_store": "s3://cloudmodal-store-1a2b3c/volumes",
    "blob_store": "s3://cloudmodal-store-1a2b3c/blobs",
    "volume_store_region": "aws:us-east-1",
    "worker_identity": "cloudmodal-worker",
    "network": "sg-0123456789abcdef0",
    "db_password": "hunter2-not-really",
}


class Env:
    """A sandbox: the stand-in first on PATH, its own HOME (no ~/.pulumi) and CLOUDMODAL_HOME."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = tmp_path / "bin"
        self.dir = tmp_path / "standin"
        self.home = tmp_path / "cmhome"
        standin.install(self.bin, self.dir)
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
        monkeypatch.setenv("PULUMI_STANDIN_DIR", str(self.dir))
        monkeypatch.setenv("HOME", str(tmp_path / "userhome"))
        monkeypatch.setenv("CLOUDMODAL_HOME", str(self.home))
        for k in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE", "PULUMI_BACKEND_URL"):
            monkeypatch.delenv(k, raising=False)
        self.set_outputs(AWS_OUTPUTS, secret=["db_password"])

    def set_outputs(self, values: dict[str, Any], secret: list[str] | None = None) -> None:
        (self.dir / "outputs.json").write_text(json.dumps({"outputs": values, "secret": secret or []}))

    def fail(self, command: str, message: str) -> None:
        (self.dir / "fail").write_text(f"{command}\n{message}\n")

    def commands(self) -> list[list[str]]:
        return standin.commands(self.dir)

    def calls(self) -> list[dict[str, Any]]:
        return standin.calls(self.dir)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -- the CLI and the SDK -------------------------------------------------------------------------------------
def test_missing_cli_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "userhome"))
    with pytest.raises(PulumiMissingError) as e:
        automation.pulumi_command()
    msg = str(e.value)
    assert "Pulumi CLI (`pulumi`) is not installed" in msg
    assert "https://www.pulumi.com/docs/install/" in msg and "curl -fsSL https://get.pulumi.com | sh" in msg
    assert "cloudmodal infra" in msg

    # negative control: the same lookup finds a CLI put on PATH ...
    standin.install(empty, tmp_path / "sd")
    monkeypatch.setenv("PULUMI_STANDIN_DIR", str(tmp_path / "sd"))
    assert automation.find_cli() == empty / "pulumi"
    assert str(automation.pulumi_command().version) == "3.200.0"  # it ran `pulumi version`


def test_cli_found_where_the_installer_puts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """~/.pulumi/bin is not on a shell's PATH until a new shell starts: it is found there too."""
    home = tmp_path / "userhome"
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(PulumiMissingError):
        automation.find_cli()
    standin.install(home / ".pulumi" / "bin", tmp_path / "sd")
    monkeypatch.setenv("PULUMI_STANDIN_DIR", str(tmp_path / "sd"))
    assert automation.find_cli() == home / ".pulumi" / "bin" / "pulumi"
    assert standin.commands(tmp_path / "sd") == []
    automation.pulumi_command()
    assert standin.commands(tmp_path / "sd") == [["version"]]


def test_old_cli_is_refused_naming_the_install(env: Env) -> None:
    (env.dir / "version").write_text("v3.150.0\n")
    with pytest.raises(InfraError) as e:
        automation.pulumi_command()
    assert "too old" in str(e.value) and "https://www.pulumi.com/docs/install/" in str(e.value)
    (env.dir / "version").write_text("v3.181.0\n")  # negative control: the minimum is accepted
    assert str(automation.pulumi_command().version) == "3.181.0"


BLOCK_PULUMI = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pulumi" or name.startswith("pulumi."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
if sys.argv[1] == "block":
    sys.meta_path.insert(0, Block())
from cloudmodal.infra import automation
try:
    automation.sdk()
except automation.PulumiMissingError as e:
    print("MISSING:", e)
else:
    print("OK")
"""


@pytest.mark.parametrize("mode", ["block", "open"])
def test_missing_sdk_names_the_extra(mode: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_PULUMI, mode], capture_output=True, text=True, timeout=120, check=True
    )
    if mode == "block":
        assert r.stdout.startswith("MISSING:"), r.stdout + r.stderr
        assert "pip install 'cloudmodal[pulumi]'" in r.stdout and "`pulumi` is missing" in r.stdout
    else:  # negative control: the same script without the hook finds the SDK
        assert r.stdout.strip() == "OK", r.stdout + r.stderr


# -- targets: backend, secrets, directories ------------------------------------------------------------------
def test_default_target_is_a_private_file_backend(env: Env) -> None:
    t = automation.target(InfraConfig("aws"), home=env.home)
    state = env.home / "infra" / "state"
    assert t.backend == state.resolve().as_uri() and t.backend.startswith("file:///")
    assert t.env["PULUMI_BACKEND_URL"] == t.backend
    assert (t.project, t.stack, t.secrets_provider) == ("cloudmodal", "aws", "passphrase")
    assert _mode(env.home / "infra") == 0o700 and _mode(state) == 0o700 and _mode(t.work_dir) == 0o700
    pp = Path(t.env["PULUMI_CONFIG_PASSPHRASE_FILE"])
    assert pp == env.home / "infra" / "passphrase" and _mode(pp) == 0o600
    secret = pp.read_text()
    assert len(secret) >= 40
    assert secret not in repr(t)  # the target carries the file's path, never the passphrase
    # made once: another target reuses it
    automation.target(InfraConfig("gcp", project="my-project-123"), home=env.home)
    assert pp.read_text() == secret


def test_a_looser_passphrase_file_is_tightened(env: Env) -> None:
    t = automation.target(InfraConfig("aws"), home=env.home)
    pp = Path(t.env["PULUMI_CONFIG_PASSPHRASE_FILE"])
    pp.chmod(0o644)
    automation.target(InfraConfig("aws"), home=env.home)
    assert _mode(pp) == 0o600


@pytest.mark.parametrize(
    ("backend", "provider", "passphrase"),
    [
        ("s3://team-pulumi-state/cloudmodal", "passphrase", True),
        ("gs://team-pulumi-state", "passphrase", True),
        ("azblob://state?storage_account=teamstate", "passphrase", True),
        ("https://api.pulumi.com", None, False),  # Pulumi Cloud seals secrets itself
    ],
)
def test_chosen_backend(env: Env, backend: str, provider: str | None, passphrase: bool) -> None:
    t = automation.target(InfraConfig("aws"), home=env.home, backend=backend)
    assert t.backend == backend and t.env["PULUMI_BACKEND_URL"] == backend
    assert t.secrets_provider == provider
    assert ("PULUMI_CONFIG_PASSPHRASE_FILE" in t.env) is passphrase
    assert not (env.home / "infra" / "state").exists()  # no local state made for a remote backend


def test_users_own_passphrase_or_kms_is_kept(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "the team's")
    t = automation.target(InfraConfig("aws"), home=env.home)
    assert "PULUMI_CONFIG_PASSPHRASE_FILE" not in t.env and not (env.home / "infra" / "passphrase").exists()
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE")
    t = automation.target(InfraConfig("aws"), home=env.home, secrets_provider="awskms://alias/pulumi")
    assert t.secrets_provider == "awskms://alias/pulumi" and "PULUMI_CONFIG_PASSPHRASE_FILE" not in t.env


@pytest.mark.parametrize(
    "backend",
    ["ftp://example.com/state", "relative/dir", "file://relative", "s3://", "https://user:pw@api.pulumi.com"],
)
def test_bad_backend_is_refused_naming_the_kinds(env: Env, backend: str) -> None:
    with pytest.raises(InvalidError) as e:
        automation.target(InfraConfig("aws"), home=env.home, backend=backend)
    assert "--backend" in str(e.value)


def test_bad_config_is_an_invalid_error(env: Env) -> None:
    with pytest.raises(InvalidError, match="GCP needs a project"):
        automation.target(InfraConfig("gcp"), home=env.home)
    with pytest.raises(InvalidError, match="whole internet"):
        automation.target(InfraConfig("aws", control_plane_cidrs=("0.0.0.0/0",)), home=env.home)


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (InfraConfig("aws"), {"aws:region": "us-east-1"}),
        (InfraConfig("aws", region="eu-west-1"), {"aws:region": "eu-west-1"}),
        (
            InfraConfig("gcp", project="my-project-123"),
            {"gcp:project": "my-project-123", "gcp:region": "us-central1"},
        ),
        (InfraConfig("azure", region="westeurope"), {"azure-native:location": "westeurope"}),
        (InfraConfig("lambda"), {}),
    ],
)
def test_stack_config(cfg: InfraConfig, expected: dict[str, str]) -> None:
    assert automation.stack_config(cfg) == expected


# -- operations against the stand-in CLI ----------------------------------------------------------------------
def test_preview_up_outputs_destroy(env: Env) -> None:
    t = automation.target(InfraConfig("aws", region="eu-west-1"), home=env.home)
    lines: list[str] = []

    assert automation.preview(t, on_output=lines.append) == {"create": standin.RESOURCES}
    assert "Previewing update (stand-in):" in lines
    cmds = env.commands()
    assert cmds[:4] == [
        ["version"],
        ["stack", "select", "--stack", "aws"],
        ["stack", "init", "aws", "--secrets-provider", "passphrase"],
        ["config", "set-all", "--stack", "aws", "--plaintext", "aws:region=eu-west-1"],
    ]
    pv = cmds[4]
    assert pv[0] == "preview" and pv[-2:] == ["--stack", "aws"]
    assert (
        pv[pv.index("--exec-kind") + 1] == "auto.inline"
    )  # the inline program, served by the language server
    last = env.calls()[-1]
    assert last["client_reachable"] is True  # ... which was listening when the CLI was called
    assert last["env"]["PULUMI_BACKEND_URL"] == t.backend
    assert last["env"]["PULUMI_CONFIG_PASSPHRASE_FILE"] == str(env.home / "infra" / "passphrase")
    # the workspace's Pulumi.yaml names the same backend and project
    project_yaml = (t.work_dir / "Pulumi.yaml").read_text()
    assert f"url: {t.backend}" in project_yaml and "name: cloudmodal" in project_yaml
    assert all(c["cwd"] == str(t.work_dir) for c in env.calls()[1:])

    out = automation.up(t, on_output=lines.append)
    assert out.values == AWS_OUTPUTS and out.secret == ("db_password",)
    up_cmd = next(c for c in env.commands() if c[0] == "up")
    assert up_cmd[:3] == ["up", "--yes", "--skip-preview"] and up_cmd[-2:] == ["--stack", "aws"]
    # the second open selected the existing stack and did not init it again
    assert sum(c[:2] == ["stack", "init"] for c in env.commands()) == 1

    assert automation.preview(t) == {"same": standin.RESOURCES}  # negative control: the state moved
    assert automation.outputs(t).values == AWS_OUTPUTS

    assert automation.destroy(t, on_output=lines.append) == {"delete": standin.RESOURCES}
    destroy_cmd = next(c for c in env.commands() if c[0] == "destroy")
    assert destroy_cmd[:3] == ["destroy", "--skip-preview", "--yes"]
    assert automation.outputs(t).values == {}

    # the passphrase never appeared on a command line, nor in the environment under its own name
    secret = (env.home / "infra" / "passphrase").read_text()
    assert all(secret not in " ".join(c["argv"]) for c in env.calls())
    assert not any(c["passphrase_in_env"] for c in env.calls())


def test_stacks_are_separate_per_backend_and_name(env: Env) -> None:
    a = automation.target(InfraConfig("aws"), home=env.home)
    automation.up(a)
    b = automation.target(InfraConfig("aws"), home=env.home, backend="s3://team-state")
    with pytest.raises(NotFoundError):  # the s3 backend has no stack yet
        automation.outputs(b)
    c = automation.target(InfraConfig("aws", name="team-b"), home=env.home)
    assert c.work_dir != a.work_dir and c.project == "team-b"
    with pytest.raises(NotFoundError):
        automation.outputs(c)
    assert automation.outputs(a).values == AWS_OUTPUTS  # negative control


def test_missing_stack_names_the_command(env: Env) -> None:
    t = automation.target(InfraConfig("azure"), home=env.home)
    for op in (automation.outputs, automation.destroy):
        with pytest.raises(NotFoundError) as e:
            op(t)
        assert "cloudmodal infra up --cloud azure" in str(e.value)
    assert not any(c[:2] == ["stack", "init"] for c in env.commands())  # outputs/destroy never create one


def test_locked_stack_is_a_conflict(env: Env) -> None:
    t = automation.target(InfraConfig("aws"), home=env.home)
    env.fail("up", "error: the stack is currently locked by 1 lock(s). Either wait for the other process(es)")
    with pytest.raises(ConflictError) as e:
        automation.up(t)
    assert "another update" in str(e.value) and "currently locked" in str(e.value)


def test_cloud_error_is_passed_on(env: Env) -> None:
    t = automation.target(InfraConfig("aws"), home=env.home)
    env.fail(
        "up", "error: creating S3 Bucket: AccessDenied: User is not authorized to perform s3:CreateBucket"
    )
    with pytest.raises(InfraError) as e:
        automation.up(t)
    assert "pulumi up of stack 'aws' failed" in str(e.value) and "s3:CreateBucket" in str(e.value)
    assert not isinstance(e.value, ConflictError)
    (env.dir / "fail").unlink()
    assert automation.up(t).values == AWS_OUTPUTS  # negative control


def test_cli_removed_between_check_and_run(env: Env) -> None:
    t = automation.target(InfraConfig("aws"), home=env.home)
    command = automation.pulumi_command()
    (env.bin / "pulumi").unlink()
    with pytest.raises(PulumiMissingError):
        automation.up(t, command=command)


# -- the outputs file and the settings it gives ----------------------------------------------------------------
def test_outputs_file_is_private_and_complete(tmp_path: Path) -> None:
    path = outputs.write_outputs(
        "aws",
        AWS_OUTPUTS,
        stack="aws",
        project="cloudmodal",
        backend="file:///x",
        config={"region": "us-east-1"},
        secret=["db_password"],
        home=tmp_path,
        now=100.0,
    )
    assert path == tmp_path / "infra" / "aws.json"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    doc = json.loads(path.read_text())
    assert doc["outputs"] == AWS_OUTPUTS and doc["secret"] == ["db_password"]
    assert (doc["cloud"], doc["stack"], doc["backend"], doc["written_at"]) == (
        "aws",
        "aws",
        "file:///x",
        100.0,
    )
    assert outputs.read_outputs("aws", tmp_path) == doc
    assert [p.name for p in path.parent.iterdir()] == ["aws.json"]  # no temporary file left behind
    assert outputs.remove_outputs("aws", tmp_path) and outputs.read_outputs("aws", tmp_path) is None
    assert not outputs.remove_outputs("aws", tmp_path)


def test_settings_overrides_from_outputs(tmp_path: Path) -> None:
    assert outputs.settings_overrides(tmp_path) == {}
    outputs.write_outputs("aws", AWS_OUTPUTS, stack="aws", project="p", backend="b", home=tmp_path, now=1.0)
    assert outputs.settings_overrides(tmp_path) == {
        "volume_store": "s3://cloudmodal-store-1a2b3c/volumes",
        "blob_store": "s3://cloudmodal-store-1a2b3c/blobs",
        "volume_store_region": "aws:us-east-1",
    }
    # a later cloud's stores win, all three together; a control host's URL comes with it
    gcp = {
        "bucket_url": "gs://cm-store",
        "bucket_region": "us-central1",
        "control_plane_url": "https://203.0.113.7:8765",
    }
    outputs.write_outputs("gcp", gcp, stack="gcp", project="p", backend="b", home=tmp_path, now=2.0)
    assert outputs.settings_overrides(tmp_path) == {
        "volume_store": "gs://cm-store/volumes",  # derived from the bucket when the program exported no store
        "blob_store": "gs://cm-store/blobs",
        "volume_store_region": "gcp:us-central1",
        "node_server_url": "https://203.0.113.7:8765",
    }
    # negative control: rewriting aws later makes it the latest again (the control host stays gcp's)
    outputs.write_outputs("aws", AWS_OUTPUTS, stack="aws", project="p", backend="b", home=tmp_path, now=3.0)
    got = outputs.settings_overrides(tmp_path)
    assert got["volume_store"].startswith("s3://") and got["volume_store_region"] == "aws:us-east-1"
    assert got["node_server_url"] == "https://203.0.113.7:8765"


def test_torn_outputs_file_configures_nothing(tmp_path: Path) -> None:
    outputs.infra_dir(tmp_path)
    (tmp_path / "infra" / "aws.json").write_text('{"outputs": {"volume_store": "s3://x/vol')
    assert outputs.settings_overrides(tmp_path) == {}


def test_azure_store_needs_its_account(tmp_path: Path) -> None:
    az = {"bucket_url": "az://cloudmodal", "bucket_region": "eastus", "storage_account": "cmstore1a2b"}
    outputs.write_outputs("azure", az, stack="azure", project="p", backend="b", home=tmp_path)
    assert outputs.environment_overrides(tmp_path) == {"AZURE_STORAGE_ACCOUNT_NAME": "cmstore1a2b"}
    assert outputs.settings_overrides(tmp_path)["volume_store_region"] == "azure:eastus"


def test_settings_read_outputs_below_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CLOUDMODAL_VOLUME_STORE", "CLOUDMODAL_BLOB_STORE", "CLOUDMODAL_VOLUME_STORE_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOUDMODAL_HOME", str(tmp_path))
    outputs.write_outputs("aws", AWS_OUTPUTS, stack="aws", project="p", backend="b", home=tmp_path)

    s = Settings()
    assert s.volume_store == "s3://cloudmodal-store-1a2b3c/volumes"
    assert s.blob_store == "s3://cloudmodal-store-1a2b3c/blobs"
    assert s.volume_store_region == "aws:us-east-1"
    # the environment wins
    monkeypatch.setenv("CLOUDMODAL_VOLUME_STORE", "/srv/volumes")
    assert Settings().volume_store == "/srv/volumes"
    assert Settings().blob_store == "s3://cloudmodal-store-1a2b3c/blobs"
    # cloudmodal's own settings read them too; another CLOUDMODAL_HOME has no outputs (the negative control)
    monkeypatch.delenv("CLOUDMODAL_VOLUME_STORE")
    assert Settings().volume_store == "s3://cloudmodal-store-1a2b3c/volumes"
    monkeypatch.setenv("CLOUDMODAL_HOME", str(tmp_path / "elsewhere"))
    assert Settings().volume_store is None


def test_aws_nodes_take_the_stacks_instance_profile_and_network(tmp_path: Path) -> None:
    from cloudmodal.server.app import default_settings, make_providers

    assert outputs.driver_options("aws", tmp_path) == {}  # no stack yet: nodes get no AWS identity
    outputs.write_outputs(
        "aws",
        {**AWS_OUTPUTS, "vpc_name": "cloudmodal-vpc"},
        stack="aws",
        project="p",
        backend="b",
        home=tmp_path,
    )
    assert outputs.driver_options("aws", tmp_path) == {
        "instance_profile": "cloudmodal-worker",
        "security_group": "sg-0123456789abcdef0",
        "vpc_name": "cloudmodal-vpc",
    }
    assert outputs.driver_options("gcp", tmp_path) == {}  # no GCP stack: SkyPilot's defaults
    # the control plane builds its AWS driver with them
    env = {"CLOUDMODAL_HOME": str(tmp_path), "CLOUDMODAL_PROVIDERS": "aws"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        providers = make_providers(default_settings(tmp_path / "cp"))
    driver = providers["aws"].driver
    assert (driver._instance_profile, driver._security_group, driver._vpc_name) == (
        "cloudmodal-worker",
        "sg-0123456789abcdef0",
        "cloudmodal-vpc",
    )


def test_gcp_nodes_take_the_stacks_service_account(tmp_path: Path) -> None:
    account = "cloudmodal-worker@p.iam.gserviceaccount.com"
    gcp = {"bucket_url": "gs://p-cloudmodal-store", "worker_identity": account, "network": "cloudmodal-net"}
    outputs.write_outputs("gcp", gcp, stack="gcp", project="p", backend="b", home=tmp_path)
    assert outputs.driver_options("gcp", tmp_path) == {"service_account": account}
    assert outputs.driver_options("azure", tmp_path) == {}
