"""`cloudmodal serve`: a real `cloudmodal serve` process (with its embedded control plane) serves a file's web
endpoints, reloads them when the file is edited (a storm of saves is one reload), keeps serving the last good
version through a file that does not import, and stops cleanly on Ctrl-C. `cloudmodal run` of a file that has
only web endpoints points at `serve`.

Waits are bounded polls for a state (the new version answering), never assertions on elapsed time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PAGE = """
import cloudmodal

app = cloudmodal.App("serve-probe")


@app.function()
@cloudmodal.fastapi_endpoint()
def page() -> dict:
    return {{"version": {version}}}
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    out = dict(os.environ, CLOUDMODAL_HOME=str(tmp_path / "home"))
    out.pop("CLOUDMODAL_SERVER_URL", None)
    out.pop("CLOUDMODAL_TOKEN", None)
    return out


class Served:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc = proc
        self.log = log

    def text(self) -> str:
        return self.log.read_text()

    def url(self) -> str:
        m = _until(lambda: re.search(r"page => (http://\S+)", self.text()), "the endpoint's URL", self)
        return m.group(1)


def _until(cond, what: str, served: Served | None = None, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if served is not None and served.proc.poll() is not None:
            raise AssertionError(f"`cloudmodal serve` exited ({served.proc.returncode}):\n{served.text()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{served.text()}" if served else ""))


@pytest.fixture
def served(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[Served, Path]]:
    src = tmp_path / "app" / "serve_probe.py"
    src.parent.mkdir()
    src.write_text(PAGE.format(version=1))
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudmodal.cli.main", "serve", str(src), "--quiet"],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=src.parent,
        )
    s = Served(proc, log)
    try:
        yield s, src
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _version(url: str) -> int | None:
    try:
        r = httpx.get(url, timeout=60)
    except httpx.HTTPError:
        return None
    return r.json().get("version") if r.status_code == 200 else None


def test_serve_reloads_after_an_edit_and_stops_on_ctrl_c(served: tuple[Served, Path]) -> None:
    s, src = served
    url = s.url()
    assert "/web/serve-probe-dev/page/" in url
    assert _version(url) == 1

    for v in range(2, 12):  # a save storm: ten writes as fast as they come
        src.write_text(PAGE.format(version=v))
    _until(lambda: _version(url) == 11, "the last saved version to answer", s)
    reloads = s.text().count("reloading")
    assert 1 <= reloads < 10, s.text()  # debounced: the storm did not reload once per save

    src.write_text("this is not python (")  # half-way through an edit: the last good version keeps serving
    _until(lambda: "did not reload" in s.text(), "the failed reload to be reported", s)
    assert _version(url) == 11
    src.write_text(PAGE.format(version=12))
    _until(lambda: _version(url) == 12, "the fixed file to answer", s)

    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(60) == 0, s.text()
    assert "Stopping the app." in s.text()
    with pytest.raises(httpx.HTTPError):  # the embedded control plane went with it
        httpx.get(url, timeout=5)


def test_run_of_a_web_only_file_says_to_use_serve(tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "web_only.py"
    src.write_text(PAGE.format(version=1))
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "run", str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode != 0
    assert f"cloudmodal serve {src}" in p.stderr + p.stdout
