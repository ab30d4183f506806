"""A stub of AWS Cost Explorer's ``GetCostAndUsage`` on 127.0.0.1, speaking the AWS JSON 1.1 protocol as
boto3 does (point boto3 at it with ``AWS_ENDPOINT_URL_COST_EXPLORER``).

It checks what a real endpoint would: ``POST /``, ``Content-Type: application/x-amz-json-1.1``, ``X-Amz-Target:
AWSInsightsIndexService.GetCostAndUsage`` (any other target: ``UnknownOperationException``), a SigV4
``Authorization`` header signed for the ``ce`` service, and a body with the fields boto3 sends (TimePeriod
Start/End as dates, Granularity, Metrics, GroupBy, NextPageToken). Requests outside what cloudmodal's
reconciliation asks for (DAILY, UnblendedCost, grouped by one tag) are answered with a
``ValidationException`` and recorded in :attr:`CostExplorerFake.violations`, which a test asserts empty.

Answers have the real response shape: ``ResultsByTime[]`` with ``TimePeriod``, an empty ``Total`` (grouped),
``Groups[]`` (``Keys: ["<tag>$<value>"]``, ``Metrics.UnblendedCost.Amount`` as a string, ``Unit: "USD"``;
the untagged group is ``"<tag>$"``) and ``Estimated``; ``GroupDefinitions``; ``DimensionValueAttributes``.
Every day of the period is answered (a day with no cost has no groups). At most ``page_size`` groups go in
one page; the rest follow with an opaque ``NextPageToken`` (a day's groups may span two pages, as AWS's do).

Test controls: :meth:`set_cost`, :meth:`set_estimated`, :meth:`fail_next` (answer the next N requests with an
AWS error code); :attr:`requests` logs every parsed body.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TARGET = "AWSInsightsIndexService.GetCostAndUsage"
CONTENT_TYPE = "application/x-amz-json-1.1"
REQUEST_FIELDS = {
    "TimePeriod",
    "Granularity",
    "Filter",
    "Metrics",
    "GroupBy",
    "BillingViewArn",
    "NextPageToken",
}
_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=[^/]+/\d{8}/[a-z0-9-]+/ce/aws4_request, SignedHeaders=.+, Signature=[0-9a-f]{64}$"
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ERROR_STATUS = {"AccessDeniedException": 400, "LimitExceededException": 400, "DataUnavailableException": 400}


class _Refused(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class CostExplorerFake:
    """``with CostExplorerFake(tag_key="cloudmodal-app") as ce:`` then ``ce.url`` is the endpoint."""

    def __init__(self, tag_key: str = "cloudmodal-app", page_size: int = 100) -> None:
        self.tag_key = tag_key
        self.page_size = page_size
        self.costs: dict[tuple[str, str], float] = {}  # (day, tag value; "" untagged) -> USD
        self.estimated: set[str] = set()
        self.requests: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self._failures: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- test controls ----------------------------------------------------------------------------------
    def set_cost(self, day: str, app: str, usd: float) -> None:
        with self._lock:
            self.costs[(day, app)] = usd

    def set_estimated(self, *days: str) -> None:
        with self._lock:
            self.estimated.update(days)

    def fail_next(self, code: str, message: str = "refused by the test", times: int = 1) -> None:
        with self._lock:
            self._failures.extend([(code, message)] * times)

    # -- server -----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> CostExplorerFake:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = fake.handle(self.path, dict(self.headers.items()), raw)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                if status != 200:
                    self.send_header("x-amzn-ErrorType", body["__type"])
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # no per-request stderr lines
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # -- the protocol -----------------------------------------------------------------------------------
    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any]]:
        h = {k.lower(): v for k, v in headers.items()}
        try:
            if path != "/":
                raise _Refused("UnknownOperationException", f"path {path!r}: JSON 1.1 posts to /", 404)
            if h.get("x-amz-target") != TARGET:
                raise _Refused("UnknownOperationException", f"X-Amz-Target {h.get('x-amz-target')!r}")
            if h.get("content-type") != CONTENT_TYPE:
                raise _Refused("SerializationException", f"Content-Type {h.get('content-type')!r}")
            if not _AUTH.match(h.get("authorization", "")):
                raise _Refused(
                    "IncompleteSignatureException", "not a SigV4 signature for the ce service", 403
                )
            body = json.loads(raw or b"{}")
            with self._lock:
                self.requests.append(body)
                failure = self._failures.pop(0) if self._failures else None
            if failure is not None:
                raise _Refused(failure[0], failure[1], ERROR_STATUS.get(failure[0], 400))
            return 200, self._answer(body)
        except _Refused as e:
            if e.code in ("ValidationException", "UnknownOperationException", "SerializationException"):
                self.violations.append(f"{e.code}: {e.message}")
            return e.status, {"__type": e.code, "Message": e.message}

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = set(body) - REQUEST_FIELDS
        missing = {"TimePeriod", "Granularity", "Metrics"} - set(body)
        if unknown or missing:
            raise _Refused(
                "ValidationException", f"unknown fields {sorted(unknown)}, missing {sorted(missing)}"
            )
        period = body["TimePeriod"]
        start, end = period.get("Start", ""), period.get("End", "")
        if not (_DATE.match(start) and _DATE.match(end)) or start >= end:
            raise _Refused("ValidationException", f"TimePeriod {period!r}: dates YYYY-MM-DD with Start < End")
        if body["Granularity"] != "DAILY" or body["Metrics"] != ["UnblendedCost"]:
            raise _Refused("ValidationException", f"only DAILY UnblendedCost is stubbed, not {body!r}")
        group_by = [{"Type": "TAG", "Key": self.tag_key}]
        if body.get("GroupBy") != group_by:
            raise _Refused("ValidationException", f"GroupBy {body.get('GroupBy')!r}: expected {group_by!r}")
        offset = 0
        if "NextPageToken" in body:
            try:
                token = json.loads(base64.b64decode(body["NextPageToken"]))
                assert token["p"] == [start, end]
                offset = int(token["o"])
            except Exception:
                raise _Refused(
                    "InvalidNextTokenException", "NextPageToken was not issued for this request"
                ) from None
        days = []
        d = dt.date.fromisoformat(start)
        while d < dt.date.fromisoformat(end):
            days.append(d.isoformat())
            d += dt.timedelta(days=1)
        with self._lock:
            flat = [
                (day, app, usd)
                for day in days
                for (cday, app), usd in sorted(self.costs.items())
                if cday == day
            ]
            estimated = set(self.estimated)
        page = flat[offset : offset + self.page_size]
        results: dict[str, dict[str, Any]] = {}
        if offset == 0:  # every day appears, with or without groups
            for day in days:
                results[day] = self._result(day, estimated)
        for day, app, usd in page:
            r = results.setdefault(day, self._result(day, estimated))
            r["Groups"].append(
                {
                    "Keys": [f"{self.tag_key}${app}"],
                    "Metrics": {"UnblendedCost": {"Amount": f"{usd:.10f}", "Unit": "USD"}},
                }
            )
        out: dict[str, Any] = {
            "GroupDefinitions": group_by,
            "ResultsByTime": list(results.values()),
            "DimensionValueAttributes": [],
        }
        if offset + self.page_size < len(flat):
            token = {"p": [start, end], "o": offset + self.page_size}
            out["NextPageToken"] = base64.b64encode(json.dumps(token).encode()).decode()
        return out

    @staticmethod
    def _result(day: str, estimated: set[str]) -> dict[str, Any]:
        nxt = (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()
        return {
            "TimePeriod": {"Start": day, "End": nxt},
            "Total": {},
            "Groups": [],
            "Estimated": day in estimated,
        }
