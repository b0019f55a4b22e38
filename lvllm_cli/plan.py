"""`lvllm plan`: will this model run here, with what context, at what speed; writes the plan `serve` follows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lvllm_runtime.errors import BadInput

from .output import emit_json, stderr, stdout

GiB = 1 << 30
COLORS = {"non_expert_weights": "blue", "kv_cache": "magenta", "activations": "yellow", "logits": "yellow",
          "cuda_graphs": "grey50", "prefill_staging": "cyan", "hot_experts": "green", "expert_slice": "green",
          "pinned_store": "cyan", "process": "blue", "cpu_only_weights_kv": "magenta"}
BAR = 30


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"--gpus {text!r} is not a comma-separated list of GPU indices", "use e.g. --gpus 0,1") from None


def _auto_int(text: str, flag: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"{flag} {text!r} is neither auto nor a number", f"use {flag} auto or {flag} 32") from None


def plan(
    model: Annotated[Optional[Path], typer.Argument(help="Model folder (config.json is enough; weights optional).")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Plan from a recipe's numbers (no files needed); "
                                                  "with MODEL, its serving defaults.")] = None,
    store: Annotated[Optional[Path], typer.Option("--store", metavar="DIR", help="Expert store (exact sizes).")] = None,
    hardware: Annotated[Optional[Path], typer.Option("--hardware", metavar="FILE",
                                                     help="`lvllm doctor --json` output of the target machine "
                                                          "(default: probe this one).")] = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPU indices to use, e.g. 0,1.")] = None,
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel size.")] = 1,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", min=256)] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option("--max-num-seqs", min=1)] = None,
    max_batch_tokens: Annotated[Optional[int], typer.Option("--max-batch-tokens", min=16,
                                                            help="vLLM max_num_batched_tokens (default: chosen).")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option("--gpu-memory-utilization", min=0.05, max=1.0)] = 0.9,
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype", help="auto or fp8.")] = "auto",
    expert_format: Annotated[Optional[str], typer.Option("--expert-format", help="int4 or bf16.")] = None,
    group_size: Annotated[str, typer.Option("--group-size", help="INT4 group: auto, 128, 64 or 32.")] = "auto",
    numa_nodes: Annotated[Optional[int], typer.Option("--numa-nodes", min=1)] = None,
    hot_experts: Annotated[str, typer.Option("--hot-experts", help="Experts per layer kept on the GPU: auto, N or 0.")]
    = "auto",
    routing_profile: Annotated[Optional[Path], typer.Option(
        "--routing-profile", metavar="FILE", help="Routed picks per layer and expert, as `lvllm serve "
        "--record-routing FILE` writes them: the most picked experts go on the GPU.")] = None,
    prefetch_window: Annotated[Optional[int], typer.Option("--prefetch-window", min=1)] = None,
    gpu_prefill_min_tokens: Annotated[Optional[int], typer.Option("--gpu-prefill-min-tokens", min=0,
                                                                  help="0 turns GPU prefill off.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the plan here (only when it fits).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan JSON on stdout.")] = False,
) -> None:
    """Split the model between GPU and NUMA nodes, check it fits, forecast decode and prefill speed."""
    from lvllm_runtime import planner, recipes
    from lvllm_runtime.hardware import Hardware
    from lvllm_runtime.plan import save_plan

    if model is None and recipe is None:
        raise BadInput("nothing to plan", "pass a model folder or --recipe NAME (`lvllm recipes` lists them)")
    if kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"):
        raise BadInput(f"--kv-cache-dtype {kv_cache_dtype!r} is not supported", "use auto or fp8")
    rec = recipes.get(recipe).data if recipe else None
    src = planner.load_model(model) if model is not None else planner.model_from_recipe(rec)
    if model is not None and rec:
        src = planner.ModelSource(**{**src.__dict__, "recipe": rec})
    hw = Hardware.load(hardware) if hardware else _probe()
    opt = planner.PlanOptions(
        store=str(store) if store else None, gpus=_ints(gpus), tp=tp, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_dtype=kv_cache_dtype, expert_format=expert_format, group_size=_auto_int(group_size, "--group-size"),
        numa_nodes=numa_nodes, hot_experts=_auto_int(hot_experts, "--hot-experts"),
        routing_profile=str(routing_profile) if routing_profile else None,
        gpu_prefill_min_tokens=gpu_prefill_min_tokens, prefetch_window=prefetch_window)
    result = planner.make_plan(src, hw, planner.apply_recipe_defaults(opt, rec))
    if json_out:
        emit_json(result)
    else:
        render(result)
    if not result["fits"]:
        if out:
            stderr.print(f"[red]not writing {escape(str(out))}: the plan does not fit[/]")
        raise typer.Exit(1)
    if out:
        save_plan(result, out)
        stderr.print(f"wrote {escape(str(out))}")


def _probe():
    from lvllm_runtime.hardware import Hardware
    from lvllm_runtime.topology import probe

    return Hardware(probe(), source="probed (no bandwidth measured: `lvllm doctor --bench --json > hw.json`)")


def _bar(parts: dict[str, int], total: int) -> str:
    """A stacked bar of `parts` against `total`, one colour per part; red overflow when they exceed it."""
    cells, used = [], 0
    scale = BAR / max(total, sum(parts.values()), 1)
    for name, b in parts.items():
        n = round(b * scale)
        if b and n == 0:
            n = 1
        cells.append(f"[{COLORS.get(name, 'white')}]{'█' * n}[/]")
        used += n
    free = BAR - used
    if sum(parts.values()) > total:
        return "".join(cells) + "[bold red]◀ over[/]"
    return "".join(cells) + f"[grey30]{'░' * max(0, free)}[/]"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def render(p: dict[str, Any]) -> None:
    m, hw, mem, fc = p["model"], p["hardware"], p["memory"], p["forecast"]
    shape = m["shape"]
    stdout.print(f"[bold]{escape(m.get('recipe') or m['path'])}[/] ({shape['model_type']}, "
                 f"{shape['total_params'] / 1e9:.1f}B params, {shape['num_experts']} experts top-{shape['top_k']}, "
                 f"{shape['moe_layers']} MoE layers) on [bold]{escape(hw['cpu_model'])}[/] "
                 f"({hw['nodes']} node(s), {hw['cores']} cores) + {escape(', '.join(hw['gpus']) or 'no GPU')}")
    st = p["store"]
    stdout.print(f"experts: {st['weight_format']}"
                 + (f" g{st['group_size']}" if st["group_size"] else "")
                 + f", {st['numa_nodes']} NUMA slice(s), {_gib(st['bytes'])} in the store"
                 + ("" if st["exists"] else " (to be written by `lvllm quantize`)"))
    t = Table(title="where everything goes", show_header=True, header_style="bold", box=None)
    t.add_column("device", no_wrap=True)
    t.add_column("use", no_wrap=True)
    t.add_column("used / budget", justify="right", no_wrap=True)
    legend = []
    for g in mem["gpus"]:
        t.add_row(f"GPU {g['gpu']}", _bar(g["parts"], g["budget"]), f"{_gib(g['used'])} / {_gib(g['budget'])}")
        legend.append(f"GPU {g['gpu']}: " + ", ".join(
            f"[{COLORS.get(k, 'white')}]{k.replace('_', ' ')}[/] {_gib(v)}" for k, v in g["parts"].items() if v))
    for n in mem["nodes"]:
        parts = {k: n[k] for k in ("expert_slice", "pinned_store", "process", "cpu_only_weights_kv")
                 if n.get(k)}
        t.add_row(f"node {n['node']}", _bar(parts, n["capacity"]), f"{_gib(n['need'])} / {_gib(n['capacity'])}")
        legend.append(f"node {n['node']}: " + ", ".join(
            f"[{COLORS.get(k, 'white')}]{k.replace('_', ' ')}[/] {_gib(v)}" for k, v in parts.items()))
    stdout.print(t)
    for line in legend:
        stdout.print(f"  {line}")
    rt = p["runtime"]
    hot = rt["hot_experts"]
    n_hot = len(next(iter(hot.values()))) if hot else 0
    gp = rt["gpu_prefill_min_tokens"]
    stdout.print(f"runtime: threads {', '.join(str(n['threads']) for n in rt['nodes'])} per node; "
                 f"{n_hot} hot experts per layer on the GPU; "
                 + (f"GPU prefill from {gp} tokens, prefetch {rt['prefetch_window']} layer(s); " if gp else "no GPU prefill; ")
                 + f"max batch {rt['max_batch_tokens']} tokens; "
                 f"context {p['vllm']['max_model_len']} x {p['vllm']['max_num_seqs']} seqs")
    if n_hot:
        stdout.print(f"expected hot-expert hit rate {fc['hot_fraction']:.0%} of routed picks "
                     f"(from {escape(fc.get('hot_fraction_source', 'uniform routing'))})")
    if p["fits"]:
        stdout.print("[bold green]FITS[/]")
    else:
        stdout.print("[bold red]DOES NOT FIT[/]")
        for r in p["reasons"][:5]:
            stdout.print(f"  [red]•[/] {escape(r['why'])} [dim]->[/] [bold]{escape(r['fix'])}[/]")
    f = Table(title="forecast (a model, not a measurement)", header_style="bold")
    f.add_column("phase")
    f.add_column("tokens/s", justify="right")
    f.add_column("how")
    for d in fc["decode"]:
        how = (f"CPU experts {d['cpu_ms']:.2f} ms"
               + (f", GPU {d['gpu_dense_ms']:.2f} ms" if "gpu_dense_ms" in d else f", dense {d['dense_ms']:.2f} ms")
               + f", sync+step {d['sync_ms']:.2f} ms")
        f.add_row(f"decode, batch {d['batch']}", f"{d['tok_s']:.1f}", how)
    for q in fc["prefill"]:
        how = f"{q['path']} path, chunk {q['chunk']}"
        if q["path"] == "gpu":
            how += f", {q['bound']}-bound, link {q['link_gbps']:.0f} GB/s ({q['link_source']})"
        elif q["path"] == "cpu":
            how += f", experts at {q['cpu_rate']}"
        f.add_row(f"prefill {q['tokens']}", f"{q['tok_s']:.0f}", how)
    stdout.print(f)
    stdout.print(f"GPU prefill: {escape(fc['gpu_prefill'])}")
    bw = fc["bandwidth"]
    a = fc["assumptions"]
    stdout.print(f"[dim]assumes CPU read {bw['cpu_read_gbps']:.0f} GB/s ({bw['cpu_read_source']}) x "
                 f"{a['cpu_stream_efficiency']} engine efficiency; GPU bandwidth x {a['gpu_bw_efficiency']}, "
                 f"tensor peak x {a['gpu_flops_efficiency']}, experts x {a['gpu_expert_flops_efficiency']:.2f}; "
                 f"PCIe x {a['pcie_efficiency']:.2f}; "
                 f"{a['layer_sync_us']:.0f} us sync per MoE layer + {a['step_overhead_ms']} ms per step; "
                 f"hot-expert share of routed tokens "
                 f"{fc['hot_fraction']:.0%}.[/]")
