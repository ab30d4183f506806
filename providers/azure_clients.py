"""How SkyPilot's Azure code gets its SDK clients: the one seam into SkyPilot (SkyPilot-internal, pinned) for
the Azure driver (:mod:`cloudmodal.providers.azure`), installed by :func:`install_client_seam`.

SkyPilot builds every azure-mgmt client in ``sky.adaptors.azure.get_client(name, subscription_id)`` with the
Azure CLI credential and no options. The driver replaces that function, for the subscriptions drivers
registered, with one that builds the clients itself: the credential (az CLI login, or a service principal from
``AZURE_CLIENT_ID`` / ``AZURE_TENANT_ID`` / ``AZURE_CLIENT_SECRET``), and the driver's ARM options —
``arm_endpoint`` (env ``CLOUDMODAL_AZURE_ARM_ENDPOINT``; e.g. a sovereign cloud's ARM, or a local fake),
``arm_ca_bundle`` (env ``CLOUDMODAL_AZURE_ARM_CA_BUNDLE``; a CA file to verify that endpoint's TLS
certificate), ``arm_retry_total`` and ``arm_polling_interval`` (the SDK's retry count and seconds between
polls of a long-running operation; SDK defaults when None). Other subscriptions and clients fall through to
SkyPilot's own function.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArmTarget:
    """How to build ARM clients for one subscription."""

    endpoint: str | None = None
    ca_bundle: str | None = None
    retry_total: int | None = None
    polling_interval: float | None = None
    service_principal: bool = False


_seam_lock = threading.RLock()
_targets: dict[str, ArmTarget] = {}
_clients: dict[tuple[str, str, ArmTarget], Any] = {}
_original: dict[str, Any] = {}


def _client_class(name: str) -> Any:
    if name == "compute":
        from azure.mgmt.compute import ComputeManagementClient

        return ComputeManagementClient
    if name == "network":
        from azure.mgmt.network import NetworkManagementClient

        return NetworkManagementClient
    if name == "resource":
        from azure.mgmt.resource import ResourceManagementClient

        return ResourceManagementClient
    if name == "msi":
        from azure.mgmt.msi import ManagedServiceIdentityClient

        return ManagedServiceIdentityClient
    if name == "authorization":
        from azure.mgmt.authorization import AuthorizationManagementClient

        return AuthorizationManagementClient
    return None


def _build_client(name: str, subscription_id: str, target: ArmTarget) -> Any:
    from azure import identity

    cls = _client_class(name)
    credential: Any = (
        identity.EnvironmentCredential()
        if target.service_principal
        else identity.AzureCliCredential(process_timeout=30)
    )
    kwargs: dict[str, Any] = {}
    if target.endpoint:
        kwargs["base_url"] = target.endpoint
    if target.ca_bundle:
        kwargs["connection_verify"] = target.ca_bundle
    if target.retry_total is not None:
        kwargs["retry_total"] = target.retry_total
    if target.polling_interval is not None:
        kwargs["polling_interval"] = target.polling_interval
    return cls(credential, subscription_id, **kwargs)


def _get_client(name: str, subscription_id: str | None = None, **kwargs: Any) -> Any:
    """Replaces ``sky.adaptors.azure.get_client``: the driver's clients for registered subscriptions."""
    target = _targets.get(subscription_id or "")
    if target is None or kwargs or _client_class(name) is None:
        return _original["get_client"](name, subscription_id, **kwargs)
    key = (name, subscription_id or "", target)
    with _seam_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _build_client(name, subscription_id or "", target)
        return client


def _cache_clear() -> None:
    with _seam_lock:
        _clients.clear()
    _original["get_client"].cache_clear()


_get_client.cache_clear = _cache_clear  # type: ignore[attr-defined]  # SkyPilot calls it


def _get_subscription_id() -> str:
    """Replaces ``sky.adaptors.azure.get_subscription_id`` (SkyPilot's ``get_cluster_info`` evaluates it even
    when the provider config names the subscription): the registered subscription when there is one."""
    with _seam_lock:
        subs = list(_targets)
    if len(subs) == 1:
        return subs[0]
    return str(_original["get_subscription_id"]())


def install_client_seam(subscription_id: str, target: ArmTarget) -> None:
    """Route SkyPilot's Azure clients for ``subscription_id`` through :func:`_get_client` (idempotent)."""
    import sky.adaptors.azure as adaptor

    with _seam_lock:
        if "get_client" not in _original:
            _original["get_client"] = adaptor.get_client
            _original["get_subscription_id"] = adaptor.get_subscription_id
            adaptor.get_client = _get_client
            adaptor.get_subscription_id = _get_subscription_id
        if _targets.get(subscription_id) != target:
            _targets[subscription_id] = target
            for key in [k for k in _clients if k[1] == subscription_id]:
                del _clients[key]
