"""One output object per command run: human tables on stdout, or JSON on stdout; progress and logs on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# Data goes to stdout; progress, logs and errors to stderr so `--json` output stays parseable.
stdout = Console()
stderr = Console(stderr=True)


def emit_json(value: Any) -> None:
    """Print `value` as JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def not_implemented(command: str, issue: str) -> None:
    import typer

    stderr.print(f"[red]error:[/] `lvllm {command}` is not implemented yet ({issue})")
    raise typer.Exit(2)
