"""``cloudmodal.Retries``: how often, and how patiently, a failed input is tried again."""

from __future__ import annotations

from typing import Any

from cloudmodal.exception import InvalidError
from cloudmodal.spec import RetryPolicy


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidError(f"Retries({name}=...) must be a number, not {type(value).__name__} ({value!r}).")
    return float(value)


class Retries:
    """Retry policy for a function's inputs: ``max_retries`` more attempts after the first, with
    exponential backoff. Timeouts apply per attempt; an exception consumes an attempt, a lost worker
    (crash, preemption) does not.

    ```python
    @app.function(retries=cloudmodal.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=1.0))
    def flaky():
        ...
    # waits 1 s, 2 s, 4 s before attempts 2, 3 and 4
    ```

    ``retries=3`` on a decorator means ``Retries(max_retries=3, backoff_coefficient=1.0, initial_delay=1.0)``:
    a fixed 1 s delay.
    """

    __slots__ = ("max_retries", "backoff_coefficient", "initial_delay", "max_delay")

    max_retries: int
    backoff_coefficient: float
    initial_delay: float
    max_delay: float

    def __init__(
        self,
        *,
        max_retries: int,
        backoff_coefficient: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int):
            raise InvalidError(
                f"Invalid retries number: {max_retries!r}. max_retries must be a whole number >= 0, "
                "e.g. Retries(max_retries=3)."
            )
        if max_retries < 0:
            raise InvalidError(
                f"Invalid retries number: {max_retries}. Function retries must be non-negative: "
                "use max_retries=0 (no retries) or more."
            )
        backoff = _number("backoff_coefficient", backoff_coefficient)
        if not 1.0 <= backoff <= 10.0:
            raise InvalidError(
                f"Invalid backoff_coefficient argument: {backoff_coefficient!r}. Coefficient must be between "
                "1.0 (fixed-interval backoff) and 10.0 (inclusive)."
            )
        initial = _number("initial_delay", initial_delay)
        if not 0.0 <= initial <= 60.0:
            raise InvalidError(
                f"Invalid initial_delay argument: {initial_delay!r}. Must be between 0 and 60 seconds (inclusive)."
            )
        cap = _number("max_delay", max_delay)
        if not 1.0 <= cap <= 60.0:
            raise InvalidError(
                f"Invalid max_delay argument: {max_delay!r}. Must be between 1 and 60 seconds (inclusive)."
            )
        object.__setattr__(self, "max_retries", max_retries)
        object.__setattr__(self, "backoff_coefficient", backoff)
        object.__setattr__(self, "initial_delay", initial)
        object.__setattr__(self, "max_delay", cap)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Retries is immutable; build a new one")

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): ``initial_delay * coef**(attempt-1)``,
        capped at ``max_delay``."""
        return self.to_policy().delay_for(attempt)

    def delays(self) -> list[float]:
        """The delay before each retry, in order (``max_retries`` entries)."""
        return [self.delay_for(n) for n in range(1, self.max_retries + 1)]

    def to_policy(self) -> RetryPolicy:
        """The spec's form (:class:`cloudmodal.spec.RetryPolicy`), which the runtime reads."""
        return RetryPolicy(
            max_retries=self.max_retries,
            backoff_coefficient=self.backoff_coefficient,
            initial_delay=self.initial_delay,
            max_delay=self.max_delay,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "backoff_coefficient": self.backoff_coefficient,
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Retries:
        return cls(**d)

    def _key(self) -> tuple[int, float, float, float]:
        return (self.max_retries, self.backoff_coefficient, self.initial_delay, self.max_delay)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Retries) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Retries(max_retries={self.max_retries}, backoff_coefficient={self.backoff_coefficient}, "
            f"initial_delay={self.initial_delay}, max_delay={self.max_delay})"
        )


def parse_retries(retries: object, owner: str) -> Retries | None:
    """Normalize a decorator's ``retries=`` (None, an int or a Retries) into a Retries or None."""
    if retries is None:
        return None
    if isinstance(retries, Retries):
        return retries
    if isinstance(retries, int) and not isinstance(retries, bool):
        if retries < 0:
            raise InvalidError(
                f"{owner}: retries={retries} is negative. Use retries=0 (no retries) or a positive number."
            )
        if retries == 0:
            return None
        return Retries(max_retries=retries, backoff_coefficient=1.0, initial_delay=1.0)
    raise InvalidError(
        f"{owner}: retries must be an int or a cloudmodal.Retries, not {type(retries).__name__} ({retries!r}). "
        "E.g. retries=3, or retries=cloudmodal.Retries(max_retries=3, backoff_coefficient=2.0)."
    )
