"""`lvllm serve`: store -> plan -> vLLM command -> running OpenAI server, with a live view of the stages."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lvllm_runtime import launcher
from lvllm_runtime.errors import LvllmError

from .output import stderr, stdout

ENGINE_LINE = "lvllm: "  # the plugin's log lines (engine start, layers loaded) carry this prefix
STAGES = ["store", "plan", "vLLM start", "engine load", "ready"]
STATE_STYLE = {"wait": ("·", "dim"), "run": ("…", "yellow"), "done": ("✓", "green"), "fail": ("✗", "red")}


class Stages:
    """Named stages on stderr (state, seconds, one line of detail): a Rich live table on a terminal, one line per
    change elsewhere (CI logs)."""

    def __init__(self, names: list[str], transient: bool = False):
        self.rows = {n: {"state": "wait", "t0": None, "t": None, "detail": ""} for n in names}
        self.live = Live(self._render(), console=stderr, refresh_per_second=4, transient=transient) \
            if stderr.is_terminal else None

    def __enter__(self) -> "Stages":
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for name, row in self.rows.items():
            if row["state"] == "run" and exc[0] is not None:
                row["state"] = "fail"
                self._line(name)
        self.stop()

    def stop(self) -> None:
        """End the live view (later output goes below it)."""
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()

    def start(self, name: str, detail: str = "") -> None:
        for other, row in self.rows.items():  # starting a stage finishes the one before it
            if row["state"] == "run" and other != name:
                self.done(other)
        row = self.rows[name]
        row["detail"] = detail
        if row["state"] != "run":
            row["state"], row["t0"] = "run", time.monotonic()
            self._line(name)
        self._update()

    def done(self, name: str, detail: str | None = None) -> None:
        row = self.rows[name]
        if detail is not None:
            row["detail"] = detail
        if row["state"] != "done":
            row["t"] = time.monotonic() - row["t0"] if row["t0"] else None
            row["state"] = "done"
            self._line(name)
        self._update()

    def _update(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def _line(self, name: str) -> None:
        if self.live is None:
            row = self.rows[name]
            mark, style = STATE_STYLE[row["state"]]
            t = f" {row['t']:.1f}s" if row["t"] is not None else ""
            stderr.print(f"[{style}]{mark}[/] {name}{t} [dim]{escape(row['detail'])}[/]", highlight=False, soft_wrap=True)

    def _render(self) -> Table:
        table = Table.grid(padding=(0, 1))
        for name, row in self.rows.items():
            mark, style = STATE_STYLE[row["state"]]
            t = row["t"] if row["t"] is not None else (time.monotonic() - row["t0"] if row["t0"] else None)
            table.add_row(
                Text(mark, style=style),
                Text(name, style="bold" if row["state"] == "run" else ""),
                Text(f"{t:6.1f}s" if t is not None else "", style="dim"),
                Text(row["detail"][-110:], style="dim", overflow="ellipsis", no_wrap=True),
            )
        return table


def fail_with_log(e: LvllmError) -> None:
    """One line for the error, then vLLM's log tail when there is one; exit with the error's code."""
    # Escaped: messages name extras such as lvllm[cpu], which Rich would read as markup.
    line = f"[bold red]error:[/] {escape(e.message)}"
    if e.fix:
        line += f" [dim]->[/] {escape(e.fix)}"
    stderr.print(line, highlight=False, soft_wrap=True)
    tail = getattr(e, "log_tail", "")
    if tail:
        stderr.print("[dim]--- end of vLLM's log ---[/]")
        stderr.out(tail.rstrip(), highlight=False)
    raise typer.Exit(e.exit_code)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM/SIGHUP stop the server like Ctrl-C does (vLLM is in its own session and never sees our signals)."""

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def stop_quietly(server: launcher.VllmServer | None) -> None:
    """Stop vLLM; a second Ctrl-C while it shuts down must not leave its processes behind."""
    if server is None:
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.stop()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_server(server: launcher.VllmServer, stages: Stages, store: Path, ready_timeout: float | None) -> float:
    """Start vLLM and wait for /v1/models; the plugin's log lines feed the "engine load" stage, the others
    "vLLM start". Once ready, check that a vLLM process really runs lvllm's engine. Returns the seconds to ready."""
    stages.start("vLLM start", f"log: {server.log_path}")
    server.start()

    def on_line(line: str) -> None:
        if ENGINE_LINE in line:
            stages.start("engine load", line[line.index(ENGINE_LINE):])
        elif stages.rows["engine load"]["state"] == "wait":
            stages.start("vLLM start", line)

    waited = server.wait_ready(ready_timeout, on_progress=on_line)
    pids = server.engine_pids(store)
    stages.start("engine load", stages.rows["engine load"]["detail"])
    if pids:
        stages.done("engine load", f"lvllm engine on {store.name} in pid {', '.join(map(str, pids))}")
    else:
        stages.done("engine load", "no vLLM process runs lvllm's engine")
        stderr.print("[yellow]warning:[/] vLLM is serving, but no process of it runs lvllm's engine on the store: "
                     f"the plugin is inactive (see {escape(str(server.log_path))})", highlight=False)
    stages.start("ready", server.command.url)
    stages.done("ready")
    return waited


def follow(server: launcher.VllmServer) -> int:
    """Echo vLLM's log to stderr until it exits; returns its exit code."""
    with open(server.log_path, errors="replace") as log:
        log.seek(0, 2)
        while True:
            line = log.readline()
            if line:
                stderr.out(line.rstrip("\n"), highlight=False)
                continue
            rc = server.exited()
            if rc is not None:
                return rc
            time.sleep(0.3)


def serve(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Model directory (Hugging Face checkpoint).", show_default=False)],
    recipe: Annotated[Optional[str], typer.Option(help="Recipe name (`lvllm recipes`).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Expert store directory (from `lvllm quantize`).")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="Plan file (from `lvllm plan`); made here when not given.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the vLLM command and exit.")] = False,
    quantize: Annotated[bool, typer.Option("--quantize", help="Make (or finish) the expert store first when it is missing or incomplete.")] = False,
    verify_store: Annotated[bool, typer.Option("--verify-store", help="Check the sha256 of every store file against its manifest (done anyway the first time, and after the store changes).")] = False,
    ready_timeout: Annotated[
        Optional[float], typer.Option(help="Give up when vLLM is not ready after this many seconds.")
    ] = None,
    record_routing: Annotated[Optional[Path], typer.Option(
        "--record-routing", metavar="FILE", help="Count the routed picks per layer and expert while serving and keep "
        "them in FILE (rewritten every --record-every seconds): `lvllm plan --routing-profile FILE` puts the most "
        "picked experts on the GPU.")] = None,
    record_every: Annotated[Optional[float], typer.Option(
        "--record-every", metavar="SECONDS", help="How often the counts reach FILE and /metrics (default 10).")] = None,
) -> None:
    """Serve MODEL through vLLM's OpenAI server with the lvllm plugin; vLLM options go after `--`.

    Example: lvllm serve ./Qwen3-30B-A3B --store ./q30-store -- --max-model-len 8192 --api-key KEY
    """
    user_args = list(ctx.args)
    stages = Stages(STAGES, transient=dry_run)
    server: launcher.VllmServer | None = None
    with stop_on_sigterm():
        try:
            if not dry_run:
                launcher.require_vllm()
            recipe_data = load_recipe(recipe)
            with stages:
                setup = launcher.prepare(
                    model, recipe=recipe_data, store=store, plan_path=plan, host=host, port=port,
                    user_args=user_args, quantize=quantize, verify_store=verify_store, on_stage=stages.start,
                    record_routing=record_routing, record_every_s=record_every,
                )
                stages.done("store", f"{setup.store}: {setup.store_check}")
                stages.done("plan", f"{'made' if setup.plan_made else 'read'} {setup.plan_path}")
                show_overrides(setup.command)
                if not dry_run:
                    stderr.print(f"[bold]vLLM command:[/] {setup.command.display()}", highlight=False, soft_wrap=True)
                    server = launcher.VllmServer(setup.command, setup.log_path)
                    run_server(server, stages, setup.store, ready_timeout)
            if dry_run:
                print(setup.command.display(), flush=True)  # plain print: Rich would wrap it at the terminal width
                return
            stdout.print(f"{setup.command.url}  (model: {setup.command.served_model_name})", highlight=False)
            sys.stdout.flush()
            stderr.print("[dim]serving; Ctrl-C stops vLLM and all its processes[/]")
            rc = follow(server)
            raise server.failure(f"vLLM exited with code {rc}")
        except KeyboardInterrupt:
            if server is None:  # stopped while the store or plan was being made: nothing served, say how to go on
                stderr.print("[bold red]error:[/] interrupted before vLLM started [dim]->[/] run the same command "
                             "again (an unfinished store is finished, not redone, with --quantize)", highlight=False,
                             soft_wrap=True)
                raise typer.Exit(130) from None
            stderr.print("stopping vLLM ...")
        except LvllmError as e:
            stop_quietly(server)
            fail_with_log(e)
        finally:
            stop_quietly(server)


def load_recipe(name: str | None) -> dict | None:
    if name is None:
        return None
    from lvllm_runtime import recipes

    return recipes.get(name).data


def show_overrides(command: launcher.ServeCommand) -> None:
    """Say which recipe or plan values the user's own vLLM arguments replaced; warn about an open, keyless server."""
    for o in command.overrides:
        if o.by == "yours":
            stderr.print(f"[yellow]conflict:[/] {escape(str(o))}", highlight=False)
    if command.host not in ("127.0.0.1", "localhost", "::1") and not command.api_key:
        stderr.print(f"[yellow]warning:[/] the server listens on {command.host} without an API key; "
                     "add `-- --api-key KEY` (or set VLLM_API_KEY) before exposing it", highlight=False)
