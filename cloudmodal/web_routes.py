"""Where a web endpoint is served: its label and its URL, the same for the client (``get_web_url``, the URLs
``deploy`` and ``serve`` print) and the control plane (which routes requests by them).

- A function's endpoint is labelled ``label=`` when given, else its name with ``_`` as ``-``, in lowercase;
  a class's web method ``Cls.method`` is ``cls-method``.
- A deployed app's endpoints are at ``{server}/web/{app}/{label}/``; an ephemeral app's (``cloudmodal run``,
  ``serve``) at ``{server}/web/{app}-dev/{label}/``, as Modal marks its development URLs, so that serving a
  development copy never takes over a deployed app's URLs. (A deployed app whose name ends in ``-dev`` wins
  over the development copy of the app without the suffix.)
- With ``CLOUDMODAL_WEB_DOMAIN=example.com``, also at ``https://{label}--{app}.example.com/`` (host routing;
  the domain's DNS and TLS are the team's).
"""

from __future__ import annotations

import re

from cloudmodal.spec import FunctionSpec, WebConfig

DEV_SUFFIX = "-dev"
_SLUG = re.compile(r"[^a-z0-9-]+")


def slug(name: str) -> str:
    """A name as a label: lowercase, ``_`` and other characters as ``-``, at most 63 characters."""
    return _SLUG.sub("-", name.lower()).strip("-")[:63].strip("-") or "endpoint"


def endpoints(spec: FunctionSpec) -> list[tuple[str, str | None, WebConfig]]:
    """``(label, method, config)`` for each web endpoint of a function (``method`` None) or class."""
    out: list[tuple[str, str | None, WebConfig]] = []
    if spec.web is not None:
        out.append((spec.web.label or slug(spec.name), None, spec.web))
    for method, web in spec.web_methods:
        out.append((web.label or slug(f"{spec.name}-{method}"), method, web))
    return out


def app_segment(app_name: str, ephemeral: bool) -> str:
    return app_name + DEV_SUFFIX if ephemeral else app_name


def web_url(server_url: str, app_name: str, label: str, *, ephemeral: bool) -> str:
    """The endpoint's URL on the control plane at ``server_url`` (with a trailing ``/``: the app's root)."""
    return f"{server_url.rstrip('/')}/web/{app_segment(app_name, ephemeral)}/{label}/"


def host_url(domain: str, app_name: str, label: str, *, ephemeral: bool) -> str:
    return f"https://{label}--{app_segment(app_name, ephemeral)}.{domain}/"


def parse_host(host: str, domain: str) -> tuple[str, str] | None:
    """``(app segment, label)`` of a ``Host`` header under ``domain``, or None."""
    host = host.split(":", 1)[0].lower().rstrip(".")
    suffix = "." + domain.lower().strip(".")
    if not host.endswith(suffix):
        return None
    sub = host[: -len(suffix)]
    label, sep, app = sub.partition("--")
    if not sep or not label or not app:
        return None
    return app, label
