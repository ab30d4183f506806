"""Where cloudmodal keeps its state and how a client finds its control plane."""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("cloudmodal")


def private_dir(path: str | os.PathLike[str], *, tighten: bool = True) -> Path:
    """``path`` as a directory only this user can enter (0700), created if missing (missing parents get the
    usual mode). ``tighten``: also take group/other access away from an existing one we own; a directory of
    another user's is left as it is, with a warning."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mode is masked by the umask: check below
    if not tighten:
        return p
    try:
        st = p.stat()
        if st.st_mode & 0o077:
            if st.st_uid != os.getuid():
                log.warning(
                    "%s is accessible to other users (mode %o) and owned by another user; cloudmodal's files "
                    "in it are private, but its listing is not",
                    p,
                    stat.S_IMODE(st.st_mode),
                )
            else:
                os.chmod(p, 0o700)
    except OSError as e:
        log.warning("could not make %s private (0700): %s", p, e)
    return p


def _private_opener(path: str, flags: int) -> int:
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:  # an existing file, or a umask that let more through
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_private(path: str | os.PathLike[str], mode: str = "ab", **kwargs: Any) -> IO[Any]:
    """``open()`` for a state file only this user can read or write (0600, also when it exists)."""
    return open(path, mode, opener=_private_opener, **kwargs)


def home() -> Path:
    """State directory: ``CLOUDMODAL_HOME`` or ``~/.cloudmodal``, private to this user (0700): it holds the
    database, the secret key and the owner token."""
    from cloudmodal.settings import settings

    return private_dir(settings().home or Path.home() / ".cloudmodal")


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
