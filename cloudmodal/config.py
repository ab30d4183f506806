"""Where cloudmodal keeps its state and how a client finds its control plane."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


def home() -> Path:
    """State directory: ``CLOUDMODAL_HOME`` or ``~/.cloudmodal``."""
    p = Path(os.environ.get("CLOUDMODAL_HOME") or Path.home() / ".cloudmodal")
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    base = os.environ.get("CLOUDMODAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "cloudmodal"
    )
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def server_file() -> Path:
    return home() / "server.json"


@dataclass(frozen=True)
class ServerRef:
    url: str
    token: str | None
    source: str  # "env" | "local-server"


def configured_server() -> ServerRef | None:
    """The control plane to use: ``CLOUDMODAL_SERVER_URL`` (+ ``CLOUDMODAL_TOKEN``), else a running
    ``cloudmodal server start``; None means "start an embedded one"."""
    url = os.environ.get("CLOUDMODAL_SERVER_URL")
    if url:
        return ServerRef(url.rstrip("/"), os.environ.get("CLOUDMODAL_TOKEN") or None, "env")
    f = server_file()
    if f.exists():
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        pid = info.get("pid")
        if pid and _alive(int(pid)):
            return ServerRef(info["url"], info.get("token"), "local-server")
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
