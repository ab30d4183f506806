"""`cloudmodal login` profiles: which control plane this account uses, with its token and pinned certificate.

Stored in ``<CLOUDMODAL_HOME>/profiles.json`` (0600; the directory is 0700)::

    {"active": "team", "profiles": {"team": {"url": "https://cp.example.com:8765", "token": "...",
                                             "fingerprint": "ab12..."}}}

``fingerprint``: the SHA-256 fingerprint of the control plane's TLS certificate, pinned (None: the server's
certificate is verified by the system's CAs, or the URL is plain HTTP). ``CLOUDMODAL_PROFILE`` picks a profile
for one process, over the file's active one. :func:`cloudmodal.config.configured_server` consults the profile
after ``CLOUDMODAL_SERVER_URL`` and before a running ``cloudmodal server start``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudmodal.exception import InvalidError

FILE_NAME = "profiles.json"
PROFILE_ENV = "CLOUDMODAL_PROFILE"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Profile:
    name: str
    url: str
    token: str | None = field(default=None, repr=False)  # never printed
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "token": self.token, "fingerprint": self.fingerprint}


@dataclass
class Profiles:
    active: str | None
    profiles: dict[str, Profile]


def path() -> Path:
    from cloudmodal._files import home

    return home() / FILE_NAME


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidError(
            f"{name!r} is not a profile name: letters, digits, '.', '_' and '-' (up to 64, starting with a "
            "letter or digit)."
        )
    return name


def load() -> Profiles:
    """The stored profiles (none when the file does not exist)."""
    p = path()
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        return Profiles(None, {})
    except (OSError, ValueError) as e:
        raise InvalidError(f"{p} is not a readable profiles file ({e}): fix or remove it.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("profiles", {}), dict):
        raise InvalidError(f"{p} is not a profiles file (a JSON object with 'profiles'): fix or remove it.")
    out: dict[str, Profile] = {}
    for name, d in raw.get("profiles", {}).items():
        if isinstance(d, dict) and isinstance(d.get("url"), str):
            out[name] = Profile(name, d["url"], d.get("token") or None, d.get("fingerprint") or None)
    active = raw.get("active")
    return Profiles(active if isinstance(active, str) and active in out else None, out)


def save(state: Profiles) -> None:
    """Write ``state`` atomically, 0600."""
    from cloudmodal._files import open_private

    p = path()
    tmp = p.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    data = {"active": state.active, "profiles": {n: pr.to_json() for n, pr in sorted(state.profiles.items())}}
    with open_private(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, p)


def put(profile: Profile, *, activate: bool = True) -> Profiles:
    """Add or replace ``profile``; make it the active one when ``activate`` (or when it is the only one)."""
    check_name(profile.name)
    state = load()
    state.profiles[profile.name] = profile
    if activate or state.active is None:
        state.active = profile.name
    save(state)
    return state


def activate(name: str) -> Profile:
    state = load()
    if name not in state.profiles:
        raise InvalidError(_missing(name, state))
    state.active = name
    save(state)
    return state.profiles[name]


def remove(name: str) -> Profiles:
    state = load()
    if name not in state.profiles:
        raise InvalidError(_missing(name, state))
    del state.profiles[name]
    if state.active == name:
        state.active = None
    save(state)
    return state


def selected_name() -> str | None:
    """``CLOUDMODAL_PROFILE`` (as set; may name no profile)."""
    from cloudmodal.settings import settings

    value = getattr(settings(), "profile", None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def active_profile() -> Profile | None:
    """The profile to use: ``CLOUDMODAL_PROFILE``'s, else the active one; None when there is none. A
    ``CLOUDMODAL_PROFILE`` that names no profile is an error (not a silent fall-back to another server)."""
    wanted = selected_name()
    if wanted is None and not path().exists():
        return None
    state = load()
    if wanted is not None:
        if wanted not in state.profiles:
            raise InvalidError(f"{PROFILE_ENV}={wanted}: " + _missing(wanted, state))
        return state.profiles[wanted]
    return state.profiles.get(state.active) if state.active else None


def _missing(name: str, state: Profiles) -> str:
    known = ", ".join(sorted(state.profiles)) or "none yet"
    return (
        f"No profile named {name!r} (profiles: {known}). `cloudmodal login URL --profile {name}` creates it; "
        "`cloudmodal profile list` lists them."
    )
