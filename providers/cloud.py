"""A cloud as a provider: one worker per node, the node made by a :class:`~cloudmodal.providers.nodes.NodeDriver`
(through SkyPilot's provisioner) and bootstrapped over SSH (:mod:`~cloudmodal.providers.node_bootstrap`).

The life of a worker here, all of it driven by the reconciler's calls and none of it blocking a thread for
longer than one cloud API call:

1. ``launch`` asks the driver for a node tagged with the control plane, app, function and worker, and
   returns as soon as the cloud has accepted (the reconciler stores the handle with the worker row);
2. ``describe`` (every reconcile tick) reads the state of every node of this control plane with one ``list``
   call per refresh interval; once a node runs and has an address it starts the bootstrap (``ssh``
   subprocesses: the image set-up, the worker, and a reverse tunnel when the nodes cannot reach the
   control plane directly) and polls it;
3. ``terminate`` deletes the node; ``inventory`` lists every node of the control plane, so that nodes a
   crashed control plane never recorded are found and deleted (see ``Health._settle_inventory``).

A sandbox on a cloud node (``launch_sandbox``, called by :mod:`cloudmodal.server.svc_sandbox`) goes the same
way, with its own node: the node is launched, described and bootstrapped as a worker's, but the bootstrap runs
the sandbox host *attached* to its SSH session (see :mod:`~cloudmodal.providers.node_bootstrap`), its token in
the host's first stdin line only, so the sandbox ends when the session does; ``describe`` reports ``exited``
then, and ``terminate`` deletes the node. Sandbox nodes have no worker row: ``inventory`` leaves out the ones
this process holds (a sandbox lives in its control plane's memory), so any other one found (a crashed
control plane's) is deleted; ``close`` deletes the ones it holds.

The worker's token lives only in this process's memory until the bootstrap hands it to the node over SSH's
stdin: a control plane restarted before that writes the worker off and deletes its node.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudmodal.providers.base import (
    DEFAULT_WORKER_ARGV,
    LaunchRequest,
    Provider,
    ProviderError,
    Signal,
    SupportsInventory,
    SupportsSignals,
    WorkerHandle,
    WorkerStatus,
)
from cloudmodal.providers.nodes import (
    TAG_APP,
    TAG_CONTROL_PLANE,
    TAG_FUNCTION,
    TAG_WORKER,
    NodeDriver,
    NodeInfo,
    NodeRef,
    node_name,
    node_tags,
    parse_node_name,
    same_node,
    worker_key,
)

log = logging.getLogger("cloudmodal.providers.cloud")

LIST_INTERVAL_S = 5.0  # one list call per cloud per this, whatever the number of nodes
CREATE_GRACE_S = 120.0  # a node just created may not be listed yet (eventual consistency)
# A node's end of its reverse tunnel: below Linux's ephemeral ports (32768-60999), where no outgoing
# connection on the node can hold it.
TUNNEL_PORTS = (20000, 32000)
SIGNALS_TTL_S = 300.0


@dataclass
class _Node:
    """What this process knows of one worker's node beyond its handle."""

    env: dict[str, str] = field(default_factory=dict)  # the worker's environment (with its token)
    image: dict[str, Any] = field(default_factory=dict)
    bootstrap: Any = None  # a NodeBootstrap once started
    failed: str = ""
    argv: tuple[str, ...] = ()
    attach: dict[str, Any] | None = None  # a sandbox's host: its configuration line (see launch_sandbox)
    sandbox_node: NodeRef | None = None  # a sandbox's node (deleted by close)


class CloudProvider(Provider, SupportsInventory, SupportsSignals):
    """One cloud (``driver.cloud``) as a provider of workers; see the module docstring.

    ``node_server_url``: the URL nodes reach the control plane at (a team's control plane: ``https://``, its
    workers dialling it directly and pinning its certificate with the ``CLOUDMODAL_TLS_FINGERPRINT`` the
    launcher puts in their environment); None (the default) reaches it through a reverse SSH tunnel over
    each node's SSH connection (a laptop behind NAT; over TLS too when the control plane serves it).
    ``ssh_config``: an OpenSSH client config passed to every ``ssh`` (bastions, jump hosts).
    ``node_python``: the Python the node's image environment is made from. ``ssh_user``: the login on nodes
    (default: the one the driver names for the cloud's image). ``node_env``: more environment for the worker
    processes on nodes (e.g. a proxy). ``bootstrap_options``: more keyword arguments for
    :class:`~cloudmodal.providers.node_bootstrap.NodeBootstrap` (e.g. ``system_site_packages`` for nodes whose
    Python already has cloudmodal's dependencies).
    """

    workers_on_this_machine = False
    hedged_tries = True

    def __init__(
        self,
        driver: NodeDriver,
        *,
        state_dir: str | os.PathLike[str],
        node_server_url: str | None = None,
        ssh_config: str | None = None,
        node_python: str = "python3",
        ssh_user: str | None = None,
        node_env: dict[str, str] | None = None,
        bootstrap_options: dict[str, Any] | None = None,
        list_interval_s: float = LIST_INTERVAL_S,
    ) -> None:
        self.driver = driver
        self.name = driver.cloud
        self.state_dir = Path(state_dir)
        self.node_server_url = node_server_url
        self.ssh_config = ssh_config
        self.node_python = node_python
        self.ssh_user = ssh_user
        self.node_env = dict(node_env or {})
        self.bootstrap_options = dict(bootstrap_options or {})
        self.list_interval_s = list_interval_s
        self.control_plane_id = ""
        self.server_url = ""
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}  # worker id -> this process's knowledge of its node
        self._listed: dict[str, list[NodeInfo]] = {}  # worker key -> its nodes as last listed (see _info)
        self._listed_at = 0.0
        self._signals: tuple[float, list[Signal]] = (0.0, [])
        self._key: tuple[Path, str] | None = None
        self._sandboxes: set[str] = set()  # worker keys of the sandbox nodes this process holds

    # -- set-up ---------------------------------------------------------------------------------------------
    def bind(self, control_plane_id: str, server_url: str) -> None:
        """Called by the control plane before any launch: the id its nodes are tagged with, and its URL."""
        self.control_plane_id = control_plane_id
        self.server_url = server_url
        node_url = self.node_server_url or ""
        if server_url.startswith("https://") and node_url.startswith("http://"):
            # its nodes' workers would speak plain HTTP to a TLS port (and send their tokens in clear)
            log.warning(
                "%s: CLOUDMODAL_NODE_SERVER_URL is %s, but this control plane serves HTTPS (%s): its nodes' "
                "workers cannot connect. Set it to the https:// address nodes reach it at.",
                self.name,
                node_url,
                server_url,
            )

    def ssh_key(self) -> tuple[Path, str]:
        """This control plane's SSH key for its nodes: (private key path, public key line), made on first
        use, private to this user (0600 in a 0700 directory)."""
        with self._lock:
            if self._key is None:
                self._key = ensure_ssh_key(self.state_dir / "ssh" / "id_ed25519")
            return self._key

    def offers(self) -> list[Any]:
        return self.driver.offers()

    def signals(self) -> list[Signal]:
        at, cached = self._signals
        if time.time() - at < SIGNALS_TTL_S:
            return cached
        got = self.driver.signals()
        self._signals = (time.time(), got)
        return got

    # -- launching ------------------------------------------------------------------------------------------
    def launch(self, req: LaunchRequest) -> WorkerHandle:
        if not self.control_plane_id:
            raise ProviderError(
                f"the {self.name} provider was not bound to a control plane (bind() first)", reason="unbound"
            )
        _, public_key = self.ssh_key()
        name = node_name(self.control_plane_id, req.worker_id, req.attempt)
        ref = self.driver.create(
            req, name=name, tags=node_tags(self.control_plane_id, req), ssh_public_key=public_key
        )
        offer = req.offer
        price = 0.0
        if offer is not None and hasattr(offer, "price"):
            price = float(offer.price(req.market) or 0.0)
        extra: dict[str, Any] = {"node": ref.to_wire(), "created_at": time.time()}
        if self.node_server_url is None:
            extra["tunnel_port"] = random.randint(*TUNNEL_PORTS)
        with self._lock:
            self._nodes[req.worker_id] = _Node(env=dict(req.env), image=dict(req.image), argv=tuple(req.argv))
        return WorkerHandle(
            worker_id=req.worker_id,
            provider=self.name,
            instance_id=ref.instance_id or ref.cluster,
            offer=offer,
            market=req.market,
            price_per_hour=price,
            launched_at=time.time(),
            extra=extra,
        )

    def launch_sandbox(self, req: LaunchRequest, *, attach: dict[str, Any]) -> WorkerHandle:
        """Launch a node for one sandbox (``req.worker_id``: the sandbox's id; ``req.argv``: its host) whose
        bootstrap runs the host attached, ``attach`` (``token``, ``sandbox_id``, ``spec``) its first stdin
        line; then ``describe`` and ``terminate`` as a worker's. Held by this process until terminated."""
        key = worker_key(req.worker_id)
        with self._lock:
            self._sandboxes.add(key)  # before the node exists: an inventory meanwhile must not take it
        try:
            handle = self.launch(req)
        except BaseException:
            with self._lock:
                self._sandboxes.discard(key)
            raise
        with self._lock:
            node = self._nodes[req.worker_id]
            node.attach = dict(attach)
            node.sandbox_node = NodeRef.from_wire(handle.extra["node"])
        handle.extra["sandbox"] = True
        return handle

    # -- watching -------------------------------------------------------------------------------------------
    def _refresh(self, *, force: bool = False) -> None:
        """Re-list this control plane's nodes when the last list is older than the interval (one call)."""
        if not force and time.time() - self._listed_at < self.list_interval_s:
            return
        with self._refresh_lock:
            if not force and time.time() - self._listed_at < self.list_interval_s:
                return  # another thread just did
            infos = self.driver.list({TAG_CONTROL_PLANE: self.control_plane_id})
            listed: dict[str, list[NodeInfo]] = {}
            for info in infos:
                key = _key_of(info, self.control_plane_id)
                if key:
                    listed.setdefault(key, []).append(info)
            self._listed = listed
            self._listed_at = time.time()

    def _info(self, handle: WorkerHandle) -> NodeInfo | None:
        self._refresh()
        # A worker has one node, but a hedged launch round may have made siblings (tagged with the same
        # worker, named apart) that are being terminated: only the handle's own node counts.
        ref = NodeRef.from_wire(handle.extra["node"])
        return next(
            (i for i in self._listed.get(worker_key(handle.worker_id), ()) if same_node(i.ref, ref)), None
        )

    def describe(self, handle: WorkerHandle) -> WorkerStatus:
        info = self._info(handle)
        created_at = float(handle.extra.get("created_at") or handle.launched_at)
        if info is None:
            if time.time() - created_at < CREATE_GRACE_S:
                return WorkerStatus("provisioning", detail="node requested")
            info = self.driver.query(NodeRef.from_wire(handle.extra["node"]))  # listed lags: ask directly
        if info.state == "pending":
            return WorkerStatus("provisioning", detail="node booting")
        if info.state == "preempted":
            return WorkerStatus("preempted", detail=info.detail or "spot capacity reclaimed")
        if info.state in ("terminated", "stopping"):
            return WorkerStatus(
                "exited", detail=f"node {info.state}" + (f" ({info.detail})" if info.detail else "")
            )
        if info.state == "unknown":
            return WorkerStatus("unknown", detail=info.detail)
        return self._bootstrapped(handle, info)

    def _bootstrapped(self, handle: WorkerHandle, info: NodeInfo) -> WorkerStatus:
        """A running node: start its bootstrap once, then report how it goes."""
        with self._lock:
            node = self._nodes.get(handle.worker_id)
        if node is None:  # adopted: bootstrapped by an earlier control plane (see adopt)
            return WorkerStatus("running", detail="adopted")
        if node.failed:
            return WorkerStatus("exited", returncode=1, detail=node.failed)
        if node.bootstrap is None:
            host = info.public_ip or info.private_ip
            if not host:
                return WorkerStatus("provisioning", detail="node has no address yet")
            node.bootstrap = self._new_bootstrap(handle, info, host, node)
            node.bootstrap.start()
            handle.extra["host"] = host
            return WorkerStatus("provisioning", detail="bootstrapping")
        state = node.bootstrap.poll()
        if state.phase == "failed":
            node.failed = f"bootstrap failed: {state.detail}"
            log.info("worker %s: %s", handle.worker_id, node.failed)  # the reconciler reports it
            return WorkerStatus("exited", returncode=1, detail=node.failed)
        if state.phase == "started":
            node.env = {}  # the token has been handed over; nothing here needs it again
            node.attach = None
            if state.exited is not None:  # an attached process (a sandbox's host) ended with its session
                return WorkerStatus("exited", returncode=state.exited, detail="the attached process ended")
            return WorkerStatus("running")
        return WorkerStatus("provisioning", detail=f"bootstrap: {state.phase}")

    def _new_bootstrap(self, handle: WorkerHandle, info: NodeInfo, host: str, node: _Node) -> Any:
        from cloudmodal.providers.node_bootstrap import NodeBootstrap
        from cloudmodal.providers.node_ssh import SshTarget

        key_path, _ = self.ssh_key()
        env = self.node_env | node.env
        tunnel_port = handle.extra.get("tunnel_port")
        env["CLOUDMODAL_SERVER_URL"] = (
            self.node_server_url if self.node_server_url is not None else f"http://127.0.0.1:{tunnel_port}"
        )
        env.setdefault("CLOUDMODAL_PREEMPTION_SOURCE", self.name)
        return NodeBootstrap(
            target=self._target(info, host, key_path, SshTarget),
            worker_id=handle.worker_id,
            server_url=self.server_url,
            tunnel_port=tunnel_port,
            image=node.image,
            env=env,
            python=self.node_python,
            state_dir=self.state_dir / "bootstrap",
            argv=node.argv or DEFAULT_WORKER_ARGV,
            attach=node.attach,
            source_path=[str(node.image["source_dir"])] if node.image.get("source_dir") else [],
            **self.bootstrap_options,
        )

    def _target(self, info: NodeInfo, host: str, key_path: Path, cls: Any) -> Any:
        return cls(
            host=host,
            port=info.ssh_port,
            user=self.ssh_user or info.ssh_user,
            key_path=key_path,
            ssh_config=self.ssh_config,
            known_hosts=self.state_dir / "ssh" / "known_hosts",
            # each node's host key under its own name: clouds hand a released address to the next node
            host_key_alias=info.ref.cluster,
        )

    def adopt(self, handle: WorkerHandle) -> None:
        """Take over a worker an earlier control plane started (its handle read back from the worker row): the
        node runs; re-open its tunnel when it reaches the control plane through one."""
        port = handle.extra.get("tunnel_port")
        host = handle.extra.get("host")
        if port is None or not host or self.node_server_url is not None:
            return
        from cloudmodal.providers.node_bootstrap import NodeBootstrap
        from cloudmodal.providers.node_ssh import SshTarget

        info = self._info(handle)
        key_path, _ = self.ssh_key()
        boot = NodeBootstrap(
            target=self._target(info or _bare(handle), host, key_path, SshTarget),
            worker_id=handle.worker_id,
            server_url=self.server_url,
            tunnel_port=port,
            image={},
            env={},
            python=self.node_python,
            state_dir=self.state_dir / "bootstrap",
            **self.bootstrap_options,
        )
        boot.reattach()
        with self._lock:
            self._nodes[handle.worker_id] = _Node(bootstrap=boot)

    def terminate(self, handle: WorkerHandle, *, grace_s: float = 10.0) -> None:
        with self._lock:
            node = self._nodes.pop(handle.worker_id, None)
        if node is not None and node.bootstrap is not None:
            node.bootstrap.stop()
        self.discard(handle)

    def discard(self, handle: WorkerHandle) -> None:
        """Terminate the node of ``handle`` alone: a surplus sibling of a hedged launch round, whose worker
        lives on another node (its bootstrap and this process's state of it are the sibling's, and stay)."""
        ref = NodeRef.from_wire(handle.extra["node"])
        self.driver.terminate(ref)
        key = worker_key(handle.worker_id)
        with self._lock:
            if handle.extra.get("sandbox"):
                self._sandboxes.discard(key)
            left = [i for i in self._listed.get(key, ()) if not same_node(i.ref, ref)]
            if left:
                self._listed[key] = left
            else:
                self._listed.pop(key, None)

    def inventory(self, control_plane_id: str) -> list[WorkerHandle]:
        self._refresh(force=True)
        out = []
        with self._lock:
            held = set(self._sandboxes)
        for key, info in ((k, i) for k, infos in self._listed.items() for i in infos):
            if key in held:  # a sandbox of this process: no worker row, alive in this process's memory
                continue
            wid = info.tags.get(TAG_WORKER) or key
            out.append(
                WorkerHandle(
                    worker_id=wid,
                    provider=self.name,
                    instance_id=info.ref.instance_id or info.ref.cluster,
                    offer=None,
                    market="spot" if info.market == "spot" else "on-demand",
                    price_per_hour=0.0,
                    launched_at=0.0,
                    extra={
                        "node": info.ref.to_wire(),
                        "state": info.state,
                        "app_id": info.tags.get(TAG_APP),
                        "function_id": info.tags.get(TAG_FUNCTION),
                    },
                )
            )
        return out

    def close(self) -> None:
        with self._lock:
            nodes = list(self._nodes.values())
        for node in nodes:
            if node.bootstrap is not None:
                node.bootstrap.stop()
        for node in nodes:
            # sandboxes end with their control plane: their nodes go now, not at the next one's inventory
            if node.sandbox_node is not None:
                try:
                    self.driver.terminate(node.sandbox_node)
                except Exception as e:  # the next control plane's inventory deletes it
                    log.warning("terminating sandbox node %s: %s", node.sandbox_node.cluster, e)
        self.driver.close()


def _key_of(info: NodeInfo, control_plane_id: str) -> str | None:
    wid = info.tags.get(TAG_WORKER)
    if wid:
        return worker_key(wid)
    return parse_node_name(info.ref.cluster, control_plane_id)


def _bare(handle: WorkerHandle) -> NodeInfo:
    return NodeInfo(ref=NodeRef.from_wire(handle.extra["node"]), state="unknown")


def ensure_ssh_key(path: Path) -> tuple[Path, str]:
    """An ed25519 key pair at ``path`` (OpenSSH format; made once, 0600 in a 0700 directory)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub_path = path.with_suffix(".pub")
    if path.exists() and pub_path.exists():
        return path, pub_path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.replace(tmp, path)
    line = public.decode() + " cloudmodal"
    pub_path.write_text(line + "\n")
    return path, line
