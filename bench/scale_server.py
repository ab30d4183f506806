"""The control-plane process of ``bench/scale.py``: a real control plane (``ServerHandle``: uvicorn, the route
table, the reconciler) on PostgreSQL, serving on its main thread as ``cloudmodal server start`` does, so that
the main thread's CPU time is the event loop's.

Before it serves, it makes what the simulated workers need through the control plane's own Python API (there is
no HTTP route that creates workers: the reconciler makes them when it launches one): a deployed app, one
function whose pool is pinned at exactly ``--workers`` workers (``min_containers = max_containers``, so the
reconciler neither launches nor scales any down), and per worker a ``workers`` row (``ControlPlane.add_worker``)
and a ``worker:<id>`` token (``TokenStore.create``), exactly as ``Reconciler._launch`` does before it starts a
process. The reconciler's local worker budget is 0, so it never starts a real one. The rows are made once the
reconciler holds its leadership: a new leader writes off workers that never registered
(``Reconciler._adopt_orphans``).

With ``--profile FILE`` (needs ``yappi`` importable), every thread's CPU time is profiled and written to FILE
(pstats format) when it stops.

It writes ``--info`` (JSON: url, owner token, function id, worker ids and tokens), prints ``READY`` and serves
until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db-url", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--profile", default=None)
    a = p.parse_args()
    if a.profile:
        import yappi

        yappi.set_clock_type("cpu")
        yappi.start(builtins=True)

    from cloudmodal.ids import new_id
    from cloudmodal.providers.local import LocalProvider
    from cloudmodal.server.app import ServerHandle, default_settings, quiet_logs
    from cloudmodal.server.gc_tuning import ServerGC
    from cloudmodal.spec import AutoscalerSettings, FunctionSpec

    quiet_logs()
    state = Path(a.state_dir)
    settings = default_settings(state, a.db_url)
    # no standby interpreter: the local provider is never asked to launch
    provider = LocalProvider(state_dir=state / "workers", standby=False)
    handle = ServerHandle(settings, host="127.0.0.1", port=0, providers={"local": provider})
    cp = handle.cp
    # This machine's worker budget is 0: the reconciler never launches a real worker, also not in the moment
    # between the function's row and its workers' rows (the pool is full once they exist).
    handle.reconciler.max_workers = 0
    handle.reconciler.start()
    deadline = time.time() + 30
    while handle.reconciler.leadership.holding is not True:
        if time.time() > deadline:
            print("the reconciler did not take leadership of the database", file=sys.stderr)
            return 1
        time.sleep(0.02)

    app_id = new_id("ap")
    cp.apps.create_app(app_id, "scalebench", ephemeral=False)  # deployed: no client heartbeat keeps it alive
    spec = FunctionSpec(
        name="noop",
        module="scalebench",
        qualname="noop",
        autoscaler=AutoscalerSettings(min_containers=a.workers, max_containers=a.workers),
    )
    fid = cp.functions.create_function(
        {"app_id": app_id, "name": "noop", "spec": spec.to_wire(), "module": "scalebench"}
    )["function_id"]
    workers = []
    for _ in range(a.workers):
        wid = new_id("ta")
        token = cp.tokens.create(scope=f"worker:{wid}", name=wid)
        cp.workers.add_worker(wid, app_id, fid, provider="scalebench", market="", function_version=1)
        workers.append([wid, token])
    info = {
        "url": handle.url,
        "token": handle.token,
        "function_id": fid,
        "app_id": app_id,
        "workers": workers,
        "pid": os.getpid(),
    }
    fd = os.open(a.info, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    # the garbage collector tuned for serving, as `cloudmodal server start` does (ServerHandle.serve_forever)
    ServerGC().install()
    print("READY", flush=True)
    # uvicorn re-raises the SIGTERM it shut down on once it has: exit through the clean-up below instead
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        handle.server.run(sockets=[handle.sock])  # SIGTERM/SIGINT: uvicorn's graceful exit
    finally:
        handle.reconciler.stop()
        handle.cp.db.dispose()
        if a.profile:
            yappi.stop()
            yappi.get_func_stats().save(a.profile, type="pstat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
