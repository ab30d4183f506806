"""HTTP and WebSocket routes of running containers (workers): list them, stop one, and run a shell or a command
inside one (``cloudmodal container list|exec|stop``, ``cloudmodal shell APP.FUNCTION`` or ``ta-...``). Added
to the control plane's route table by :func:`cloudmodal.server.api.build_routes`; the work is
:mod:`cloudmodal.server.svc_container`'s, which explains the design.

Clients (owner and member tokens; a member scoped to apps, for those apps' containers; never a worker's):

- ``POST /v1/containers/list``: the live containers (of an app);
- ``POST /v1/containers/{worker_id}/stop``: drain one (it finishes what it holds; the autoscaler replaces it);
- ``POST /v1/containers/{worker_id}/exec``, also a WebSocket: one operation per message — ``start`` (a
  command, or an interactive shell, with or without a PTY), then on the session it answered: ``stdin``,
  ``resize``, ``signal``, ``read`` (a long poll), ``wait`` (a long poll), ``close``.

The worker (its own ``worker:<id>`` token only, for its own id): ``/v1/workers/{worker_id}/exec/commands``
(a long poll) and ``/v1/workers/{worker_id}/exec/events`` (output, starts and exits), WebSockets both.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, StringConstraints

from cloudmodal import exception as exc
from cloudmodal.server.limits import SMALL_BODY
from cloudmodal.server.security import Identity
from cloudmodal.server.svc_container import Containers
from cloudmodal.server.svc_sandbox import MAX_BUFFERED

MiB = 1024 * 1024
MAX_ARGS = 64 * 1024  # bytes of a command line, as a sandbox's
Id = Annotated[str, StringConstraints(pattern=r"^[a-z]{1,4}-[0-9A-Za-z]{1,64}$")]
Arg = Annotated[str, StringConstraints(max_length=MAX_ARGS)]
Term = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._+-]{1,64}$")]
Size = Annotated[int, Field(ge=1, le=10000)]


class ContainerList(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    app_id: Id | None = None


class ContainerStop(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    # required, as Modal's ``--graceful``: only graceful stops are offered (see stop_container)
    graceful: bool


class ExecIO(BaseModel):
    max_body: ClassVar[int] = 2 * MiB

    op: Literal["start", "stdin", "resize", "signal", "read", "wait", "close"]
    exec_id: Id | None = None
    # start
    argv: list[Arg] = Field(default_factory=list, max_length=4096)  # none: the container's interactive shell
    pty: bool = False
    term: Term | None = None  # the client terminal's TERM, for a PTY
    rows: Size = 24
    cols: Size = 80
    # stdin
    data: Annotated[bytes, Field(max_length=MiB)] = b""
    eof: bool = False
    # signal
    signal: Annotated[int, Field(ge=1, le=64)] = 15
    # read / wait
    fd: Literal[1, 2] = 1
    offset: Annotated[int, Field(ge=0, le=2**62)] = 0
    timeout: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] = 0.0


class WorkerCommands(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    after: Annotated[int, Field(ge=0, le=2**62)] = 0
    epoch: Annotated[str, StringConstraints(max_length=64)] = ""


class WorkerEvents(BaseModel):
    max_body: ClassVar[int] = MAX_BUFFERED + 4 * MiB

    events: list[tuple[Id, Literal["P", "O", "R", "X", "F"], bytes]] = Field(max_length=100_000)


def _check_argv(argv: list[str]) -> None:
    if sum(len(a.encode()) + 1 for a in argv) > MAX_ARGS or any("\0" in a for a in argv):
        raise exc.InvalidError(f"The command's arguments total over {MAX_ARGS} bytes, or hold a NUL byte.")


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)``; ``run(fn, *args)`` runs blocking
    work off the event loop."""
    containers = Containers(cp, run)
    cp.containers = containers

    @route("POST", "/v1/containers/list", "member", body=ContainerList)
    async def list_containers(b: ContainerList, who: Identity) -> Any:
        """The running containers (workers) this token may see, of ``app_id`` if given, newest first."""
        return {"containers": await run(containers.list_running, who, b.app_id)}

    @route("POST", "/v1/containers/{worker_id}/stop", "member", body=ContainerStop)
    async def stop_container(worker_id: str, b: ContainerStop, who: Identity) -> Any:
        """Stop a container (``graceful`` must be true): it takes nothing new, finishes the inputs it holds
        (up to its function's timeout) and exits; its shells end at once. The autoscaler starts a replacement
        where the function's pool needs one."""
        if not b.graceful:
            raise exc.InvalidError(
                "Only graceful stops are offered: the container finishes the inputs it holds, then exits "
                "(send graceful=true). `cloudmodal app stop` ends a whole app at once."
            )
        await run(containers.stop, who, worker_id)
        return {"stopped": worker_id}

    @route("POST", "/v1/containers/{worker_id}/exec", "member", body=ExecIO, websocket=True)
    async def container_exec(worker_id: str, b: ExecIO, who: Identity) -> Any:
        """One operation on a shell or command in a running container (see the module's docstring)."""
        if b.op == "start":
            _check_argv(b.argv)
            spec = {"argv": b.argv, "pty": b.pty, "term": b.term, "rows": b.rows, "cols": b.cols}
            return {"exec_id": await containers.start(who, worker_id, spec)}
        if b.exec_id is None:
            raise exc.InvalidError(f"{b.op} needs the exec_id that start answered.")
        s = containers.session(who, worker_id, b.exec_id)
        if b.op == "stdin":
            if b.data:
                containers.send(s, "stdin", b.data)
            if b.eof:
                containers.send(s, "eof")
            return {}
        if b.op == "resize":
            containers.send(s, "resize", json.dumps([b.rows, b.cols]).encode())
            return {}
        if b.op == "signal":
            containers.send(s, "signal", str(b.signal).encode())
            return {}
        if b.op == "read":
            return await containers.read(s, b.fd, b.offset, b.timeout)
        if b.op == "wait":
            return await containers.wait(s, b.timeout)
        containers.close(s)  # close
        return {}

    @route("POST", "/v1/workers/{worker_id}/exec/commands", "worker", body=WorkerCommands, websocket=True)
    async def worker_exec_commands(worker_id: str, b: WorkerCommands) -> Any:
        """The worker's long poll for its exec sessions' commands (start, stdin, resize, signal, close)."""
        return await containers.worker_commands(worker_id, b.after, b.epoch)

    @route("POST", "/v1/workers/{worker_id}/exec/events", "worker", body=WorkerEvents, websocket=True)
    async def worker_exec_events(worker_id: str, b: WorkerEvents) -> Any:
        """The worker's exec sessions' output, starts and exits; answered once the streams have room."""
        await containers.worker_events(worker_id, [list(e) for e in b.events])
        return {}
