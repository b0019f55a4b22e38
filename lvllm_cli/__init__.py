"""lvllm command line: presentation only (Typer commands, Rich rendering, exit codes)."""
