#!/usr/bin/env python
"""Sandbox start-up latency: from ``Sandbox.create`` to the first byte of an ``echo`` exec's stdout.

A control plane (SQLite, the local provider) runs in this process; each round creates a sandbox with no command,
execs ``echo hi`` in it, reads its first byte, then terminates it (outside the timing). Reported:

  create        ``Sandbox.create(app=...)`` returns (the row, the token, the host process started)
  first byte    from before ``create`` to the exec's first stdout byte (host start, bubblewrap, the agent,
                the exec's round trip through the control plane)
  echo command  ``Sandbox.create("echo", "hi")`` to the first byte of the sandbox's own stdout

    .venv/bin/python bench/sandbox.py                 # 50 rounds
    .venv/bin/python bench/sandbox.py --rounds 200 --json out.json

Nothing here asserts a timing; this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(rounds: int) -> dict[str, list[float]]:
    from support import start_server, use_server

    import cloudmodal
    from cloudmodal.sandbox import Sandbox

    state = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    handle = start_server(state, f"sqlite:///{state / 'cloudmodal.db'}")
    out: dict[str, list[float]] = {"create": [], "first byte": [], "echo command": []}
    try:
        with use_server(handle):
            app = cloudmodal.App.lookup("bench-sandbox", create_if_missing=True)
            for i in range(rounds + 2):  # the first two warm up the client's connections
                t0 = time.perf_counter()
                sb = Sandbox.create(app=app, timeout=60)
                t1 = time.perf_counter()
                p = sb.exec("echo", "hi")
                first = p.stdout._next_chunk()
                t2 = time.perf_counter()
                assert first.startswith(b"h"), first
                sb.terminate()
                t3 = time.perf_counter()
                sb2 = Sandbox.create("echo", "hi", app=app, timeout=60)
                first = sb2.stdout._next_chunk()
                t4 = time.perf_counter()
                assert first.startswith(b"h"), first
                sb2.wait()
                if i >= 2:
                    out["create"].append(t1 - t0)
                    out["first byte"].append(t2 - t0)
                    out["echo command"].append(t4 - t3)
    finally:
        handle.stop()
    return out


def table(res: dict[str, list[float]]) -> str:
    lines = [f"{'phase':<14}{'n':>5}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}"]
    for name, xs in res.items():
        lines.append(
            f"{name:<14}{len(xs):>5}{statistics.median(xs) * 1e3:>10.1f}{pct(xs, 0.9) * 1e3:>10.1f}"
            f"{pct(xs, 0.99) * 1e3:>10.1f}{max(xs) * 1e3:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--json", help="also write the samples (seconds) here")
    args = ap.parse_args(argv)
    res = run(args.rounds)
    print(table(res))
    if args.json:
        summary: dict[str, Any] = {
            k: {"samples_s": v, "p50_s": statistics.median(v), "p99_s": pct(v, 0.99)} for k, v in res.items()
        }
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
