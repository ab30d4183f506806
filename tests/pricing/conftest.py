"""Fixtures: small catalogs the tests write, a fresh table cache, the real shared snapshot when present."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from catalog_fixtures import find_shared_pricing, write_catalog

from cloudmodal.pricing import catalog


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    catalog.clear_cache()
    yield
    catalog.clear_cache()


@pytest.fixture
def tiny_catalog(tmp_path: Path) -> Path:
    return write_catalog(tmp_path / "v8")


@pytest.fixture
def shared_pricing() -> Path:
    """``../shared/pricing`` (the real catalog snapshot); the test is skipped where it is absent."""
    found = find_shared_pricing()
    if found is None:
        pytest.skip("the shared pricing snapshot (../shared/pricing) is not present")
    return found
