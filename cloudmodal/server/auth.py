"""Bearer tokens: minted once, stored as SHA-256 hashes, read back through a cache that forgets them within
seconds so a revocation reaches every control plane sharing the database (and open WebSockets, which
re-check their token on each message). Who a token's scope lets do what is :mod:`cloudmodal.server.security`."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
import time
from typing import Any

from sqlalchemy import select

from cloudmodal.exception import NotFoundError
from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.db import Database
from cloudmodal.server.security import Identity, identity_for

T = models.tokens

# How long a token's answer is trusted without reading the database again: the bound on how late a
# revocation made by another control plane takes effect here.
AUTH_CACHE_S = 2.0
# Tokens used within this long are re-validated together, off the event loop, before their entries expire
# (see TokenStore.identify); one query per REFRESH_CHUNK tokens.
RECENT_S = 30.0
REFRESH_CHUNK = 500
REFRESHER_IDLE_S = 60.0  # the re-validation thread ends after this long without work


class _NotCached:
    def __repr__(self) -> str:
        return "NOT_CACHED"


# TokenStore.identify(read=False)'s answer for a token it would have to read from the database
NOT_CACHED: Any = _NotCached()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class TokenStore:
    def __init__(self, db: Database, cache_s: float = AUTH_CACHE_S) -> None:
        self.db = db
        self.cache_s = cache_s
        # hash -> (identity, monotonic time the entry stops being trusted); unknown tokens are not cached, so a
        # token minted on another control plane works here at once
        self._cache: dict[str, tuple[Identity, float]] = {}
        self._used: dict[str, float] = {}  # hash -> monotonic time it was last presented
        self._lock = threading.Lock()
        self._refreshed_at = 0.0  # when the last re-validation started (monotonic)
        self._refreshing = False
        self._wake = threading.Event()  # wakes the re-validation thread
        self._refresher: threading.Thread | None = None
        self._forgets = 0  # bumped by every local revocation: a re-validation read before it is not applied
        self.reads = 0  # tokens read one at a time (a statistic: tests count them)

    def create_token(self, scope: str, name: str = "") -> tuple[str, str]:
        """Mint a token for ``scope``: (token id, the token). The token is shown once and never stored."""
        if identity_for(scope, "tk_check") is None:
            raise ValueError(f"invalid token scope {scope!r}")
        token = "cm_" + secrets.token_urlsafe(32)
        token_id = new_id("tk")
        with self.db.write() as conn:
            conn.execute(
                T.insert().values(
                    id=token_id,
                    name=name[:200],
                    token_hash=hash_token(token),
                    scope=scope,
                    created_at=time.time(),
                    revoked=False,
                )
            )
        return token_id, token

    def create(self, scope: str = "owner", name: str = "") -> str:
        return self.create_token(scope, name)[1]

    def identify(self, token: str, *, read: bool = True) -> Identity | None:
        """The identity a token stands for, or None for an unknown or revoked one. ``read=False``: from
        the cache only, :data:`NOT_CACHED` where the database would have to be read (the event loop's
        form: it then asks again on a thread)."""
        h = hash_token(token)
        hit = self._cache.get(h)
        now = time.monotonic()
        if now - self._refreshed_at >= self.cache_s / 2 and not self._refreshing and self._used:
            self._start_refresh(now)
        if hit is not None and hit[1] > now:
            self._used[h] = now
            return hit[0]
        if not read:
            return NOT_CACHED
        self.reads += 1
        with self.db.read() as conn:
            row = conn.execute(select(T.c.id, T.c.scope, T.c.revoked).where(T.c.token_hash == h)).first()
        who = None if row is None or row[2] else identity_for(row[1], row[0])
        with self._lock:
            if who is None:
                self._cache.pop(h, None)
            else:
                if len(self._cache) > 100_000:  # bounded: entries of tokens nobody uses any more go
                    self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                self._cache[h] = (who, now + self.cache_s)
                self._used[h] = now
        return who

    # Every token presented within RECENT_S is re-validated in one query (per REFRESH_CHUNK) every half cache
    # period, on a thread of its own, so that the tokens of a busy control plane (a worker's heartbeats come
    # every 3 s, longer than the cache keeps an entry) are answered from the cache instead of by a read on the
    # caller's thread (the event loop). An entry stays trusted until cache_s after the start of the query
    # that validated it: a revocation made anywhere takes effect here within cache_s either way. Nothing runs
    # while no token is presented; an entry the re-validation misses (it is late or failed) is read as before.
    def _start_refresh(self, now: float) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
            self._refreshed_at = now
            if self._refresher is None:
                # one thread for the store's life, woken for each re-validation: starting a thread waits
                # until it runs, which a busy process makes its caller (the event loop) wait for
                self._refresher = threading.Thread(
                    target=self._refresh_loop, name="cm-token-refresh", daemon=True
                )
                self._refresher.start()
        self._wake.set()

    def _refresh_loop(self) -> None:
        while True:
            if not self._wake.wait(REFRESHER_IDLE_S):
                with self._lock:
                    if self._wake.is_set():
                        continue
                    self._refresher = None  # idle (no token presented): the next refresh starts one again
                    return
            self._wake.clear()
            self._refresh()

    def _refresh(self) -> None:
        try:
            with self._lock:
                started = time.monotonic()
                gen = self._forgets
                cutoff = started - RECENT_S
                used = dict(self._used)  # one C-level copy: identify() records uses without the lock
                for h, t in used.items():
                    if t <= cutoff:
                        self._used.pop(h, None)
                hashes = [h for h, t in used.items() if t > cutoff and h in self._cache]
            found: dict[str, Identity | None] = {}
            for i in range(0, len(hashes), REFRESH_CHUNK):
                chunk = hashes[i : i + REFRESH_CHUNK]
                with self.db.read() as conn:
                    rows = conn.execute(
                        select(T.c.token_hash, T.c.id, T.c.scope, T.c.revoked).where(
                            T.c.token_hash.in_(chunk)
                        )
                    ).all()
                found.update({h: None for h in chunk})
                found.update({r[0]: None if r[3] else identity_for(r[2], r[1]) for r in rows})
            with self._lock:
                if gen != self._forgets:
                    return  # a token was revoked here meanwhile: these answers may predate it
                until = started + self.cache_s
                for h, who in found.items():
                    if who is None:
                        self._cache.pop(h, None)
                    elif h in self._cache:
                        self._cache[h] = (who, until)
        except Exception:
            pass  # the entries expire and are read one at a time, as without re-validation
        finally:
            self._refreshing = False

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(T.c.id, T.c.name, T.c.scope, T.c.created_at, T.c.revoked).order_by(T.c.created_at)
            ).all()
        out = []
        for tid, name, scope, created_at, revoked in rows:
            who = identity_for(scope, tid)
            out.append(
                dict(
                    id=tid,
                    name=name,
                    kind=who.kind if who else "invalid",
                    apps=sorted(who.apps) if who and who.apps is not None else None,
                    worker_id=who.worker_id if who else None,
                    created_at=created_at,
                    revoked=bool(revoked),
                )
            )
        return out

    def revoke(self, token_id: str) -> None:
        with self.db.write() as conn:
            n = conn.execute(T.update().where(T.c.id == token_id).values(revoked=True)).rowcount
        if not n:
            raise NotFoundError(f"Token {token_id!r} not found. `cloudmodal token list` shows the tokens.")
        self._forget(lambda who: who.principal == token_id)

    def revoke_scope(self, scope: str) -> None:
        with self.db.write() as conn:
            conn.execute(T.update().where(T.c.scope == scope).values(revoked=True))
        self._forget(lambda who: who.scope == scope)

    def revoke_named(self, name: str, kind: str) -> int:
        """Revoke every live token of ``kind`` called ``name`` (a restarted ``server start`` replaces its own)."""
        n = 0
        for t in self.list():
            if t["name"] == name and t["kind"] == kind and not t["revoked"]:
                self.revoke(t["id"])
                n += 1
        return n

    def _forget(self, match: Any) -> None:
        with self._lock:
            self._forgets += 1
            self._cache = {k: v for k, v in self._cache.items() if not match(v[0])}
