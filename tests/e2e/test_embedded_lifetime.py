"""An embedded control plane lives in its client: when the client is killed, its workers do not linger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_of_a_killed_client_exit_after_the_reconnect_budget(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, time
            import cloudmodal
            from cloudmodal.client import session

            app = cloudmodal.App("killed-client")

            @app.function()
            def pid(x):
                return os.getpid(), os.environ["CLOUDMODAL_WORKER_RECONNECT_S"]

            if __name__ == "__main__":
                with session.run_app(app, show_logs=False):
                    worker, budget = pid.remote(1)
                    print(worker, budget, flush=True)
                    time.sleep(600)
            """
        )
    )
    env = dict(os.environ, CLOUDMODAL_HOME=str(tmp_path / "home"), CLOUDMODAL_WORKER_RECONNECT_S="3")
    env.pop("CLOUDMODAL_SERVER_URL", None)
    env.pop("CLOUDMODAL_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    assert proc.stdout is not None
    worker_pid, budget = proc.stdout.readline().split()
    worker = int(worker_pid)
    assert budget == "3"  # the setting reached the worker
    assert _alive(worker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60  # a generous bound for a 3 s budget on a loaded machine
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its control plane by far more than its reconnect budget"


def test_an_embedded_control_plane_gives_its_workers_a_short_reconnect_budget(monkeypatch, tmp_path) -> None:
    from cloudmodal.client import session

    monkeypatch.setenv("CLOUDMODAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLOUDMODAL_SERVER_URL", raising=False)
    monkeypatch.delenv("CLOUDMODAL_WORKER_RECONNECT_S", raising=False)
    session.disconnect()
    s = session.connect()
    try:
        assert s.embedded.settings.worker_reconnect_s == session.EMBEDDED_WORKER_RECONNECT_S
    finally:
        session.disconnect()


def test_an_embedded_control_plane_refuses_anonymous_clients(monkeypatch, tmp_path) -> None:
    """Another local user can reach the embedded control plane's loopback port: without the run's own
    random token it gets nothing; the run's session uses that token, and each run has a different one."""
    import httpx

    from cloudmodal.client import session

    monkeypatch.setenv("CLOUDMODAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLOUDMODAL_SERVER_URL", raising=False)
    monkeypatch.delenv("CLOUDMODAL_TOKEN", raising=False)
    tokens = []
    for _ in range(2):
        session.disconnect()
        s = session.connect()
        try:
            url = s.embedded.url
            assert httpx.get(url + "/v1/apps").status_code == 401
            assert (
                httpx.get(url + "/v1/apps", headers={"authorization": "Bearer cm_guess"}).status_code == 401
            )
            assert s.transport.get("/v1/apps") == []
            tokens.append(s.embedded.token)
        finally:
            session.disconnect()
    assert tokens[0] != tokens[1]
