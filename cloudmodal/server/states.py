"""The states a control plane's rows move through, named once.

Input states are stored as small integers (the hot queue statements compare them with ``<``); the others as
the strings shown by ``cloudmodal app list`` and the read APIs. ``StrEnum`` and ``IntEnum`` members compare
equal to those stored values, so rows read back as plain ``str``/``int`` match them directly.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class InputState(IntEnum):
    """An input's place in the queue: waiting for a worker, held by one under a lease, or finished."""

    PENDING = 0
    CLAIMED = 1
    DONE = 2


class WorkerState(StrEnum):
    """A worker from launch to end: booting, serving inputs, finishing what it holds, gone."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class AppState(StrEnum):
    RUNNING = "running"  # an ephemeral app while its client is connected
    DEPLOYED = "deployed"
    STOPPED = "stopped"


class FunctionState(StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"


class OutputStatus(StrEnum):
    """How an input ended (``gen_item``: one item of a generator, not an end)."""

    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    GEN_ITEM = "gen_item"
