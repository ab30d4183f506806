"""Issue 11's client bugs, end to end on a real control plane with real worker processes: ``spawn_map`` of a
batch or more of inputs, ``with_options`` variants made at module level, and ``Cls.with_options``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import issue11_app as m
import pytest
from support import start_server, use_server

from cloudmodal import Function
from cloudmodal.client.session import run_app


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    state = tmp_path_factory.mktemp("cp")
    handle = start_server(state, f"sqlite:///{state / 'cloudmodal.db'}")
    try:
        with use_server(handle):
            yield
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def running(control_plane: None) -> Iterator[None]:
    with run_app(m.app, show_logs=False):
        yield


@pytest.fixture(scope="module")
def cls_app(control_plane: None) -> Iterator[Any]:
    import issue11_cls_app  # here, not at the top: on the code before the fix, importing it raised

    with run_app(issue11_cls_app.app, show_logs=False):
        yield issue11_cls_app


def _within(seconds: float, fn: object) -> None:
    """Run ``fn`` in a thread and fail if it has not returned within ``seconds`` (a hang must fail the test,
    not the suite)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("n", [64, 200])
def test_spawn_map_of_a_batch_or_more_runs_every_input(running, tmp_path: Path, n: int) -> None:
    # 64 is the feeder's first batch: the first whose send waited on the (disabled) window, forever
    _within(120, lambda: m.touch.spawn_map([str(tmp_path)] * n, range(n)))
    deadline = time.monotonic() + 60
    while len([p for p in tmp_path.iterdir() if not p.name.endswith(".tmp")]) < n:
        assert time.monotonic() < deadline, f"only {len(list(tmp_path.iterdir()))} of {n} inputs ran"
        time.sleep(0.1)
    assert {int(p.name): int(p.read_text()) for p in tmp_path.iterdir()} == {i: i * i for i in range(n)}


def test_a_module_level_function_variant_runs_with_its_options(running) -> None:
    assert m.mode_variant.remote(3) == ("variant", 9)
    assert m.mode.remote(3) == ("base", 9)  # the function itself keeps its own options and pool
    assert list(m.mode_variant.map(range(4))) == [("variant", i * i) for i in range(4)]


def test_a_module_level_class_variant_runs_with_its_options(cls_app: Any) -> None:
    assert cls_app.ScalerVariant(factor=2).scale.remote(5) == ("variant", 10)
    assert list(cls_app.ScalerVariant(factor=3).scale.map([1, 2])) == [("variant", 3), ("variant", 6)]
    assert cls_app.Scaler(factor=2).scale.remote(5) == ("base", 10)  # the class keeps its own options


def test_deploying_registers_module_level_variants(control_plane: None) -> None:
    import issue11_deploy_app as d  # an app of its own: deploying unregisters the handles it deploys

    info = d.app.deploy(name="issue11-deploy")
    assert d.inner_variant.spec.name in info["functions"]
    assert Function.from_name("issue11-deploy", "outer").remote(1) == ("variant", 2)


def test_a_class_variant_made_while_the_app_runs(cls_app: Any) -> None:
    made_now = cls_app.Scaler.with_options(env={"MODE": "now"})
    assert made_now(factor=1).scale.remote(4) == ("now", 4)


def test_a_slow_producers_inputs_are_sent_as_they_come(running) -> None:
    """A map over a producer slower than the cluster: each input is sent once no more is ready, not when a
    batch of them has filled. This producer yields its second input only after the first result is back, so
    a client that waits to fill a batch never gets there."""
    first_back = threading.Event()

    def producer() -> Iterator[int]:
        yield 3
        first_back.wait(100)
        yield 4

    def go() -> None:
        got = []
        for r in m.mode.map(producer()):
            got.append(r)
            first_back.set()
        assert got == [("base", 9), ("base", 16)]
        assert first_back.is_set()

    _within(120, go)  # a bound on a hang (a cold worker start included), not a timing


def test_a_producers_error_reaches_the_caller_and_stops_the_map(running) -> None:
    """The producer runs in a thread of its own: its exception still surfaces in the caller's loop."""

    def producer() -> Iterator[int]:
        yield from range(100)
        raise LookupError("producer broke after 100")

    def go() -> None:
        with pytest.raises(LookupError, match="producer broke after 100"):
            for _ in m.mode.map(producer()):
                pass

    _within(120, go)
