"""`cloudmodal app list`: the status line of a function's pool."""

from __future__ import annotations

import datetime

import pytest

from cloudmodal.cli.app_cmd import _pool_line

BASE = {"name": "embed", "gpu": "A10", "pending": 0, "running": 0}


@pytest.mark.parametrize(
    "pool, expected",
    [
        ({**BASE, "workers": {}}, "embed [A10] · 0 workers · 0 pending, 0 running"),
        (
            {**BASE, "workers": {"ready": 2, "spot": 2}, "running": 2, "desired": 2, "reason": "..."},
            "embed [A10] · 2 workers (ready 2; spot 2) · 0 pending, 2 running",
        ),
        (
            {**BASE, "workers": {"ready": 1, "on-demand": 1}, "pending": 40, "desired": 4},
            "embed [A10] · 1 worker (ready 1; on-demand 1) · 40 pending, 0 running · scaling to 4",
        ),
        (
            {
                **BASE,
                "workers": {"ready": 1, "on-demand": 1},
                "desired": 1,
                "fallen_back": True,
                "fallback_reason": "preemptions",
            },
            "embed [A10] · 1 worker (ready 1; on-demand 1) · 0 pending, 0 running"
            " · on-demand: spot fell back (preemptions)",
        ),
    ],
)
def test_pool_line(pool, expected):
    assert _pool_line(pool) == expected


def test_pool_line_of_a_scheduled_function_shows_its_next_run():
    at = 1_800_000_000.0
    local = datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")  # the CLI shows local time
    pool = {**BASE, "workers": {}, "schedule": {"next_run_at": at, "schedule": "Cron('0 9 * * *')"}}
    assert (
        _pool_line(pool)
        == f"embed [A10] · 0 workers · 0 pending, 0 running · next run {local} (Cron('0 9 * * *'))"
    )
    assert "next run" not in _pool_line({**BASE, "workers": {}, "schedule": None})
