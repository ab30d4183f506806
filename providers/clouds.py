"""The clouds cloudmodal can launch on, and where each one's :class:`~cloudmodal.providers.nodes.NodeDriver`
lives. Modules are imported only when a cloud is used (their SDKs are optional extras)."""

from __future__ import annotations

import importlib
from typing import Any

from cloudmodal.providers.base import CredentialsError

# cloud name -> (module, class, the pip extra that brings its SDK)
DRIVERS: dict[str, tuple[str, str, str]] = {
    "aws": ("cloudmodal.providers.aws", "AwsNodes", "aws"),
    "gcp": ("cloudmodal.providers.gcp", "GcpNodes", "gcp"),
    "azure": ("cloudmodal.providers.azure", "AzureNodes", "azure"),
    "lambda": ("cloudmodal.providers.lambda_cloud", "LambdaNodes", "lambda"),
}

CLOUDS: tuple[str, ...] = tuple(DRIVERS)


def driver_class(cloud: str) -> Any:
    """The driver class of ``cloud``; a :class:`CredentialsError` naming the extra to install when its module
    cannot be imported."""
    try:
        module, cls, extra = DRIVERS[cloud]
    except KeyError:
        raise CredentialsError(
            f"Unknown cloud {cloud!r}; cloudmodal knows {', '.join(CLOUDS)}.", reason="unknown-cloud"
        ) from None
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        if e.name == module:
            raise CredentialsError(
                f"this cloudmodal has no driver for cloud {cloud!r} ({module} is missing from the installation)",
                reason="driver-missing",
            ) from e
        raise CredentialsError(
            f"cloud {cloud!r} needs packages that are not installed ({e.name or e}): run "
            f"`pip install 'cloudmodal[{extra},skypilot]'`.",
            reason="sdk-missing",
        ) from e
