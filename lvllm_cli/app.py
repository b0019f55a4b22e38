"""The `lvllm` command: wires one module per command, nothing else."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lvllm_runtime import __version__

from . import demo, doctor, plan, quantize, recipes, serve
from .errors import run_main

app = typer.Typer(
    name="lvllm",
    help="Serve Mixture-of-Experts models larger than your GPU: routed experts on CPU RAM, the rest on the GPU, through vLLM.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("doctor")(doctor.doctor)
app.command("quantize")(quantize.quantize)
app.command("plan")(plan.plan)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve.serve)
app.command("demo")(demo.demo)
app.add_typer(recipes.app, name="recipes")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lvllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """lvllm: doctor -> quantize -> plan -> serve."""


def main() -> None:
    run_main(app)
