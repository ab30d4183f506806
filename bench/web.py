"""Web endpoints through the control plane's proxy beside the same FastAPI app served by uvicorn directly, in
one run on this machine.

- **proxy**: a control plane in a process of its own (``cloudmodal server start --foreground``, SQLite in a
  temporary ``CLOUDMODAL_HOME``) with ``bench/apps/web_bench_app.py`` deployed: an ``@asgi_app`` with
  ``@concurrent(max_inputs=100)``, served by a local worker process over the web tunnel. A request goes
  client → control plane (uvicorn, httptools) → tunnel (msgpack frames on a WebSocket) → the worker's app.
- **direct**: the same app (:func:`web_bench_app.make_app`) served by uvicorn in a subprocess on 127.0.0.1, one
  worker process, with the control plane's uvicorn settings (httptools, the default event loop, which is
  uvloop where it is installed; no access log; a listening socket with ``TCP_NODELAY``).

Routes: ``/ping`` (a tiny JSON answer) and ``/big`` (64 KiB). Measurements, each by a load generator in a
process of its own (so it shares a GIL with neither server): an asyncio raw-socket HTTP/1.1 client on uvloop
(httpx costs ~10x more CPU per request than the servers under test, and on 2 cores the load generator's CPU
is taken from them), which checks every answer's status and body length.

- **latency**: sequential requests on one keep-alive connection; p50 and p99 after a warm-up.
- **throughput**: ``--conns`` keep-alive connections, each sending its next request when the last is
  answered, until ``--requests`` are answered (after a warm-up on every connection); requests per second.
  The CPU time each process used during the timed part is read from ``/proc`` and shown per request.

Each round measures both targets (their order alternating between rounds); the table shows the medians of
``--rounds`` rounds. Goal: the proxy adds under 1 ms at p50, and its throughput is at least 70 % of direct.

Run: ``.venv/bin/python bench/web.py [--rounds 3] [--requests 10000] [--conns 16] [--json FILE]``;
``--quick`` is a few-second smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "bench" / "apps"
ROUTES = {"/ping": None, "/big": 64 * 1024}  # path -> the body length every answer must have (None: any)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the load generator (a process of its own) -----------------------------------------------------------------
class BadAnswer(Exception):
    """An answer that is not what the app sends: the benchmark would be measuring something else."""


class Conn:
    """One keep-alive HTTP/1.1 connection sending GETs of one path."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, host: str, port: int, path: str) -> Conn:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n\r\n".encode()
        return cls(reader, writer, request)

    async def get(self, expect_len: int | None) -> None:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        length = -1
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            got = 0
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                got += len(await self.reader.readexactly(size + 2)) - 2
        elif length >= 0:
            got = len(await self.reader.readexactly(length))
        else:
            raise BadAnswer(f"an answer with neither Content-Length nor chunks: {head!r}")
        if status != b"200":
            raise BadAnswer(f"status {status.decode()} (expected 200): {head.decode(errors='replace')}")
        if expect_len is not None and got != expect_len:
            raise BadAnswer(f"a body of {got} bytes (expected {expect_len})")

    def close(self) -> None:
        self.writer.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _latency(host: str, port: int, path: str, n: int, warmup: int) -> dict[str, Any]:
    conn = await Conn.open(host, port, path)
    expect = ROUTES.get(path)
    try:
        for _ in range(warmup):
            await conn.get(expect)
        times = []
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            await conn.get(expect)
            times.append(clock() - t0)
    finally:
        conn.close()
    times.sort()
    return {"p50_ms": _percentile(times, 0.5) * 1e3, "p99_ms": _percentile(times, 0.99) * 1e3, "n": n}


async def _throughput(host: str, port: int, path: str, n: int, conns: int, warmup: int) -> dict[str, Any]:
    expect = ROUTES.get(path)
    pool = [await Conn.open(host, port, path) for _ in range(conns)]
    try:
        await asyncio.gather(*(_repeat(c, expect, warmup) for c in pool))
        left = [n]
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(_drain(c, expect, left) for c in pool))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        for c in pool:
            c.close()
    return {"rps": n / elapsed, "elapsed_s": elapsed, "loadgen_cpu_s": cpu, "n": n}


async def _repeat(conn: Conn, expect: int | None, k: int) -> None:
    for _ in range(k):
        await conn.get(expect)


async def _drain(conn: Conn, expect: int | None, left: list[int]) -> None:
    while left[0] > 0:
        left[0] -= 1
        await conn.get(expect)


def loadgen(args: dict[str, Any]) -> int:
    """``--loadgen JSON``: one measurement; prints its result as JSON (or what was wrong, exit status 1)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    host, port, path = args["host"], args["port"], args["path"]
    if args["mode"] == "latency":
        job = _latency(host, port, path, args["n"], args["warmup"])
    else:
        job = _throughput(host, port, path, args["n"], args["conns"], args["warmup"])
    try:
        result = asyncio.run(job)
    except (BadAnswer, OSError, asyncio.IncompleteReadError, ValueError) as e:
        print(f"load generator: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


def run_loadgen(**args: Any) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--loadgen", json.dumps(args)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed on {args}: {proc.stderr.strip()}")
    return json.loads(proc.stdout.splitlines()[-1])


# -- the direct target -----------------------------------------------------------------------------------------
def serve_direct() -> int:
    """``--serve-direct``: the bench app on uvicorn with the control plane's settings, on a free loopback port
    (printed first), until SIGTERM."""
    import uvicorn

    sys.path.insert(0, str(APPS))
    from web_bench_app import make_app

    # as the control plane binds its socket: TCP_NODELAY on the listener, so every accepted socket has it
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    config = uvicorn.Config(
        make_app(),
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=65,
        proxy_headers=False,
    )
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


@contextmanager
def direct_server() -> Iterator[tuple[int, list[int]]]:
    """The direct target: (its port, its pids)."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve-direct"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the direct uvicorn server did not start (see its output above)")
        port = int(line)
        _wait_http(f"http://127.0.0.1:{port}/ping", 30)
        yield port, [proc.pid]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the proxy target ------------------------------------------------------------------------------------------
@dataclass
class ControlPlane:
    url: str
    port: int
    pid: int
    path_prefix: str  # the endpoint's root, e.g. /web/web-bench/api

    def pids(self) -> dict[str, list[int]]:
        """The control plane's pid and its workers' (the one serving, and any idle standby spare)."""
        import psutil

        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        return {"control plane": [self.pid], "workers": [k.pid for k in kids]}


@contextmanager
def control_plane(tmp: Path) -> Iterator[ControlPlane]:
    """A control plane in a process of its own (``cloudmodal server start --foreground``), with the bench app
    deployed and one worker of it serving (the first request starts it)."""
    import psutil

    home = tmp / "home"
    home.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")}
    env.update(CLOUDMODAL_HOME=str(home), CLOUDMODAL_BLOB_DIR=str(tmp / "blobs"))
    log = (tmp / "server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudmodal.cli.main", "server", "start", "--foreground"]
        + ["--port", str(port), "--database-url", f"sqlite:///{tmp / 'cp.db'}"],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (home / "server.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the control plane did not start: {(tmp / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.05)
        _wait_http(f"{url}/healthz", 60)
        token = json.loads((home / "server.json").read_text())["token"]

        sys.path.insert(0, str(ROOT / "tests" / "integration"))
        sys.path.insert(0, str(APPS))
        import web_bench_app
        from support import client_env

        from cloudmodal.client.session import deploy

        with client_env(url, token):
            info = deploy(web_bench_app.app)
        endpoint = dict(info["web_endpoints"])["api"]
        prefix = endpoint[len(url) :].rstrip("/")
        _wait_http(f"{url}{prefix}/ping", 120)  # starts the worker from zero
        yield ControlPlane(url, port, proc.pid, prefix)
    finally:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        proc.send_signal(signal.SIGTERM)  # stops its workers, then itself
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for k in kids:  # a worker the control plane did not stop
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=timeout)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g}s (last: {last})")


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes used so far; a process that is gone counts 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


# -- the measurement -------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One round's figures for one target and route."""

    p50_ms: float
    p99_ms: float
    rps: float
    cpu_us: dict[str, float]  # CPU per request during the throughput run, by process (and the load generator)
    processes: int  # server processes after the run (the proxy: the control plane and its workers)


@dataclass
class Row:
    """Medians over the rounds for one target and route."""

    target: str
    route: str
    p50_ms: float
    p99_ms: float
    rps: float
    cpu_us: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def measure(port: int, path: str, procs: dict[str, list[int]], cfg: argparse.Namespace, n: int) -> Sample:
    lat = run_loadgen(
        host="127.0.0.1", port=port, path=path, mode="latency", n=cfg.latency_n, warmup=cfg.warmup
    )
    before = {name: _cpu_s(pids) for name, pids in procs.items()}
    tput = run_loadgen(
        host="127.0.0.1", port=port, path=path, mode="throughput", n=n, conns=cfg.conns, warmup=cfg.warmup
    )
    # the servers' CPU is read around the whole load generator process (its connections and warm-up too):
    # an upper bound, within the warm-up's share (conns x warmup of n requests)
    cpu = {name: (_cpu_s(procs[name]) - before[name]) / n * 1e6 for name in procs}
    cpu["load generator"] = tput["loadgen_cpu_s"] / n * 1e6
    return Sample(lat["p50_ms"], lat["p99_ms"], tput["rps"], cpu, sum(len(p) for p in procs.values()))


def run(cfg: argparse.Namespace) -> list[Row]:
    samples: dict[tuple[str, str], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="web-bench-") as tmp, direct_server() as (dport, dpids):
        with control_plane(Path(tmp)) as cp:
            for r in range(cfg.rounds):
                order = ["direct", "proxy"] if r % 2 == 0 else ["proxy", "direct"]
                for route in cfg.routes:
                    n = cfg.requests if route == "/ping" else max(cfg.conns, cfg.requests // 2)
                    for target in order:
                        if target == "direct":
                            s = measure(dport, route, {"uvicorn": dpids}, cfg, n)
                        else:
                            s = measure(cp.port, cp.path_prefix + route, cp.pids(), cfg, n)
                            after = cp.pids()
                            s.processes = sum(len(p) for p in after.values())
                        samples.setdefault((target, route), []).append(s)
                        print(
                            f"  round {r + 1} {target:6} {route:5}  p50 {s.p50_ms:.3f} ms  p99 {s.p99_ms:.3f} ms  "
                            f"{s.rps:,.0f} req/s  ({s.processes} server processes)",
                            flush=True,
                        )
            workers = cp.pids()["workers"]
            if len(workers) != 1:
                import psutil

                cmds = [" ".join(psutil.Process(w).cmdline())[:120] for w in workers]
                print(
                    f"note: the proxy target ended with {len(workers)} worker processes: {cmds}", flush=True
                )
    rows = []
    for route in cfg.routes:
        for target in ("direct", "proxy"):
            ss = samples[(target, route)]
            keys = ss[0].cpu_us.keys()
            rows.append(
                Row(
                    target,
                    route,
                    statistics.median(s.p50_ms for s in ss),
                    statistics.median(s.p99_ms for s in ss),
                    statistics.median(s.rps for s in ss),
                    {k: statistics.median(s.cpu_us[k] for s in ss) for k in keys},
                    [asdict(s) for s in ss],
                )
            )
    return rows


def table(rows: list[Row], cfg: argparse.Namespace) -> str:
    out = [
        f"medians of {cfg.rounds} round(s); latency: {cfg.latency_n} sequential requests on one connection; "
        f"throughput: {cfg.conns} connections",
        "",
        f"| {'target':6} | {'route':5} | {'p50 ms':>7} | {'p99 ms':>7} | {'req/s':>8} | CPU µs per request "
        "(throughput run) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in r.cpu_us.items())
        out.append(
            f"| {r.target:6} | {r.route:5} | {r.p50_ms:7.3f} | {r.p99_ms:7.3f} | {r.rps:8,.0f} | {cpu} |"
        )
    out += [
        "",
        "| route | proxy added p50 ms | proxy added p99 ms | proxy req/s ÷ direct | proxy CPU/request ÷ direct "
        "| goal met? |",
        "|---|---:|---:|---:|---:|---|",
    ]
    by = {(r.target, r.route): r for r in rows}
    for route in cfg.routes:
        d, p = by[("direct", route)], by[("proxy", route)]
        added, ratio = p.p50_ms - d.p50_ms, p.rps / d.rps
        cpu_ratio = _server_cpu(p) / max(_server_cpu(d), 1e-9)
        met = "yes" if added < 1.0 and ratio >= 0.7 else "no"
        out.append(
            f"| {route:5} | {added:+.3f} | {p.p99_ms - d.p99_ms:+.3f} | {ratio:.2f} | {cpu_ratio:.2f} | {met} |"
        )
    out.append(
        "(goal: the proxy adds under 1 ms at p50 and keeps at least 70 % of direct's req/s; when the cores are "
        "busy, req/s follows the servers' CPU per request)"
    )
    return "\n".join(out)


def _server_cpu(row: Row) -> float:
    """The servers' CPU µs per request (the load generator's left out)."""
    return sum(v for k, v in row.cpu_us.items() if k != "load generator")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=10_000, help="throughput run of /ping (/big: half)")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--latency-n", type=int, default=2_000, help="sequential requests timed for p50/p99")
    ap.add_argument("--warmup", type=int, default=200, help="untimed requests first, on every connection")
    ap.add_argument("--routes", default="/ping,/big", help="comma-separated: /ping, /big")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--loadgen", help=argparse.SUPPRESS)
    ap.add_argument("--serve-direct", action="store_true", help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.loadgen:
        return loadgen(json.loads(cfg.loadgen))
    if cfg.serve_direct:
        return serve_direct()
    if cfg.quick:
        cfg.rounds, cfg.requests, cfg.conns, cfg.latency_n, cfg.warmup = 1, 400, 8, 200, 20
    cfg.routes = [r.strip() for r in cfg.routes.split(",") if r.strip()]
    unknown = [r for r in cfg.routes if r not in ROUTES]
    if unknown:
        ap.error(f"unknown route(s) {unknown}: choose from {', '.join(ROUTES)}")
    rows = run(cfg)
    print()
    print(table(rows, cfg))
    if cfg.json:
        cfg.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
