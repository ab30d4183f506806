"""``cloudmodal.Budget``: a spending cap for an app, which the autoscaler does not scale past.

``App("name", budget=cloudmodal.Budget(max_per_hour=20.0, max_total=500.0, period="month"))``:

- ``max_per_hour``: the most the app's running workers may cost together, in USD an hour (at the prices fixed
  when they launched). A launch that would go past it is refused.
- ``max_total``: the most the app may spend in one ``period`` (a UTC calendar "day", "week" from Monday, or
  "month"), from the cost ledger. Once reached, no new worker starts until the next period.

Workers already running are not stopped: a budget caps scale-up, it does not kill work in flight. Each refusal
is an event (``budget.exceeded``) and a line in the app's logs, and ``cloudmodal cost`` shows the headroom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cloudmodal.exception import InvalidError

PERIODS = ("day", "week", "month")


@dataclass(frozen=True)
class Budget:
    max_per_hour: float | None = None
    max_total: float | None = None
    period: str = "month"

    def __post_init__(self) -> None:
        for name in ("max_per_hour", "max_total"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise InvalidError(
                    f"cloudmodal.Budget({name}={v!r}): a budget is a non-negative number of US dollars, "
                    f"e.g. Budget({name}=25.0)."
                )
        if self.max_per_hour is None and self.max_total is None:
            raise InvalidError(
                "cloudmodal.Budget() caps nothing: give max_per_hour= (USD an hour) and/or max_total= (USD a period)."
            )
        if self.period not in PERIODS:
            raise InvalidError(
                f"cloudmodal.Budget(period={self.period!r}): a budget's period is one of {', '.join(PERIODS)}."
            )

    def to_wire(self) -> dict[str, Any]:
        return {"max_per_hour": self.max_per_hour, "max_total": self.max_total, "period": self.period}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Budget:
        return cls(d.get("max_per_hour"), d.get("max_total"), d.get("period", "month"))
