"""Sandboxes on cloud nodes (``Sandbox.create(gpu=...)``), the part of :mod:`cloudmodal.server.svc_sandbox` that
places, launches, bills and watches a sandbox's node: the clouds' offers ranked as for a function's GPU workers
(on demand), the node launched through the cloud provider with the host attached to its bootstrap's SSH session
(:class:`CloudHost`), and its $/h fixed at launch written with the sandbox's row for the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from cloudmodal import exception as exc
from cloudmodal.server.models_sandbox import SandboxRow

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane
    from cloudmodal.server.svc_sandbox import Live

log = logging.getLogger("cloudmodal.sandbox")

SB = SandboxRow.__table__  # type: ignore[attr-defined]
BACKSTOP_S = 5.0  # after its timeout, a host that has not ended its sandbox is killed (a node: deleted)
PROVISION_S = 900.0  # a cloud node for a sandbox that is not running its host after this is given up
CLOUD_POLL_S = 0.5  # how often a sandbox's node is described (the provider lists its nodes once per interval)
CLOUD_TRIES = 3  # cloud candidates a sandbox's launch tries, best first
SANDBOX_HOST_ARGV = ("-m", "cloudmodal.worker.sandbox_host")


class CloudHost:
    """A sandbox's host on a cloud node, as this module sees a host process: :meth:`poll` is None while it
    runs. :meth:`stop` (blocking: a cloud call) ends the SSH session the host is attached to (the host then ends
    its sandbox) and deletes the node; once."""

    def __init__(self, provider: Any, handle: Any, where: str) -> None:
        self.provider = provider
        self.handle = handle
        self.where = where
        self.returncode: int | None = None
        self.detail = ""
        self.stopped = False
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self.returncode

    def stop(self) -> None:
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        try:
            self.provider.terminate(self.handle, grace_s=0.0)
        except Exception as e:  # the provider's inventory deletes a node left behind
            log.warning("deleting the node of sandbox %s: %s", self.handle.worker_id, e)
        if self.returncode is None:
            self.returncode = -9


class SandboxNodes:
    """The cloud-node half of :class:`cloudmodal.server.svc_sandbox.Sandboxes` (which provides what is declared
    here)."""

    cp: ControlPlane
    run: Any

    async def _end(self, live: Live, state: str, code: int | None, message: str = "") -> None:
        raise NotImplementedError

    def _backstop(self, live: Live) -> None:
        raise NotImplementedError

    # -- cloud nodes --------------------------------------------------------------------------------------
    def _cloud_choices(self, spec: dict[str, Any]) -> list[Any]:
        """Where a sandbox with ``gpu`` may run: the clouds' offers as placement ranks them for a function's
        GPU workers (its tiers in order, cheapest first; ``cloud``/``region`` as a function's), on demand."""
        from cloudmodal.gpu import parse_gpu
        from cloudmodal.server.launcher import no_gpu_message

        try:
            tiers = parse_gpu(spec["gpu"])
        except (ValueError, exc.Error) as e:
            raise exc.InvalidError(f"Sandbox gpu={spec['gpu']!r}: {e}") from None
        rec = self.cp.reconciler
        if rec is None:
            raise exc.NoProviderError(
                "Sandbox.create(gpu=...) runs the sandbox on a cloud node, and this control plane has no "
                "reconciler (no providers): start it with a cloud enabled."
            )
        shape = SimpleNamespace(
            gpu=tiers,
            spot="never",
            cloud=spec.get("cloud"),
            region=tuple(spec.get("region") or ()),
            max_price_per_hour=None,
        )
        choices = [
            c
            for c in rec.cloud_choices(shape, "sandbox", rec.clock(), force_on_demand=True)
            if hasattr(c.provider, "launch_sandbox")
        ]
        if not choices:
            raise exc.NoProviderError(
                "Sandbox.create(gpu=...) runs the sandbox on a cloud node. "
                + no_gpu_message(tiers, getattr(rec, "local", None))
            )
        return choices

    def _launch_cloud(
        self, live: Live, token: str, spec: dict[str, Any], choices: list[Any], image: dict[str, Any] | None
    ) -> CloudHost:
        """Launch the sandbox's node on the first candidate that accepts (blocking: cloud calls); the node's
        bootstrap sets up ``image`` as a worker's and runs the host with its venv's Python."""
        from cloudmodal.providers.base import LaunchRequest, ProviderError

        refused = []
        for c in choices[:CLOUD_TRIES]:
            req = LaunchRequest(
                worker_id=live.id,
                app_id=live.app_id,
                function_id="sandbox",
                gpu=c.tier,
                offer=c.offer,
                market=c.market,
                argv=SANDBOX_HOST_ARGV,
                **(
                    {
                        "image": image,
                        "image_hash": image.get("hash"),
                        "pip_packages": tuple(image.get("pip_packages") or ()),
                    }
                    if image is not None
                    else {}
                ),
            )
            try:
                handle = c.provider.launch_sandbox(
                    req, attach={"token": token, "sandbox_id": live.id, "spec": spec}
                )
            except ProviderError as e:
                refused.append(f"{c.describe()}: {e.message}")
                continue
            self._bill(live.id, c, handle)
            self.cp.activity.event(
                "sandbox.node_launched",
                f"sandbox {live.id}: node launched on {c.describe()}",
                app_id=live.app_id,
            )
            return CloudHost(c.provider, handle, c.describe())
        raise exc.ExecutionError("no cloud candidate started a node: " + "; ".join(refused))

    def _bill(self, sid: str, choice: Any, handle: Any) -> None:
        """What the sandbox's node is billed as, fixed now, into its row (the ledger's reading, see
        :mod:`cloudmodal.server.ledger`): its provider, offer, market, $/h and launch time."""
        from cloudmodal.server.launcher import offer_dict

        billing = {
            "provider": getattr(choice.provider, "name", "") or handle.provider,
            "offer": offer_dict(choice) or {},
            "market": handle.market,
            "price_per_hour": float(handle.price_per_hour or 0.0),
            "launched_at": float(handle.launched_at),
            "gpu": str(choice.tier) if choice.tier else "",
        }
        self._set_billing(sid, billing)

    def _set_billing(self, sid: str, values: dict[str, Any]) -> None:
        with self.cp.db.write() as conn:
            spec = conn.execute(select(SB.c.spec).where(SB.c.id == sid)).scalar()
            if spec is None:
                return
            spec = dict(spec)
            spec["billing"] = {**(spec.get("billing") or {}), **values}
            conn.execute(SB.update().where(SB.c.id == sid).values(spec=spec))

    async def _start_cloud(
        self,
        live: Live,
        token: str,
        spec: dict[str, Any],
        choices: list[Any],
        image: dict[str, Any] | None = None,
    ) -> None:
        """Launch the sandbox's node and watch it (the provider's describe bootstraps it and reports the host's
        end); when it ends, end the sandbox and delete the node."""
        try:
            host = await self.run(self._launch_cloud, live, token, spec, choices, image)
        except Exception as e:
            await self._end(live, "error", None, f"The sandbox's cloud node could not start: {e}")
            return
        live.host = host
        deadline = time.monotonic() + PROVISION_S
        while live.state == "running" and not host.stopped:
            try:
                st = await self.run(host.provider.describe, host.handle)
            except Exception as e:  # a failed cloud call: asked again at the next round
                log.warning("sandbox %s: describing its node: %s", live.id, e)
                st = None
            if st is not None and st.state == "running" and not live.started:
                live.started = True
                asyncio.get_running_loop().call_later(live.timeout + BACKSTOP_S, self._backstop, live)
            elif st is not None and st.state in ("exited", "preempted"):
                host.returncode = st.returncode if st.returncode is not None else 1
                host.detail = st.detail
                break
            if not live.started and time.monotonic() > deadline:
                host.detail = f"its node on {host.where} did not run the host within {PROVISION_S:g} s"
                host.returncode = 1
                break
            await asyncio.sleep(CLOUD_POLL_S)
        if live.state == "running":
            await self._end(live, "error", None, f"The sandbox's node ended: {host.detail}")
        await self._stop_cloud(host)

    async def _stop_cloud(self, host: CloudHost) -> None:
        """Delete a sandbox's node once its host has ended (it exits once its end is reported), or after
        :data:`BACKSTOP_S`."""
        deadline = time.monotonic() + BACKSTOP_S
        while host.returncode is None and not host.stopped and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.run(host.stop)
        # the node is gone: its billing ends here (the ledger closes it)
        with contextlib.suppress(Exception):
            await self.run(self._set_billing, host.handle.worker_id, {"stopped_at": time.time()})
        ledger = getattr(self.cp, "ledger", None)
        if ledger is not None:
            ledger.soon()
