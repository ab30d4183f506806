"""The dashboard's routes (``/dashboard``). Added to the control plane's route table by
:func:`cloudmodal.server.api.build_routes`.

``GET /dashboard`` is one self-contained page (``dashboard.html``: inline CSS and JS, nothing fetched from
elsewhere) and holds no data, so it is public. The page reads a bearer token from its URL's fragment
(``/dashboard#token=...``: browsers never send a fragment, so it stays out of requests and logs), keeps it in
memory only, and reads everything it shows from the API with it: ``/v1/cost``, ``/v1/apps`` and each app's
``/v1/apps/{id}/events``, every few seconds. ``cloudmodal dashboard`` prints that address.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources
from typing import Any

from cloudmodal.server.router import Raw

PAGE = "dashboard.html"
_INLINE = {kind: re.compile(rf"<{kind}>(.*?)</{kind}>", re.DOTALL) for kind in ("script", "style")}


def _hashes(html: str, kind: str) -> str:
    """CSP sources for the page's inline ``<script>`` or ``<style>`` blocks: each one's SHA-256, so only the
    page's own code runs, not anything a rendered value might smuggle in."""
    found = _INLINE[kind].findall(html)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"
        for block in found
    )


@functools.cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page and its response headers (read on first use: a control plane's start does not pay for it)."""
    html = resources.files("cloudmodal.server").joinpath(PAGE).read_text(encoding="utf-8")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "connect-src 'self'",  # the API, on this page's own origin
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",  # for browsers without frame-ancestors
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    return html.encode(), headers


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)``."""

    @route("GET", "/dashboard", "public")
    async def dashboard() -> Raw:
        """The dashboard (HTML). It holds no data: open it as ``/dashboard#token=TOKEN`` (``cloudmodal
        dashboard`` prints the address); the page then reads the API with that token."""
        body, headers = page()
        return Raw(body, "text/html; charset=utf-8", headers=headers)
