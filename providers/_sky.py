"""SkyPilot, imported lazily (``import sky`` costs 1.5–2 s) and with its phone-home turned off.

SkyPilot is pinned (``skypilot==0.14.1`` in the ``skypilot`` extra): cloudmodal calls its provisioner layer
(``sky.provision.*``), which is internal to SkyPilot, so a new SkyPilot version is a change to review here.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType

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
