"""Dict keys and values pickled by the fast path (plain data, the standard library's pickler) are the bytes
cloudpickle writes: a key stored by one path is found by the other. Anything else takes cloudpickle's path."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle
import pytest

from cloudmodal import serialization
from cloudmodal.dict import PLAIN_CHECK_NODES, PROTOCOL, _dumps, _plain


class Str(str):
    pass


PLAIN: list[Any] = [
    "",
    "x",
    "é漢字\x00",
    "x" * 100_000,
    b"",
    b"\x00\xff" * 10,
    0,
    1,
    -1,
    255,
    256,
    2**31,
    2**64,
    -(2**100),
    0.0,
    -0.0,
    1.5,
    float("inf"),
    float("nan"),
    True,
    False,
    None,
    (),
    (1,),
    ("t", 1),
    ("a", ("a", "a")),
    [],
    [1, "a"],
    ["s", "s", "s"],
    {},
    {"payload": "x" * 100, "n": 1},
    {"a": [1, {"b": (2, 3)}], "c": None},
    {1: "x", "x": 1, (1, 2): b"k"},
    [[["deep"]]],
    list(range(PLAIN_CHECK_NODES)),
]

NOT_PLAIN: list[Any] = [
    Str("sub"),
    {1, 2},
    frozenset({1}),
    bytearray(b"ab"),
    [lambda: 1],
    {"f": len},
    (1, [2, {3: object()}]),
    list(range(PLAIN_CHECK_NODES + 1)),
    [list(range(PLAIN_CHECK_NODES // 2)), list(range(PLAIN_CHECK_NODES // 2 + 1))],
]


@pytest.mark.parametrize("obj", PLAIN, ids=lambda o: repr(o)[:30])
def test_plain_data_pickles_to_cloudpickles_bytes(obj: Any) -> None:
    assert _plain(obj)
    assert _dumps(obj) == cloudpickle.dumps(obj, protocol=serialization.PROTOCOL)


@pytest.mark.parametrize("obj", NOT_PLAIN, ids=lambda o: type(o).__name__)
def test_other_objects_take_cloudpickles_path(obj: Any) -> None:
    assert not _plain(obj)
    assert pickle.loads(_dumps(obj)) is not None


def test_the_fast_path_pickles_with_the_payload_protocol() -> None:
    assert PROTOCOL == serialization.PROTOCOL


def test_a_list_holding_itself_is_not_walked_forever() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    assert not _plain(loop)
