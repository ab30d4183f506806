"""Refuse, before anything is registered, to run or deploy an app that declares features the runtime does not
honour yet.

The spec layer accepts and validates Modal's whole surface so that ported code decorates cleanly and the
issues that build the runtime have a checked spec to read. But a declared feature nothing acts on is worse
than an error: a ``startup_timeout`` nobody reads. (Schedules fire from the control plane, see
:mod:`cloudmodal.server.scheduler`; web endpoints are served through it, see
:mod:`cloudmodal.server.web_gateway`.) So
:func:`check_app` fails the run (or the deployment) at once with a list of each function and feature, unless
``CLOUDMODAL_ALLOW_INERT=1`` turns the error into a warning for development.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from cloudmodal.exception import InvalidError
from cloudmodal.spec import FunctionSpec

ALLOW_ENV = "CLOUDMODAL_ALLOW_INERT"


class InertFeatureWarning(UserWarning):
    """An app runs with ``CLOUDMODAL_ALLOW_INERT=1`` although it declares features that do nothing yet."""


@dataclass(frozen=True)
class InertUse:
    """One declared feature of one function (``where``) that the runtime would silently ignore."""

    where: str  # "f", "Model" or "Model.web"
    feature: str  # as the user wrote it, e.g. "startup_timeout=30"
    why: str  # what does not happen, and which issue builds it
    fix: str  # what to do instead

    def line(self) -> str:
        return f"  - {self.where}: {self.feature}: {self.why}; {self.fix}."


def inert_uses(spec: FunctionSpec) -> list[InertUse]:
    """The features ``spec`` declares that nothing implements yet."""
    name = spec.name
    out: list[InertUse] = []
    if spec.startup_timeout is not None:
        out.append(
            InertUse(
                name,
                f"startup_timeout={spec.startup_timeout}",
                "it is not enforced yet",
                "remove it (timeout= still limits each input)",
            )
        )
    for declared, feature, why, fix in (
        (
            spec.block_network,
            "block_network=True",
            "a function's network is not cut off",
            "remove it (Sandboxes take block_network)",
        ),
        (
            spec.restrict_modal_access,
            "restrict_modal_access=True",
            "workers' access is not narrowed further",
            "remove it",
        ),
        (spec.i6pn, "i6pn=True", "there is no private network between containers", "remove it"),
        (
            spec.routing_region,
            f"routing_region={spec.routing_region!r}",
            "requests are not routed by region",
            "remove it",
        ),
        (
            spec.ephemeral_disk,
            f"ephemeral_disk={spec.ephemeral_disk}",
            "a worker's disk is not sized by it",
            "remove it (a cloud node gets its instance type's disk)",
        ),
        (
            spec.restrict_output,
            "_experimental_restrict_output=True",
            "outputs are not restricted",
            "remove it",
        ),
    ):
        if declared:
            out.append(InertUse(name, feature, why, fix))
    return out


def app_inert_uses(app: Any) -> list[InertUse]:
    """Every inert feature of ``app``'s registered functions and classes, in declaration order."""
    out: list[InertUse] = []
    for handle in list(app.registered_functions.values()) + list(app.registered_classes.values()):
        if handle.spec is not None:
            out += inert_uses(handle.spec)
    return out


def allowed() -> bool:
    """Whether ``CLOUDMODAL_ALLOW_INERT`` asks to run such apps anyway (read at each check, not at import)."""
    from cloudmodal.settings import settings

    return settings().allow_inert


def check_app(app: Any, action: str = "run") -> None:
    """Raise :class:`InvalidError` if ``app`` declares features that would be silently ignored; with
    ``CLOUDMODAL_ALLOW_INERT=1``, warn (:class:`InertFeatureWarning`) and return instead. ``action`` ("run" or
    "deploy") only shapes the message. Call it before the app is created on the control plane."""
    uses = app_inert_uses(app)
    if not uses:
        return
    label = f"App {app.name!r}" if getattr(app, "name", None) else "This app"
    lines = "\n".join(u.line() for u in uses)
    if allowed():
        warnings.warn(
            f"{label} declares features that are not implemented yet; {ALLOW_ENV} is set, so they are ignored "
            f"and the app will {action} without them:\n{lines}",
            InertFeatureWarning,
            stacklevel=2,
        )
        return
    raise InvalidError(
        f"Cannot {action} {label[0].lower() + label[1:]}: it declares features that are not implemented yet "
        f"and would be silently ignored:\n{lines}\n"
        f"Remove them and {action} without them. To {action} anyway while developing, with these features "
        f"ignored, set {ALLOW_ENV}=1 (the error becomes a warning)."
    )
