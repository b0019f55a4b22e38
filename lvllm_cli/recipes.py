"""`lvllm recipes`: list and show the per-model recipes."""

from __future__ import annotations

import typer

from .output import not_implemented

app = typer.Typer(help="List and show model recipes.", no_args_is_help=False, invoke_without_command=True)


@app.callback()
def recipes_list() -> None:
    """Not implemented yet."""
    not_implemented("recipes", "issue 7")
