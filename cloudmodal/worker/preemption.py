"""Spot/preemptible reclaim notices, read by a worker on a cloud node from the cloud's metadata service.

A background thread polls the node's instance metadata endpoint every few seconds and calls
``on_notice(reclaim_at)`` once (epoch seconds) when the cloud announces that it will take the node back:

- ``aws``: IMDSv2 — ``PUT /latest/api/token`` for a session token, then ``GET
  /latest/meta-data/spot/instance-action``: 404 normally, ``{"action": "terminate", "time":
  "2026-01-02T03:04:05Z"}`` about two minutes before the reclaim.
- ``gcp``: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``: ``FALSE``, then
  ``TRUE`` once preemption began; the node has about 30 s left.
- ``azure``: Scheduled Events, ``GET /metadata/scheduledevents?api-version=2020-07-01`` with ``Metadata:
  true``: an event of type ``Preempt`` whose ``NotBefore`` (RFC 1123) is the reclaim time, for this VM
  (its name is in the event's ``Resources``).

The provider that starts the worker says which cloud with ``CLOUDMODAL_PREEMPTION_SOURCE`` (``aws``,
``gcp``, ``azure``) and may point ``CLOUDMODAL_METADATA_URL`` elsewhere than the link-local
``http://169.254.169.254`` (tests). Requests have short timeouts and bypass proxies; no error ever leaves
the thread (an unreachable endpoint is retried on the next tick).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

log = logging.getLogger(__name__)

SOURCE_ENV = "CLOUDMODAL_PREEMPTION_SOURCE"
METADATA_URL_ENV = "CLOUDMODAL_METADATA_URL"
DEFAULT_METADATA_URL = "http://169.254.169.254"  # the link-local metadata address on AWS, GCP and Azure
SOURCES = ("aws", "gcp", "azure")

GCP_NOTICE_S = 30.0  # GCP gives a preempted VM about 30 s
AWS_TOKEN_TTL_S = 21600
AZURE_API_VERSION = "2020-07-01"


def _parse_iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class _Aws:
    """IMDSv2: a session token (cached until shortly before it expires), then the spot instance action."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.token_until = 0.0

    def _token(self, client: httpx.Client, base: str) -> str:
        if self.token is None or time.monotonic() >= self.token_until:
            r = client.put(
                f"{base}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)},
            )
            r.raise_for_status()
            self.token, self.token_until = r.text.strip(), time.monotonic() + AWS_TOKEN_TTL_S - 60
        return self.token

    def check(self, client: httpx.Client, base: str) -> float | None:
        r = client.get(
            f"{base}/latest/meta-data/spot/instance-action",
            headers={"X-aws-ec2-metadata-token": self._token(client, base)},
        )
        if r.status_code == 401:  # the token expired early (IMDS restarted): get a new one next tick
            self.token = None
            return None
        if r.status_code == 404:
            return None
        r.raise_for_status()
        action = json.loads(r.text)
        if action.get("action") not in ("terminate", "stop", "hibernate"):
            return None
        return _parse_iso(str(action["time"]))


class _Gcp:
    def check(self, client: httpx.Client, base: str) -> float | None:
        r = client.get(f"{base}/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"})
        r.raise_for_status()
        return time.time() + GCP_NOTICE_S if r.text.strip().upper() == "TRUE" else None


class _Azure:
    """Scheduled Events: the earliest ``Preempt`` event for this VM (by name, when the name is known)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.name_tried = False

    def _vm_name(self, client: httpx.Client, base: str) -> str | None:
        if not self.name_tried:
            self.name_tried = True
            try:
                r = client.get(
                    f"{base}/metadata/instance/compute/name",
                    params={"api-version": "2021-02-01", "format": "text"},
                    headers={"Metadata": "true"},
                )
                if r.status_code == 200 and r.text.strip():
                    self.name = r.text.strip()
            except httpx.HTTPError:
                pass  # unknown: every Preempt event counts
        return self.name

    def check(self, client: httpx.Client, base: str) -> float | None:
        r = client.get(
            f"{base}/metadata/scheduledevents",
            params={"api-version": AZURE_API_VERSION},
            headers={"Metadata": "true"},
        )
        r.raise_for_status()
        events = json.loads(r.text).get("Events") or []
        name = self._vm_name(client, base)
        times: list[float] = []
        for ev in events:
            if ev.get("EventType") != "Preempt":
                continue
            resources = ev.get("Resources") or []
            if name and resources and name not in resources:
                continue
            not_before = ev.get("NotBefore") or ""
            times.append(parsedate_to_datetime(not_before).timestamp() if not_before else time.time())
        return min(times) if times else None


class PreemptionWatcher:
    """The running watcher (see :func:`start_watcher`). ``notice_at``: the reclaim time once noticed."""

    def __init__(
        self,
        source: str,
        url: str,
        on_notice: Callable[[float], Any],
        *,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self.source = source
        self.url = url.rstrip("/")
        self.on_notice = on_notice
        self.interval_s = interval_s
        self.notice_at: float | None = None
        self.errors = 0  # failed polls so far (for diagnostics)
        self._checker: _Aws | _Gcp | _Azure = (
            _Aws() if source == "aws" else _Gcp() if source == "gcp" else _Azure()
        )
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s), trust_env=False)  # never via a proxy
        self._thread = threading.Thread(target=self._run, name=f"cloudmodal-preemption-{source}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    at = self._checker.check(self._client, self.url)
                except Exception as e:  # an unreachable or odd endpoint: try again next tick
                    self.errors += 1
                    log.debug("preemption check (%s) failed: %s: %s", self.source, type(e).__name__, e)
                    at = None
                if at is not None and not self._stop.is_set():
                    self.notice_at = at
                    try:
                        self.on_notice(at)
                    except Exception:
                        log.exception("the preemption notice callback raised")
                    return  # once
                self._stop.wait(self.interval_s)
        finally:
            self._client.close()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop polling (idempotent); waits up to ``timeout`` for the thread to end."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def start_watcher(
    source: str,
    url: str | None,
    on_notice: Callable[[float], Any],
    *,
    interval_s: float = 5.0,
    timeout_s: float = 2.0,
) -> PreemptionWatcher:
    """Poll ``source``'s metadata endpoint at ``url`` (None: the link-local default) every ``interval_s``
    and call ``on_notice(reclaim_epoch_seconds)`` once when a reclaim notice appears (from the watcher's
    thread). Returns a handle; call ``.stop()`` when the worker exits."""
    if source not in SOURCES:
        raise ValueError(
            f"Unknown preemption source {source!r}: {SOURCE_ENV} must be one of {', '.join(SOURCES)}."
        )
    return PreemptionWatcher(
        source, url or DEFAULT_METADATA_URL, on_notice, interval_s=interval_s, timeout_s=timeout_s
    )


def watcher_from_env(
    on_notice: Callable[[float], Any], environ: Mapping[str, str] | None = None, **kw: Any
) -> PreemptionWatcher | None:
    """:func:`start_watcher` for ``CLOUDMODAL_PREEMPTION_SOURCE``/``CLOUDMODAL_METADATA_URL``; None when no
    source is set (not a cloud node) or the cloud gives no notice we can read (e.g. ``lambda``): a worker
    must start either way."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    source = (env.get(SOURCE_ENV) or "").strip().lower()
    if source not in SOURCES:
        if source:
            log.info("no preemption notices for %s=%s (only %s give them)", SOURCE_ENV, source, SOURCES)
        return None
    return start_watcher(source, env.get(METADATA_URL_ENV) or None, on_notice, **kw)
