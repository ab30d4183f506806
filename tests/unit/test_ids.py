"""Object ids: the type prefix, 22 characters of [A-Za-z0-9], unique, each character equally likely."""

from __future__ import annotations

import collections
import string

from cloudmodal.ids import new_id


def test_ids_have_the_prefix_and_22_alphanumeric_characters_and_do_not_repeat() -> None:
    ids = [new_id("fc") for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    alphabet = set(string.ascii_letters + string.digits)
    for i in ids:
        assert i.startswith("fc-") and len(i) == 25
        assert set(i[3:]) <= alphabet


def test_every_character_is_equally_likely() -> None:
    """No modulo bias: 2,200,000 characters, each of the 62 expected 35,484 times (standard deviation ~187,
    so 5 % is ~9 of them); mapping every random byte to ``b % 62`` would make the first eight characters
    25 % more likely than the rest (5 of 256 byte values against 4)."""
    counts = collections.Counter("".join(new_id("x")[2:] for _ in range(100_000)))
    assert len(counts) == 62
    expected = 22 * 100_000 / 62
    assert all(abs(n - expected) < 0.05 * expected for n in counts.values()), counts.most_common(3)
