"""Retention: finished calls' inputs, outputs and blobs, and old logs and events, are pruned so that the
database and the blob store stay bounded however long a control plane runs.

What is kept, and for how long (``Settings.retention_*``; ``CLOUDMODAL_RETENTION_*`` override):

- a finished call (every input done, or the call cancelled and none of its inputs running) once its last
  activity (the call, its newest input, its newest output) is older than the retention of its app's kind:
  ephemeral runs (``cloudmodal run``) 1 day, deployed apps 7 days (their spawned calls are fetched later);
- logs and events of an ephemeral app stopped longer ago than 1 day, then the stopped app itself (its
  functions, workers, pool and deployment rows), so one row per run does not pile up either;
- logs and events older than 30 days of every other app (deployed, or an ephemeral run that keeps running);
- a blob that no remaining row references (inputs, outputs, functions' source and pickles) and that was last
  uploaded longer ago than the shortest retention: a blob is uploaded before the call that references it
  exists, and its age is what tells a fresh upload from garbage. Blobs are files in a directory or objects in
  a bucket (``CLOUDMODAL_BLOB_STORE``): the blob store lists them with their ages (server/blobs.py).

Only the reconciling control plane prunes (the reconciler calls :func:`prune` about once a minute). Rows are
found with reads and deleted by id in small batches, each its own short write transaction: on SQLite the hot
path shares the one write lock, and must never wait behind a long delete.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, exists, not_, or_, select

from cloudmodal.server import models
from cloudmodal.server.states import AppState, FunctionState, InputState, WorkerState

if TYPE_CHECKING:
    from cloudmodal.server.blobs import BlobStore
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.server")

A, F, C = models.apps, models.functions, models.calls
I = models.inputs  # noqa: E741
O = models.outputs  # noqa: E741
W, P, D, E, L = models.workers, models.pools, models.deployments, models.events, models.logs

BATCH = 500  # rows per delete transaction: milliseconds of the write lock, not seconds
CALL_SCAN = 200  # calls examined per read


@dataclass
class PruneReport:
    """What one pass removed (for logs and tests)."""

    calls: int = 0
    inputs: int = 0
    outputs: int = 0
    logs: int = 0
    events: int = 0
    apps: int = 0
    blobs: int = 0
    blob_bytes: int = 0  # of the removed blobs whose store's listing tells their size (a directory's)
    removed_blobs: list[str] = field(default_factory=list)
    kv_rows: int = 0  # dict entries, queue items and partitions, ephemeral dicts and queues (svc_kv.prune)
    volumes: int = 0  # ephemeral volumes whose client stopped beating (svc_volumes.prune)
    volume_versions: int = 0  # old volume versions' manifests deleted (svc_volumes.gc_versions)
    volume_parts: int = 0  # parts no kept volume version uses, deleted (svc_volumes.gc_versions)

    def any(self) -> bool:
        return bool(
            self.calls
            or self.logs
            or self.events
            or self.apps
            or self.blobs
            or self.kv_rows
            or self.volumes
            or self.volume_versions
            or self.volume_parts
        )


def _chunks(ids: Sequence[Any], n: int = BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(ids), n):
        yield ids[i : i + n]


def prune(cp: ControlPlane, now: float | None = None) -> PruneReport:
    """One retention pass over ``cp``'s database and blob store (``now``: injectable for tests)."""
    now = time.time() if now is None else now
    s = cp.settings
    report = PruneReport()
    _prune_calls(cp, now - s.retention_calls_ephemeral_s, ephemeral=True, report=report)
    _prune_calls(cp, now - s.retention_calls_deployed_s, ephemeral=False, report=report)
    _prune_history(cp, now, report)
    from cloudmodal.server import svc_kv, svc_volumes

    # idle ephemeral dicts and queues, expired queue partitions, dict entries idle for 7 days
    report.kv_rows = svc_kv.prune(cp, now)
    report.volumes = svc_volumes.prune(cp, now)
    # old versions of every volume with a commit since its last collection (or an hour on): see gc_versions
    gc = svc_volumes.gc_versions(cp, now)
    report.volume_versions, report.volume_parts = gc.manifests, gc.blobs
    # the shortest retention: a blob referenced by nothing for that long is not about to be (see module doc)
    blob_cutoff = now - min(s.retention_calls_ephemeral_s, s.retention_calls_deployed_s)
    _prune_blobs(cp, now, blob_cutoff, report)
    if report.any():
        log.info(
            "retention: pruned %d calls (%d inputs, %d outputs), %d logs, %d events, %d stopped apps, "
            "%d blobs (%d bytes), %d dict and queue rows, %d ephemeral volumes, %d old volume versions "
            "(%d parts)",
            report.calls,
            report.inputs,
            report.outputs,
            report.logs,
            report.events,
            report.apps,
            report.blobs,
            report.blob_bytes,
            report.kv_rows,
            report.volumes,
            report.volume_versions,
            report.volume_parts,
        )
    return report


# -- calls ---------------------------------------------------------------------------------------------
def _finished_calls(conn: Any, cutoff: float, ephemeral: bool, after: str) -> list[str]:
    """Ids (ordered, after ``after``) of calls of apps of this kind that are finished and idle since
    before ``cutoff``. A call whose app row is gone counts as ephemeral."""
    deployed_apps = select(A.c.id).where(A.c.ephemeral.is_(False))
    kind = C.c.app_id.in_(deployed_apps)
    running = exists().where(
        and_(
            I.c.call_id == C.c.id,
            # a cancelled call's pending inputs never run; its claimed ones may still be on a worker
            or_(
                I.c.state == InputState.CLAIMED,
                and_(I.c.state < InputState.DONE, C.c.cancelled.is_(False)),
            ),
        )
    )
    recent_input = exists().where(and_(I.c.call_id == C.c.id, I.c.created_at >= cutoff))
    recent_output = exists().where(and_(O.c.call_id == C.c.id, O.c.created_at >= cutoff))
    q = (
        select(C.c.id)
        .where(
            and_(
                C.c.id > after,
                C.c.created_at < cutoff,
                not_(kind) if ephemeral else kind,
                not_(running),
                not_(recent_input),
                not_(recent_output),
            )
        )
        .order_by(C.c.id)
        .limit(CALL_SCAN)
    )
    return [r[0] for r in conn.execute(q).all()]


def _delete_ids(cp: ControlPlane, table: Any, ids: Sequence[Any]) -> int:
    n = 0
    for chunk in _chunks(ids):
        with cp.db.write() as conn:
            n += conn.execute(delete(table).where(table.c.id.in_(list(chunk)))).rowcount or 0
    return n


def _delete_children(cp: ControlPlane, table: Any, key: Any, values: Sequence[Any]) -> int:
    """Delete the rows of ``table`` whose ``key`` is one of ``values``: ids read first, deleted in batches."""
    n = 0
    for chunk in _chunks(values, 50):
        while True:
            with cp.db.read() as conn:
                ids = [
                    r[0]
                    for r in conn.execute(
                        select(table.c.id).where(key.in_(list(chunk))).order_by(table.c.id).limit(BATCH)
                    ).all()
                ]
            if not ids:
                break
            n += _delete_ids(cp, table, ids)
    return n


def _prune_calls(cp: ControlPlane, cutoff: float, *, ephemeral: bool, report: PruneReport) -> None:
    after = ""
    while True:
        with cp.db.read() as conn:
            ids = _finished_calls(conn, cutoff, ephemeral, after)
        if not ids:
            return
        after = ids[-1]
        # outputs and inputs before the call row: a pass cut short leaves a finished call to finish next time
        report.outputs += _delete_children(cp, O, O.c.call_id, ids)
        report.inputs += _delete_children(cp, I, I.c.call_id, ids)
        report.calls += _delete_ids(cp, C, ids)


# -- logs, events, stopped ephemeral apps -----------------------------------------------------------------
def _prune_app_rows(cp: ControlPlane, table: Any, app_id: str | None, cutoff: float) -> int:
    """Delete ``table``'s (logs' or events') rows of one app older than ``cutoff`` (all of them: ``inf``).
    Walks the app's rows oldest first through the (app_id, id) index; timestamps grow with ids, so the
    walk stops at the first batch with nothing old in it instead of scanning the app's whole history."""
    n = 0
    key = table.c.app_id.is_(None) if app_id is None else table.c.app_id == app_id
    while True:
        with cp.db.read() as conn:
            rows = conn.execute(
                select(table.c.id, table.c.ts).where(key).order_by(table.c.id).limit(BATCH)
            ).all()
        old = [r[0] for r in rows if r[1] < cutoff]
        if not old:
            return n
        n += _delete_ids(cp, table, old)
        if len(old) < len(rows):
            return n


def expired_apps(
    rows: Iterable[tuple[str, bool, str, float | None, float]], now: float, ephemeral_s: float
) -> list[str]:
    """Of ``(app id, ephemeral, state, stopped_at, created_at)``: the ephemeral apps stopped longer ago than
    the retention, whose history (and then rows) go."""
    out = []
    for app_id, ephemeral, state, stopped_at, created_at in rows:
        if (
            ephemeral
            and state == AppState.STOPPED
            and (stopped_at if stopped_at is not None else created_at) < now - ephemeral_s
        ):
            out.append(app_id)
    return out


def _prune_history(cp: ControlPlane, now: float, report: PruneReport) -> None:
    s = cp.settings
    with cp.db.read() as conn:
        apps = [
            tuple(r)
            for r in conn.execute(
                select(A.c.id, A.c.ephemeral, A.c.state, A.c.stopped_at, A.c.created_at)
            ).all()
        ]
    gone = set(expired_apps(apps, now, s.retention_logs_ephemeral_s))
    long_cutoff = now - s.retention_logs_deployed_s
    for app_id, *_ in apps:
        cutoff = float("inf") if app_id in gone else long_cutoff
        report.logs += _prune_app_rows(cp, L, app_id, cutoff)
        report.events += _prune_app_rows(cp, E, app_id, cutoff)
    report.events += _prune_app_rows(cp, E, None, long_cutoff)  # the control plane's own events
    for app_id in sorted(gone):
        if _remove_app(cp, app_id):
            report.apps += 1


def _remove_app(cp: ControlPlane, app_id: str) -> bool:
    """Remove a stopped ephemeral app's rows once nothing of it is left running or unpruned: its calls
    (pruned first, when finished) and live workers keep it."""
    with cp.db.write() as conn:
        busy = conn.execute(
            select(
                exists().where(C.c.app_id == app_id)
                | exists().where(and_(W.c.app_id == app_id, W.c.state != WorkerState.STOPPED))
                | exists().where(and_(F.c.app_id == app_id, F.c.state == FunctionState.ACTIVE))
            )
        ).scalar()
        if busy:
            return False
        for table in (W, P, D, F):
            conn.execute(delete(table).where(table.c.app_id == app_id))
        conn.execute(delete(A).where(and_(A.c.id == app_id, A.c.state == AppState.STOPPED)))
    return True


# -- blobs -----------------------------------------------------------------------------------------------
def _referenced(conn: Any, ids: Sequence[str]) -> set[str]:
    refs: set[str] = set()
    for col in (I.c.args_blob, O.c.data_blob, F.c.source_blob, F.c.pickled_blob):
        refs.update(r[0] for r in conn.execute(select(col).where(col.in_(list(ids))).distinct()).all())
    return refs


_blob_sweeps: weakref.WeakKeyDictionary[BlobStore, float] = weakref.WeakKeyDictionary()  # store -> last


def _prune_blobs(cp: ControlPlane, now: float, cutoff: float, report: PruneReport) -> None:
    """Remove the blobs idle since before ``cutoff`` that no row references, from whichever store
    (directory or bucket) ``cp.blobs`` is: the store lists blobs with the time of their last upload, and
    deletes one only if it was not uploaded again since it was listed. At most every ``sweep_every_s``."""
    blobs = cp.blobs
    if 0 <= now - _blob_sweeps.get(blobs, float("-inf")) < blobs.sweep_every_s:
        return
    _blob_sweeps[blobs] = now
    candidates = [b for b in blobs.list_blobs() if b.modified < cutoff]
    for chunk in _chunks(candidates):
        with cp.db.read() as conn:
            refs = _referenced(conn, [b.blob_id for b in chunk])
        for b in chunk:
            if b.blob_id in refs or not blobs.delete_if_idle(b.blob_id, cutoff):
                continue
            report.blobs += 1
            report.blob_bytes += b.size or 0  # a bucket's listing does not say
            report.removed_blobs.append(b.blob_id)
    blobs.tidy(cutoff)


class Pruner:
    """Runs :func:`prune` for the reconciler every ``retention_interval_s``, on a thread of its own (a first
    pass over a large backlog must not hold up scaling), one pass at a time; the first an interval after
    start, so a control plane's start pays nothing for it."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._last = time.time()
        self._thread: threading.Thread | None = None

    def maybe_start(self, now: float, step: Callable[..., None]) -> None:
        """``step``: the reconciler's guard, which logs a failure once and never raises."""
        if now - self._last < self.cp.settings.retention_interval_s:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._last = now
        self._thread = threading.Thread(
            target=step,
            args=("pruning old calls, logs and blobs", prune, self.cp),
            name="retention",
            daemon=True,
        )
        self._thread.start()


__all__ = ["PruneReport", "Pruner", "expired_apps", "prune"]
