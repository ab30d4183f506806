"""The schema of a sim scenario: what the simulated clouds of :mod:`cloudmodal.providers.sim` do to launches
and spot workers, as pydantic models.

A scenario is a table (a dict, a JSON or TOML file, or inline JSON)::

    {
      "notice_s": 30,
      "provisioning": {"delay_s": 20, "jitter_s": 5,
                       "rules": [{"match": {"cloud": "lambda"}, "delay_s": 60}]},
      "capacity": [{"match": {"cloud": "aws", "instance_type": "p5.48xlarge", "market": "spot"},
                    "mode": "none", "from_s": 10, "until_s": 40},
                   {"match": {"cloud": "gcp", "gpu": "H100"}, "mode": "fail_prob", "p": 0.3}],
      "quota": [{"match": {"cloud": "azure"}, "max_gpus": 8, "per": ["region"]}],
      "preemption": [{"match": {"gpu": ["A100-*", "H100"]}, "every_s": 30, "jitter_s": 10, "notice_s": 5}]
    }

Times are seconds since the provider was created. A list of tables may be written as a single table (TOML's
``[preemption]`` for ``[[preemption]]``). :meth:`SimScenario.load` and the ``from_dict`` constructors raise
:class:`~cloudmodal.exception.InvalidError` naming the place of each problem (``capacity[0].match.gpus``) and
what to write instead; unknown keys are refused with the valid ones listed.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import random
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from cloudmodal.exception import InvalidError
from cloudmodal.pricing.offers import MARKETS

SCENARIO_ENV = "CLOUDMODAL_SIM_SCENARIO"

MATCH_FIELDS = ("cloud", "region", "zone", "instance_type", "gpu", "gpu_count", "market")
_PATTERN_FIELDS = ("cloud", "region", "zone", "instance_type", "gpu")
QUOTA_PER_FIELDS = ("cloud", "region", "zone", "instance_type", "gpu", "market")
CAPACITY_MODES = ("none", "fail_prob")
PREEMPTION_SCOPES = ("worker", "fleet")
_MAX_ERRORS = 5  # problems listed in one error message


# --- field types: each checks its value with a message that says what to write -----------------------------


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # v == v: not NaN


def _number(minimum: float = 0.0, maximum: float | None = None, *, optional: bool = False) -> Any:
    """A validator for a float field: a JSON number from ``minimum`` (to ``maximum``); strings and booleans
    are refused."""

    def check(v: object) -> float | None:
        if v is None and optional:
            return None
        if not _is_number(v):
            raise ValueError(f"must be a number, got {v!r}; write it without quotes, e.g. 10 or 2.5")
        x = float(v)  # type: ignore[arg-type]
        if x < minimum or (maximum is not None and x > maximum):
            rng = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"at least {minimum:g}"
            raise ValueError(f"must be {rng}, got {v!r}")
        return x

    return check


def _whole(what: str, minimum: int) -> Any:
    """A validator for an optional int field: a whole number of ``what`` from ``minimum``."""

    def check(v: object) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"must be a whole number of {what} ({minimum} or more), got {v!r}")
        return v

    return check


def _patterns(v: object) -> tuple[str, ...] | None:
    if v is None:
        return None
    items = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list | tuple) else None
    if not items or not all(isinstance(p, str) and p for p in items):
        raise ValueError(
            f'must be a pattern or a non-empty list of them, e.g. "H100" or ["A100-*", "H100"]; got {v!r}'
        )
    return items


def _choice(allowed: tuple[str, ...]) -> Callable[[object], object]:
    def check(v: object) -> object:
        if v is not None and v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {v!r}")
        return v

    return check


def _tables(v: object) -> tuple[Any, ...]:
    """A list of tables; a single table is a list of one (TOML's ``[preemption]`` vs ``[[preemption]]``)."""
    if v is None:
        return ()
    if isinstance(v, Mapping | BaseModel):
        return (v,)
    if isinstance(v, list | tuple):
        return tuple(v)
    raise ValueError(f"must be a list of tables (JSON objects), got {type(v).__name__}: {v!r}")


def _per(v: object) -> tuple[str, ...]:
    per = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list | tuple) else None
    if per is None:
        raise ValueError(f'must be a list of field names, e.g. ["region"]; got {v!r}')
    bad = [p for p in per if p not in QUOTA_PER_FIELDS]
    if bad:
        raise ValueError(f"unknown field(s) {', '.join(map(str, bad))}; valid: {', '.join(QUOTA_PER_FIELDS)}")
    return per


def _times(v: object) -> tuple[float, ...]:
    if not isinstance(v, list | tuple):
        raise ValueError(f"must be a list of times in seconds, e.g. [60, 120]; got {v!r}")
    bad = [t for t in v if not _is_number(t) or t < 0]
    if bad:
        raise ValueError(f"must be times in seconds (numbers, at least 0); {bad[0]!r} is not")
    return tuple(sorted(float(t) for t in v))


Patterns = Annotated[tuple[str, ...] | None, BeforeValidator(_patterns)]
Seconds = Annotated[float, BeforeValidator(_number())]
OptSeconds = Annotated[float | None, BeforeValidator(_number(optional=True))]
Probability = Annotated[float, BeforeValidator(_number(maximum=1.0))]
GpuCount = Annotated[int | None, BeforeValidator(_whole("GPUs", 1))]
GpuCap = Annotated[int | None, BeforeValidator(_whole("GPUs", 0))]
InstanceCap = Annotated[int | None, BeforeValidator(_whole("instances", 0))]


def _in_window(t: float, from_s: float | None, until_s: float | None) -> bool:
    return (from_s is None or t >= from_s) and (until_s is None or t < until_s)


def _check_window(from_s: float | None, until_s: float | None) -> None:
    if from_s is not None and until_s is not None and until_s <= from_s:
        raise ValueError(f"until_s ({until_s:g}) must be after from_s ({from_s:g}); swap them or drop one")


class _Table(BaseModel):
    """A scenario table: frozen, and refusing unknown keys with the valid ones listed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"must be a table (JSON object), got {type(data).__name__}: {data!r}")
        unknown = sorted(str(k) for k in data if k not in cls.model_fields)
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(cls.model_fields)}"
            )
        return data

    @classmethod
    def from_dict(cls, d: Any, where: str = "", *, source: str = "") -> Self:
        """Validate ``d``; errors are :class:`InvalidError` placed under ``where`` (e.g. ``capacity[0]``),
        naming ``source`` (a file) if given."""
        try:
            return cls.model_validate({} if d is None else d)
        except ValidationError as e:
            raise _invalid(e, where, source) from None


def _invalid(e: ValidationError, where: str = "", source: str = "") -> InvalidError:
    """One error message for every problem pydantic found: ``place: problem`` each."""
    problems = []
    for err in e.errors(include_url=False):
        place = where
        for part in err["loc"]:
            place += f"[{part}]" if isinstance(part, int) else (f".{part}" if place else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{place}: {msg}" if place else msg)
    more = f" (and {len(problems) - _MAX_ERRORS} more)" if len(problems) > _MAX_ERRORS else ""
    head = f"Invalid sim scenario {source}: " if source else "Invalid sim scenario: "
    return InvalidError(head + "; ".join(problems[:_MAX_ERRORS]) + more + ".")


# --- the tables ----------------------------------------------------------------------------------------------


class Match(_Table):
    """Which offers (in which market) a rule applies to; unset fields match anything.

    String fields take one pattern or a list of them: shell-style wildcards, case-insensitive. An offer
    without a zone never matches a ``zone`` pattern.

    >>> Match(cloud="aws", gpu=["H100", "A100-*"], market="spot").to_dict()
    {'cloud': 'aws', 'gpu': ['H100', 'A100-*'], 'market': 'spot'}
    """

    cloud: Patterns = None
    region: Patterns = None
    zone: Patterns = None
    instance_type: Patterns = None
    gpu: Patterns = None
    gpu_count: GpuCount = None
    market: Annotated[Literal["spot", "on-demand"] | None, BeforeValidator(_choice(MARKETS))] = None

    @functools.cached_property
    def _test(self) -> tuple[str | None, int | None, tuple[tuple[str, tuple[str, ...]], ...]]:
        """What :meth:`matches` checks, computed once: the market, the GPU count and the lowered patterns."""
        lowered = tuple(
            (name, tuple(p.lower() for p in getattr(self, name)))
            for name in _PATTERN_FIELDS
            if getattr(self, name) is not None
        )
        return self.market, self.gpu_count, lowered

    def matches(self, offer: Any, market: str) -> bool:
        want_market, gpu_count, lowered = self._test
        if want_market is not None and market != want_market:
            return False
        if gpu_count is not None and getattr(offer, "gpu_count", None) != gpu_count:
            return False
        for name, patterns in lowered:
            value = getattr(offer, name, None)
            if value is None:
                return False
            value = str(value).lower()
            if not any(fnmatch.fnmatchcase(value, p) for p in patterns):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in MATCH_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            out[name] = (value[0] if len(value) == 1 else list(value)) if isinstance(value, tuple) else value
        return out


AnyMatch = Annotated[Match, BeforeValidator(lambda v: {} if v is None else v)]  # null: every offer


class DelayRule(_Table):
    """Provisioning delay for the offers a ``match`` selects: ``delay_s`` ± uniform ``jitter_s``."""

    match: AnyMatch = Match()
    delay_s: Seconds = 0.0
    jitter_s: Seconds = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match.to_dict(), "delay_s": self.delay_s, "jitter_s": self.jitter_s}


class Provisioning(_Table):
    """How long a launch takes before its worker process starts: the first matching rule, else the default."""

    delay_s: Seconds = 0.0
    jitter_s: Seconds = 0.0
    rules: Annotated[tuple[DelayRule, ...], BeforeValidator(_tables)] = ()

    def rule_for(self, offer: Any, market: str) -> tuple[float, float]:
        for r in self.rules:
            if r.match.matches(offer, market):
                return r.delay_s, r.jitter_s
        return self.delay_s, self.jitter_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "delay_s": self.delay_s,
            "jitter_s": self.jitter_s,
            "rules": [r.to_dict() for r in self.rules],
        }


class CapacityRule(_Table):
    """Launches of matching offers fail with :class:`~cloudmodal.providers.base.NoCapacityError` while
    ``from_s <= t < until_s``: always (``mode="none"``) or with probability ``p`` (``mode="fail_prob"``).
    ``reason`` overrides the cloud's usual code (``InsufficientInstanceCapacity``...)."""

    match: AnyMatch = Match()
    mode: Annotated[Literal["none", "fail_prob"], BeforeValidator(_choice(CAPACITY_MODES))] = "none"
    p: Probability = 1.0
    from_s: OptSeconds = None
    until_s: OptSeconds = None
    reason: str | None = None

    @model_validator(mode="after")
    def _window(self) -> CapacityRule:
        _check_window(self.from_s, self.until_s)
        return self

    def active(self, t: float) -> bool:
        return _in_window(t, self.from_s, self.until_s)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match.to_dict(), "mode": self.mode}
        if self.mode == "fail_prob":
            out["p"] = self.p
        for k in ("from_s", "until_s", "reason"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


class QuotaRule(_Table):
    """At most ``max_gpus`` GPUs (and/or ``max_instances`` workers) alive at once across the matching offers;
    ``per`` splits that into one bucket per value of those fields (``per=["cloud"]``: each cloud its own
    cap). A launch that would go over raises :class:`~cloudmodal.providers.base.QuotaExceededError`."""

    match: AnyMatch = Match()
    max_gpus: GpuCap = None
    max_instances: InstanceCap = None
    per: Annotated[tuple[str, ...], BeforeValidator(_per)] = ()

    @model_validator(mode="after")
    def _has_a_cap(self) -> QuotaRule:
        if self.max_gpus is None and self.max_instances is None:
            raise ValueError("a quota rule needs max_gpus or max_instances, e.g. max_gpus = 8")
        return self

    def bucket(self, offer: Any, market: str) -> tuple[Any, ...]:
        return tuple(market if f == "market" else getattr(offer, f, None) for f in self.per)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match.to_dict()}
        for k in ("max_gpus", "max_instances"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.per:
            out["per"] = list(self.per)
        return out


class PreemptionRule(_Table):
    """When matching spot workers are reclaimed. Exactly one of:

    - ``every_s`` (± uniform ``jitter_s``): with ``scope="worker"`` (default) each worker gets its notice that
      long after it starts running; with ``scope="fleet"`` one running, not yet noticed worker (chosen by the
      seeded generator) gets a notice at each tick of that period;
    - ``rate_per_hour``: the same with exponentially distributed intervals (a Poisson process);
    - ``at_s``: explicit times (fleet scope, the default with ``at_s``): at each, one running matching worker
      gets a notice.

    The worker is SIGKILLed ``notice_s`` after its notice (default: the scenario's ``notice_s``). Only
    notices inside ``from_s <= t < until_s`` are given; a per-worker interval starts at ``from_s`` at the
    earliest.
    """

    match: AnyMatch = Match()
    every_s: OptSeconds = None
    jitter_s: Seconds = 0.0
    rate_per_hour: OptSeconds = None
    at_s: Annotated[tuple[float, ...], BeforeValidator(_times)] = ()
    scope: Annotated[Literal["worker", "fleet"] | None, BeforeValidator(_choice(PREEMPTION_SCOPES))] = None
    notice_s: OptSeconds = None
    from_s: OptSeconds = None
    until_s: OptSeconds = None
    reason: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_scope(cls, data: Any) -> Any:
        # at_s are times since the provider started, so they need a fleet; otherwise each worker has its own
        if isinstance(data, Mapping) and data.get("scope") is None:
            return {**data, "scope": "fleet" if data.get("at_s") else "worker"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PreemptionRule:
        given = [k for k in ("every_s", "rate_per_hour") if getattr(self, k) is not None]
        given += ["at_s"] if self.at_s else []
        if len(given) != 1:
            raise ValueError(
                "a preemption rule needs exactly one of every_s, rate_per_hour or at_s"
                + (f" (got {', '.join(given)}); keep one" if given else ", e.g. every_s = 600")
            )
        if self.every_s is not None and self.every_s <= 0:
            raise ValueError(f"every_s must be above 0, got {self.every_s!r}")
        if self.rate_per_hour is not None and self.rate_per_hour <= 0:
            raise ValueError(f"rate_per_hour must be above 0, got {self.rate_per_hour!r}")
        if self.at_s and self.scope != "fleet":
            raise ValueError("at_s are times since the provider started: scope must be 'fleet' (or unset)")
        if self.match.market not in (None, "spot"):
            raise ValueError(
                "preemption rules apply to spot workers only: leave match.market unset or 'spot'"
            )
        _check_window(self.from_s, self.until_s)
        return self

    def interval(self, rng: random.Random) -> float:
        """Seconds to the next notice (per worker: from its start; fleet: from the previous tick)."""
        if self.rate_per_hour is not None:
            return rng.expovariate(self.rate_per_hour / 3600.0)
        assert self.every_s is not None
        return max(0.0, self.every_s + rng.uniform(-self.jitter_s, self.jitter_s))

    def describe(self) -> str:
        if self.at_s:
            return "at " + ", ".join(f"{t:g}" for t in self.at_s) + " s"
        if self.rate_per_hour is not None:
            return f"{self.rate_per_hour:g}/h per {self.scope}"
        return (
            f"every {self.every_s:g}"
            + (f"±{self.jitter_s:g}" if self.jitter_s else "")
            + f" s per {self.scope}"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match.to_dict(), "scope": self.scope}
        if self.every_s is not None:
            out["every_s"] = self.every_s
            out["jitter_s"] = self.jitter_s
        if self.rate_per_hour is not None:
            out["rate_per_hour"] = self.rate_per_hour
        if self.at_s:
            out["at_s"] = list(self.at_s)
        for k in ("notice_s", "from_s", "until_s", "reason"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


class SimScenario(_Table):
    """What the simulated clouds do to launches and spot workers (see the module docstring for an example).

    ``notice_s``: the preemption notice period for :meth:`SimProvider.preempt` and rules that set none.
    ``signals``: whether the sim's live signals report its outages and quotas (placement then skips those offers
    without trying them); ``false`` is a cloud whose signals lag, where placement learns from failed launches.
    """

    provisioning: Provisioning = Provisioning()
    capacity: Annotated[tuple[CapacityRule, ...], BeforeValidator(_tables)] = ()
    quota: Annotated[tuple[QuotaRule, ...], BeforeValidator(_tables)] = ()
    preemption: Annotated[tuple[PreemptionRule, ...], BeforeValidator(_tables)] = ()
    notice_s: Seconds = 30.0
    signals: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_null_provisioning(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "provisioning" in data and data["provisioning"] is None:
            return {k: v for k, v in data.items() if k != "provisioning"}
        return data

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SimScenario:
        """A scenario from a ``.json`` or ``.toml`` file (other suffixes: JSON, then TOML)."""
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidError(
                f"Cannot read the sim scenario {p}: {e.strerror or e}. Set {SCENARIO_ENV} to a JSON or TOML file "
                "or to inline JSON."
            ) from None
        return cls.from_dict(_parse(text, p.suffix.lower(), str(p)), source=str(p))

    @classmethod
    def load(cls, source: SimScenario | Mapping[str, Any] | str | os.PathLike[str]) -> SimScenario:
        """A scenario from a scenario, a dict, inline JSON (text starting with ``{``) or a file path."""
        if isinstance(source, SimScenario):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, str) and source.lstrip().startswith("{"):
            return cls.from_dict(_parse(source, ".json", "inline scenario"))
        return cls.from_file(source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provisioning": self.provisioning.to_dict(),
            "capacity": [r.to_dict() for r in self.capacity],
            "quota": [r.to_dict() for r in self.quota],
            "preemption": [r.to_dict() for r in self.preemption],
            "notice_s": self.notice_s,
            "signals": self.signals,
        }


def _parse(text: str, suffix: str, where: str) -> Any:
    errors: list[str] = []
    parsers: list[tuple[str, Callable[[str], Any]]] = [("JSON", json.loads), ("TOML", tomllib.loads)]
    if suffix == ".toml":
        parsers.reverse()
    if suffix in (".json", ".toml"):
        parsers = parsers[:1]
    for kind, parse in parsers:
        try:
            return parse(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            errors.append(f"{kind}: {e}")
    raise InvalidError(
        f"The sim scenario in {where} is not valid {' or '.join(k for k, _ in parsers)}: {'; '.join(errors)}."
    )
