"""Function.with_options and Cls.with_options: one path from options to a validated spec (the decorator's), and
variants that belong to their app."""

from __future__ import annotations

import pytest

import cloudmodal
from cloudmodal import App, Period, Retries, Secret, Volume
from cloudmodal.exception import InvalidError
from cloudmodal.functions import Cls, Function
from cloudmodal.gpu import GpuTier
from cloudmodal.spec import AutoscalerSettings, RetryPolicy


def square(x: int) -> int:
    return x * x


def tick() -> str:
    return "tick"


def countdown(n: int):
    yield from range(n)


class Model:
    size: int = cloudmodal.parameter(default=1)

    @cloudmodal.method()
    def predict(self, x: int) -> int:
        return x * self.size


def _problem(e: pytest.ExceptionInfo[InvalidError]) -> str:
    """An option error without its `where(option=...):` prefix, which names the decorator or the variant."""
    return str(e.value).split(": ", 1)[1]


@pytest.mark.parametrize(
    ("declared", "override"),
    [
        ({"min_on_demand": 1}, {"spot": "require"}),  # the case of issue 11
        ({"nonpreemptible": True}, {"spot": "require"}),
        ({"min_containers": 3}, {"max_containers": 2}),
    ],
)
def test_a_variant_is_refused_as_the_decorator_refuses_the_same_options(declared, override):
    with pytest.raises(InvalidError) as by_decorator:
        App().function(**declared, **override)(square)
    f = App().function(**declared)(square)
    with pytest.raises(InvalidError) as by_variant:
        f.with_options(**override)
    assert _problem(by_variant) == _problem(by_decorator)
    assert str(by_variant.value).startswith("square.with_options(")
    c = App().cls(**declared)(Model)
    with pytest.raises(InvalidError) as by_cls_variant:
        c.with_options(**override)
    assert _problem(by_cls_variant) == _problem(by_decorator)


def test_with_options_applies_the_options_and_leaves_the_function_alone():
    app = App()
    f = app.function(
        gpu="H100", min_containers=1, max_containers=4, env={"A": "1"}, secrets=[Secret.from_name("a")]
    )(square)
    v = f.with_options(gpu=["L4", "T4"], cpu=2, memory=(512, 1024), timeout=60, max_containers=8)
    s = v.spec
    assert s.gpu == (GpuTier("L4"), GpuTier("T4"))
    assert (s.cpu, s.memory, s.memory_limit, s.timeout) == (2.0, 512, 1024, 60)
    assert s.autoscaler == AutoscalerSettings(1, 8, 0, 60)
    assert s.name.startswith("square[") and f.spec.name == "square" and f.spec.gpu == (GpuTier("H100"),)
    inline = Secret.from_dict({"B": "2"})
    s2 = f.with_options(secrets=[inline], env={"C": "3"}, retries=2, region="us-east-1").spec
    assert s2.secrets == (inline.name,)  # replaced, as in Modal
    assert dict(s2.env) == {"A": "1", "C": "3"}  # merged
    assert s2.retries == RetryPolicy(2, 1.0, 1.0, 60.0) and s2.region == ("us-east-1",)
    assert app.inline_secret_env(s2) == {"B": "2"}
    with pytest.raises(InvalidError, match="unexpected keyword argument 'schedule'"):
        f.with_options(schedule=Period(hours=1))
    with pytest.raises(InvalidError, match="`max_containers` must be at least 1"):
        f.with_options(max_containers=0)
    with pytest.raises(
        InvalidError, match=r"`min_containers` \(9\) cannot be greater than `max_containers` \(4\)"
    ):
        f.with_options(min_containers=9)
    with pytest.raises(InvalidError, match="Generator functions do not support retries"):
        app.function()(countdown).with_options(retries=1)


def test_secrets_and_volumes_replace_the_apps_too_env_merges_and_variants_chain():
    app = App(secrets=[Secret.from_name("app-wide")], volumes={"/app": Volume.from_name("app-vol")})
    f = app.function(env={"A": "1"})(square)
    assert f.spec.secrets == ("app-wide",) and f.spec.volumes == (("/app", "app-vol"),)
    v = f.with_options(secrets=[Secret.from_name("only")], volumes={"/v": Volume.from_name("vv")})
    assert v.spec.secrets == ("only",) and v.spec.volumes == (("/v", "vv"),)
    assert f.with_options(timeout=9).spec.secrets == ("app-wide",)  # untouched unless replaced
    w = f.with_options(env={"B": "2"}, timeout=10).with_options(env={"C": "3"}, cpu=1.0)
    assert dict(w.spec.env) == {"A": "1", "B": "2", "C": "3"} and (w.spec.timeout, w.spec.cpu) == (10, 1.0)
    assert w.spec.name == f.with_options(env={"B": "2", "C": "3"}, timeout=10, cpu=1.0).spec.name


def test_variants_belong_to_the_app_and_the_same_options_give_the_same_variant():
    app = App()
    f = app.function(schedule=Period(hours=1))(tick)
    v = f.with_options(timeout=30)
    assert v.spec.schedule is None  # the schedule stays the function's own
    assert app.registered_functions == {"tick": f, v.spec.name: v}
    again = f.with_options(timeout=30)
    assert again.spec.name == v.spec.name and app.registered_functions[v.spec.name] is again
    c = app.cls()(Model)
    cv = c.with_options(gpu="L4", env={"MODE": "v"})
    assert isinstance(cv, Cls) and cv.user_cls is Model and cv.spec.kind == "cls"
    assert cv.spec.name.startswith("Model[") and cv.spec.gpu == (GpuTier("L4"),) and c.spec.gpu == ()
    assert cv.spec.methods == ("predict",) and cv.spec.parameters == c.spec.parameters
    assert app.registered_classes == {"Model": c, cv.spec.name: cv}


def test_handles_looked_up_by_name_cannot_change_options():
    with pytest.raises(InvalidError, match="decorated with @app.function"):
        Function.from_name("app", "f").with_options(timeout=5)
    with pytest.raises(InvalidError, match="decorated with @app.cls"):
        Cls.from_name("app", "C").with_options(timeout=5)


def test_with_options_takes_the_retries_class_and_every_with_option():
    base = App().function(name="base", gpu="H100", min_containers=1, max_containers=4)(square)
    s = base.with_options(
        retries=Retries(max_retries=3),
        cloud="azure",
        spot="require",
        max_price_per_hour=3,
        min_containers=2,
        buffer_containers=3,
        scaledown_window=3600,
    ).spec
    assert (s.cloud, s.spot, s.max_price_per_hour) == ("azure", "require", 3.0)
    assert s.autoscaler == AutoscalerSettings(2, 4, 3, 3600) and s.retries is not None
