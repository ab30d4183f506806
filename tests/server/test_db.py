"""SQLite's write-ahead log is checkpointed by a thread of its own, not inside a commit on the call path."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import func, select, text

from cloudmodal.server import db as dbmod
from cloudmodal.server import models
from cloudmodal.server.db import Database

PAGE = 4096
WRITES = 1500


def _write_events(db: Database, n: int) -> None:
    for i in range(n):
        with db.write() as conn:
            conn.execute(models.events.insert().values(kind="test", message=f"event {i}", ts=float(i)))


def test_commits_never_checkpoint_and_the_thread_keeps_the_log_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(dbmod, "CHECKPOINT_INTERVAL_S", 0.01)
    monkeypatch.setattr(dbmod, "RESTART_FRAMES", 100)
    path = tmp_path / "cm.db"
    db = Database(f"sqlite:///{path}")
    try:
        with db.read() as conn:
            assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 0
        _write_events(db, WRITES)
        # Each commit appends two pages (the row, its index): without checkpoints the log would hold about
        # 2 × WRITES pages (the control below).
        wal = os.path.getsize(str(path) + "-wal")
        assert db._checkpointer.checkpoints > 0
        assert wal < WRITES * PAGE, f"WAL {wal} bytes after {WRITES} commits: the log is not starting over"
        with db.read() as conn:
            assert conn.execute(select(func.count()).select_from(models.events)).scalar() == WRITES
    finally:
        db.dispose()


def test_without_the_thread_the_log_grows(tmp_path: Path, monkeypatch) -> None:
    """The control for the test above: with the checkpointer paused, commits leave the log to grow."""
    monkeypatch.setattr(dbmod, "CHECKPOINT_INTERVAL_S", 3600.0)
    path = tmp_path / "cm.db"
    db = Database(f"sqlite:///{path}")
    try:
        _write_events(db, WRITES)
        assert os.path.getsize(str(path) + "-wal") >= 1.5 * WRITES * PAGE
    finally:
        db.dispose()
    # dispose checkpoints on the way out; a new control plane on the file sees every row
    db2 = Database(f"sqlite:///{path}")
    try:
        with db2.read() as conn:
            assert conn.execute(select(func.count()).select_from(models.events)).scalar() == WRITES
    finally:
        db2.dispose()
