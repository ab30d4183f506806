"""The ``gpu=`` grammar: ``TYPE[:COUNT]``, case-insensitive; a list is an ordered fallback; ``"any"``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloudmodal.exception import InvalidError
from cloudmodal.pricing.gpus import ANY, canonical_name, lookup

MAX_GPU_COUNT = 8


@dataclass(frozen=True, slots=True)
class GpuTier:
    """One entry of a GPU request: ``count`` GPUs of ``type`` (a canonical name, or ``ANY``)."""

    type: str
    count: int = 1

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"

    def to_wire(self) -> str:
        return str(self)


def parse_gpu_spec(spec: object) -> GpuTier:
    """Parse one ``TYPE[:COUNT]`` string into a tier, with an error that says exactly what is wrong."""
    if not isinstance(spec, str):
        raise InvalidError(
            f"Invalid GPU config: {spec!r}. Value must be a string like 'H100' or 'A100-80GB:2', "
            "a list of such strings (an ordered fallback), or None."
        )
    text = spec.strip()
    if not text:
        raise InvalidError(
            "Invalid GPU config: empty string. Use a GPU type such as 'H100', or None for CPU."
        )
    type_text, sep, count_text = text.partition(":")
    count = 1
    if sep:
        try:
            count = int(count_text)
        except ValueError:
            hint = ""
            if count_text.strip().upper().endswith("GB"):
                hint = f" To ask for a memory size, write it in the type: '{type_text}-{count_text.strip().upper()}'."
            raise InvalidError(
                f"Invalid GPU count in {spec!r}: {count_text!r} is not an integer.{hint} "
                f"The form is TYPE[:COUNT], e.g. 'H100:2'."
            ) from None
        if not 1 <= count <= MAX_GPU_COUNT:
            raise InvalidError(
                f"Invalid GPU count in {spec!r}: {count}. A function can use 1 to {MAX_GPU_COUNT} GPUs "
                "(all on one machine)."
            )
    name = canonical_name(type_text)
    if name != ANY:
        t = lookup(name)
        assert t is not None
        if count > t.max_count:
            raise InvalidError(
                f"Invalid GPU count in {spec!r}: {name} machines have at most {t.max_count} GPUs."
            )
    return GpuTier(name, count)


def parse_gpu(gpu: object) -> tuple[GpuTier, ...]:
    """Parse a ``gpu=`` argument into an ordered tuple of tiers (empty for CPU-only)."""
    if gpu is None:
        return ()
    if isinstance(gpu, str):
        return (parse_gpu_spec(gpu),)
    if isinstance(gpu, Sequence):
        if not gpu:
            raise InvalidError("Invalid GPU config: empty list. Give at least one GPU type, or None for CPU.")
        tiers = tuple(parse_gpu_spec(g) for g in gpu)
        seen: set[GpuTier] = set()
        for t in tiers:
            if t in seen:
                raise InvalidError(
                    f"Invalid GPU config: {str(t)!r} appears twice in the fallback list {list(gpu)!r}."
                )
            seen.add(t)
        return tiers
    raise InvalidError(
        f"Invalid GPU config: {gpu!r}. Value must be a string like 'H100', a list of strings, or None."
    )
