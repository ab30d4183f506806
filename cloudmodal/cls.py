"""``cloudmodal.cls``: where Modal's ``modal.cls`` names live (``from modal.cls import Cls, Obj``).

The handles are defined in :mod:`cloudmodal.functions`; this module only gives them Modal's address.
"""

from __future__ import annotations

from cloudmodal.functions import Cls, Obj

__all__ = ["Cls", "Obj"]
