"""HTTP and WebSocket routes of sandboxes (``cloudmodal.Sandbox``): added to the control plane's route table by
:func:`cloudmodal.server.api.build_routes`; the work is :mod:`cloudmodal.server.svc_sandbox`'s.

Clients (owner and member tokens; a member scoped to apps, for those apps' sandboxes):

- ``POST /v1/sandboxes``: create one; ``POST /v1/sandboxes/list``: the running ones (of an app, with tags);
  ``POST /v1/sandboxes/lookup``: the running one of that name in an app (``Sandbox.from_name``);
  ``GET /v1/sandboxes/{id}``: its row; ``POST /v1/sandboxes/{id}/terminate``; ``POST /v1/sandboxes/{id}/tags``.
- ``POST /v1/sandboxes/{id}/io``, also a WebSocket: one operation per message (``exec``, ``stdin``, ``read``
  (a long poll), ``wait`` (a long poll), ``poll``).

The sandbox's host (its ``sandbox:<id>`` token only): ``/v1/sandboxes/{id}/host/commands`` (a long poll) and
``/v1/sandboxes/{id}/host/events`` (output and exits), WebSockets both.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, StringConstraints

from cloudmodal import exception as exc
from cloudmodal.server.limits import SMALL_BODY
from cloudmodal.server.security import Identity
from cloudmodal.server.svc_sandbox import MAX_BUFFERED, Sandboxes

MiB = 1024 * 1024
MAX_ARGS = 64 * 1024  # bytes of a command line, as Modal's ARG_MAX check
Id = Annotated[str, StringConstraints(pattern=r"^[a-z]{1,4}-[0-9A-Za-z]{1,64}$")]
Path = Annotated[str, StringConstraints(pattern=r"^/[^\x00]{0,1023}$")]
EnvKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")]
Arg = Annotated[str, StringConstraints(max_length=MAX_ARGS)]
Tag = Annotated[str, StringConstraints(max_length=256)]
SandboxName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
SecretName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class VolumeMount(BaseModel):
    """A volume mounted in a sandbox: ``ref`` (its name, or ``vo-…`` id), at ``path``."""

    path: Path
    ref: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    read_only: bool = False
    sub_path: Annotated[str, StringConstraints(max_length=1024)] | None = None


def _check_argv(argv: list[str]) -> None:
    if sum(len(a.encode()) + 1 for a in argv) > MAX_ARGS or any("\0" in a for a in argv):
        raise exc.InvalidError(f"The command's arguments total over {MAX_ARGS} bytes, or hold a NUL byte.")


class SandboxCreate(BaseModel):
    max_body: ClassVar[int] = 2 * MiB

    app_id: Id
    argv: list[Arg] = Field(default_factory=list, max_length=4096)
    timeout: Annotated[int, Field(ge=1, le=86400)] = 300
    workdir: Path | None = None
    env: dict[EnvKey, Annotated[str, StringConstraints(max_length=65536)]] = Field(
        default_factory=dict, max_length=1024
    )
    cpu: Annotated[float, Field(gt=0, le=1024)] | None = None
    memory: Annotated[int, Field(ge=16, le=16 * MiB)] | None = None  # MiB
    block_network: bool = False
    tags: dict[Tag, Tag] = Field(default_factory=dict, max_length=64)
    # a GPU (or a fallback list, as a function's gpu=): the sandbox runs on a cloud node placement picks
    gpu: (
        Annotated[str, StringConstraints(max_length=64)]
        | list[Annotated[str, StringConstraints(max_length=64)]]
        | None
    ) = None
    cloud: Annotated[str, StringConstraints(max_length=32)] | None = None
    region: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    # the image's recipe (Image.to_wire()): its pip packages, env and workdir (see svc_sandbox)
    image: dict[str, Any] | None = None
    secret_names: list[SecretName] = Field(default_factory=list, max_length=64)  # named secrets, in order
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=32)
    name: SandboxName | None = None  # unique among the app's running sandboxes


class SandboxLookup(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    app_name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    name: SandboxName


class SandboxList(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    app_id: Id | None = None
    tags: dict[Tag, Tag] = Field(default_factory=dict, max_length=64)


class SandboxTags(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    tags: dict[Tag, Tag] = Field(max_length=64)


class Empty(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY


class SandboxIO(BaseModel):
    max_body: ClassVar[int] = 2 * MiB

    op: Literal["exec", "stdin", "read", "wait", "poll"]
    proc: Annotated[int, Field(ge=0, le=2**31)] = 0  # 0: the sandbox's own command
    fd: Literal[1, 2] = 1
    offset: Annotated[int, Field(ge=0, le=2**62)] = 0
    data: Annotated[bytes, Field(max_length=MiB)] = b""
    eof: bool = False
    timeout: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] = 0.0
    argv: list[Arg] | None = Field(default=None, max_length=4096)
    workdir: Path | None = None
    env: dict[EnvKey, Annotated[str, StringConstraints(max_length=65536)]] = Field(
        default_factory=dict, max_length=1024
    )
    whole: bool = False  # wait: for the sandbox (not proc)
    exec_timeout: Annotated[int, Field(ge=1, le=86400)] | None = (
        None  # exec: kill it after this (returncode -1)
    )
    secret_names: list[SecretName] = Field(default_factory=list, max_length=64)  # exec: named secrets


class HostCommands(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    after: Annotated[int, Field(ge=0, le=2**62)] = 0


class HostEvents(BaseModel):
    max_body: ClassVar[int] = MAX_BUFFERED + 4 * MiB

    events: list[tuple[Annotated[int, Field(ge=0, le=2**31)], str, bytes]] = Field(max_length=100_000)


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)``; ``run(fn, *args)`` runs blocking
    work off the event loop."""
    sandboxes = Sandboxes(cp, run)
    cp.sandboxes = sandboxes

    @route("POST", "/v1/sandboxes", "member", body=SandboxCreate)
    async def create_sandbox(b: SandboxCreate, who: Identity) -> Any:
        """Start a sandbox running ``argv`` (none: it waits for ``exec``s until its timeout) in app ``app_id``."""
        _check_argv(b.argv)
        spec = {
            "argv": b.argv,
            "timeout": b.timeout,
            "workdir": b.workdir,
            "env": b.env,
            "cpu": b.cpu,
            "memory_mib": b.memory,
            "block_network": b.block_network,
            "gpu": b.gpu,
            "cloud": b.cloud,
            "region": b.region,
            "secret_names": b.secret_names,
            "name": b.name,
        }
        mounts = [m.model_dump() for m in b.volumes]
        return {"sandbox_id": await sandboxes.create(who, b.app_id, spec, b.tags, b.image, mounts)}

    @route("POST", "/v1/sandboxes/lookup", "member", body=SandboxLookup)
    async def lookup_sandbox(b: SandboxLookup, who: Identity) -> Any:
        """The running sandbox named ``name`` of app ``app_name``."""
        return await run(sandboxes.from_name, who, b.app_name, b.name)

    @route("POST", "/v1/sandboxes/list", "member", body=SandboxList)
    async def list_sandboxes(b: SandboxList, who: Identity) -> Any:
        """The running sandboxes (of ``app_id``; with every one of ``tags``) this token may see."""
        rows = await run(sandboxes.list_running, who, b.app_id, b.tags)
        return {"sandboxes": rows}

    @route("GET", "/v1/sandboxes/{sandbox_id}", "member")
    async def get_sandbox(sandbox_id: str, who: Identity) -> Any:
        """A sandbox's row: its command, tags, state and exit code."""
        return await run(sandboxes.describe, who, sandbox_id)

    @route("POST", "/v1/sandboxes/{sandbox_id}/terminate", "member", body=Empty)
    async def terminate_sandbox(sandbox_id: str, b: Empty, who: Identity) -> Any:
        """Kill a sandbox and every process in it."""
        await run(sandboxes.describe, who, sandbox_id)  # 404 / 403 for sandboxes of any control plane
        live = sandboxes.live.get(sandbox_id)
        if live is not None:
            sandboxes.terminate(live)
        return {"terminated": sandbox_id}

    @route("POST", "/v1/sandboxes/{sandbox_id}/tags", "member", body=SandboxTags)
    async def tag_sandbox(sandbox_id: str, b: SandboxTags, who: Identity) -> Any:
        """Replace a sandbox's tags."""
        await run(sandboxes.describe, who, sandbox_id)
        live = sandboxes.live.get(sandbox_id)
        if live is None:
            raise exc.NotFoundError(f"Sandbox {sandbox_id} is not running on this control plane.")
        await sandboxes.set_tags(live, b.tags)
        return {"tags": b.tags}

    @route("POST", "/v1/sandboxes/{sandbox_id}/io", "member", body=SandboxIO, websocket=True)
    async def sandbox_io(sandbox_id: str, b: SandboxIO, who: Identity) -> Any:
        """One operation on a running sandbox's processes (see the module's docstring)."""
        live = sandboxes.get(who, sandbox_id)
        if b.op == "exec":
            if not b.argv:
                raise exc.InvalidError("exec needs a command.")
            _check_argv(b.argv)
            env = b.env
            if b.secret_names:  # resolved here, for this exec only
                env = await run(sandboxes.named_secrets, who, b.secret_names) | env
            return {"proc": sandboxes.exec(live, b.argv, b.workdir, env, b.exec_timeout)}
        if b.proc == 0 and 0 not in live.procs and b.op in ("stdin", "read"):
            # a sandbox made without a command: its own streams are empty and closed
            return {} if b.op == "stdin" else {"data": b"", "offset": 0, "eof": True}
        if b.op == "stdin":
            p = sandboxes.proc(live, b.proc)
            if p.returncode is None and live.state == "running":
                if b.data:
                    live.command("I", b.proc, b.data)
                if b.eof:
                    live.command("E", b.proc)
            return {}
        if b.op == "read":
            return await sandboxes.read(live, b.proc, b.fd, b.offset, b.timeout)
        if b.op == "wait":
            code = await sandboxes.wait(live, None if b.whole else b.proc, b.timeout)
            return {"returncode": code, "state": live.state, "message": live.message}
        # poll
        code = live.returncode if b.whole else sandboxes.proc(live, b.proc).returncode
        return {"returncode": code, "state": live.state, "message": live.message}

    @route("POST", "/v1/sandboxes/{sandbox_id}/host/commands", "sandbox", body=HostCommands, websocket=True)
    async def host_commands(sandbox_id: str, b: HostCommands, who: Identity) -> Any:
        """The host's long poll for what to do: start processes, their stdin, signals, terminate."""
        return await sandboxes.host_commands(sandboxes.host_live(who, sandbox_id), b.after)

    @route("POST", "/v1/sandboxes/{sandbox_id}/host/events", "sandbox", body=HostEvents, websocket=True)
    async def host_events(sandbox_id: str, b: HostEvents, who: Identity) -> Any:
        """The host's output and exits; answered once the streams have room for more."""
        await sandboxes.host_events(sandboxes.host_live(who, sandbox_id), [list(e) for e in b.events])
        return {}
