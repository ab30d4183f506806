"""A rich progress bar for maps when output is enabled (``cloudmodal run``), and nothing otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class _MapProgress:
    def __init__(self, name: str, total: int | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task(f"{name}.map", total=total)
        self._progress.start()
        self._last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        self._progress.stop()


def map_progress(name: str, total: int | None) -> Any:
    from cloudmodal.client.session import _output_enabled

    if not _output_enabled() or not sys.stderr.isatty():
        return None
    return _MapProgress(name, total)
