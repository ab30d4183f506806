"""cloudmodal.worker.preemption against small local fakes of each cloud's metadata endpoint (real HTTP)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cloudmodal.worker.preemption import start_watcher, watcher_from_env
from tests.ports import reserved_port

INTERVAL = 0.05


@dataclass
class Metadata:
    """What the fake metadata service answers, and what it was asked."""

    aws_action: dict[str, Any] | None = None  # None: 404
    gcp_preempted: str = "FALSE"
    azure_events: list[dict[str, Any]] = field(default_factory=list)
    azure_name: str | None = "vm-mine"
    broken: bool = False  # answer 500 with garbage to everything
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    aws_tokens_issued: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Back to a node with no notice (between tests; the server's handler keeps this object)."""
        fresh = Metadata()
        for name in (
            "aws_action",
            "gcp_preempted",
            "azure_events",
            "azure_name",
            "broken",
            "aws_tokens_issued",
        ):
            setattr(self, name, getattr(fresh, name))
        with self.lock:
            self.requests.clear()

    def count(self, method: str, path_prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and p.startswith(path_prefix))


def _handler(md: Metadata) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: str, ctype: str = "text/plain") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> None:
            with md.lock:
                md.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

        def do_PUT(self) -> None:
            self._record()
            if md.broken:
                return self._send(500, "<html>oops")
            if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                with md.lock:
                    md.aws_tokens_issued += 1
                return self._send(200, "aws-session-token")
            self._send(400, "bad request")

        def do_GET(self) -> None:
            self._record()
            if md.broken:
                return self._send(500, "<html>oops")
            if self.path == "/latest/meta-data/spot/instance-action":
                if self.headers.get("X-aws-ec2-metadata-token") != "aws-session-token":
                    return self._send(401, "")
                if md.aws_action is None:
                    return self._send(404, "<?xml version='1.0'?><Error>Not Found</Error>", "text/html")
                return self._send(200, json.dumps(md.aws_action), "text/plain")
            if self.path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "Missing Metadata-Flavor:Google header.")
                return self._send(200, md.gcp_preempted)
            if self.path.startswith("/metadata/"):
                if self.headers.get("Metadata") != "true":
                    return self._send(
                        400, json.dumps({"error": "Bad request. Required metadata header not specified"})
                    )
                if self.path == "/metadata/scheduledevents?api-version=2020-07-01":
                    body = {"DocumentIncarnation": len(md.azure_events), "Events": md.azure_events}
                    return self._send(200, json.dumps(body), "application/json")
                if self.path.startswith("/metadata/instance/compute/name?") and md.azure_name:
                    return self._send(200, md.azure_name)
            self._send(404, "not found")

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Metadata]]:
    md = Metadata()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(md))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", md
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def metadata(server: tuple[str, Metadata]) -> tuple[str, Metadata]:
    url, md = server
    md.reset()
    return url, md


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Calls:
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, at: float) -> None:
        self.times.append(at)


def test_aws_no_notice_no_call_then_notice_fires_once(metadata: tuple[str, Metadata]) -> None:
    url, md = metadata
    calls = Calls()
    w = start_watcher("aws", url, calls, interval_s=INTERVAL)
    try:
        wait_for(lambda: md.count("GET", "/latest/meta-data/spot/instance-action") >= 3)
        assert calls.times == []
        # IMDSv2: one session token, reused for every poll
        assert md.aws_tokens_issued == 1
        md.aws_action = {"action": "terminate", "time": "2026-03-04T05:06:07Z"}
        wait_for(lambda: not w.running)
        assert calls.times == [1772600767.0]  # 2026-03-04T05:06:07Z
        assert w.notice_at == 1772600767.0
    finally:
        w.stop()


def test_gcp_preempted_true_fires_with_about_thirty_seconds(metadata: tuple[str, Metadata]) -> None:
    url, md = metadata
    calls = Calls()
    w = start_watcher("gcp", url, calls, interval_s=INTERVAL)
    try:
        wait_for(lambda: md.count("GET", "/computeMetadata/v1/instance/preempted") >= 3)
        assert calls.times == []
        before = time.time()
        md.gcp_preempted = "TRUE"
        wait_for(lambda: not w.running)
        after = time.time()
        assert len(calls.times) == 1
        assert before + 30 <= calls.times[0] <= after + 30
    finally:
        w.stop()


def test_azure_preempt_event_for_this_vm_fires_with_not_before(metadata: tuple[str, Metadata]) -> None:
    url, md = metadata
    md.azure_events = [
        # a maintenance freeze, and a preemption of another VM in the set: neither is ours
        {"EventId": "a", "EventType": "Freeze", "Resources": ["vm-mine"], "EventStatus": "Scheduled",
         "NotBefore": "Tue, 03 Mar 2026 10:00:00 GMT"},
        {"EventId": "b", "EventType": "Preempt", "Resources": ["vm-other"], "EventStatus": "Scheduled",
         "NotBefore": "Tue, 03 Mar 2026 10:00:00 GMT"},
    ]  # fmt: skip
    calls = Calls()
    w = start_watcher("azure", url, calls, interval_s=INTERVAL)
    try:
        wait_for(lambda: md.count("GET", "/metadata/scheduledevents") >= 3)
        assert calls.times == []
        md.azure_events = md.azure_events + [
            {"EventId": "c", "EventType": "Preempt", "ResourceType": "VirtualMachine", "Resources": ["vm-mine"],
             "EventStatus": "Scheduled", "NotBefore": "Tue, 03 Mar 2026 10:00:30 GMT", "EventSource": "Platform"},
        ]  # fmt: skip
        wait_for(lambda: not w.running)
        assert calls.times == [1772532030.0]  # Tue, 03 Mar 2026 10:00:30 GMT
    finally:
        w.stop()


def test_unreachable_metadata_never_crashes_and_stops(metadata: tuple[str, Metadata]) -> None:
    dead = f"http://127.0.0.1:{reserved_port()}"  # nobody listens on it (nor takes it: not ephemeral)
    for source in ("aws", "gcp", "azure"):
        calls = Calls()
        w = start_watcher(source, dead, calls, interval_s=INTERVAL, timeout_s=0.5)
        wait_for(lambda w=w: w.errors >= 3)  # type: ignore[misc]
        assert w.running and calls.times == []
        w.stop()
        assert not w.running


def test_garbage_answers_and_a_raising_callback_do_not_escape(metadata: tuple[str, Metadata]) -> None:
    url, md = metadata
    md.broken = True
    calls: list[float] = []

    def boom(at: float) -> None:
        calls.append(at)
        raise RuntimeError("callback failed")

    w = start_watcher("aws", url, boom, interval_s=INTERVAL)
    try:
        wait_for(lambda: w.errors >= 3)
        assert w.running and calls == []
        md.broken = False
        md.aws_action = {"action": "stop", "time": "2026-03-04T05:06:07Z"}
        wait_for(lambda: not w.running)  # fired once, the exception stayed in the thread
        assert calls == [1772600767.0]
    finally:
        w.stop()


def test_source_from_the_environment_and_bad_sources(metadata: tuple[str, Metadata]) -> None:
    url, md = metadata
    assert watcher_from_env(Calls(), {}) is None
    assert watcher_from_env(Calls(), {"CLOUDMODAL_PREEMPTION_SOURCE": "lambda"}) is None  # no notices there
    calls = Calls()
    md.gcp_preempted = "TRUE"
    w = watcher_from_env(
        calls, {"CLOUDMODAL_PREEMPTION_SOURCE": "gcp", "CLOUDMODAL_METADATA_URL": url}, interval_s=INTERVAL
    )
    assert w is not None
    try:
        wait_for(lambda: not w.running)
        assert len(calls.times) == 1
    finally:
        w.stop()
    with pytest.raises(ValueError, match="CLOUDMODAL_PREEMPTION_SOURCE must be one of aws, gcp, azure"):
        start_watcher("oracle", url, Calls())
