"""The GCP endpoint override: one process-wide wrapper around SkyPilot's Google API client factory
(``sky.adaptors.gcp.build``), for the GCP driver (:mod:`cloudmodal.providers.gcp`).

With it, every Google API client SkyPilot and the driver build goes to
``{api_endpoint}/{service}/{servicePath}`` instead of ``https://{service}.googleapis.com/{servicePath}``
(compute: ``{api_endpoint}/compute/compute/v1/``). It wraps the factory for the whole process (SkyPilot
builds its clients in worker threads too), so every
driver of a process must agree on it. For a private gateway, a proxy, or a local fake.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

_endpoint_lock = threading.Lock()
_endpoint: str | None = None
_endpoint_users = 0


@functools.lru_cache(maxsize=32)
def _service_path(service: str, version: str) -> str:
    """The API's ``servicePath`` from the discovery document bundled with google-api-python-client."""
    from googleapiclient import discovery_cache

    doc = discovery_cache.get_static_doc(service, version)
    return str(json.loads(doc).get("servicePath", "")) if doc else ""


def endpoint_for(root: str, service: str, version: str) -> str:
    """Where ``service`` goes under ``root``: ``{root}/{service}/{servicePath}``."""
    return f"{root.rstrip('/')}/{service}/{_service_path(service, version)}"


def use_api_endpoint(root: str) -> None:
    """Send every Google API client that SkyPilot (``sky.adaptors.gcp.build``) builds to ``root``.

    Process-wide (SkyPilot builds clients in pool threads where no context travels); a second, different
    endpoint in the same process is refused. Undo with :func:`release_api_endpoint`.
    """
    global _endpoint, _endpoint_users
    import sky.adaptors.gcp as adaptor

    with _endpoint_lock:
        if _endpoint is not None and _endpoint != root:
            raise ValueError(
                f"GCP API endpoint {root!r} requested, but this process already sends Google API calls to "
                f"{_endpoint!r}: use one api_endpoint per process (close the other GcpNodes first)."
            )
        if not getattr(adaptor.build, "_cloudmodal_wrapped", False):
            original = adaptor.build

            @functools.wraps(original)
            def build(service_name: str, version: str, *args: Any, **kwargs: Any) -> Any:
                root_now = _endpoint
                if root_now is not None and not kwargs.get("client_options"):
                    kwargs.pop("discoveryServiceUrl", None)  # only the bundled discovery documents
                    kwargs["static_discovery"] = True
                    kwargs["client_options"] = {"api_endpoint": endpoint_for(root_now, service_name, version)}
                return original(service_name, version, *args, **kwargs)

            build._cloudmodal_wrapped = True  # type: ignore[attr-defined]
            adaptor.build = build
        _endpoint = root
        _endpoint_users += 1


def release_api_endpoint() -> None:
    global _endpoint, _endpoint_users
    with _endpoint_lock:
        _endpoint_users = max(0, _endpoint_users - 1)
        if _endpoint_users == 0:
            _endpoint = None
