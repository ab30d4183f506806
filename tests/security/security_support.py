"""Helpers of the security tests: raw HTTP as one identity, the client pointed at a control plane, worker
tokens as the reconciler mints them, and waits on the database."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx
import msgpack
import sec_victim
from sqlalchemy import select
from support import client_env

from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle


def owner_token(handle: ServerHandle) -> str:
    """The owner token the control plane made at start. (A control plane from before owner tokens existed
    has none: an ``admin`` token is minted, so the suite can also be run against that code to show it fails.)"""
    token = getattr(handle, "token", None)
    return token if token else handle.cp.tokens.create("admin", "security tests")


def mint_worker_token(handle: ServerHandle, worker_id: str) -> str:
    """What the reconciler hands a worker it launches: what a compromised worker VM holds."""
    return handle.cp.tokens.create(f"worker:{worker_id}", worker_id)


def until(cond: Callable[[], Any], timeout: float = 30.0, every: float = 0.05) -> Any:
    """``cond()``'s first truthy value within ``timeout`` seconds, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


class Api:
    """Raw HTTP to a control plane as one identity (``token=None``: anonymous). Bodies are msgpack; answers
    are returned as ``httpx.Response`` so tests look at the status themselves."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params)

    def post(self, path: str, body: Any = None, **params: Any) -> httpx.Response:
        content = msgpack.packb(body if body is not None else {}, use_bin_type=True)
        return self.http.post(
            path, content=content, params=params, headers={"content-type": "application/msgpack"}
        )

    def close(self) -> None:
        self.http.close()


def decode(r: httpx.Response) -> Any:
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    return msgpack.unpackb(r.content, raw=False) if r.content else None


def as_client(url: str, token: str) -> AbstractContextManager[None]:
    """This process's cloudmodal client talks to ``url`` with ``token`` for the duration."""
    return client_env(url, token)


def make_app_function_call(owner: Api, name: str) -> tuple[str, str, str, dict[str, Any]]:
    """A deployed app ``name`` with the function ``ping`` and one call of it without inputs (nothing runs):
    (app id, function id, call id, the function's wire spec), for cases that need ids that exist."""
    app_id = new_id("ap")
    assert owner.post("/v1/apps", {"app_id": app_id, "name": name, "ephemeral": False}).status_code == 200
    spec = sec_victim.ping.spec.to_wire()
    r = owner.post("/v1/functions", {"app_id": app_id, "name": "ping", "spec": spec, "module": "sec_victim"})
    assert r.status_code == 200, r.text
    fid = decode(r)["function_id"]
    call_id = new_id("fc")
    r = owner.post("/v1/calls", {"call_id": call_id, "function_id": fid, "kind": "spawn", "inputs": []})
    assert r.status_code == 200, r.text
    return app_id, fid, call_id, spec


def live_worker_of(handle: ServerHandle, function_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """A ready worker of ``function_id`` (its row), waiting for one."""
    W = models.workers  # noqa: N806

    def find() -> dict[str, Any] | None:
        with handle.cp.db.read() as conn:
            row = conn.execute(
                select(W).where(W.c.function_id == function_id, W.c.state == "ready").limit(1)
            ).first()
        return dict(row._mapping) if row is not None else None

    row = until(find, timeout)
    assert row, f"no ready worker of {function_id} within {timeout} s"
    return row


def held_input(handle: ServerHandle, call_id: str, timeout: float = 60.0) -> tuple[int, str]:
    """(input id, worker id) of the call's input once a worker has claimed it."""
    I = models.inputs  # noqa: E741, N806

    def find() -> tuple[int, str] | None:
        with handle.cp.db.read() as conn:
            row = conn.execute(
                select(I.c.id, I.c.worker_id).where(I.c.call_id == call_id, I.c.state == 1)
            ).first()
        return (row[0], row[1]) if row is not None and row[1] else None

    got = until(find, timeout)
    assert got, f"no worker claimed the input of {call_id} within {timeout} s"
    return got
