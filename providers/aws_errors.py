"""EC2's errors -> cloudmodal's :class:`~cloudmodal.providers.base.ProviderError` tree, for the AWS driver
(:mod:`cloudmodal.providers.aws`).

One table, :data:`ERRORS`, keyed by EC2's error code; ``reason`` is that code. :func:`map_aws_error` finds the
code in the exception's chain (SkyPilot wraps boto's ``ClientError`` in ``RuntimeError`` or ``SystemExit``)
and also names botocore's credential and network failures; :func:`aws_errors` applies it to a block.
"""

from __future__ import annotations

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
    "Fix: run `aws configure` (writes ~/.aws/credentials), or set AWS_PROFILE=<profile> for a profile in "
    "~/.aws/config (`aws sso login --profile <profile>` for SSO), or export AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials); then `aws sts "
    "get-caller-identity` should print your account."
)
ERRORS: dict[str, type[ProviderError]] = {
    # no capacity for this type in this zone now (InsufficientInstanceCapacity comes as HTTP 500)
    "InsufficientInstanceCapacity": NoCapacityError,
    "InsufficientHostCapacity": NoCapacityError,
    "InsufficientCapacity": NoCapacityError,
    "SpotMaxPriceTooLow": NoCapacityError,
    "Unsupported": NoCapacityError,  # the type is not offered in this zone
    # the account's limits
    "VcpuLimitExceeded": QuotaExceededError,
    "MaxSpotInstanceCountExceeded": QuotaExceededError,
    "InstanceLimitExceeded": QuotaExceededError,
    # who we are, or what we may do
    "AuthFailure": CredentialsError,
    "UnauthorizedOperation": CredentialsError,
    "InvalidClientTokenId": CredentialsError,
    "InvalidClientToken": CredentialsError,
    "ExpiredToken": CredentialsError,
    "ExpiredTokenException": CredentialsError,
    "RequestExpired": CredentialsError,
    "SignatureDoesNotMatch": CredentialsError,
    "AccessDenied": CredentialsError,
    "OptInRequired": CredentialsError,
    "NoCredentials": CredentialsError,  # botocore found no credentials at all (not an EC2 code)
}
HINTS: dict[type[ProviderError], str] = {
    NoCapacityError: "cloudmodal tries the next offer and comes back to this one later.",
    QuotaExceededError: (
        "Fix: request a higher limit in the AWS console (Service Quotas -> Amazon EC2, e.g. 'Running "
        "On-Demand G and VT instances' or 'All G and VT Spot Instance Requests', in this region), or use "
        "another region."
    ),
    CredentialsError: CREDENTIALS_FIX,
}
# Codes that are no one's fault: the same call may work later (a race between two launches creating the
# shared security group's rules, throttling, EC2's own trouble).
RETRYABLE_CODES = frozenset(
    {
        "InvalidPermission.Duplicate",
        "InvalidGroup.Duplicate",
        "RequestLimitExceeded",
        "InternalError",
        "ServerInternal",
        "Unavailable",
        "ServiceUnavailable",
    }
)
# Network/endpoint trouble: the same call may work later.
_TRANSIENT = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError")
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def aws_error_code(exc: BaseException) -> tuple[str | None, str]:
    """(EC2 error code, its message) of the first botocore ``ClientError`` in ``exc``'s chain."""
    for e in exception_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            err = response["Error"]
            return (str(err.get("Code")) if err.get("Code") else None), str(err.get("Message") or "")
    return None, ""


def map_aws_error(exc: BaseException, *, offer: Any | None = None, doing: str = "") -> ProviderError:
    """The :class:`ProviderError` for an exception from boto3 or SkyPilot's AWS provisioner."""
    for e in exception_chain(exc):
        if isinstance(e, ProviderError):
            return e
    where = f" while {doing}" if doing else ""
    if offer is not None:
        where += f" ({offer.instance_type} in {getattr(offer, 'zone', None) or offer.region})"
    code, message = aws_error_code(exc)
    if code is None:
        names = [type(e).__name__ for e in exception_chain(exc)]
        hit = next((n for n in names if n in _NO_CREDENTIALS), None)
        if hit is not None or "InvalidCloudCredentials" in names:
            code, message = "NoCredentials", "no usable AWS credentials were found"
        else:
            transient = next((n for n in names if n in _TRANSIENT), None)
            if transient is not None:
                return ProviderError(
                    f"AWS could not be reached{where}: {exc}. Check the network (or AWS_ENDPOINT_URL).",
                    offer=offer,
                    reason=transient,
                    retryable=True,
                )
            text = str(exc)
            if "SKYPILOT_ERROR_NO_NODES_LAUNCHED" in text:
                return ProviderError(
                    f"AWS has no usable network for this launch{where}: "
                    f"{text.replace('SKYPILOT_ERROR_NO_NODES_LAUNCHED: ', '')} Fix: make sure the region's "
                    "default VPC exists (`aws ec2 create-default-vpc --region <region>`) with a public subnet "
                    "in the zone.",
                    offer=offer,
                    reason="NoUsableSubnet",
                )
            return ProviderError(
                f"AWS failed{where}: {type(exc).__name__}: {exc}", offer=offer, reason=type(exc).__name__
            )
    kind = ERRORS.get(code, ProviderError)
    hint = HINTS.get(kind, "")
    text = f"AWS refused{where}: {code}: {message}".rstrip(":. ")
    retryable = True if code in RETRYABLE_CODES else None
    return kind(f"{text}. {hint}".strip(), offer=offer, reason=code, retryable=retryable)


@contextmanager
def aws_errors(*, offer: Any | None = None, doing: str = "") -> Iterator[None]:
    """Map what boto3/SkyPilot raise into our tree. SkyPilot answers some boto errors with ``SystemExit``
    (its ``handle_boto_error``): that must not stop the control plane, so it is mapped too."""
    try:
        yield
    except ProviderError:
        raise
    except (Exception, SystemExit) as e:
        raise map_aws_error(e, offer=offer, doing=doing) from e
