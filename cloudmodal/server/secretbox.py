"""Encryption at rest for secret values the control plane stores (a function's inline secret environment).

Values are sealed with Fernet (AES-128-CBC + HMAC-SHA256, from the ``cryptography`` package) before they
reach the database, and opened only to hand them to the workers of the function that declares them.

Where the key comes from, first match wins:

1. ``CLOUDMODAL_SECRET_KEY``: one or more Fernet keys separated by commas. The first encrypts; all decrypt,
   which is how a key is rotated: put the new key first (``new,old``), reseal what is stored
   (:meth:`SecretBox.reseal`, or simply redeploy), then drop the old key.
2. A key file: ``CLOUDMODAL_SECRET_KEY_FILE``, default ``<state_dir>/secret.key``, holding the same (one key
   per line or comma-separated). When it does not exist it is created with one new key, mode 0600,
   atomically: a control plane racing another on the same state directory ends up with the other's key.

Control planes sharing one database (several for availability, a restart overlapping the old process) must
share the key, through the environment variable or by pointing ``CLOUDMODAL_SECRET_KEY_FILE`` at one file:
a control plane with another key cannot open what the others sealed, and says so.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cloudmodal.exception import Error

log = logging.getLogger("cloudmodal.server")

KEY_ENV = "CLOUDMODAL_SECRET_KEY"
KEY_FILE_ENV = "CLOUDMODAL_SECRET_KEY_FILE"
KEY_FILE_NAME = "secret.key"
SEALED = "__sealed__"  # the one key of a sealed environment as stored: {"__sealed__": "<Fernet token>"}

_FINGERPRINT_CONTEXT = b"cloudmodal fingerprint v1"
_GENERATE_HINT = "Make a key with `python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`."


class SecretKeyError(Error):
    """The secret key is missing, malformed, or not the one that sealed what is stored."""


class SecretBox:
    """Seals and opens secret values with the control plane's key(s). Thread-safe (it holds no state but
    the keys)."""

    def __init__(self, keys: Sequence[str | bytes], *, source: str = "the given keys") -> None:
        """``keys``: Fernet keys (url-safe base64 of 32 bytes), the encrypting one first. ``source`` names
        where they came from, for error messages."""
        if not keys:
            raise SecretKeyError(f"No secret key in {source}. {_GENERATE_HINT}")
        raws = []
        for i, k in enumerate(keys):
            raw = k.encode() if isinstance(k, str) else bytes(k)
            try:  # Fernet's own check, without importing cryptography (~8 ms) before a secret needs it
                ok = len(base64.urlsafe_b64decode(raw)) == 32
            except (binascii.Error, ValueError):
                ok = False
            if ok:
                raws.append(raw)
            else:
                raise SecretKeyError(
                    f"Key #{i + 1} in {source} is not a valid Fernet key (32 url-safe base64-encoded bytes, "
                    f"44 characters). {_GENERATE_HINT}"
                )
        self.source = source
        self._keys = raws
        self._multi: Any = None  # a MultiFernet, built on first use
        # A key of its own for fingerprints, derived from the encrypting key, so a fingerprint says nothing
        # about the encryption key and the encryption key is used for one purpose only.
        first = keys[0].encode() if isinstance(keys[0], str) else bytes(keys[0])
        self._fp_key = hmac.new(first, _FINGERPRINT_CONTEXT, hashlib.sha256).digest()

    # -- where the key comes from -------------------------------------------------------------------------
    @classmethod
    def for_state_dir(cls, state_dir: Path, environ: Mapping[str, str] | None = None) -> SecretBox:
        """The control plane's box: keys from ``CLOUDMODAL_SECRET_KEY``, else from the key file
        (``CLOUDMODAL_SECRET_KEY_FILE`` or ``<state_dir>/secret.key``, created 0600 when missing)."""
        from cloudmodal.settings import settings

        s = settings(environ)
        raw = (s.secret_key or "").strip()
        if raw:
            return cls(_split_keys(raw), source=f"${KEY_ENV}")
        path = s.secret_key_file or Path(state_dir) / KEY_FILE_NAME
        return cls(load_or_create_key_file(path), source=str(path))

    @staticmethod
    def generate_key() -> str:
        """A new Fernet key (what ``Fernet.generate_key`` makes: 32 random bytes, url-safe base64)."""
        return base64.urlsafe_b64encode(os.urandom(32)).decode()

    def _fernet(self) -> Any:
        if self._multi is None:
            from cryptography.fernet import Fernet, MultiFernet

            self._multi = MultiFernet([Fernet(k) for k in self._keys])
        return self._multi

    # -- bytes --------------------------------------------------------------------------------------------
    def seal(self, data: bytes) -> str:
        return str(self._fernet().encrypt(data).decode())

    def open(self, token: str) -> bytes:
        from cryptography.fernet import InvalidToken

        try:
            return bytes(self._fernet().decrypt(token.encode() if isinstance(token, str) else token))
        except InvalidToken:
            raise SecretKeyError(
                f"A stored secret cannot be decrypted with the key(s) from {self.source}: it was sealed with "
                f"another key. Control planes sharing one database must share the key: set ${KEY_ENV} to the "
                f"same value on each (or point ${KEY_FILE_ENV} at one key file). After a rotation, keep the "
                f"old key after the new one (${KEY_ENV}=new,old) until everything is resealed."
            ) from None

    def fingerprint(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` under a key derived from the box's key (hex): for hashes over values
        that include secrets (definition hashes), so the database never holds an unkeyed hash of one, which
        could be checked against guesses."""
        return hmac.new(self._fp_key, data, hashlib.sha256).hexdigest()

    # -- environments as stored in a JSON column ----------------------------------------------------------
    def seal_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """The stored form of a secret environment: ``{"__sealed__": token}``; an empty one stays ``{}``."""
        if not env:
            return {}
        _check_env(env)
        return {SEALED: self.seal(json.dumps(dict(env), sort_keys=True, separators=(",", ":")).encode())}

    def open_env(self, stored: Mapping[str, Any] | None) -> dict[str, str]:
        """The environment from its stored form; a plaintext one (stored before sealing existed) is returned
        as it is."""
        if not stored:
            return {}
        if self.is_sealed(stored):
            data = self.open(stored[SEALED])
            try:
                env = json.loads(data)
            except ValueError:
                env = None
            if not isinstance(env, dict):
                raise SecretKeyError(
                    f"A stored secret environment decrypted to malformed data ({self.source})."
                )
            return _check_env(env)
        if SEALED in stored:
            raise SecretKeyError(
                f"A stored secret environment has {SEALED!r} beside other keys; it was not written by "
                "SecretBox.seal_env. Redeploy the function to store it again."
            )
        return _check_env(stored)

    @staticmethod
    def is_sealed(stored: object) -> bool:
        """Whether a stored environment is in sealed form (``{"__sealed__": "<token>"}``)."""
        return (
            isinstance(stored, Mapping)
            and len(stored) == 1
            and SEALED in stored
            and isinstance(stored[SEALED], str)
        )

    def reseal(self, stored: Mapping[str, Any] | None) -> dict[str, str]:
        """``stored`` sealed again with the encrypting (first) key: after a rotation, or to seal a plaintext
        one stored before sealing existed."""
        return self.seal_env(self.open_env(stored))


# Also a plain function, for callers without a box at hand.
is_sealed = SecretBox.is_sealed


def _check_env(env: Mapping[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SecretKeyError(
                f"A secret environment maps names to strings; got {type(k).__name__} -> {type(v).__name__} "
                f"for {k!r}."
            )
        out[k] = v
    return out


def _split_keys(raw: str) -> list[str]:
    return [k.strip() for k in raw.replace("\n", ",").split(",") if k.strip()]


def load_or_create_key_file(path: Path, *, wait_s: float = 5.0) -> list[str]:
    """The keys in ``path``; when it does not exist, a new key written there with mode 0600.

    Creation is atomic: the key is written to a private temporary file (``O_CREAT|O_EXCL``, 0600), then
    hard-linked to ``path``, which fails if another process got there first; this process then reads that
    one's key. A reader never sees a half-written file. Where hard links are not supported, ``path`` itself
    is created with ``O_EXCL`` and a racing reader waits (up to ``wait_s``) for its content.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        _create_key_file(path)
    deadline = time.monotonic() + wait_s
    while True:
        keys = _read_key_file(path)
        if keys or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # another process created it O_EXCL and is writing it (no-hard-link fallback)
    if not keys:
        raise SecretKeyError(
            f"The secret key file {path} is empty. Put a key in it (one per line; the first encrypts), "
            f"or delete it to have a new one made. {_GENERATE_HINT}"
        )
    return keys


def _create_key_file(path: Path) -> None:
    data = (SecretBox.generate_key() + "\n").encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process made it first: use theirs
        except OSError:
            _create_key_file_exclusive(path, data)  # a file system without hard links
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _create_key_file_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_key_file(path: Path) -> list[str]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SecretKeyError(f"The secret key file {path} disappeared while it was being read.") from None
    if st.st_mode & 0o077:
        # Readable by others: tighten it (the key may already be exposed; say so).
        try:
            os.chmod(path, 0o600)
            log.warning(
                "the secret key file %s was accessible to other users (mode %o); it is now 0600. Anyone "
                "who read it can decrypt stored secrets: consider rotating the key (see %s).",
                path,
                st.st_mode & 0o777,
                __name__,
            )
        except OSError as e:
            raise SecretKeyError(
                f"The secret key file {path} is accessible to other users (mode {st.st_mode & 0o777:o}) and "
                f"cannot be made private ({e}). Run `chmod 600 {path}` as its owner."
            ) from None
    try:
        return _split_keys(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as e:
        raise SecretKeyError(f"Cannot read the secret key file {path}: {e}.") from None


__all__ = ["KEY_ENV", "KEY_FILE_ENV", "SEALED", "SecretBox", "SecretKeyError", "is_sealed"]
