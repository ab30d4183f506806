"""Image: an immutable recipe whose hash is stable, sensitive to what matters, and renders to bash/Dockerfile."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloudmodal import Image, Secret
from cloudmodal.exception import InvalidError
from cloudmodal.image import default_python_version


def download_weights(model: str, revision: int = 1) -> None:
    """Module-level, so Image.run_function can record it."""


def base() -> Image:
    return Image.debian_slim(python_version="3.11")


def full_recipe(req: Path) -> Image:
    return (
        Image.debian_slim(python_version="3.12")
        .apt_install("git", "ffmpeg")
        .pip_install("torch==2.4.0", "numpy<2", index_url="https://download.pytorch.org/whl/cu121")
        .uv_pip_install("transformers>=4.40", requirements=[str(req)])
        .pip_install_from_requirements(str(req))
        .run_commands("echo hello > /tmp/x", "ls /")
        .env({"HF_HOME": "/cache", "QUOTED": "it's $HOME"})
        .workdir("/app")
        .add_local_python_source("mypkg", "mypkg.utils")
        .run_function(download_weights, args=("llama",), kwargs={"revision": 2})
    )


# ------------------------------------------------------------------------------------------ hashing


def test_hash_is_stable_across_processes(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("requests==2.32.3\n")
    img = full_recipe(req)
    here = Path(__file__).resolve()
    code = textwrap.dedent(
        f"""
        import importlib, sys
        from pathlib import Path
        sys.path[:0] = [{str(here.parents[2])!r}, {str(here.parent)!r}]
        mod = importlib.import_module({__name__!r})  # the same module name as in this process
        print(mod.full_recipe(Path({str(req)!r})).hash)
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == img.hash
    assert len(img.hash) == 64


def test_hash_ignores_package_order_and_force_build():
    a = base().pip_install("b", "a")
    assert a.hash == base().pip_install("a", "b").hash
    assert a.hash == base().pip_install(["a", "b"]).hash
    assert a.hash == base().pip_install("a", "b", force_build=True).hash
    assert base().pip_install("a", "b", force_build=True).force_build
    assert Image.debian_slim("3.11", force_build=True).hash == base().hash


@pytest.mark.parametrize(
    "other",
    [
        lambda: base().pip_install("a", "c"),
        lambda: base().pip_install("a", "b==1.0"),
        lambda: base().pip_install("a", "b", pre=True),
        lambda: base().pip_install("a", "b", index_url="https://example.com/simple"),
        lambda: base().uv_pip_install("a", "b"),
        lambda: base().pip_install("a").pip_install("b"),
        lambda: Image.debian_slim("3.12").pip_install("a", "b"),
        lambda: base().pip_install("a", "b").env({"X": "1"}),
        lambda: base().pip_install("a", "b", env={"X": "1"}),
        lambda: base().pip_install("a", "b", gpu="H100"),
    ],
)
def test_hash_changes_with_recipe(other):
    assert other().hash != base().pip_install("a", "b").hash


def test_layer_order_matters():
    assert (
        base().apt_install("git").run_commands("x").hash != base().run_commands("x").apt_install("git").hash
    )


def test_requirements_file_content_is_part_of_the_recipe(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy==1.26.4\n")
    first = base().pip_install_from_requirements(req)
    req.write_text("numpy==2.0.0\n")
    second = base().pip_install_from_requirements(req)
    assert first.hash != second.hash
    assert first.pip_packages == ["numpy==1.26.4"] and second.pip_packages == ["numpy==2.0.0"]


def test_run_function_source_is_part_of_the_recipe(tmp_path):
    code = "def step(n):\n    return {}\n"
    hashes = []
    for body in ("1", "2"):
        mod = tmp_path / f"steps_{body}.py"
        mod.write_text(code.format(body))
        ns: dict = {}
        exec(compile(mod.read_text(), str(mod), "exec"), ns)
        ns["step"].__module__ = "steps"  # same module name and qualname, different source
        hashes.append(base().run_function(ns["step"], args=(1,)).hash)
    assert hashes[0] != hashes[1]


# ------------------------------------------------------------------------------------------ value semantics


def test_builders_return_new_images_and_images_are_immutable():
    b = base()
    child = b.pip_install("numpy")
    assert b.layers == [] and [x["op"] for x in child.layers] == ["pip_install"]
    assert b.pip_install() is b  # nothing to add
    with pytest.raises(AttributeError):
        b._layers = ()  # type: ignore[misc]
    with pytest.raises(InvalidError, match="debian_slim"):
        Image()
    layers = child.layers
    layers[0]["packages"].append("evil")
    assert child.pip_packages == ["numpy"]


def test_equality_hashability_wire_and_pickle(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("requests\n")
    img = full_recipe(req)
    assert img == full_recipe(req) and hash(img) == hash(full_recipe(req))
    assert len({img, full_recipe(req), base()}) == 2
    wire = img.to_wire()
    assert wire["hash"] == img.hash and wire["python_version"] == "3.12"
    assert wire["pip_packages"] == img.pip_packages and wire["env"] == {
        "HF_HOME": "/cache",
        "QUOTED": "it's $HOME",
    }
    assert Image.from_wire(wire) == img
    with pytest.raises(ValueError, match="hash"):
        Image.from_wire({**wire, "hash": "0" * 64})
    assert pickle.loads(pickle.dumps(img)) == img


def test_default_python_version_is_local_and_supported():
    assert Image.debian_slim().python_version == default_python_version()
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    if local in ("3.10", "3.11", "3.12", "3.13"):
        assert default_python_version() == local


def test_reading_the_recipe(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# comment\nrequests==2.32.3  # pinned\n\n--extra-index-url https://x\npydantic>=2 ; python_version>'3.8'\n"
    )
    img = full_recipe(req)
    assert img.pip_packages == [
        "numpy<2",
        "torch==2.4.0",
        "transformers>=4.40",
        "requests==2.32.3",
        "pydantic>=2 ; python_version>'3.8'",
    ]
    assert img.apt_packages == ["ffmpeg", "git"]
    assert img.env_vars == {"HF_HOME": "/cache", "QUOTED": "it's $HOME"}
    assert img.workdir_path == "/app"
    assert img.local_python_modules == ["mypkg", "mypkg.utils"]
    fn = img.layers[-1]
    assert (fn["op"], fn["module"], fn["qualname"]) == ("run_function", __name__, "download_weights")
    assert fn["args"] == ["llama"] and fn["kwargs"] == {"revision": 2} and len(fn["source_sha256"]) == 64


def test_build_step_secrets_are_kept_for_the_app():
    s = Secret.from_dict({"TOKEN": "s3cr3t-value"})
    img = base().run_commands("echo $TOKEN", secrets=[s])
    assert img.secrets == (s,)
    assert img.layers[0]["secrets"] == [s.name]
    assert "s3cr3t-value" not in str(img.to_wire())


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: Image.debian_slim("3.9"), ["Unsupported python_version '3.9'", "3.10, 3.11, 3.12, 3.13"]),
        (lambda: Image.debian_slim("3.14"), ["Unsupported python_version"]),
        (lambda: Image.debian_slim("311"), ["Write it as MAJOR.MINOR", "'3.11'"]),
        (lambda: Image.debian_slim("python3.11"), ["MAJOR.MINOR"]),
        (lambda: Image.debian_slim(3.11), ["must be a string such as '3.11'"]),
        (lambda: base().pip_install("   "), ["empty package name"]),
        (lambda: base().pip_install(""), ["empty package name"]),
        (
            lambda: base().pip_install("numpy pandas"),
            ["2 packages in one string", "pip_install('numpy', 'pandas')"],
        ),
        (lambda: base().pip_install("torch==2.0 torchvision"), ["separate arguments"]),
        (lambda: base().pip_install("--upgrade"), ["pip option", "extra_options="]),
        (lambda: base().pip_install("a\nb"), ["line break", "pip_install_from_requirements"]),
        (lambda: base().pip_install(3), ["must be strings"]),
        (lambda: base().pip_install("a", index_url="http://x y"), ["index_url", "without spaces"]),
        (lambda: base().pip_install("a", extra_options="--x 'unclosed"), ["cannot parse extra_options"]),
        (lambda: base().uv_pip_install("a", uv_version="latest!"), ["uv_version"]),
        (lambda: base().apt_install("Git"), ["invalid Debian package name 'Git'", "lowercase"]),
        (lambda: base().apt_install("git curl"), ["apt_install('git', 'curl')"]),
        (lambda: base().run_commands("  "), ["empty command"]),
        (lambda: base().run_commands("ls", volumes={"/x": object()}), ["volumes", "not supported"]),
        (lambda: base().env({"1BAD": "x"}), ["invalid environment variable name '1BAD'"]),
        (lambda: base().env({"PORT": 8000}), ["must be a string", "str(8000)"]),
        (lambda: base().env(["A=1"]), ["expects a dict"]),
        (lambda: base().workdir("app"), ["must be absolute", "'/app'"]),
        (lambda: base().add_local_python_source("src/mypkg.py"), ["not an importable module name"]),
        (
            lambda: base().pip_install_from_requirements("/nonexistent/requirements.txt"),
            ["not found", "absolute path"],
        ),
        (lambda: base().run_function(lambda: None), ["lambda", "module level"]),
        (lambda: base().run_function("download_weights"), ["expects a function"]),
        (lambda: base().run_function(download_weights, args=(object(),)), ["JSON values", "hash is stable"]),
        (lambda: base().run_function(download_weights, timeout=0), ["timeout", "86400"]),
        (lambda: base().pip_install("a", secrets=Secret.from_name("x")), ["list of cloudmodal.Secret"]),
        (lambda: base().pip_install("a", gpu="H100:x"), ["Invalid GPU count"]),
    ],
)
def test_validation(build, expected):
    with pytest.raises(InvalidError) as e:
        build()
    for text in expected:
        assert text in str(e.value)


def test_valid_specs_accepted():
    img = base().pip_install(
        "requests >= 2.0",
        "foo[bar,baz]==1.2",
        "pkg ; python_version < '3.12'",
        "git+https://github.com/org/repo@main",
        "./local/path",
    )
    assert len(img.pip_packages) == 5
    base().apt_install("libgl1", "g++", "libstdc++6", "curl=7.88.1-10+deb12u5", "libc6:amd64")
    base().add_local_python_source("pkg", "pkg.sub_mod", "_private")


def test_run_function_unwraps_cloudmodal_handles():
    import cloudmodal

    app = cloudmodal.App()
    handle = app.function()(download_weights)
    assert base().run_function(handle).layers[0]["qualname"] == "download_weights"


def test_requirements_including_other_files_are_rejected(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\n-r base.txt\n")
    with pytest.raises(InvalidError, match="line 2 includes another file"):
        base().pip_install_from_requirements(req)


# ------------------------------------------------------------------------------------------ rendering


def test_setup_script_content(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("requests==2.32.3\n")
    script = full_recipe(req).render_setup_script(cloudmodal_requirement="cloudmodal==0.1.0")
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert "uv venv --seed --python 3.12" in script
    assert 'uv pip install --python "$CLOUDMODAL_VENV/bin/python" cloudmodal==0.1.0' in script
    assert (
        "$SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends ffmpeg git" in lines
    )
    assert (
        '"$CLOUDMODAL_VENV/bin/python" -m pip install --index-url https://download.pytorch.org/whl/cu121 '
        "'numpy<2' torch==2.4.0" in lines
    )
    assert any(
        line.startswith("uv pip install --python") and "'transformers>=4.40'" in line for line in lines
    )
    assert any(" | base64 -d > " in line for line in lines)  # requirements written from the recipe
    assert "echo hello > /tmp/x" in lines and "ls /" in lines  # commands verbatim, in order
    assert lines.index("echo hello > /tmp/x") < lines.index("ls /")
    assert "export HF_HOME=/cache" in lines
    assert "export QUOTED='it'\"'\"'s $HOME'" in lines  # shlex-quoted: no expansion
    assert "cd /app" in lines
    assert any("python\" -c 'import functools, importlib" in line for line in lines)
    order = [
        script.index(s)
        for s in ("apt-get install", "-m pip install --index-url", "echo hello", "export HF_HOME", "cd /app")
    ]
    assert order == sorted(order)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_setup_script_is_valid_bash(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("requests\n")
    path = tmp_path / "setup.sh"
    path.write_text(full_recipe(req).render_setup_script())
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_layer_env_is_scoped_to_its_step():
    script = base().run_commands("make", env={"CC": "gcc-12"}).render_setup_script()
    assert "( export CC=gcc-12; make )" in script
    docker = base().run_commands("make", env={"CC": "gcc-12"}).render_dockerfile()
    assert "RUN export CC=gcc-12 && make" in docker


def test_dockerfile_content(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("requests==2.32.3\n")
    lines = full_recipe(req).render_dockerfile().splitlines()
    assert lines[1] == "FROM python:3.12-slim-bookworm"
    assert (
        "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
        "ffmpeg git && rm -rf /var/lib/apt/lists/*" in lines
    )
    assert (
        "RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu121 "
        "'numpy<2' torch==2.4.0" in lines
    )
    uv_line = next(line for line in lines if "uv pip install --system" in line)
    assert uv_line.startswith("RUN echo ") and "| base64 -d > /tmp/cloudmodal-" in uv_line
    assert (
        "&& python -m pip install --no-cache-dir uv && uv pip install --system -r /tmp/cloudmodal-" in uv_line
    )
    assert "RUN echo hello > /tmp/x" in lines and "RUN ls /" in lines
    assert 'ENV HF_HOME="/cache" QUOTED="it\'s $HOME"' in lines
    assert "WORKDIR /app" in lines
    assert all(line.startswith(("#", "FROM ", "RUN ", "ENV ", "WORKDIR ")) for line in lines)


def test_dockerfile_keeps_multiline_commands_on_one_line():
    lines = base().run_commands("if true; then\n  echo yes\nfi").render_dockerfile().splitlines()
    assert len(lines) == 3 and lines[2].startswith("RUN echo ") and lines[2].endswith("| base64 -d | sh -e")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_rendered_run_function_and_requirements_steps_really_run(tmp_path):
    """Execute the rendered steps (not apt/pip) with this interpreter standing in for the node's venv."""
    (tmp_path / "buildsteps.py").write_text(
        "import json, os\n\ndef write(name, value=0):\n    open(name, 'w').write(json.dumps([value, os.environ.get('STAGE')]))\n"
    )
    ns: dict = {}
    exec(compile((tmp_path / "buildsteps.py").read_text(), str(tmp_path / "buildsteps.py"), "exec"), ns)
    ns["write"].__module__ = "buildsteps"
    img = base().env({"STAGE": "build"}).run_function(ns["write"], args=("out.json",), kwargs={"value": 7})
    script = img.render_setup_script()
    body = script[script.index("# env") :]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    subprocess.run(
        ["bash", "-c", f"set -euo pipefail\nexport CLOUDMODAL_VENV={venv}\n{body}"], cwd=tmp_path, check=True
    )
    assert (tmp_path / "out.json").read_text() == '[7, "build"]'
