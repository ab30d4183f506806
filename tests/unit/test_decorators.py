"""The decorators under @app.function / inside @app.cls, and the class helpers the runtime uses."""

from __future__ import annotations  # annotations are strings here: parameter types must still resolve

import asyncio
import threading

import pytest

import cloudmodal
from cloudmodal.exception import DeprecationError, InvalidError
from cloudmodal.partial_function import (
    NO_DEFAULT,
    _Flags,
    _PartialFunction,
    bind_parameters,
    find_lifecycle_hooks,
    get_parameters,
    instantiate,
    is_nullary,
    run_lifecycle_hooks,
)
from cloudmodal.spec import WebConfig


def plain(x):
    return x


def nullary():
    return None


# ------------------------------------------------------------------------------------------ decorator arguments


@pytest.mark.parametrize(
    ("make", "exc", "expected"),
    [
        (lambda: cloudmodal.concurrent(), TypeError, ["needs max_inputs", "max_inputs=10"]),
        (lambda: cloudmodal.concurrent(max_inputs=0), InvalidError, ["at least 1"]),
        (lambda: cloudmodal.concurrent(max_inputs=2.5), InvalidError, ["must be an integer"]),
        (
            lambda: cloudmodal.concurrent(max_inputs=4, target_inputs=5),
            InvalidError,
            ["`target_inputs` (5) cannot be greater than `max_inputs` (4)", "Lower target_inputs"],
        ),
        (lambda: cloudmodal.concurrent(plain), InvalidError, ["Did you forget parentheses", "max_inputs=10"]),
        (lambda: cloudmodal.batched(max_batch_size=0, wait_ms=10), InvalidError, ["between 1 and 1000"]),
        (lambda: cloudmodal.batched(max_batch_size=1001, wait_ms=10), InvalidError, ["between 1 and 1000"]),
        (lambda: cloudmodal.batched(max_batch_size=8, wait_ms=-1), InvalidError, ["between 0 and 600000"]),
        (
            lambda: cloudmodal.batched(max_batch_size=8, wait_ms=600_001),
            InvalidError,
            ["between 0 and 600000"],
        ),
        (lambda: cloudmodal.batched(max_batch_size="8", wait_ms=1), InvalidError, ["must be an integer"]),
        (
            lambda: cloudmodal.fastapi_endpoint(method="FETCH"),
            InvalidError,
            ["not an HTTP method", "GET, POST"],
        ),
        (lambda: cloudmodal.fastapi_endpoint("POST"), InvalidError, ['fastapi_endpoint(method="POST")']),
        (lambda: cloudmodal.fastapi_endpoint(label="My_API"), InvalidError, ["lowercase", "label='my-api'"]),
        (lambda: cloudmodal.asgi_app(custom_domains="a.com"), InvalidError, ["list of domain names"]),
        (lambda: cloudmodal.asgi_app("api"), InvalidError, ['asgi_app(label="api")']),
        (lambda: cloudmodal.web_server(0), InvalidError, ["local port", "@web_server(8000)"]),
        (lambda: cloudmodal.web_server(70000), InvalidError, ["1-65535"]),
        (
            lambda: cloudmodal.web_server(8000, startup_timeout=0),
            InvalidError,
            ["positive number of seconds"],
        ),
        (lambda: cloudmodal.method(plain), InvalidError, ["`@cloudmodal.method()`"]),
        (lambda: cloudmodal.method(is_generator="yes"), InvalidError, ["True, False or None"]),
        (lambda: cloudmodal.enter(plain), InvalidError, ["`@cloudmodal.enter()`"]),
        (lambda: cloudmodal.exit(plain), InvalidError, ["`@cloudmodal.exit()`"]),
        (
            lambda: cloudmodal.parameter(default=None),
            InvalidError,
            ["parameter(default=None) is not supported", "no default"],
        ),
    ],
)
def test_decorator_argument_errors(make, exc, expected):
    with pytest.raises(exc) as e:
        make()
    for text in expected:
        assert text in str(e.value)


def test_web_endpoint_is_renamed():
    with pytest.raises(DeprecationError) as e:
        cloudmodal.web_endpoint(method="POST")
    assert "fastapi_endpoint" in str(e.value)
    assert issubclass(DeprecationError, cloudmodal.exception.Error)


def test_boundaries_accepted():
    cloudmodal.batched(max_batch_size=1, wait_ms=0)(plain)
    cloudmodal.batched(max_batch_size=1000, wait_ms=600_000)(plain)
    cloudmodal.concurrent(max_inputs=1, target_inputs=1)(plain)
    cloudmodal.web_server(1)(nullary)
    cloudmodal.web_server(65535, startup_timeout=0.5)(nullary)


# ------------------------------------------------------------------------------------------ what decorators produce


def test_decorators_return_partial_functions_with_params():
    pf = cloudmodal.concurrent(max_inputs=8, target_inputs=4)(plain)
    assert isinstance(pf, _PartialFunction) and pf.raw_f is plain
    assert (pf.params.max_inputs, pf.params.target_inputs) == (8, 4)
    assert pf(3) == 3  # still callable locally

    web = cloudmodal.fastapi_endpoint(method="post", label="api", docs=True, requires_proxy_auth=True)(plain)
    assert web.params.web == WebConfig(
        kind="fastapi_endpoint", method="POST", label="api", docs=True, requires_proxy_auth=True
    )
    server = cloudmodal.web_server(8080, startup_timeout=10)(nullary)
    assert server.params.web == WebConfig(kind="web_server", port=8080, startup_timeout=10.0)
    assert cloudmodal.asgi_app()(nullary).params.web.kind == "asgi_app"
    assert cloudmodal.wsgi_app(label="w")(nullary).params.web == WebConfig(kind="wsgi_app", label="w")


def test_stacking_merges_in_either_order():
    a = cloudmodal.concurrent(max_inputs=5)(cloudmodal.fastapi_endpoint()(plain))
    b = cloudmodal.fastapi_endpoint()(cloudmodal.concurrent(max_inputs=5)(plain))
    for pf in (a, b):
        assert pf.flags & _Flags.CONCURRENT and pf.flags & _Flags.WEB_INTERFACE
        assert pf.params.max_inputs == 5 and pf.params.web.kind == "fastapi_endpoint"
    with pytest.raises(InvalidError, match="set twice"):
        cloudmodal.concurrent(max_inputs=2)(cloudmodal.concurrent(max_inputs=3)(plain))


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        (
            lambda: cloudmodal.method()(cloudmodal.fastapi_endpoint()(plain)),
            "cannot be combined with web interface",
        ),
        (
            lambda: cloudmodal.batched(max_batch_size=2, wait_ms=1)(cloudmodal.asgi_app()(nullary)),
            "web interface",
        ),
        (lambda: cloudmodal.enter()(cloudmodal.method()(plain)), "cannot be combined with lifecycle"),
        (lambda: cloudmodal.exit()(cloudmodal.fastapi_endpoint()(plain)), "lifecycle"),
        (lambda: cloudmodal.method()(type("C", (), {})), "Cannot apply `@cloudmodal.method` to a class"),
        (lambda: cloudmodal.asgi_app()(plain), "can't have parameters"),
        (lambda: cloudmodal.web_server(8000)(plain), "can't have parameters"),
        (lambda: cloudmodal.wsgi_app()(_async_factory), "cannot wrap the async function"),
        (lambda: cloudmodal.fastapi_endpoint()(42), "must be callable"),
    ],
)
def test_invalid_compositions(stack, expected):
    with pytest.raises(InvalidError) as e:
        stack()
    assert expected in str(e.value)


async def _async_factory():
    return None


def test_wrong_order_over_app_function():
    app = cloudmodal.App()
    f = app.function()(plain)
    with pytest.raises(InvalidError) as e:
        cloudmodal.fastapi_endpoint()(f)
    assert "Swap the order" in str(e.value) and "@app.function()\n@cloudmodal.fastapi_endpoint" in str(
        e.value
    )


def test_generator_and_async_detection():
    def gen():
        yield 1

    async def agen():
        yield 1

    async def coro():
        return 1

    assert cloudmodal.method()(gen).is_generator
    assert cloudmodal.method()(agen).is_generator and cloudmodal.method()(agen).is_async
    assert not cloudmodal.method()(coro).is_generator and cloudmodal.method()(coro).is_async
    assert cloudmodal.method(is_generator=True)(plain).is_generator  # returns a generator object


@pytest.mark.parametrize(
    ("f", "skip_self", "expected"),
    [
        (lambda: None, False, True),
        (lambda x=1, *a, **k: None, False, True),
        (lambda x: None, False, False),
        (lambda self: None, True, True),
        (lambda self, x: None, True, False),
        (lambda *, x: None, False, False),
    ],
)
def test_is_nullary(f, skip_self, expected):
    assert is_nullary(f, skip_self=skip_self) is expected


# ------------------------------------------------------------------------------------------ class parameters


class Base:
    model: str = cloudmodal.parameter()
    size: int = cloudmodal.parameter(default=1)


class Model(Base):
    verbose: bool = cloudmodal.parameter(default=False)
    blob: bytes = cloudmodal.parameter(default=b"")
    cache: dict = cloudmodal.parameter(init=False, default={"warm": False})  # not a parameter; any type
    size: int = cloudmodal.parameter(default=2)  # overrides the base default, keeps its position

    @cloudmodal.method()
    def predict(self, x):
        return (self.model, self.size * x)


def test_get_parameters_in_declaration_order_with_overrides():
    assert get_parameters(Model) == [
        ("model", str, NO_DEFAULT),
        ("size", int, 2),
        ("verbose", bool, False),
        ("blob", bytes, b""),
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "x: float = cloudmodal.parameter()",
            "float is not a supported cloudmodal.parameter() type. Use one of: int, str, bytes, bool",
        ),
        ("x: list = cloudmodal.parameter()", "list is not a supported"),
        ("x: 'int | None' = cloudmodal.parameter(default=1)", "Use one of: int, str, bytes, bool"),
        ("x = cloudmodal.parameter()", "has no type annotation"),
        ("x: int = cloudmodal.parameter(default='1')", "declared as int. Make them match"),
        ("x: int = cloudmodal.parameter(default=True)", "declared as int"),
        ("x: bool = cloudmodal.parameter(default=1)", "declared as bool"),
    ],
)
def test_parameter_type_rules(source, expected):
    ns: dict = {"cloudmodal": cloudmodal}
    exec(f"class C:\n    {source}\n", ns)  # real (non-string) annotations
    with pytest.raises(InvalidError) as e:
        get_parameters(ns["C"])
    assert expected in str(e.value)


def test_instantiate_sets_parameters_without_calling_init():
    obj = instantiate(Model, model="llama", verbose=True)
    assert (obj.model, obj.size, obj.verbose, obj.blob) == ("llama", 2, True, b"")
    assert obj.cache == {"warm": False}
    assert obj.predict(3) == ("llama", 6)  # decorated methods are plain bound methods on instances
    assert instantiate(Model, "gpt", 5).size == 5  # positional, in declaration order

    class Guarded:
        x: int = cloudmodal.parameter(default=0)

        def __init__(self):  # would be rejected by @app.cls; instantiate never calls it
            raise AssertionError("__init__ called")

    assert instantiate(Guarded, x=3).x == 3


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (
            (),
            {},
            "missing the required parameter `model` (str). Pass it when instantiating: Model(model=...)",
        ),
        ((), {"model": "a", "sise": 3}, "unknown parameter `sise`. Did you mean 'size'?"),
        ((), {"model": 1}, "parameter `model` must be str, got int"),
        ((), {"model": "a", "size": True}, "parameter `size` must be int, got bool"),
        ((), {"model": "a", "verbose": 1}, "parameter `verbose` must be bool"),
        ((), {"model": "a", "blob": "text"}, "parameter `blob` must be bytes"),
        (("a", 1, True, b"", "extra"), {}, "takes 4 parameter(s)"),
        (("a",), {"model": "b"}, "got parameter `model` twice"),
    ],
)
def test_bind_parameters_errors(args, kwargs, expected):
    with pytest.raises(InvalidError) as e:
        bind_parameters(Model, args, kwargs)
    assert expected in str(e.value)


def test_bind_parameters_fills_defaults():
    assert bind_parameters(Model, (), {"model": "m"}) == {
        "model": "m",
        "size": 2,
        "verbose": False,
        "blob": b"",
    }


# ------------------------------------------------------------------------------------------ lifecycle


class Hooks:
    def __new__(cls):
        obj = super().__new__(cls)
        obj.calls = []
        return obj

    @cloudmodal.enter(snap=True)
    def a_snap(self):
        self.calls.append("snap")

    @cloudmodal.enter()
    def b_load(self):
        self.calls.append("load")

    @cloudmodal.enter()
    async def c_async(self):
        await asyncio.sleep(0)
        self.calls.append("async")

    @cloudmodal.exit()
    def d_close(self):
        self.calls.append("close")

    @cloudmodal.method()
    def run(self):
        return "ran"


class SubHooks(Hooks):
    @cloudmodal.enter()
    def b_load(self):  # override: runs in the base's position
        self.calls.append("sub-load")

    c_async = None  # a plain attribute removes the base hook

    @cloudmodal.exit()
    def e_more(self):
        raise RuntimeError("e_more failed")


def test_find_lifecycle_hooks():
    assert find_lifecycle_hooks(Hooks, "enter_pre_snapshot") == ["a_snap"]
    assert find_lifecycle_hooks(Hooks, "enter_post_snapshot") == ["b_load", "c_async"]
    assert find_lifecycle_hooks(Hooks, "enter") == ["a_snap", "b_load", "c_async"]
    assert find_lifecycle_hooks(Hooks, "exit") == ["d_close"]
    assert find_lifecycle_hooks(SubHooks, "enter") == ["a_snap", "b_load"]
    assert find_lifecycle_hooks(SubHooks, "exit") == ["d_close", "e_more"]
    with pytest.raises(ValueError, match="unknown lifecycle kind"):
        find_lifecycle_hooks(Hooks, "start")


def test_run_lifecycle_hooks_sync_async_and_on_a_loop():
    h = instantiate(Hooks)
    run_lifecycle_hooks(h, "enter")
    run_lifecycle_hooks(h, "exit")
    assert h.calls == ["snap", "load", "async", "close"]
    assert h.run() == "ran"

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        h2 = instantiate(Hooks)
        run_lifecycle_hooks(h2, "enter", loop=loop)
        assert h2.calls == ["snap", "load", "async"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


def test_exit_hooks_all_run_then_first_error_raises():
    h = instantiate(SubHooks)
    run_lifecycle_hooks(h, "enter")
    with pytest.raises(RuntimeError, match="e_more failed"):
        run_lifecycle_hooks(h, "exit")
    assert h.calls == ["snap", "sub-load", "close"]


def test_enter_hook_errors_propagate():
    class Broken:
        @cloudmodal.enter()
        def boom(self):
            raise ValueError("no weights")

        @cloudmodal.enter()
        def after(self):
            raise AssertionError("must not run")

    with pytest.raises(ValueError, match="no weights"):
        run_lifecycle_hooks(instantiate(Broken), "enter")


def test_markers_refuse_to_go_on_top_of_a_handle():
    app = cloudmodal.App()

    @app.function(serialized=True)
    def f():
        return 1

    with pytest.raises(InvalidError, match=r"Cannot stack `@cloudmodal.method` on top of `@app.function`"):
        cloudmodal.method()(f)

    @app.cls(serialized=True)
    class C:
        @cloudmodal.method()
        def g(self):
            return 1

    with pytest.raises(
        InvalidError, match=r"(?s)on top of `@app.cls`. Swap the order:.*@app.cls\(\).*class C"
    ):
        cloudmodal.concurrent(max_inputs=2)(C)


@pytest.mark.parametrize(
    "domains, message",
    [
        (["https://api.example.com"], "not a domain name"),
        (["API.example.com"], "not a domain name"),
        (["localhost"], "not a domain name"),
        (["api.example.com:8080"], "not a domain name"),
        (["a.example.com", "a.example.com"], "each once"),
        ([f"d{i}.example.com" for i in range(17)], "at most 16"),
    ],
)
def test_custom_domains_are_host_names(domains: list[str], message: str) -> None:
    with pytest.raises(InvalidError, match=message):
        cloudmodal.fastapi_endpoint(custom_domains=domains)


def test_custom_domains_reach_the_spec_and_its_wire_form() -> None:
    from cloudmodal.server.wire_spec import validate_wire_spec
    from cloudmodal.spec import FunctionSpec

    app = cloudmodal.App("domains")

    @app.function(serialized=True)
    @cloudmodal.fastapi_endpoint(custom_domains=["api.example.com", "www.example.co.uk"])
    def f() -> None:
        pass

    spec = f.spec
    assert spec.web.custom_domains == ("api.example.com", "www.example.co.uk")
    again = FunctionSpec.from_wire(validate_wire_spec(spec.to_wire()))
    assert again.web.custom_domains == spec.web.custom_domains
