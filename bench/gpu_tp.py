"""Tensor parallelism over 2 GPUs, one NUMA slice per rank (issue 9): bench/gpu_hybrid.py's full-model harness as two
processes (torch.distributed: NCCL on CUDA, gloo on the CPU) vs one process holding both slices, same weights and inputs.

    python bench/gpu_tp.py --out $OUT [--layers 8] [--tp 1,2] [--device cuda|cpu --small]

Weights: attention, router, norms, embeddings and lm_head are REPLICATED on every rank (same seeds, so identical); the
routed experts are a random INT4 store split for numa_nodes=2 (bench/random_store.py, written once before the ranks
start), served by the runtime `lvllm serve` builds (hybrid_runtime.HybridRuntime) from a plan of two nodes:
  TP=2: rank r (GPU r) computes node r's slice only: its engine on half r of the box's cpus (half r's first cpus run
        the rank's Python and CUDA callback threads), the slice's hot experts on its GPU, the slice streamed for GPU
        prefill; each MoE block's partial output is all_reduced (f32) and added to the residual on both ranks.
  TP=1: one process on GPU 0, one engine with the two slices as two nodes (the two halves).
Measured (rank 0): one layer's MoE output TP=2 vs TP=1 (decode path T=1,4; GPU-prefill path T=1024), decode logits,
decode tok/s at batch 1 eager and as one CUDA graph (NCCL all_reduce captured), prefill tok/s with GPU prefill at
--prefill-tokens. Writes gpu_tp.json + gpu_tp.md under --out. --small shrinks every shape for a CPU/gloo check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_hybrid as gh  # noqa: E402
from lvllm_runtime.arch import Routing  # noqa: E402
import random_store  # noqa: E402
from lvllm_runtime.cuda_graph_step import blocking_sync  # noqa: E402
from lvllm_runtime.hybrid import join_node_slices  # noqa: E402
from lvllm_runtime.hybrid_runtime import HybridRuntime, Placement  # noqa: E402
from lvllm_runtime.plan import RuntimePlan  # noqa: E402
from lvllm_runtime.store import ExpertStore  # noqa: E402

NODES = 2
SMALL = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4, vocab_size=1024)


def use_shapes(small: bool) -> None:
    """Point gpu_hybrid's shape globals (read at call time by its helpers) at the small CPU-check shapes."""
    if not small:
        return
    gh.Q3 = {**gh.Q3, **SMALL}
    gh.H, gh.I, gh.E, gh.K, gh.G = 256, 256, 16, 4, 64
    gh.ROUTING = Routing(scoring="softmax", top_k=gh.K, renormalize=True)


def cpu_plan(world: int, rank: int, main: int = 2) -> tuple[list[int], list[list[int]]]:
    """(cpus for this process's Python and CUDA callback threads, every node's engine cpus): the box's cpus as halves
    ("virtual NUMA nodes"); a half's first `main` cpus run the rank's Python thread and the CUDA host-callback thread
    (one cpu for both starves the callback: bench/README.md), the rest its engine threads. TP=1 uses the same engine
    cpus (both halves), so both sizes have as many engine threads."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(len(cpus) // 2, 1)
    halves = [cpus[:half], cpus[half:] or cpus[:half]]
    eng = [h[main:] or h for h in halves]
    return (halves[rank] if world > 1 else halves[0])[:main], eng


def sync() -> None:
    if gh.DEV.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, n: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class TPRig(gh.ModelRig):
    """gpu_hybrid.ModelRig with this rank's MoE slice: its own engine / hot experts / streamed prefill, and the
    partial MoE outputs summed over ranks. Forward, decode setup and mode switching are ModelRig's."""

    def __init__(self, args, world: int, rank: int, nodes: list[list[int]]):
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        layers, dev = args.layers, gh.DEV
        torch.manual_seed(args.seed)  # replicated dense weights: the same draws on every rank
        cfg = Qwen3MoeConfig(**{**gh.Q3, "num_hidden_layers": layers})
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(cfg)
        for i, layer in enumerate(model.model.layers):
            layer.mlp = gh.HybridBlock(i, self)
        model = model.to_empty(device=dev).to(torch.bfloat16)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(dev)
        self.model, self.cfg, self.layers = model.eval(), cfg, layers
        params = set(__import__("inspect").signature(model.model.layers[0].forward).parameters)
        self.kv_kw = "past_key_values" if "past_key_values" in params else "past_key_value"
        self.world = world
        plan = random_store.bench_plan(args.store, [], args.hot, args.gpu_prefill_min, args.window, args.max_tokens)
        rt = plan["runtime"]
        rt["nodes"] = [{"node": n, "cpus": cpus, "threads": len(cpus)} for n, cpus in enumerate(nodes)]
        rt["tp_size"], rt["rank_nodes"] = world, [[n] for n in range(NODES)] if world > 1 else [list(range(NODES))]
        place = Placement(dev, gh.K, tp_rank=rank if world > 1 else 0, tp_size=world, decode_sizes=(1, 4))
        self.rt = HybridRuntime(RuntimePlan.from_dict(plan), ExpertStore.open(args.store), place)
        t0 = time.perf_counter()
        self.rt.load_all()
        self.load_s = time.perf_counter() - t0
        self.engine, self.steps = self.rt.engine, self.rt.decode_steps
        self.host = {L: join_node_slices([self.rt.store.layer(L, n) for n in self.rt.nodes], "int4", True,
                                         gh.G).tensors for L in range(layers)}  # ModelRig.build_allgpu reads these
        self.allgpu, self.mode, self.layers_used = None, "hybrid", layers

    def experts(self, L: int, x, w, ids) -> torch.Tensor:
        """This rank's slice of the routed experts, summed over ranks (f32 all_reduce): [T, H] x's dtype."""
        out = super().experts(L, x, w, ids)
        if self.world == 1:
            return out
        part = out.float()
        dist.all_reduce(part)
        return part.to(out.dtype)


def worker(rank: int, world: int, args) -> None:
    res: dict = {"world": world, "rank": rank}
    tensors: dict = {}
    out = Path(args.out)

    def save() -> None:
        torch.save(tensors, out / f"tp{world}_r{rank}.pt")
        if rank == 0:
            tmp = out / f"tp{world}.json.tmp"
            tmp.write_text(json.dumps(res, indent=1, default=str))
            tmp.replace(out / f"tp{world}.json")

    main_cpu, nodes = cpu_plan(world, rank, args.main_cpus)
    os.sched_setaffinity(0, main_cpu)  # before CUDA starts its threads
    if args.device == "cuda" and not args.spin:
        res["blocking_sync"] = blocking_sync()  # waiting threads sleep instead of spinning (bench/README.md)
    torch.set_num_threads(1)  # the engine owns the other cores (engine.py thread budget)
    use_shapes(args.small)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        gh.DEV = torch.device("cuda", rank)
    else:
        gh.DEV = torch.device("cpu")
    dev = gh.DEV
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.pg_timeout),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    res["main_cpus"], res["engine_nodes"] = main_cpu, nodes
    if dev.type == "cuda":
        res["device"] = torch.cuda.get_device_name(dev)
    t0 = time.perf_counter()
    rig = TPRig(args, world, rank, nodes)
    res["build_s"], res["store_and_engine_load_s"] = time.perf_counter() - t0, rig.load_s
    res["engine_isa"] = rig.engine.isa
    res["gpu_mem_gib"] = round(torch.cuda.memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
    gh.log(f"tp{world} r{rank}: built in {res['build_s']:.1f}s, engine nodes {nodes}")
    V = gh.Q3["vocab_size"]
    with torch.no_grad():
        # one layer's MoE output on fresh inputs: the decode path (engine + hot) and the GPU-prefill path
        gen = torch.Generator(device=dev).manual_seed(7)
        for t in (1, 4, args.check_prefill):
            x = torch.randn(t, gh.H, device=dev, generator=gen).bfloat16()
            w, ids = gh.fresh_routing(t, gen)
            tensors[f"layer0_T{t}"] = rig.experts(0, x, w, ids).float().cpu()
        x = torch.randn(1, gh.H, device=dev, generator=gen).bfloat16()
        w, ids = gh.fresh_routing(1, gen)
        tensors["layers_T1"] = torch.stack([rig.experts(L, x, w, ids).float().cpu() for L in range(args.layers)])
        sync()
        save()
        # decode, batch 1, eager then one CUDA graph for the whole step
        tok_seq = torch.randint(0, V, (args.decode_steps,), device=dev, generator=gen)
        kv, tok, step = gh.decode_setup(rig, 1, args)

        def run_steps(fn) -> list[torch.Tensor]:
            logits = []
            for s in range(args.decode_steps):
                kv.pos.fill_(args.context + s)
                tok.copy_(tok_seq[s].view(1, 1))
                logits.append(fn().clone())
            return logits

        run_steps(step)  # warm-up (first calls allocate, pick kernels)
        sync()
        t0 = time.perf_counter()
        eager = run_steps(step)
        sync()
        ms = (time.perf_counter() - t0) * 1e3 / args.decode_steps
        res["decode_eager_ms"], res["decode_eager_tok_s"] = ms, 1e3 / ms
        tensors["decode_eager"] = torch.stack(eager).cpu()
        rerun = run_steps(step)
        res["decode_eager_rerun_max_rel"] = max(gh.rel(a, b) for a, b in zip(rerun, eager))
        gh.log(f"tp{world} r{rank}: decode eager {ms:.2f} ms/step")
        save()
        # prefill with GPU prefill (whole layers streamed), logits of the last 8 positions
        for t in args.prefill_tokens:
            ids = torch.randint(0, V, (1, t), device=dev, generator=gen)
            pos = torch.arange(t, device=dev).view(1, t)
            last = {}

            def run_on():
                last["logits"] = rig.forward(ids, None, None, pos).float()
            ms = median_ms(run_on, args.prefill_reps)
            res[f"prefill_{t}_ms"], res[f"prefill_{t}_tok_s"] = ms, t * 1e3 / ms
            tensors[f"prefill_{t}"] = last["logits"].cpu()
            gh.log(f"tp{world} r{rank}: prefill {t} tokens {ms:.1f} ms")
            save()
        if dev.type == "cuda" and not args.no_graph:
            try:
                kv.pos.fill_(args.context)
                graph, gout = gh.capture(step, warmup=1)
                graphed = run_steps(lambda: (graph.replay(), gout)[1])
                sync()
                rig.steps[1].check()
                res["decode_graph_vs_eager_max_rel"] = max(gh.rel(a, b) for a, b in zip(graphed, eager))
                ms = median_ms(graph.replay, args.decode_steps)
                res["decode_graph_ms"], res["decode_graph_tok_s"] = ms, 1e3 / ms
                tensors["decode_graph"] = torch.stack(graphed).cpu()
                gh.log(f"tp{world} r{rank}: decode graph {ms:.2f} ms/step")
                del graph
            except Exception as e:  # recorded; the eager numbers stand
                traceback.print_exc()
                res["decode_graph_error"] = f"{type(e).__name__}: {e}"
        save()
        if not args.no_allgpu:  # the rank's slice dequantized to bf16 on its GPU: the yardstick for the hybrid path
            rig.rt.layers.clear()
            rig.build_allgpu(args.layers)
            rig.mode = "allgpu"
            allgpu = run_steps(step)
            res["decode_hybrid_vs_allgpu_max_rel"] = max(gh.rel(a, b) for a, b in zip(eager, allgpu))
            tensors["decode_allgpu"] = torch.stack(allgpu).cpu()
            save()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(out: Path, worlds: list[int]) -> dict:
    """TP=2 vs TP=1 on every tensor both runs saved (max relative error over rows for logits), rank 1 vs rank 0."""
    runs = {w: json.loads((out / f"tp{w}.json").read_text()) for w in worlds if (out / f"tp{w}.json").exists()}
    cmp: dict = {}
    if 1 in worlds and 2 in worlds and (out / "tp1_r0.pt").exists() and (out / "tp2_r0.pt").exists():
        a, b = torch.load(out / "tp2_r0.pt"), torch.load(out / "tp1_r0.pt")
        for k in sorted(set(a) & set(b)):
            rows = zip(a[k].reshape(-1, a[k].shape[-1]), b[k].reshape(-1, b[k].shape[-1]))
            cmp[f"rel_tp2_vs_tp1_{k}"] = max(gh.rel(x, y) for x, y in rows)
        if (out / "tp2_r1.pt").exists():
            c = torch.load(out / "tp2_r1.pt")
            cmp["rel_rank1_vs_rank0_max"] = max(gh.rel(c[k], a[k]) for k in set(a) & set(c))
    return {"runs": runs, "compare": cmp}


def table(r: dict, args) -> str:
    runs, cmp = r["runs"], r["compare"]
    env = r["env"]
    lines = [f"# gpu_tp {env['date_utc']} on {env.get('devices', '?')}", "",
             f"{args.layers} layers of {'SMALL test' if args.small else 'Qwen3-30B-A3B'} shapes, {args.hot} hot experts "
             f"per layer (of the rank's slice), context {args.context}; dense weights replicated; TP=2 all_reduces "
             "each MoE block's partial output (f32)", "",
             "| TP | engine nodes (cpus) | decode eager tok/s | decode graph tok/s | "
             + " | ".join(f"prefill {t} tok/s" for t in args.prefill_tokens) + " | build s |",
             "|" + "---|" * (5 + len(args.prefill_tokens))]
    for w, v in sorted(runs.items(), key=lambda kv: int(kv[0])):
        f = lambda k, p=".1f": format(v[k], p) if k in v else "-"  # noqa: E731
        plan = [cpu_plan(int(w), k, args.main_cpus)[1] for k in range(int(w))] if int(w) > 1 else [
            cpu_plan(1, 0, args.main_cpus)[1]]
        nodes = " / ".join(" + ".join(f"{n[0]}-{n[-1]}" for n in p) for p in plan)
        pf = " | ".join(f(f"prefill_{t}_tok_s", ".0f") for t in args.prefill_tokens)
        lines.append(f"| {w} | {nodes}{' (rank 0 / rank 1)' if int(w) > 1 else ''} | {f('decode_eager_tok_s')} | "
                     f"{f('decode_graph_tok_s')} | {pf} | {f('build_s')} |")
    if cmp:
        lines += ["", "| TP=2 vs TP=1 (max rel. error over rows) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in cmp.items()]
    for k in ("decode_eager_rerun_max_rel", "decode_graph_vs_eager_max_rel", "decode_hybrid_vs_allgpu_max_rel"):
        lines += ["", f"{k} (within each TP size): " + ", ".join(f"TP={w}: {v.get(k, '-')}" for w, v in runs.items())]
    errs = [f"- TP={w}: {v['decode_graph_error']}" for w, v in runs.items() if "decode_graph_error" in v]
    errs += [f"- {e}" for e in r.get("errors", [])]
    if errs:
        lines += ["", "errors:"] + errs
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU/gloo check of the whole flow)")
    ap.add_argument("--tp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hot", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 8192])
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--check-prefill", type=int, default=1024, help="tokens of the GPU-prefill-path layer check")
    ap.add_argument("--gpu-prefill-min", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--main-cpus", type=int, default=2, help="cpus of each half kept for Python + the CUDA callback")
    ap.add_argument("--spin", action="store_true", help="no cudaDeviceScheduleBlockingSync (waiting threads spin)")
    ap.add_argument("--no-allgpu", action="store_true", help="skip the all-GPU (bf16 experts of the slice) decode")
    ap.add_argument("--pg-timeout", type=int, default=120)
    ap.add_argument("--work", default="/tmp/lvllm-bench", help="where the random store is written (and kept)")
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < max(args.tp):
        print(f"bench/gpu_tp.py: TP={max(args.tp)} needs {max(args.tp)} GPUs, this host has "
              f"{torch.cuda.device_count()}; run on nvidia-h100-x2, or --device cpu --small to check the flow",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r: dict = {"env": {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
                       "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                       if args.device == "cuda" else "cpu"},
               "args": vars(args), "errors": []}
    use_shapes(args.small)
    args.store = str(Path(args.work) / f"store-tp-L{args.layers}{'-small' if args.small else ''}")
    random_store.write(args.store, args.layers, gh.E, gh.H, gh.I, gh.G, nodes=NODES, device=args.device)
    for world in args.tp:
        args.port = free_port()
        gh.log(f"TP={world}")
        try:
            mp.spawn(worker, args=(world, args), nprocs=world, join=True)
        except Exception as e:  # recorded; the other TP size still runs
            r["errors"].append(f"TP={world}: {type(e).__name__}: {str(e)[-800:]}")
            gh.log(r["errors"][-1])
    r.update(compare(out, args.tp))
    (out / "gpu_tp.json").write_text(json.dumps(r, indent=1, default=str))
    md = table(r, args)
    (out / "gpu_tp.md").write_text(md)
    print(md)
    return 0 if not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
