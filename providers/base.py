"""The provider protocol: the one seam between the control plane and the machines that run workers.

Everything above this seam (autoscaler, placement, reconciler) is pure or talks only to these few calls; a
provider turns them into subprocesses (``local``), simulated nodes (``sim``) or cloud instances (``aws``,
``gcp``, ``azure``, ``lambda`` through SkyPilot). The calls are synchronous: the control plane makes them from
a reconciler thread.

A provider declares optional abilities by inheriting small mixins (:class:`SupportsGpuInventory`,
:class:`SupportsSignals`, :class:`SupportsPreemptionNotice`); the scheduler asks with ``isinstance``.

Errors: every failure a provider reports is one of the :class:`ProviderError` tree below. A provider maps its
SDK's errors into it at its edge, in one place (see :func:`map_errors`), so the reconciler reacts to *kinds*
of failure (block this offer and try the next, back off, stop and tell the user) without knowing any SDK.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from cloudmodal.exception import Error
from cloudmodal.gpu import GpuTier

if TYPE_CHECKING:
    from cloudmodal.providers.gpu import GpuDevice

Market = Literal["spot", "on-demand"]
WorkerState = Literal["provisioning", "running", "exited", "preempted", "unknown"]

DEFAULT_WORKER_ARGV: tuple[str, ...] = ("-m", "cloudmodal.worker")


# --- errors -------------------------------------------------------------------------------------------


class ProviderError(Error):
    """A provider could not do what was asked.

    ``offer`` is the offer the attempt was for (if any) and ``reason`` a short machine-readable cause (e.g.
    ``"InsufficientInstanceCapacity"``, ``"gpu-busy"``). ``retryable`` says whether the *same* request may
    succeed later without anyone changing anything: the reconciler backs off and retries those, and tells
    the user about the others.
    """

    retryable_default: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        offer: Any | None = None,
        reason: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.offer = offer
        self.reason = reason
        self.retryable = self.retryable_default if retryable is None else retryable


class NoCapacityError(ProviderError):
    """The offer has no capacity now (cloud out of stock, local GPUs busy). Block it a while, try the next."""

    retryable_default = True


class QuotaExceededError(ProviderError):
    """The account's quota does not allow this launch. Try another region/offer, or raise the quota."""


class PreemptedError(ProviderError):
    """A spot worker was (or is about to be) reclaimed by the cloud. Replace it; its inputs are requeued."""

    retryable_default = True


class CredentialsError(ProviderError):
    """The provider's credentials are missing, expired or lack a permission. A person must fix them."""


class LaunchTimeoutError(ProviderError):
    """A launch did not come up in time. The node (if any) was torn down; try again or another offer."""

    retryable_default = True


class ImageBuildError(ProviderError):
    """The worker's image (environment) could not be built; the message carries the build output's tail."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (``__cause__``, then ``__context__``), each once: SDK errors reach a
    provider's edge wrapped by SkyPilot (``raise ... from``) or raised while another was handled."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


@contextmanager
def map_errors(
    mapping: Mapping[type[BaseException], type[ProviderError]],
    *,
    offer: Any | None = None,
    reason: str | None = None,
) -> Iterator[None]:
    """Turn a lower layer's exceptions into our tree, in one place at the provider's edge.

    >>> with map_errors({TimeoutError: LaunchTimeoutError}):  # doctest: +SKIP
    ...     sdk.launch(...)

    The first matching entry wins; :class:`ProviderError` and unmapped exceptions pass through unchanged.
    """
    try:
        yield
    except ProviderError:
        raise
    except Exception as exc:
        for source, target in mapping.items():
            if isinstance(exc, source):
                raise target(
                    f"{type(exc).__name__}: {exc}", offer=offer, reason=reason or type(exc).__name__
                ) from exc
        raise


# --- values -------------------------------------------------------------------------------------------


@runtime_checkable
class OfferLike(Protocol):
    """What the control plane reads from an offer (``cloudmodal.pricing`` offers and local offers alike)."""

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


@dataclass(frozen=True)
class LaunchRequest:
    """Start one worker. ``env`` (control-plane URL, token, worker id) comes from the caller; ``argv`` is the
    worker command, run with the Python interpreter the provider picks for the image."""

    worker_id: str
    app_id: str
    function_id: str
    gpu: GpuTier | None = None
    offer: Any | None = None
    market: Market = "on-demand"
    cpu: float | None = None
    memory_mb: int | None = None
    image_hash: str | None = None
    pip_packages: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = DEFAULT_WORKER_ARGV
    # The image recipe (``Image`` as the wire spec carries it): what a cloud node installs before the worker.
    image: dict[str, Any] = field(default_factory=dict)
    # Which try of the worker's launch walk this is (0, 1, ...): tries of one walk can run at once (a hedged
    # round), so a provider that names machines after the worker tells them apart by it.
    attempt: int = 0


@dataclass
class WorkerHandle:
    """A launched worker, as the provider that launched it can find it again (store it; it is plain data).

    ``price_per_hour`` is fixed at launch (the cost ledger multiplies it by the seconds alive).
    ``extra`` holds provider-specific, JSON-able details (pid, log path, cluster name...).
    """

    worker_id: str
    provider: str
    instance_id: str
    offer: Any | None
    market: Market
    price_per_hour: float
    launched_at: float
    gpu_indices: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """Plain JSON data, stored with the worker row so that a restarted control plane finds the worker."""
        offer = self.offer
        if offer is not None and hasattr(offer, "to_dict"):
            offer = offer.to_dict()
        elif offer is not None and not isinstance(offer, dict):
            offer = None  # an offer this module cannot store: the row keeps its own copy
        return {
            "worker_id": self.worker_id,
            "provider": self.provider,
            "instance_id": self.instance_id,
            "offer": offer,
            "market": self.market,
            "price_per_hour": self.price_per_hour,
            "launched_at": self.launched_at,
            "gpu_indices": list(self.gpu_indices),
            "extra": self.extra,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> WorkerHandle:
        offer = d.get("offer")
        if isinstance(offer, dict):
            try:
                from cloudmodal.pricing.offers import Offer

                offer = Offer(**offer)
            except TypeError:
                pass  # not a catalog offer: kept as the dict it was stored as
        return cls(
            worker_id=str(d["worker_id"]),
            provider=str(d["provider"]),
            instance_id=str(d["instance_id"]),
            offer=offer,
            market=d.get("market") or "on-demand",
            price_per_hour=float(d.get("price_per_hour") or 0.0),
            launched_at=float(d.get("launched_at") or 0.0),
            gpu_indices=tuple(int(i) for i in d.get("gpu_indices") or ()),
            extra=dict(d.get("extra") or {}),
        )


@dataclass(frozen=True)
class WorkerStatus:
    """What a provider knows about a worker's machine/process (not about the inputs it runs)."""

    state: WorkerState
    returncode: int | None = None
    detail: str = ""

    @property
    def alive(self) -> bool:
        return self.state in ("provisioning", "running")


@dataclass(frozen=True)
class Signal:
    """A live observation about one offer (or a whole region/zone when ``instance_type`` is None)."""

    cloud: str
    region: str
    zone: str | None = None
    instance_type: str | None = None
    gpu: str | None = None
    available: bool | None = None  # None: unknown
    price_spot: float | None = None
    price_ondemand: float | None = None
    quota_left_gpus: int | None = None
    observed_at: float = 0.0
    detail: str = ""


# --- the protocol ---------------------------------------------------------------------------------------


class Provider(abc.ABC):
    """Where workers run. Implementations must be safe to call from several threads."""

    name: str = "provider"
    # Whether this provider's workers are processes of this machine (they count against its worker budget,
    # CLOUDMODAL_LOCAL_MAX_WORKERS); a cloud's run on their own nodes.
    workers_on_this_machine: ClassVar[bool] = True
    # Whether several tries of one worker's launch may run at once (a hedged round): each makes its own
    # machine (told apart by ``LaunchRequest.attempt``), and ``discard(handle)`` terminates a surplus one
    # without touching the worker's own node.
    hedged_tries: ClassVar[bool] = False

    @abc.abstractmethod
    def offers(self) -> list[Any]:
        """The offers (:class:`OfferLike`) this provider can launch; static knowledge, no live probing."""

    @abc.abstractmethod
    def launch(self, req: LaunchRequest) -> WorkerHandle:
        """Start a worker, or raise a :class:`ProviderError` subclass saying why not."""

    @abc.abstractmethod
    def terminate(self, handle: WorkerHandle, *, grace_s: float = 10.0) -> None:
        """Stop a worker: SIGTERM (the worker drains), then SIGKILL after ``grace_s``. Idempotent."""

    @abc.abstractmethod
    def describe(self, handle: WorkerHandle) -> WorkerStatus:
        """The worker's current state; never raises for a worker that is gone (that is ``"exited"``)."""

    def close(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release the provider's resources (clients, threads). Idempotent."""

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SupportsGpuInventory(abc.ABC):
    """The provider knows the physical GPUs it hands out (the local machine, a fixed on-prem node)."""

    @abc.abstractmethod
    def gpu_inventory(self) -> list[GpuDevice]:
        """Every GPU this provider may hand out, busy or not."""


class SupportsSignals(abc.ABC):
    """The provider can observe live availability, spot prices and quotas (for placement to filter on)."""

    @abc.abstractmethod
    def signals(self) -> list[Signal]:
        """Current observations; may be cached by the provider. Raises only :class:`ProviderError`."""


class SupportsInventory(abc.ABC):
    """The provider can list every worker machine it runs for one control plane, including ones the control
    plane has lost track of (it crashed between asking for a machine and recording it)."""

    @abc.abstractmethod
    def inventory(self, control_plane_id: str) -> list[WorkerHandle]:
        """A handle for every live machine tagged with ``control_plane_id`` (``worker_id`` from its tags)."""


class SupportsPreemptionNotice(abc.ABC):
    """The provider learns ahead of time that a spot worker will be reclaimed."""

    @abc.abstractmethod
    def preemption_notice(self, handle: WorkerHandle) -> float | None:
        """The time (epoch seconds) the worker will be reclaimed, or None when no notice is pending."""
