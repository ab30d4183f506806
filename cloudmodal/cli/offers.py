"""`cloudmodal offers` (to be written)."""

import typer


def offers_command(gpus: list[str] = typer.Argument(None)) -> None:
    """Rank cloud GPU offers for a fallback list of GPU types."""
    raise typer.Exit(1)
