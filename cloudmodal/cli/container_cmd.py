"""`cloudmodal container list|exec|stop`, and the client side of `cloudmodal shell APP.FUNCTION|ta-...`: a
shell or a command inside a running container (a worker) of a deployed function, as Modal's ``modal container``
and ``modal shell CONTAINER_ID``.

The client talks only to its control plane (``/v1/containers/{id}/exec``, WebSockets: one for control and
stdin, one long poll per output stream); the control plane relays to the worker over the connection the
worker dialled (:mod:`cloudmodal.server.svc_container`, :mod:`cloudmodal.worker.exec_host`). With a PTY
(the default when stdin is a terminal) the local terminal is put in raw mode for the session and restored
after, keystrokes (``Ctrl-C`` included) go to the remote terminal as they are typed, and the window size
follows the local one (``SIGWINCH``). Without one, stdin, stdout and stderr are streamed as pipes, and
``Ctrl-C`` sends SIGINT to the remote command. The exit status is the remote command's; when the container
stops under a session, the client sees the end of its output, a message, and the shell's status (137 when the
container vanished).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import select
import signal
import sys
import threading
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Manage running containers (the workers of your functions).", no_args_is_help=True)

CONTAINER_ID = re.compile(r"^ta-[0-9A-Za-z]{1,64}$")
POLL_S = 20.0  # one long poll's wait (the control plane answers sooner when there is output)
LIST_COLUMNS = (
    Column("Container ID"),
    Column("App", keep=1),
    Column("Function", keep=1),
    Column("State", keep=2),
    Column("Provider", keep=3),
    Column("Instance", keep=5),
    Column("Region", keep=6),
    Column("Started", keep=4),
)


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _transport() -> Any:
    from cloudmodal.client.session import current_session

    return current_session().transport


def list_rows(app_id: str | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = _transport().post("/v1/containers/list", {"app_id": app_id})["containers"]
    return rows


def resolve_container(ref: str) -> str:
    """A container id for ``ref``: ``ta-...`` as given, or ``APP_NAME.FUNCTION`` (``APP_NAME.Cls`` for a
    class): its newest ready container."""
    from cloudmodal import exception as exc

    if CONTAINER_ID.match(ref):
        return ref
    app_name, sep, fn = ref.partition(".")
    if not sep or not app_name or not fn:
        raise exc.InvalidError(
            f"{ref!r} names no container: give a container id (ta-..., `cloudmodal container list` shows them), "
            "APP_NAME.FUNCTION for a running container of a deployed function, or FILE.py::NAME for a local shell "
            "in a function's environment."
        )
    name = fn.split(".")[0]
    rows = [
        r
        for r in list_rows()
        if r["app_name"] == app_name
        and (r["function_name"] == name or r["function_name"].startswith(name + "("))
    ]
    rows.sort(key=lambda r: (r["state"] == "ready", r["started_at"] or 0.0), reverse=True)
    if not rows or rows[0]["state"] == "draining":
        raise exc.NotFoundError(
            f"No running container of {app_name}.{name}. A container runs while the function has work or "
            "keeps one up: give it min_containers=1 (or call it), then try again; `cloudmodal container list` "
            "shows the running ones."
        )
    return str(rows[0]["id"])


class _Link:
    """One WebSocket to the container's ``exec`` route."""

    def __init__(self, worker_id: str) -> None:
        from cloudmodal.client.transport import Channel

        self.channel = Channel(_transport(), f"/v1/containers/{worker_id}/exec")

    def call(self, **body: Any) -> Any:
        return self.channel.call(body)

    def close(self) -> None:
        self.channel.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _terminal_size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return max(1, size.lines), max(1, size.columns)
    except OSError:
        return 24, 80


def run_in_container(
    worker_id: str,
    argv: list[str],
    *,
    pty: bool | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
) -> int:
    """Run ``argv`` (none: the container's interactive shell) in container ``worker_id`` with this process's
    stdio; the remote exit status. ``pty`` None: a PTY when stdin is a terminal."""
    if pty is None:
        pty = os.isatty(stdin_fd)
    ctl = _Link(worker_id)
    rows, cols = _terminal_size(stdout_fd if os.isatty(stdout_fd) else stdin_fd)
    term = os.environ.get("TERM") if pty else None
    if term is not None and not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", term):
        term = None
    exec_id = ctl.call(op="start", argv=argv, pty=pty, term=term, rows=rows, cols=cols)["exec_id"]

    def pump_out(fd: int, out: int) -> None:
        link = _Link(worker_id)
        offset = 0
        try:
            while True:
                r = link.call(op="read", exec_id=exec_id, fd=fd, offset=offset, timeout=POLL_S)
                offset = r["offset"]
                if r["data"]:
                    _write_all(out, bytes(r["data"]))
                elif r["eof"]:
                    return
        finally:
            link.close()

    wake_r, wake_w = os.pipe()  # SIGWINCH -> the stdin pump sends the new size; at the end, it stops
    ended = threading.Event()

    def pump_in() -> None:
        link = _Link(worker_id)
        watching = [stdin_fd, wake_r]
        try:
            while True:
                ready, _, _ = select.select(watching, [], [])
                if ended.is_set():
                    return  # not another read of stdin: what is typed now is the caller's, not the command's
                if wake_r in ready:
                    os.read(wake_r, 64)
                    r, c = _terminal_size(stdout_fd)
                    link.call(op="resize", exec_id=exec_id, rows=r, cols=c)
                if stdin_fd in ready:
                    data = os.read(stdin_fd, 65536)
                    link.call(op="stdin", exec_id=exec_id, data=data, eof=not data)
                    if not data:
                        watching = [wake_r]
        except Exception:
            return  # the session ended (or the connection did): the output pumps report it
        finally:
            link.close()

    raw = pty and os.isatty(stdin_fd)
    saved: Any = None
    old_winch: Any = None
    outs = [
        threading.Thread(target=pump_out, args=(1, stdout_fd), daemon=True, name="exec-stdout"),
        threading.Thread(target=pump_out, args=(2, stderr_fd), daemon=True, name="exec-stderr"),
    ]
    inp = threading.Thread(target=pump_in, daemon=True, name="exec-stdin")
    try:
        if raw:
            import termios
            import tty

            saved = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd, termios.TCSANOW)  # not TCSAFLUSH: what was typed ahead goes to the shell
        if pty and threading.current_thread() is threading.main_thread():
            old_winch = signal.signal(signal.SIGWINCH, lambda *_: os.write(wake_w, b"w"))
        for t in outs:
            t.start()
        inp.start()
        while True:
            try:
                for t in outs:
                    while t.is_alive():
                        t.join(0.5)
                r = ctl.call(op="wait", exec_id=exec_id, timeout=POLL_S)
                while r["state"] != "ended":
                    r = ctl.call(op="wait", exec_id=exec_id, timeout=POLL_S)
                break
            except KeyboardInterrupt:  # no PTY (a raw terminal sends ^C as a byte): interrupt the command
                ctl.call(op="signal", exec_id=exec_id, signal=int(signal.SIGINT))
    except BaseException:
        with contextlib.suppress(Exception):
            ctl.call(op="close", exec_id=exec_id)
        raise
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        ended.set()
        os.write(wake_w, b"q")
        if inp.ident is not None:
            inp.join(5)  # it waits on select, which the byte just ended; a call in flight is a short one
        # one still in a call keeps its pipe: a descriptor closed is reused by the next open in this process
        if not inp.is_alive():
            os.close(wake_r)
            os.close(wake_w)
        ctl.close()
    code = r["returncode"]
    if r.get("message") and code not in (0, None):
        sys.stderr.write(f"[cloudmodal] {r['message']}\n")
        sys.stderr.flush()
    return int(code) if code is not None else 1


@app.command("list")
def list_containers(
    app_id: str = typer.Option(None, "--app-id", help="Only this app's containers (ap-...)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Running containers (workers), newest first: a cloud worker with its node's instance and region."""
    with user_errors():
        rows = list_rows(app_id)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table(
        LIST_COLUMNS,
        [
            [
                r["id"],
                r["app_name"],
                r["function_name"],
                r["state"],
                r["provider"],
                r.get("instance_id") or "-",
                r.get("region") or "-",
                _ts(r["started_at"]),
            ]
            for r in rows
        ],
        wide=wide,
    )


@app.command("exec", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def exec_command(
    container_id: str = typer.Argument(..., help="The container's id (ta-...; `cloudmodal container list`)."),
    command: list[str] = typer.Argument(..., help="The command and its arguments."),
    pty: bool = typer.Option(
        None, "--pty/--no-pty", help="Run it in a pseudo-terminal (default: when stdin is one)."
    ),
) -> None:
    """Run a command inside a running container; exits with its status."""
    with user_errors():
        code = run_in_container(resolve_container(container_id), list(command), pty=pty)
    raise typer.Exit(code)


@app.command("stop")
def stop(
    container_id: str = typer.Argument(..., help="The container's id (ta-...)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Don't ask for confirmation."),
) -> None:
    """Stop a container: it takes nothing new, finishes the inputs it holds, then exits (its shells end now).
    A function that keeps containers up gets a new one."""
    if not yes and sys.stdin.isatty() and not typer.confirm(f"Stop container {container_id}?"):
        raise typer.Exit(1)
    with user_errors():
        _transport().post(f"/v1/containers/{container_id}/stop", {"graceful": True})
    typer.echo(f"Stopping container {container_id}: it finishes what it holds, then exits.")


if __name__ == "__main__":  # `python -m cloudmodal.cli.container_cmd` until the main CLI registers it
    app()
