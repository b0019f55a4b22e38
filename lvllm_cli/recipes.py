"""`lvllm recipes`: list the per-model recipes; `lvllm recipes show NAME` prints one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from .output import emit_json, stdout

app = typer.Typer(help="List and show model recipes.", no_args_is_help=False, invoke_without_command=True)


@app.callback()
def recipes_list(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List every recipe: model, size, default expert format and context, tested or not."""
    if ctx.invoked_subcommand is not None:
        return
    from lvllm_runtime.recipes import load_recipes

    rows = [r.summary() for r in load_recipes().values()]
    if json_out:
        emit_json(rows)
        return
    t = Table(title="recipes (`lvllm recipes show NAME`, `lvllm plan --recipe NAME`)", header_style="bold")
    for col in ("name", "params", "experts", "format", "context", "status"):
        t.add_column(col, justify="right" if col in ("params", "context") else "left", no_wrap=True)
    for r in rows:
        t.add_row(escape(r["name"]), f"{r['total_params'] / 1e9:.1f}B",
                  f"{r['experts']}x{r['top_k']}", r["expert_format"], str(r["max_model_len"]),
                  "[green]tested[/]" if r["status"] == "tested" else "[yellow]untested[/]")
    stdout.print(t)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Recipe name (see `lvllm recipes`).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the recipe as JSON.")] = False,
) -> None:
    """Print one recipe as written (YAML, with its `# unverified` marks)."""
    from lvllm_runtime.recipes import get

    r = get(name)
    if json_out:
        emit_json(r.data)
        return
    stdout.print(Syntax(r.path.read_text(), "yaml", theme="ansi_dark", word_wrap=True))
