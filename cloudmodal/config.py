"""Where cloudmodal keeps its state and how a client finds its control plane."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cloudmodal._files import home, open_private, private_dir

__all__ = [
    "ServerRef",
    "cache_base",
    "cache_dir",
    "configured_server",
    "home",
    "local_server",
    "open_private",
    "private_dir",
    "server_file",
]

log = logging.getLogger("cloudmodal")


def cache_base() -> Path:
    """The cache directory's path (not created): ``CLOUDMODAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/cloudmodal``,
    else ``~/.cache/cloudmodal``."""
    from cloudmodal.settings import settings

    configured = settings().cache_dir
    if configured is not None:
        return configured
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cloudmodal"


def cache_dir() -> Path:
    base = cache_base()
    # Made private when created; a cache directory set up on purpose (shared between users) is kept as is.
    return private_dir(base, tighten=False)


def server_file() -> Path:
    return home() / "server.json"


@dataclass(frozen=True)
class ServerRef:
    url: str
    token: str | None = field(repr=False)
    source: str  # "env" | "profile:NAME" | "local-server"
    # the SHA-256 fingerprint of the only TLS certificate the control plane may present (None: CA verification)
    fingerprint: str | None = None


def configured_server() -> ServerRef | None:
    """The control plane to use: ``CLOUDMODAL_SERVER_URL`` (+ ``CLOUDMODAL_TOKEN``,
    ``CLOUDMODAL_TLS_FINGERPRINT``), else the `cloudmodal login` profile named by ``CLOUDMODAL_PROFILE`` or
    the active one, else a running ``cloudmodal server start``; None means "start an embedded one"."""
    from cloudmodal.settings import settings

    s = settings()
    if s.server_url:
        from cloudmodal.tls import env_fingerprint

        return ServerRef(s.server_url.rstrip("/"), s.token, "env", env_fingerprint())
    from cloudmodal.profiles import active_profile

    profile = active_profile()
    if profile is not None:
        return ServerRef(profile.url, profile.token, f"profile:{profile.name}", profile.fingerprint)
    return local_server()


def local_server() -> ServerRef | None:
    """This machine's running ``cloudmodal server start`` (its server.json), whatever else is configured."""
    f = server_file()
    if f.exists():
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        pid = info.get("pid")
        if pid and _alive(int(pid)):
            return ServerRef(info["url"], info.get("token"), "local-server", info.get("tls_fingerprint"))
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
