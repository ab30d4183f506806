"""Turn cloudmodal errors into one clear line on stderr and an exit code, not a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from cloudmodal.exception import Error, InvalidError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except (InvalidError, TypeError) as e:
        if isinstance(e, TypeError) and not isinstance(e, InvalidError) and "cloudmodal" not in str(type(e)):
            raise
        typer.secho(f"Error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    except Error as e:
        typer.secho(f"Error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.secho("Interrupted.", fg="yellow", err=True)
        raise typer.Exit(130) from None


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(code)
