"""Object ids with Modal's type prefixes (``ap-``, ``fu-``, ``fc-``…), generated client- or server-side.

Ids made by the caller make every create request idempotent: a retried request after a control-plane
restart finds the row it already wrote instead of creating a second one.
"""

from __future__ import annotations

import os
import string

_ALPHABET = string.ascii_letters + string.digits
_LENGTH = 22  # 22 characters of 62: 131 bits
# random bytes to characters: byte b -> _ALPHABET[b % 62] for b < 248 (4 x 62), and bytes >= 248 dropped,
# so every character is equally likely (no modulo bias); a C-level translate instead of a Python loop
_ACCEPT = 4 * len(_ALPHABET)
_TABLE = bytes(ord(_ALPHABET[b % len(_ALPHABET)]) if b < _ACCEPT else 0 for b in range(256))
_REJECT = bytes(range(_ACCEPT, 256))


def new_id(prefix: str) -> str:
    chars = b""
    while len(chars) < _LENGTH:  # 32 bytes almost always give 22 accepted (a byte is dropped 1 time in 32)
        chars += os.urandom(32).translate(_TABLE, _REJECT)
    return prefix + "-" + chars[:_LENGTH].decode("ascii")
