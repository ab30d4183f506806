"""The smaller public APIs: ``enable_output``, ``Image.imports``, ``Image.uv_sync``, ``App.app_id``, the
``modal`` alias of :mod:`cloudmodal.compat` and the modules at Modal's addresses (pure parts; the programs in
``tests/conformance`` run them against a control plane)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cloudmodal
from cloudmodal.client import session as session_mod
from cloudmodal.exception import InvalidError

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ enable_output


def test_enable_output_is_exported_and_switches_worker_logs_on_for_the_block():
    from cloudmodal.output import enable_output

    assert cloudmodal.enable_output is enable_output and "enable_output" in cloudmodal.__all__
    assert not session_mod._output_enabled()
    with cloudmodal.enable_output(show_progress=False):
        assert session_mod._output_enabled()
        with cloudmodal.enable_output():
            assert session_mod._output_enabled()
        assert session_mod._output_enabled()  # the inner block restores what the outer one set
    assert not session_mod._output_enabled()


# ------------------------------------------------------------------------------------------ Image.imports


def test_imports_swallows_an_import_error_here(monkeypatch):
    monkeypatch.delenv("CLOUDMODAL_IS_REMOTE", raising=False)
    image = cloudmodal.Image.debian_slim()
    with image.imports():
        import cloudmodal_no_such_package_here  # noqa: F401

        raise AssertionError("not reached: the import fails first")
    assert "cloudmodal_no_such_package_here" not in sys.modules


def test_imports_raises_an_import_error_in_a_worker(monkeypatch):
    monkeypatch.setenv("CLOUDMODAL_IS_REMOTE", "1")
    with pytest.raises(ModuleNotFoundError, match="cloudmodal_no_such_package_here"):
        with cloudmodal.Image.debian_slim().imports():
            import cloudmodal_no_such_package_here  # noqa: F401


def test_imports_lets_other_errors_through_and_runs_the_block(monkeypatch):
    monkeypatch.delenv("CLOUDMODAL_IS_REMOTE", raising=False)
    with pytest.raises(ZeroDivisionError):
        with cloudmodal.Image.debian_slim().imports():
            1 / 0  # noqa: B018
    with cloudmodal.Image.debian_slim().imports():
        import json
    assert json.dumps([1]) == "[1]"


# ------------------------------------------------------------------------------------------ Image.uv_sync

PYPROJECT = """
[project]
name = "proj"
version = "0.1.0"
requires-python = ">=3.10"
dependencies = ["six>=1.16", "packaging"]

[project.optional-dependencies]
fast = ["orjson"]

[dependency-groups]
dev = ["pytest>=8", {include-group = "lint"}]
lint = ["ruff"]
"""


def project(tmp_path: Path, *, lock: str | None = "version = 1\n", pyproject: str = PYPROJECT) -> Path:
    d = tmp_path / "proj"
    d.mkdir(exist_ok=True)
    (d / "pyproject.toml").write_text(pyproject)
    if lock is not None:
        (d / "uv.lock").write_text(lock)
    return d


def test_uv_sync_records_the_files_and_the_declared_requirements(tmp_path):
    d = project(tmp_path)
    img = cloudmodal.Image.debian_slim().uv_sync(str(d), groups=["dev"], extras=["fast"])
    (layer,) = img.layers
    assert layer["op"] == "uv_sync" and layer["pyproject"] == PYPROJECT and layer["lock"] == "version = 1\n"
    assert layer["groups"] == ["dev"] and layer["extras"] == ["fast"] and layer["frozen"] is True
    # what the local provider checks against the host's interpreter: dependencies, then extras, then groups
    assert img.pip_packages == ["six>=1.16", "packaging", "orjson", "pytest>=8", "ruff"]
    assert cloudmodal.Image.debian_slim().uv_sync(d).pip_packages == ["six>=1.16", "packaging"]


def test_uv_sync_hash_follows_the_lock_file(tmp_path):
    d = project(tmp_path)
    first = cloudmodal.Image.debian_slim().uv_sync(d)
    assert cloudmodal.Image.debian_slim().uv_sync(d).hash == first.hash
    (d / "uv.lock").write_text("version = 1\n# another resolution\n")
    assert cloudmodal.Image.debian_slim().uv_sync(d).hash != first.hash


def test_uv_sync_round_trips_through_the_wire_form(tmp_path):
    img = cloudmodal.Image.debian_slim().uv_sync(project(tmp_path), groups=["lint"], uv_version="0.5.11")
    assert cloudmodal.Image.from_wire(img.to_wire()) == img


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: cloudmodal.Image.debian_slim().uv_sync(d / "nowhere"), ["no pyproject.toml", "uv_sync("]),
        (lambda d: cloudmodal.Image.debian_slim().uv_sync(project(d, lock=None)), ["no uv.lock", "uv lock"]),
        (
            lambda d: cloudmodal.Image.debian_slim().uv_sync(project(d), groups=["docs"]),
            ["group 'docs'", "dev"],
        ),
        (
            lambda d: cloudmodal.Image.debian_slim().uv_sync(project(d), extras=["gpu"]),
            ["extra 'gpu'", "fast"],
        ),
        (lambda d: cloudmodal.Image.debian_slim().uv_sync(project(d), groups="dev"), ["list of names"]),
        (
            lambda d: cloudmodal.Image.debian_slim().uv_sync(
                project(d, pyproject=PYPROJECT + "\n[tool.uv.workspace]\nmembers = ['a']\n")
            ),
            ["workspace", "uv export", "uv_pip_install"],
        ),
        (
            lambda d: cloudmodal.Image.debian_slim().uv_sync(project(d, pyproject="[project")),
            ["not valid TOML"],
        ),
        (lambda d: cloudmodal.Image.debian_slim().uv_sync(project(d), uv_version="latest!"), ["uv_version"]),
    ],
)
def test_uv_sync_refusals_say_what_to_do(tmp_path, make, words):
    with pytest.raises(InvalidError) as e:
        make(tmp_path)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_uv_sync_without_a_lock_when_not_frozen(tmp_path):
    img = cloudmodal.Image.debian_slim().uv_sync(project(tmp_path, lock=None), frozen=False)
    (layer,) = img.layers
    assert "lock" not in layer and layer["frozen"] is False
    assert "--frozen" not in img.render_setup_script()


def test_uv_sync_renders_a_sync_into_the_image_environment(tmp_path):
    img = cloudmodal.Image.debian_slim().uv_sync(
        project(tmp_path), groups=["dev"], extra_options="--no-cache"
    )
    script = img.render_setup_script(cloudmodal_requirement="cloudmodal==0.1.0")
    sync = next(line for line in script.splitlines() if " sync " in line)
    assert 'UV_PROJECT_ENVIRONMENT="$CLOUDMODAL_VENV" uv sync --python "$CLOUDMODAL_VENV/bin/python"' in sync
    for flag in ("--no-install-project", "--inexact", "--frozen", "--group dev", "--no-cache"):
        assert flag in sync, sync
    # cloudmodal goes in first; --inexact keeps it there
    assert script.index("cloudmodal==0.1.0") < script.index(" sync ")
    docker = img.render_dockerfile()
    assert (
        "UV_PROJECT_ENVIRONMENT=/usr/local uv sync" in docker
        and "pip install --quiet --no-cache-dir uv" in docker
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_uv_sync_setup_script_writes_the_project_files(tmp_path):
    """Run the layer's own lines (all but the sync) in bash: the files it writes are the project's."""
    img = cloudmodal.Image.debian_slim().uv_sync(project(tmp_path))
    body = [line for line in img.render_setup_script().split("# uv_sync\n", 1)[1].splitlines() if line]
    assert " sync " in body[-1]
    subprocess.run(["bash", "-euc", "\n".join(body[:-1])], check=True)
    target = Path(body[0].split()[-1])
    try:
        assert (target / "pyproject.toml").read_text() == PYPROJECT
        assert (target / "uv.lock").read_text() == "version = 1\n"
    finally:
        shutil.rmtree(target, ignore_errors=True)


# ------------------------------------------------------------------------------------------ App


def test_app_id_is_none_until_the_app_runs():
    assert cloudmodal.App("idle").app_id is None


@pytest.mark.parametrize("bad", ["", None, 3])
def test_lookup_refuses_a_non_name(bad):
    with pytest.raises(InvalidError, match="App.lookup"):
        cloudmodal.App.lookup(bad)


def test_lookup_refuses_another_environment():
    with pytest.raises(InvalidError, match="environment"):
        cloudmodal.App.lookup("x", environment_name="prod")


def test_add_local_python_source_keeps_dotted_submodules():
    img = cloudmodal.Image.debian_slim().add_local_python_source("pkg.sub", "pkg.sub.leaf")
    assert img.local_python_modules == ["pkg.sub", "pkg.sub.leaf"]
    with pytest.raises(InvalidError, match="importable module name"):
        cloudmodal.Image.debian_slim().add_local_python_source("pkg..sub")


# ------------------------------------------------------------------------------------------ Modal's module layout


def test_modules_at_modals_addresses():
    import cloudmodal.cls
    import cloudmodal.output
    import cloudmodal.runner

    assert callable(cloudmodal.runner.deploy_app) and callable(cloudmodal.runner.run_app)
    with pytest.raises(InvalidError, match="takes a cloudmodal.App"):
        cloudmodal.runner.deploy_app("my-app")

    assert cloudmodal.cls.Cls is cloudmodal.Cls and cloudmodal.cls.Obj.__name__ == "Obj"
    assert cloudmodal.output.enable_output is cloudmodal.enable_output
    for name in (
        "app",
        "functions",
        "image",
        "secret",
        "volume",
        "dict",
        "queue",
        "exception",
        "partial_function",
        "retries",
        "schedule",
        "cloud_bucket_mount",
    ):
        assert (REPO / "cloudmodal" / f"{name}.py").exists(), name


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def test_compat_aliases_modal_and_its_modules_to_cloudmodal():
    p = _run(
        """
        from cloudmodal.compat import modal
        import cloudmodal
        import modal.functions
        from modal.exception import NotFoundError
        from modal.cls import Cls
        from modal import App, enable_output
        import modal as m
        assert m is cloudmodal is modal and App is cloudmodal.App and Cls is cloudmodal.Cls
        assert modal.functions is cloudmodal.functions and NotFoundError is cloudmodal.exception.NotFoundError
        # the modules keep their own identity: cloudmodal.exception is still cloudmodal.exception
        assert cloudmodal.__spec__.name == "cloudmodal" and cloudmodal.exception.__spec__.name == "cloudmodal.exception"
        try:
            import modal.billing
        except ModuleNotFoundError as e:
            print("MISSING", e)
        print("OK")
        """
    )
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout and "MISSING No module named 'modal.billing': cloudmodal has no" in p.stdout


def test_without_compat_there_is_no_modal_alias():
    """The negative control: `import cloudmodal` alone does not claim the name `modal`."""
    p = _run(
        """
        import sys, cloudmodal
        sys.modules.pop("modal", None)
        try:
            import modal
        except ModuleNotFoundError:
            print("NO MODAL")
        else:
            print("REAL MODAL" if modal is not cloudmodal else "ALIASED")
        """
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() in ("NO MODAL", "REAL MODAL")


def test_compat_refuses_when_the_real_modal_is_already_imported():
    p = _run(
        """
        import sys, types
        sys.modules["modal"] = types.ModuleType("modal")  # stands in for the real package
        try:
            import cloudmodal.compat
        except ImportError as e:
            print("REFUSED", e)
        """
    )
    assert "REFUSED The real `modal` package is already imported" in p.stdout, p.stderr


def test_error_is_modals_base_exception_at_the_top_level():
    assert cloudmodal.Error is cloudmodal.exception.Error and "Error" in cloudmodal.__all__
    assert issubclass(cloudmodal.exception.NotFoundError, cloudmodal.Error)


def test_a_worker_rebuilding_an_image_does_not_need_its_local_files(tmp_path, monkeypatch):
    """A worker imports the program again, which rebuilds its images; the files they read (a uv project, a
    requirements file, often found next to ``__file__``) are not on the worker's machine."""
    gone = tmp_path / "not-shipped"
    monkeypatch.setenv("CLOUDMODAL_IS_REMOTE", "1")
    cloudmodal.Image.debian_slim().uv_sync(gone).pip_install_from_requirements(gone / "requirements.txt")
    cloudmodal.Image.debian_slim().uv_pip_install(requirements=[str(gone / "requirements.txt")])
    monkeypatch.delenv("CLOUDMODAL_IS_REMOTE")  # the negative control: here, missing files are errors
    with pytest.raises(InvalidError, match="no pyproject.toml"):
        cloudmodal.Image.debian_slim().uv_sync(gone)
    with pytest.raises(InvalidError, match="not found"):
        cloudmodal.Image.debian_slim().pip_install_from_requirements(gone / "requirements.txt")
