"""The control plane, independent of HTTP: its construction, and the in-memory hand-off of inputs from callers
to waiting workers and of outputs back to waiting callers. Each domain's operations are a service of their own
(``svc_apps``, ``svc_functions``, ``svc_calls``, ``svc_workers``, ``svc_access``, ``svc_activity``), composed here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.auth import TokenStore
from cloudmodal.server.blobs import BlobStore, open_blob_store
from cloudmodal.server.db import Database
from cloudmodal.server.group_commit import GroupCommit
from cloudmodal.server.hotsql import HotStatements
from cloudmodal.server.hub import Hub
from cloudmodal.server.queue import DEFAULT_CRASH_BUDGET, ClaimedInput, InputQueue, OutputItem
from cloudmodal.server.scaling_rules import dispatch_price
from cloudmodal.server.secretbox import SecretBox
from cloudmodal.server.svc_access import Access
from cloudmodal.server.svc_activity import Activity
from cloudmodal.server.svc_apps import Apps
from cloudmodal.server.svc_calls import Calls
from cloudmodal.server.svc_functions import Functions
from cloudmodal.server.svc_workers import LIVE_WORKER_STATES, Workers

__all__ = [
    "LIVE_WORKER_STATES",
    "ControlPlane",
    "OutputMailbox",
    "ParkedClaim",
    "Settings",
    "WorkerOp",
    "WorkerOpResult",
]

log = logging.getLogger("cloudmodal.server")


@dataclass
class Settings:
    database_url: str
    state_dir: Path
    # anonymous requests from loopback act as the owner: an explicit, warned-about opt-in only (any local user
    # and any same-host proxy then controls the control plane)
    allow_loopback_anonymous: bool = False
    lease_s: float = 30.0  # inputs claimed by a worker that stops heartbeating are requeued after this
    heartbeat_s: float = 3.0
    worker_timeout_s: float = 30.0  # a worker silent this long is considered dead
    client_timeout_s: float = 60.0  # an ephemeral app whose client is silent this long is stopped
    # how long a worker keeps trying to reach a control plane that went away before it exits: long for a
    # server that restarts (workers resume), short for a client's embedded one (it is not coming back)
    worker_reconnect_s: float = 600.0
    crash_budget: int = DEFAULT_CRASH_BUDGET
    reconcile_interval_s: float = 0.25
    providers: list[str] = field(default_factory=lambda: ["local"])
    # payloads over the inline limit: control planes that share a database must share this too
    blob_dir: Path | None = None  # default: state_dir / "blobs"
    blob_store: str | None = None  # a bucket URL or a directory; takes the place of blob_dir (blobs.py)
    # retention (cloudmodal/server/retention.py): finished calls (with their inputs, outputs and blobs) are
    # kept this long after their last activity; logs and events of ephemeral runs this long after they stop,
    # everyone else's this long after they were written
    retention_calls_ephemeral_s: float = 86400.0
    retention_calls_deployed_s: float = 7 * 86400.0
    retention_logs_ephemeral_s: float = 86400.0
    retention_logs_deployed_s: float = 30 * 86400.0
    retention_interval_s: float = 60.0  # how often the reconciling control plane prunes
    ledger_accrual_s: float = (
        30.0  # how often the cost ledger accrues running workers (cloudmodal.server.ledger)
    )
    # False: dict and queue commits answer before reaching the disk (CLOUDMODAL_KV_SYNCHRONOUS_COMMIT)
    kv_durable: bool = True
    # The one address of several control-plane replicas on one database (a load balancer or proxy in front of
    # them): the URL this control plane's workers and sandboxes are given instead of its own socket's, so
    # that they reconnect to whichever replica answers when this one goes. None: this process's own URL.
    public_url: str | None = None


def _now() -> float:
    return time.time()


@dataclass(slots=True)
class WorkerOp:
    """One worker request on an input's path: outputs to record, then (optionally) a claim of up to ``n``
    inputs of a function, and (optionally) a heartbeat ``(in flight, idle, input ids held, inputs served,
    seconds they ran)``."""

    worker_id: str
    outputs: list[OutputItem] = field(default_factory=list)
    claim: tuple[str, int] | None = None
    beat: tuple[int, bool, list[int], int, float] | None = None


@dataclass(slots=True)
class WorkerOpResult:
    claimed: list[ClaimedInput]
    beat: dict[str, Any] | None = None  # the heartbeat's answer


# How often the claims parked on a function re-read the database for inputs nobody announced here (another
# control-plane process wrote them, a lease expired): one parked claim of the function, woken this often,
# looks for all of them.
REREAD_S = 1.0


# -- in-memory hand-off ---------------------------------------------------------------------------------
# The database is the record; these are shortcuts within one control-plane process. A worker long-polling
# for work parks a ParkedClaim: new inputs for its function are written to the database already claimed by
# it, in the transaction that creates them, and handed to it without a second transaction or a re-read. A
# caller waiting on a one-input call opens an OutputMailbox: the rows a worker's outputs wrote are passed to
# it as they commit. Both wake their waiter through an asyncio.Event on the server's loop, set from any
# thread. Anything that does not go through them (other control-plane processes, requeues, retries) still
# reaches waiters through the hub and their periodic re-reads of the database.


class ParkedClaim:
    """A worker's claim waiting for inputs. ``taken``: promised inputs (under the control plane's lock);
    ``done`` is set once they are written (``rows``, possibly empty when that write failed)."""

    __slots__ = ("worker_id", "function_id", "max_n", "loop", "wake", "done", "rows", "taken", "price")

    def __init__(
        self,
        worker_id: str,
        function_id: str,
        max_n: int,
        loop: asyncio.AbstractEventLoop,
        wake: asyncio.Event,
    ) -> None:
        self.worker_id = worker_id
        self.function_id = function_id
        self.max_n = max(int(max_n), 1)
        self.loop = loop
        self.wake = wake
        self.done = asyncio.Event()
        self.rows: list[ClaimedInput] = []
        self.taken = False
        # what giving this worker work costs (set when parked): its price per hour, or 0 for a worker of its
        # pool's on-demand floor (kept, and paid, whether it works or not); the lowest is handed inputs first
        self.price = 0.0


def _next_taker(parked: list[ParkedClaim]) -> int:
    """Which parked claim gets the next inputs: the cheapest worker's, the most recently parked among equals.

    Work goes where it costs least, so the dearer workers are the ones left idle, and the autoscaler (which
    stops the dearest idle workers first) scales them down; the same rule keeps a pool of equals' work on few
    workers, so the rest stay idle long enough to scale down at all."""
    best = len(parked) - 1
    price = parked[best].price
    for i in range(best - 1, -1, -1):
        if parked[i].price < price:
            best, price = i, parked[i].price
    return best


def _settle_claim(pc: ParkedClaim, rows: list[ClaimedInput]) -> None:
    pc.rows = rows
    pc.done.set()
    pc.wake.set()


def _settle_each(settled: list[tuple[ParkedClaim, list[ClaimedInput]]]) -> None:
    for pc, rows in settled:
        _settle_claim(pc, rows)


def _settle_all(settled: list[tuple[ParkedClaim, list[ClaimedInput]]]) -> None:
    """Settle parked claims from any thread: one call onto each event loop for all of its claims (not a
    wake-up of the loop per claim)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[ParkedClaim, list[ClaimedInput]]]] = {}
    for pc, rows in settled:
        by_loop.setdefault(pc.loop, []).append((pc, rows))
    for loop, items in by_loop.items():
        _call_soon(loop, _settle_each, items)


class OutputMailbox:
    """Output rows of one call, delivered as they commit, for a caller long-polling it."""

    __slots__ = ("call_id", "loop", "wake", "rows")

    def __init__(self, call_id: str, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        self.call_id = call_id
        self.loop = loop
        self.wake = wake
        self.rows: list[list[Any]] = []

    def final(self) -> list[list[Any]] | None:
        """Every row of a one-input call once its final output is here (the worker posts a call's outputs
        in order, so the items before it have been delivered already); None until then."""
        if any(r[2] == -1 for r in self.rows):
            return sorted(self.rows, key=lambda r: r[0])
        return None


def _mail(mb: OutputMailbox, rows: list[list[Any]]) -> None:
    mb.rows.extend(rows)
    mb.wake.set()


def _discard(registry: dict[str, list[Any]], key: str, item: Any) -> None:
    """Remove ``item`` from ``registry[key]`` if there, and the key once its list is empty."""
    items = registry.get(key)
    if items is not None:
        try:
            items.remove(item)
        except ValueError:
            pass
        if not items:
            del registry[key]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the server is stopping, and the waiter with it
        pass


class ControlPlane:
    """One control-plane process: the shared infrastructure (database, blob store, hub, tokens, secrets, input
    queue), the per-domain services built on it, and the in-memory hand-off between callers and workers.

    Services: ``apps`` (apps, deployments), ``functions`` (registration, look-ups, cached specs and policies),
    ``calls`` (create, read, cancel), ``workers`` (register, ready, heartbeat, drain, stop), ``access`` (the
    checks handlers make), ``activity`` (events and logs). They reach each other, and the hand-off, through
    the control plane, and share its one lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.blobs: BlobStore = open_blob_store(
            settings.blob_store or settings.blob_dir or settings.state_dir / "blobs",
            spool_dir=settings.state_dir / "blob-uploads",
        )
        self.hub = Hub()
        self.tokens = TokenStore(self.db)
        self.secrets = SecretBox.for_state_dir(settings.state_dir)
        self.reconciler: Any = None  # set by server.app when it starts the reconciler
        self.web: Any = None  # the web gateway (server.web_gateway), set by server.app with its server
        from cloudmodal.server.ledger import Ledger

        self.ledger: Ledger | None = Ledger(self, settings.ledger_accrual_s)
        self.cost: Any = None  # cost reports (server.cost_report), set with the route table
        self.sandboxes: Any = None  # sandboxes (server.svc_sandbox), set with the route table
        # guards the hand-off's registries below, and the workers' cancellations and service estimates
        self._lock = threading.Lock()
        self.functions = Functions(self)
        self.queue = InputQueue(self.db, self.functions.policy_for)
        self.apps = Apps(self)
        self.calls = Calls(self)
        self.workers = Workers(self)
        self.access = Access(self)
        self.activity = Activity(self)
        # the hand-off (see ParkedClaim / OutputMailbox)
        self._parked: dict[str, list[ParkedClaim]] = {}  # function id -> claims waiting, newest last
        self._mailboxes: dict[str, list[OutputMailbox]] = {}  # call id -> waiting callers
        self._prices: dict[str, float] = {}  # worker id -> price per hour (which parked worker gets inputs)
        self._floors: dict[str, frozenset[str]] = {}  # function id -> its on-demand floor's workers
        self._claimed_empty: dict[str, float] = {}  # function id -> when a claim last found too few
        self._arrived: dict[str, float] = {}  # function id -> when inputs were last announced
        self._rereading: set[str] = set()  # functions whose periodic re-read timer is armed (see park)
        # workers' requests written together (PostgreSQL; see worker_ops)
        self.commits: GroupCommit[WorkerOp, WorkerOpResult] = GroupCommit(self.worker_ops)
        # statistics (tests count them): claims that read the database, and claims parked
        self.claim_reads = 0
        self.claim_parks = 0

    @functools.cached_property
    def control_plane_id(self) -> str:
        """The id every control plane sharing this database tags its cloud nodes with: made by the first one,
        read by the others (a standby that takes over finds the nodes of the one it replaces)."""
        S = models.settings
        key = "control_plane_id"
        with self.db.read() as conn:
            found = conn.execute(select(S.c.value).where(S.c.key == key)).scalar()
        if found:
            return str(found)
        try:
            with self.db.write() as conn:
                conn.execute(S.insert().values(key=key, value=new_id("cp")))
        except IntegrityError:
            pass  # another control plane made it first: read theirs
        with self.db.read() as conn:
            return str(conn.execute(select(S.c.value).where(S.c.key == key)).scalar_one())

    # -- the in-memory hand-off (see ParkedClaim / OutputMailbox) ------------------------------------------
    @contextlib.contextmanager
    def handing_off(self) -> Iterator[list[tuple[ParkedClaim, list[ClaimedInput]]]]:
        """Collects the parked claims :meth:`enqueue` promised inputs to, and settles them on the way out:
        with their rows once the transaction inside has committed, with none if it failed (they re-read)."""
        assigned: list[tuple[ParkedClaim, list[ClaimedInput]]] = []
        try:
            yield assigned
        except BaseException:
            _settle_all([(pc, []) for pc, _ in assigned])
            raise
        _settle_all(assigned)

    def enqueue(
        self,
        hot: HotStatements,
        call_id: str,
        function_id: str,
        inputs: list[Any],
        assigned: list[tuple[ParkedClaim, list[ClaimedInput]]],
    ) -> bool:
        """Write inputs in ``hot``'s transaction: first to the workers parked on the function (claimed by
        them; appended to ``assigned``, to be settled after the commit), the rest pending. Returns whether
        any are left pending."""
        with self._lock:
            takers: list[ParkedClaim] = []
            parked = self._parked.get(function_id)
            want = len(inputs)
            while parked and want > 0:
                pc = parked.pop(_next_taker(parked))
                pc.taken = True
                takers.append(pc)
                want -= pc.max_n
        i = 0
        chunks: list[tuple[str, list[Any]]] = []
        for pc in takers:
            chunk = inputs[i : i + pc.max_n]
            i += len(chunk)
            chunks.append((pc.worker_id, chunk))
        rest = inputs[i:]
        try:
            # one INSERT for every taker's inputs and the rest: one statement whatever the takers
            per_taker = self.queue.put_claimed_many(
                hot, call_id, function_id, chunks, self.settings.lease_s, pending=rest
            )
        except BaseException:
            _settle_all([(pc, []) for pc in takers])
            raise
        assigned.extend(zip(takers, per_taker, strict=True))
        return bool(rest)

    def put_inputs(
        self,
        call_id: str,
        function_id: str,
        inputs: list[tuple[int, str | None, bytes | None, str | None]],
        created_by: str | None = None,
    ) -> int:
        """More inputs for an existing call, from its creator."""
        self.access.check_same_caller(self.access.call_owner(call_id), call_id, function_id, created_by)
        # enqueue is one statement: on PostgreSQL one round trip, its own transaction
        with self.handing_off() as assigned, self.db.hot(one_statement=True) as hot:
            leftover = self.enqueue(hot, call_id, function_id, inputs, assigned)
        self.inputs_arrived(function_id, wake_claimers=leftover)
        return len(inputs)

    def inputs_arrived(self, function_id: str, *, wake_claimers: bool = True) -> None:
        if wake_claimers:
            self.inputs_pending(function_id)
        if self.reconciler is not None:
            self.reconciler.poke(function_id)

    def inputs_pending(self, function_id: str) -> None:
        """Inputs of the function may be waiting in the database: long-polling workers claim at once."""
        self._arrived[function_id] = _now()
        self.hub.notify(f"inputs:{function_id}")

    def claim(self, worker_id: str, function_id: str, max_n: int) -> list[ClaimedInput]:
        """Up to ``max_n`` of the function's claimable inputs for the worker."""
        return self.worker_ops([WorkerOp(worker_id, claim=(function_id, max_n))])[0].claimed

    def worker_ops(self, ops: Sequence[WorkerOp]) -> list[WorkerOpResult]:
        """Workers' requests in one transaction: every op's outputs first, then the claims (one statement
        per function), then the heartbeats (one statement for all); then what follows a commit (outputs
        handed to waiting callers, empty functions marked, heartbeats answered). Raises only when nothing was
        committed. On PostgreSQL the server sends concurrent requests through :attr:`commits`, which batches
        them (:mod:`.group_commit`); on SQLite each is a batch of one."""
        now = _now()  # before the transaction: an arrival announced after it is newer (see claim_may_find)
        outputs = [(op.worker_id, it) for op in ops for it in op.outputs]
        # function id -> its claims: (op index, worker id, up to n)
        claims: dict[str, list[tuple[int, str, int]]] = {}
        beats: list[tuple[int, str, tuple[int, bool, list[int], int, float]]] = []
        for i, op in enumerate(ops):
            if op.claim is not None:
                claims.setdefault(op.claim[0], []).append((i, op.worker_id, max(1, op.claim[1])))
            if op.beat is not None:
                beats.append((i, op.worker_id, op.beat))
        claimed: list[list[ClaimedInput]] = [[] for _ in ops]
        found: list[tuple[str, str] | None] = []
        with self.db.hot() as hot:
            call_ids, written, retry_at = self.queue.complete_in(hot, outputs, now)
            for fid, takers in claims.items():
                got = self.queue.claim_in(
                    hot, fid, [(w, n) for _, w, n in takers], self.settings.lease_s, now
                )
                for (i, _, _), rows in zip(takers, got, strict=True):
                    claimed[i] = rows
            if beats:
                found = self.workers.beat_in(hot, [(w, b[0], b[1], b[2]) for _, w, b in beats], now)
        # committed: what follows must not raise (the batch is not written again)
        results = [WorkerOpResult(rows) for rows in claimed]
        try:
            self.claim_reads += sum(len(t) for t in claims.values())  # unlocked: a statistic
            for fid, takers in claims.items():
                if sum(len(claimed[i]) for i, _, _ in takers) < sum(n for _, _, n in takers):
                    self._claimed_empty[fid] = now
                else:
                    self._claimed_empty.pop(fid, None)  # served in full: there may be more
            if outputs:
                self._after_outputs(call_ids, written, retry_at)
            for (i, w, b), row in zip(beats, found, strict=True):
                results[i].beat = self.workers.beat_answer(w, row, b[3], b[4])
        except Exception:
            log.exception("after committing workers' requests")
        return results

    def claim_may_find(self, function_id: str, within_s: float = 0.5) -> bool:
        """False when a claim found nothing moments ago and no input arrived since: a worker can park at
        once without an empty claim transaction. Inputs made pending by paths that do not say so (another
        control-plane process, a retry's backoff ending) are found by the parked claim's periodic re-read."""
        t = self._claimed_empty.get(function_id)
        # the mark is when the empty claim's transaction began: inputs announced since may be there
        return t is None or t <= self._arrived.get(function_id, 0.0) or _now() - t > within_s

    def park(self, pc: ParkedClaim) -> None:
        """Park a claim until inputs are handed to it or its waiter is woken. While any claim is parked on
        the function, one of them is woken every REREAD_S to re-read the database (:meth:`_reread`), so
        idle workers cost one claim transaction a second per function, not one per worker."""
        floor = self._floors.get(pc.function_id)
        pc.price = dispatch_price(
            self._prices.get(pc.worker_id, 0.0), floor is not None and pc.worker_id in floor
        )
        fid = pc.function_id
        with self._lock:
            self.claim_parks += 1
            self._parked.setdefault(fid, []).append(pc)
            arm = fid not in self._rereading
            self._rereading.add(fid)
        if arm:
            _call_soon(pc.loop, pc.loop.call_later, REREAD_S, self._reread, fid)

    def _reread(self, function_id: str) -> None:
        """The function's periodic re-read (on the event loop): wake its most recently parked claim, which
        claims from the database unless another claim found it empty moments ago (:meth:`claim_may_find`)
        and parks again; the timer stops once no claim is parked on the function."""
        with self._lock:
            parked = self._parked.get(function_id)
            if not parked:
                self._rereading.discard(function_id)
                return
            pc = parked[-1]
        _call_soon(pc.loop, pc.wake.set)
        asyncio.get_running_loop().call_later(REREAD_S, self._reread, function_id)

    def unpark(self, pc: ParkedClaim) -> bool:
        """Withdraw a parked claim; False when inputs were promised to it already (wait for ``pc.done``)."""
        with self._lock:
            if pc.taken:
                return False
            _discard(self._parked, pc.function_id, pc)
            return True

    def unpark_worker(self, worker_id: str) -> None:
        """Withdraw a worker's parked claims (not those already promised inputs: the worker gets those, or
        releases them, or they requeue with the rest of what it held)."""
        with self._lock:
            for fid in list(self._parked):
                for pc in [pc for pc in self._parked[fid] if pc.worker_id == worker_id and not pc.taken]:
                    _discard(self._parked, fid, pc)

    def set_price(self, worker_id: str, price_per_hour: float) -> None:
        """What giving the worker work costs (see :func:`_next_taker`)."""
        self._prices[worker_id] = price_per_hour

    def forget_price(self, worker_id: str) -> None:
        self._prices.pop(worker_id, None)

    def set_floor(self, function_id: str, worker_ids: frozenset[str]) -> None:
        """The workers of the function's ``min_on_demand`` floor (the reconciler's choice): handed inputs
        first, as if free, since the pool keeps them anyway."""
        if worker_ids:
            self._floors[function_id] = worker_ids
        else:
            self._floors.pop(function_id, None)

    def open_mailbox(self, mb: OutputMailbox) -> None:
        with self._lock:
            self._mailboxes.setdefault(mb.call_id, []).append(mb)

    def close_mailbox(self, mb: OutputMailbox) -> None:
        with self._lock:
            _discard(self._mailboxes, mb.call_id, mb)

    def post_outputs(self, worker_id: str, items: list[OutputItem]) -> None:
        """A worker's outputs: recorded, handed to the callers waiting in a mailbox, announced to the rest."""
        self.worker_ops([WorkerOp(worker_id, outputs=items)])

    def _after_outputs(
        self, call_ids: set[str], written: dict[str, list[list[Any]]], retry_at: dict[str, float]
    ) -> None:
        self._deliver(written)
        self.hub.notify(*[f"outputs:{c}" for c in call_ids])
        if retry_at:
            self.hub.notify("reconcile")
            now = _now()
            for fid, at in retry_at.items():
                # a retry's backoff ends with nobody announcing it: wake the function's waiting workers then,
                # rather than leaving it to their periodic re-read (up to a second later)
                self.hub.later(at - now, self.inputs_pending, fid)

    def _deliver(self, written: dict[str, list[list[Any]]]) -> None:
        if not self._mailboxes:
            return
        with self._lock:
            targets = [(mb, rows) for cid, rows in written.items() for mb in self._mailboxes.get(cid, ())]
        for mb, rows in targets:
            _call_soon(mb.loop, _mail, mb, rows)
