"""Turn library exceptions into one line and an exit code; a traceback only with LVLLM_DEBUG=1."""

from __future__ import annotations

import sys

from rich.markup import escape

from lvllm_runtime import envs
from lvllm_runtime.errors import LvllmError

from .output import stderr


def report(e: LvllmError) -> None:
    """Print the one-line form of a library error on stderr."""
    line = f"[bold red]error:[/] {escape(e.message)}"
    if e.fix:
        line += f" [dim]->[/] {escape(e.fix)}"
    stderr.print(line, highlight=False, soft_wrap=True)


def run_main(app) -> None:
    """Run the Typer app in standalone mode (usage errors exit 2); library errors become one line."""
    try:
        app()
    except LvllmError as e:
        if envs.debug():
            raise
        report(e)
        sys.exit(e.exit_code)
