"""Issue 11: a module-level ``with_options`` variant of a deployed app, called from another of its functions
on a worker (found there by name in the deployed app)."""

from __future__ import annotations

import os

import cloudmodal

app = cloudmodal.App("issue11-deploy")


@app.function()
def inner(x: int) -> tuple[str, int]:
    return os.environ.get("MODE", "base"), x + 1


inner_variant = inner.with_options(env={"MODE": "variant"})


@app.function()
def outer(x: int) -> tuple[str, int]:
    return inner_variant.remote(x)
