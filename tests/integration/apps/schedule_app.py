"""A deployed app with a short schedule (tests/integration/test_schedules.py): ``tick`` every 2 seconds."""

from __future__ import annotations

import cloudmodal

app = cloudmodal.App("schedule-probe")


@app.function(schedule=cloudmodal.Period(seconds=2))
def tick() -> str:
    return "ticked"
