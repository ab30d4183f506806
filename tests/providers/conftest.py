"""Fixtures for provider tests: pretend GPUs, a local provider whose workers are always reaped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmodal.providers.gpu import FAKE_GPUS_ENV
from cloudmodal.providers.local import LocalProvider

GPU_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gpu"


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Pretend this machine has the given GPUs (``"H100:2"``), with no parent CUDA_VISIBLE_DEVICES."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def set_(spec: str) -> None:
        monkeypatch.setenv(FAKE_GPUS_ENV, spec)

    return set_


@pytest.fixture
def make_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., LocalProvider]]:
    """Build local providers whose workers are all stopped and reaped when the test ends."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    made: list[LocalProvider] = []

    def make(**kwargs: object) -> LocalProvider:
        kwargs.setdefault("state_dir", tmp_path / "state")
        p = LocalProvider(**kwargs)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
        assert p.live_workers() == [], "a worker process outlived its test"


def _wait_for_file(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if text.endswith("\n"):
                return text[:-1]
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout}s")


@pytest.fixture
def wait_for_file() -> Callable[..., str]:
    """``wait_for_file(path, timeout=15)``: wait until a child wrote a newline-terminated file; its text."""
    return _wait_for_file


@pytest.fixture
def gpu_fixture(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``gpu_fixture("query-gpu.csv")``: text of a recorded output in ../shared/fixtures/gpu (skip if absent)."""

    def read(name: str) -> str:
        path = GPU_FIXTURES / name
        if not path.exists():
            pytest.skip(f"recorded GPU output {path} is not available")
        return path.read_text()

    return read
