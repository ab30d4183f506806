"""Per-input context the worker sets while user code runs (read by ``cloudmodal.current_input_id()``)."""

from __future__ import annotations

from contextvars import ContextVar

current_input_id: ContextVar[str | None] = ContextVar("cloudmodal_current_input_id", default=None)
current_call_id: ContextVar[str | None] = ContextVar("cloudmodal_current_call_id", default=None)
