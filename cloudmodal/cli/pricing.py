"""`cloudmodal pricing` (to be written)."""

import typer

app = typer.Typer(help="Manage the GPU price catalogs.", no_args_is_help=True)
