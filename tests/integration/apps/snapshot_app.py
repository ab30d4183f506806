"""Classes with and without memory snapshots; each hook notes where it ran in ``$SNAPSHOT_TEST_DIR``."""

import json
import os
import threading
import time

import cloudmodal

snap_app = cloudmodal.App("snapshot-snap")
plain_app = cloudmodal.App("snapshot-plain")
leaky_app = cloudmodal.App("snapshot-leaky")


def note(name: str, **fields: object) -> None:
    """Appends one JSON line to ``$SNAPSHOT_TEST_DIR/<name>`` (in workers and zygotes only)."""
    out = os.environ.get("SNAPSHOT_TEST_DIR")
    if out and os.environ.get("CLOUDMODAL_IS_REMOTE") == "1":
        with open(os.path.join(out, name), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


note("imports.jsonl")


@snap_app.cls(enable_memory_snapshot=True, min_containers=3, max_containers=3)
class Snapped:
    @cloudmodal.enter(snap=True)
    def warm(self) -> None:
        self.state = {"warmed_in": os.getpid(), "table": [i * i for i in range(5)]}
        note("snap_hooks.jsonl", worker=os.environ.get("CLOUDMODAL_WORKER_ID"))

    @cloudmodal.enter()
    def per_container(self) -> None:
        self.container = os.environ["CLOUDMODAL_WORKER_ID"]
        note("post_hooks.jsonl", worker=self.container, warmed_in=self.state["warmed_in"])

    @cloudmodal.method()
    def info(self, x: int) -> dict:
        return {
            "x2": 2 * x,
            "state": self.state,
            "worker": self.container,
            "pid": os.getpid(),
            "private_env": sorted(
                k for k in ("CLOUDMODAL_TOKEN", "CLOUDMODAL_SNAPSHOT_AGENT") if k in os.environ
            ),
        }


@plain_app.cls(min_containers=3, max_containers=3)
class Plain:
    @cloudmodal.enter()
    def warm(self) -> None:
        note("plain_hooks.jsonl", worker=os.environ["CLOUDMODAL_WORKER_ID"])

    @cloudmodal.method()
    def info(self, x: int) -> int:
        return 2 * x


@leaky_app.cls(enable_memory_snapshot=True)
class Leaky:
    @cloudmodal.enter(snap=True)
    def start_poller(self) -> None:
        threading.Thread(target=time.sleep, args=(3600,), name="leaky-poller", daemon=True).start()

    @cloudmodal.method()
    def ping(self) -> str:
        return "pong"
