"""Authentication at scale: the tokens a control plane keeps seeing (1,000 workers' heartbeats, claims and
WebSocket rechecks) are re-validated together, in one query per chunk on a thread of their own, instead of one
read per token on the event loop each time a cache entry expires; a revocation still takes effect within the
cache period, here and on every other control plane sharing the database."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cloudmodal.server.auth import TokenStore, hash_token
from cloudmodal.server.db import Database

TOKENS = 40


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)
    try:
        yield d
    finally:
        d.dispose()


def _settled(store: TokenStore) -> None:
    """Wait for a re-validation that identify() started on its own to finish."""
    deadline = time.monotonic() + 30
    while store._refreshing:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _expire(store: TokenStore) -> None:
    """Age every cache entry past its trust (as cache_s going by without a re-validation would)."""
    past = time.monotonic() - 1.0
    with store._lock:
        store._cache = {h: (who, past) for h, (who, _) in store._cache.items()}


def test_recently_used_tokens_are_revalidated_together_not_read_one_at_a_time(db: Database) -> None:
    store = TokenStore(db)
    tokens = [store.create(f"worker:ta-w{i}", f"w{i}") for i in range(TOKENS)]
    for t in tokens:
        assert store.identify(t) is not None
    assert store.reads == TOKENS  # each read once, when first presented
    _settled(store)
    _expire(store)
    store._refresh()  # the re-validation identify() runs every half cache period
    for t in tokens:
        assert store.identify(t) is not None
    assert store.reads == TOKENS  # answered from the re-validated cache: no read per token


def test_a_revalidation_drops_a_token_revoked_by_another_control_plane(db: Database) -> None:
    here, elsewhere = TokenStore(db), TokenStore(db)
    token_id, token = here.create_token("member", "to revoke")
    _, kept = here.create_token("member", "kept")
    assert here.identify(token) is not None and here.identify(kept) is not None
    _settled(here)
    elsewhere.revoke(token_id)
    here._refresh()
    assert hash_token(token) not in here._cache  # refused at once, not at the entry's expiry
    assert here.identify(token) is None
    assert here.identify(kept) is not None


def test_an_unrefreshed_entry_expires_and_is_read_again(db: Database) -> None:
    """Without a re-validation (late, or failed), an entry is trusted no longer than the cache period."""
    here, elsewhere = TokenStore(db), TokenStore(db)
    token_id, token = here.create_token("member", "to revoke")
    assert here.identify(token) is not None
    _settled(here)
    elsewhere.revoke(token_id)
    _expire(here)
    assert here.identify(token) is None
