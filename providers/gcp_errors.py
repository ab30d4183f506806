"""GCP's errors -> cloudmodal's :class:`~cloudmodal.providers.base.ProviderError` tree, for the GCP driver
(:mod:`cloudmodal.providers.gcp`).

One table, :data:`ERRORS`, keyed by GCP's code (the operation's ``error.errors[].code`` or an HTTP error's
``errors[].reason``); ``reason`` is that code. SkyPilot wraps both in ``ProvisionerError`` (its ``.errors``
list), or lets ``googleapiclient.errors.HttpError`` and ``google.auth`` errors through; :func:`map_gcp_error`
walks the exception and its causes, and :func:`gcp_errors` applies it to a block.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cloudmodal.providers.base import (
    CredentialsError,
    NoCapacityError,
    ProviderError,
    QuotaExceededError,
    exception_chain,
)

CREDENTIALS_FIX = (
    "Fix: point GOOGLE_APPLICATION_CREDENTIALS at a service-account key file (`gcloud iam service-accounts "
    "keys create key.json --iam-account=SA_EMAIL`), or run `gcloud auth application-default login`; the "
    "account needs roles/compute.admin, roles/iam.serviceAccountUser and roles/iam.roleViewer on the project "
    "(roles/resourcemanager.projectIamAdmin the first time, for SkyPilot's service account)."
)

ERRORS: dict[str, type[ProviderError]] = {
    # capacity: the zone is out of this machine/GPU now (GCP reports it on the operation)
    "ZONE_RESOURCE_POOL_EXHAUSTED": NoCapacityError,
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": NoCapacityError,
    "resourcePoolExhausted": NoCapacityError,
    "UNSUPPORTED_OPERATION": NoCapacityError,  # e.g. the GPU type is not offered in this zone
    # quota
    "quotaExceeded": QuotaExceededError,
    "QUOTA_EXCEEDED": QuotaExceededError,
    # credentials and permissions (401/403 that are not quota)
    "authError": CredentialsError,
    "required": CredentialsError,
    "forbidden": CredentialsError,
    "insufficientPermissions": CredentialsError,
    "accessNotConfigured": CredentialsError,
    "SERVICE_DISABLED": CredentialsError,
    "PERMISSION_DENIED": CredentialsError,
    "UNAUTHENTICATED": CredentialsError,
    "invalid_grant": CredentialsError,  # google.auth RefreshError from the token endpoint
    "invalid_client": CredentialsError,
    "unauthorized_client": CredentialsError,
    "invalid_scope": CredentialsError,
    "RefreshError": CredentialsError,
    "DefaultCredentialsError": CredentialsError,
}


def gcp_error_codes(exc: BaseException) -> tuple[list[str], int | None, str]:
    """Every GCP code found in ``exc`` and its causes, the HTTP status if any, and GCP's message."""
    codes: list[str] = []
    status: int | None = None
    message = ""
    for e in exception_chain(exc):
        errors = getattr(e, "errors", None)  # sky.provision.common.ProvisionerError
        if isinstance(errors, list):
            for item in errors:
                if isinstance(item, dict):
                    if item.get("code"):
                        codes.append(str(item["code"]))
                    message = message or str(item.get("message") or "")
        resp = getattr(e, "resp", None)  # googleapiclient.errors.HttpError
        if resp is not None and hasattr(e, "error_details"):
            status = status or int(getattr(resp, "status", 0) or 0) or None
            details = getattr(e, "error_details", None)
            if isinstance(details, list):
                for d in details:
                    if isinstance(d, dict) and d.get("reason"):
                        codes.append(str(d["reason"]))
            message = message or str(getattr(e, "reason", "") or "")
        if type(e).__module__.startswith("google.auth"):
            name = type(e).__name__
            if name == "RefreshError":
                # the token endpoint's JSON error ("invalid_grant", ...) is in the message
                m = re.search(r"\b(invalid_grant|invalid_client|unauthorized_client|invalid_scope)\b", str(e))
                codes.append(m.group(1) if m else name)
                message = message or "the OAuth token request was refused"
            elif name == "DefaultCredentialsError":
                codes.append(name)
                message = message or "google.auth found no credentials"
    return codes, status, message


def map_gcp_error(exc: BaseException, *, offer: Any | None = None, doing: str = "") -> ProviderError:
    """One exception from SkyPilot/googleapiclient/google.auth -> our tree (see :data:`ERRORS`)."""
    if isinstance(exc, ProviderError):
        return exc
    codes, status, message = gcp_error_codes(exc)
    code = next((c for c in codes if c in ERRORS), None)
    kind: type[ProviderError] | None = ERRORS.get(code) if code else None
    if kind is None and status in (401, 403):
        kind, code = CredentialsError, code or (codes[0] if codes else str(status))
    where = f" ({doing})" if doing else ""
    text = message or str(exc) or type(exc).__name__
    if kind is not None:
        advice = {
            NoCapacityError: "Another zone or offer may have some.",
            QuotaExceededError: "Fix: request more quota at https://console.cloud.google.com/iam-admin/quotas "
            "(the metric is named in the message), or use another region.",
            CredentialsError: CREDENTIALS_FIX,
        }.get(kind, "")
        what = {
            NoCapacityError: "GCP has no capacity",
            QuotaExceededError: "GCP quota exceeded",
            CredentialsError: "GCP refused the credentials",
        }.get(kind, "GCP request failed")
        return kind(f"{what}{where}: {code}: {text}. {advice}".rstrip(), offer=offer, reason=code)
    reason = codes[0] if codes else type(exc).__name__
    return ProviderError(f"GCP request failed{where}: {reason}: {text}", offer=offer, reason=reason)


@contextmanager
def gcp_errors(*, offer: Any | None = None, doing: str = "") -> Iterator[None]:
    """Map every exception raised inside into the ProviderError tree."""
    try:
        yield
    except ProviderError:
        raise
    except Exception as e:
        raise map_gcp_error(e, offer=offer, doing=doing) from e
