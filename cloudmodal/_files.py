"""Private state files and directories: the state directory (``CLOUDMODAL_HOME``) and files only this user may
read. Below :mod:`cloudmodal.config` and :mod:`cloudmodal.profiles`, which both keep files there."""

from __future__ import annotations

import logging
import os
import stat
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
