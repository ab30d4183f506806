"""``cloudmodal.Sandbox``: a command in an isolated container, with ``exec`` for more, as Modal's.

```python
app = cloudmodal.App.lookup("sandboxes", create_if_missing=True)
sb = cloudmodal.Sandbox.create("python", "-c", "print(input()[::-1])", app=app, timeout=60)
sb.stdin.write("hello\\n")
sb.stdin.drain()
print(sb.stdout.read())  # olleh
sb.wait()
p = sb.exec("ls", "/")  # only while the sandbox runs: create one with no command to keep it up
```

On the local provider a sandbox runs under bubblewrap with the current Python environment and the system's
directories read-only as its image, a private ``/tmp`` and workdir, and its own PID namespace; it sees none of the
control plane's files, the user's home, or any token. ``memory`` is a per-process address-space limit
(``RLIMIT_AS``). ``sb.open(path, mode)`` reads and writes its files.

- ``image=``: its ``pip_install``/``uv_pip_install``/``pip_install_from_requirements`` packages are installed
  into an environment built once per image on the control plane's machine (as workers' are), bound read-only
  with its ``bin`` first on ``PATH``; its ``env`` is in the sandbox's environment and its ``workdir`` is the
  default working directory. ``apt_install`` and ``run_commands`` are refused there (they need root); with
  ``gpu=`` the node's bootstrap sets the whole image up, as a worker's.
- ``volumes={"/data": vol}``: a working copy of the volume bound at the path (read-only with
  ``with_mount_options(read_only=True)``), committed when the sandbox ends (not before), as Modal's.
- ``secrets=``: inline ones and named ones (``Secret.from_name``, resolved by the control plane at create),
  in the sandbox's environment only (and its ``exec``'d processes'); ``exec(secrets=...)`` for one process.
- ``exec(timeout=)``: the process (and its process group) is killed after that many seconds; its
  ``returncode`` is then ``-1``, as Modal's.
- ``name=``: unique among the app's running sandboxes; :meth:`Sandbox.from_name` finds it.
- ``.aio`` forms of the blocking methods (``await Sandbox.create.aio(...)``, ``await p.wait.aio()``,
  ``async for line in p.stdout``).

With ``gpu=`` (a type or a fallback list, as a function's) the sandbox runs on a cloud node that placement
picks as for a function's GPU workers (``cloud=``/``region=`` narrow it; on demand), under bubblewrap there
too, its stdio relayed through the control plane; the node is deleted when the sandbox ends, and its time is
in the cost ledger (function ``sandbox`` of its app). Its ``timeout`` counts from the node's start.

Not yet: ``cpu=`` (refused), ``volumes`` on a cloud node, tunnels and snapshots. A sandbox is served by the
control plane that started it: reached through another control plane on the same database it is listed but
not attached to.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cloudmodal import exception as exc
from cloudmodal.container_process import (
    POLL_S,
    ContainerProcess,
    StreamReader,
    StreamWriter,
    _Link,
    blocking,
    static_blocking,
)

DEFAULT_TIMEOUT_S = 300  # Modal's default lifetime
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# Modal's names, from the error tree (``from cloudmodal.exception import SandboxTimeoutError`` works too)
SandboxTimeoutError = exc.SandboxTimeoutError
SandboxTerminatedError = exc.SandboxTerminatedError


def _transport() -> Any:
    from cloudmodal.client.session import current_session

    return current_session().transport


def _env(
    env: Mapping[str, str | None] | None, secrets: Sequence[Any] | None
) -> tuple[dict[str, str], list[str]]:
    """The sandbox's environment from the client (inline secrets' values, then ``env``) and the named
    secrets' names (resolved by the control plane, before these)."""
    from cloudmodal.secret import Secret

    out: dict[str, str] = {}
    names: list[str] = []
    if isinstance(secrets, Secret):
        raise exc.InvalidError("secrets= expects a list of cloudmodal.Secret, e.g. secrets=[s].")
    for s in secrets or ():
        if not isinstance(s, Secret):
            raise exc.InvalidError(f"secrets=: {s!r} is not a cloudmodal.Secret.")
        values = s._values
        if values is None:
            if s.name is not None and s.name not in names:
                names.append(s.name)
            continue
        out.update(values)
    for k, v in (env or {}).items():
        if v is not None:
            out[str(k)] = str(v)
    return out, names


def _volumes(volumes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``volumes={path: Volume}`` as the control plane takes it."""
    from cloudmodal.volume import Volume

    out = []
    for path, vol in (volumes or {}).items():
        p = str(path)
        if not isinstance(vol, Volume):
            raise exc.InvalidError(
                f"Sandbox.create(volumes=...): {p!r} maps to {type(vol).__name__}; sandboxes mount "
                "cloudmodal.Volume (e.g. cloudmodal.Volume.from_name('data', create_if_missing=True))."
            )
        if not p.startswith("/"):
            raise exc.InvalidError(
                f"Sandbox.create(volumes=...): mount path {p!r} must be absolute, e.g. '/data'."
            )
        out.append({"path": p, "ref": vol._mount_ref(), "read_only": vol.read_only, "sub_path": vol.sub_path})
    return out


_LOCAL_IMAGE_OPS = {"pip_install", "uv_pip_install", "pip_install_requirements", "env", "workdir"}
_NODE_IMAGE_OPS = _LOCAL_IMAGE_OPS | {"apt_install", "run_commands", "run_function"}


def _image(image: Any, on_node: bool) -> dict[str, Any] | None:
    """The image's recipe for the control plane (None: the default image), or the reason it cannot be a
    sandbox's image where the sandbox runs."""
    if image is None:
        return None
    from cloudmodal.image import Image

    if not isinstance(image, Image):
        raise exc.InvalidError(
            f"Sandbox.create(image=...): expected a cloudmodal.Image, got {type(image).__name__}."
        )
    if not image.layers:
        return None
    allowed = _NODE_IMAGE_OPS if on_node else _LOCAL_IMAGE_OPS
    bad = list(dict.fromkeys(layer["op"] for layer in image.layers if layer["op"] not in allowed))
    if bad:
        if on_node:
            why = (
                "a sandbox on a cloud node takes pip/uv installs, apt_install, run_commands, env and workdir"
            )
        else:
            why = (
                "a sandbox on the control plane's machine takes pip_install, uv_pip_install, "
                "pip_install_from_requirements, env and workdir; apt_install and run_commands need root there "
                "(with gpu=, on a cloud node, they work)"
            )
        raise exc.InvalidError(
            f"Sandbox.create(image=...) with {', '.join(bad)} is not supported: {why}. Remove those steps, or "
            "run that code in a function."
        )
    return image.to_wire()


class Sandbox:
    """A running (or ended) sandbox. Made by :meth:`create`, :meth:`from_id` or :meth:`list`."""

    def __init__(self, sandbox_id: str, *, has_command: bool = True) -> None:
        self.object_id = sandbox_id
        self._link = _Link(sandbox_id)
        self._returncode: int | None = None
        self._state = "running"
        self._has_command = has_command
        self.stdout = StreamReader(sandbox_id, 0, 1)
        self.stderr = StreamReader(sandbox_id, 0, 2)
        self.stdin = StreamWriter(self._link, 0)

    # -- making ------------------------------------------------------------------------------------------
    @static_blocking
    def create(
        *args: str,
        app: Any = None,
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
        image: Any = None,
        env: Mapping[str, str | None] | None = None,
        secrets: Sequence[Any] | None = None,
        timeout: int | None = DEFAULT_TIMEOUT_S,
        workdir: str | None = None,
        gpu: str | Sequence[str] | None = None,
        cpu: float | None = None,
        memory: int | None = None,
        block_network: bool = False,
        volumes: Mapping[str, Any] | None = None,
        client: Any = None,
        environment_name: str | None = None,
        cloud: str | None = None,
        region: str | Sequence[str] | None = None,
    ) -> Sandbox:
        """Start ``args`` (none: the sandbox waits for ``exec``s until its ``timeout``) in a sandbox of
        ``app`` (``App.lookup(name, create_if_missing=True)``, or an app while it runs). ``memory`` in MiB."""
        app_id = getattr(app, "app_id", None)
        if app_id is None:
            raise exc.InvalidError(
                "Sandbox.create needs app=: an app while it runs (`with app.run():`) or "
                '`cloudmodal.App.lookup("NAME", create_if_missing=True)`.'
            )
        if gpu is not None:
            from cloudmodal.gpu import parse_gpu

            parse_gpu(gpu)  # a bad value fails here, with the fix
        regions = [region] if isinstance(region, str) else list(region or ())
        image_wire = _image(image, gpu is not None)
        if volumes and gpu is not None:
            raise exc.InvalidError(
                "Sandbox.create(volumes=...) with gpu=: volumes are mounted in sandboxes on the control plane's "
                "machine only so far. Leave gpu= out, or use the volume from a function."
            )
        mounts = _volumes(volumes)
        if cpu is not None:
            raise exc.InvalidError(
                "Sandbox.create(cpu=...) is not supported yet: sandboxes are not CPU-limited. Leave cpu= out."
            )
        if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
            raise exc.InvalidError(
                f"Sandbox.create(name={name!r}): use 1 to 64 letters, digits, '.', '_' or '-'."
            )
        if any(not isinstance(a, str) for a in args):
            raise exc.InvalidError("Sandbox.create(*args): the command's arguments must be strings.")
        if workdir is not None and not workdir.startswith("/"):
            raise exc.InvalidError(f"workdir={workdir!r}: give an absolute path.")
        if memory is not None and (isinstance(memory, tuple) or int(memory) < 16):
            raise exc.InvalidError(f"memory={memory!r}: give the MiB a sandbox may use (at least 16).")
        sandbox_env, secret_names = _env(env, secrets)
        body = {
            "app_id": app_id,
            "argv": list(args),
            "timeout": int(timeout or DEFAULT_TIMEOUT_S),
            "workdir": workdir,
            "env": sandbox_env,
            "secret_names": secret_names,
            "image": image_wire,
            "volumes": mounts,
            "name": name,
            "cpu": cpu,
            "memory": int(memory) if memory is not None else None,
            "block_network": bool(block_network),
            "tags": dict(tags or {}),
        }
        if gpu is not None:  # on a cloud node (see the module's docstring)
            body |= {"gpu": gpu if isinstance(gpu, str) else list(gpu), "cloud": cloud, "region": regions}
        sid = _transport().post("/v1/sandboxes", body)["sandbox_id"]
        return Sandbox(sid, has_command=bool(args))

    @static_blocking
    def from_id(sandbox_id: str, client: Any = None) -> Sandbox:
        """The sandbox with this id (``sb-…``)."""
        row = _transport().get(f"/v1/sandboxes/{sandbox_id}")
        sb = Sandbox(row["id"], has_command=bool(row["spec"].get("argv")))
        if row["state"] != "running":
            sb._state, sb._returncode = row["state"], row["returncode"]
        return sb

    @static_blocking
    def from_name(
        app_name: str, name: str, *, environment_name: str | None = None, client: Any = None
    ) -> Sandbox:
        """The running sandbox named ``name`` (``Sandbox.create(name=...)``) of the app named ``app_name``;
        ``NotFoundError`` when there is none."""
        row = _transport().post("/v1/sandboxes/lookup", {"app_name": app_name, "name": name})
        return Sandbox(row["id"], has_command=bool(row["spec"].get("argv")))

    @static_blocking
    def list(
        *, app_id: str | None = None, tags: Mapping[str, str] | None = None, client: Any = None
    ) -> list[Sandbox]:
        """The running sandboxes (of ``app_id``; with every one of ``tags``), newest first."""
        rows = _transport().post("/v1/sandboxes/list", {"app_id": app_id, "tags": dict(tags or {})})[
            "sandboxes"
        ]
        return [Sandbox(r["id"], has_command=bool(r["spec"].get("argv"))) for r in rows]

    # -- using -------------------------------------------------------------------------------------------
    @blocking
    def exec(
        self,
        *args: str,
        workdir: str | None = None,
        env: Mapping[str, str | None] | None = None,
        secrets: Sequence[Any] | None = None,
        text: bool = True,
        timeout: int | None = None,
    ) -> ContainerProcess:
        """Run ``args`` in the sandbox; its process, whose streams and exit code the caller reads."""
        if not args:
            raise exc.InvalidError("Sandbox.exec needs a command.")
        if timeout is not None and (isinstance(timeout, bool) or int(timeout) < 1):
            raise exc.InvalidError(f"Sandbox.exec(timeout={timeout!r}): give whole seconds, at least 1.")
        exec_env, secret_names = _env(env, secrets)
        proc = self._link.call(
            op="exec",
            argv=list(args),
            workdir=workdir,
            env=exec_env,
            secret_names=secret_names,
            exec_timeout=int(timeout) if timeout is not None else None,
        )["proc"]
        return ContainerProcess(self.object_id, proc, text=text)

    @blocking
    def open(self, path: str, mode: str = "r") -> SandboxFile:
        """A file in the sandbox: ``r``/``rb`` read it whole when opened; ``w``/``wb``/``a``/``ab`` write it
        when flushed or closed. ``FileNotFoundError``, ``IsADirectoryError`` or ``PermissionError`` as Python's
        ``open`` would raise them in the sandbox."""
        if mode not in ("r", "rb", "w", "wb", "a", "ab"):
            raise exc.InvalidError(f"mode={mode!r}: use r, rb, w, wb, a or ab.")
        return SandboxFile(self, path, mode)

    @blocking
    def set_tags(self, tags: Mapping[str, str], *, client: Any = None) -> None:
        _transport().post(f"/v1/sandboxes/{self.object_id}/tags", {"tags": dict(tags)})

    @blocking
    def get_tags(self) -> dict[str, str]:
        return dict(_transport().get(f"/v1/sandboxes/{self.object_id}")["tags"])

    def _settle(self, r: dict[str, Any]) -> None:
        if r["state"] != "running":
            self._state = r["state"]
            self._returncode = r["returncode"]

    @blocking
    def poll(self) -> int | None:
        """The exit code once the sandbox has ended, else None."""
        if self._state == "running":
            self._settle(self._link.call(op="poll", whole=True))
        return self._returncode

    @blocking
    def wait(self, raise_on_termination: bool = True) -> None:
        """Wait for the sandbox to end. Raises :class:`SandboxTimeoutError` when it ran past its timeout and,
        with ``raise_on_termination``, :class:`SandboxTerminatedError` when it was terminated."""
        while self._state == "running":
            self._settle(self._link.call(op="wait", whole=True, timeout=POLL_S))
        self._link.close()  # its WebSocket: a later call opens another
        if self._state == "timeout":
            raise SandboxTimeoutError(f"Sandbox {self.object_id} ran past its timeout and was killed.")
        if self._state == "terminated" and raise_on_termination:
            raise SandboxTerminatedError(f"Sandbox {self.object_id} was terminated.")
        if self._state == "error":
            raise exc.ExecutionError(f"Sandbox {self.object_id} failed to run its command.")

    @property
    def returncode(self) -> int | None:
        """The sandbox's exit code once it has ended (124 after a timeout, 137 when terminated), else None."""
        return self.poll()

    @blocking
    def terminate(self, *, wait: bool = False) -> None:
        """Kill the sandbox and every process in it."""
        _transport().post(f"/v1/sandboxes/{self.object_id}/terminate", {})
        if wait:
            deadline = time.monotonic() + 30
            while self.poll() is None and self._state == "running" and time.monotonic() < deadline:
                self._settle(self._link.call(op="wait", whole=True, timeout=5.0))

    def __repr__(self) -> str:
        return f"Sandbox({self.object_id})"


_FILE_OP = (
    "import sys\n"
    "path, mode = sys.argv[1], sys.argv[2]\n"
    "try:\n"
    "    if mode == 'r':\n"
    "        f = open(path, 'rb'); sys.stdout.buffer.write(f.read())\n"
    "    else:\n"
    "        f = open(path, mode + 'b'); f.write(sys.stdin.buffer.read())\n"
    "    f.close()\n"
    "except OSError as e:\n"
    "    sys.stderr.write(type(e).__name__ + ': ' + str(e)); sys.exit(2)\n"
)
_OS_ERRORS: dict[str, type[OSError]] = {
    "FileNotFoundError": FileNotFoundError,
    "IsADirectoryError": IsADirectoryError,
    "NotADirectoryError": NotADirectoryError,
    "PermissionError": PermissionError,
    "FileExistsError": FileExistsError,
}


class SandboxFile:
    """A file of a sandbox (``Sandbox.open``): ``read()`` / ``readline()`` / iteration, or ``write`` then
    ``flush`` / ``close``; a context manager. Each transfer is a process in the sandbox (the image's Python)."""

    def __init__(self, sandbox: Sandbox, path: str, mode: str) -> None:
        self._sandbox = sandbox
        self._path = path
        self._text = "b" not in mode
        self._writing = mode[0] in "wa"
        self._pending = b""
        self._closed = False
        if mode[0] == "w":
            self._run("w", b"")  # truncated (or made) now, as open() does
            self._append = True
        else:
            self._append = mode[0] == "a"
        self._data = b"" if self._writing else self._run("r", b"")
        self._pos = 0

    def _run(self, op: str, data: bytes) -> bytes:
        p = self._sandbox.exec("python", "-I", "-c", _FILE_OP, self._path, op, text=False)
        if op != "r":
            p.stdin.write(data)
        p.stdin.write_eof()
        p.stdin.drain()
        out, err = p.stdout.read(), p.stderr.read()
        if p.wait() != 0:
            kind, _, message = err.decode(errors="replace").partition(": ")
            raise _OS_ERRORS.get(kind, OSError)(message or f"{self._path}: the sandbox could not {op} it")
        return bytes(out)

    def _out(self, data: bytes) -> Any:
        return data.decode() if self._text else data

    def read(self, n: int = -1) -> Any:
        end = len(self._data) if n < 0 else self._pos + n
        chunk, self._pos = self._data[self._pos : end], min(end, len(self._data))
        return self._out(chunk)

    def readline(self) -> Any:
        i = self._data.find(b"\n", self._pos)
        end = len(self._data) if i < 0 else i + 1
        chunk, self._pos = self._data[self._pos : end], end
        return self._out(chunk)

    def __iter__(self) -> Any:
        while line := self.readline():
            yield line

    def write(self, data: str | bytes) -> int:
        if not self._writing:
            raise exc.InvalidError("This file was opened for reading.")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        self._pending += raw
        return len(data)

    def flush(self) -> None:
        if self._writing and self._pending:
            self._run("a", self._pending)
            self._pending = b""

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> SandboxFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
