"""Sandbox.create refuses, before contacting anything, the arguments a sandbox does not honour yet (or not where it
runs), instead of ignoring them."""

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
        # on the control plane's machine: steps that need root there
        ({"image": cloudmodal.Image.debian_slim().apt_install("curl")}, "with apt_install is not supported"),
        (
            {"image": cloudmodal.Image.debian_slim().run_commands("true")},
            "with run_commands is not supported",
        ),
        (
            {"image": cloudmodal.Image.debian_slim().add_local_python_source("cloudmodal"), "gpu": "H100"},
            "add_local_python_source is not supported",
        ),
        ({"image": "python:3.11"}, "expected a cloudmodal.Image"),
        (
            {"volumes": {"/data": cloudmodal.Volume.from_name("v", create_if_missing=True)}, "gpu": "H100"},
            "volumes=...) with gpu=",
        ),
        ({"volumes": {"data": cloudmodal.Volume.from_name("v")}}, "must be absolute"),
        ({"volumes": {"/data": cloudmodal.Dict.from_name("d")}}, "sandboxes mount cloudmodal.Volume"),
        ({"secrets": cloudmodal.Secret.from_dict({"A": "1"})}, "expects a list"),
        ({"cpu": 2.0}, "cpu=...) is not supported"),
        ({"gpu": "NOT-A-GPU"}, "Unknown GPU type"),
        ({"name": "has space"}, "use 1 to 64 letters"),
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
