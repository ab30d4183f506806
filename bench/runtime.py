#!/usr/bin/env python
"""cloudmodal's runtime against Ray (local, 2 CPUs), multiprocessing.Pool(2) and ProcessPoolExecutor(2).

Scenarios (all measured in one run, on this machine):

  cold        a fresh process from launch to the first result of a trivial function (median of N runs)
  roundtrip   warm ``.remote()`` round trip, p50/p99 over many calls after a warm-up
  map         ``.map`` throughput over 10,000 and 100,000 no-op inputs, with the driver's peak RSS
  concurrent  a 1,000-input map of 10 ms sleeps (cloudmodal: ``@concurrent(max_inputs=100)``)
  bigarg      a 10 MB ``bytes`` argument that the function returns: seconds per round trip

Every system (and every variant of one) runs each scenario in its own fresh subprocess, so one system's
threads and memory never skew another's. cloudmodal runs with an embedded control plane (the default of
``cloudmodal run`` with no server configured) in a throwaway ``CLOUDMODAL_HOME``.

    .venv-ray/bin/python bench/runtime.py                   # everything (several minutes)
    .venv-ray/bin/python bench/runtime.py --quick           # small sizes: a sanity run
    .venv-ray/bin/python bench/runtime.py --only map --json /tmp/runtime.json

No timing here is asserted anywhere; this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
ROOT = HERE.parent

SCENARIOS = ("cold", "roundtrip", "map", "concurrent", "bigarg")
LABEL = {
    "cloudmodal": "cloudmodal",
    "cloudmodal-cli": "cloudmodal run",
    "cloudmodal-script": "cloudmodal script",
    "cloudmodal-server": "cloudmodal (own CP)",
    "ray": "Ray",
    "pool": "Pool(2)",
    "ppe": "PPE(2)",
}
LEGEND = (
    "cloudmodal: embedded control plane in the client process (what `cloudmodal run` does with no server); "
    "cloudmodal (own CP): the control plane in a separate process (`cloudmodal server start`), so the driver is "
    "client only. Ray: ray.init(num_cpus=2). Pool(2): multiprocessing.Pool(2). PPE(2): "
    "concurrent.futures.ProcessPoolExecutor(2)."
)
PEERS = ("ray", "pool", "ppe")
CHUNKSIZE = 500  # the "sensible" chunksize for Pool/PPE maps (the other variant uses each API's default)


def params_for(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(
            cold_runs=2,
            rt_warmup=20,
            rt_calls=100,
            map_warmup=500,
            map_sizes=[2_000, 10_000],
            conc_n=300,
            big_mb=10,
            big_reps=3,
        )
    return dict(
        cold_runs=5,
        rt_warmup=50,
        rt_calls=500,
        map_warmup=2_000,
        map_sizes=[10_000, 100_000],
        conc_n=1_000,
        big_mb=10,
        big_reps=10,
    )


# ===================================================================================================
# measuring helpers (used by the children)
# ===================================================================================================
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size from /proc (no psutil needed); 0 where unavailable."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Sampler:
    """Samples this process's RSS (every 20 ms) and its process tree's (every 250 ms, with psutil) in a
    thread; reports the peaks and the tree's CPU seconds over the sampled interval."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.peak = 0
        self.tree_peak = 0
        self.tree_procs = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        try:
            import psutil

            self._ps = psutil.Process()
        except ImportError:
            self._ps = None

    def _tree(self) -> list[Any]:
        if self._ps is None:
            return []
        try:
            return self._ps.children(recursive=True)
        except Exception:
            return []

    def _cpu(self) -> tuple[float, float]:
        """(this process, its live descendants) user+system CPU seconds."""
        own = sum(os.times()[:2])
        kids = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                kids += t.user + t.system
            except Exception:
                pass
        return own, kids

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            r = rss_bytes()
            self.peak = max(self.peak, r)
            if n % 12 == 0 and self._ps is not None:
                total, procs = r, 0
                for p in self._tree():
                    try:
                        total += p.memory_info().rss
                        procs += 1
                    except Exception:
                        pass
                self.tree_peak = max(self.tree_peak, total)
                self.tree_procs = max(self.tree_procs, procs)
            n += 1
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self.before = rss_bytes()
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        own, kids = self._cpu()
        self.cpu_driver = own - self._cpu0[0]
        self.cpu_children = max(kids - self._cpu0[1], 0.0)
        self.peak = max(self.peak, rss_bytes())

    def as_dict(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "rss_before_mb": round(self.before / mb, 1),
            "rss_peak_mb": round(self.peak / mb, 1),
            "tree_rss_peak_mb": round(self.tree_peak / mb, 1) if self._ps is not None else None,
            "tree_procs": self.tree_procs if self._ps is not None else None,
            "cpu_driver_s": round(self.cpu_driver, 2),
            "cpu_children_s": round(self.cpu_children, 2) if self._ps is not None else None,
        }


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ===================================================================================================
# drivers: one per system, all with the same three operations
# ===================================================================================================
class CloudmodalDriver:
    """``with run_app(app)`` around the scenario; ``variant="server"`` talks to a control plane started as a
    separate process (``cloudmodal server start --foreground``) instead of the embedded one."""

    def __init__(self, variant: str | None) -> None:
        self.variant = variant
        self._server: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CloudmodalDriver:
        if self.variant == "server":
            self._start_server()
        import cm_app

        from cloudmodal.client.session import run_app

        self.mod = cm_app
        self._ctx = run_app(cm_app.app)
        self._ctx.__enter__()
        return self

    def _start_server(self) -> None:
        home = Path(tempfile.mkdtemp(prefix="cm-server-home-", dir=os.environ.get("CLOUDMODAL_HOME")))
        env = dict(os.environ, CLOUDMODAL_HOME=str(home))
        self._server = subprocess.Popen(
            [sys.executable, "-m", "cloudmodal.cli.main", "server", "start", "--foreground", "--port", "0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(home / "server.log", "wb"),
            start_new_session=True,
        )
        deadline = time.time() + 60
        info_file = home / "server.json"
        while not info_file.exists():
            if time.time() > deadline or self._server.poll() is not None:
                raise RuntimeError(f"control plane did not start; see {home / 'server.log'}")
            time.sleep(0.05)
        info = json.loads(info_file.read_text())
        os.environ["CLOUDMODAL_SERVER_URL"] = info["url"]
        os.environ["CLOUDMODAL_TOKEN"] = info["token"]

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(None, None, None)
        if self._server is not None:
            self._server.send_signal(signal.SIGTERM)
            try:
                self._server.wait(30)
            except subprocess.TimeoutExpired:
                self._server.kill()

    def call(self, fn: str, x: Any) -> Any:
        return getattr(self.mod, fn).remote(x)

    def map(self, fn: str, n: int) -> Any:
        return getattr(self.mod, fn).map(range(n))


class RayDriver:
    """Local Ray with 2 CPUs. Maps are the usual ``ray.get([f.remote(i) for i in ...])``; the concurrent
    scenario uses a threaded actor with ``max_concurrency=100`` (Ray's counterpart of ``@concurrent``)."""

    def __init__(self, variant: str | None) -> None:
        self.variant = variant

    def __enter__(self) -> RayDriver:
        import ray

        self.ray = ray
        ray.init(num_cpus=2)

        @ray.remote
        def noop(x: Any) -> Any:
            return x

        @ray.remote
        def echo(b: Any) -> Any:
            return b

        @ray.remote(max_concurrency=100)
        class Sleeper:
            def sleep10(self, x: Any) -> Any:
                time.sleep(0.01)
                return x

        self.fns = {"noop": noop, "echo": echo}
        self._sleeper_cls = Sleeper
        self._sleeper: Any = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ray.shutdown()

    def call(self, fn: str, x: Any) -> Any:
        return self.ray.get(self.fns[fn].remote(x))

    def map(self, fn: str, n: int) -> Any:
        if fn == "sleep10":
            if self._sleeper is None:
                self._sleeper = self._sleeper_cls.remote()
            return self.ray.get([self._sleeper.sleep10.remote(i) for i in range(n)])
        f = self.fns[fn]
        return self.ray.get([f.remote(i) for i in range(n)])


class PoolDriver:
    """``multiprocessing.Pool(2)``: ``apply`` for a round trip, ``map`` (variant ``default``: the automatic
    chunksize; ``chunk``: chunksize=CHUNKSIZE)."""

    def __init__(self, variant: str | None) -> None:
        self.variant = variant

    def __enter__(self) -> PoolDriver:
        import multiprocessing

        import plain

        self.plain = plain
        self.pool = multiprocessing.Pool(2)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.close()
        self.pool.join()

    def call(self, fn: str, x: Any) -> Any:
        return self.pool.apply(getattr(self.plain, fn), (x,))

    def map(self, fn: str, n: int) -> Any:
        f = getattr(self.plain, fn)
        if self.variant == "chunk":
            return self.pool.map(f, range(n), chunksize=CHUNKSIZE)
        return self.pool.map(f, range(n))


class PPEDriver:
    """``ProcessPoolExecutor(2)``: ``submit().result()`` for a round trip, ``map`` (variant ``default``:
    chunksize=1, the API's default; ``chunk``: chunksize=CHUNKSIZE)."""

    def __init__(self, variant: str | None) -> None:
        self.variant = variant

    def __enter__(self) -> PPEDriver:
        from concurrent.futures import ProcessPoolExecutor

        import plain

        self.plain = plain
        self.ex = ProcessPoolExecutor(2)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ex.shutdown()

    def call(self, fn: str, x: Any) -> Any:
        return self.ex.submit(getattr(self.plain, fn), x).result()

    def map(self, fn: str, n: int) -> Any:
        f = getattr(self.plain, fn)
        return self.ex.map(f, range(n), chunksize=CHUNKSIZE if self.variant == "chunk" else 1)


DRIVERS = {"cloudmodal": CloudmodalDriver, "ray": RayDriver, "pool": PoolDriver, "ppe": PPEDriver}


# ===================================================================================================
# scenarios (run inside a child, against one driver)
# ===================================================================================================
def sc_roundtrip(d: Any, p: dict[str, Any]) -> dict[str, Any]:
    for i in range(p["rt_warmup"]):
        assert d.call("noop", i) == i
    lat = []
    for i in range(p["rt_calls"]):
        t0 = time.perf_counter()
        r = d.call("noop", i)
        lat.append(time.perf_counter() - t0)
        assert r == i
    ms = [x * 1000 for x in lat]
    return {
        "calls": len(ms),
        "p50_ms": pct(ms, 0.5),
        "p99_ms": pct(ms, 0.99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def _timed_map(d: Any, fn: str, n: int) -> tuple[float, Sampler]:
    gc.collect()
    with Sampler() as s:
        t0 = time.perf_counter()
        count = 0
        total = 0
        for r in d.map(fn, n):
            count += 1
            total += r
        dt = time.perf_counter() - t0
    assert count == n, f"{count} results for {n} inputs"
    assert total == n * (n - 1) // 2, "wrong results"
    return dt, s


def sc_map(d: Any, p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    list(d.map("noop", p["map_warmup"]))  # workers up and warm
    out["warmup"] = {"inputs": p["map_warmup"], "seconds": time.perf_counter() - t0}
    for n in p["map_sizes"]:
        dt, s = _timed_map(d, "noop", n)
        out[str(n)] = {"inputs": n, "seconds": dt, "inputs_per_s": n / dt} | s.as_dict()
    return out


def sc_concurrent(d: Any, p: dict[str, Any]) -> dict[str, Any]:
    n = p["conc_n"]
    first, s1 = _timed_map(d, "sleep10", n)  # includes scale-up (workers / the actor starting)
    warm, s2 = _timed_map(d, "sleep10", n)
    return {
        "inputs": n,
        "first_s": first,
        "warm_s": warm,
        "warm_inputs_per_s": n / warm,
        "procs_first": s1.as_dict()["tree_procs"],
        "procs_warm": s2.as_dict()["tree_procs"],
    }


def sc_bigarg(d: Any, p: dict[str, Any]) -> dict[str, Any]:
    payload = os.urandom(p["big_mb"] * 1_000_000)
    assert d.call("echo", payload) == payload  # warm-up (and correctness)
    times = []
    for _ in range(p["big_reps"]):
        t0 = time.perf_counter()
        r = d.call("echo", payload)
        times.append(time.perf_counter() - t0)
        assert len(r) == len(payload)
    med = statistics.median(times)
    return {
        "mb": p["big_mb"],
        "reps": len(times),
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "mb_per_s": 2 * p["big_mb"] / med,
    }


SCENARIO_FUNCS = {"roundtrip": sc_roundtrip, "map": sc_map, "concurrent": sc_concurrent, "bigarg": sc_bigarg}


def child_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(APPS))
    p = json.loads(args.params)
    with DRIVERS[args.child](args.variant) as d:
        res = SCENARIO_FUNCS[args.scenario](d, p)
    Path(args.out).write_text(json.dumps(res))
    return 0


# ===================================================================================================
# the parent: launches children, measures cold starts, prints tables
# ===================================================================================================
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = params_for(args.quick)
        self.tmp = Path(tempfile.mkdtemp(prefix="cloudmodal-bench-"))
        # PYTHONDONTWRITEBYTECODE (set on some CI and sandbox machines) would have every cold start compile an
        # editable install's sources while the peers load their installed bytecode: dropped, so the untimed
        # first run of each system writes the caches a user's machine has.
        drop = ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN", "PYTHONDONTWRITEBYTECODE")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["CLOUDMODAL_HOME"] = str(self.tmp / "home")
        env["CLOUDMODAL_CACHE_DIR"] = str(self.tmp / "cache")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.env = env
        from rich.console import Console

        self.console = Console(width=None if sys.stdout.isatty() else 160)
        self.available = {"cloudmodal": _has("cloudmodal"), "ray": _has("ray"), "pool": True, "ppe": True}
        wanted = set(args.systems.split(",")) if args.systems else {"cloudmodal", *PEERS}
        self.systems = [s for s in ("cloudmodal", *PEERS) if s in wanted]
        self.results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "versions": _versions(),
            },
            "params": self.p,
            "quick": args.quick,
            "scenarios": {},
        }

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def usable(self, system: str) -> bool:
        if system not in self.systems:
            return False
        if not self.available[system]:
            return False
        return True

    def say_skips(self) -> None:
        for s in self.systems:
            if not self.available[s]:
                self.console.print(
                    f"[yellow]skipping {LABEL[s]}: `{s}` is not installed in {sys.executable}[/]"
                )

    # -- children ---------------------------------------------------------------------------------------
    def child(
        self, system: str, scenario: str, variant: str | None = None, timeout: float = 1800
    ) -> dict[str, Any]:
        out = self.tmp / f"{system}-{variant}-{scenario}.json"
        log = self.tmp / f"{system}-{variant}-{scenario}.log"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            system,
            "--scenario",
            scenario,
            "--params",
            json.dumps(self.p),
            "--out",
            str(out),
        ]
        if variant:
            cmd += ["--variant", variant]
        label = _label(f"{system}:{variant}" if variant else system)
        self.console.print(f"  [dim]{scenario}: {label} …[/]", end="")
        t0 = time.perf_counter()
        with open(log, "wb") as lf:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=lf, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = None
        _kill_group(proc)  # stragglers of the child (e.g. Ray's raylet) must not outlive it
        self.console.print(f"[dim] {time.perf_counter() - t0:.1f} s[/]")
        if rc != 0 or not out.exists():
            tail = log.read_text(errors="replace")[-3000:]
            why = "timed out" if rc is None else f"exit code {rc}"
            self.console.print(f"[red]{label} {scenario} failed ({why}):[/]")
            self.console.print(tail, markup=False, highlight=False)
            return {"error": why, "log_tail": tail}
        return json.loads(out.read_text())

    # -- scenarios --------------------------------------------------------------------------------------
    def run_cold(self) -> None:
        runs = self.p["cold_runs"]
        cli = Path(sys.executable).with_name("cloudmodal")
        cmds: dict[str, list[str]] = {}
        if self.usable("cloudmodal"):
            cm_cli = [str(cli)] if cli.exists() else [sys.executable, "-m", "cloudmodal.cli.main"]
            cmds["cloudmodal-cli"] = cm_cli + ["run", str(APPS / "cold_cloudmodal.py")]
            cmds["cloudmodal-script"] = [sys.executable, str(APPS / "cold_cloudmodal.py")]
        if self.usable("ray"):
            cmds["ray"] = [sys.executable, str(APPS / "cold_ray.py")]
        for s in ("pool", "ppe"):
            if self.usable(s):
                cmds[s] = [sys.executable, str(APPS / f"cold_{s}.py")]
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        errors: dict[str, str] = {}
        # One untimed run each (the OS's page cache warm, as on any developer machine), then `runs` rounds,
        # interleaved so that drift in the machine's load spreads over every system.
        for rnd in range(runs + 1):
            for key, cmd in cmds.items():
                if key in errors:
                    continue
                self.console.print(
                    f"  [dim]cold: {LABEL[key]} run {rnd}/{runs}{' (untimed)' if rnd == 0 else ''} …[/]",
                    end="",
                )
                first, total, err = self._cold_once(cmd, key)
                self.console.print(f"[dim] {first if first is not None else float('nan'):.2f} s[/]")
                if err:
                    errors[key] = err
                    self.console.print(f"[red]{LABEL[key]} cold start failed:[/]")
                    self.console.print(err, markup=False, highlight=False)
                elif rnd > 0:
                    samples[key].append((first, total))  # type: ignore[arg-type]
        res: dict[str, Any] = {}
        for key, xs in samples.items():
            if key in errors:
                res[key] = {"error": errors[key]}
                continue
            firsts = [a for a, _ in xs]
            res[key] = {
                "runs": len(xs),
                "first_median_s": statistics.median(firsts),
                "first_min_s": min(firsts),
                "first_max_s": max(firsts),
                "exit_median_s": statistics.median([b for _, b in xs]),
                "firsts": firsts,
            }
        self.results["scenarios"]["cold"] = res
        self.table_cold(res)

    def _cold_once(self, cmd: list[str], key: str) -> tuple[float | None, float | None, str | None]:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(ROOT),
            start_new_session=True,
        )
        assert proc.stdout is not None
        first = None
        lines: list[str] = []
        deadline = t0 + 120
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                lines.append(line)
                if first is None and line.startswith("FIRST_RESULT"):
                    first = time.perf_counter() - t0
                if time.perf_counter() > deadline:
                    break
            rc = proc.wait(max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            rc = None
        total = time.perf_counter() - t0
        _kill_group(proc)
        if first is None or rc != 0:
            return first, total, f"exit code {rc}, output:\n{''.join(lines)[-3000:]}"
        return first, total, None

    def run_warm(self, scenario: str) -> None:
        res: dict[str, Any] = {}
        for s in self.systems:
            if not self.usable(s):
                continue
            if scenario == "map" and s in ("pool", "ppe"):
                res[f"{s}:default"] = self.child(s, scenario, "default")
                res[f"{s}:chunk"] = self.child(s, scenario, "chunk")
            else:
                res[s] = self.child(s, scenario)
            if s == "cloudmodal" and scenario in ("roundtrip", "map") and self.args.cm_server:
                res["cloudmodal-server"] = self.child(s, scenario, "server")
        self.results["scenarios"][scenario] = res
        getattr(self, f"table_{scenario}")(res)

    # -- tables -----------------------------------------------------------------------------------------
    def _table(self, title: str, cols: list[str]) -> Any:
        from rich.table import Table

        t = Table(title=title, title_justify="left", title_style="bold")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        return t

    def table_cold(self, res: dict[str, Any]) -> None:
        ref = res.get("cloudmodal-cli", {}).get("first_median_s")
        t = self._table(
            f"Cold start: launch → first result (median of {self.p['cold_runs']} fresh processes)",
            ["system", "first result (median)", "min – max", "process exit (median)", "cloudmodal CLI vs it"],
        )
        for key, r in res.items():
            if "error" in r:
                t.add_row(LABEL[key], "[red]failed[/]", "", "", "")
                continue
            t.add_row(
                LABEL[key],
                f"{r['first_median_s']:.2f} s",
                f"{r['first_min_s']:.2f} – {r['first_max_s']:.2f} s",
                f"{r['exit_median_s']:.2f} s",
                _vs(ref, r["first_median_s"], lower_better=True) if not key.startswith("cloudmodal") else "—",
            )
        self.console.print(t)

    def table_roundtrip(self, res: dict[str, Any]) -> None:
        ref = res.get("cloudmodal", {})
        t = self._table(
            f"Warm round trip: {self.p['rt_calls']} sequential calls after {self.p['rt_warmup']} warm-up calls",
            ["system", "p50", "p99", "mean", "cloudmodal vs it (p50)", "cloudmodal vs it (p99)"],
        )
        for key, r in res.items():
            if "error" in r:
                t.add_row(_label(key), "[red]failed[/]", "", "", "", "")
                continue
            peer = not key.startswith("cloudmodal")
            t.add_row(
                _label(key),
                f"{r['p50_ms']:.2f} ms",
                f"{r['p99_ms']:.2f} ms",
                f"{r['mean_ms']:.2f} ms",
                _vs(ref.get("p50_ms"), r["p50_ms"], True) if peer else "—",
                _vs(ref.get("p99_ms"), r["p99_ms"], True) if peer else "—",
            )
        self.console.print(t)

    def table_map(self, res: dict[str, Any]) -> None:
        sizes = [str(n) for n in self.p["map_sizes"]]
        ref = res.get("cloudmodal", {})
        small, big = sizes[0], sizes[-1]
        cols = ["system"]
        for n in sizes:
            cols += [f"{int(n):,} inputs/s", "cloudmodal vs it"]
        cols += [
            f"driver RSS peak {int(small):,}",
            f"driver RSS {int(big):,} (before → peak)",
            f"tree RSS peak {int(big):,}",
            f"CPU-s {int(big):,} driver / rest",
        ]
        t = self._table(
            f"Map throughput: no-op inputs, after a {self.p['map_warmup']:,}-input warm-up map. "
            f"Pool/PPE: default chunksize (Pool.map: len/(4·procs); PPE.map: 1) and chunksize {CHUNKSIZE}",
            cols,
        )
        for key, r in res.items():
            if "error" in r:
                t.add_row(_label(key), "[red]failed[/]", *[""] * (len(cols) - 2))
                continue
            peer = not key.startswith("cloudmodal")
            row = [_label(key)]
            for n in sizes:
                row.append(f"{r[n]['inputs_per_s']:,.0f}")
                row.append(
                    _vs(ref.get(n, {}).get("inputs_per_s"), r[n]["inputs_per_s"], False) if peer else "—"
                )
            b = r[big]
            row.append(f"{r[small]['rss_peak_mb']:.0f} MB")
            row.append(f"{b['rss_before_mb']:.0f} → {b['rss_peak_mb']:.0f} MB")
            row.append(
                f"{b['tree_rss_peak_mb']:.0f} MB / {b['tree_procs'] + 1} procs"
                if b.get("tree_rss_peak_mb") is not None
                else "n/a"
            )
            row.append(
                f"{b['cpu_driver_s']:.1f} / {b['cpu_children_s']:.1f}"
                if b.get("cpu_children_s") is not None
                else f"{b['cpu_driver_s']:.1f} / n/a"
            )
            t.add_row(*row)
        self.console.print(t)

    def table_concurrent(self, res: dict[str, Any]) -> None:
        ref = res.get("cloudmodal", {})
        t = self._table(
            f"{self.p['conc_n']:,}-input map of 10 ms sleeps (cloudmodal @concurrent(max_inputs=100); "
            "Ray: threaded actor, max_concurrency=100; Pool/PPE: 2 processes, no concurrency)",
            [
                "system",
                "warm map",
                "inputs/s",
                "first map (incl. scale-up)",
                "child procs",
                "cloudmodal vs it (warm)",
            ],
        )
        for key, r in res.items():
            if "error" in r:
                t.add_row(_label(key), "[red]failed[/]", "", "", "", "")
                continue
            peer = not key.startswith("cloudmodal")
            t.add_row(
                _label(key),
                f"{r['warm_s']:.2f} s",
                f"{r['warm_inputs_per_s']:,.0f}",
                f"{r['first_s']:.2f} s",
                "n/a" if r.get("procs_warm") is None else str(r["procs_warm"]),
                _vs(ref.get("warm_s"), r["warm_s"], True) if peer else "—",
            )
        self.console.print(t)

    def table_bigarg(self, res: dict[str, Any]) -> None:
        ref = res.get("cloudmodal", {})
        t = self._table(
            f"{self.p['big_mb']} MB bytes argument, returned by the function (median of {self.p['big_reps']} round trips)",
            ["system", "s / round trip", "min – max", "MB/s (both ways)", "cloudmodal vs it"],
        )
        for key, r in res.items():
            if "error" in r:
                t.add_row(_label(key), "[red]failed[/]", "", "", "")
                continue
            peer = not key.startswith("cloudmodal")
            t.add_row(
                _label(key),
                f"{r['median_s']:.3f} s",
                f"{r['min_s']:.3f} – {r['max_s']:.3f}",
                f"{r['mb_per_s']:,.0f}",
                _vs(ref.get("median_s"), r["median_s"], True) if peer else "—",
            )
        self.console.print(t)

    def goals(self) -> None:
        """The issue's goals, checked against this run's numbers (only where both sides were measured)."""
        sc = self.results["scenarios"]
        rows: list[tuple[str, str, str]] = []
        cold = sc.get("cold", {})
        if "first_median_s" in cold.get("cloudmodal-cli", {}) and "first_median_s" in cold.get("ray", {}):
            a, b = cold["cloudmodal-cli"]["first_median_s"], cold["ray"]["first_median_s"]
            rows.append(
                ("cold start < ¼ of Ray's", f"{a:.2f} s vs {b / 4:.2f} s (Ray {b:.2f} s)", _ok(a < b / 4))
            )
            rows.append(
                (
                    "cold start ≤ 0.3 of Ray's (issue 11)",
                    f"{a / b:.2f} of Ray's ({a:.2f} s vs {b:.2f} s)",
                    _ok(a <= 0.3 * b),
                )
            )
        rt = sc.get("roundtrip", {})
        if "p50_ms" in rt.get("cloudmodal", {}) and "p50_ms" in rt.get("ray", {}):
            a, b = rt["cloudmodal"]["p50_ms"], rt["ray"]["p50_ms"]
            rows.append(("warm round trip p50 ≤ Ray's", f"{a:.2f} ms vs {b:.2f} ms", _ok(a <= b)))
        mp = sc.get("map", {})
        cm = mp.get("cloudmodal", {})
        for n in (str(x) for x in self.p["map_sizes"]):
            if n not in cm:
                continue
            a = cm[n]["inputs_per_s"]
            if n in mp.get("ray", {}):
                b = mp["ray"][n]["inputs_per_s"]
                rows.append(
                    (
                        f"map {int(n):,}: ≥ 5× Ray's inputs/s",
                        f"{a:,.0f} vs {5 * b:,.0f} (Ray {b:,.0f})",
                        _ok(a >= 5 * b),
                    )
                )
            if n in mp.get("ppe:default", {}):
                # The PPE figure (≈15,000 inputs/s) is PPE.map with its default chunksize of 1.
                b = mp["ppe:default"][n]["inputs_per_s"]
                rows.append(
                    (
                        f"map {int(n):,}: ≥ {_label('ppe:default')} inputs/s",
                        f"{a:,.0f} vs {b:,.0f}",
                        _ok(a >= b),
                    )
                )
            if n in mp.get("ppe:chunk", {}):
                b = mp["ppe:chunk"][n]["inputs_per_s"]
                rows.append(
                    (
                        f"(not a goal) map {int(n):,} vs {_label('ppe:chunk')}",
                        f"{a:,.0f} vs {b:,.0f}",
                        "[dim]info[/]",
                    )
                )
        sizes = [str(x) for x in self.p["map_sizes"]]
        if all(n in cm for n in sizes):
            small, big = cm[sizes[0]]["rss_peak_mb"], cm[sizes[-1]]["rss_peak_mb"]
            rows.append(
                (
                    f"client RSS flat ({int(sizes[0]):,} → {int(sizes[-1]):,} inputs: peak grows ≤ 20%)",
                    f"{small:.0f} MB → {big:.0f} MB",
                    _ok(big <= 1.2 * small),
                )
            )
        if not rows:
            return
        t = self._table("Goals (issues 3 and 11), on this run's numbers", ["goal", "measured", "met?"])
        for r in rows:
            t.add_row(*r)
        self.console.print(t)
        self.results["goals"] = [
            {"goal": a, "measured": b, "met": None if "info" in c else "yes" in c} for a, b, c in rows
        ]


def _label(key: str) -> str:
    base, _, variant = key.partition(":")
    if variant == "server":
        return LABEL["cloudmodal-server"]
    if variant == "chunk":
        variant = f"chunksize {CHUNKSIZE}"
    elif variant == "default":
        variant = "default chunksize"
    return LABEL[base] + (f", {variant}" if variant else "")


def _vs(cm: float | None, peer: float | None, lower_better: bool) -> str:
    """How cloudmodal compares with a peer: '3.1× faster' or '2.0× slower'."""
    if not cm or not peer:
        return ""
    ratio = (peer / cm) if lower_better else (cm / peer)
    if ratio >= 1:
        return f"[green]{ratio:.2f}× better[/]"
    return f"[red]{1 / ratio:.2f}× worse[/]"


def _ok(b: bool) -> str:
    return "[green]yes[/]" if b else "[red]no[/]"


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in ("cloudmodal", "ray", "httpx", "uvicorn", "uvloop", "httptools", "fastapi", "sqlalchemy"):
        with contextlib.suppress(PackageNotFoundError):
            out[d] = version(d)
    return out


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """End what a child left in its own session (it was started with start_new_session=True)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, for a sanity run")
    ap.add_argument(
        "--only",
        action="append",
        default=None,
        help=f"scenario(s) to run: {', '.join(SCENARIOS)} (repeatable or comma-separated)",
    )
    ap.add_argument("--systems", default=None, help="comma-separated subset of: cloudmodal,ray,pool,ppe")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every number to PATH as JSON")
    ap.add_argument(
        "--no-cm-server",
        dest="cm_server",
        action="store_false",
        help="skip the extra cloudmodal run against a separate control-plane process (roundtrip, map)",
    )
    # internal: one system's scenario in a child process
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--params", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)

    only = [s for x in (args.only or []) for s in x.split(",") if s] or list(SCENARIOS)
    bad = [s for s in only if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    bench = Bench(args)
    try:
        c = bench.console
        m = bench.results["machine"]
        c.print(
            f"[bold]bench/runtime.py[/] on {m['cpus']} CPUs, Python {m['python']}, "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
            + (" — [yellow]--quick[/]" if args.quick else "")
        )
        c.print(LEGEND, style="dim")
        bench.say_skips()
        for sc in SCENARIOS:
            if sc not in only:
                continue
            c.rule(sc)
            if sc == "cold":
                bench.run_cold()
            else:
                bench.run_warm(sc)
        bench.goals()
        if args.json:
            Path(args.json).write_text(json.dumps(bench.results, indent=2))
            c.print(f"numbers written to {args.json}")
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
