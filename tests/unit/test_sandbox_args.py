"""Sandbox.create refuses, before contacting anything, the arguments a sandbox does not honour yet, instead of
ignoring them."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest

import cloudmodal
from cloudmodal.exception import InvalidError

APP = SimpleNamespace(app_id="ap-none")  # an app as it runs (the checks come before any request)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": cloudmodal.Image.debian_slim().pip_install("numpy")}, "image=...) with packages"),
        ({"cpu": 2.0}, "cpu=...) is not supported"),
        ({"gpu": "NOT-A-GPU"}, "Unknown GPU type"),
        ({"name": "box"}, "name=...) is not supported"),
        ({"memory": 8}, "at least 16"),
        ({"workdir": "relative"}, "absolute path"),
    ],
)
def test_arguments_a_sandbox_does_not_honour_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidError, match=re.escape(message)):
        cloudmodal.Sandbox.create("true", app=APP, **kwargs)


def test_an_app_that_does_not_run_is_refused() -> None:
    with pytest.raises(InvalidError, match="needs app="):
        cloudmodal.Sandbox.create("true", app=cloudmodal.App("not-running"))
