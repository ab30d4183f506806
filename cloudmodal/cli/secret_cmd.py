"""`cloudmodal secret create|list|delete`: named Secrets from the command line.

Values come from ``KEY=VALUE`` arguments, a ``.env`` file (``--from-dotenv``), a JSON object file
(``--from-json``) or stdin (``-`` or ``--from-stdin``: ``KEY=VALUE`` lines or a JSON object), so that they need
not appear on a command line (where shell history and process listings keep them). Nothing here prints a
value: ``list`` shows names and dates, and errors name keys or argument positions only.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Manage named secrets.", no_args_is_help=True)

SECRET_COLUMNS = (
    Column("Name"),
    Column("Created", keep=1),
    Column("Updated", keep=2),
    Column("Last used", keep=1),
    Column("Created by", keep=3),
)


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _bad(message: str, hint: str = "'KEYVALUES...'") -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=hint)


def parse_pairs(args: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict (a later key wins). An error names the argument's position and, once
    split, its key, never what follows the ``=``."""
    out: dict[str, str] = {}
    for i, arg in enumerate(args, 1):
        key, eq, value = arg.partition("=")
        if not eq:
            raise _bad(
                f"argument {i} is not KEY=VALUE (it has no '='; it is not shown, in case it is a value). "
                "Write KEY=VALUE, or pass values with --from-dotenv, --from-json or on stdin (-)."
            )
        if not key:
            raise _bad(f"argument {i} has no key before its '='. Write KEY=VALUE.")
        out[key] = value
    return out


def _read_json(text: str, source: str) -> dict[str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:  # the message holds a position, not the text
        raise _bad(
            f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).", source
        ) from None
    if not isinstance(data, dict):
        raise _bad(
            f'{source} must hold a JSON object of KEY: "value" pairs, not a {type(data).__name__}.', source
        )
    out: dict[str, str] = {}
    for k, v in data.items():
        if not isinstance(v, str):
            raise _bad(f"{source}: the value of {k!r} must be a string, not {type(v).__name__}.", source)
        out[k] = v
    return out


def _read_dotenv(text: str, source: str) -> dict[str, str]:
    from cloudmodal.exception import InvalidError
    from cloudmodal.secret import parse_dotenv

    try:
        return parse_dotenv(text, source)
    except InvalidError:
        # parse_dotenv's message quotes the line, which may hold a value: name the file alone
        raise _bad(
            f"{source} has a line that is not KEY=VALUE (not shown, in case it holds a value).", source
        ) from None


def _read_stdin() -> dict[str, str]:
    text = sys.stdin.read()
    if text.lstrip().startswith("{"):
        return _read_json(text, "stdin")
    return _read_dotenv(text, "stdin")


def _read_file(path: Path, kind: str) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _bad(f"cannot read {path}: {e.strerror or e}.", f"'--from-{kind}'") from None
    return _read_json(text, str(path)) if kind == "json" else _read_dotenv(text, str(path))


@app.command("create")
def create(
    name: str = typer.Argument(
        ..., help="The secret's name (letters, digits, '-', '_', '.').", show_default=False
    ),
    keyvalues: list[str] = typer.Argument(
        None,
        help="KEY=VALUE pairs; '-' reads KEY=VALUE lines or a JSON object from stdin.",
        show_default=False,
    ),
    from_dotenv: Path | None = typer.Option(
        None, "--from-dotenv", help="Read KEY=VALUE lines from this .env file."
    ),
    from_json: Path | None = typer.Option(
        None, "--from-json", help="Read a JSON object of KEY: value from this file."
    ),
    from_stdin: bool = typer.Option(
        False, "--from-stdin", help="Read KEY=VALUE lines or a JSON object from stdin."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite the secret if it exists (its old keys are dropped)."
    ),
) -> None:
    """Create a named secret. Later sources win: --from-dotenv, --from-json, stdin, then KEY=VALUE arguments.

    A function gets its keys as environment variables when it lists Secret.from_name(NAME) in its
    secrets (or its App's).
    """
    from cloudmodal.secret import create_named

    pairs = list(keyvalues or [])
    stdin = from_stdin or "-" in pairs
    pairs = [p for p in pairs if p != "-"]
    env: dict[str, str] = {}
    if from_dotenv is not None:
        env |= _read_file(from_dotenv, "dotenv")
    if from_json is not None:
        env |= _read_file(from_json, "json")
    if stdin:
        env |= _read_stdin()
    env |= parse_pairs(pairs)
    if not env:
        raise _bad(
            "a secret needs at least one key: pass KEY=VALUE, --from-dotenv PATH, --from-json PATH or values on "
            "stdin (-)."
        )
    with user_errors():
        created = create_named(name, env, if_exists="overwrite" if force else "fail")
    keys = ", ".join(sorted(env))
    verb = "Created" if created else "Overwrote"
    typer.echo(f"{verb} secret {name!r} with {len(env)} key(s): {keys}.")
    typer.echo(f"Use it with: @app.function(secrets=[cloudmodal.Secret.from_name({name!r})])", err=True)


@app.command("list")
def list_secrets(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """The named secrets, newest first: name and dates (never values)."""
    from cloudmodal.secret import _transport

    with user_errors():
        rows: list[dict[str, Any]] = _transport().get("/v1/secrets")
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = [
        [
            str(r.get("name", "")),
            _ts(r.get("created_at")),
            _ts(r.get("updated_at")),
            _ts(r.get("last_used_at")),
            str(r.get("created_by") or "-"),
        ]
        for r in rows
    ]
    print_table(SECRET_COLUMNS, table, wide=wide, notes=() if rows else ["No named secrets yet."])


@app.command("delete")
def delete(
    name: str = typer.Argument(..., help="The secret's name.", show_default=False),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Succeed when there is no such secret."
    ),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation."),
) -> None:
    """Delete a named secret. Functions that use it keep their running workers but cannot start new ones."""
    from cloudmodal.secret import delete_named

    if not yes:
        typer.confirm(
            f"Delete secret {name!r}? Functions that use it will not be able to start new workers.",
            abort=True,
        )
    with user_errors():
        deleted = delete_named(name, allow_missing=allow_missing)
    typer.echo(f"Deleted secret {name!r}." if deleted else f"No secret named {name!r}; nothing to delete.")
