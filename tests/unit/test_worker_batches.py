"""A worker's output and log posts are split so no request nears the control plane's body cap."""

from __future__ import annotations

import pytest

from cloudmodal.worker.runtime import POST_BATCH_BYTES, _row_size, batches


def row(n: int) -> list[object]:
    return [1, "success", b"x" * n, None, -1, True]


@pytest.mark.parametrize(
    "sizes, expect",
    [
        ([], []),
        ([10, 10, 10], [3]),
        ([600, 600, 600], [1, 1, 1]),  # each alone: two do not fit in 1,000 bytes
        ([300, 300, 300, 300], [2, 2]),  # each row counts 64 bytes of framing too
        ([5000], [1]),  # one row over the limit still goes, alone
    ],
)
def test_batches_split_in_order_by_bytes(sizes: list[int], expect: list[int]) -> None:
    rows = [row(n) for n in sizes]
    got = batches(rows, _row_size, limit=1000)
    assert [len(b) for b in got] == expect
    assert [r for b in got for r in b] == rows  # nothing lost, nothing reordered


def test_a_generator_burst_stays_under_the_servers_cap() -> None:
    rows = [row(2 * 1024 * 1024) for _ in range(100)]  # 200 MiB of 2 MiB items, as a fast generator makes
    got = batches(rows, _row_size)
    assert len(got) > 1
    assert all(sum(_row_size(r) for r in b) <= POST_BATCH_BYTES for b in got)
    assert POST_BATCH_BYTES < 64 * 1024 * 1024  # the control plane's cap on /outputs and /claim bodies
