"""App, @app.function, @app.cls and @app.local_entrypoint: option validation and the specs they build."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import PurePosixPath

import pytest

import cloudmodal
from cloudmodal import App, Cron, Image, Period, Retries, Secret, Volume
from cloudmodal._context import current_call_id, current_input_id
from cloudmodal.app import CLS_OPTIONS, FUNCTION_OPTIONS
from cloudmodal.exception import DeprecationError, InvalidError
from cloudmodal.functions import Cls, Function
from cloudmodal.gpu import GpuTier
from cloudmodal.spec import (
    AutoscalerSettings,
    BatchConfig,
    ConcurrencyConfig,
    FunctionSpec,
    RetryPolicy,
    WebConfig,
)


def square(x: int) -> int:
    return x * x


def no_args() -> str:
    return "tick"


def optional_args(n: int = 3) -> int:
    return n


def countdown(n: int):
    yield from range(n)


def decorate(**options):
    """Decorate the module-level `square` with a fresh app."""
    return App().function(**options)(square)


# ------------------------------------------------------------------------------------------ must show:
# decoration-time errors for bad GPU specs, bad retries, bad schedules and renamed options, each naming the fix


@pytest.mark.parametrize(
    ("options", "exc", "fix"),
    [
        # GPU specs
        ({"gpu": "A100:40GB"}, InvalidError, "'A100-40GB'"),
        ({"gpu": "H100:0"}, InvalidError, "1 to 8 GPUs"),
        ({"gpu": "H100:9"}, InvalidError, "1 to 8 GPUs"),
        ({"gpu": "H1000"}, InvalidError, "Did you mean 'H100'"),
        ({"gpu": 3}, InvalidError, "a list of strings, or None"),
        ({"gpu": ["H100", "h100"]}, InvalidError, "appears twice"),
        ({"gpu": "A10G:8"}, InvalidError, "at most 4 GPUs"),
        # retries
        ({"retries": -1}, InvalidError, "retries=0"),
        ({"retries": "3"}, InvalidError, "retries=cloudmodal.Retries(max_retries=3"),
        ({"retries": 2.5}, InvalidError, "must be an int or a cloudmodal.Retries"),
        # schedules
        ({"schedule": "0 9 * * *"}, InvalidError, "schedule=cloudmodal.Cron('0 9 * * *')"),
        ({"schedule": 3600}, InvalidError, "schedule=cloudmodal.Period(hours=1)"),
        # renamed options (Modal 1.0)
        ({"keep_warm": 2}, DeprecationError, "min_containers=2"),
        ({"concurrency_limit": 10}, DeprecationError, "max_containers=10"),
        ({"container_idle_timeout": 300}, DeprecationError, "scaledown_window=300"),
        ({"allow_concurrent_inputs": 8}, DeprecationError, "@cloudmodal.concurrent(max_inputs=8)"),
        ({"secret": "s"}, DeprecationError, "secrets=["),
        ({"mounts": []}, DeprecationError, "add_local_python_source"),
        ({"checkpointing_enabled": True}, DeprecationError, "enable_memory_snapshot=True"),
        ({"_experimental_buffer_containers": 1}, DeprecationError, "buffer_containers=1"),
    ],
)
def test_must_show_decoration_errors_name_the_fix(options, exc, fix):
    with pytest.raises(exc) as e:
        decorate(**options)
    assert fix in str(e.value)


@pytest.mark.parametrize(
    ("make", "fix"),
    [
        (
            lambda: Retries(max_retries=2, backoff_coefficient=20),
            "between 1.0 (fixed-interval backoff) and 10.0",
        ),
        (lambda: Retries(max_retries=2, initial_delay=120), "between 0 and 60 seconds"),
        (lambda: Cron("61 * * * *"), "e.g. '0 9 * * 1-5'"),
        (lambda: Cron("0 9 * * *", timezone="US/Eastrn"), "Did you mean 'US/Eastern'"),
        (lambda: Period(), "Period(minutes=5)"),
        (lambda: App().function(schedule=Period(hours=1))(square), "Give every parameter a default"),
    ],
)
def test_must_show_retry_and_schedule_objects_name_the_fix(make, fix):
    with pytest.raises(InvalidError) as e:
        make()
    assert fix in str(e.value)


def test_renamed_options_are_deprecation_errors_in_cls_too():
    with pytest.raises(DeprecationError, match="min_containers=1"):
        App().cls(keep_warm=1)


# ------------------------------------------------------------------------------------------ option table


def test_every_modal_keyword_is_accepted():
    app = App()
    all_options = {
        "image": Image.debian_slim(),
        "schedule": Period(hours=1),
        "env": {"A": "1", "B": None},
        "secrets": [Secret.from_name("s")],
        "gpu": ["H100", "A100-80GB:2"],
        "serialized": False,
        "network_file_systems": {},
        "volumes": {"/data": Volume.from_name("v")},
        "cpu": (1.0, 2.0),
        "memory": (1024, 2048),
        "ephemeral_disk": 10240,
        "min_containers": 1,
        "max_containers": 4,
        "buffer_containers": 1,
        "scaledown_window": 120,
        "proxy": None,
        "retries": 2,
        "timeout": 600,
        "startup_timeout": 60,
        "name": "renamed",
        "is_generator": False,
        "cloud": "aws",
        "region": ["us-east-1", "us-west-2"],
        "routing_region": "us-east",
        "nonpreemptible": False,
        "enable_memory_snapshot": True,
        "block_network": True,
        "restrict_modal_access": True,
        "single_use_containers": False,
        "i6pn": False,
        "include_source": False,
        "experimental_options": {"enable_gpu_snapshot": True},
        "_experimental_restrict_output": True,
        "max_inputs": 1,
        "spot": "require",
        "max_price_per_hour": 12.5,
        "min_on_demand": 0,
    }
    assert set(all_options) == set(FUNCTION_OPTIONS)
    f = app.function(**all_options)(optional_args)
    s = f.spec
    assert s.name == "renamed" and app.registered_functions == {"renamed": f}
    assert s.gpu == (GpuTier("H100", 1), GpuTier("A100-80GB", 2))
    assert (s.cpu, s.cpu_limit, s.memory, s.memory_limit, s.ephemeral_disk) == (1.0, 2.0, 1024, 2048, 10240)
    assert s.autoscaler == AutoscalerSettings(1, 4, 1, 120)
    assert s.retries == RetryPolicy(2, 1.0, 1.0, 60.0)
    assert (s.timeout, s.startup_timeout) == (600, 60)
    assert (s.cloud, s.region, s.routing_region) == ("aws", ("us-east-1", "us-west-2"), "us-east")
    assert (s.spot, s.max_price_per_hour, s.nonpreemptible) == ("require", 12.5, False)
    assert s.single_use_containers  # max_inputs=1
    assert (s.enable_memory_snapshot, s.block_network, s.restrict_modal_access, s.restrict_output) == (
        True,
    ) * 4
    assert s.include_source is False and s.i6pn is False
    assert s.experimental_options == (("enable_gpu_snapshot", "True"),)
    assert s.env == (("A", "1"),)
    assert s.secrets == ("s",) and s.volumes == (("/data", "v"),)
    assert s.schedule == {
        "type": "period",
        "years": 0,
        "months": 0,
        "weeks": 0,
        "days": 0,
        "hours": 1,
        "minutes": 0,
        "seconds": 0,
    }
    assert set(CLS_OPTIONS) == set(FUNCTION_OPTIONS) - {"schedule", "name", "is_generator"}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"gpus": "H100"}, ["unexpected keyword argument 'gpus'", "Did you mean 'gpu'"]),
        ({"timout": 10}, ["Did you mean 'timeout'"]),
        ({"secret_s": []}, ["Did you mean 'secrets'"]),
        ({"zzz": 1}, ["unexpected keyword argument 'zzz'", "Valid options: image, schedule"]),
        ({"image": "python:3.11"}, ["expected a cloudmodal.Image", "Image.debian_slim()"]),
        ({"env": {"A": 1}}, ["not a string", "str(1)"]),
        ({"env": ["A=1"]}, ["expected a dict"]),
        ({"secrets": Secret.from_name("x")}, ["single Secret", "secrets=[my_secret]"]),
        ({"secrets": ["name"]}, ["is not a cloudmodal.Secret", "Secret.from_name"]),
        ({"serialized": "yes"}, ["True or False"]),
        ({"network_file_systems": {"/x": object()}}, ["not supported", "volumes="]),
        ({"volumes": {"data": Volume.from_name("v")}}, ["not absolute", "'/data'"]),
        ({"volumes": {"/data/": Volume.from_name("v")}}, ["not canonical", "'/data'"]),
        ({"volumes": {"/a/../b": Volume.from_name("v")}}, ["not canonical", "'/b'"]),
        ({"volumes": {"//x": Volume.from_name("v")}}, ["not canonical", "'/x'"]),
        ({"volumes": {"/": Volume.from_name("v")}}, ["cannot be mounted at '/'", "'/data'"]),
        ({"volumes": {"/root": Volume.from_name("v")}}, ["reserved"]),
        ({"volumes": {"/tmp": Volume.from_name("v")}}, ["reserved", "'/tmp/data'"]),
        (
            {"volumes": {"/a": Volume.from_name("v"), "/b": Volume.from_name("v")}},
            ["mounted at both '/a' and '/b'"],
        ),
        ({"volumes": {"/a": "v"}}, ["not a cloudmodal.Volume", "Volume.from_name"]),
        ({"volumes": ["/a"]}, ["expected a dict of mount path to Volume"]),
        ({"cpu": 0}, ["CPU request must be a positive number"]),
        ({"cpu": (2, 1)}, ["Cannot specify a CPU limit lower than request: 1 < 2"]),
        ({"cpu": (0, 1)}, ["CPU request must be a positive number"]),
        ({"cpu": (1, 2, 3)}, ["expected (request, limit)"]),
        ({"cpu": "2"}, ["not a number of cores"]),
        ({"memory": 1.5}, ["not a whole number of MiB"]),
        ({"memory": (4096, 1024)}, ["Cannot specify a memory limit lower than request: 1024 < 4096"]),
        ({"memory": -1}, ["Memory request must be a positive number"]),
        ({"ephemeral_disk": 4 * 1024 * 1024}, ["3 TiB"]),
        ({"min_containers": 1.0}, ["`min_containers` must be an int, not float"]),
        ({"min_containers": -1}, ["at least 0"]),
        ({"max_containers": 0}, ["at least 1"]),
        ({"buffer_containers": "1"}, ["must be an int"]),
        (
            {"min_containers": 5, "max_containers": 2},
            ["`min_containers` (5) cannot be greater than `max_containers` (2)"],
        ),
        ({"scaledown_window": 1}, ["`scaledown_window` must be between 2 and 3600 (inclusive)"]),
        ({"scaledown_window": 3601}, ["between 2 and 3600"]),
        ({"scaledown_window": 60.5}, ["between 2 and 3600"]),
        ({"proxy": object()}, ["not supported", "Remove proxy="]),
        ({"timeout": None}, ["timeout=None is not allowed", "from 1 to 86400", "/docs/guide/timeouts"]),
        ({"timeout": 0}, ["between 1 and 86400 seconds (24 h)"]),
        ({"timeout": 86401}, ["between 1 and 86400"]),
        ({"timeout": 1.5}, ["not a whole number of seconds"]),
        ({"startup_timeout": 0}, ["between 1 and 86400"]),
        ({"name": "has space"}, ["invalid function name", "name='embed-v2'"]),
        ({"is_generator": "no"}, ["True or False"]),
        ({"cloud": "oci"}, ["unknown cloud 'oci'", "aws, gcp, azure, lambda, local, sim, auto"]),
        ({"cloud": "awss"}, ["Did you mean 'aws'"]),
        ({"region": 5}, ["region='us-east-1'"]),
        ({"region": []}, ["list of them"]),
        ({"region": ["us-east-1", ""]}, ["list of them"]),
        ({"routing_region": 1}, ["expected a region name"]),
        ({"nonpreemptible": 1}, ["True or False"]),
        ({"include_source": "yes"}, ["True or False"]),
        ({"experimental_options": ["x"]}, ["dict with string keys"]),
        ({"max_inputs": 2}, ["Only `max_inputs=1` is currently supported", "single_use_containers=True"]),
        ({"max_inputs": 0}, ["`max_inputs` must be positive"]),
        ({"spot": "maybe"}, ["unknown spot policy", "'allow'", "'require'", "'never'"]),
        ({"spot": True}, ["unknown spot policy"]),
        (
            {"spot": "require", "nonpreemptible": True},
            ["contradicts nonpreemptible=True", "Remove one of them"],
        ),
        ({"max_price_per_hour": 0}, ["positive number of dollars per hour", "max_price_per_hour=4.0"]),
        ({"max_price_per_hour": "5"}, ["positive number"]),
        ({"max_price_per_hour": float("nan")}, ["positive number"]),
    ],
)
def test_function_option_errors(options, expected):
    with pytest.raises(InvalidError) as e:
        decorate(**options)
    for text in expected:
        assert text in str(e.value)


@pytest.mark.parametrize(
    ("options", "field", "value"),
    [
        ({}, "spot", "allow"),
        ({"nonpreemptible": True}, "spot", "never"),
        ({"nonpreemptible": True, "spot": "allow"}, "spot", "never"),
        ({"spot": "never"}, "spot", "never"),
        ({"cloud": "AUTO"}, "cloud", None),
        ({"cloud": "Lambda"}, "cloud", "lambda"),
        ({"region": "eu-west-1"}, "region", ("eu-west-1",)),
        ({"cpu": 0.5}, "cpu", 0.5),
        ({"cpu": 2}, "cpu", 2.0),
        ({"memory": 512}, "memory", 512),
        ({"retries": 0}, "retries", None),
        ({"retries": Retries(max_retries=1, initial_delay=0)}, "retries", RetryPolicy(1, 2.0, 0.0, 60.0)),
        ({"timeout": 1}, "timeout", 1),
        ({"timeout": 86400.0}, "timeout", 86400),
        ({"scaledown_window": 2}, "autoscaler", AutoscalerSettings(scaledown_window=2)),
        ({"max_price_per_hour": 3}, "max_price_per_hour", 3.0),
        ({"gpu": None}, "gpu", ()),
        ({"gpu": "any"}, "gpu", (GpuTier("ANY", 1),)),
        (
            {"volumes": {PurePosixPath("/w"): Volume.from_name("w", create_if_missing=True)}},
            "create_volumes",
            ("w",),
        ),
    ],
)
def test_function_option_values(options, field, value):
    assert getattr(decorate(**options).spec, field) == value


# ------------------------------------------------------------------------------------------ @app.function rules


def test_function_spec_basics():
    app = App("basics")
    f = app.function()(square)
    assert isinstance(f, Function) and f.raw_f is square and f.app is app
    s = f.spec
    assert (s.name, s.module, s.qualname, s.kind) == ("square", __name__, "square", "function")
    assert s.source_file == __file__
    assert (s.is_generator, s.is_async, s.timeout, s.retries, s.gpu) == (False, False, 300, None, ())
    assert s.image == Image.debian_slim().to_wire() and s.image_hash == Image.debian_slim().hash
    assert FunctionSpec.from_wire(s.to_wire()) == s


def test_generator_and_async_detection():
    app = App()
    assert app.function()(countdown).spec.is_generator

    async def agen():
        yield 1

    async def coro():
        return 1

    agen.__qualname__ = "agen"
    coro.__qualname__ = "coro"
    a, c = app.function()(agen).spec, app.function()(coro).spec
    assert a.is_generator and a.is_async
    assert not c.is_generator and c.is_async
    assert app.function(is_generator=True, name="forced")(square).spec.is_generator


def test_class_under_app_function_is_a_type_error():
    class Model:
        pass

    with pytest.raises(TypeError, match=r"Use @app.cls\(\) for classes"):
        App().function()(Model)
    with pytest.raises(TypeError, match="Use @app.cls"):
        App().function()(cloudmodal.concurrent(max_inputs=2)(Model))


def test_non_global_function_needs_serialized():
    def inner(x):
        return x

    with pytest.raises(InvalidError) as e:
        App().function()(inner)
    assert "defined inside another function" in str(e.value)
    assert "module level" in str(e.value) and "serialized=True" in str(e.value)
    spec = App().function(serialized=True)(inner).spec
    assert spec.serialized and spec.qualname.endswith("<locals>.inner")
    with pytest.raises(InvalidError, match="serialized=True"):
        App().function()(lambda: 1)


def test_method_or_lifecycle_under_app_function():
    class Holder:
        def meth(self):
            return 1

    Holder.meth.__qualname__ = "Holder.meth"  # as if defined at module level in a class body
    with pytest.raises(InvalidError, match=r"method of class Holder.*@app.cls\(\)"):
        App().function()(Holder.meth)
    with pytest.raises(InvalidError, match=r"remove @cloudmodal.method\(\)"):
        App().function()(cloudmodal.method()(square))
    with pytest.raises(InvalidError, match="only work on methods of @app.cls"):
        App().function()(cloudmodal.enter()(square))
    f = App().function()(square)
    with pytest.raises(InvalidError, match="already decorated"):
        App().function()(f)


def test_positional_arguments_suggest_parentheses():
    with pytest.raises(InvalidError, match=r"`@app.function\(\)`"):
        App().function(square)
    with pytest.raises(InvalidError, match=r"`@app.cls\(\)`"):
        App().cls(object)
    with pytest.raises(InvalidError, match=r"`@app.local_entrypoint\(\)`"):
        App().local_entrypoint(square)


def test_schedule_needs_a_nullary_function():
    app = App()
    assert app.function(schedule=Cron("*/5 * * * *"))(no_args).spec.schedule == {
        "type": "cron",
        "cron_string": "*/5 * * * *",
        "timezone": "UTC",
    }
    assert app.function(schedule=Period(days=1))(optional_args).spec.schedule["days"] == 1
    with pytest.raises(InvalidError) as e:
        app.function(schedule=Cron("0 0 * * *"))(square)
    assert "Function square has a schedule, so it needs to support being called with no arguments" in str(
        e.value
    )


def test_retries_not_allowed_on_web_endpoints_or_generators():
    with pytest.raises(InvalidError, match="Web endpoints do not support retries"):
        App().function(retries=2)(cloudmodal.fastapi_endpoint()(square))
    with pytest.raises(InvalidError, match="Generator functions do not support retries"):
        App().function(retries=Retries(max_retries=1))(countdown)
    App().function(retries=0)(countdown)  # no retries: fine


def test_web_endpoints():
    app = App()
    f = app.function()(cloudmodal.fastapi_endpoint(method="POST", label="sq")(square))
    assert f.spec.web == WebConfig(kind="fastapi_endpoint", method="POST", label="sq")
    srv = app.function()(cloudmodal.web_server(8000, startup_timeout=30)(no_args))
    assert srv.spec.web == WebConfig(kind="web_server", port=8000, startup_timeout=30.0)
    assert app.registered_web_endpoints == ["square", "no_args"]
    with pytest.raises(InvalidError, match="Web endpoints cannot be generators.*StreamingResponse"):
        App().function()(cloudmodal.fastapi_endpoint()(countdown))


def test_concurrent_and_batched_functions():
    app = App()
    c = app.function()(cloudmodal.concurrent(max_inputs=10, target_inputs=8)(square))
    assert c.spec.concurrency == ConcurrencyConfig(10, 8) and c.raw_f is square

    def embed(texts):
        return texts

    embed.__qualname__ = "embed"
    b = app.function()(cloudmodal.batched(max_batch_size=32, wait_ms=50)(embed))
    assert b.spec.batching == BatchConfig(32, 50)

    def with_default(xs, ys=None):
        return xs

    with_default.__qualname__ = "with_default"
    with pytest.raises(InvalidError, match="does not accept default arguments"):
        App().function()(cloudmodal.batched(max_batch_size=2, wait_ms=0)(with_default))
    with pytest.raises(InvalidError, match="cannot be a generator"):
        App().function()(cloudmodal.batched(max_batch_size=2, wait_ms=0)(countdown))
    with pytest.raises(InvalidError, match="at least one argument"):
        App().function()(cloudmodal.batched(max_batch_size=2, wait_ms=0)(no_args))


# ------------------------------------------------------------------------------------------ @app.cls


class Model:
    size: int = cloudmodal.parameter(default=2)
    name: str = cloudmodal.parameter()

    @cloudmodal.enter()
    def load(self):
        self.weights = [self.size]

    @cloudmodal.method()
    def predict(self, x):
        return x * self.size

    @cloudmodal.method()
    def stream(self, n):
        yield from range(n)

    @cloudmodal.method()
    async def apredict(self, x):
        return x

    @cloudmodal.fastapi_endpoint(method="POST")
    def http(self, x: int):
        return x

    @cloudmodal.exit()
    def close(self):
        pass

    def helper(self):  # not exposed
        return 0


def test_cls_spec():
    app = App("svc")
    handle = app.cls(gpu="L4", scaledown_window=30)(Model)
    assert (
        isinstance(handle, Cls) and handle.user_cls is Model and app.registered_classes == {"Model": handle}
    )
    s = handle.spec
    assert (s.kind, s.name, s.module, s.qualname) == ("cls", "Model", __name__, "Model")
    assert s.methods == ("predict", "stream", "apredict", "http")
    assert (s.generator_methods, s.async_methods) == (("stream",), ("apredict",))
    assert s.web_methods == (("http", WebConfig(kind="fastapi_endpoint", method="POST")),)
    assert s.parameters == (("size", "int", 2), ("name", "str", None))
    assert s.gpu == (GpuTier("L4"),) and s.autoscaler.scaledown_window == 30
    assert s.concurrency is None and s.batching is None
    assert app.registered_web_endpoints == ["Model.http"]
    assert FunctionSpec.from_wire(s.to_wire()) == s


def test_cls_concurrent_goes_on_the_class():
    @cloudmodal.concurrent(max_inputs=4, target_inputs=2)
    class Svc:
        @cloudmodal.method()
        def f(self):
            return 1

    Svc.user_cls.__qualname__ = "Svc"  # as if defined at module level
    h = App().cls()(Svc)
    assert h.spec.concurrency == ConcurrencyConfig(4, 2) and h.user_cls is Svc.user_cls

    class OnMethod:
        @cloudmodal.concurrent(max_inputs=4)
        @cloudmodal.method()
        def f(self):
            return 1

    OnMethod.__qualname__ = "OnMethod"
    with pytest.raises(InvalidError) as e:
        App().cls()(OnMethod)
    assert "Move it onto the class" in str(
        e.value
    ) and "@cloudmodal.concurrent(max_inputs=...)\nclass OnMethod" in str(e.value)


def _cls(name, body, **options):
    ns: dict = {"cloudmodal": cloudmodal}
    exec(textwrap.dedent(body), ns)
    cls = ns[name]
    return App().cls(**options)(cls)


@pytest.mark.parametrize(
    ("body", "options", "expected"),
    [
        (
            """
            class C:
                def __init__(self, x):
                    self.x = x
            """,
            {},
            ["cannot have a custom constructor (__init__)", "cloudmodal.parameter(", "@cloudmodal.enter()"],
        ),
        (
            """
            class C:
                x: float = cloudmodal.parameter()
            """,
            {},
            ["float is not a supported cloudmodal.parameter() type. Use one of: int, str, bytes, bool"],
        ),
        (
            """
            class C:
                @cloudmodal.enter(snap=True)
                def warm(self): ...
            """,
            {},
            ["enable_memory_snapshot=True", "without snap"],
        ),
        (
            """
            class C:
                @cloudmodal.batched(max_batch_size=4, wait_ms=10)
                def a(self, xs): ...
                @cloudmodal.batched(max_batch_size=4, wait_ms=10)
                def b(self, xs): ...
            """,
            {},
            ["can have only one"],
        ),
        (
            """
            class C:
                @cloudmodal.batched(max_batch_size=4, wait_ms=10)
                def a(self, xs): ...
                @cloudmodal.method()
                def b(self, x): ...
            """,
            {},
            ["cannot have other methods (b)"],
        ),
        (
            """
            class C:
                @cloudmodal.batched(max_batch_size=4, wait_ms=10)
                def a(self, xs, ys=None): ...
            """,
            {},
            ["does not accept default arguments"],
        ),
        (
            """
            class C:
                @cloudmodal.enter()
                def load(self, path): ...
            """,
            {},
            ["must take only `self`"],
        ),
        (
            """
            class C:
                @cloudmodal.fastapi_endpoint()
                def web(self):
                    yield 1
            """,
            {},
            ["Web endpoints cannot be generators (C.web)"],
        ),
    ],
)
def test_cls_errors(body, options, expected):
    with pytest.raises(InvalidError) as e:
        _cls("C", body, **options)
    for text in expected:
        assert text in str(e.value)


def test_cls_batched_and_snapshot():
    h = _cls(
        "B",
        """
        class B:
            @cloudmodal.enter(snap=True)
            def warm(self): ...
            @cloudmodal.batched(max_batch_size=16, wait_ms=5)
            def embed(self, xs): return xs
        """,
        enable_memory_snapshot=True,
    )
    assert h.spec.batching == BatchConfig(16, 5) and h.spec.methods == ("embed",)
    assert h.spec.enable_memory_snapshot


def test_cls_option_restrictions():
    for option in ("schedule", "name", "is_generator"):
        with pytest.raises(InvalidError, match="applies to @app.function only"):
            App().cls(**{option: None})
    with pytest.raises(InvalidError, match="For a function use @app.function"):
        App().cls()(square)
    with pytest.raises(InvalidError, match="Use @app.function"):
        App().cls()(cloudmodal.concurrent(max_inputs=2)(square))
    with pytest.raises(InvalidError, match="defined inside another function"):
        _local_class()


def _local_class():
    class Local:
        pass

    return App().cls()(Local)


# ------------------------------------------------------------------------------------------ App


def test_app_level_defaults_merge_into_functions():
    app_secret = Secret.from_name("app-secret")
    inline = Secret.from_dict({"TOKEN": "s3cret-token"})  # not hex: no random name or hash can contain it
    img = Image.debian_slim("3.12").env({"HF_HOME": "/cache", "MODE": "image"})
    app = App(
        "merge",
        image=img,
        secrets=[app_secret, inline],
        volumes={"/shared": Volume.from_name("shared"), "/data": Volume.from_name("app-data")},
        include_source=False,
    )
    f = app.function(
        secrets=[Secret.from_name("fn-secret"), app_secret],
        volumes={"/data": Volume.from_name("fn-data", create_if_missing=True)},
        env={"MODE": "fn"},
    )(square)
    s = f.spec
    assert s.secrets == ("app-secret", inline.name, "fn-secret")  # app first, deduplicated
    assert s.volumes == (("/data", "fn-data"), ("/shared", "shared"))  # function wins on the same path
    assert s.create_volumes == ("fn-data",)
    assert s.image_hash == img.hash and s.include_source is False
    assert dict(s.env) == {"HF_HOME": "/cache", "MODE": "fn"}  # image env, function env= wins
    override = app.function(image=Image.debian_slim("3.11"), include_source=True, name="other")(square).spec
    assert override.image_hash == Image.debian_slim("3.11").hash and override.include_source is True
    assert app.inline_secret_values() == {inline.name: {"TOKEN": "s3cret-token"}}
    assert app.inline_secret_env(s) == {"TOKEN": "s3cret-token"}
    assert "s3cret-token" not in str(s.to_wire())


def test_same_volume_twice_across_app_and_function():
    app = App(volumes={"/a": Volume.from_name("v")})
    with pytest.raises(InvalidError, match="mounted at both"):
        app.function(volumes={"/b": Volume.from_name("v")})(square)


def test_inline_secrets_from_image_build_steps_are_kept():
    s = Secret.from_dict({"PIP_TOKEN": "x"})
    app = App()
    app.function(image=Image.debian_slim().run_commands("pip download x", secrets=[s]))(square)
    assert app.inline_secret_values()[s.name] == {"PIP_TOKEN": "x"}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"name": "has space"}, "Invalid App name"),
        ({"name": "ap-" + "a" * 22}, "Invalid App name"),
        ({"name": "x" * 65}, "1 to 64 characters"),
        ({"tags": {"team": "ml ops"}}, "Invalid app tag"),
        ({"tags": ["x"]}, "dict of str to str"),
        ({"image": "debian"}, "cloudmodal.Image"),
        ({"secrets": Secret.from_name("s")}, "secrets=[my_secret]"),
        ({"volumes": {"/tmp": Volume.from_name("v")}}, "reserved"),
        ({"include_source": "yes"}, "True or False"),
    ],
)
def test_app_constructor_validation(kwargs, expected):
    with pytest.raises(InvalidError) as e:
        App(**kwargs)
    assert expected in str(e.value)


def test_app_properties_and_registries():
    app = App("props", tags={"team": "ml"})
    assert app.name == "props" and app.tags == {"team": "ml"} and app.image is None
    f = app.function()(square)

    @app.local_entrypoint()
    def main(n: int = 1):
        return n * 2

    assert app.registered_functions == {"square": f}
    assert app.registered_entrypoints == {"test_app_properties_and_registries.<locals>.main": main}
    assert main(3) == 6 and main.raw_f.__name__ == "main"
    named = app.local_entrypoint(name="go")(no_args)
    assert app.registered_entrypoints["go"] is named
    with pytest.raises(InvalidError, match="Duplicate local entrypoint name: go"):
        app.local_entrypoint(name="go")(square)
    with pytest.raises(InvalidError, match="plain function"):
        app.local_entrypoint()(f)
    app.registered_functions.clear()  # a copy
    assert "square" in app.registered_functions


def test_redefinition_warns_and_name_clash_fails():
    app = App()
    app.function()(square)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = app.function()(square)
    assert any("defined twice" in str(w.message) for w in caught)
    assert app.registered_functions["square"] is second
    with pytest.raises(InvalidError, match="already has a function named 'Model'"):
        app.function(name="Model")(square)
        app.cls()(Model)


def test_include_merges_functions_classes_tags_and_secrets():
    inline = Secret.from_dict({"K": "v"})
    other = App("other", tags={"team": "ml", "env": "dev"}, secrets=[inline])
    f = other.function()(square)
    c = other.cls()(Model)
    main = App("main", tags={"env": "prod"})
    assert main.include(other) is main
    assert main.registered_functions == {"square": f} and main.registered_classes == {"Model": c}
    assert main.tags == {"team": "ml", "env": "prod"}
    assert main.inline_secret_values() == {inline.name: {"K": "v"}}
    assert App().include(other, inherit_tags=False).tags == {}
    with pytest.raises(InvalidError, match="expects a cloudmodal.App"):
        main.include("other")


# ------------------------------------------------------------------------------------------ module-level API


def test_stub_points_to_app():
    with pytest.raises(AttributeError, match="Use cloudmodal.App instead"):
        cloudmodal.Stub  # noqa: B018
    with pytest.raises(AttributeError):
        cloudmodal.NoSuchThing  # noqa: B018


def test_public_namespace():
    for name in (
        "App Image Retries Period Cron Secret Volume enter exit method parameter concurrent batched fastapi_endpoint "
        "asgi_app wsgi_app web_server web_endpoint Function Cls FunctionCall exception is_local current_input_id "
        "current_function_call_id"
    ).split():
        assert hasattr(cloudmodal, name), name
    assert cloudmodal.exception.InvalidError is InvalidError


def test_is_local_and_current_ids(monkeypatch):
    monkeypatch.delenv("CLOUDMODAL_IS_REMOTE", raising=False)
    assert cloudmodal.is_local()
    monkeypatch.setenv("CLOUDMODAL_IS_REMOTE", "1")
    assert not cloudmodal.is_local()
    assert cloudmodal.current_input_id() is None and cloudmodal.current_function_call_id() is None
    t1, t2 = current_input_id.set("in-1"), current_call_id.set("fc-1")
    try:
        assert (cloudmodal.current_input_id(), cloudmodal.current_function_call_id()) == ("in-1", "fc-1")
    finally:
        current_input_id.reset(t1)
        current_call_id.reset(t2)


def test_import_is_light_and_main_module_uses_file_stem(tmp_path):
    """In a fresh process, from another directory: no heavy dependency is imported by `import cloudmodal`,
    and a function in a script run as __main__ gets the script's stem as its module."""
    script = tmp_path / "my_job.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import cloudmodal
            heavy = ("fastapi", "sqlmodel", "sqlalchemy", "httpx", "uvicorn", "sky", "boto3", "pulumi",
                     "croniter", "dateutil", "typer", "rich", "cloudpickle")
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
            print("HEAVY", loaded)
            app = cloudmodal.App()

            @app.function()
            def job():
                return 1

            print("MODULE", job.spec.module, job.spec.qualname)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, check=True
    )
    assert "HEAVY []" in out.stdout, out.stdout
    assert "MODULE my_job job" in out.stdout


def test_run_and_deploy_delegate_to_the_client(monkeypatch):
    import cloudmodal.client.session as session

    seen = []
    monkeypatch.setattr(session, "run_app", lambda app, **kw: seen.append(("run", app, kw)) or "ctx")
    monkeypatch.setattr(session, "deploy", lambda app, **kw: seen.append(("deploy", app, kw)) or {"ok": 1})
    app = App("d")
    assert app.run(detach=True) == "ctx"
    assert app.deploy(name="prod") == {"ok": 1}
    assert seen == [
        ("run", app, {"detach": True, "show_logs": None, "gpu_fallback": None, "name": None}),
        ("deploy", app, {"name": "prod"}),
    ]
    with pytest.raises(InvalidError, match="'rolling' or 'recreate'"):
        app.deploy(strategy="blue-green")
