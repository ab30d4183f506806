"""Typed command-line arguments for entrypoints and functions, from their signatures (as ``modal run``)."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import click

from cloudmodal.exception import InvalidError

_TYPES: dict[Any, Any] = {str: click.STRING, int: click.INT, float: click.FLOAT, bool: bool}


def parse_args(fn: Any, args: list[str], prog: str) -> dict[str, Any]:
    """Parse ``--kebab-name value`` options for ``fn``'s parameters; ``--flag/--no-flag`` for bools."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params: list[click.Parameter] = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise InvalidError(
                f"{fn.__name__} takes *args/**kwargs, which cannot be turned into command-line options."
            )
        ann = hints.get(p.name, p.annotation if p.annotation is not inspect.Parameter.empty else str)
        origin = typing.get_origin(ann)
        if origin is typing.Literal:
            ctype: Any = click.Choice([str(c) for c in typing.get_args(ann)])
        elif ann in _TYPES:
            ctype = _TYPES[ann]
        elif origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            inner = [a for a in typing.get_args(ann) if a is not type(None)]
            ctype = _TYPES.get(inner[0], click.STRING) if inner else click.STRING
        else:
            ctype = click.STRING
        opt = "--" + p.name.replace("_", "-")
        required = p.default is inspect.Parameter.empty
        if ctype is bool:
            params.append(
                click.Option(
                    [f"{opt}/--no-{p.name.replace('_', '-')}"],
                    default=None if required else p.default,
                    required=required,
                )
            )
        else:
            params.append(
                click.Option(
                    [opt],
                    type=ctype,
                    required=required,
                    default=None if required else p.default,
                    show_default=True,
                )
            )
    cmd = click.Command(prog, params=params, callback=lambda **kw: kw, help=inspect.getdoc(fn))
    try:
        return cmd.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.UsageError as e:
        raise InvalidError(
            f"{e.format_message()}\nUsage: {prog} " + " ".join(_usage(p) for p in params)
        ) from None


def _usage(p: click.Parameter) -> str:
    name = p.opts[0]
    return name if p.required else f"[{name}]"
