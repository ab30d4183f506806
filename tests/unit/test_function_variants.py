"""Function/Cls.with_concurrency and .with_batching: variants with Modal's signatures and ranges, built on the
with_options path (own spec, own pool, registered with the app); Function.from_id and FunctionCall's index
checks (no control plane needed)."""

from __future__ import annotations

import pytest

import cloudmodal
from cloudmodal import App
from cloudmodal.exception import InvalidError
from cloudmodal.functions import Function, FunctionCall
from cloudmodal.spec import BatchConfig, ConcurrencyConfig


def square(x: int) -> int:
    return x * x


def doubles(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


def with_default(xs: list[int], k: int = 2) -> list[int]:
    return xs


def countdown(n: int):
    yield from range(n)


class Model:
    size: int = cloudmodal.parameter(default=1)

    @cloudmodal.method()
    def predict(self, xs: list[int]) -> list[int]:
        return [x * self.size for x in xs]


class TwoMethods:
    @cloudmodal.method()
    def a(self, x: int) -> int:
        return x

    @cloudmodal.method()
    def b(self, x: int) -> int:
        return x


def test_with_concurrency_makes_a_variant_with_its_own_spec_and_leaves_the_function_alone():
    app = App()
    f = app.function(max_containers=3)(square)
    v = f.with_concurrency(max_inputs=8, target_inputs=4)
    assert v.spec.concurrency == ConcurrencyConfig(8, 4)
    assert f.spec.concurrency is None  # negative control: the original is unchanged
    assert v.spec.name.startswith("square[") and v.spec.autoscaler.max_containers == 3
    assert app.registered_functions[v.spec.name] is v  # registered with the app like with_options variants
    # same arguments, same variant (name); other arguments, another one
    assert f.with_concurrency(max_inputs=8, target_inputs=4).spec.name == v.spec.name
    assert f.with_concurrency(max_inputs=9).spec.name != v.spec.name


def test_variants_stack_with_with_options_either_way():
    f = App().function()(square)
    a = f.with_options(timeout=60).with_concurrency(max_inputs=5)
    b = f.with_concurrency(max_inputs=5).with_options(timeout=60)
    for v in (a, b):
        assert v.spec.timeout == 60 and v.spec.concurrency == ConcurrencyConfig(5, None)
    assert a.spec.name == b.spec.name
    # a later with_concurrency replaces the earlier one
    assert a.with_concurrency(max_inputs=2).spec.concurrency == ConcurrencyConfig(2, None)


def test_with_batching_sets_batching_and_checks_the_function_takes_lists():
    f = App().function()(doubles)
    v = f.with_batching(max_batch_size=4, wait_ms=100)
    assert v.spec.batching == BatchConfig(4, 100) and f.spec.batching is None
    with pytest.raises(InvalidError, match="does not accept default arguments"):
        App().function()(with_default).with_batching(max_batch_size=4, wait_ms=100)
    with pytest.raises(InvalidError, match="cannot be a generator"):
        App().function()(countdown).with_batching(max_batch_size=4, wait_ms=100)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_inputs": 0}, r"square.with_concurrency\(max_inputs=...\) must be at least 1"),
        ({"max_inputs": "8"}, r"must be an integer"),
        (
            {"max_inputs": 4, "target_inputs": 5},
            r"`target_inputs` \(5\) cannot be greater than `max_inputs` \(4\)",
        ),
        ({"max_inputs": 4, "target_inputs": 0}, r"target_inputs=...\) must be at least 1"),
    ],
)
def test_with_concurrency_refuses_what_concurrent_refuses(kwargs, match):
    f = App().function()(square)
    with pytest.raises(InvalidError, match=match):
        f.with_concurrency(**kwargs)


def test_with_concurrency_needs_max_inputs_as_in_modal():
    f = App().function()(square)
    with pytest.raises(TypeError):
        f.with_concurrency()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        f.with_concurrency(8)  # type: ignore[misc]  # keyword-only, as in Modal


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch_size": 0, "wait_ms": 10}, r"max_batch_size=...\) must be between 1 and 1000"),
        ({"max_batch_size": 1001, "wait_ms": 10}, r"must be between 1 and 1000"),
        ({"max_batch_size": 4, "wait_ms": -1}, r"wait_ms=...\) must be between 0 and 600000"),
        ({"max_batch_size": 4, "wait_ms": 600_001}, r"must be between 0 and 600000"),
    ],
)
def test_with_batching_refuses_modals_out_of_range_values(kwargs, match):
    f = App().function()(doubles)
    with pytest.raises(InvalidError, match=match):
        f.with_batching(**kwargs)
    assert f.with_batching(max_batch_size=1000, wait_ms=600_000).spec.batching == BatchConfig(1000, 600_000)


def test_cls_with_concurrency_and_with_batching():
    c = App().cls()(Model)
    v = c.with_concurrency(max_inputs=3)
    assert v.spec.concurrency == ConcurrencyConfig(3, None) and c.spec.concurrency is None
    b = c.with_options(max_containers=2).with_batching(max_batch_size=5, wait_ms=0)
    assert b.spec.batching == BatchConfig(5, 0) and b.spec.autoscaler.max_containers == 2
    assert b.spec.methods == ("predict",)
    with pytest.raises(InvalidError, match="exactly one method, and TwoMethods has 2"):
        App().cls()(TwoMethods).with_batching(max_batch_size=5, wait_ms=0)
    with pytest.raises(InvalidError, match=r"Model.with_concurrency\(max_inputs=...\) must be at least 1"):
        c.with_concurrency(max_inputs=0)


def test_looked_up_handles_keep_their_deployed_options():
    with pytest.raises(InvalidError, match="with_concurrency.. needs a function decorated"):
        Function.from_name("app", "f").with_concurrency(max_inputs=2)
    with pytest.raises(InvalidError, match="with_batching.. needs a class decorated"):
        cloudmodal.Cls.from_name("app", "C").with_batching(max_batch_size=2, wait_ms=1)


def test_from_id_wants_a_function_id():
    f = Function.from_id("fu-abc")
    assert f.object_id is None and repr(f) == "<cloudmodal.Function fu-abc>"  # lazy: nothing looked up yet
    for bad in ("ap-abc", "", 3):
        with pytest.raises(InvalidError, match="expects a function id"):
            Function.from_id(bad)  # type: ignore[arg-type]


def test_function_call_get_refuses_a_negative_index_before_any_request():
    fc = FunctionCall("fc-x", _session=object())  # a session that would fail on any request
    with pytest.raises(InvalidError, match="whole number from 0"):
        fc.get(index=-1)
    with pytest.raises(InvalidError, match="need 0 <= start <= end"):
        next(iter(_iter_without_total(fc, start=3, end=1)))


def _iter_without_total(fc: FunctionCall, **kw: int):
    fc.num_inputs = lambda: 10  # type: ignore[method-assign]  # the total a control plane would give
    return fc.iter(**kw)
