"""A read of a call's outputs is bounded in bytes as well as rows: it ends at the row that brings the inline
data read to the bound (each row's predecessors in the page hold less than the bound), and the caller pages
on by id, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import bare_plane, function_with_workers

from cloudmodal.server.queue import OutputItem
from cloudmodal.server.service import ControlPlane
from cloudmodal.server.states import OutputStatus

MIB = 1024 * 1024


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    with bare_plane(tmp_path, database_url, "ap-o") as plane:
        yield plane


def _answered(cp: ControlPlane, sizes: list[int]) -> list[int]:
    """A call whose inputs are answered with outputs of these sizes: the inputs' ids."""
    fid = function_with_workers(cp, "ap-o", "f", ["wk-o"])
    cp.calls.create_call("ca-o", fid, "map", [(i, None, b"x", None) for i in range(len(sizes))])
    ids = [c.input_id for c in cp.claim("wk-o", fid, len(sizes))]
    assert len(ids) == len(sizes)
    for iid, n in zip(ids, sizes, strict=True):
        cp.post_outputs("wk-o", [OutputItem(iid, OutputStatus.SUCCESS, bytes([iid % 251]) * n)])
    return ids


def _pages(cp: ControlPlane, max_bytes: int, limit: int = 100) -> list[list[int]]:
    """Every page of the call's outputs (as their sizes) read the way callers read: by id after the last."""
    pages, after = [], 0
    while rows := cp.queue.fetch_outputs("ca-o", after, limit, max_bytes=max_bytes):
        pages.append([len(r[4]) for r in rows])
        after = rows[-1][0]
    return pages


def test_a_read_ends_at_the_row_that_reaches_the_bound_and_paging_reads_every_output(
    cp: ControlPlane,
) -> None:
    _answered(cp, [MIB] * 5 + [10, 10])
    assert _pages(cp, int(2.5 * MIB)) == [[MIB, MIB, MIB], [MIB, MIB, 10, 10]]
    assert _pages(cp, 2 * MIB) == [[MIB, MIB], [MIB, MIB], [MIB, 10, 10]]
    assert _pages(cp, 100 * MIB) == [[MIB] * 5 + [10, 10]]  # under the bound: rows are the only limit
    assert _pages(cp, 100 * MIB, limit=3) == [[MIB] * 3, [MIB, MIB, 10], [10]]


def test_a_row_larger_than_the_bound_ends_its_page(cp: ControlPlane) -> None:
    _answered(cp, [3 * MIB, 10, 2 * MIB, 10])
    assert _pages(cp, MIB) == [[3 * MIB], [10, 2 * MIB], [10]]


def test_the_data_read_is_the_data_written(cp: ControlPlane) -> None:
    ids = _answered(cp, [MIB, 7, MIB])
    rows = cp.queue.fetch_outputs("ca-o", 0, 100, max_bytes=int(1.5 * MIB))
    rows += cp.queue.fetch_outputs("ca-o", rows[-1][0], 100, max_bytes=int(1.5 * MIB))
    assert [(r[1], bytes(r[4])) for r in rows] == [
        (i, bytes([iid % 251]) * n) for i, (iid, n) in enumerate(zip(ids, [MIB, 7, MIB], strict=True))
    ]
