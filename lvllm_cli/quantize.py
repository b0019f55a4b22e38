"""`lvllm quantize`: options -> lvllm_runtime.quantize.quantize -> Rich progress on stderr, a summary or `--json`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


from .output import emit_json, stderr, stdout

if TYPE_CHECKING:
    from lvllm_runtime.quantize import Progress as QuantizeProgress

GB = 1e9


def quantize(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face checkpoint directory (config.json + safetensors).")],
    out_dir: Annotated[Path, typer.Argument(help="Expert store directory to write (new or empty, or one to --resume).")],
    weight_format: Annotated[str, typer.Option("--format", help="Store weights as int4 (RTN, or INT4 passed through) or bf16.")] = "int4",
    group_size: Annotated[str, typer.Option("--group-size", help="INT4 group: 128, 64, 32 or auto (largest that divides).")] = "auto",
    numa_nodes: Annotated[str, typer.Option("--numa-nodes", help="Split each expert over N NUMA nodes, or auto: this machine's count.")] = "auto",
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Threads converting experts (default: physical cores).")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", metavar="A-B", help="Only these layer indices (inclusive).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished layer files of an interrupted run, write the rest.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check every stored expert against the source (exit 1 over the threshold).")] = False,
    threshold: Annotated[Optional[float], typer.Option("--verify-threshold", help="Max relative error per expert (default 0.2 int4, 0.01 bf16).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    method: Annotated[str, typer.Option("--method", help="INT4 method: rtn (round-to-nearest while streaming), or gptq / awq (llm-compressor calibration first; needs the calibrate extra).")] = "rtn",
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help='JSONL of {"text": ...} or {"messages": [...]} records (default: the bundled multilingual text + code set).')] = None,
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", min=1, help="Calibration samples.")] = 16,
    calibration_seq_len: Annotated[int, typer.Option("--calibration-seq-len", min=8, help="Tokens per calibration sample.")] = 256,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="RAM calibration may use, e.g. 24GB (default: what is free); weights beyond it are offloaded to disk.")] = None,
) -> None:
    """Stream a checkpoint's routed experts (BF16/FP16/FP8/MXFP4/INT4) into the NUMA-split expert store."""
    # torch loads here, not at `lvllm` start-up: `lvllm doctor` and `--help` stay fast.
    from lvllm_runtime.quantize import QuantizeOptions, parse_layer_range, quantize as run_quantize, resolve_numa_nodes

    options = QuantizeOptions(
        weight_format=weight_format,
        group_size=group_size if group_size == "auto" else _int(group_size, "--group-size"),
        numa_nodes=numa_nodes if numa_nodes == "auto" else _int(numa_nodes, "--numa-nodes"),
        workers=workers,
        layers=parse_layer_range(layers) if layers else None,
        resume=resume,
        verify=verify,
        verify_threshold=threshold,
    )
    source = model_dir
    if method != "rtn":
        from lvllm_runtime.calibrate import calibrate, parse_memory

        if weight_format != "int4":
            from lvllm_runtime.errors import BadInput

            raise BadInput(f"--method {method} makes INT4 experts, not {weight_format}", "drop --format or use --method rtn")
        work = out_dir.parent / f"{out_dir.name}.calibrated"  # kept: the store's source_path points at it
        source = calibrate(model_dir, work, method, options.group_size, calibration, calibration_samples,
                           calibration_seq_len, parse_memory(max_memory) if max_memory else None,
                           progress=lambda p: stderr.print(f"[dim]calibrate: {p.stage} {p.detail}[/]", highlight=False),
                           numa_nodes=resolve_numa_nodes(options.numa_nodes))
    try:
        with _ProgressView() as view:
            result = run_quantize(source, out_dir, options, progress=view.update)
    except KeyboardInterrupt:
        # Finished layers stay listed in the unfinished manifest; --resume keeps them and writes the rest.
        resume_cmd = shlex.join(["lvllm", "quantize", *sys.argv[2:], *([] if resume else ["--resume"])])
        stderr.print(f"[bold red]error:[/] interrupted; the store in {escape(str(out_dir))} is unfinished "
                     f"[dim]->[/] finish it: {escape(resume_cmd)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    summary = result.to_dict()
    if json_out:
        emit_json(summary)
    else:
        _render(summary)
    if not result.passed:
        stderr.print(
            f"[bold red]error:[/] stored experts differ from the source by {result.max_rel_error:.4f} "
            f"(threshold {result.threshold}) [dim]->[/] check the source checkpoint, or use --format bf16",
            highlight=False,
        )
        raise typer.Exit(1)


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        from lvllm_runtime.errors import BadInput

        raise BadInput(f"{option} {text!r} is not a number", f"pass a number or auto to {option}") from None


class _ProgressView:
    """Layers, experts, bytes read/written, rate and ETA on stderr (hidden when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
        )
        self.task = None

    def __enter__(self) -> "_ProgressView":
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.bar.stop()

    def update(self, p: QuantizeProgress) -> None:
        if self.task is None:  # started on the first event, so an early error prints nothing but its line
            self.bar.start()
            self.task = self.bar.add_task("converting", total=p.bytes_read_total or 1, detail="")
        elapsed = self.bar.tasks[self.task].elapsed or 0.0
        rate = p.bytes_read / elapsed / GB if elapsed else 0.0
        if p.stage == "verify":
            self.bar.update(self.task, description="verifying", completed=p.experts_done, total=p.experts_total or 1,
                            detail=f"experts {p.experts_done}/{p.experts_total}")
            return
        detail = (
            f"layer {p.layers_done}/{p.layers_total}  experts {p.experts_done}/{p.experts_total}  "
            f"read {p.bytes_read / GB:.2f} GB  wrote {p.bytes_written / GB:.2f} GB  {rate:.2f} GB/s"
        )
        self.bar.update(self.task, completed=p.bytes_read, detail=detail)


def _render(s: dict) -> None:
    t = Table(title=f"Expert store {s['store']}", show_header=False, title_justify="left")
    t.add_row("model", f"{s['model_type']} ({s['source_format']} source)")
    group = f", group {s['group_size']}" if s["group_size"] else ""
    t.add_row("format", f"{s['weight_format']}{group}, {s['numa_nodes']} NUMA node(s)")
    t.add_row("layers", f"{len(s['layers_written'])} written, {len(s['layers_skipped'])} kept from before")
    secs = max(s["seconds"], 1e-9)
    t.add_row("read", f"{s['input_bytes'] / GB:.2f} GB ({s['input_bytes'] / secs / GB:.2f} GB/s)")
    t.add_row("wrote", f"{s['output_bytes'] / GB:.2f} GB ({s['output_bytes'] / secs / GB:.2f} GB/s)")
    t.add_row("time", f"{s['seconds']:.1f} s with {s['workers']} worker(s)")
    t.add_row("peak RSS", f"{s['peak_rss_bytes'] / 2**20:.0f} MiB (anonymous {s['peak_anon_rss_bytes'] / 2**20:.0f} MiB)")
    v = s["verify"]
    verdict = "[green]ok[/]" if v["passed"] else "[bold red]over threshold[/]"
    t.add_row("verify", f"{v['mode']}: max relative error {v['max_rel_error']:.4f} (threshold {v['threshold']}) {verdict}")
    stdout.print(t)
