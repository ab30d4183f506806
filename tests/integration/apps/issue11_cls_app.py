"""Issue 11: ``Cls.with_options``, with a variant made at module level (a module of its own, so that the
function variant's test does not depend on it)."""

from __future__ import annotations

import os

import cloudmodal

app = cloudmodal.App("issue11-cls")


@app.cls()
class Scaler:
    factor: int = cloudmodal.parameter(default=1)

    @cloudmodal.method()
    def scale(self, x: int) -> tuple[str, int]:
        return os.environ.get("MODE", "base"), x * self.factor


# Made at import, before the app runs: running the app must register it like the decorated class.
ScalerVariant = Scaler.with_options(env={"MODE": "variant"})
