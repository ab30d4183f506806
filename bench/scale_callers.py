"""One caller of ``bench/scale.py``: a ``.map`` over ``range(first, first + n)`` through the client's real code
path, ``cloudmodal.client.calls.run_map`` on the real ``Transport`` (httpx, msgpack): ``POST /v1/calls``, a feeder
thread pickling inputs and ``POST``ing them in growing batches (64 up to 2,000) under the map's window, and a
reader long-polling ``POST /v1/calls/{id}/outputs`` and unpickling each result in input order.

The only addition is a recording ``Transport`` that time-stamps each input batch's ``POST`` (``time.monotonic()``
when it is sent and when it is answered) with the indexes it carried. ``--rate`` paces the map's argument
iterator (inputs per second), as a producer slower than the cluster would, and records when each input was
produced; without it the map runs flat out.
Each result must be the input's own argument (the simulated worker echoes it); the count of wrong or missing
results is reported, never assumed.

Prints ``READY`` once imported and connected; starts on the first line read from stdin; writes ``--out``
(msgpack) when done, with the CPU seconds the process used during the map.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack

from cloudmodal.client.calls import run_map
from cloudmodal.client.transport import Transport


class RecordingTransport(Transport):
    """The real transport; input batches' send and answer times are kept in ``puts``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.puts: list[tuple[int, int, float, float]] = []  # first idx, count, sent, answered
        self.call_id: str | None = None

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        if path.endswith("/inputs") and body and body.get("inputs"):
            rows = body["inputs"]
            t0 = time.monotonic()
            out = super().post(path, body, **kw)
            self.puts.append((rows[0][0], len(rows), t0, time.monotonic()))
            self.call_id = path.split("/")[3]
            return out
        return super().post(path, body, **kw)


class Session:
    """What ``run_map`` needs of a client session (inputs and results stay inline: no blobs)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def upload_blob(self, data: bytes) -> str:
        raise RuntimeError("scale bench inputs are small: no blobs")

    def download_blob(self, blob_id: str) -> bytes:
        raise RuntimeError("scale bench outputs are small: no blobs")


def paced(n: int, rate: float | None, produced: list[float]) -> Iterator[tuple[int]]:
    """``range(n)`` as argument tuples, ``rate`` a second at most; when each was produced goes in ``produced``."""
    start = time.monotonic()
    for i in range(n):
        if rate and i % 16 == 0:
            ahead = start + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        produced.append(time.monotonic())
        yield (i,)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--function-id", required=True)
    p.add_argument("--inputs", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t = RecordingTransport(a.url, a.token, reconnect_timeout=30)
    t.get("/healthz")  # connected: the first request's connection set-up is not timed
    print("READY", flush=True)
    sys.stdin.readline()
    wrong = 0
    got = 0
    produced: list[float] = []
    error = None
    t_start = time.monotonic()
    cpu0 = time.process_time()
    try:
        for i, value in enumerate(
            run_map(
                Session(t),
                a.function_id,
                None,
                paced(a.inputs, a.rate or None, produced),
                {},
                order_outputs=True,
            )
        ):
            got += 1
            if value != ((i,), {}):
                wrong += 1
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    t_end = time.monotonic()
    cpu_s = time.process_time() - cpu0
    t.close()
    with open(a.out, "wb") as f:
        f.write(
            msgpack.packb(
                {
                    "call_id": t.call_id,
                    "puts": t.puts,
                    "produced": produced,
                    "got": got,
                    "wrong": wrong,
                    "error": error,
                    "start": t_start,
                    "end": t_end,
                    "cpu_s": cpu_s,
                },
                use_bin_type=True,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
