"""Payloads: arguments, results and failures, pickled with cloudpickle.

Only clients and workers unpickle. The control plane moves these bytes without ever loading them.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import cloudpickle

from cloudmodal.exception import (
    DeserializationError,
    InputCancellation,
    RemoteError,
    SerializationError,
    WorkerCrashedError,
)

PROTOCOL = 4


def serialize(obj: Any) -> bytes:
    try:
        return cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"Could not pickle {type(obj).__name__}: {exc}. Arguments and results must be picklable by "
            "cloudpickle (open files, sockets, locks and generators are not)."
        ) from exc


def deserialize(data: bytes, what: str = "payload") -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise DeserializationError(
            f"Could not unpickle the {what}: {type(exc).__name__}: {exc}. This usually means a package or "
            "module is missing, or differs in version, between the caller and the worker."
        ) from exc


def serialize_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return serialize((args, kwargs))


def failure_payload(exc: BaseException, tb: str | None = None) -> bytes:
    tb = tb if tb is not None else "".join(traceback.format_exception(exc))
    try:
        pickled_exc: Any = cloudpickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(pickled_exc)  # exceptions whose __init__ needs other args fail to round-trip
    except Exception:
        pickled_exc = None
    return cloudpickle.dumps(
        {
            "exc": pickled_exc,
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "repr": repr(exc),
            "tb": tb,
        },
        protocol=PROTOCOL,
    )


def crash_failure_payload(crashes: int) -> bytes:
    exc = WorkerCrashedError(
        f"The worker running this input died {crashes} times (killed, out of memory, or a crash in native "
        "code). The input was given up after that; worker deaths do not consume the function's Retries. "
        "Check `cloudmodal app logs` for the worker's last output."
    )
    return failure_payload(exc, tb="")


def cancelled_payload() -> bytes:
    return failure_payload(InputCancellation("The call was cancelled."), tb="")


def timeout_payload(timeout: float) -> bytes:
    from cloudmodal.exception import FunctionTimeoutError

    return failure_payload(
        FunctionTimeoutError(f"Input ran longer than the function's timeout of {timeout:g} s."), tb=""
    )


def load_failure(data: bytes) -> BaseException:
    """Rebuild the remote exception, with the remote traceback attached as a note."""
    info = deserialize(data, "remote error")
    exc: BaseException | None = None
    if info.get("exc") is not None:
        try:
            exc = pickle.loads(info["exc"])
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(f"{info.get('type')}: {info.get('repr')}")
    tb = info.get("tb") or ""
    if tb and hasattr(exc, "add_note"):
        exc.add_note("\nRemote traceback (most recent call last, from the worker):\n" + _strip_tb_header(tb))
    return exc


def _strip_tb_header(tb: str) -> str:
    return tb.replace("Traceback (most recent call last):\n", "", 1)


__all__ = [
    "serialize",
    "deserialize",
    "serialize_args",
    "failure_payload",
    "load_failure",
    "timeout_payload",
]
