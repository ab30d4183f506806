"""``environment_name=``: the control plane's one environment is accepted, any other is refused before any
request is made (a program asking for ``prod`` must not quietly get ``main``'s objects)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cloudmodal
from cloudmodal._environment import check_environment
from cloudmodal.exception import InvalidError

ENTRY_POINTS: list[tuple[str, Callable[[Any], Any]]] = [
    ("Function.from_name", lambda env: cloudmodal.Function.from_name("app", "f", environment_name=env)),
    ("Cls.from_name", lambda env: cloudmodal.Cls.from_name("app", "C", environment_name=env)),
    ("Secret.from_name", lambda env: cloudmodal.Secret.from_name("s", environment_name=env)),
    ("Dict.from_name", lambda env: cloudmodal.Dict.from_name("d", environment_name=env)),
    ("Queue.from_name", lambda env: cloudmodal.Queue.from_name("q", environment_name=env)),
    ("Volume.from_name", lambda env: cloudmodal.Volume.from_name("v", environment_name=env)),
]


@pytest.mark.parametrize("name", [None, "", "main"])
def test_the_one_environment_is_accepted(name: str | None) -> None:
    check_environment(name, "here")
    for _where, call in ENTRY_POINTS:
        call(name)  # lazy handles: nothing is looked up yet


@pytest.mark.parametrize(("where", "call"), ENTRY_POINTS, ids=[w for w, _ in ENTRY_POINTS])
def test_another_environment_is_refused_naming_the_fix(where: str, call: Callable[[Any], Any]) -> None:
    with pytest.raises(InvalidError) as e:
        call("prod")
    msg = str(e.value)
    assert where in msg and "'prod'" in msg and "CLOUDMODAL_SERVER_URL" in msg and "'main'" in msg


def test_a_non_string_is_refused() -> None:
    with pytest.raises(InvalidError, match="must be a string"):
        check_environment(3, "here")  # type: ignore[arg-type]
