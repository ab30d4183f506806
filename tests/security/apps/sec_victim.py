"""An app whose inputs the security tests attack: ``hold`` keeps its input (and its worker busy) until the test
lets it go; ``ping`` gives the test a second live worker, of another function, whose token plays the attacker."""

from __future__ import annotations

import os
import time

import cloudmodal

app = cloudmodal.App("sec-victim")


@app.function(timeout=180)
def hold(release_path: str) -> str:
    deadline = time.time() + 150
    while not os.path.exists(release_path) and time.time() < deadline:
        time.sleep(0.02)
    return "real:" + os.path.basename(release_path)


@app.function()
def ping(x: int) -> int:
    return x
