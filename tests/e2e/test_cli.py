"""The command line, end to end: real `cloudmodal` processes, a real background control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"cloudmodal {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, CLOUDMODAL_HOME=str(tmp_path / "home"))
    env.pop("CLOUDMODAL_SERVER_URL", None)
    env.pop("CLOUDMODAL_TOKEN", None)
    return env


def test_run_hello_embedded(home):
    p = cli("run", "examples/hello.py", "--n", "50", env=home)
    assert "square.remote(7) = 49" in p.stdout
    assert "sum of squares below 50 = 40425" in p.stdout
    assert p.stdout.count("squaring 3") == 1  # the worker's print was streamed back, once


LAST_WORDS = """
import cloudmodal

app = cloudmodal.App("last-words")


@app.function()
def speak(i: int) -> int:
    print(f"last words {i}")  # printed right before the result: the run must still show it
    return i


@app.local_entrypoint()
def main() -> None:
    print("result", speak.remote(1))
"""


def test_a_print_just_before_the_last_result_is_shown_before_exit(home, tmp_path):
    """Workers send an input's log lines before its result, so `cloudmodal run` exits as soon as it is
    done without losing the last input's output (it used to wait a fixed 0.1 s for stragglers)."""
    script = tmp_path / "last_words.py"
    script.write_text(LAST_WORDS)
    for _ in range(3):
        out = cli("run", str(script), env=home).stdout
        assert "result 1" in out and "last words 1" in out, out


def test_run_single_function_with_typed_args(home):
    p = cli("run", "examples/hello.py::square", "--x", "12", env=home)
    assert p.stdout.strip().splitlines()[-1] == "144"


def test_run_bad_arguments_say_what_is_wrong(home):
    p = cli("run", "examples/hello.py", "--n", "notanint", env=home, check=False)
    assert p.returncode == 2 and "not a valid integer" in p.stderr
    p = cli("run", "examples/hello.py::nope", env=home, check=False)
    assert p.returncode == 2 and "no entrypoint or function 'nope'" in p.stderr
    p = cli("run", "examples/missing.py", env=home, check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_run_class_example(home):
    p = cli("run", "examples/model_class.py", env=home)
    assert "predict: [0, 2, 4, 6, 8]" in p.stdout and "tripler: 15" in p.stdout
    assert "one @enter per worker: True" in p.stdout


def test_gpu_function_without_gpu_fails_clearly_then_runs_with_cpu_fallback(home):
    env = dict(home)
    env.pop("CLOUDMODAL_FAKE_GPUS", None)
    p = cli("run", "examples/gpu_fallback.py", env=env, check=False)
    assert (
        p.returncode == 1
        and "No enabled provider can run gpu=" in p.stderr
        and "--gpu-fallback cpu" in p.stderr
    )
    p = cli("run", "examples/gpu_fallback.py", "--gpu-fallback", "cpu", env=env)
    assert "CPU fallback" in p.stdout


def test_server_deploy_from_name_app_commands(home, tmp_path):
    cli("server", "start", "--port", "0", env=home)
    try:
        assert "up" in cli("server", "status", env=home).stdout
        out = cli("deploy", "examples/model_class.py", env=home).stdout
        assert "Deployed app model-class" in out and "version 1" in out
        script = tmp_path / "caller.py"
        script.write_text(
            "import cloudmodal\n"
            "Model = cloudmodal.Cls.from_name('model-class', 'Model')\n"
            "print('remote', Model(scale=4).predict.remote(10))\n"
        )
        p = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=home, timeout=120
        )
        assert "remote 40" in p.stdout, p.stderr
        out = cli("deploy", "examples/model_class.py", env=home).stdout
        assert "version 2" in out
        apps = json.loads(cli("app", "list", "--json", env=home).stdout)
        app = next(a for a in apps if a["name"] == "model-class")
        assert app["state"] == "deployed" and app["version"] == 2
        assert any(p["name"] == "Model" for p in app["pools"])
        hist = json.loads(cli("app", "history", "model-class", "--json", env=home).stdout)
        assert [h["version"] for h in hist] == [2, 1]
        logs = cli("app", "logs", "model-class", env=home).stdout
        assert "loaded weights" in logs
        events = cli("app", "events", "model-class", env=home).stdout
        assert "worker.launched" in events and "app.deployed" in events
        table = cli("app", "list", env=home).stdout
        assert "model-class" in table
        cli("app", "stop", "model-class", env=home)
        apps = json.loads(cli("app", "list", "--json", env=home).stdout)
        assert next(a for a in apps if a["name"] == "model-class")["state"] == "stopped"
    finally:
        cli("server", "stop", env=home, check=False)
    assert "No control plane" in cli("server", "status", env=home, check=False).stdout


def test_shell_runs_in_the_function_environment(home):
    p = cli("shell", "examples/hello.py::square", "--cmd", "echo remote=$CLOUDMODAL_IS_REMOTE; pwd", env=home)
    assert "remote=1" in p.stdout and str(EXAMPLES) in p.stdout
