"""Object ids with Modal's type prefixes (``ap-``, ``fu-``, ``fc-``…), generated client- or server-side.

Ids made by the caller make every create request idempotent: a retried request after a control-plane
restart finds the row it already wrote instead of creating a second one.
"""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(22))
