"""The process inside a sandbox that starts its commands and carries their stdio (standard library only).

:mod:`cloudmodal.worker.sandbox_host` runs this file's source with the image's Python under bubblewrap, so it
needs nothing of cloudmodal inside the sandbox. It talks to the host over its own stdin and stdout in frames
``[kind: 1 byte][process: u32][length: u32][payload]``:

- host to agent: ``S`` start a process (payload: JSON ``{"argv", "cwd", "env"}``, and ``timeout``: seconds
  after which it and its process group are killed and its exit is reported as ``-1``, as Modal's), ``I`` bytes for its stdin,
  ``E`` close its stdin, ``K`` send it a signal (payload: the number as text);
- agent to host: ``O``/``R`` bytes of its stdout/stderr, ``X`` it exited (payload: the exit code as text;
  minus the signal number when a signal ended it), ``F`` it could not start (payload: why).

Process 0 is the sandbox's own command (started by the host's first frame, so that it is in no command line):
when it exits the agent exits, and bubblewrap's PID namespace takes every
other process with it.
"""

import json
import os
import resource
import selectors
import signal
import struct
import subprocess
import sys
import time

HEADER = struct.Struct(">cII")
READ = 65536


class Agent:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.out = sys.stdout.buffer
        self.inp = sys.stdin.fileno()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.pending: dict[int, bytearray] = {}  # stdin bytes not yet taken by the process
        self.eof_wanted: set[int] = set()
        self.open_pipes: dict[int, int] = {}  # process -> its stdout/stderr pipes still open
        self.exited: dict[int, int] = {}  # process -> exit code, reported once its pipes are drained
        self.buf = bytearray()
        self.main_done = False
        self.deadlines: dict[int, float] = {}  # process -> when its exec timeout kills it
        self.timed_out: set[int] = set()

    def send(self, kind: bytes, proc: int, payload: bytes = b"") -> None:
        self.out.write(HEADER.pack(kind, proc, len(payload)) + payload)
        self.out.flush()

    def start(self, proc: int, spec: dict) -> None:
        memory = spec.get("memory_bytes")

        def limit() -> None:
            if memory:
                resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        try:
            p = subprocess.Popen(
                spec["argv"],
                cwd=spec.get("cwd") or None,
                env=spec["env"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                preexec_fn=limit if memory else None,
                start_new_session=bool(spec.get("timeout")),  # its group is killed at its timeout
            )
        except OSError as e:
            self.send(b"F", proc, str(e).encode())
            self.send(b"X", proc, b"127")
            self.main_done = self.main_done or proc == 0
            return
        self.procs[proc] = p
        if spec.get("timeout"):
            self.deadlines[proc] = time.monotonic() + float(spec["timeout"])
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        for stream, kind in ((p.stdout, b"O"), (p.stderr, b"R")):
            os.set_blocking(stream.fileno(), False)
            self.sel.register(stream.fileno(), selectors.EVENT_READ, ("out", proc, (kind, stream)))
        self.open_pipes[proc] = 2
        os.set_blocking(p.stdin.fileno(), False)
        pidfd = os.pidfd_open(p.pid)
        self.sel.register(pidfd, selectors.EVENT_READ, ("exit", proc, pidfd))

    def write_stdin(self, proc: int) -> None:
        p = self.procs.get(proc)
        data = self.pending.get(proc)
        if p is None or p.stdin is None or p.stdin.closed:
            self.pending.pop(proc, None)
            return
        fd = p.stdin.fileno()
        try:
            while data:
                n = os.write(fd, data)
                del data[:n]
        except BlockingIOError:
            pass
        except (BrokenPipeError, OSError):
            data = None
            self.pending.pop(proc, None)
        registered = fd in self.sel.get_map()
        if data:
            if not registered:
                self.sel.register(fd, selectors.EVENT_WRITE, ("stdin", proc, None))
            return
        if registered:
            self.sel.unregister(fd)
        if proc in self.eof_wanted:
            self.eof_wanted.discard(proc)
            p.stdin.close()

    def command(self, kind: bytes, proc: int, payload: bytes) -> None:
        if kind == b"S":
            self.start(proc, json.loads(payload))
        elif kind == b"I":
            self.pending.setdefault(proc, bytearray()).extend(payload)
            self.write_stdin(proc)
        elif kind == b"E":
            self.eof_wanted.add(proc)
            self.pending.setdefault(proc, bytearray())
            self.write_stdin(proc)
        elif kind == b"K":
            p = self.procs.get(proc)
            if p is not None and p.returncode is None:
                try:
                    p.send_signal(int(payload))
                except ProcessLookupError:
                    pass

    def from_host(self) -> bool:
        chunk = os.read(self.inp, READ)
        if not chunk:
            return False
        self.buf += chunk
        while len(self.buf) >= HEADER.size:
            kind, proc, n = HEADER.unpack_from(self.buf)
            if len(self.buf) < HEADER.size + n:
                break
            payload = bytes(self.buf[HEADER.size : HEADER.size + n])
            del self.buf[: HEADER.size + n]
            self.command(kind, proc, payload)
        return True

    def finish(self, proc: int) -> None:
        """Report ``proc``'s exit once it has exited and its pipes are drained."""
        if proc not in self.exited or self.open_pipes.get(proc, 0) > 0:
            return
        code = self.exited.pop(proc)
        if proc in self.timed_out:
            code = -1  # as Modal's ContainerProcess after its exec timeout
            self.timed_out.discard(proc)
        self.deadlines.pop(proc, None)
        self.open_pipes.pop(proc, None)
        self.send(b"X", proc, str(code).encode())
        p = self.procs.pop(proc, None)
        if p is not None and p.stdin is not None and not p.stdin.closed:
            if p.stdin.fileno() in self.sel.get_map():
                self.sel.unregister(p.stdin.fileno())
            try:
                p.stdin.close()
            except OSError:
                pass
        if proc == 0:
            self.main_done = True

    def expire(self) -> None:
        """Kill the processes past their exec timeout, with their process groups (what they started)."""
        now = time.monotonic()
        for proc, at in list(self.deadlines.items()):
            if at > now:
                continue
            del self.deadlines[proc]
            p = self.procs.get(proc)
            if p is None:
                continue
            if proc not in self.exited:  # exited in time: only what it left holding its pipes is killed
                self.timed_out.add(proc)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def run(self, has_main: bool) -> int:
        os.set_blocking(self.inp, True)
        self.sel.register(self.inp, selectors.EVENT_READ, ("host", 0, None))
        while not (has_main and self.main_done):
            self.expire()
            wait = min(self.deadlines.values(), default=None)
            timeout = None if wait is None else max(0.0, wait - time.monotonic())
            for key, _ in self.sel.select(timeout):
                what, proc, extra = key.data
                if what == "host":
                    if not self.from_host():
                        return 0  # the host is gone: so is the sandbox
                elif what == "out":
                    try:
                        data = os.read(key.fd, READ)
                    except BlockingIOError:
                        continue
                    if data:
                        self.send(extra[0], proc, data)
                    else:
                        self.sel.unregister(key.fd)
                        extra[1].close()
                        self.open_pipes[proc] -= 1
                        self.finish(proc)
                elif what == "stdin":
                    self.write_stdin(proc)
                elif what == "exit":
                    self.sel.unregister(extra)
                    os.close(extra)
                    p = self.procs[proc]
                    code = p.wait()
                    self.exited[proc] = code
                    self.finish(proc)
        return 0


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # "main": the sandbox has its own command, whose start (process 0) is the host's first frame
    sys.exit(Agent().run(len(sys.argv) > 1 and sys.argv[1] == "main"))


if __name__ == "__main__":
    main()
