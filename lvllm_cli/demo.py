"""`lvllm demo`: the whole flow on a tiny model in one command; exits 0 only when the chat answer came back."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lvllm_runtime.demo import run_demo
from lvllm_runtime.errors import LvllmError

from .output import emit_json, stderr, stdout
from .plan import render as render_plan
from .serve import Stages, fail_with_log, follow, stop_on_sigterm

STAGES = ["model", "quantize", "plan", "vLLM start", "request", "shutdown"]


def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Keep serving after the answer until Ctrl-C.")] = False,
    port: Annotated[Optional[int], typer.Option(help="Port for the server (default: a free one).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Build a tiny MoE model, quantize it, plan, serve it with vLLM and ask it one question over HTTP."""
    stages = Stages(STAGES)

    def on_stage(name: str, detail: str) -> None:
        stages.start("plan" if name == "store" else name, detail)

    def hold(server) -> None:
        stages.done("request")
        stages.stop()
        stdout.print(f"serving at {server.command.url} (model: {server.command.served_model_name}); Ctrl-C stops it")
        try:
            follow(server)
        except KeyboardInterrupt:
            stderr.print("stopping vLLM ...")

    try:
        with stop_on_sigterm(), stages:
            result = run_demo(port=port, on_stage=on_stage, hold=hold if keep else None)
            stages.done("shutdown")
    except LvllmError as e:
        fail_with_log(e)
    except KeyboardInterrupt:
        stderr.print("interrupted; vLLM stopped")
        raise typer.Exit(130)

    if json_out:
        emit_json(result.to_dict())
        return
    stdout.print(f"[bold]Q:[/] {escape(result.question)}")
    stdout.print(f"[bold]A:[/] {escape(repr(result.answer))}  [dim]({result.completion_tokens} tokens from a tiny random model)[/]")
    if result.engine_pids:
        stdout.print(f"lvllm's CPU engine ran the routed experts in vLLM process {', '.join(map(str, result.engine_pids))}")
    else:
        stderr.print("[yellow]warning:[/] no vLLM process ran lvllm's engine: the plugin was inactive")
    timings = Table("stage", "seconds", title="timings", title_justify="left")
    for name, seconds in result.timings.items():
        timings.add_row(name, f"{seconds:.1f}")
    stdout.print(timings)
    render_plan(result.plan)
    stdout.print(f"[dim]served with: {escape(result.command)}[/]", highlight=False, soft_wrap=True)

