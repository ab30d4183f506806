"""State objects' throughput beside their peers, in one run on this machine.

Sections (``--only`` picks some; each is a function in :data:`SECTIONS` returning rows of the same shape, so
another object's section is one more entry):

- ``kv``: ``cloudmodal.Dict`` and ``cloudmodal.Queue`` through a real control plane (``ServerHandle``: real
  HTTP/WebSocket, SQLite in a temporary directory by default, ``--database-url`` for PostgreSQL), beside a local
  Redis (``--redis-url``, default ``redis://127.0.0.1:6379/0``) through redis-py. Every value is the same Python
  object on both sides (``--value-bytes`` of payload), and both sides do the same work per item: the Redis
  side pickles and unpickles each key and value with the client's own functions (``cloudmodal.dict._dumps``,
  ``_loads``, ``cloudmodal.queue._loads``), as a program storing Python objects in Redis must, and as
  ``Dict``/``Queue`` do for each item (a dict put pickles its key and value, a get pickles its key and unpickles
  the value, a queue put pickles its value, a get unpickles it; ``items()`` unpickles each key and value).
  Operations, ``--ops`` each:

  ============================  =====================================  ===========================================
  row                           cloudmodal                             Redis (redis-py)
  ============================  =====================================  ===========================================
  dict put (single)             ``d.put(k, v)``                        ``SET``
  dict get (single)             ``d.get(k)``                           ``GET``
  dict put (batched)            ``d.update({...})`` of ``--batch``     pipeline of ``--batch`` ``SET``
  dict get (batched)            ``items()`` of the batched rows' dict  pipeline of ``--batch`` ``GET``
  queue put (single)            ``q.put(v)``                           ``RPUSH``
  queue get (single)            ``q.get()``                            ``LPOP``
  queue put (batched)           ``q.put_many([...])`` of ``--batch``   pipeline of ``--batch`` ``RPUSH``
  queue get (batched)           ``q.get_many(--batch)``                pipeline of ``--batch`` ``LPOP``
  ============================  =====================================  ===========================================

  Single operations are one request each, waited for (latency-bound on both sides). Every read is checked
  against what was written (a benchmark that lost data would be measuring something else). The batched dict
  rows use a dict of their own, so ``items()`` walks exactly the ``--ops`` entries it is credited with (Modal's
  Dict has no multi-key get: iteration, in pages of 1,000, is its batched read).

  Every row is measured ``--repeat`` times (3), each time on new objects (a dict put always writes new keys),
  each time right before its peer, and each side's figure is its median: one pass of a batched row lasts a
  fraction of a second, and on a shared machine a single pass of either side can be off by half.

  ``--also-async-commit`` (PostgreSQL) measures the rows again, after the first set, on a control plane started
  with ``CLOUDMODAL_KV_SYNCHRONOUS_COMMIT=off``: its Dict and Queue commits do not wait for the disk, the
  durability trade a deployment may opt into, where a crash of the database server may lose the kv writes of
  the last moments after they were answered. Its rows are a section of their own; the first set is the durable
  default.

Prints a table (operations per second, and cloudmodal's over Redis's; each side pickling per item) and, per
section, whether the goal is met; ``--json FILE`` also writes the rows, with every pass's figure. Goal: batched
at least half of Redis's.

Run: ``.venv/bin/python bench/state.py [--ops 20000] [--batch 500] [--repeat 3] [--database-url URL]
[--also-async-commit] [--only kv]``. Needs ``redis`` (redis-py) installed and a Redis answering for the Redis
column (otherwise the column is empty).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


PER_PARTITION = 4000  # queue items per partition (Modal's limit is 5,000; --batch must divide this)


@dataclass
class Row:
    """One measured operation: items per second for cloudmodal and its peer (None: not measured), the
    medians of the passes listed in ``runs``."""

    section: str
    op: str
    cloudmodal: float | None
    peer: float | None
    peer_name: str = ""
    runs: dict[str, list[float]] = field(default_factory=dict)  # "cloudmodal"/"peer" -> each pass's figure

    @property
    def ratio(self) -> float | None:
        if self.cloudmodal is None or not self.peer:
            return None
        return self.cloudmodal / self.peer


def rate(n: int, fn: Callable[[], None]) -> float:
    """Items per second of ``fn``, which handles ``n`` items."""
    t0 = time.perf_counter()
    fn()
    return n / max(time.perf_counter() - t0, 1e-9)


def batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


# -- the control plane ---------------------------------------------------------------------------------------
@contextmanager
def control_plane(database_url: str | None, env: dict[str, str] | None = None) -> Iterator[None]:
    """A real control plane in a process of its own (as Redis is: client and server do not share a GIL),
    this process's client pointed at it; ``env``: variables for its process (its settings)."""
    import os
    import subprocess

    # the test suite's helper: this process's client pointed at a server for the duration
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from support import client_env

    with tempfile.TemporaryDirectory(prefix="state-bench-") as tmp:
        url = database_url or f"sqlite:///{tmp}/cp.db"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", tmp, "--database-url", url],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ | (env or {}),
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the benchmark's control plane did not start (see its output above)")
            server_url, token = json.loads(line)
            with client_env(server_url, token):
                yield
        finally:
            proc.terminate()  # the server stops on SIGTERM
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve(state_dir: str, database_url: str) -> int:
    """``--serve``: run a control plane until SIGTERM, after printing its URL and owner token as JSON."""
    import signal
    import threading

    from cloudmodal.server.app import ServerHandle, default_settings

    handle = ServerHandle(default_settings(Path(state_dir), database_url=database_url)).start_in_thread()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps([handle.url, handle.token]), flush=True)
    stop.wait()
    handle.stop()
    return 0


def redis_client(url: str) -> tuple[Any, str | None]:
    """A connected redis-py client, or None and why not."""
    try:
        import redis
    except ImportError:
        return None, "redis-py is not installed (pip install redis)"
    try:
        r = redis.Redis.from_url(url)
        r.ping()
    except Exception as e:  # any failure to reach it: the Redis column stays empty
        return None, f"Redis at {url} did not answer: {e}"
    return r, None


# -- section: Dict and Queue ---------------------------------------------------------------------------------
ASYNC_COMMIT_SECTION = "kv, synchronous_commit off"


def kv_section(a: argparse.Namespace) -> list[Row]:
    """The rows on the control plane's database as configured, and with ``--also-async-commit`` again with
    its kv commits not waiting for the disk (measured after the first set, on a control plane of its own)."""
    rows = kv_rows(a, a.database_url, "kv")
    if a.also_async_commit:
        rows += kv_rows(a, a.database_url, ASYNC_COMMIT_SECTION, {"CLOUDMODAL_KV_SYNCHRONOUS_COMMIT": "off"})
    return rows


def kv_rows(
    a: argparse.Namespace, database_url: str | None, section: str, env: dict[str, str] | None = None
) -> list[Row]:
    n1 = a.single_ops or a.ops  # items of the single-operation rows
    value = {"payload": "x" * a.value_bytes, "n": 1}
    keys = [f"key-{i}" for i in range(n1)]
    ours: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    with control_plane(database_url, env), redis_ops(a, keys, value) as peer:
        for _ in range(a.repeat):
            kv_pass(a, value, keys, peer, ours, theirs)
    return [
        Row(
            section,
            op,
            statistics.median(ours[op]),
            statistics.median(theirs[op]) if op in theirs else None,
            "Redis",
            {"cloudmodal": ours[op]} | ({"peer": theirs[op]} if op in theirs else {}),
        )
        for op in ours
    ]


def kv_pass(
    a: argparse.Namespace,
    value: Any,
    keys: list[str],
    peer: dict[str, Callable[[], None]],
    ours: dict[str, list[float]],
    theirs: dict[str, list[float]],
) -> None:
    """One pass of every row, on new objects; each row's figures appended to ``ours`` and ``theirs``."""
    from cloudmodal.dict import Dict
    from cloudmodal.queue import Queue

    n, b = a.ops, a.batch
    n1 = len(keys)
    with Dict.ephemeral() as d, Dict.ephemeral() as batched, Queue.ephemeral() as q:
        d.put("warm-up", 0)
        q.put(0)
        q.get()

        def dict_put() -> None:
            for k in keys:
                d.put(k, value)

        def dict_get() -> None:
            for k in keys:
                assert d.get(k) == value

        def dict_update() -> None:
            for r in batches(n, b):
                batched.update({f"batch-{i}": value for i in r})

        def dict_items() -> None:
            got = sum(1 for k, v in batched.items() if k.startswith("batch-") and v == value)
            assert got == n, f"items() found {got} of {n} entries"

        # a partition holds at most 5,000 items: the items go to a new partition every PER_PARTITION
        def part(i: int) -> str:
            return f"p{i // PER_PARTITION}"

        def queue_put() -> None:
            for i in range(n1):
                q.put(value, partition=part(i))

        def queue_get() -> None:
            for i in range(n1):
                assert q.get(timeout=30, partition=part(i)) == value

        def queue_put_many() -> None:
            for r in batches(n, b):
                q.put_many([value] * len(r), partition=part(r.start))

        def queue_get_many() -> None:
            got = 0
            for r in batches(n, b):
                vs = q.get_many(len(r), timeout=30, partition=part(r.start))
                assert len(vs) == len(r) and vs[0] == value
                got += len(vs)
            assert got == n and q.len(total=True) == 0

        for op, fn in (
            ("dict put (single)", dict_put),
            ("dict get (single)", dict_get),
            ("dict put (batched)", dict_update),
            ("dict get (batched)", dict_items),
            ("queue put (single)", queue_put),
            ("queue get (single)", queue_get),
            ("queue put (batched)", queue_put_many),
            ("queue get (batched)", queue_get_many),
        ):
            # each row's peer right after it: the machine's load (shared) is then the same for both
            items = n if "batched" in op else n1
            ours.setdefault(op, []).append(rate(items, fn))
            if op in peer:
                theirs.setdefault(op, []).append(rate(items, peer[op]))


@contextmanager
def redis_ops(a: argparse.Namespace, keys: list[str], value: Any) -> Iterator[dict[str, Callable[[], None]]]:
    """The Redis side of each row (none when Redis is not there); its keys are deleted after. Each key and
    value is pickled (and each value read unpickled) per item, with the functions cloudmodal's client uses."""
    r, why = redis_client(a.redis_url)
    if r is None:
        print(f"note: no Redis column: {why}", file=sys.stderr)
        yield {}
        return
    import uuid

    from cloudmodal.dict import _dumps, _loads
    from cloudmodal.queue import _loads as _queue_loads

    n, b = a.ops, a.batch
    prefix = f"state-bench-{uuid.uuid4().hex[:8]}:".encode()
    qkey = prefix + b"queue"
    try:

        def put() -> None:
            for k in keys:
                r.set(prefix + _dumps(k), _dumps(value))

        def get() -> None:
            for k in keys:
                assert _loads(r.get(prefix + _dumps(k))) == value

        def put_pipelined() -> None:
            for rg in batches(n, b):
                p = r.pipeline(transaction=False)
                for i in rg:
                    p.set(prefix + _dumps(f"batch-{i}"), _dumps(value))
                p.execute()

        def get_pipelined() -> None:
            for rg in batches(n, b):
                p = r.pipeline(transaction=False)
                for i in rg:
                    p.get(prefix + _dumps(f"batch-{i}"))
                assert all(_loads(v) == value for v in p.execute())

        def qput() -> None:
            for _ in range(len(keys)):
                r.rpush(qkey, _dumps(value))

        def qget() -> None:
            for _ in range(len(keys)):
                assert _queue_loads(r.lpop(qkey)) == value

        def qput_pipelined() -> None:
            for rg in batches(n, b):
                p = r.pipeline(transaction=False)
                for _ in rg:
                    p.rpush(qkey, _dumps(value))
                p.execute()

        def qget_pipelined() -> None:
            for rg in batches(n, b):
                p = r.pipeline(transaction=False)
                for _ in rg:
                    p.lpop(qkey)
                assert all(_queue_loads(v) == value for v in p.execute())

        yield {
            "dict put (single)": put,
            "dict get (single)": get,
            "dict put (batched)": put_pipelined,
            "dict get (batched)": get_pipelined,
            "queue put (single)": qput,
            "queue get (single)": qget,
            "queue put (batched)": qput_pipelined,
            "queue get (batched)": qget_pipelined,
        }
    finally:
        doomed = list(r.scan_iter(match=prefix + b"*", count=10_000))
        for chunk in batches(len(doomed), 1000):
            r.delete(*[doomed[i] for i in chunk])


# Each section: name -> function(args) -> rows. A new state object's benchmark is one more entry.
SECTIONS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {"kv": kv_section}


# -- output ----------------------------------------------------------------------------------------------------
def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def table(rows: list[Row]) -> str:
    head = ["section", "operation", "cloudmodal items/s", "peer", "peer items/s", "cloudmodal / peer"]
    lines = [head] + [
        [
            r.section,
            r.op,
            _num(r.cloudmodal),
            r.peer_name or "-",
            _num(r.peer),
            "-" if r.ratio is None else f"{r.ratio:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append(
            "  ".join(
                c.rjust(w) if i >= 2 else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


GOAL = 0.5  # batched operations: at least this fraction of the peer's items per second


def goal_lines(rows: list[Row]) -> list[str]:
    """Per section, whether every batched row reached GOAL times its peer (and which did not)."""
    out = []
    for section in dict.fromkeys(r.section for r in rows):
        batched = [r for r in rows if r.section == section and "batched" in r.op and r.ratio is not None]
        if not batched:
            continue
        short = [f"{r.op} {r.ratio:.2f}" for r in batched if r.ratio is not None and r.ratio < GOAL]
        verdict = "met" if not short else "not met (" + ", ".join(short) + ")"
        out.append(f"goal, {section}: every batched operation at least {GOAL}x its peer: {verdict}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--ops", type=int, default=20_000, help="items per operation")
    p.add_argument(
        "--single-ops", type=int, default=None, help="items of the single-operation rows (default: --ops)"
    )
    p.add_argument("--batch", type=int, default=500, help="items per batched request")
    p.add_argument("--repeat", type=int, default=3, help="passes of every row; each side's median is shown")
    p.add_argument("--value-bytes", type=int, default=100, help="payload bytes of each value")
    p.add_argument("--database-url", default=None, help="the control plane's database (default: SQLite)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only these sections")
    p.add_argument(
        "--also-async-commit",
        action="store_true",
        help="PostgreSQL: measure the kv rows again with CLOUDMODAL_KV_SYNCHRONOUS_COMMIT=off (a crash of the "
        "database server may lose the last moments of answered kv writes)",
    )
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--serve", metavar="STATE_DIR", help=argparse.SUPPRESS)  # the control plane's process
    a = p.parse_args(argv)
    if a.also_async_commit and not (a.database_url or "").startswith("postgresql"):
        p.error("--also-async-commit needs a PostgreSQL --database-url")
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    if PER_PARTITION % a.batch:
        p.error(f"--batch must divide {PER_PARTITION} (a batch never spans two queue partitions)")
    if a.serve:
        return serve(a.serve, a.database_url)
    rows: list[Row] = []
    for name in a.only or list(SECTIONS):
        rows += SECTIONS[name](a)
    print(table(rows))
    if any(r.peer_name == "Redis" for r in rows):
        print("Redis side: keys and values pickled, values read unpickled, per item (as cloudmodal's client)")
    for line in goal_lines(rows):
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
