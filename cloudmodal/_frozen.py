"""Immutable value objects with ``__slots__`` that still pickle (cloudpickle ships them to workers)."""

from __future__ import annotations

from typing import Any


class Frozen:
    """Base for slotted value objects: attributes are set once with ``object.__setattr__`` in the
    constructor, never again; pickling goes through the slots."""

    __slots__ = ()
    _immutable_message = "this object is immutable"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(self._immutable_message)

    def __getstate__(self) -> dict[str, Any]:
        slots: tuple[str, ...] = self.__slots__  # a subclass's own names; this base declares none
        return {k: getattr(self, k) for k in slots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
