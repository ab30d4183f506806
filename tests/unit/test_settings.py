"""cloudmodal.settings: every CLOUDMODAL_* variable the code names is declared, documented and validated."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cloudmodal.exception import InvalidError
from cloudmodal.settings import PREFIX, Settings, SettingsError, markdown_table, settings

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("cloudmodal", "providers", "pricing")
NAME = re.compile(r"CLOUDMODAL_[A-Z0-9_]+")
DECLARED = {Settings.env_name(f) for f in Settings.model_fields}


def _names_in_source() -> dict[str, set[str]]:
    """Every CLOUDMODAL_* name in the package's source -> the files naming it."""
    found: dict[str, set[str]] = {}
    for d in SOURCE_DIRS:
        for path in (REPO / d).rglob("*.py"):
            for name in NAME.findall(path.read_text(encoding="utf-8")):
                found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_variable_named_in_the_code_is_declared() -> None:
    found = _names_in_source()
    assert "CLOUDMODAL_LEASE_S" in found  # the scan sees the code
    undeclared = {}
    for name, files in found.items():
        if name.endswith("_"):  # a family in prose, e.g. ``CLOUDMODAL_RETENTION_*``
            ok = any(d.startswith(name) for d in DECLARED)
        else:
            ok = name in DECLARED
        if not ok:
            undeclared[name] = sorted(files)
    assert not undeclared, f"declare these in cloudmodal/settings.py (Settings): {undeclared}"


def test_fields_are_documented_grouped_and_named_by_their_variable() -> None:
    for field, info in Settings.model_fields.items():
        assert info.description and "\n" not in info.description, field
        assert Settings.group(field) in ("client", "control plane", "worker", "catalog", "sim"), field
        assert Settings.env_name(field) == PREFIX + field.upper()
    assert Settings.set_by_cloudmodal("worker_id") and Settings.set_by_cloudmodal("credentials")
    assert not Settings.set_by_cloudmodal("lease_s")


def _readme_table() -> str:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "Every `CLOUDMODAL_*` setting" in line)
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


def test_the_readme_table_lists_every_variable_with_its_default_and_meaning() -> None:
    table = _readme_table()
    documented = set(re.findall(r"^\| `(CLOUDMODAL_[A-Z0-9_]+)`", table, flags=re.MULTILINE))
    assert documented == DECLARED
    assert table == markdown_table(), (
        "README.md's configuration table is out of date: replace it with `python -m cloudmodal.settings`"
    )


def test_defaults_with_an_empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings({})
    assert s.lease_s == 30.0 and s.providers == ("local",) and s.max_payload_bytes == 1024**3
    assert s.home is None and s.token is None and s.allow_inert is False
    assert not s.is_set("lease_s")


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"CLOUDMODAL_LEASE_S": "2.5"}, "lease_s", 2.5),
        ({"CLOUDMODAL_PROVIDERS": " local, sim ,"}, "providers", ("local", "sim")),
        ({"CLOUDMODAL_SPOT_SETTINGS": '{"probe_interval_s": 30}'}, "spot_settings", {"probe_interval_s": 30}),
        ({"CLOUDMODAL_ALLOW_INERT": "YES"}, "allow_inert", True),
        ({"CLOUDMODAL_ALLOW_INERT": "0"}, "allow_inert", False),
        ({"CLOUDMODAL_ALLOW_INERT": ""}, "allow_inert", False),  # empty is unset
        ({"CLOUDMODAL_HOME": "/x/y"}, "home", Path("/x/y")),
        ({"CLOUDMODAL_SIM_SEED": "42"}, "sim_seed", 42),
        ({"cloudmodal_lease_s": "9"}, "lease_s", 30.0),  # only the upper-case names
    ],
)
def test_values_are_parsed_by_type(env: dict[str, str], field: str, value: object) -> None:
    assert getattr(settings(env), field) == value


@pytest.mark.parametrize(
    ("name", "raw", "why"),
    [
        ("CLOUDMODAL_LEASE_S", "abc", "valid number"),
        ("CLOUDMODAL_LEASE_S", "-1", "greater than 0"),
        ("CLOUDMODAL_BODY_BUDGET_BYTES", "1.5", "valid integer"),
        ("CLOUDMODAL_MAX_PAYLOAD_BYTES", "0", "greater than 0"),
        ("CLOUDMODAL_ALLOW_INERT", "maybe", "valid boolean"),
        ("CLOUDMODAL_GPU_FALLBACK", "gpu", "'cpu'"),
        ("CLOUDMODAL_SPOT_SETTINGS", "{", "not JSON"),
        ("CLOUDMODAL_SPOT_SETTINGS", "[1]", "JSON object"),
        ("CLOUDMODAL_PROVIDERS", ",", "provider names"),
        ("CLOUDMODAL_SIM_SEED", "x", "valid integer"),
        ("CLOUDMODAL_LOCAL_MAX_WORKERS", "0", "greater than 0"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(name: str, raw: str, why: str) -> None:
    with pytest.raises(SettingsError) as e:
        settings({name: raw, "CLOUDMODAL_HEARTBEAT_S": "1"})
    msg = str(e.value)
    assert msg.startswith(f"{name}={raw!r} is invalid:") and why in msg
    assert "HEARTBEAT" not in msg  # only the bad variable
    assert isinstance(e.value, InvalidError) and isinstance(e.value, ValueError)


def test_every_bad_variable_is_named() -> None:
    with pytest.raises(SettingsError) as e:
        settings({"CLOUDMODAL_LEASE_S": "abc", "CLOUDMODAL_SIM_SEED": "x"})
    assert "CLOUDMODAL_LEASE_S='abc'" in str(e.value) and "CLOUDMODAL_SIM_SEED='x'" in str(e.value)


def test_reads_follow_the_environment_and_are_cached_while_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDMODAL_LEASE_S", "7")
    first = settings()
    assert first.lease_s == 7.0 and first.is_set("lease_s")
    assert settings() is first  # same environment: the parsed settings are reused
    monkeypatch.setenv("CLOUDMODAL_LEASE_S", "8")
    assert settings().lease_s == 8.0
    monkeypatch.delenv("CLOUDMODAL_LEASE_S")
    assert settings().lease_s == 30.0 and not settings().is_set("lease_s")
    monkeypatch.setenv("CLOUDMODAL_LEASE_S", "7")
    assert settings().lease_s == 7.0
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")  # not part of the key
    assert settings().lease_s == 7.0


def test_secrets_stay_out_of_the_repr() -> None:
    s = settings(
        {"CLOUDMODAL_TOKEN": "cm_secret", "CLOUDMODAL_SECRET_KEY": "k3y", "CLOUDMODAL_DATABASE_URL": "pw"}
    )
    assert s.token == "cm_secret"
    assert "cm_secret" not in repr(s) and "k3y" not in repr(s) and "pw" not in repr(s)


def test_the_control_planes_own_defaults_match_the_declared_ones() -> None:
    from cloudmodal.server.limits import EdgeLimits
    from cloudmodal.server.service import Settings as ControlPlaneSettings

    cp = ControlPlaneSettings(database_url="sqlite://", state_dir=Path("."))
    for field in (
        "lease_s",
        "heartbeat_s",
        "worker_timeout_s",
        "worker_reconnect_s",
        "retention_calls_ephemeral_s",
        "retention_calls_deployed_s",
        "retention_logs_ephemeral_s",
        "retention_logs_deployed_s",
        "retention_interval_s",
    ):
        assert getattr(cp, field) == Settings.model_fields[field].default, field
    edge = EdgeLimits()
    assert edge.header_timeout_s == Settings.model_fields["header_timeout_s"].default
    assert edge.body_timeout_s == Settings.model_fields["body_timeout_s"].default
    assert edge.body_budget_bytes == Settings.model_fields["body_budget_bytes"].default
    assert edge.budget_wait_s == Settings.model_fields["body_budget_wait_s"].default


def test_import_cloudmodal_does_not_load_pydantic_settings() -> None:
    # Settings are imported where they are read: `import cloudmodal` (every run, every worker) stays light.
    out = subprocess.run(
        [sys.executable, "-c", "import sys, cloudmodal; print('pydantic_settings' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout.strip() == "False"
