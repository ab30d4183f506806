"""Tags as GCP labels and back, for the GCP driver (:mod:`cloudmodal.providers.gcp`).

GCP label keys and values allow only lower-case letters, digits, ``-`` and ``_``. Tag values are encoded
reversibly (``_`` -> ``__``, an upper-case letter -> ``_`` + the letter) and decoded on the way back, so the
driver's ``list``/``query`` return the tags that were given.
"""

from __future__ import annotations

import re

from cloudmodal.providers.base import ProviderError


def encode_label(value: str) -> str:
    """A GCP label value for ``value``: ``_`` -> ``__``, upper-case X -> ``_x``; other invalid chars refused."""
    out = []
    for ch in value:
        if ch == "_":
            out.append("__")
        elif "A" <= ch <= "Z":
            out.append("_" + ch.lower())
        elif ch.isascii() and (ch.isdigit() or ch.islower() or ch == "-"):
            out.append(ch)
        else:
            raise ProviderError(
                f"Tag value {value!r} has {ch!r}, which a GCP label cannot hold (letters, digits, '-', '_').",
                reason="invalid-label",
            )
    encoded = "".join(out)
    if len(encoded) > 63:
        raise ProviderError(
            f"Tag value {value!r} is too long for a GCP label ({len(encoded)} > 63 once encoded).",
            reason="invalid-label",
        )
    return encoded


def decode_label(value: str) -> str:
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "_" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append("_" if nxt == "_" else nxt.upper())
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def encode_labels(tags: dict[str, str]) -> dict[str, str]:
    labels = {}
    for k, v in tags.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", k):
            raise ProviderError(f"Tag key {k!r} is not a valid GCP label key.", reason="invalid-label")
        labels[k] = encode_label(str(v))
    return labels
