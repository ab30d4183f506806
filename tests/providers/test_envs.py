"""Image environments: the current interpreter when it suffices, else a cached venv built once (offline)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloudmodal.providers import envs
from cloudmodal.providers.base import ImageBuildError
from cloudmodal.providers.envs import (
    READY_MARKER,
    env_dir,
    missing_requirements,
    requirement_satisfied,
    resolve_python,
)

# A PEP 517 backend in the package's own tree: building needs nothing from an index, so tests stay offline.
BACKEND = """
import base64, hashlib, os, zipfile

NAME, VERSION = "cmtinypkg", "0.1.0"


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    dist_info = f"{NAME}-{VERSION}.dist-info"
    files = {
        f"{NAME}/__init__.py": "VALUE = 42\\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\\n".join(record) + "\\n"
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return name
"""


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cmtinypkg")
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = []
            build-backend = "tinybackend"
            backend-path = ["."]

            [project]
            name = "cmtinypkg"
            version = "0.1.0"
            """
        )
    )
    (root / "tinybackend.py").write_text(BACKEND)
    return root


@pytest.mark.parametrize(
    "requirement, ok",
    [
        ("packaging", True),
        ("packaging>=1", True),
        ("Packaging", True),  # names are case-insensitive
        ("packaging<1", False),
        ("cm-surely-not-installed-xyz", False),
        ('cm-surely-not-installed-xyz; python_version < "3"', True),  # marker excludes it here
        ("cmtinypkg @ file:///tmp/cmtinypkg", False),  # URLs cannot be checked
        ("./some/local/path", False),
        ("--index-url=https://example.invalid", False),
        ("packaging[no-such-extra]", True),
    ],
)
def test_requirement_satisfied(requirement, ok):
    assert requirement_satisfied(requirement) is ok


def test_missing_requirements_keeps_order_and_skips_blanks():
    assert missing_requirements(["zz-missing-b", "packaging", " ", "aa-missing-a"]) == [
        "zz-missing-b",
        "aa-missing-a",
    ]


def test_satisfied_env_is_the_current_interpreter(tmp_path):
    assert resolve_python([], None, root=tmp_path) == sys.executable
    assert resolve_python(["packaging", "filelock>=3"], "im-abc", root=tmp_path) == sys.executable
    assert not (tmp_path / "envs").exists()


def test_env_dir_keys(tmp_path):
    a = env_dir(["x"], "im-123", root=tmp_path)
    assert a.parent == tmp_path / "envs" and a.name.startswith("im-123-py")
    assert env_dir(["b", "a"], None, root=tmp_path) == env_dir(["a", "b"], None, root=tmp_path)
    assert env_dir(["x"], "../../etc", root=tmp_path).parent == tmp_path / "envs"  # unsafe hash is hashed


def _run(python: str, code: str) -> str:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout


def test_builds_once_and_reuses(tmp_path, tiny_package, monkeypatch):
    pkgs = [str(tiny_package)]
    python = resolve_python(pkgs, "im-tiny", root=tmp_path, pip_args=("--no-index",))
    env = env_dir(pkgs, "im-tiny", root=tmp_path)
    assert python != sys.executable and Path(python).parent.parent == env
    assert (env / READY_MARKER).exists()

    out = _run(
        python,
        "import sys, cmtinypkg, cloudmodal, cloudmodal.providers.local, cloudpickle;"
        "sp = [(p.startswith(sys.prefix), i) for i, p in enumerate(sys.path) if p.endswith('site-packages')];"
        "print(cmtinypkg.VALUE, max(i for own, i in sp if own) < min(i for own, i in sp if not own))",
    )
    assert out.split() == ["42", "True"]  # the image's packages come first, cloudmodal still imports
    assert not requirement_satisfied("cmtinypkg")  # the parent environment is untouched

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt a ready env")

    monkeypatch.setattr(envs, "_build", no_rebuild)
    assert resolve_python(pkgs, "im-tiny", root=tmp_path, pip_args=("--no-index",)) == python


def test_half_built_env_is_rebuilt(tmp_path, tiny_package):
    pkgs = [str(tiny_package)]
    env = env_dir(pkgs, "im-half", root=tmp_path)
    (env / "bin").mkdir(parents=True)
    (env / "leftover").write_text("from a build that died")
    python = resolve_python(pkgs, "im-half", root=tmp_path, pip_args=("--no-index",))
    assert not (env / "leftover").exists() and (env / READY_MARKER).exists()
    assert _run(python, "import cmtinypkg; print(cmtinypkg.VALUE)").strip() == "42"


def test_build_failure_carries_pip_output(tmp_path):
    with pytest.raises(ImageBuildError) as info:
        resolve_python(["cm-no-such-package-xyz==1.0"], "im-bad", root=tmp_path, pip_args=("--no-index",))
    msg = str(info.value)
    assert info.value.reason == "pip-failed" and not info.value.retryable
    assert "Could not install cm-no-such-package-xyz==1.0" in msg
    assert "No matching distribution found for cm-no-such-package-xyz==1.0" in msg
    assert not (env_dir(["x"], "im-bad", root=tmp_path) / READY_MARKER).exists()


def test_concurrent_resolves_build_once(tmp_path, tiny_package, monkeypatch):
    import threading

    builds = []
    real_build = envs._build

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(envs, "_build", counting_build)
    pkgs = [str(tiny_package)]
    results: list[str] = []

    def go() -> None:
        results.append(resolve_python(pkgs, "im-race", root=tmp_path, pip_args=("--no-index",)))

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(results)) == 1 and len(results) == 3


def test_builds_without_pip_in_the_current_environment(tmp_path, tiny_package, monkeypatch):
    real_find_spec = envs.importlib.util.find_spec
    monkeypatch.setattr(
        envs.importlib.util, "find_spec", lambda n, *a: None if n == "pip" else real_find_spec(n, *a)
    )
    python = resolve_python([str(tiny_package)], "im-nopip", root=tmp_path, pip_args=("--no-index",))
    assert _run(python, "import cmtinypkg, pip; print(cmtinypkg.VALUE)").strip() == "42"
