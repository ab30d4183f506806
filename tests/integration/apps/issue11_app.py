"""Issue 11's client bugs: a ``with_options`` variant made at module level, and a function that ``spawn_map``
feeds, whose results the test reads from files since ``spawn_map`` returns none."""

from __future__ import annotations

import os
from pathlib import Path

import cloudmodal

app = cloudmodal.App("issue11-client")


@app.function()
def mode(x: int) -> tuple[str, int]:
    return os.environ.get("MODE", "base"), x * x


@app.function()
def touch(directory: str, i: int) -> None:
    Path(directory, f"{i}.tmp").write_text(str(i * i))
    os.replace(Path(directory, f"{i}.tmp"), Path(directory, str(i)))  # a reader never sees half a file


# Made at import, before any app runs: running the app must register it like the decorated functions.
mode_variant = mode.with_options(env={"MODE": "variant"}, timeout=60)
