"""The dashboard's routes (``/dashboard``). Added to the control plane's route table by
:func:`cloudmodal.server.api.build_routes`."""

from __future__ import annotations

from typing import Any


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)``."""
