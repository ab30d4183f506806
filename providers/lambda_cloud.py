"""Lambda Cloud nodes through SkyPilot's Lambda client (``sky.provision.lambda_cloud.lambda_utils``).

Every HTTP request is made by SkyPilot's own ``LambdaCloudClient`` (pinned SkyPilot, see ``_sky``): its
``create_instances`` (which first reads ``GET /instance-types`` for capacity, then ``POST
/instance-operations/launch``), ``list_instances``, ``remove_instances``, ``list_ssh_keys``,
``register_ssh_key`` and ``list_catalog``. Two of SkyPilot's provisioner functions are deliberately not used:

- ``run_instances`` polls until the instance is ``active`` (minutes); a :class:`NodeDriver` must return as
  soon as the launch is accepted. ``create`` therefore calls the client's ``create_instances`` directly — the
  same call ``run_instances`` makes — and returns the instance id Lambda answers at once. The instance is
  named ``<node name>-head`` exactly as ``run_instances`` names a one-node cluster, so SkyPilot's own
  ``query_instances``/``terminate_instances`` for the cluster ``<node name>`` see it too.
- ``query_instances`` maps ``preempted`` to "gone" and ``unhealthy`` to ``INIT``; the driver reads the
  instance list itself (through the client) to keep those states.

Process-wide settings: SkyPilot reads the module constants ``lambda_utils.API_ENDPOINT`` and
``INITIAL_BACKOFF_SECONDS`` on every request; the driver sets them before each operation. Two drivers with
different endpoints in one process would race: use one endpoint per process.

Credentials (nothing is ever written): the ``api_key`` argument, else ``$LAMBDA_API_KEY``, else SkyPilot's
own file ``~/.lambda_cloud/lambda_keys`` (``api_key = <key>``), read by SkyPilot's client. A key from the
argument or the environment is handed to a client object built without reading the file, so no key file is
created. The key never appears in logs or error messages.

Lambda keeps no labels that SkyPilot's client could set: a node is found again by its name
(:func:`~cloudmodal.providers.nodes.node_name`). Lambda has no spot market.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloudmodal.pricing.catalog import CatalogFormatError, CatalogNotFoundError, load_offer_table
from cloudmodal.providers import _sky
from cloudmodal.providers.base import (
    CredentialsError,
    LaunchRequest,
    NoCapacityError,
    ProviderError,
    QuotaExceededError,
    Signal,
)
from cloudmodal.providers.nodes import (
    TAG_CONTROL_PLANE,
    TAG_WORKER,
    NodeDriver,
    NodeInfo,
    NodeRef,
    NodeState,
    parse_node_name,
    worker_key,
)

CLOUD = "lambda"
ENDPOINT_ENV = "CLOUDMODAL_LAMBDA_API_ENDPOINT"
API_KEY_ENV = "LAMBDA_API_KEY"
KEYS_FILE = "~/.lambda_cloud/lambda_keys"  # SkyPilot's ``lambda_utils.CREDENTIALS_PATH``
API_KEYS_URL = "https://cloud.lambda.ai/api-keys"
INSTANCE_SUFFIX = "-head"  # SkyPilot's name for the (only) node of a one-node cluster
MAX_NAME = 64  # Lambda's limit on instance names
SSH_KEY_PREFIX = "cloudmodal-"
RATE_LIMITED = "rate-limited"
SIGNALS_TTL_S = 60.0

# Lambda instance status -> node state (and a detail where the state alone says too little).
STATUS: dict[str, tuple[NodeState, str]] = {
    "booting": ("pending", ""),
    "active": ("running", ""),
    "terminating": ("stopping", ""),
    "terminated": ("terminated", ""),
    "preempted": ("preempted", "Lambda preempted the instance"),
    "unhealthy": ("unknown", "Lambda reports the instance unhealthy"),
}

# Lambda's error ``code`` -> (our error class, retryable or None for the class default, the fix to print).
# ``reason`` is always Lambda's code. Codes not listed here (and not ending in "quota-exceeded") become a
# non-retryable ProviderError.
ERRORS: dict[str, tuple[type[ProviderError], bool | None, str]] = {
    "instance-operations/launch/insufficient-capacity": (
        NoCapacityError,
        None,
        "Lambda has no free capacity for this instance type in this region now; another offer may have.",
    ),
    "global/quota-exceeded": (
        QuotaExceededError,
        None,
        "Ask Lambda Support to raise your quota, or use another offer.",
    ),
    "global/invalid-api-key": (
        CredentialsError,
        None,
        f"Create a new API key at {API_KEYS_URL} and set {API_KEY_ENV} (or {KEYS_FILE}).",
    ),
    "global/unauthorized": (
        CredentialsError,
        None,
        f"Check that the API key has access to this account at {API_KEYS_URL}, then set {API_KEY_ENV}.",
    ),
    "global/account-inactive": (
        CredentialsError,
        None,
        "Verify your email address and add a payment method in the Lambda Cloud dashboard.",
    ),
    "global/invalid-address": (
        CredentialsError,
        None,
        "Fix the billing address in the Lambda Cloud dashboard.",
    ),
    RATE_LIMITED: (
        ProviderError,
        True,
        "Lambda allows about one launch per 12 s; the control plane retries later.",
    ),
    "global/internal-error": (ProviderError, True, "A Lambda server error; retried later."),
    "global/invalid-parameters": (ProviderError, False, "A request cloudmodal built was refused; report it."),
    "global/object-does-not-exist": (
        ProviderError,
        False,
        "The instance type, SSH key or instance no longer exists at Lambda.",
    ),
}

# SkyPilot's LambdaCloudError texts: "<code>: <message>" (API errors and its own capacity pre-check), and
# a fixed sentence once its retries after HTTP 429 are used up.
_CODED = re.compile(r"^(?P<code>[a-z0-9_-]+(?:/[a-z0-9_-]+)+): (?P<message>.*)\Z", re.DOTALL)
_RATE_LIMIT_TEXT = "rate limited"

_utils_module: Any = None
_sky_default_endpoint: str | None = None
_import_lock = threading.Lock()


def _lambda_utils() -> Any:
    """SkyPilot's ``lambda_utils`` (imported once; remembers SkyPilot's default endpoint before we set it)."""
    global _utils_module, _sky_default_endpoint
    with _import_lock:
        if _utils_module is None:
            _sky.provision()  # the version pin and a clear error when SkyPilot is missing
            from sky.provision.lambda_cloud import lambda_utils

            _sky_default_endpoint = str(lambda_utils.API_ENDPOINT)
            _utils_module = lambda_utils
        return _utils_module


def error_from_lambda(text: str, *, offer: Any | None = None, what: str = "the request") -> ProviderError:
    """Our error for the text of a SkyPilot ``LambdaCloudError`` (``"<code>: <message>"``)."""
    m = _CODED.match(text.strip())
    if m is not None:
        code, message = m.group("code"), m.group("message").strip()
    elif _RATE_LIMIT_TEXT in text:
        code, message = RATE_LIMITED, "Lambda Cloud is rate-limiting this account's API requests."
    else:  # no error envelope (a proxy page, a 5xx without JSON...): SkyPilot's text says what came back
        return ProviderError(
            f"Lambda Cloud gave an unexpected answer to {what}: {text}",
            offer=offer,
            reason="bad-response",
            retryable=bool(re.search(r"Status code: 5\d\d", text)),
        )
    entry = ERRORS.get(code)
    if entry is None and code.endswith("quota-exceeded"):
        entry = ERRORS["global/quota-exceeded"]
    if entry is None:
        return ProviderError(f"Lambda Cloud refused {what} ({code}): {message}", offer=offer, reason=code)
    cls, retryable, fix = entry
    return cls(
        f"Lambda Cloud refused {what} ({code}): {message} {fix}",
        offer=offer,
        reason=code,
        retryable=retryable,
    )


def _field(offer: Any, name: str) -> Any:
    return offer.get(name) if isinstance(offer, dict) else getattr(offer, name, None)


def ssh_key_name(public_key: str) -> str:
    """The Lambda SSH key name for ``public_key``: ``cloudmodal-`` + 16 hex of its SHA-256 fingerprint."""
    return SSH_KEY_PREFIX + hashlib.sha256(_key_blob(public_key)).hexdigest()[:16]


def _key_blob(public_key: str) -> bytes:
    """The decoded key of an OpenSSH public key line (``type base64 [comment]``)."""
    parts = public_key.strip().split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line")
    try:
        return base64.b64decode(parts[1], validate=True)
    except binascii.Error as e:
        raise ValueError("not an OpenSSH public key line") from e


class LambdaNodes(NodeDriver):
    """Lambda Cloud nodes (one instance per node) through SkyPilot's Lambda client; thread-safe."""

    cloud = CLOUD

    def __init__(
        self,
        *,
        api_endpoint: str | None = None,
        api_key: str | None = None,
        catalog_dir: str | os.PathLike[str] | None = None,
        rate_limit_backoff_s: float | None = None,
        signals_ttl_s: float = SIGNALS_TTL_S,
    ) -> None:
        """``api_endpoint``: the API base with ``/api/v1`` (default ``$CLOUDMODAL_LAMBDA_API_ENDPOINT``, else
        SkyPilot's). ``api_key``: overrides ``$LAMBDA_API_KEY`` and the keys file. ``rate_limit_backoff_s``:
        SkyPilot's first wait after an HTTP 429 (its default 10 s; it retries up to 6 times, growing x1.6)."""
        self._endpoint_arg = api_endpoint or os.environ.get(ENDPOINT_ENV) or None
        self._api_key_arg = api_key
        self._catalog_dir = catalog_dir
        self._backoff = rate_limit_backoff_s
        self._signals_ttl = signals_ttl_s
        self._lock = threading.Lock()
        self._key_lock = threading.Lock()  # one SSH key registration at a time (same key, parallel creates)
        self._signals: tuple[float, list[Signal]] | None = None
        self._known_keys: dict[str, str] = {}  # fingerprint name -> name registered at Lambda

    # --- plumbing ---------------------------------------------------------------------------------------

    @property
    def api_endpoint(self) -> str:
        if self._endpoint_arg:
            return self._endpoint_arg.rstrip("/")
        _lambda_utils()
        return str(_sky_default_endpoint)

    def _utils(self) -> Any:
        """SkyPilot's ``lambda_utils`` with this driver's endpoint and backoff applied."""
        lu = _lambda_utils()
        lu.API_ENDPOINT = self.api_endpoint
        if self._backoff is not None:
            lu.INITIAL_BACKOFF_SECONDS = self._backoff
        return lu

    def _find_key(self) -> tuple[str | None, str]:
        """(the API key or None, where it comes from / where it was looked for)."""
        if self._api_key_arg:
            return self._api_key_arg, "the api_key argument"
        env = os.environ.get(API_KEY_ENV, "").strip()
        if env:
            return env, f"${API_KEY_ENV}"
        path = Path(os.path.expanduser(KEYS_FILE))
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return None, str(path)
        # SkyPilot's parser: lines "name = value"; only a non-empty api_key counts.
        for line in text.splitlines():
            name, sep, value = line.strip().partition(" = ")
            if sep and name == "api_key" and value.strip():
                return value.strip(), str(path)
        return None, str(path)

    def _missing_key_message(self, looked: str) -> str:
        return (
            f"No Lambda Cloud API key ({API_KEY_ENV} is unset and {looked} has no `api_key = <key>` line). "
            f"Create a key at {API_KEYS_URL}, then `export {API_KEY_ENV}=<key>`, or run "
            "`mkdir -p ~/.lambda_cloud && (umask 077 && echo 'api_key = <key>' > ~/.lambda_cloud/lambda_keys)`."
        )

    def _client(self) -> Any:
        """SkyPilot's ``LambdaCloudClient`` for this driver's key (a cheap object: built per operation, so a
        rotated key is picked up)."""
        lu = self._utils()
        key, source = self._find_key()
        if key is None:
            raise CredentialsError(self._missing_key_message(source), reason="no-api-key")
        if source == str(Path(os.path.expanduser(KEYS_FILE))):
            return lu.LambdaCloudClient()  # SkyPilot reads its own file
        # A key from the argument or the environment: the same client, without its file read (nothing is
        # written to disk). Attributes as LambdaCloudClient.__init__ sets them (SkyPilot is pinned).
        client = object.__new__(lu.LambdaCloudClient)
        client.credentials = ""
        client._credentials = {"api_key": key}
        client.api_key = key
        client.headers = {"Authorization": f"Bearer {key}"}
        return client

    @contextmanager
    def _mapped(self, what: str, offer: Any | None = None) -> Iterator[None]:
        """SkyPilot's and requests' exceptions -> the ProviderError tree (the one place that maps them)."""
        lu = _lambda_utils()
        import requests

        try:
            yield
        except ProviderError:
            raise
        except lu.LambdaCloudError as e:
            raise error_from_lambda(str(e), offer=offer, what=what) from e
        except requests.RequestException as e:
            raise ProviderError(
                f"Could not reach Lambda Cloud at {self.api_endpoint} for {what} ({type(e).__name__}); "
                "check the network (or the endpoint setting) — retried later.",
                offer=offer,
                reason="connection-error",
                retryable=True,
            ) from e

    # --- NodeDriver ---------------------------------------------------------------------------------------

    def offers(self) -> list[Any]:
        return [o for o in load_offer_table(self._catalog_dir) if o.cloud == CLOUD]

    def check(self) -> tuple[bool, str]:
        key, source = self._find_key()
        if key is None:
            return False, self._missing_key_message(source)
        try:
            with self._mapped("listing instance types"):
                types = self._client().list_catalog()
        except CredentialsError as e:
            return False, (
                f"Lambda Cloud refused the API key from {source} ({e.reason}). Create a new key at "
                f"{API_KEYS_URL} and set {API_KEY_ENV} (or the `api_key = <key>` line of {KEYS_FILE})."
            )
        except ProviderError as e:
            return False, f"Lambda Cloud at {self.api_endpoint} could not be checked: {e.message}"
        return True, f"Lambda Cloud API key from {source} works ({len(types)} instance types listed)."

    def create(
        self,
        req: LaunchRequest,
        *,
        name: str,
        tags: dict[str, str],
        ssh_public_key: str,
    ) -> NodeRef:
        """Register ``ssh_public_key`` (once; named by its fingerprint), then launch one instance named
        ``<name>-head`` and return as soon as Lambda answers its id (the instance is still ``booting``).
        ``tags`` are not stored (Lambda keeps none through SkyPilot's client): ``name`` must encode them."""
        offer = req.offer
        if req.market == "spot":
            raise ProviderError(
                "Lambda Cloud has no spot market: ask for market 'on-demand' on Lambda offers.",
                offer=offer,
                reason="no-spot-market",
                retryable=False,
            )
        region, instance_type = _field(offer, "region"), _field(offer, "instance_type")
        if offer is None or not region or not instance_type or _field(offer, "cloud") not in (CLOUD, None):
            raise ProviderError(
                f"A Lambda node needs a Lambda offer (region and instance type); got {offer!r}.",
                offer=offer,
                reason="no-offer",
                retryable=False,
            )
        cp = tags.get(TAG_CONTROL_PLANE)
        if cp and parse_node_name(name, cp) is None:
            # list() finds Lambda nodes by name only: a name from elsewhere would leak the node.
            raise ValueError(f"node name {name!r} is not nodes.node_name({cp!r}, <worker id>)")
        instance_name = name + INSTANCE_SUFFIX
        if len(instance_name) > MAX_NAME:
            raise ProviderError(
                f"Node name {name!r} is too long for Lambda (instance names are at most {MAX_NAME} characters "
                f"with the {INSTANCE_SUFFIX!r} suffix): use a shorter worker id.",
                offer=offer,
                reason="name-too-long",
                retryable=False,
            )
        try:
            wanted_key = ssh_key_name(ssh_public_key)
        except ValueError:
            raise ProviderError(
                "The SSH public key for the node is not an OpenSSH public key line (`ssh-ed25519 AAAA...`).",
                offer=offer,
                reason="invalid-ssh-key",
                retryable=False,
            ) from None
        what = f"the launch of {instance_type} in {region}"
        with self._mapped(what, offer):
            lu = _lambda_utils()
            client = self._client()
            key_name = self._ensure_ssh_key(client, wanted_key, ssh_public_key)
            try:
                # The launch call SkyPilot's run_instances makes, without run_instances' wait for "active".
                ids = client.create_instances(
                    instance_type=instance_type,
                    region=region,
                    quantity=1,
                    name=instance_name,
                    ssh_key_name=key_name,
                )
            except KeyError as e:
                # SkyPilot indexes GET /instance-types by the type: a type Lambda does not offer (any more).
                if e.args and e.args[0] == instance_type:
                    raise NoCapacityError(
                        f"Lambda Cloud does not offer {instance_type} now (not in its instance types); "
                        "refresh the price catalog (`cloudmodal pricing refresh`) or pick another offer.",
                        offer=offer,
                        reason="instance-type-not-offered",
                    ) from None
                raise
            except lu.LambdaCloudError as e:
                if "object-does-not-exist" in str(e):
                    with self._lock:  # the key may have been deleted at Lambda: look again next time
                        self._known_keys.pop(wanted_key, None)
                raise
        if not ids:
            raise ProviderError(
                f"Lambda Cloud accepted {what} but returned no instance id; the control plane's inventory "
                "finds the node by its name.",
                offer=offer,
                reason="no-instance-id",
                retryable=True,
            )
        return NodeRef(cloud=CLOUD, region=str(region), zone=None, cluster=name, instance_id=str(ids[0]))

    def _ensure_ssh_key(self, client: Any, wanted: str, public_key: str) -> str:
        """The name under which ``public_key`` is registered at Lambda, registering it if needed."""
        with self._key_lock:
            return self._ensure_ssh_key_locked(client, wanted, public_key)

    def _ensure_ssh_key_locked(self, client: Any, wanted: str, public_key: str) -> str:
        with self._lock:
            known = self._known_keys.get(wanted)
        if known is not None:
            return known
        blob = _key_blob(public_key)
        name = None
        for key in client.list_ssh_keys():
            try:
                same = _key_blob(str(key.get("public_key", ""))) == blob
            except ValueError:
                same = False
            if same:
                name = str(key["name"])
                break
            if key.get("name") == wanted:
                raise ProviderError(
                    f"A different SSH key is registered at Lambda under cloudmodal's name {wanted!r}: delete it "
                    "in the Lambda Cloud dashboard (SSH keys).",
                    reason="ssh-key-name-taken",
                    retryable=False,
                )
        if name is None:
            client.register_ssh_key(wanted, public_key.strip())
            name = wanted
        with self._lock:
            self._known_keys[wanted] = name
        return name

    def list(self, tags: dict[str, str]) -> list[NodeInfo]:
        """Every not-terminated instance whose name is one of this control plane's nodes. Lambda keeps no
        tags: only ``TAG_CONTROL_PLANE`` (required) and ``TAG_WORKER`` can be matched; other keys are
        ignored."""
        cp = tags.get(TAG_CONTROL_PLANE)
        if not cp:
            raise ValueError(f"LambdaNodes.list needs the {TAG_CONTROL_PLANE!r} tag")
        want = worker_key(tags[TAG_WORKER]) if tags.get(TAG_WORKER) else None
        with self._mapped("listing instances"):
            instances = self._client().list_instances()
        out = []
        for inst in instances:
            key = parse_node_name(str(inst.get("name") or ""), cp)
            if key is None or (want is not None and key != want) or inst.get("status") == "terminated":
                continue
            out.append(self._info(inst, {TAG_CONTROL_PLANE: cp, TAG_WORKER: key}))
        return out

    def query(self, ref: NodeRef) -> NodeInfo:
        with self._mapped("listing instances"):
            instances = self._client().list_instances()
        inst = self._find(instances, ref)
        if inst is None:
            return NodeInfo(ref=ref, state="terminated", detail="Lambda Cloud no longer lists the instance")
        return self._info(inst, {})

    def terminate(self, ref: NodeRef) -> None:
        with self._mapped("listing instances"):
            client = self._client()
            instances = client.list_instances()
        names = {ref.cluster, ref.cluster + INSTANCE_SUFFIX}
        ids = [
            str(i["id"])
            for i in instances
            if (i.get("id") == ref.instance_id or (i.get("name") in names and ref.instance_id is None))
            and i.get("status") not in ("terminating", "terminated")
        ]
        if not ids:
            return  # already gone or going: idempotent
        try:
            with self._mapped(f"terminating {ref.cluster}"):
                client.remove_instances(ids)
        except ProviderError as e:
            if e.reason != "global/object-does-not-exist":  # it vanished between the list and the terminate
                raise

    def signals(self) -> builtins.list[Signal]:
        """One signal per (instance type, region): whether Lambda has capacity there now, from ``GET
        /instance-types``, cached ``signals_ttl_s``. Regions without capacity come from the catalog (absent
        catalog: only regions with capacity are reported)."""
        with self._lock:
            cached = self._signals
        if cached is not None and time.monotonic() - cached[0] < self._signals_ttl:
            return list(cached[1])
        with self._mapped("listing instance types"):
            types = self._client().list_catalog()
        observed = time.time()
        regions: dict[str, set[str]] = {}
        gpus: dict[str, str] = {}
        try:
            for o in self.offers():
                regions.setdefault(o.instance_type, set()).add(o.region)
                gpus[o.instance_type] = o.gpu
        except (CatalogNotFoundError, CatalogFormatError, OSError):
            pass  # no usable catalog: only the regions Lambda reports with capacity
        out: list[Signal] = []
        for type_name, item in sorted(types.items()):
            itype = item.get("instance_type") or {}
            available = {str(r.get("name")) for r in item.get("regions_with_capacity_available") or []}
            cents = itype.get("price_cents_per_hour")
            gpu = gpus.get(type_name) or (itype.get("gpu_description") or None)
            for region in sorted(available | regions.get(type_name, set())):
                out.append(
                    Signal(
                        cloud=CLOUD,
                        region=region,
                        instance_type=type_name,
                        gpu=gpu,
                        available=region in available,
                        price_ondemand=cents / 100 if isinstance(cents, int | float) else None,
                        observed_at=observed,
                    )
                )
        with self._lock:
            self._signals = (time.monotonic(), out)
        return list(out)

    # --- helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def _find(instances: builtins.list[dict[str, Any]], ref: NodeRef) -> dict[str, Any] | None:
        if ref.instance_id:
            return next((i for i in instances if i.get("id") == ref.instance_id), None)
        names = {ref.cluster, ref.cluster + INSTANCE_SUFFIX}
        found = [i for i in instances if i.get("name") in names]
        # Prefer a live one when a name was reused.
        found.sort(key=lambda i: i.get("status") in ("terminating", "terminated"))
        return found[0] if found else None

    @staticmethod
    def _info(inst: dict[str, Any], tags: dict[str, str]) -> NodeInfo:
        status = str(inst.get("status") or "")
        state, detail = STATUS.get(status, ("unknown", f"Lambda status {status!r}"))
        name = str(inst.get("name") or "")
        cluster = name[: -len(INSTANCE_SUFFIX)] if name.endswith(INSTANCE_SUFFIX) else name
        region = str((inst.get("region") or {}).get("name") or "")
        ref = NodeRef(cloud=CLOUD, region=region, zone=None, cluster=cluster, instance_id=str(inst["id"]))
        return NodeInfo(
            ref=ref,
            state=state,
            public_ip=inst.get("ip"),
            private_ip=inst.get("private_ip"),
            ssh_user="ubuntu",
            ssh_port=22,
            market="on-demand",
            instance_type=(inst.get("instance_type") or {}).get("name"),
            tags=tags,
            detail=detail,
        )
