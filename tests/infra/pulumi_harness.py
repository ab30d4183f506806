"""Running an ``infra/`` Pulumi program offline under ``pulumi.runtime.set_mocks``, and the checkers the cloud
tests apply to what it declared.

:func:`run_program` records every resource the program registers (its type token, logical name and resolved
inputs, as the engine would receive them) and the stack outputs it exports. The checkers are pure functions
over that record, so each one's negative control is the same function fed a deliberately bad record.

Pulumi's runtime state is global to the process (its settings and the root stack are module globals):
:func:`run_program` resets both before every run, so tests may run in any order, one per process or many
(pytest-xdist gives each worker its own process).
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import ipaddress
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest

pulumi = pytest.importorskip(
    "pulumi", reason="the pulumi extra is not installed: pip install 'cloudmodal[pulumi]'"
)

from cloudmodal.infra.common import TAG_KEY, InfraConfig, program_for  # noqa: E402


@dataclass
class Res:
    type: str
    name: str
    inputs: dict[str, Any]


@dataclass
class Run:
    resources: list[Res]
    outputs: dict[str, Any] = field(default_factory=dict)

    def of_type(self, type_: str) -> list[Res]:
        return [r for r in self.resources if r.type == type_]

    def one(self, type_: str) -> Res:
        found = self.of_type(type_)
        assert len(found) == 1, f"expected one {type_}, got {[r.name for r in found]}"
        return found[0]

    def bad_copy(self) -> Run:
        """A deep copy, for a negative control to spoil."""
        return copy.deepcopy(self)


# computed outputs the programs read, per type token: a stand-in value derived from the logical name
def _computed(type_: str, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if type_.startswith("aws:"):
        out["arn"] = f"arn:aws:{type_.split(':')[1].split('/')[0]}:::{name}"
        if type_ == "aws:s3/bucket:Bucket":
            out["bucket"] = f"{inputs.get('bucketPrefix', '')}{name}-0001"
            out["arn"] = f"arn:aws:s3:::{out['bucket']}"
        if type_ == "aws:ec2/eip:Eip":
            out["publicIp"] = "198.51.100.10"
            out["allocationId"] = "eipalloc-1"
        if type_ == "aws:ec2/keyPair:KeyPair":
            out["keyName"] = name
        out.setdefault("name", inputs.get("name", f"{name}-0001"))
    elif type_.startswith("gcp:"):
        out["name"] = inputs.get("name", f"{name}-0001")
        out["selfLink"] = f"https://www.googleapis.com/compute/v1/{name}"
        if type_ == "gcp:serviceaccount/account:Account":
            out["email"] = f"{inputs.get('accountId')}@{inputs.get('project')}.iam.gserviceaccount.com"
            out["member"] = f"serviceAccount:{out['email']}"
        if type_ == "gcp:compute/address:Address":
            out["address"] = "198.51.100.20"
    elif type_.startswith("azure-native:"):
        out["name"] = inputs.get("accountName") or inputs.get("resourceName") or inputs.get("name") or name
        if type_ == "azure-native:managedidentity:UserAssignedIdentity":
            out["principalId"] = "00000000-0000-0000-0000-00000000beef"
            out["clientId"] = "00000000-0000-0000-0000-00000000c11e"
        if type_ == "azure-native:compute:VirtualMachine" and "identity" in inputs:
            # the identities go in as a list of ids and come back as a map keyed by them
            ids = inputs["identity"].get("userAssignedIdentities") or []
            out["identity"] = {**inputs["identity"], "userAssignedIdentities": {i: {} for i in ids}}
        if type_ == "azure-native:network:PublicIPAddress":
            out["ipAddress"] = "198.51.100.30"
    return out


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self, calls: dict[str, dict[str, Any]]) -> None:
        self.resources: list[Res] = []
        self.calls = calls

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(Res(args.typ, args.name, copy.deepcopy(args.inputs)))
        state = {**args.inputs, **_computed(args.typ, args.name, args.inputs)}
        rid = state.get("id") or f"/mock/{args.typ}/{args.name}"
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        if args.token not in self.calls:
            raise AssertionError(f"the program called {args.token}: give the mocks an answer for it")
        return self.calls[args.token], []


def run_program(cfg: InfraConfig, calls: dict[str, dict[str, Any]] | None = None) -> Run:
    """Run ``cfg``'s program under fresh mocks; the resources it declared and the outputs it exported."""
    # Pulumi's mocks run on the thread's current event loop and read asyncio's own loop internals: give them a
    # plain asyncio loop of their own (an earlier test in the same process may have left none, or installed
    # uvicorn's uvloop policy, whose loops Pulumi cannot drive)
    loop = asyncio.SelectorEventLoop()
    asyncio.set_event_loop(loop)
    try:
        mocks = RecordingMocks(calls or {})
        pulumi.runtime.settings.reset_options()  # a new root stack: outputs of an earlier run must not leak in
        pulumi.runtime.set_mocks(mocks, project="cloudmodal-test", stack="test", preview=False)
        program = program_for(cfg.cloud)
        exported: dict[str, Any] = {}

        @pulumi.runtime.test
        def go() -> Any:
            program(cfg)
            stack = pulumi.runtime.get_root_resource()
            outputs = dict(stack.outputs)  # type: ignore
            return pulumi.Output.all(**outputs).apply(exported.update)

        go()
        return Run(mocks.resources, exported)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def program_fixtures(
    plain: InfraConfig, hosted: InfraConfig, calls: dict[str, dict[str, Any]] | None = None
) -> Any:
    """The module-scoped fixtures ``plain`` and ``hosted``: the records of a program run with each config. A test
    module binds them to names of its own (``plain_run, hosted_run = program_fixtures(...)``) so pytest finds
    them."""

    @pytest.fixture(scope="module", name="plain")
    def plain_run() -> Run:
        return run_program(plain, calls)

    @pytest.fixture(scope="module", name="hosted")
    def hosted_run() -> Run:
        return run_program(hosted, calls)

    return plain_run, hosted_run


def spoil(run: Run, type_: str, change: Any) -> Run:
    """A copy of ``run`` with ``change`` applied to the inputs of every resource of ``type_``."""
    bad = run.bad_copy()
    for r in bad.of_type(type_):
        change(r.inputs)
    return bad


# --- checkers shared by the clouds ----------------------------------------------------------------------------


def resource_class(type_: str) -> type | None:
    """The SDK class of a type token (``aws:s3/bucket:Bucket`` → ``pulumi_aws.s3.Bucket``), or None."""
    package, module, cls = type_.split(":")
    if package == "pulumi":
        return None
    mod_name = {"aws": "pulumi_aws", "gcp": "pulumi_gcp", "azure-native": "pulumi_azure_native"}[package]
    sub = module.split("/")[0]
    with warnings.catch_warnings():  # a module's deprecated classes warn as it loads
        warnings.simplefilter("ignore", DeprecationWarning)
        mod = importlib.import_module(mod_name if sub == "index" else f"{mod_name}.{sub}")
        return getattr(mod, cls, None)


def tag_field(type_: str) -> str | None:
    """The input that takes tags (labels on GCP) on this resource type, or None if it takes none."""
    cls = resource_class(type_)
    if cls is None:
        return None
    params = inspect.signature(cls._internal_init).parameters  # type: ignore[attr-defined]
    # GCP's resources take labels; their "tags" (an instance's network tags) are something else
    for name in ("labels",) if type_.startswith("gcp:") else ("tags",):
        if name in params:
            return name
    return None


def check_tagged(run: Run) -> None:
    """Every resource whose type takes tags (labels) carries ``cloudmodal-infra``; and at least one does."""
    tagged = 0
    for r in run.resources:
        fld = tag_field(r.type)
        if fld is None:
            continue
        tags = r.inputs.get(fld) or {}
        assert TAG_KEY in tags, f"{r.type} {r.name} has no {TAG_KEY} {fld}: {tags}"
        tagged += 1
    assert tagged, "no taggable resource at all"


WORLD = {"0.0.0.0/0", "::/0", "*", "Internet", "Any", "0.0.0.0"}


@dataclass
class Ingress:
    """One inbound allow rule, whatever the cloud: where it applies (``nodes`` or ``control``), its protocol,
    ports (inclusive; None: all) and sources (CIDRs, or ``group:…`` for a cloud's own references)."""

    where: str
    protocol: str
    ports: tuple[int, int] | None
    sources: list[str]


def _covers(ports: tuple[int, int] | None, port: int) -> bool:
    return ports is None or ports[0] <= port <= ports[1]


def check_ingress(rules: list[Ingress], cfg: InfraConfig, internal: list[str]) -> None:
    """Nothing open to the world but the control plane's port on the control host (and nothing at all without
    one); SSH only from ``control_plane_cidrs`` (workers) or ``admin_cidrs`` (the control host); any other
    rule only from the program's own private ranges or groups."""
    ssh = set(cfg.ssh_cidrs())
    admin = set(cfg.admin_ssh_cidrs())
    own = [ipaddress.ip_network(c) for c in internal]
    for r in rules:
        for src in r.sources:
            if src.startswith("group:"):
                continue
            if src in WORLD:
                assert cfg.with_control_host, f"{r} is open to the world and there is no control host"
                assert r.where == "control", f"{r} opens a worker to the world"
                assert r.protocol.lower() == "tcp" and r.ports == (cfg.control_plane_port,) * 2, (
                    f"{r} opens more than the control plane's port {cfg.control_plane_port} to the world"
                )
                continue
            net = ipaddress.ip_network(src)
            if any(net.version == o.version and net.subnet_of(o) for o in own):  # type: ignore[arg-type]
                continue
            allowed = ssh if r.where == "nodes" else admin
            assert str(net) in allowed, (
                f"{r}: {src} is neither {sorted(allowed)} nor the program's own network"
            )
            assert r.protocol.lower() == "tcp" and r.ports == (22, 22), f"{r}: {src} may reach more than SSH"
    # SSH to workers is open from each control-plane CIDR
    for cidr in ssh:
        assert any(r.where == "nodes" and cidr in r.sources and _covers(r.ports, 22) for r in rules), (
            f"no rule lets the control plane at {cidr} SSH to workers"
        )
