"""The web decorators: ``@cloudmodal.fastapi_endpoint``, ``@asgi_app``, ``@wsgi_app`` and ``@web_server``.

Each checks its arguments and marks the function with a :class:`~cloudmodal.spec.WebConfig`; the spec carries
it to the control plane.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from cloudmodal._partial import _Flags, _no_positional, _Params, _PartialFunction, _wrap
from cloudmodal.exception import DeprecationError, InvalidError
from cloudmodal.spec import WebConfig

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DOMAIN_RE = re.compile(
    r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$"
)  # <= 253 chars
MAX_CUSTOM_DOMAINS = 16


def _check_web_common(
    decorator: str, label: object, custom_domains: object, requires_proxy_auth: object
) -> None:
    if label is not None and (not isinstance(label, str) or not _LABEL_RE.match(label)):
        raise InvalidError(
            f"@cloudmodal.{decorator}(label={label!r}): a label is 1-63 lowercase letters, digits and '-', not "
            "starting or ending with '-', e.g. label='my-api'."
        )
    if custom_domains is not None and (
        isinstance(custom_domains, str) or not all(isinstance(d, str) for d in custom_domains)  # type: ignore[attr-defined]
    ):
        raise InvalidError(
            f"@cloudmodal.{decorator}(custom_domains=...) must be a list of domain names, e.g. ['api.example.com']."
        )
    domains = list(custom_domains or ())  # type: ignore[call-overload]
    for d in domains:
        if len(d) > 253 or not DOMAIN_RE.match(d):
            raise InvalidError(
                f"@cloudmodal.{decorator}(custom_domains=[{d!r}]): not a domain name. Use lowercase host names "
                "such as 'api.example.com' (no scheme, port or path)."
            )
    if len(domains) > MAX_CUSTOM_DOMAINS or len(set(domains)) != len(domains):
        raise InvalidError(
            f"@cloudmodal.{decorator}(custom_domains=...): at most {MAX_CUSTOM_DOMAINS} domains, each once."
        )
    if not isinstance(requires_proxy_auth, bool):
        raise InvalidError(f"@cloudmodal.{decorator}(requires_proxy_auth=...) must be True or False.")


def fastapi_endpoint(
    _warn_parentheses_missing: Any = None,
    *,
    method: str = "GET",
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    docs: bool = False,
    requires_proxy_auth: bool = False,
) -> Callable[[Any], _PartialFunction]:
    """Serve the function as a single FastAPI route (CORS on); its parameters are query/body fields."""
    if isinstance(_warn_parentheses_missing, str):
        raise InvalidError(
            f"Positional arguments are not allowed. Suggestion: "
            f'`@cloudmodal.fastapi_endpoint(method="{_warn_parentheses_missing}")`.'
        )
    _no_positional("fastapi_endpoint", _warn_parentheses_missing)
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise InvalidError(
            f"@cloudmodal.fastapi_endpoint(method={method!r}) is not an HTTP method. Use one of: {', '.join(HTTP_METHODS)}."
        )
    _check_web_common("fastapi_endpoint", label, custom_domains, requires_proxy_auth)
    web = WebConfig(
        kind="fastapi_endpoint",
        method=method.upper(),
        label=label,
        docs=bool(docs),
        requires_proxy_auth=requires_proxy_auth,
        custom_domains=tuple(custom_domains or ()),
    )

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, _Flags.WEB_INTERFACE, _Params(web=web))
        pf._validate_obj("fastapi_endpoint")
        return pf

    return wrapper


def _app_decorator(kind: str) -> Callable[..., Callable[[Any], _PartialFunction]]:
    def decorator(
        _warn_parentheses_missing: Any = None,
        *,
        label: str | None = None,
        custom_domains: Iterable[str] | None = None,
        requires_proxy_auth: bool = False,
    ) -> Callable[[Any], _PartialFunction]:
        if isinstance(_warn_parentheses_missing, str):
            raise InvalidError(
                f'Positional arguments are not allowed. Suggestion: `@cloudmodal.{kind}(label="{_warn_parentheses_missing}")`.'
            )
        _no_positional(kind, _warn_parentheses_missing)
        _check_web_common(kind, label, custom_domains, requires_proxy_auth)
        web = WebConfig(
            kind=kind,  # type: ignore[arg-type]
            label=label,
            requires_proxy_auth=requires_proxy_auth,
            custom_domains=tuple(custom_domains or ()),
        )

        def wrapper(obj: Any) -> _PartialFunction:
            pf = _wrap(obj, _Flags.WEB_INTERFACE, _Params(web=web))
            pf._validate_obj(kind, require_sync=True, require_nullary=True)
            return pf

        return wrapper

    decorator.__name__ = decorator.__qualname__ = kind
    return decorator


asgi_app = _app_decorator("asgi_app")
asgi_app.__doc__ = (
    """Serve an ASGI app (FastAPI, Starlette…): decorate a no-argument function that returns it."""
)
wsgi_app = _app_decorator("wsgi_app")
wsgi_app.__doc__ = """Serve a WSGI app (Flask, Django…): decorate a no-argument function that returns it."""


def web_server(
    port: int,
    *,
    startup_timeout: float = 5.0,
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    requires_proxy_auth: bool = False,
) -> Callable[[Any], _PartialFunction]:
    """Proxy HTTP to a server that the decorated (no-argument) function starts on ``port``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidError(
            f"First argument of `@web_server` must be a local port (1-65535), such as `@web_server(8000)`; got {port!r}."
        )
    if (
        isinstance(startup_timeout, bool)
        or not isinstance(startup_timeout, int | float)
        or startup_timeout <= 0
    ):
        raise InvalidError(
            f"The `startup_timeout` argument of `@web_server` must be a positive number of seconds, got {startup_timeout!r}."
        )
    _check_web_common("web_server", label, custom_domains, requires_proxy_auth)
    web = WebConfig(
        kind="web_server",
        port=port,
        label=label,
        startup_timeout=float(startup_timeout),
        requires_proxy_auth=requires_proxy_auth,
        custom_domains=tuple(custom_domains or ()),
    )

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, _Flags.WEB_INTERFACE, _Params(web=web))
        pf._validate_obj("web_server", require_sync=True, require_nullary=True)
        return pf

    return wrapper


def web_endpoint(*args: Any, **kwargs: Any) -> Any:
    """Removed: renamed to :func:`fastapi_endpoint` (as in Modal)."""
    raise DeprecationError(
        "`@cloudmodal.web_endpoint` has been renamed to `@cloudmodal.fastapi_endpoint` (as in Modal 1.0). "
        "Replace `@cloudmodal.web_endpoint(...)` with `@cloudmodal.fastapi_endpoint(...)`; the arguments are the same."
    )
