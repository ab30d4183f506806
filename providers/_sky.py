"""SkyPilot, imported lazily (``import sky`` costs 1.5–2 s) and with its phone-home turned off.

SkyPilot is pinned (``skypilot==0.14.1`` in the ``skypilot`` extra): cloudmodal calls its provisioner layer
(``sky.provision.*``), which is internal to SkyPilot, so a new SkyPilot version is a change to review here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from cloudmodal.providers.base import CredentialsError

PINNED_VERSION = "0.14.1"
_lock = threading.Lock()


def provision() -> ModuleType:
    """``sky.provision``, imported once per process; a clear error when SkyPilot is not installed."""
    with _lock:
        os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
        try:
            import sky
            import sky.provision as sky_provision
        except ImportError as e:
            raise CredentialsError(
                "SkyPilot is not installed, and cloudmodal provisions cloud nodes through it: "
                "run `pip install 'cloudmodal[skypilot]'` (SkyPilot "
                f"{PINNED_VERSION}).",
                reason="skypilot-missing",
            ) from e
        version = getattr(sky, "__version__", "?")
        if version != PINNED_VERSION and not os.environ.get("CLOUDMODAL_ANY_SKYPILOT"):
            raise CredentialsError(
                f"SkyPilot {version} is installed but cloudmodal is built against {PINNED_VERSION}, whose "
                f"internal provisioner it calls: run `pip install skypilot=={PINNED_VERSION}` (or set "
                "CLOUDMODAL_ANY_SKYPILOT=1 to try this version anyway).",
                reason="skypilot-version",
            )
        return sky_provision


class SharedResources:
    """Stands in for SkyPilot's ``sky.adaptors.aws.resource``: a fresh boto3 resource object per call, as
    SkyPilot wants, built on one thread-safe botocore client per (service, options) instead of a new client.

    The pinned SkyPilot builds a new boto3 session client for every ``resource('ec2', ...)`` call, under a
    process-wide lock (its adaptor's ``_session_creation_lock``): 50 ms of CPU here, twice per
    ``run_instances``, so concurrent launches queue on that lock and one launch's CPU was 70 % client
    construction (``bench/launch.py``; figures in bench/README.md). Here only the first call per key (and one
    every :data:`TTL_S`, so a changed credentials file is read again) builds a client that way; the others
    instantiate the same resource class around it, which costs microseconds (the ``AWS_*`` environment is part
    of the key). botocore clients are
    thread-safe; resource objects are not, which is why each call still gets its own."""

    TTL_S = 600.0

    def __init__(self, build: Callable[..., Any]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._made: dict[tuple[Any, ...], tuple[float, type, Any]] = {}

    def __call__(self, service_name: str, **kwargs: Any) -> Any:
        # What the session resolves from the environment (endpoint, keys, profile, config files) is part
        # of the key, so a changed environment builds a new client rather than reusing one that talks to
        # another endpoint or account.
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        key = (service_name, env, *sorted(kwargs.items()))
        now = time.monotonic()
        with self._lock:
            hit = self._made.get(key)
        if hit is not None and now - hit[0] < self.TTL_S:
            return hit[1](client=hit[2])
        made = self._build(service_name, **kwargs)
        with self._lock:
            self._made[key] = (now, type(made), made.meta.client)
        return made
