"""The server's validation of wire specs: every spec the decorators build passes unchanged, and malformed ones
are refused with an error naming the field, what is wrong, and what is expected."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cloudmodal
from cloudmodal import App, Cron, Image, Period, Retries, Secret, Volume
from cloudmodal.app import FUNCTION_OPTIONS
from cloudmodal.exception import InvalidError
from cloudmodal.server.wire_spec import MAX_SPEC_CHARS, validate_wire_spec
from cloudmodal.spec import FunctionSpec

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ user code


def square(x: int) -> int:
    return x * x


def no_args() -> None:
    pass


def countdown(n: int):
    yield from range(n)


async def coro(x: int) -> int:
    return x


async def agen(n: int):
    yield n


def embed(xs: list[int]) -> list[int]:
    return xs


def make_app() -> Any:
    return None


def build_step() -> None:
    pass


class Model:
    size: int = cloudmodal.parameter(default=2)
    name: str = cloudmodal.parameter()
    verbose: bool = cloudmodal.parameter(default=False)
    cache: dict = cloudmodal.parameter(init=False, default={})  # not a parameter

    @cloudmodal.enter()
    def load(self) -> None:
        pass

    @cloudmodal.exit()
    def close(self) -> None:
        pass

    @cloudmodal.method()
    def predict(self, x: int) -> int:
        return x

    @cloudmodal.method()
    def stream(self, n: int):
        yield from range(n)

    @cloudmodal.method()
    async def apredict(self, x: int) -> int:
        return x

    @cloudmodal.fastapi_endpoint(method="POST", label="model-api", docs=True)
    def web(self, x: int) -> int:
        return x

    @cloudmodal.asgi_app(requires_proxy_auth=True)
    def asgi(self) -> Any:
        return None


class Batcher:
    @cloudmodal.batched(max_batch_size=16, wait_ms=100)
    def run(self, xs: list[int]) -> list[int]:
        return xs


class Snap:
    @cloudmodal.enter(snap=True)
    def warm(self) -> None:
        pass

    @cloudmodal.method()
    def f(self) -> int:
        return 1


def decorated_specs(tmp_path: Path) -> list[FunctionSpec]:
    """A spec for every keyword the decorators take and every decorator, as user code writes them."""
    req = tmp_path / "requirements.txt"
    req.write_text("numpy==2.0\n# a comment\nrequests>=2\n")
    image = (
        Image.debian_slim("3.12", force_build=True)
        .apt_install("git", "curl=7.88.1-10")
        .pip_install("torch==2.4.0", "transformers", index_url="https://pypi.org/simple", pre=True)
        .uv_pip_install("httpx", requirements=[str(req)], uv_version="0.5.11", extra_options="--no-deps")
        .pip_install_from_requirements(str(req), force_build=True)
        .run_commands("echo hi", secrets=[Secret.from_dict({"PIP_TOKEN": "x"})], gpu="T4")
        .env({"HF_HOME": "/cache"})
        .workdir("/app")
        .add_local_python_source("cloudmodal", copy=True, ignore=["*.pyc"])
        .run_function(build_step, args=[1], kwargs={"a": [1, 2]}, cpu=2.0, memory=1024, region="us-east-1")
    )
    app = App(
        "wire-spec",
        image=Image.debian_slim(),
        secrets=[Secret.from_name("app-secret")],
        volumes={"/shared": Volume.from_name("shared")},
    )
    all_options: dict[str, Any] = {
        "image": image,
        "schedule": Period(hours=1),
        "env": {"A": "1", "B": None},
        "secrets": [Secret.from_name("s"), Secret.from_dict({"K": "v"})],
        "gpu": ["H100", "A100-80GB:2"],
        "serialized": False,
        "network_file_systems": {},
        "volumes": {"/data": Volume.from_name("v", create_if_missing=True)},
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
    assert set(all_options) == set(FUNCTION_OPTIONS), "a new decorator option: add it here"
    fn = app.function
    specs = [
        fn(**all_options)(no_args).spec,
        fn()(square).spec,
        fn(name="gen")(countdown).spec,
        fn(name="coro")(coro).spec,
        fn(name="agen")(agen).spec,
        fn(name="cron", schedule=Cron("0 9 * * 1-5", timezone="Europe/Berlin"))(no_args).spec,
        fn(name="every", schedule=Period(months=1, seconds=1.5))(no_args).spec,
        fn(name="nonpre", nonpreemptible=True, gpu="A10", min_on_demand=2, cloud="auto")(square).spec,
        fn(name="cheap", gpu="any", spot="never", max_price_per_hour=1, timeout=86400, cloud="GCP")(
            square
        ).spec,
        fn(
            name="retried",
            retries=Retries(max_retries=5, backoff_coefficient=10, initial_delay=0, max_delay=1),
        )(square).spec,
        fn(name="wide", min_containers=0, max_containers=1, scaledown_window=2, cpu=0.25, memory=128)(
            square
        ).spec,
        fn(name="serial", serialized=True, single_use_containers=True, i6pn=True, region="eu-west-1")(
            square
        ).spec,
        fn(name="fastapi")(cloudmodal.fastapi_endpoint(method="put", label="sq", docs=True)(square)).spec,
        fn(name="asgi")(cloudmodal.asgi_app(label="my-api")(make_app)).spec,
        fn(name="wsgi")(cloudmodal.wsgi_app(requires_proxy_auth=True)(make_app)).spec,
        fn(name="server")(cloudmodal.web_server(8000, startup_timeout=30)(no_args)).spec,
        fn(name="conc")(cloudmodal.concurrent(max_inputs=100, target_inputs=80)(coro)).spec,
        fn(name="conc1")(cloudmodal.concurrent(max_inputs=1)(square)).spec,
        fn(name="batch")(cloudmodal.batched(max_batch_size=1000, wait_ms=600_000)(embed)).spec,
        fn(name="batch0")(cloudmodal.batched(max_batch_size=1, wait_ms=0)(embed)).spec,
        app.cls(gpu="L4", scaledown_window=30, retries=Retries(max_retries=1))(Model).spec,
        app.cls()(Batcher).spec,
        fn(name="variant")(square)
        .with_options(cpu=1.5, gpu="L4", max_containers=2)
        .spec,  # name "variant[...]"
        app.cls(enable_memory_snapshot=True)(cloudmodal.concurrent(max_inputs=4)(Snap)).spec,
    ]
    base = fn(name="base", gpu="H100", min_containers=1, max_containers=4, env={"A": "1"})(square)
    specs.append(
        base.with_options(
            **{
                "gpu": ["L4", "T4"],
                "cpu": 2,
                "memory": (512, 1024),
                "timeout": 60,
                "max_containers": 8,
                "secrets": [Secret.from_dict({"B": "2"})],
                "env": {"C": "3"},
                "retries": Retries(max_retries=3),
                "region": "us-east-1",
                "cloud": "azure",
                "spot": "require",
                "max_price_per_hour": 3,
                "volumes": {"/v": Volume.from_name("vv", create_if_missing=True)},
                "min_containers": 2,
                "buffer_containers": 3,
                "scaledown_window": 3600,
            }
        ).spec
    )
    return specs


def app_specs() -> list[tuple[str, FunctionSpec]]:
    """Every function and class of the example apps and of the integration tests' apps."""
    out = []
    sys.path.insert(0, str(REPO / "tests" / "integration" / "apps"))
    try:
        for path in sorted([*REPO.glob("examples/*.py"), *REPO.glob("tests/integration/apps/*.py")]):
            module_spec = importlib.util.spec_from_file_location(
                f"_wire_spec_{path.parent.name}_{path.stem}", path
            )
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            for app in [v for v in vars(module).values() if isinstance(v, App)]:
                for handle in [*app.registered_functions.values(), *app.registered_classes.values()]:
                    out.append((f"{path.name}:{handle.spec.name}", handle.spec))
    finally:
        sys.path.remove(str(REPO / "tests" / "integration" / "apps"))
    return out


def _round_trip(spec: FunctionSpec) -> None:
    wire = spec.to_wire()
    out = validate_wire_spec(wire)
    assert json.loads(json.dumps(out)) == out  # JSON values only: what the database stores
    assert FunctionSpec.from_wire(out) == spec
    assert validate_wire_spec(out) == out  # normalized: validating again changes nothing
    assert validate_wire_spec(json.loads(json.dumps(wire))) == out  # as it arrives over the wire
    assert wire == spec.to_wire()  # the input is not modified


def test_every_decorated_spec_round_trips(tmp_path: Path) -> None:
    specs = decorated_specs(tmp_path)
    assert len(specs) >= 20
    for spec in specs:
        _round_trip(spec)


def test_every_example_and_test_app_round_trips() -> None:
    specs = app_specs()
    assert len(specs) >= 30
    for _where, spec in specs:
        _round_trip(spec)


# ------------------------------------------------------------------------------------------ bad specs


def _base() -> dict[str, Any]:
    app = App()
    f = app.function(gpu="A10", min_containers=1, max_containers=3, volumes={"/d": Volume.from_name("d")})(
        cloudmodal.concurrent(max_inputs=4)(square)
    )
    return f.spec.to_wire()


def _cls_base() -> dict[str, Any]:
    return App().cls()(Model).spec.to_wire()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting ``a.b.0`` in a wire dict (``value`` ... deletes the key)."""

    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list | tuple) else node[p]
        if isinstance(node, tuple):
            raise AssertionError("convert tuples first")
        key: Any = int(last) if isinstance(node, list) else last
        if value is ...:
            del node[key]
        else:
            node[key] = value

    return apply


def _lists(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_lists(x) for x in v]
    if isinstance(v, dict):
        return {k: _lists(x) for k, x in v.items()}
    return v


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # (case, mutation, field path named, words the message must contain)
    (
        "issue: min_containers as a string",
        _set("autoscaler.min_containers", "1"),
        "spec.autoscaler.min_containers",
        "integer",
    ),
    ("issue: max_inputs 0", _set("concurrency.max_inputs", 0), "spec.concurrency.max_inputs", "from 1 to"),
    (
        "issue: max_containers -1",
        _set("autoscaler.max_containers", -1),
        "spec.autoscaler.max_containers",
        "from 1 to",
    ),
    ("bool is not an int", _set("timeout", True), "spec.timeout", "boolean"),
    ("float is not an int", _set("timeout", 60.0), "spec.timeout", "integer"),
    ("timeout too long", _set("timeout", 86401), "spec.timeout", "1 to 86400"),
    ("timeout zero", _set("timeout", 0), "spec.timeout", "1 to 86400"),
    ("startup_timeout string", _set("startup_timeout", "60"), "spec.startup_timeout", "integer"),
    (
        "min above max",
        _set("autoscaler.min_containers", 5),
        "spec.autoscaler.min_containers",
        "max_containers",
    ),
    (
        "buffer negative",
        _set("autoscaler.buffer_containers", -1),
        "spec.autoscaler.buffer_containers",
        "0 to",
    ),
    (
        "scaledown too short",
        _set("autoscaler.scaledown_window", 1),
        "spec.autoscaler.scaledown_window",
        "2 to 3600",
    ),
    (
        "scaledown too long",
        _set("autoscaler.scaledown_window", 3601),
        "spec.autoscaler.scaledown_window",
        "2 to 3600",
    ),
    (
        "unknown autoscaler key",
        _set("autoscaler.keep_warm", 1),
        "spec.autoscaler.keep_warm",
        "not a known key",
    ),
    ("misspelt key", _set("autoscaler.min_container", 1), "spec.autoscaler.min_container", "min_containers"),
    ("unknown top-level key", _set("concurrency_limit", 3), "spec.concurrency_limit", "not a known key"),
    ("missing name", _set("name", ...), "spec.name", "required"),
    ("autoscaler not an object", _set("autoscaler", [1]), "spec.autoscaler", "an object"),
    (
        "int beyond int32",
        _set("autoscaler.max_containers", 2**40),
        "spec.autoscaler.max_containers",
        "out of range",
    ),
    (
        "int beyond 64 bits",
        _set("autoscaler.max_containers", 2**70),
        "spec.autoscaler.max_containers",
        "64 bits",
    ),
    (
        "target above max",
        _set("concurrency.target_inputs", 5),
        "spec.concurrency.target_inputs",
        "max_inputs",
    ),
    (
        "batch too big",
        _set("batching", {"max_batch_size": 1001, "wait_ms": 0}),
        "spec.batching.max_batch_size",
        "1 to 1000",
    ),
    (
        "batch wait negative",
        _set("batching", {"max_batch_size": 8, "wait_ms": -1}),
        "spec.batching.wait_ms",
        "0 to",
    ),
    (
        "batch wait too long",
        _set("batching", {"max_batch_size": 8, "wait_ms": 600_001}),
        "spec.batching.wait_ms",
        "600000",
    ),
    ("retries negative", _set("retries", {"max_retries": -1}), "spec.retries.max_retries", "0 to"),
    (
        "backoff too big",
        _set("retries", {"max_retries": 1, "backoff_coefficient": 11.0}),
        "spec.retries.backoff_coefficient",
        "1.0 to 10.0",
    ),
    (
        "initial delay too long",
        _set("retries", {"max_retries": 1, "initial_delay": 61.0}),
        "spec.retries.initial_delay",
        "0 to 60",
    ),
    (
        "max delay zero",
        _set("retries", {"max_retries": 1, "max_delay": 0.5}),
        "spec.retries.max_delay",
        "1 to 60",
    ),
    (
        "NaN delay",
        _set("retries", {"max_retries": 1, "initial_delay": float("nan")}),
        "spec.retries.initial_delay",
        "finite",
    ),
    ("cpu zero", _set("cpu", 0.0), "spec.cpu", "more than 0"),
    ("cpu string", _set("cpu", "2"), "spec.cpu", "a number"),
    (
        "cpu limit below request",
        lambda d: d.update(cpu=2.0, cpu_limit=1.0),
        "spec.cpu_limit",
        "at least the request",
    ),
    ("memory float", _set("memory", 512.0), "spec.memory", "integer"),
    ("memory limit without request", _set("memory_limit", 512), "spec.memory_limit", "at least the request"),
    (
        "ephemeral disk over 3 TiB",
        _set("ephemeral_disk", 3 * 1024 * 1024 + 1),
        "spec.ephemeral_disk",
        "3 TiB",
    ),
    ("unknown gpu", _set("gpu", ["A10", "H999"]), "spec.gpu[1]", "Unknown GPU type"),
    ("too many gpus", _set("gpu", ["H100:9"]), "spec.gpu[0]", "1 to 8"),
    ("gpu twice", _set("gpu", ["A10", "a10"]), "spec.gpu", "twice"),
    ("gpu not a list", _set("gpu", "A10"), "spec.gpu", "a list"),
    ("spot unknown", _set("spot", "sometimes"), "spec.spot", "'allow'"),
    (
        "spot require with nonpreemptible",
        lambda d: d.update(spot="require", nonpreemptible=True),
        "spec.spot",
        "never",
    ),
    (
        "floor with spot require",
        lambda d: d.update(spot="require", min_on_demand=1),
        "spec.min_on_demand",
        "require",
    ),
    ("price zero", _set("max_price_per_hour", 0.0), "spec.max_price_per_hour", "more than 0"),
    ("cloud unknown", _set("cloud", "oracle"), "spec.cloud", "aws"),
    ("cloud upper case", _set("cloud", "AWS"), "spec.cloud", "aws"),
    ("region empty", _set("region", [""]), "spec.region[0]", "empty"),
    ("region padded", _set("region", [" us-east-1"]), "spec.region[0]", "not allowed"),
    ("region twice", _set("region", ["a", "a"]), "spec.region[1]", "repeats"),
    ("secret name with slash", _set("secrets", ["../x"]), "spec.secrets[0]", "Invalid Secret name"),
    ("secret name too long", _set("secrets", ["s" * 65]), "spec.secrets[0]", "longer than 64"),
    ("secret twice", _set("secrets", ["a", "a"]), "spec.secrets[1]", "repeats"),
    ("too many secrets", _set("secrets", [f"s{i}" for i in range(257)]), "spec.secrets", "more than 256"),
    ("env name with =", _set("env", [["A=B", "x"]]), "spec.env[0][0]", "'='"),
    ("env value not a string", _set("env", [["A", 1]]), "spec.env[0][1]", "a string"),
    ("env value with NUL", _set("env", [["A", "a\x00b"]]), "spec.env[0][1]", "not allowed"),
    ("env pair of three", _set("env", [["A", "b", "c"]]), "spec.env[0]", ""),
    ("env name twice", _set("env", [["A", "1"], ["A", "2"]]), "spec.env[1]", "repeats"),
    ("volume relative", _set("volumes", [["data", "d"]]), "spec.volumes[0][0]", "not absolute"),
    ("volume not canonical", _set("volumes", [["/a/../b", "d"]]), "spec.volumes[0][0]", "canonical"),
    ("volume reserved", _set("volumes", [["/tmp", "d"]]), "spec.volumes[0][0]", "reserved"),
    ("volume twice", _set("volumes", [["/a", "d"], ["/b", "d"]]), "spec.volumes[1]", "repeats"),
    ("create unmounted volume", _set("create_volumes", ["other"]), "spec.create_volumes[0]", "not mounted"),
    ("web kind unknown", _set("web", {"kind": "grpc"}), "spec.web.kind", "fastapi_endpoint"),
    (
        "web method lower case",
        _set("web", {"kind": "fastapi_endpoint", "method": "get"}),
        "spec.web.method",
        "GET",
    ),
    ("web label bad", _set("web", {"kind": "asgi_app", "label": "My_API"}), "spec.web.label", "lowercase"),
    ("web port zero", _set("web", {"kind": "web_server", "port": 0}), "spec.web.port", "65535"),
    ("web server without port", _set("web", {"kind": "web_server"}), "spec.web.port", "web_server"),
    (
        "web startup timeout zero",
        _set("web", {"kind": "web_server", "port": 80, "startup_timeout": 0}),
        "spec.web.startup_timeout",
        "more than 0",
    ),
    (
        "web retries",
        lambda d: d.update(web={"kind": "asgi_app"}, retries={"max_retries": 2}),
        "spec.retries",
        "web endpoint",
    ),
    (
        "generator retries",
        lambda d: d.update(is_generator=True, retries={"max_retries": 2}),
        "spec.retries",
        "generator",
    ),
    (
        "generator batching",
        lambda d: d.update(is_generator=True, batching={"max_batch_size": 2, "wait_ms": 0}),
        "spec.batching",
        "generator",
    ),
    ("schedule unknown type", _set("schedule", {"type": "sometimes"}), "spec.schedule.type", "'cron'"),
    ("schedule type not a string", _set("schedule", {"type": ["cron"]}), "spec.schedule.type", "'cron'"),
    (
        "cron never fires",
        _set("schedule", {"type": "cron", "cron_string": "0 0 31 2 *", "timezone": "UTC"}),
        "spec.schedule",
        "never fires",
    ),
    (
        "cron bad timezone",
        _set("schedule", {"type": "cron", "cron_string": "* * * * *", "timezone": "Mars/Base"}),
        "spec.schedule",
        "Unknown timezone",
    ),
    (
        "period too short",
        _set("schedule", {"type": "period", "seconds": 0.5}),
        "spec.schedule",
        "shorter than 1 second",
    ),
    ("period fraction", _set("schedule", {"type": "period", "hours": 1.5}), "spec.schedule.hours", "integer"),
    ("image hash mismatch", _set("image_hash", "0" * 64), "spec.image_hash", "does not match"),
    ("image hash not hex", _set("image_hash", "x" * 64), "spec.image_hash", "hex"),
    (
        "image tampered",
        _set("image.layers", [{"op": "apt_install", "packages": ["git"]}]),
        "spec.image",
        "hash",
    ),
    (
        "image layer unknown",
        _set("image.layers", [{"op": "rm_rf"}]),
        "spec.image.layers[0].op",
        "not a known layer",
    ),
    ("image python unknown key", _set("image.base.kind", "alpine"), "spec.image.base.kind", "debian_slim"),
    (
        "image pip packages forged",
        _set("image.pip_packages", ["evil"]),
        "spec.image.pip_packages",
        "does not match",
    ),
    ("image wire version", _set("image.version", 2), "spec.image.version", "1"),
    ("name with space", _set("name", "a b"), "spec.name", "not allowed"),
    ("name too long", _set("name", "n" * 257), "spec.name", "longer than 256"),
    ("module control char", _set("module", "a\nb"), "spec.module", "not allowed"),
    ("kind unknown", _set("kind", "sandbox"), "spec.kind", "'function'"),
    ("methods on a function", _set("methods", ["f"]), "spec.methods", "kind is 'cls'"),
    (
        "experimental value not a string",
        _set("experimental_options", [["k", True]]),
        "spec.experimental_options[0][1]",
        "a string",
    ),
    ("i6pn string", _set("i6pn", "yes"), "spec.i6pn", "true or false"),
]

CLS_BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    (
        "generator method unknown",
        _set("generator_methods", ["nope"]),
        "spec.generator_methods[0]",
        "not in spec.methods",
    ),
    ("method not an identifier", _set("methods", ["a-b"]), "spec.methods[0]", "identifier"),
    ("method twice", _set("methods", ["predict", "predict"]), "spec.methods[1]", "repeats"),
    (
        "web method unknown",
        _set("web_methods", [["nope", {"kind": "asgi_app"}]]),
        "spec.web_methods[0][0]",
        "not in spec.methods",
    ),
    ("web method config bad", _set("web_methods.0.1.port", 80), "spec.web_methods[0][1].port", "web_server"),
    ("parameter type unknown", _set("parameters", [["x", "float", None]]), "spec.parameters[0][1]", "'int'"),
    (
        "parameter default mistyped",
        _set("parameters", [["x", "int", "1"]]),
        "spec.parameters[0][2]",
        "not int",
    ),
    ("parameter bool as int", _set("parameters", [["x", "int", True]]), "spec.parameters[0][2]", "not int"),
    ("parameter bytes default", _set("parameters", [["x", "bytes", b"x"]]), "spec.parameters[0][2]", "bytes"),
    (
        "parameter bytes from a str",
        _set("parameters", [["x", "bytes", "x"]]),
        "spec.parameters[0][2]",
        "not bytes",
    ),
    (
        "parameter twice",
        _set("parameters", [["x", "int", 1], ["x", "int", 2]]),
        "spec.parameters[1]",
        "repeats",
    ),
    ("schedule on a class", _set("schedule", {"type": "period", "hours": 1}), "spec.schedule", "function"),
    ("web on a class", _set("web", {"kind": "asgi_app"}), "spec.web", "web_methods"),
]


def _expect_invalid(wire: Any, path: str, words: str, *, path_prefix: bool = False) -> str:
    """``path`` is the field the message must name (exactly, or only its start with ``path_prefix``)."""
    with pytest.raises(InvalidError) as info:
        validate_wire_spec(wire)
    msg = str(info.value)
    assert msg.startswith(f"Invalid function spec: {path}" + ("" if path_prefix else " ")), msg
    assert words in msg, msg
    assert len(msg) < 700, msg
    return msg


@pytest.mark.parametrize(("case", "mutate", "path", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_function_specs_name_the_field(case: str, mutate: Any, path: str, words: str) -> None:
    wire = _lists(_base())
    validate_wire_spec(wire)  # control: the unmutated spec passes
    mutate(wire)
    _expect_invalid(wire, path, words)


@pytest.mark.parametrize(("case", "mutate", "path", "words"), CLS_BAD, ids=[b[0] for b in CLS_BAD])
def test_bad_class_specs_name_the_field(case: str, mutate: Any, path: str, words: str) -> None:
    wire = _lists(_cls_base())
    validate_wire_spec(wire)
    mutate(wire)
    _expect_invalid(wire, path, words)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "an object"),
        ([1, 2], "an object"),
        ("spec", "an object"),
    ],
)
def test_a_spec_must_be_an_object(value: Any, words: str) -> None:
    _expect_invalid(value, "spec", words)


def test_huge_values_are_never_echoed() -> None:
    huge = "\u00e9" * 200_000
    for path, value in [
        ("name", huge),
        ("module", huge),
        ("gpu", [huge]),
        ("secrets", [huge]),
        ("cloud", huge),
        ("spot", huge),
        ("env", [[huge, "x"]]),
        ("region", [huge]),
    ]:
        wire = _lists(_base())
        wire[path] = value
        with pytest.raises(InvalidError) as info:
            validate_wire_spec(wire)
        msg = str(info.value)
        assert f"spec.{path}" in msg and len(msg) < 700 and "\u00e9" * 50 not in msg, (path, msg)
    wire = _lists(_base())
    wire[huge] = 1  # an unknown key as long as a value
    msg = _expect_invalid(wire, "spec.'", "not a known key", path_prefix=True)
    assert "\u00e9" * 50 not in msg


def test_size_depth_and_value_bounds() -> None:
    wire = _lists(_base())
    wire["image"]["layers"] = [{"op": "run_commands", "commands": ["x" * 1024 * 1024]}] * 3
    _expect_invalid(wire, "spec", f"larger than {MAX_SPEC_CHARS // (1024 * 1024)} MiB")

    deep: Any = "x"
    for _ in range(1000):
        deep = [deep]
    wire = _lists(_base())
    wire["schedule"] = {"type": "cron", "x": deep}
    _expect_invalid(wire, "spec.schedule.x[0][0]", "nested more than 32 levels", path_prefix=True)

    wire = _lists(_base())
    wire["env"] = [["A", "b"]] * 200_000
    _expect_invalid(wire, "spec", "more than 100000 values")

    for bad, words in [(float("inf"), "finite"), (2**64, "64 bits"), (object(), "cannot hold")]:
        wire = _lists(_base())
        wire["image"]["layers"] = [{"op": "run_function", "args": [bad]}]
        _expect_invalid(wire, "spec.image.layers[0].args[0]", words)

    wire = _lists(_base())
    wire["image"]["env"] = {1: "x"}
    _expect_invalid(wire, "spec.image.env", "key that is an integer")


def test_the_first_problem_is_named_and_the_rest_counted() -> None:
    wire = _lists(_base())
    wire["timeout"] = "1"
    wire["autoscaler"]["min_containers"] = "1"
    msg = _expect_invalid(wire, "spec.timeout", "integer")
    assert "1 more problem" in msg


def test_unknown_keys_can_be_ignored_for_stored_rows_only() -> None:
    wire = _lists(_base())
    wire["from_a_newer_version"] = {"x": 1}
    wire["autoscaler"]["also_newer"] = 2
    with pytest.raises(InvalidError, match="not a known key"):
        validate_wire_spec(wire)
    out = validate_wire_spec(wire, ignore_unknown_keys=True)
    assert "from_a_newer_version" not in out and "also_newer" not in out["autoscaler"]
    assert FunctionSpec.from_wire(out) == FunctionSpec.from_wire(validate_wire_spec(_lists(_base())))
    wire["autoscaler"]["min_containers"] = "1"  # ignoring unknown keys is not ignoring bad values
    with pytest.raises(InvalidError, match=r"spec\.autoscaler\.min_containers"):
        validate_wire_spec(wire, ignore_unknown_keys=True)


def test_normalizes_and_does_not_alias_the_input() -> None:
    wire = _lists(_base())
    wire["gpu"] = ["a10", "h100:2"]
    wire["cloud"] = None
    before = copy.deepcopy(wire)
    out = validate_wire_spec(wire)
    assert out["gpu"] == ["A10", "H100:2"]  # canonical names, as the decorator writes them
    assert wire == before
    out["autoscaler"]["min_containers"] = 99
    assert wire["autoscaler"]["min_containers"] == 1
