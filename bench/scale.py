"""Control-plane scale: one control plane on PostgreSQL, 1,000 connected workers, 4 callers mapping.

Measures the hand-off (an input put by a caller until a worker has it in a claim reply): sustained inputs/s,
p50/p99 latency from put to claim, and the control plane's memory per connected worker (VmRSS with every worker
connected minus VmRSS before any connected, over the worker count). Also where the CPU went: the control
plane's event loop (its main thread) and its other threads, the PostgreSQL backends of its database, the
simulated workers and the callers, and the whole machine.

Processes (all on this machine):

- the control plane (``bench/scale_server.py``): the real ``ServerHandle`` (uvicorn, the route table, the
  reconciler) on a fresh PostgreSQL database (``scalebench_<hex>``, dropped at the end), serving on its main
  thread like ``cloudmodal server start``. Its workers' rows and tokens are made through its Python API, as the
  reconciler makes them before launching a worker (no HTTP route creates workers);
- the workers (``bench/scale_workers.py``): ``--worker-procs`` processes of asyncio clients, each worker with its
  own token, HTTP connection and claim WebSocket, speaking the real worker protocol (register, ready, claims
  carrying outputs, output posts, heartbeats every ``heartbeat_s``, stopped). The function is simulated: an
  input "runs" ``--work-ms`` (0: instant) and its output is its argument bytes. See that file's docstring for
  what is and is not the runtime's behaviour;
- the callers (``bench/scale_callers.py``): ``--callers`` processes, each one ``.map`` through the client's real
  ``run_map`` and ``Transport``, checking every result.

Phases: idle (control plane up, no worker connected: the RSS baseline); connected (every worker registered,
heartbeating and parked on a claim; RSS and the idle CPU cost of the connections); flat out (the callers map
``--inputs`` in all as fast as the system takes them: throughput, and latency that includes queueing); paced
(the same at each ``--paced-fraction`` of the flat-out throughput, 10 %, 25 % and 50 % by default: latency
against load when the system keeps up).

Run: ``.venv/bin/python bench/scale.py [--workers 1000] [--callers 4] [--inputs 50000] [--quick]``. PostgreSQL
is ``$CLOUDMODAL_BENCH_POSTGRES_URL``, else ``$CLOUDMODAL_TEST_POSTGRES_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test`` (the server must allow ``CREATE DATABASE``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

HERE = Path(__file__).resolve().parent
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TICK = os.sysconf("SC_CLK_TCK")


def pg_url() -> str:
    return (
        os.environ.get("CLOUDMODAL_BENCH_POSTGRES_URL")
        or os.environ.get("CLOUDMODAL_TEST_POSTGRES_URL")
        or DEFAULT_PG
    )


def postgres_missing(url: str | None = None) -> str | None:
    """None when PostgreSQL answers at ``url``, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'cloudmodal[postgres]')"
    dsn = (url or pg_url()).replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return None
    except Exception as e:
        return f"PostgreSQL at {dsn} does not answer ({type(e).__name__}: {e})"


# -- /proc ------------------------------------------------------------------------------------------------
def cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (or one of its threads), in clock ticks; 0 once it is gone."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total


@dataclass
class CpuSample:
    at: float
    loop: int  # the control plane's main thread: its event loop
    server: int
    workers: int
    callers: int
    pg: dict[int, int]
    machine: tuple[int, int]


@dataclass
class Bench:
    workers: int
    callers: int
    inputs: int
    worker_procs: int
    work_ms: float
    paced_fraction: list[float]
    url: str
    tmp: Path
    profile: str | None = None  # the control plane's CPU profile (pstats) is written here
    db_name: str = ""
    server: subprocess.Popen[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    worker_ps: list[subprocess.Popen[str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    # -- processes ----------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"[scale] {msg}", file=sys.stderr, flush=True)

    def spawn(self, script: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(HERE / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    @staticmethod
    def expect(p: subprocess.Popen[str], word: str, what: str) -> None:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != word:
            p.kill()
            raise RuntimeError(f"{what} did not start (said {line!r}, exit code {p.poll()})")

    def pg_pids(self) -> list[int]:
        import psycopg

        dsn = self.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as conn:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.db_name,)
                ).fetchall()
            ]

    def sample(self, callers: list[subprocess.Popen[str]]) -> CpuSample:
        spid = self.info["pid"]
        return CpuSample(
            time.monotonic(),
            cpu_ticks(spid, spid),
            cpu_ticks(spid),
            sum(cpu_ticks(p.pid) for p in self.worker_ps),
            sum(cpu_ticks(p.pid) for p in callers),
            {pid: cpu_ticks(pid) for pid in self.pg_pids()},
            machine_ticks(),
        )

    # -- phases ---------------------------------------------------------------------------------------------
    def start_server(self) -> None:
        import psycopg

        self.db_name = "scalebench_" + secrets.token_hex(4)
        dsn = self.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        db_url = self.url.rsplit("/", 1)[0] + "/" + self.db_name
        home = self.tmp / "home"
        self.env = os.environ | {
            "CLOUDMODAL_HOME": str(home),
            "CLOUDMODAL_CACHE_DIR": str(home / "cache"),
            "PYTHONUNBUFFERED": "1",
        }
        for k in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN", "CLOUDMODAL_PROVIDERS"):
            self.env.pop(k, None)
        info = self.tmp / "server.json"
        self.server = self.spawn(
            "scale_server.py",
            "--db-url",
            db_url,
            "--state-dir",
            str(self.tmp / "state"),
            "--workers",
            str(self.workers),
            "--info",
            str(info),
            *(["--profile", self.profile] if self.profile else []),
        )
        self.expect(self.server, "READY", "the control plane")
        self.info = json.loads(info.read_text())

    def connect_workers(self) -> None:
        per = -(-self.workers // self.worker_procs)
        for i in range(self.worker_procs):
            first = i * per
            count = min(per, self.workers - first)
            if count <= 0:
                break
            self.worker_ps.append(
                self.spawn(
                    "scale_workers.py",
                    "--info",
                    str(self.tmp / "server.json"),
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--work-ms",
                    str(self.work_ms),
                    "--out",
                    str(self.tmp / f"claims-{i}.msgpack"),
                )
            )
        for p in self.worker_ps:
            self.expect(p, "CONNECTED", "a worker process")

    def run_callers(
        self, n: int, rate: float | None, tag: str
    ) -> tuple[list[dict[str, Any]], CpuSample, CpuSample]:
        per = [n // self.callers + (1 if i < n % self.callers else 0) for i in range(self.callers)]
        ps = []
        for i, k in enumerate(per):
            args = ["--url", self.info["url"], "--token", self.info["token"]]
            args += ["--function-id", self.info["function_id"], "--inputs", str(k)]
            args += ["--out", str(self.tmp / f"caller-{tag}-{i}.msgpack")]
            if rate:
                args += ["--rate", f"{rate / self.callers:.3f}"]
            ps.append(self.spawn("scale_callers.py", *args))
        for p in ps:
            self.expect(p, "READY", "a caller")
        before = self.sample(ps)
        for p in ps:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in ps:
            p.wait(timeout=3600)
        after = self.sample(ps)
        outs = []
        for i in range(len(per)):
            with open(self.tmp / f"caller-{tag}-{i}.msgpack", "rb") as f:
                outs.append(msgpack.unpackb(f.read(), raw=False))
        return outs, before, after

    def stop_workers(self) -> list[tuple[str, int, float]]:
        for p in self.worker_ps:
            if p.poll() is None and p.stdin is not None:
                p.stdin.write("stop\n")
                p.stdin.flush()
        claims: list[tuple[str, int, float]] = []
        for i, p in enumerate(self.worker_ps):
            p.wait(timeout=120)
            path = self.tmp / f"claims-{i}.msgpack"
            if path.exists():
                with open(path, "rb") as f:
                    got = msgpack.unpackb(f.read(), raw=False)
                claims += [tuple(c) for c in got["claims"]]
                self.log += got["errors"]
            else:
                self.log.append(f"worker process {i} wrote no claims (exit code {p.returncode})")
        return claims

    def close(self) -> None:
        for p in self.worker_ps:
            if p.poll() is None:
                p.kill()
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=300 if self.profile else 30)  # writing a profile takes a while
            except subprocess.TimeoutExpired:
                self.server.kill()
        if self.db_name:
            import psycopg

            dsn = self.url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


# -- analysis ---------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def cpu_share(a: CpuSample, b: CpuSample) -> dict[str, float]:
    """Cores used between two samples by each part (1.0 = one core busy all the time)."""
    wall = max(b.at - a.at, 1e-9)

    def cores(ticks: int) -> float:
        return ticks / TICK / wall

    pg = sum(b.pg.get(pid, 0) - a.pg.get(pid, 0) for pid in b.pg)
    busy = b.machine[0] - a.machine[0]
    return {
        "wall_s": wall,
        "cp_loop": cores(b.loop - a.loop),
        "cp_other_threads": cores((b.server - a.server) - (b.loop - a.loop)),
        "postgres": cores(pg),
        "workers": cores(b.workers - a.workers),
        "callers": cores(b.callers - a.callers),
        "machine": cores(busy),
    }


def analyse(outs: list[dict[str, Any]], claims_by_call: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    n = sum(o["got"] for o in outs)
    total = 0
    once = twice = never = 0
    lat: list[float] = []
    lat_produced: list[float] = []  # from the input's production by the caller's iterator
    times: list[float] = []
    first_put = min((p[2] for o in outs for p in o["puts"]), default=0.0)
    for o in outs:
        put_at: dict[int, float] = {}
        for first, count, sent, _answered in o["puts"]:
            for idx in range(first, first + count):
                put_at[idx] = sent
        total += len(put_at)
        seen: dict[int, int] = {}
        for idx, t in claims_by_call.get(o["call_id"], []):
            seen[idx] = seen.get(idx, 0) + 1
            if seen[idx] == 1 and idx in put_at:
                lat.append(t - put_at[idx])
                times.append(t)
                if idx < len(o["produced"]):
                    lat_produced.append(t - o["produced"][idx])
        for idx in put_at:
            c = seen.get(idx, 0)
            once += c == 1
            twice += c > 1
            never += c == 0
    lat.sort()
    lat_produced.sort()
    times.sort()
    put_ms = sorted((p[3] - p[2]) * 1000 for o in outs for p in o["puts"])
    k = len(times)
    sustained = float("nan")
    if k >= 10:
        lo, hi = times[k // 10], times[(9 * k) // 10]
        if hi > lo:
            sustained = ((9 * k) // 10 - k // 10) / (hi - lo)
    map_span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    return {
        "inputs": total,
        "claimed_once": once,
        "claimed_more_than_once": twice,
        "never_claimed": never,
        "outputs_received": n,
        "outputs_wrong": sum(o["wrong"] for o in outs),
        "caller_errors": [o["error"] for o in outs if o["error"]],
        "handoff_per_s_sustained": sustained,
        "handoff_per_s_overall": k / (times[-1] - first_put) if k and times[-1] > first_put else float("nan"),
        "map_per_s": n / map_span if map_span > 0 else float("nan"),
        "latency_p50_ms": pct(lat, 50) * 1000,
        "latency_p99_ms": pct(lat, 99) * 1000,
        "latency_max_ms": (lat[-1] * 1000) if lat else float("nan"),
        "produced_p50_ms": pct(lat_produced, 50) * 1000,
        "produced_p99_ms": pct(lat_produced, 99) * 1000,
        "put_requests": len(put_ms),
        "put_request_p50_ms": pct(put_ms, 50),
        "put_request_max_ms": put_ms[-1] if put_ms else float("nan"),
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="scalebench-"))
    b = Bench(
        a.workers, a.callers, a.inputs, a.worker_procs, a.work_ms, a.paced_fraction, pg_url(), tmp, a.profile
    )
    res: dict[str, Any] = {
        "workers": a.workers,
        "callers": a.callers,
        "inputs": a.inputs,
        "worker_procs": a.worker_procs,
        "work_ms": a.work_ms,
        "cores": os.cpu_count(),
    }
    try:
        b.say(f"control plane on PostgreSQL, making {a.workers} workers' rows and tokens ...")
        b.start_server()
        spid = b.info["pid"]
        time.sleep(a.settle_s)
        res["rss_idle_kb"] = status_kb(spid, "VmRSS")
        b.say(
            f"control plane up (RSS {res['rss_idle_kb'] / 1024:.1f} MiB); connecting {a.workers} workers ..."
        )
        t0 = time.monotonic()
        b.connect_workers()
        res["connect_s"] = time.monotonic() - t0
        time.sleep(a.settle_s)  # every worker has heartbeated at least once
        idle0 = b.sample([])
        time.sleep(a.idle_s)
        idle1 = b.sample([])
        res["rss_connected_kb"] = status_kb(spid, "VmRSS")
        res["rss_per_worker_kb"] = (res["rss_connected_kb"] - res["rss_idle_kb"]) / a.workers
        res["cpu_connected_idle"] = c = cpu_share(idle0, idle1)
        # what each connected, idle worker costs the control plane: CPU ms per second
        res["idle_cp_ms_per_worker_s"] = (c["cp_loop"] + c["cp_other_threads"]) * 1000 / a.workers
        b.say(
            f"{a.workers} connected in {res['connect_s']:.1f} s; RSS {res['rss_connected_kb'] / 1024:.1f} MiB; "
            f"mapping {a.inputs} inputs from {a.callers} callers flat out ..."
        )
        phases: dict[str, tuple[list[dict[str, Any]], CpuSample, CpuSample]] = {}
        phases["flat out"] = b.run_callers(a.inputs, None, "flat")
        offered: dict[str, float] = {}
        res["rss_after_load_kb"] = status_kb(spid, "VmRSS")
        # the rates come from the callers' own view (results per second) to avoid reading the claims now
        o = phases["flat out"][0]
        flat_rate = sum(x["got"] for x in o) / (max(x["end"] for x in o) - min(x["start"] for x in o))
        for fraction in a.paced_fraction:
            name = f"paced {fraction:.0%}"
            offered[name] = rate = fraction * flat_rate
            n_paced = max(a.callers, min(a.inputs, int(rate * a.paced_s)))
            b.say(f"{name}: {n_paced} inputs at {rate:.0f}/s ...")
            phases[name] = b.run_callers(n_paced, rate, name.replace(" ", "-").replace("%", "pct"))
        res["rss_peak_kb"] = status_kb(spid, "VmHWM")
        claims = b.stop_workers()
        by_call: dict[str, list[tuple[int, float]]] = {}
        for call_id, idx, t in claims:
            by_call.setdefault(call_id, []).append((idx, t))
        res["phases"] = {}
        for name, (outs, s0, s1) in phases.items():
            r = analyse(outs, by_call)
            r["cpu"] = cpu_share(s0, s1)
            # the callers have exited by the second sample: their own account of their CPU time
            r["cpu"]["callers"] = sum(o["cpu_s"] for o in outs) / r["cpu"]["wall_s"]
            # CPU milliseconds per input handed off: comparable across runs whatever else loads the machine
            for key in ("cp_loop", "cp_other_threads", "postgres"):
                r["cpu_ms_per_input_" + key] = r["cpu"][key] * r["cpu"]["wall_s"] * 1000 / max(r["inputs"], 1)
            cp_ms = r["cpu_ms_per_input_cp_loop"] + r["cpu_ms_per_input_cp_other_threads"]
            r["cpu_ms_per_input_cp"] = cp_ms
            # one Python process runs Python code on one core at a time (the GIL): its ceiling on a core of
            # its own, were nothing else (PostgreSQL, the clients) competing for it
            r["cp_ceiling_per_s"] = 1000 / cp_ms if cp_ms > 0 else float("nan")
            if name in offered:
                r["offered_per_s"] = offered[name]
            res["phases"][name] = r
        res["errors"] = b.log[:20]
    finally:
        b.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def table(res: dict[str, Any]) -> str:
    lines = []
    n = res["workers"]
    lines.append(
        f"control plane on PostgreSQL, {n} connected workers ({res['worker_procs']} processes), "
        f"{res['callers']} callers, work {res['work_ms']:g} ms/input, {res['cores']} cores"
    )
    lines.append("")
    lines.append(f"{'memory':<44}{'value':>14}")
    lines.append(f"{'RSS idle (no worker connected)':<44}{res['rss_idle_kb'] / 1024:>10.1f} MiB")
    lines.append(f"{f'RSS with {n} connected':<44}{res['rss_connected_kb'] / 1024:>10.1f} MiB")
    lines.append(f"{'RSS per connected worker':<44}{res['rss_per_worker_kb']:>11.1f} kB")
    lines.append(
        f"{'RSS after the load / peak (VmHWM)':<44}{res['rss_after_load_kb'] / 1024:>6.1f} / {res['rss_peak_kb'] / 1024:.1f} MiB"
    )
    lines.append(f"{'time to connect every worker':<44}{res['connect_s']:>12.1f} s")
    lines.append(
        f"{'control plane CPU per idle connected worker':<44}{res['idle_cp_ms_per_worker_s']:>7.3f} ms/s"
    )
    lines.append("")
    phases = res["phases"]
    names = list(phases)
    head = f"{'hand-off':<44}" + "".join(f"{x:>14}" for x in names)
    lines.append(head)

    def row(label: str, key: str, fmt: str) -> None:
        vals = []
        for x in names:
            v = phases[x].get(key)
            vals.append(format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-")
        lines.append(f"{label:<44}" + "".join(f"{v:>14}" for v in vals))

    row("inputs", "inputs", ",d")
    row("offered (inputs/s)", "offered_per_s", ",.0f")
    row("hand-off sustained (inputs/s, 10-90%)", "handoff_per_s_sustained", ",.0f")
    row("hand-off overall (inputs/s, first put-last claim)", "handoff_per_s_overall", ",.0f")
    row("map end to end (results/s)", "map_per_s", ",.0f")
    row("put -> claim p50 (ms)", "latency_p50_ms", ",.1f")
    row("put -> claim p99 (ms)", "latency_p99_ms", ",.1f")
    row("put -> claim max (ms)", "latency_max_ms", ",.1f")
    row("produced -> claim p50 (ms)", "produced_p50_ms", ",.1f")
    row("produced -> claim p99 (ms)", "produced_p99_ms", ",.1f")
    row("input batches put (POST .../inputs)", "put_requests", ",d")
    row("one batch's POST, p50 (ms)", "put_request_p50_ms", ",.1f")
    row("one batch's POST, max (ms)", "put_request_max_ms", ",.1f")
    row("control plane CPU per input (ms)", "cpu_ms_per_input_cp", ",.3f")
    row("  of it the event loop (ms)", "cpu_ms_per_input_cp_loop", ",.3f")
    row("PostgreSQL CPU per input (ms)", "cpu_ms_per_input_postgres", ",.3f")
    row("control plane ceiling, 1 core (inputs/s)", "cp_ceiling_per_s", ",.0f")
    row("claimed exactly once", "claimed_once", ",d")
    row("claimed more than once", "claimed_more_than_once", ",d")
    row("never claimed", "never_claimed", ",d")
    row("outputs received", "outputs_received", ",d")
    row("outputs wrong", "outputs_wrong", ",d")
    lines.append("")
    cpus = [res["cpu_connected_idle"], *[phases[x]["cpu"] for x in names]]
    lines.append(f"{'CPU (cores busy)':<44}" + "".join(f"{x:>14}" for x in ["idle conn.", *names]))
    for key, label in (
        ("cp_loop", "control plane: event loop (main thread)"),
        ("cp_other_threads", "control plane: other threads (DB pool, ...)"),
        ("postgres", "PostgreSQL backends of its database"),
        ("workers", "simulated workers"),
        ("callers", "callers"),
        ("machine", "whole machine (all processes)"),
        ("wall_s", "window (s)"),
    ):
        lines.append(f"{label:<44}" + "".join(f"{c[key]:>14.2f}" for c in cpus))
    if res.get("errors"):
        lines.append("")
        lines.append("errors: " + "; ".join(res["errors"]))
    for x in names:
        if phases[x]["caller_errors"]:
            lines.append(f"caller errors ({x}): " + "; ".join(phases[x]["caller_errors"]))
    return "\n".join(lines)


def _fractions(text: str) -> list[float]:
    out = [float(x) for x in text.split(",") if x.strip()]
    if any(not 0 <= x <= 1 for x in out):
        raise argparse.ArgumentTypeError("each paced fraction is between 0 and 1")
    return [x for x in out if x > 0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--callers", type=int, default=4)
    p.add_argument(
        "--inputs", type=int, default=50_000, help="inputs of the flat-out map, all callers together"
    )
    p.add_argument("--worker-procs", type=int, default=4)
    p.add_argument("--work-ms", type=float, default=0.0, help="how long each input 'runs' on a worker")
    p.add_argument(
        "--paced-fraction",
        type=_fractions,
        default=[0.1, 0.25, 0.5],
        help="paced phases, each at this fraction of the flat-out rate (comma-separated; 0: none)",
    )
    p.add_argument("--paced-s", type=float, default=10.0, help="length of the paced phase")
    p.add_argument(
        "--idle-s", type=float, default=5.0, help="CPU window with every worker connected and idle"
    )
    p.add_argument("--settle-s", type=float, default=4.0)
    p.add_argument("--quick", action="store_true", help="100 workers, 10,000 inputs: well under a minute")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--profile",
        help="write the control plane's CPU profile, all threads, here (pstats; needs yappi importable)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.workers, a.inputs, a.paced_s, a.idle_s, a.settle_s = 100, 10_000, 4.0, 3.0, 3.5
    a.worker_procs = max(1, min(a.worker_procs, a.workers))
    missing = postgres_missing()
    if missing:
        print(f"scale bench needs PostgreSQL: {missing}", file=sys.stderr)
        return 2
    res = run(a)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
