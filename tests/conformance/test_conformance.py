"""Programs in the style of Modal's documentation, run as users run them (`python script.py`,
`cloudmodal run`, `cloudmodal deploy`), each checked by what it prints. Real processes, a real control plane
(embedded, or `cloudmodal server start`), real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).parent / "programs"


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, CLOUDMODAL_HOME=str(tmp_path / "home"))
    for k in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN", "CLOUDMODAL_IS_REMOTE", "PYTHONPATH"):
        env.pop(k, None)
    return env


def run(argv: list[str], env: dict[str, str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=PROGRAMS, timeout=180)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def python(script: str, env: dict[str, str]) -> str:
    return run([sys.executable, script], env).stdout


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "cloudmodal.cli.main", *args], env, check=check)


def test_python_script_runs_its_app_with_output_and_the_input_context(home):
    out = python("run_script.py", home)
    lines = set(out.splitlines())
    for want in (
        "here: is_local True",
        "here: ids None None",
        "here: remote_only imported False",  # Image.imports swallowed the ImportError here
        "app_id before run None",
        "app_id in run ap-",
        "remote: is_local False remote_only 42",  # ... and in the worker the import worked
        "remote: call id fc- input id set True",
        "map: one call True True",
        "map: distinct inputs True",
        "spawn: call id matches True",
        "app_id after run None",
    ):
        assert want in lines, f"{want!r} missing from:\n{out}"
    # enable_output(): the workers' prints were streamed to this terminal, once each
    for x in range(1, 6):
        assert out.count(f"worker says {x}") == 1, out


def test_python_script_without_enable_output_shows_no_worker_logs(home, tmp_path):
    """The negative control of the test above: the same program without enable_output() prints no worker
    line."""
    source = (PROGRAMS / "run_script.py").read_text()
    assert "with cloudmodal.enable_output():" in source
    quiet = tmp_path / "quiet.py"
    quiet.write_text(source.replace("with cloudmodal.enable_output():", "if True:"))
    (tmp_path / "remote_only.py").write_text((PROGRAMS / "remote_only.py").read_text())
    out = run([sys.executable, str(quiet)], home).stdout
    assert "spawn: call id matches True" in out and "worker says" not in out, out


def test_app_lookup_finds_creates_and_refuses(home):
    out = python("lookup.py", home)
    lines = set(out.splitlines())
    for want in (
        "missing: NotFoundError",
        "ephemeral: NotFoundError",
        "made: conformance-made ap- True conformance-made",
        "ping pong",
    ):
        assert want in lines, f"{want!r} missing from:\n{out}"


def test_a_modal_program_runs_after_swapping_its_import_line(home):
    out = cli("run", "modal_style.py", "--n", "4", env=home).stdout
    lines = set(out.splitlines())
    for want in (
        "square 49",
        "starmap [1, 4, 9]",
        "countdown [4, 3, 2, 1]",
        "cls 25",
        "gather [0, 1, 4, 9]",
        "from_id 9",
        "aio 81",
        "dict [1, 2] True",
        "from_name: NotFoundError",
    ):
        assert want in lines, f"{want!r} missing from:\n{out}"


def test_the_unswapped_modal_program_does_not_run(home, tmp_path):
    """The negative control: with `import modal` left as it was, the same program does not get cloudmodal."""
    source = (PROGRAMS / "modal_style.py").read_text()
    plain = tmp_path / "plain_modal.py"
    plain.write_text(source.replace("from cloudmodal.compat import modal", "import modal"))
    p = run([sys.executable, "-m", "cloudmodal.cli.main", "run", str(plain)], home, check=False)
    assert p.returncode != 0 and "square 49" not in p.stdout


def test_deploy_then_lookup_and_call_by_name(home):
    cli("server", "start", "--port", "0", env=home)
    try:
        out = cli("deploy", "deployed.py", env=home).stdout
        assert "Deployed app conformance-deployed" in out, out
        out = python("lookup_deployed.py", home)
        apps = json.loads(cli("app", "list", "--json", env=home).stdout)
        app_id = next(a["id"] for a in apps if a["name"] == "conformance-deployed")
        assert f"lookup: conformance-deployed {app_id}" in out.splitlines(), out
        assert "triple 15" in out and "spawned 21" in out, out
    finally:
        cli("server", "stop", env=home, check=False)


def test_batching_concurrency_for_each_and_a_queue_argument(home):
    out = cli("run", "batching.py", env=home).stdout
    lines = set(out.splitlines())
    for want in (
        "batched [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]",
        "batched remote 42",
        "concurrent [0, 1, 2, 3, 4, 5, 6, 7]",
        "for_each done",
        "queue len 4",
        "queue items [0, 1, 4, 9]",
        "queue empty None",
    ):
        assert want in lines, f"{want!r} missing from:\n{out}"


def test_an_image_from_a_uv_project_runs(home):
    out = cli("run", "uv_sync_app.py", env=home).stdout
    assert "packaging in the image: True" in out, out


def test_variants_spawn_map_calls_and_secrets_of_the_smaller_surface(home):
    """surface.py: with_concurrency / with_batching on functions and classes (each against its negative
    control: the undecorated function runs one input at a time and gets single items), experimental_spawn_map
    with get(index=) and iter(), Function.from_id, get(timeout=0), unordered maps with returned exceptions,
    for_each ignoring them, and Secret.from_local_environ / from_dotenv."""
    out = cli("run", "surface.py", env=dict(home, CONFORMANCE_LOCAL="from-local")).stdout
    lines = set(out.splitlines())
    for want in (
        "with_concurrency [True, True, True, True]",
        "cls with_concurrency [True, True, True]",
        "with_batching lists True 4",
        "cls with_batching [3, 6, 9]",
        "spawn_map inputs 5 index 3 -> 9 iter [0, 1, 4, 9, 16]",
        "iter range [1, 4]",
        "from_id 16",
        "poll: TimeoutError",
        "without concurrency [False, False]",
        "without batching TypeError",
        "remote error ValueError negative: -1",
        "unordered [1, 9] ['ValueError']",
        "for_each ignored errors",
        "secrets ['from-local', 'from-dotenv']",
    ):
        assert want in lines, f"{want!r} missing from:\n{out}"


_ROUTES = (REPO / "cloudmodal" / "server" / "api.py").read_text()


@pytest.mark.skipif(
    "/v1/functions/{function_id}/autoscaler" not in _ROUTES,
    reason="the control plane has no autoscaler/stats routes yet (notes/issue15_api_routes.patch)",
)
def test_update_autoscaler_and_current_stats_on_a_deployed_app(home):
    cli("server", "start", "--port", "0", env=home)
    try:
        cli("deploy", "autoscaler_app.py", env=home)
        out = python("autoscaler_calls.py", home)
        lines = set(out.splitlines())
        for want in (
            "call hello you",
            "stats 0 True",
            "updated 2 3 0 30",
            "warm True",  # min_containers=2 took effect without a redeploy
            "kept 2 3 1 30",
            "refused True",
            "refused window True",
            "cls hey there 1",
            "initial 0 None 0 60",
            "final 0 3 0 30",  # kept until the next deploy
        ):
            assert want in lines, f"{want!r} missing from:\n{out}"
        # a redeploy puts the decorator's settings back, as on Modal
        cli("deploy", "autoscaler_app.py", env=home)
        again = python("autoscaler_calls.py", home)
        assert "initial 0 None 0 60" in again.splitlines(), again
    finally:
        cli("server", "stop", env=home, check=False)
