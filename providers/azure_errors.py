"""Azure's errors -> cloudmodal's :class:`~cloudmodal.providers.base.ProviderError` tree, for the Azure
driver (:mod:`cloudmodal.providers.azure`).

One table of Azure error codes (first match wins; some codes count only when their message says so), walked
over the exception and everything it wraps; ``reason`` is Azure's code. :data:`LOGIN_FIX` is the fix the
driver gives for missing or refused credentials.
"""

from __future__ import annotations

from typing import Any

from cloudmodal.providers.base import (
    CredentialsError,
    LaunchTimeoutError,
    NoCapacityError,
    ProviderError,
    QuotaExceededError,
    exception_chain,
)

LOGIN_FIX = (
    "run `az login` (Azure CLI: https://aka.ms/InstallAzureCLIDeb, or `pip install azure-cli`), or set "
    "AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service principal"
)

# Azure error code -> (our error, words the message must contain or None). First match wins.
_ERROR_TABLE: tuple[tuple[str, type[ProviderError], str | None], ...] = (
    ("AllocationFailed", NoCapacityError, None),
    ("ZonalAllocationFailed", NoCapacityError, None),
    ("OverconstrainedAllocationRequest", NoCapacityError, None),
    ("OverconstrainedZonalAllocationRequest", NoCapacityError, None),
    ("SkuNotAvailable", NoCapacityError, None),
    ("OperationNotAllowed", QuotaExceededError, "quota"),
    ("QuotaExceeded", QuotaExceededError, None),
    ("InvalidAuthenticationToken", CredentialsError, None),
    ("ExpiredAuthenticationToken", CredentialsError, None),
    ("InvalidAuthenticationTokenTenant", CredentialsError, None),
    ("AuthenticationFailed", CredentialsError, None),
    ("AuthorizationFailed", CredentialsError, None),
    ("SubscriptionNotFound", CredentialsError, None),
)

_FIXES: dict[type[ProviderError], str] = {
    NoCapacityError: "Azure has no capacity for it there now; cloudmodal tries the next offer",
    QuotaExceededError: (
        "request a vCPU quota increase for this VM family in this region (Azure portal: Subscriptions → "
        "Usage + quotas, or https://aka.ms/ProdCoresQuotaIncrease), or use another region or size"
    ),
    CredentialsError: LOGIN_FIX + ", and make sure the account has the Contributor role on the subscription",
}


def azure_error_code(exc: BaseException) -> tuple[str | None, str, BaseException | None]:
    """The Azure error code and message in ``exc``'s chain, and the SDK exception carrying them."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    for e in exception_chain(exc):
        if isinstance(e, HttpResponseError):
            err = getattr(e, "error", None)
            code = getattr(err, "code", None)
            message = str(getattr(err, "message", None) or e.message or "")
            if code is None and isinstance(e, ClientAuthenticationError):
                code = type(e).__name__
            return code, message, e
    return None, "", None


def map_azure_error(exc: BaseException, *, offer: Any | None = None, doing: str) -> ProviderError:
    """The :class:`ProviderError` for an exception out of SkyPilot or the SDK (``reason`` = Azure's code)."""
    if isinstance(exc, ProviderError):
        return exc
    from azure.core.exceptions import ClientAuthenticationError

    code, message, sdk_exc = azure_error_code(exc)
    where = f" ({offer.instance_type} in {offer.region})" if offer is not None else ""
    target: type[ProviderError] | None = None
    if code is not None:
        for table_code, cls, words in _ERROR_TABLE:
            if code == table_code and (words is None or words in message.lower()):
                target = cls
                break
    if target is None and isinstance(sdk_exc, ClientAuthenticationError):
        target = CredentialsError
    if target is not None:
        text = f"Azure refused to {doing}{where}: {code}: {message.strip()} — {_FIXES[target]}."
        return target(text, offer=offer, reason=code)
    if code is not None:
        return ProviderError(
            f"Azure failed to {doing}{where}: {code}: {message.strip()}", offer=offer, reason=code
        )
    if any(isinstance(e, TimeoutError) for e in exception_chain(exc)):
        return LaunchTimeoutError(f"Azure timed out to {doing}{where}: {exc}", offer=offer, reason="timeout")
    return ProviderError(
        f"Azure failed to {doing}{where}: {type(exc).__name__}: {exc}", offer=offer, reason=type(exc).__name__
    )
