"""The local provider: workers are subprocesses of this machine (the embedded default).

Each worker gets exactly the GPUs it asked for through ``CUDA_VISIBLE_DEVICES`` (NVML indices, with
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA numbers them the same way), runs in its own process group (so
``terminate`` also stops anything it spawned) and writes stdout/stderr to ``<state_dir>/logs/<worker>.log``
(the directories 0700, the logs 0600). A CPU-only worker sees no GPU unless the provider is built with
``expose_gpus_to_cpu_workers=True``.

A worker inherits this process's environment, less the control plane's own secrets
(:data:`CONTROL_PLANE_ONLY_ENV`), plus the request's ``env``. The control-plane token in the request's env
(``CLOUDMODAL_TOKEN``) is not put in the worker's environment, where ``/proc/<pid>/environ`` and every
process the user's code starts would show it: it goes on the worker's stdin as one JSON line
``{"CLOUDMODAL_TOKEN": ...}``, announced by ``CLOUDMODAL_CREDENTIALS=stdin`` (a standby worker gets it in the
environment line it waits for, and keeps it out of its environment). A custom worker command (``argv``) reads
it from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloudmodal.config import cache_dir, open_private, private_dir
from cloudmodal.gpu import GpuTier
from cloudmodal.pricing.gpus import ANY
from cloudmodal.providers.base import (
    LaunchRequest,
    NoCapacityError,
    Provider,
    ProviderError,
    SupportsGpuInventory,
    WorkerHandle,
    WorkerStatus,
)
from cloudmodal.providers.envs import resolve_python
from cloudmodal.providers.gpu import GpuDevice, detect_gpus, summarize
from cloudmodal.worker.snapshot import (
    AGENT_ENV,
    ForkedProcess,
    SnapshotAgent,
    SnapshotError,
    Zygote,
    token_hash,
)

PythonResolver = Callable[[Sequence[str], str | None], str]


@dataclass(frozen=True)
class LocalOffer:
    """An offer on this machine (same attributes as ``cloudmodal.pricing.offers.Offer``; ``gpu`` is None for the
    CPU offer)."""

    cloud: str
    region: str
    zone: str | None
    instance_type: str
    gpu: str | None
    gpu_count: int
    gpu_memory_gb: float | None
    vcpus: float | None
    memory_gb: float | None
    price_ondemand: float | None
    price_spot: float | None
    source: str
    date: str

    def price(self, market: str) -> float | None:
        """The $/h in ``market`` (``"spot"`` or ``"on-demand"``); None when not sold so (no local spot)."""
        return self.price_spot if market == "spot" else self.price_ondemand


STANDBY_RESPAWN_DELAY_S = 1.0

# The control plane's own secrets: never inherited by a worker (the user's code runs there).
CONTROL_PLANE_ONLY_ENV = (
    "CLOUDMODAL_TOKEN",
    "CLOUDMODAL_TOKEN_FILE",
    "CLOUDMODAL_CREDENTIALS",
    "CLOUDMODAL_SECRET_KEY",
    "CLOUDMODAL_SECRET_KEY_FILE",
    "CLOUDMODAL_DATABASE_URL",
    "PGPASSWORD",
)
TOKEN_ENV = "CLOUDMODAL_TOKEN"


def _inherited_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in CONTROL_PLANE_ONLY_ENV:
        env.pop(k, None)
    return env


def _log_dir(state_dir: Path) -> Path:
    """``<state_dir>/logs``, both private to this user (a worker's log holds what the user's code printed)."""
    private_dir(state_dir)
    return private_dir(state_dir / "logs")


# Standby interpreters started ahead of their provider, by state directory (see start_standby).
_early_standby: dict[Path, tuple[subprocess.Popen[bytes], Path]] = {}


def _spawn_standby(state_dir: Path) -> tuple[subprocess.Popen[bytes], Path] | None:
    """A worker interpreter that imports the runtime now and waits on stdin for the environment of the
    worker it becomes; it exits when stdin closes (its parent gone). ``None`` where it cannot start."""
    try:
        log_dir = _log_dir(state_dir)
        log_path = log_dir / f"standby-{os.getpid()}-{time.monotonic_ns()}.log"
        with open_private(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cloudmodal.worker", "--standby"],
                env=_inherited_env(),  # what it becomes is sent on stdin; /proc/<pid>/environ keeps this
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
    except OSError:
        return None
    return proc, log_path


def start_standby(state_dir: str | os.PathLike[str]) -> None:
    """Start the standby interpreter of a :class:`LocalProvider` that will be created on ``state_dir``, now.

    The embedded control plane calls this before importing itself: the worker runtime's imports then
    overlap the control plane's instead of following them, which shortens a cold start to its first result.
    """
    path = Path(state_dir)
    if path in _early_standby:
        return
    standby = _spawn_standby(path)
    if standby is not None:
        _early_standby[path] = standby


def _machine_memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class LocalProvider(Provider, SupportsGpuInventory):
    """Run workers as subprocesses on this machine.

    ``gpus``: the inventory (default: :func:`detect_gpus`, on first use). ``price_per_hour`` +
    ``price_per_gpu_hour`` × GPUs is the price recorded for each worker (default 0). ``cpu_fallback``: a GPU
    request this machine can never satisfy runs on CPU instead (development only). ``python_resolver``
    picks the interpreter for an image (default :func:`resolve_python`). A request's ``cpu`` and
    ``memory_mb`` are not enforced here: local workers share the machine.
    """

    name = "local"

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        gpus: Sequence[GpuDevice] | None = None,
        price_per_hour: float = 0.0,
        price_per_gpu_hour: float = 0.0,
        expose_gpus_to_cpu_workers: bool = False,
        cpu_fallback: bool = False,
        python_resolver: PythonResolver | None = None,
        clock: Callable[[], float] = time.time,
        standby: bool = False,
        snapshots: bool = True,
        snapshot_idle_s: float = 300.0,
        snapshot_ready_timeout_s: float = 600.0,
    ) -> None:
        """``standby=True`` keeps one pre-started worker interpreter warm (the control plane turns it on).
        ``snapshots``: serve ``enable_memory_snapshot`` functions from a fork server (see
        :mod:`cloudmodal.worker.snapshot`); a function's snapshot process stops ``snapshot_idle_s`` after its
        last worker here exited, when a new version of the function replaces it, and with the provider."""
        self.state_dir = Path(state_dir) if state_dir is not None else cache_dir() / "local"
        self._gpus: list[GpuDevice] | None = list(gpus) if gpus is not None else None
        self.price_per_hour = price_per_hour
        self.price_per_gpu_hour = price_per_gpu_hour
        self.expose_gpus_to_cpu_workers = expose_gpus_to_cpu_workers
        self.cpu_fallback = cpu_fallback
        self._resolve_python = python_resolver or resolve_python
        self._clock = clock
        self._lock = threading.Lock()
        self._busy: dict[int, str] = {}  # GPU index -> worker id
        self._procs: dict[str, subprocess.Popen[bytes] | ForkedProcess] = {}
        self._standby: tuple[subprocess.Popen[bytes], Path] | None = None
        self._closed = False
        self.standby_enabled = standby
        if standby:
            early = _early_standby.pop(self.state_dir, None)
            if early is not None and early[0].poll() is None:
                self._standby = early  # started before the control plane's own imports (see start_standby)
            else:
                threading.Thread(target=self._start_standby, name="standby", daemon=True).start()
        self._exited: dict[str, int] = {}  # worker id -> returncode, once reaped
        self.snapshots = snapshots
        self.snapshot_idle_s = snapshot_idle_s
        self.snapshot_ready_timeout_s = snapshot_ready_timeout_s
        self._agent: SnapshotAgent | None = None
        self._zygotes: dict[str, Zygote] = {}  # function id -> its current snapshot process
        self._zygote_locks: dict[str, threading.Lock] = {}
        # worker id -> (its launch request, the sha-256 of its token, its interpreter, GPU indices, CPU
        # fallback): what a hand-off to a snapshot needs to start the same worker again (without the token)
        self._launched: dict[str, tuple[LaunchRequest, str, str, tuple[int, ...], bool]] = {}
        self._janitor: threading.Thread | None = None
        self._stop_janitor = threading.Event()

    # --- inventory ---------------------------------------------------------------------------------------

    def gpu_inventory(self) -> list[GpuDevice]:
        with self._lock:
            if self._gpus is None:
                self._gpus = detect_gpus()
            return list(self._gpus)

    def gpu_usage(self) -> dict[int, str]:
        """Busy GPU indices and the worker holding each."""
        self._reap_all()
        with self._lock:
            return dict(self._busy)

    def offers(self) -> list[LocalOffer]:
        """One zero-price offer per GPU type and count this machine can host, plus a CPU offer."""
        gpus = self.gpu_inventory()
        vcpus = float(os.cpu_count() or 1)
        memory = _machine_memory_gb()
        today = _dt.date.today().isoformat()

        def offer(gpu: str | None, count: int, gpu_memory_gb: float | None) -> LocalOffer:
            itype = "local" if gpu is None else f"local-{gpu}x{count}"
            return LocalOffer(
                cloud="local", region="local", zone=None, instance_type=itype, gpu=gpu, gpu_count=count,
                gpu_memory_gb=gpu_memory_gb, vcpus=vcpus, memory_gb=memory,
                price_ondemand=self.price_per_hour + count * self.price_per_gpu_hour, price_spot=None,
                source="local", date=today,
            )  # fmt: skip

        out = [offer(None, 0, None)]
        by_name: dict[str, list[GpuDevice]] = {}
        for d in gpus:
            by_name.setdefault(d.name, []).append(d)
        for gpu_name, devices in by_name.items():
            mem = min((d.memory_mib for d in devices if d.memory_mib), default=None)
            for count in range(1, len(devices) + 1):
                out.append(offer(gpu_name, count, round(mem / 1024, 1) if mem else None))
        return out

    def can_satisfy(self, gpu_tiers: Sequence[GpuTier]) -> bool:
        """Whether some tier of the request fits this machine's GPUs (busy or not). ``()`` is CPU: always."""
        if not gpu_tiers or self.cpu_fallback:
            return True
        gpus = self.gpu_inventory()
        return any(self._fits(t, gpus) for t in gpu_tiers)

    def explain(self, gpu_tiers: Sequence[GpuTier]) -> str:
        """Why this machine can (not) run a GPU request, for the "no provider has this GPU" error."""
        gpus = self.gpu_inventory()
        request = ", ".join(str(t) for t in gpu_tiers) or "CPU"
        has = summarize(gpus)
        if not gpu_tiers:
            return "The local machine can run CPU-only functions."
        fitting = [str(t) for t in gpu_tiers if self._fits(t, gpus)]
        if fitting:
            return f"The local machine ({has}) can run {', '.join(fitting)} of the request [{request}]."
        if not gpus:
            where = (
                "no NVIDIA driver or GPU was found (NVML and nvidia-smi report none)"
                if "CUDA_VISIBLE_DEVICES" not in os.environ
                else f"none is visible (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
            )
            return f"The local machine has no GPU: {where}; the request [{request}] needs one."
        return f"The local machine has {has}; none of [{request}] fits."

    @staticmethod
    def _fits(tier: GpuTier, gpus: Sequence[GpuDevice]) -> bool:
        counts: dict[str, int] = {}
        for d in gpus:
            counts[d.name] = counts.get(d.name, 0) + 1
        if tier.type == ANY:
            return any(n >= tier.count for n in counts.values())
        return counts.get(tier.type, 0) >= tier.count

    # --- allocation ----------------------------------------------------------------------------------------

    def _allocate(self, tier: GpuTier, worker_id: str) -> tuple[int, ...]:
        """Pick ``tier.count`` free GPUs of one type (any type for ANY); caller holds the lock."""
        assert self._gpus is not None
        free: dict[str, list[GpuDevice]] = {}
        for d in self._gpus:
            if d.index not in self._busy:
                free.setdefault(d.name, []).append(d)
        # ANY: best fit, the type with the fewest free GPUs that still fits, so larger groups stay whole for
        # multi-GPU requests.
        names = [tier.type] if tier.type != ANY else sorted(free, key=lambda n: (len(free[n]), n))
        for name in names:
            devices = free.get(name, [])
            if len(devices) >= tier.count:
                chosen = tuple(d.index for d in devices[: tier.count])
                for i in chosen:
                    self._busy[i] = worker_id
                return chosen
        has = summarize(self._gpus)
        if not self._fits(tier, self._gpus):
            raise NoCapacityError(
                f"Cannot run {tier} on the local machine: it has {has}. Ask for a GPU it has, "
                "or enable a cloud provider that offers this one.",
                reason="gpu-not-present",
                retryable=False,
            )
        busy = ", ".join(f"GPU {i} (worker {w})" for i, w in sorted(self._busy.items()))
        raise NoCapacityError(
            f"No free {tier} on the local machine right now: it has {has}; busy: {busy}. "
            "The worker will be launched when one of these exits; lower max_containers or add a fallback "
            "GPU type to avoid waiting.",
            reason="gpu-busy",
        )

    def _release(self, worker_id: str) -> None:
        for i in [i for i, w in self._busy.items() if w == worker_id]:
            del self._busy[i]

    # --- lifecycle -----------------------------------------------------------------------------------------

    def launch(self, req: LaunchRequest) -> WorkerHandle:
        if req.gpu is not None:
            self.gpu_inventory()  # detect before taking the lock for allocation (a CPU worker needs none)
        cpu_fallback_used = False
        with self._lock:
            if req.worker_id in self._procs:
                raise ProviderError(
                    f"Worker {req.worker_id} is already running on the local machine; use a new worker id.",
                    reason="duplicate-worker-id",
                )
            indices: tuple[int, ...] = ()
            if req.gpu is not None:
                if self.cpu_fallback and not self._fits(req.gpu, self._gpus or []):
                    cpu_fallback_used = True
                else:
                    indices = self._allocate(req.gpu, req.worker_id)
        try:
            python = self._resolve_python(req.pip_packages, req.image_hash)
            if self.snapshots and tuple(req.argv) == ("-m", "cloudmodal.worker"):
                self._remember(req, python, indices, cpu_fallback_used)
            forked = self._fork_from_snapshot(req, python, indices, cpu_fallback_used)
            proc, log_path = forked or self._spawn(req, python, indices, cpu_fallback_used)
        except BaseException:
            with self._lock:
                self._launched.pop(req.worker_id, None)
            with self._lock:
                self._release(req.worker_id)
            raise
        with self._lock:
            self._procs[req.worker_id] = proc
            self._exited.pop(req.worker_id, None)
        return WorkerHandle(
            worker_id=req.worker_id,
            provider=self.name,
            instance_id=f"pid-{proc.pid}",
            offer=req.offer,
            market="on-demand",  # no spot market on one's own machine
            price_per_hour=self.price_per_hour + len(indices) * self.price_per_gpu_hour,
            launched_at=self._clock(),
            gpu_indices=indices,
            extra={
                "pid": proc.pid,
                "log_path": str(log_path),
                "python": python,
                "cpu_fallback": cpu_fallback_used,
            },
        )

    def _child_env(
        self, req: LaunchRequest, indices: tuple[int, ...], cpu_fallback_used: bool
    ) -> dict[str, str]:
        env = _inherited_env()
        env.update({"PYTHONUNBUFFERED": "1", "CLOUDMODAL_WORKER_ID": req.worker_id})
        env.update(req.env)
        env["CLOUDMODAL_IS_REMOTE"] = "1"
        if indices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, indices))
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # NVML's order, which our indices are in
        elif not self.expose_gpus_to_cpu_workers or cpu_fallback_used:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if cpu_fallback_used:
            env["CLOUDMODAL_CPU_FALLBACK"] = "1"
        if self.snapshots and tuple(req.argv) == ("-m", "cloudmodal.worker"):
            env[AGENT_ENV] = self._snapshot_agent().path
        return env

    # --- memory snapshots: a fork server per function version ---------------------------------------------
    # A worker of an enable_memory_snapshot function hands its identity to the agent (handle_handoff); the
    # agent starts the function's zygote if needed and forks the worker's replacement from it. Later workers
    # of the function are forked from the zygote at launch; one that finds a newer version hands off again.

    def _snapshot_agent(self) -> SnapshotAgent:
        with self._lock:
            if self._agent is None:
                self._agent = SnapshotAgent(self.handle_handoff)
                self._janitor = threading.Thread(
                    target=self._janitor_loop, name="zygote-janitor", daemon=True
                )
                self._janitor.start()
            return self._agent

    def _remember(
        self, req: LaunchRequest, python: str, indices: tuple[int, ...], cpu_fallback_used: bool
    ) -> None:
        token = req.env.get(TOKEN_ENV)
        bare = dataclasses.replace(req, env={k: v for k, v in req.env.items() if k != TOKEN_ENV})
        with self._lock:
            self._launched[req.worker_id] = (bare, token_hash(token), python, indices, cpu_fallback_used)

    def _fork_from_snapshot(
        self, req: LaunchRequest, python: str, indices: tuple[int, ...], cpu_fallback_used: bool
    ) -> tuple[ForkedProcess, Path] | None:
        """The worker as a fork of its function's ready zygote, if there is one (else None)."""
        if not self.snapshots or tuple(req.argv) != ("-m", "cloudmodal.worker"):
            return None
        with self._lock:
            z = self._zygotes.get(req.function_id)
        if z is None or z.python != python or not z.ready.is_set() or z.error is not None or not z.alive():
            return None
        log_path = _log_dir(self.state_dir) / f"{req.worker_id}.log"
        try:
            child = z.fork(req.worker_id, self._child_env(req, indices, cpu_fallback_used), log_path)
        except (SnapshotError, OSError):
            return None  # the ordinary start hands off again, which replaces a broken zygote
        return child, log_path

    def handle_handoff(self, request: dict[str, object]) -> dict[str, object]:
        """A worker asks to be started again from its function's snapshot (see snapshot.hand_off)."""
        worker_id = str(request.get("worker_id") or "")
        token = request.get("token")
        defn = request.get("defn")
        blobs = request.get("blobs") or {}
        with self._lock:
            launched = self._launched.get(worker_id)
            current = self._procs.get(worker_id)
        if (
            launched is None
            or current is None
            # the worker proves who it is with its own token (the socket is this user's only, too)
            or not hmac.compare_digest(token_hash(token if isinstance(token, str) else None), launched[1])
            or not isinstance(defn, dict)
            or not isinstance(blobs, dict)
        ):
            return {"ok": False, "error": f"Worker {worker_id!r} was not launched by this local provider."}
        req, _hash, python, indices, cpu_fallback_used = launched
        function_id = str(defn.get("id") or "")
        if function_id != req.function_id:
            return {"ok": False, "error": f"Worker {worker_id!r} does not run function {function_id!r}."}
        z = self._zygote_for(function_id, defn.get("version"), python, defn, blobs)
        error = z.wait_ready(self.snapshot_ready_timeout_s)
        if error is not None:
            return {"ok": False, "error": error}
        env = self._child_env(req, indices, cpu_fallback_used)
        env[TOKEN_ENV] = str(token or "")
        log_path = _log_dir(self.state_dir) / f"{worker_id}.log"
        try:
            child = z.fork(worker_id, env, log_path)
        except SnapshotError as e:
            return {"ok": False, "error": str(e)}
        with self._lock:
            old = self._procs.get(worker_id)
            if old is not current or self._closed:
                child_gone = True
            else:
                self._procs[worker_id] = child
                child_gone = False
        if child_gone:  # stopped meanwhile: the replacement must not outlive it
            self._signal_group(child, signal.SIGKILL)
            return {"ok": False, "error": f"Worker {worker_id!r} was stopped during its hand-off."}
        if isinstance(current, subprocess.Popen):
            threading.Thread(target=current.wait, name="handoff-reap", daemon=True).start()
        return {"ok": True}

    def _zygote_for(
        self,
        function_id: str,
        version: object,
        python: str,
        defn: dict[str, object],
        blobs: dict[str, object],
    ) -> Zygote:
        with self._lock:
            lock = self._zygote_locks.setdefault(function_id, threading.Lock())
        with lock:
            with self._lock:
                z = self._zygotes.get(function_id)
            if z is not None and z.version == version and z.python == python and (z.alive() or z.error):
                return z
            if z is not None:
                z.stop()  # another version, or dead: replaced
            log_path = _log_dir(self.state_dir) / f"zygote-{function_id}-v{version}.log"
            z = Zygote(function_id, version, python, log_path)
            env = _inherited_env()
            env.update({"PYTHONUNBUFFERED": "1", "CLOUDMODAL_IS_REMOTE": "1", "CUDA_VISIBLE_DEVICES": ""})
            env.pop(AGENT_ENV, None)
            z.start(env, defn, {str(k): str(v) for k, v in blobs.items()})
            with self._lock:
                if self._closed:
                    z.stop()
                else:
                    self._zygotes[function_id] = z
            return z

    def _janitor_loop(self) -> None:
        """Stops the snapshot of a function that has had no worker here for ``snapshot_idle_s``."""
        while not self._stop_janitor.wait(min(5.0, max(self.snapshot_idle_s / 4, 0.05))):
            self._stop_idle_zygotes(self._clock())

    def _stop_idle_zygotes(self, now: float) -> None:
        self._reap_all()
        with self._lock:
            busy = {self._launched[w][0].function_id for w in self._procs if w in self._launched}
            idle = []
            for fid, z in self._zygotes.items():
                if fid in busy:
                    z.idle_since = None
                elif z.idle_since is None:
                    z.idle_since = now
                elif now - z.idle_since >= self.snapshot_idle_s:
                    idle.append(fid)
            stopped = [self._zygotes.pop(fid) for fid in idle]
        for z in stopped:
            z.stop()

    def function_of(self, worker_id: str) -> str | None:
        """The function a live worker launched here runs (None if unknown)."""
        with self._lock:
            launched = self._launched.get(worker_id)
        return launched[0].function_id if launched is not None else None

    def zygotes(self) -> dict[str, int]:
        """Function id -> pid of its running snapshot process."""
        with self._lock:
            return {fid: z.proc.pid for fid, z in self._zygotes.items() if z.proc is not None and z.alive()}

    # --- a warm standby interpreter ------------------------------------------------------------------------
    # Starting Python and importing the worker runtime takes ~150 ms; a cold start pays it once more after the
    # control plane is up. A standby process does that work ahead of time, then waits on stdin for the
    # environment of the worker it becomes. Only for the default worker command in this interpreter.

    def _start_standby(self) -> None:
        if not self.standby_enabled or self._closed:
            return
        standby = _spawn_standby(self.state_dir)
        if standby is None:
            return
        with self._lock:
            if self._closed or self._standby is not None:
                spare = standby
            else:
                self._standby, spare = standby, None
        if spare is not None:
            self._signal_group(spare[0], signal.SIGKILL)
            spare[0].wait()
            with contextlib.suppress(OSError):
                spare[1].unlink()

    def _take_standby(self, req: LaunchRequest, python: str) -> tuple[subprocess.Popen[bytes], Path] | None:
        if python != sys.executable or tuple(req.argv) != ("-m", "cloudmodal.worker"):
            return None
        with self._lock:
            standby, self._standby = self._standby, None
        if standby is None:
            return None
        proc, log_path = standby
        if proc.poll() is not None:
            return None
        return proc, log_path

    def _spawn(
        self, req: LaunchRequest, python: str, indices: tuple[int, ...], cpu_fallback_used: bool
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log_dir = self.state_dir / "logs"
        log_path = log_dir / f"{req.worker_id}.log"
        standby = self._take_standby(req, python)
        if standby is not None:
            proc, standby_log = standby
            try:
                assert proc.stdin is not None
                proc.stdin.write(
                    json.dumps(self._child_env(req, indices, cpu_fallback_used)).encode() + b"\n"
                )
                proc.stdin.close()
                os.replace(standby_log, log_path)
                # The next standby starts a moment later: on a small machine it would otherwise take CPU
                # from this worker's start (and the caller's first result) to prepare for a later one.
                later = threading.Timer(STANDBY_RESPAWN_DELAY_S, self._start_standby)
                later.daemon = True
                later.start()
                return proc, log_path
            except (OSError, ValueError):
                self._signal_group(proc, signal.SIGKILL)
        env = self._child_env(req, indices, cpu_fallback_used)
        token = env.pop(TOKEN_ENV, None)  # on stdin, not in the environment (see the module's docstring)
        if token:
            env["CLOUDMODAL_CREDENTIALS"] = "stdin"
        try:
            _log_dir(self.state_dir)
            with open_private(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [python, *req.argv],
                    env=env,
                    stdin=subprocess.PIPE if token else subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise ProviderError(
                f"Could not start worker {req.worker_id} ({python} {' '.join(req.argv)}): {exc}. "
                f"Check that the interpreter exists and {log_dir} is writable.",
                reason="spawn-failed",
            ) from exc
        if token:
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps({TOKEN_ENV: token}).encode() + b"\n")
                proc.stdin.close()
            except (OSError, ValueError):
                pass  # it exited already: describe() reports how
        return proc, log_path

    def _reap(self, worker_id: str) -> int | None:
        """Return code if the worker's process is gone (releasing its GPUs), else None."""
        with self._lock:
            if worker_id in self._exited:
                return self._exited[worker_id]
            proc = self._procs.get(worker_id)
            if proc is None:
                return None
            rc = proc.poll()
            if rc is None:
                return None
            self._exited[worker_id] = rc
            del self._procs[worker_id]
            self._launched.pop(worker_id, None)
            self._release(worker_id)
            # The worker is gone; what it left in its group (data loaders, servers) must not hold its GPUs.
            self._signal_group(proc, signal.SIGKILL)
            return rc

    def _reap_all(self) -> None:
        with self._lock:
            ids = list(self._procs)
        for worker_id in ids:
            self._reap(worker_id)

    def describe(self, handle: WorkerHandle) -> WorkerStatus:
        rc = self._reap(handle.worker_id)
        if rc is not None:
            detail = f"killed by {_signal_name(rc)}" if rc < 0 else f"exited with code {rc}"
            return WorkerStatus("exited", rc, detail)
        with self._lock:
            proc = self._procs.get(handle.worker_id)
        if proc is not None:
            return WorkerStatus("running", None, f"pid {proc.pid}")
        return WorkerStatus(
            "unknown", None, f"worker {handle.worker_id} was not launched by this local provider instance"
        )

    def terminate(self, handle: WorkerHandle, *, grace_s: float = 10.0) -> None:
        with self._lock:
            proc = self._procs.get(handle.worker_id)
        if proc is None:
            return  # never ours, or already reaped
        self._signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=max(grace_s, 0.0))
        except subprocess.TimeoutExpired:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()
        self._reap(handle.worker_id)  # releases its GPUs and kills what it left in its group

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes] | ForkedProcess, sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the worker's pid
        except (ProcessLookupError, PermissionError):
            pass

    def terminate_all(self, *, grace_s: float = 5.0) -> None:
        """Stop every worker this provider started: SIGTERM to all at once, then SIGKILL after ``grace_s``."""
        with self._lock:
            procs = dict(self._procs)
        for proc in procs.values():
            self._signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                pass
        for worker_id, proc in procs.items():
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait()
            self._reap(worker_id)

    def close(self) -> None:
        """Stop every worker this provider started (the embedded control plane's workers die with it), and
        the snapshot processes."""
        self._closed = True
        self._stop_janitor.set()
        with self._lock:
            agent, self._agent = self._agent, None
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        if agent is not None:
            agent.close()
        with self._lock:
            standby, self._standby = self._standby, None
        if standby is not None:
            self._signal_group(standby[0], signal.SIGKILL)
            standby[0].wait()
            with contextlib.suppress(OSError):
                standby[1].unlink()
        self.terminate_all()
        for z in zygotes:  # after the workers forked from them: their exit statuses come through them
            z.stop()

    def live_workers(self) -> list[str]:
        """Ids of workers whose processes are still running."""
        self._reap_all()
        with self._lock:
            return sorted(self._procs)


def local_offer_for(offers: Sequence[LocalOffer], gpu: GpuTier | None) -> LocalOffer | None:
    """The local offer matching a GPU tier (or the CPU offer for None)."""
    for o in offers:
        if gpu is None and o.gpu is None:
            return o
        if gpu is not None and o.gpu is not None and o.gpu_count == gpu.count and gpu.type in (o.gpu, ANY):
            return o
    return None


__all__ = ["LocalOffer", "LocalProvider", "local_offer_for"]
