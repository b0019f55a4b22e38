"""The GPU half on the H100 box (issue 8), in one call: checks, then times, then writes JSON + a markdown table.

    python bench/gpu_hybrid.py --out $OUT [--layers 48] [--stages env,bw,layer,prefill,model]
    python bench/gpu_hybrid.py --out $OUT --shape qwen3-235b-a22b --layers 8 --hot plan   # experts beyond the GPU

Stages (each one's result or error lands in gpu_hybrid.json as soon as it ends, so a cut-off run keeps its part):
  env      device, versions, cpus
  bw       ceilings: CPU read bandwidth with the engine's cores, pinned H2D bandwidth, bf16 GEMM rate
Every stage builds the runtime `lvllm serve` builds (hybrid_runtime.HybridRuntime over a random INT4 g128 store written
to --work in the store's own format, bench/random_store.py), so what is timed is the served code path.
  layer    one MoE layer of --shape (Qwen3-30B-A3B: E 128, top-8, H 2048, I 768; --hot
           hot experts, or as many as `lvllm plan` keeps per layer for the whole model on this GPU):
           CUDA-graph replay == eager == all-GPU f32 reference over fresh routings at T = 1 and 4; per-layer split
           (D2H copy / host node / engine CPU time / H2D / hot-expert GPU / wait) and graph replay time
  prefill  --prefill-layers layers streamed from the registered store mapping: GPU prefill == CPU engine; per-layer
           time of both at --prefill-tokens, vs bounds; the smallest T where GPU prefill wins (the plan's threshold)
  model    transformers Qwen3-MoE classes (config numbers of Qwen3-30B-A3B, --layers of them) with random weights,
           MoE blocks replaced by the runtime's layers (experts in the random store): decode tok/s at
           batch 1 and 4 eager vs CUDA graph vs all-GPU (bf16 experts on the GPU), logits compared; prefill tok/s
           with GPU prefill on / off
CPU fallbacks of the same code paths are tested in tests/test_gpu_paths.py; this script needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import random_store  # noqa: E402
from lvllm_runtime.arch import Routing  # noqa: E402
from lvllm_runtime.cuda_graph_step import CpuStep, blocking_sync, capture, profile  # noqa: E402
from lvllm_runtime.engine import Engine, keep_other_threads_off  # noqa: E402
from lvllm_runtime.gpu_prefill import dequant_int4_bf16, grouped_experts  # noqa: E402
from lvllm_runtime.hybrid import route  # noqa: E402
from lvllm_runtime.hybrid_runtime import HybridRuntime, Placement  # noqa: E402
from lvllm_runtime.plan import RuntimePlan  # noqa: E402
from lvllm_runtime.quant import dequantize_int4  # noqa: E402
from lvllm_runtime.store import ExpertStore  # noqa: E402

# config.json numbers of the real models (--shape); the bench builds --layers of them
SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, vocab_size=151936, norm_topk_prob=True, rms_norm_eps=1e-6,
                          rope_theta=1e6, max_position_embeddings=40960),
    # experts: 94 x 128 x 9.7 MB = 117 GB in INT4 g128, beyond an H100 (the plan keeps part of each layer hot)
    "qwen3-235b-a22b": dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, vocab_size=151936, norm_topk_prob=True,
                            rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960),
}
Q3 = SHAPES["qwen3-30b-a3b"]
H, I, E, K, G = 2048, 768, 128, 8, 128
ROUTING = Routing(scoring="softmax", top_k=K, renormalize=True)


def set_shape(name: str) -> None:
    """Point the module's shape constants (read by every stage) at SHAPES[name]."""
    global Q3, H, I, E, K, ROUTING
    Q3 = SHAPES[name]
    H, I, E, K = Q3["hidden_size"], Q3["moe_intermediate_size"], Q3["num_experts"], Q3["num_experts_per_tok"]
    ROUTING = Routing(scoring="softmax", top_k=K, renormalize=True)


def plan_hot(args) -> dict:
    """Hot experts per layer as `lvllm plan` chooses them for the WHOLE model (Q3's layer count, config.json only, INT4
    g128, this box's topology and GPU), so a --layers slice runs with the full model's GPU budget per layer."""
    import tempfile

    from lvllm_runtime.planner import PlanOptions, make_plan
    from lvllm_runtime.topology import probe

    with tempfile.TemporaryDirectory() as d:
        cfg = {**Q3, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "torch_dtype": "bfloat16",
               "hidden_act": "silu", "decoder_sparse_step": 1, "mlp_only_layers": []}
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        plan = make_plan(d, probe(), PlanOptions(max_model_len=args.context + 1024, max_num_seqs=4,
                                                 gpu_memory_utilization=0.9, expert_format="int4", group_size=128))
    hot = plan["runtime"]["hot_experts"]
    per_layer = sorted({len(v) for v in hot.values()}) if hot else [0]
    return {"fits": plan.get("fits"), "reasons": plan.get("reasons"), "hot_per_layer": per_layer,
            "first_layer_ids": hot.get("0", [])[:8], "gpu": plan.get("gpu_memory") or plan.get("memory"),
            "hot": {int(k): v for k, v in hot.items()}}
DEV = torch.device("cuda")
RESULTS: dict = {}
ALL_CPUS = sorted(os.sched_getaffinity(0))  # before --main-cpus narrows this thread's set


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def median_ms(fn, n: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def save(out: Path) -> None:
    tmp = out / "gpu_hybrid.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=1, default=str))
    tmp.replace(out / "gpu_hybrid.json")


def expert_bytes(group: int = G) -> int:
    """INT4 bytes of one expert (gate+up+down nibbles and bf16 scales)."""
    n = 3 * I * H
    return n // 2 + n // group * 2


def cpu_range(arg: str) -> list[int]:
    a, _, b = arg.partition("-")
    return [c for c in ALL_CPUS if int(a) <= c <= int(b or a)]


def engine_cpus(arg: str | None) -> list[int]:
    if arg:
        return cpu_range(arg)
    return ALL_CPUS[2:] if len(ALL_CPUS) > 4 else ALL_CPUS  # cpus 0-1: Python's main thread, the CUDA callback thread


# ----------------------------------------------------------------------------------------------------------- stages

def stage_env(args) -> dict:
    import transformers

    p = torch.cuda.get_device_properties(0)
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": p.name, "sm_count": p.multi_processor_count, "vram_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": len(ALL_CPUS),
            "main_cpus": sorted(os.sched_getaffinity(0)), "blocking_sync": args.blocking_sync,
            "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "engine_cpus": engine_cpus(args.engine_cpus), "isas": Engine.available_isas(),
            "has_grouped_mm": hasattr(torch, "_grouped_mm")}


def stage_bw(args) -> dict:
    from lvllm_runtime.membench import read_bandwidth

    cpus = engine_cpus(args.engine_cpus)
    bw = read_bandwidth(cpus, total_bytes=2 << 30, min_seconds=1.0)
    eng_bw = Engine(H, I, E, "silu_glu", True, "int4", G, [cpus], 1).read_bandwidth(2 << 30, 5)
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    dev = torch.empty_like(host, device=DEV)
    h2d_ms = median_ms(lambda: dev.copy_(host, non_blocking=True), 10)
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b, 10)
    # the engine's own pinned threads reading node-local buffers: the decode roofline (membench beside it)
    return {"cpu_read_gb_s": eng_bw, "membench_read_gb_s": bw.gb_s, "cpu_read_threads": len(cpus),
            "h2d_pinned_gb_s": (1 << 30) / h2d_ms / 1e6,
            "gemm_bf16_tflops": 2 * 8192**3 / mm_ms / 1e9}


def runtime(args, layers: int, hot: int, gpu_prefill_min: int | None, max_tokens: int,
            decode_sizes: tuple[int, ...] = (1, 4, 16)) -> HybridRuntime:
    """The hybrid runtime `lvllm serve` builds (hybrid_runtime.HybridRuntime), over a random INT4 store of `layers`
    layers at --shape written to --work, with a one-node plan on the engine cpus; every layer loaded."""
    store = Path(args.work) / f"store-{args.shape}-L{layers}"
    t0 = time.perf_counter()
    random_store.write(store, layers, E, H, I, G, device=DEV)
    wrote = time.perf_counter() - t0
    plan = random_store.bench_plan(store, engine_cpus(args.engine_cpus), hot, gpu_prefill_min, args.window, max_tokens)
    rt = HybridRuntime(RuntimePlan.from_dict(plan), ExpertStore.open(store), Placement(DEV, K, decode_sizes=decode_sizes))
    t1 = time.perf_counter()
    rt.load_all()
    log(f"runtime: {layers} layers, store written/kept in {wrote:.1f}s, loaded in {time.perf_counter() - t1:.1f}s")
    return rt


class LayerRig:
    """Random Qwen3-30B-A3B layers in the hybrid runtime, and the f32 all-GPU reference on the same store bytes."""

    def __init__(self, args, layers: int = 1, max_tokens: int = 8192, hot: int = 16, gpu_prefill_min=None):
        self.rt = runtime(args, layers, hot, gpu_prefill_min, max_tokens)
        self.engine = self.rt.engine
        self.host = {L: self.rt.store.layer(L, 0) for L in range(layers)}

    def reference(self, L: int, hidden, w, ids) -> torch.Tensor:
        """All-GPU f32 reference on the same dequantized weights (quant.dequantize_int4, grouped_experts in f32)."""
        t = {k: v.to(DEV) for k, v in self.host[L].items()}
        w13 = dequantize_int4(t["w13.packed"], t["w13.scale"], G)
        w2 = dequantize_int4(t["w2.packed"], t["w2.scale"], G)
        return grouped_experts(hidden.float(), w, ids, w13, w2, "silu_glu", True)


def fresh_routing(t: int, gen: torch.Generator):
    logits = torch.randn(t, E, device=DEV, generator=gen)
    return route(logits, ROUTING)


def stage_layer(args) -> dict:
    rig = LayerRig(args, layers=1, hot=args.hot)
    res = {"hot_experts": args.hot, "engine_isa": rig.engine.isa, "tokens": {}}
    gen = torch.Generator(device=DEV).manual_seed(0)
    steps, dec = rig.rt.decode_steps, rig.rt.layers[0].decode  # what the served layer runs at these batch sizes
    for t in (1, 4):
        x = torch.zeros(t, H, dtype=torch.bfloat16, device=DEV)
        w = torch.zeros(t, K, device=DEV)
        ids = torch.zeros(t, K, dtype=torch.int32, device=DEV)
        graph, gout = capture(lambda: dec(x, w, ids))
        errs_ge, errs_gr, errs_er, cold = [], [], [], []
        for s in range(args.check_steps):
            x.copy_(torch.randn(t, H, device=DEV, generator=gen).bfloat16())
            nw, nids = fresh_routing(t, gen)
            w.copy_(nw)
            ids.copy_(nids)
            graph.replay()
            torch.cuda.synchronize()
            steps[t].check()
            g = gout.clone()
            e = dec(x, w, ids)
            torch.cuda.synchronize()
            steps[t].check()
            r = rig.reference(0, x, w, ids)
            errs_ge.append(rel(g, e)), errs_gr.append(rel(g, r)), errs_er.append(rel(e, r))
            c = ids[ids >= args.hot]  # cold picks (hot = the first ids)
            cold.append(int(torch.unique(c).numel()))
        # timings: eager split (events), eager step, graph replay
        split = [profile(steps[t], 0, lambda: dec(x, w, ids)) for _ in range(args.time_steps)]
        split_med = {k: statistics.median(s[k] for s in split) for k in split[0]}
        eager_ms = median_ms(lambda: dec(x, w, ids), args.time_steps)
        graph_ms = median_ms(graph.replay, args.time_steps)
        steps[t].check()
        cpu_only = median_ms(lambda: rig.engine.forward(0, steps[t].h_pin, steps[t].ids_pin, steps[t].w_pin,
                                                        steps[t].out_pin), args.time_steps)
        avg_cold = statistics.mean(cold)
        res["tokens"][t] = {
            "max_rel_graph_vs_eager": max(errs_ge), "max_rel_graph_vs_ref": max(errs_gr),
            "max_rel_eager_vs_ref": max(errs_er), "steps_checked": args.check_steps,
            "split_ms": split_med, "eager_ms": eager_ms, "graph_ms": graph_ms, "engine_direct_ms": cpu_only,
            "avg_distinct_cold_experts": avg_cold,
            "cpu_roofline_ms": avg_cold * expert_bytes() / (RESULTS["bw"]["cpu_read_gb_s"] * 1e6)
            if "bw" in RESULTS and "cpu_read_gb_s" in RESULTS["bw"] else None}
        log(f"layer T={t}", json.dumps(res["tokens"][t]))
        del graph
    ok = all(v["max_rel_graph_vs_eager"] < 1e-3 and v["max_rel_graph_vs_ref"] < 2e-2 for v in res["tokens"].values())
    res["pass"] = ok
    return res


def stage_prefill(args) -> dict:
    nl = args.prefill_layers
    rig = LayerRig(args, layers=nl, hot=0, gpu_prefill_min=1, max_tokens=max(args.prefill_tokens))
    res = {"layers_streamed": nl, "window": args.window, "tokens": {},
           "store_pinned_read_only": rig.rt.prefill.pins.read_only, "store_pinned_gib": rig.rt.prefill.pins.nbytes / 2**30}
    sp = rig.rt.prefill
    gen = torch.Generator(device=DEV).manual_seed(1)
    bw = RESULTS.get("bw", {})
    for t in args.prefill_tokens:
        x = (torch.randn(t, H, device=DEV, generator=gen) * 1.0).bfloat16()
        w, ids = fresh_routing(t, gen)
        entry = {}
        if t <= args.cpu_layer_max:
            gpu = sp.forward(0, x, w, ids)
            out = torch.empty(t, H, dtype=torch.bfloat16, pin_memory=True)
            hx, hi, hw = x.cpu(), ids.cpu(), w.cpu()
            t0 = time.perf_counter()
            rig.engine.forward(0, hx, hi, hw, out)
            entry["cpu_layer_ms"] = (time.perf_counter() - t0) * 1e3
            entry["rel_gpu_prefill_vs_cpu"] = rel(gpu.cpu(), out)
        # streamed: all layers in order, copies overlapping compute; per-layer time in steady state
        def run_all():
            for L in range(nl):
                sp.forward(L, x, w, ids)
        ms = median_ms(run_all, 3, warm=1)
        dq13 = sp.w13.numel() + sp.w2.numel()
        entry["gpu_layer_ms"] = ms / nl
        flops = 2 * t * K * 3 * H * I
        if bw:
            entry["bound_h2d_ms"] = sp.layer_bytes / (bw["h2d_pinned_gb_s"] * 1e6)
            entry["bound_gemm_ms"] = flops / (bw["gemm_bf16_tflops"] * 1e9)
            entry["bound_ms"] = max(entry["bound_h2d_ms"], entry["bound_gemm_ms"])
            entry["pct_of_bound"] = 100 * entry["bound_ms"] / entry["gpu_layer_ms"]
        # compute alone (weights already staged): what the copies must hide behind
        w13, w2 = sp.w13, sp.w2
        entry["gpu_compute_only_ms"] = median_ms(lambda: grouped_experts(x, w, ids, w13, w2, "silu_glu", True), 3)
        entry["dequant_bytes_written"] = dq13 * 2
        if "cpu_layer_ms" in entry:
            entry["gpu_faster"] = entry["gpu_layer_ms"] < entry["cpu_layer_ms"]
        res["tokens"][t] = entry
        log(f"prefill T={t}", json.dumps(entry))
    res["layer_store_bytes"] = sp.layer_bytes
    faster = [t for t in args.prefill_tokens if res["tokens"][t].get("gpu_faster")]
    res["crossover_tokens"] = min(faster) if faster else None  # smallest measured T where GPU prefill wins
    rig.rt.close()
    return res


# ------------------------------------------------------------------------------------------------ full-model harness

class StaticKV:
    """A graph-friendly KV cache: fixed [B, kv_heads, max_len, d] buffers per layer, written at a device position."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype):
        g = torch.Generator(device=DEV).manual_seed(123)  # same context for every run being compared
        self.k = [torch.randn(batch, kv_heads, max_len, head_dim, device=DEV, dtype=dtype, generator=g)
                  for _ in range(layers)]
        self.v = [torch.randn(batch, kv_heads, max_len, head_dim, device=DEV, dtype=dtype, generator=g)
                  for _ in range(layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=DEV)

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.k[layer_idx].index_copy_(2, self.pos, key)
        self.v[layer_idx].index_copy_(2, self.pos, value)
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # noqa: ARG002 - transformers asks; unused by our loop
        return 0


class HybridBlock(torch.nn.Module):
    """Replaces Qwen3MoeSparseMoeBlock: router on the GPU, routed experts through the mode the model is in."""

    def __init__(self, layer: int, model_rig: "ModelRig"):
        super().__init__()
        self.layer, self.rig = layer, model_rig
        self.gate = torch.nn.Parameter(torch.empty(E, H))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, H)
        w, ids = route(F.linear(x, self.gate), ROUTING)
        return self.rig.experts(self.layer, x, w, ids).reshape(shape)


class ModelRig:
    def __init__(self, args, layers: int):
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(**{**Q3, "num_hidden_layers": layers})
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(cfg)
        for i, layer in enumerate(model.model.layers):
            layer.mlp = HybridBlock(i, self)
        model = model.to_empty(device=DEV).to(torch.bfloat16)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        rot = type(model.model.rotary_emb)(config=cfg).to(DEV)  # its buffers were left empty on meta
        model.model.rotary_emb = rot
        self.model, self.cfg, self.layers = model.eval(), cfg, layers
        params = set(__import__("inspect").signature(model.model.layers[0].forward).parameters)
        self.kv_kw = "past_key_values" if "past_key_values" in params else "past_key_value"
        self.rt = runtime(args, layers, args.hot, args.gpu_prefill_min, args.max_tokens)
        self.engine, self.steps = self.rt.engine, self.rt.decode_steps
        self.host = {L: self.rt.store.layer(L, 0) for L in range(layers)}
        self.allgpu = None
        self.mode = "hybrid"          # hybrid | allgpu | none
        self.layers_used = layers

    def gpu_prefill(self, on: bool) -> None:
        """GPU prefill on (the plan's threshold) or off (every prompt through the engine) in every layer."""
        for moe in self.rt.layers.values():
            moe.gpu_prefill_min_tokens = self.rt.plan.gpu_prefill_min_tokens if on else None

    def experts(self, L: int, x, w, ids) -> torch.Tensor:
        if self.mode == "none":  # the model without its routed experts: what the GPU alone costs
            return torch.zeros_like(x)
        if self.mode == "allgpu":
            w13, w2 = self.allgpu[L]
            return grouped_experts(x, w, ids, w13, w2, "silu_glu", True).to(x.dtype)
        return self.rt.layers[L].forward(x, w, ids)  # the served layer: its own choice of path

    def build_allgpu(self, layers: int) -> None:
        self.allgpu = {}
        for L in range(layers):
            t = self.host[L]
            self.allgpu[L] = (dequant_int4_bf16(t["w13.packed"].to(DEV), t["w13.scale"].to(DEV), G),
                              dequant_int4_bf16(t["w2.packed"].to(DEV), t["w2.scale"].to(DEV), G))

    def forward(self, ids: torch.Tensor, kv: StaticKV | None, mask: torch.Tensor | None, pos_ids, last: int = 8
                ) -> torch.Tensor:
        """ids [B, S] -> logits [B, min(S, last), V] of the last positions, over the first `layers_used` layers."""
        m = self.model.model
        h = m.embed_tokens(ids)
        pe = m.rotary_emb(h, pos_ids)
        for layer in m.layers[: self.layers_used]:
            o = layer(h, attention_mask=mask, position_ids=pos_ids, position_embeddings=pe, **{self.kv_kw: kv})
            h = o[0] if isinstance(o, tuple) else o
        return self.model.lm_head(m.norm(h[:, -last:]))


def replay_timeline(graph, step: CpuStep, layers: int, n: int) -> tuple[float, float]:
    """Where a replayed decode step goes, from the host-clock times of every layer's host node: medians over n
    replays of (sum of engine calls, sum of the gaps between one layer's engine end and the next one's start:
    GPU work between the MoE blocks, copies and callback latency), in ms."""
    eng, gaps = [], []
    for _ in range(n):
        graph.replay()
        torch.cuda.synchronize()
        tl = [step.calls[L].last_times() for L in range(layers)]
        eng.append(sum(t1 - t0 for t0, t1, _ in tl) / 1e6)
        gaps.append(sum(tl[L + 1][0] - tl[L][1] for L in range(layers - 1)) / 1e6)
    step.check()
    return statistics.median(eng), statistics.median(gaps)


def decode_setup(rig: ModelRig, b: int, args):
    """A static KV cache with `context` random positions, a token buffer, and the decode step reading them."""
    c = rig.cfg
    kv = StaticKV(args.layers, b, c.num_key_value_heads, c.head_dim, args.context + args.decode_steps + 8,
                  torch.bfloat16)
    tok = torch.zeros(b, 1, dtype=torch.long, device=DEV)
    pos_ids = torch.zeros(b, 1, dtype=torch.long, device=DEV)
    ar = torch.arange(kv.k[0].shape[2], device=DEV)

    @torch.no_grad()
    def step():
        mask = torch.where(ar <= kv.pos, 0.0, float("-inf")).to(torch.bfloat16).view(1, 1, 1, -1).expand(b, 1, 1, -1)
        pos_ids.copy_(kv.pos.view(1, 1).expand(b, 1))
        return rig.forward(tok, kv, mask, pos_ids)[:, -1].float()

    return kv, tok, step


def stage_model(args) -> dict:
    rig = ModelRig(args, args.layers)
    res = {"layers": args.layers, "hot_experts": args.hot, "context": args.context, "decode": {}, "prefill": {}}
    gen = torch.Generator(device=DEV).manual_seed(5)
    V = Q3["vocab_size"]
    free, total = torch.cuda.mem_get_info()
    res["gpu_mem_after_build_gib"] = round((total - free) / 2**30, 1)

    tokens_seq = torch.randint(0, V, (args.decode_steps, 4), device=DEV, generator=gen)
    # the engine alone, layer after layer with no GPU in between (weights cold in cache as in the model)
    for b in (1, 4):
        hx = torch.randn(b, H, generator=torch.Generator().manual_seed(b)).bfloat16()
        out = torch.empty_like(hx)
        routs = [fresh_routing(b, gen) for _ in range(args.layers)]
        routs = [(w.cpu(), i.cpu()) for w, i in routs]
        per = []
        for _ in range(3):
            t0 = time.perf_counter()
            for L, (w, i) in enumerate(routs):
                rig.engine.forward(L, hx, i, w, out)
            per.append((time.perf_counter() - t0) * 1e3 / args.layers)
        res.setdefault("engine_back_to_back_ms_per_layer", {})[b] = min(per)
    # the model with its routed experts removed: GPU-only time of a decode step / of a prefill
    rig.mode = "none"
    for b in (1, 4):
        kv, tok, step = decode_setup(rig, b, args)
        kv.pos.fill_(args.context)
        graph, _ = capture(step, warmup=1)
        res.setdefault("nonmoe_graph_ms_per_step", {})[b] = median_ms(graph.replay, args.decode_steps)
        del graph
    for t in args.prefill_tokens:
        ids = torch.randint(0, V, (1, t), device=DEV, generator=gen)
        pos = torch.arange(t, device=DEV).view(1, t)
        with torch.no_grad():
            res.setdefault("nonmoe_prefill_ms", {})[t] = median_ms(lambda: rig.forward(ids, None, None, pos), 2, warm=1)
    rig.mode = "hybrid"
    log("model diagnostics", {k: res[k] for k in ("engine_back_to_back_ms_per_layer", "nonmoe_graph_ms_per_step",
                                                    "nonmoe_prefill_ms")})
    for b in (1, 4):
        with torch.no_grad():
            kv, tok, step = decode_setup(rig, b, args)
            rig.mode = "hybrid"
            eager_logits = []
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for s in range(args.decode_steps):
                kv.pos.fill_(args.context + s)
                tok.copy_(tokens_seq[s, :b].view(b, 1))
                eager_logits.append(step())
            torch.cuda.synchronize()
            eager_ms = (time.perf_counter() - t0) * 1e3 / args.decode_steps
            # the same steps eagerly again: how far run-to-run noise (cuBLAS/SDPA choices, atomics) alone moves
            # the logits of a random 48-layer model, the yardstick for graph-vs-eager below
            rerun = []
            for s in range(min(args.decode_steps, 8)):
                kv.pos.fill_(args.context + s)
                tok.copy_(tokens_seq[s, :b].view(b, 1))
                rerun.append(rel(step(), eager_logits[s]))
            kv.pos.fill_(args.context)
            graph, gout = capture(step, warmup=1)
            graph_logits = []
            for s in range(args.decode_steps):
                kv.pos.fill_(args.context + s)
                tok.copy_(tokens_seq[s, :b].view(b, 1))
                graph.replay()
                graph_logits.append(gout.clone())
            torch.cuda.synchronize()
            rig.steps[b].check()
            errs = [rel(g, e) for g, e in zip(graph_logits, eager_logits)]
            graph_ms = median_ms(graph.replay, args.decode_steps)
            rig.steps[b].check()
            engine_ms, gaps_ms = replay_timeline(graph, rig.steps[b], args.layers, args.decode_steps)
            d = {"eager_ms_per_step": eager_ms, "graph_ms_per_step": graph_ms,
                 "eager_tok_s": b * 1e3 / eager_ms, "graph_tok_s": b * 1e3 / graph_ms,
                 "max_rel_logits_graph_vs_eager": max(errs), "max_rel_logits_eager_rerun": max(rerun),
                 "steps": args.decode_steps,
                 "graph_engine_ms_per_step": engine_ms, "graph_between_layers_ms_per_step": gaps_ms}
            res["decode"][b] = d
            del graph, gout
            # one traced eager step: split per layer is in stage `layer`; here the CPU roofline for the whole model
            if "layer" in RESULTS and isinstance(RESULTS["layer"], dict) and "tokens" in RESULTS["layer"]:
                lt = RESULTS["layer"]["tokens"].get(b)
                if lt and lt.get("cpu_roofline_ms"):
                    d["cpu_roofline_ms_per_step"] = lt["cpu_roofline_ms"] * args.layers
                    d["cpu_roofline_tok_s"] = b * 1e3 / d["cpu_roofline_ms_per_step"]
                    d["pct_of_roofline_graph"] = 100 * d["cpu_roofline_ms_per_step"] / graph_ms
            d["hybrid_logits"] = eager_logits
            log(f"model decode B={b}", {k: v for k, v in d.items() if k != "hybrid_logits"})
        torch.cuda.empty_cache()
    save(Path(args.out))

    # prefill: GPU prefill on and off
    for t in args.prefill_tokens:
        ids = torch.randint(0, V, (1, t), device=DEV, generator=gen)
        pos = torch.arange(t, device=DEV).view(1, t)
        e = {}
        with torch.no_grad():
            rig.gpu_prefill(True)
            on = None

            def run_on():
                nonlocal on
                on = rig.forward(ids, None, None, pos).float()
            ms = median_ms(run_on, 2, warm=1)
            e["gpu_prefill_ms"], e["gpu_prefill_tok_s"] = ms, t * 1e3 / ms
            if t <= args.cpu_prefill_max:
                rig.gpu_prefill(False)
                t0 = time.perf_counter()
                off = rig.forward(ids, None, None, pos).float()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1e3
                e["cpu_prefill_ms"], e["cpu_prefill_tok_s"] = ms, t * 1e3 / ms
                e["rel_logits_gpu_vs_cpu_prefill"] = rel(on, off)
                rig.gpu_prefill(True)
        res["prefill"][t] = e
        log(f"model prefill T={t}", e)
        torch.cuda.empty_cache()
        save(Path(args.out))

    # all-GPU: bf16 experts on the device for as many layers as fit; hybrid logits compared on the same layers
    rig.rt.close()  # staging and registered pages go; the runtime's layers are not used below
    rig.rt.prefill = None
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    per_layer = 3 * E * I * H * 2
    fit = 0 if args.skip_allgpu else max(0, min(args.layers, int((free - (6 << 30)) // per_layer)))
    res["allgpu_layers"] = fit
    if fit:
        rig.build_allgpu(fit)
        rig.mode = "allgpu"
        rig.layers_used = fit
        for b in (1, 4):
            with torch.no_grad():
                kv, tok, step = decode_setup(rig, b, args)
                errs = []
                for s in range(min(args.decode_steps, 8)):
                    kv.pos.fill_(args.context + s)
                    tok.copy_(tokens_seq[s, :b].view(b, 1))
                    if fit == args.layers:
                        errs.append(rel(step(), res["decode"][b]["hybrid_logits"][s]))
                kv.pos.fill_(args.context)
                graph, gout = capture(step, warmup=1)
                ms = median_ms(graph.replay, args.decode_steps) * args.layers / fit
                d = res["decode"][b]
                d["allgpu_graph_ms_per_step"] = ms
                d["allgpu_tok_s"] = b * 1e3 / ms
                d["allgpu_scaled_from_layers"] = fit
                if errs:
                    d["max_rel_logits_hybrid_vs_allgpu"] = max(errs)
                log(f"all-GPU decode B={b}", ms, errs[:3])
                del graph
    for b in res["decode"]:
        res["decode"][b].pop("hybrid_logits", None)
    return res


# --------------------------------------------------------------------------------------------------------- report

def table() -> str:
    r = RESULTS
    lines = [f"# gpu_hybrid {r.get('env', {}).get('date_utc', '?')} on {r.get('env', {}).get('device', '?')}", ""]
    if isinstance(r.get("bw"), dict) and "cpu_read_gb_s" in r["bw"]:
        b = r["bw"]
        lines += [f"ceilings: CPU read {b['cpu_read_gb_s']:.1f} GB/s ({b['cpu_read_threads']} threads), pinned H2D "
                  f"{b['h2d_pinned_gb_s']:.1f} GB/s, bf16 GEMM {b['gemm_bf16_tflops']:.0f} TFLOP/s", ""]
    lay = r.get("layer")
    if isinstance(lay, dict) and "tokens" in lay:
        lines += ["| T | graph vs eager | graph vs ref | D2H ms | host node ms | engine ms | H2D ms | hot GPU ms | "
                  "wait ms | eager step ms | graph step ms | CPU roofline ms |", "|" + "---|" * 12]
        for t, v in lay["tokens"].items():
            s = v["split_ms"]
            rf = v.get("cpu_roofline_ms")
            lines.append(f"| {t} | {v['max_rel_graph_vs_eager']:.1e} | {v['max_rel_graph_vs_ref']:.1e} | {s['d2h']:.3f} | "
                         f"{s['hostfn']:.3f} | {s['cpu']:.3f} | {s['h2d']:.3f} | {s['gpu']:.3f} | {s['wait']:.3f} | "
                         f"{v['eager_ms']:.3f} | {v['graph_ms']:.3f} | {rf if rf is None else f'{rf:.3f}'} |")
        lines.append("")
    pre = r.get("prefill")
    if isinstance(pre, dict) and "tokens" in pre:
        lines += ["| prefill T (one layer) | GPU ms/layer | compute-only ms | bound ms (H2D / GEMM) | % of bound | "
                  "CPU engine ms/layer | GPU vs CPU rel |", "|" + "---|" * 7]
        for t, v in pre["tokens"].items():
            lines.append(f"| {t} | {v['gpu_layer_ms']:.2f} | {v['gpu_compute_only_ms']:.2f} | "
                         f"{v.get('bound_h2d_ms', 0):.2f} / {v.get('bound_gemm_ms', 0):.2f} | {v.get('pct_of_bound', 0):.0f} | "
                         f"{v.get('cpu_layer_ms', float('nan')):.1f} | {v.get('rel_gpu_prefill_vs_cpu', float('nan')):.1e} |")
        lines.append("")
    mod = r.get("model")
    if isinstance(mod, dict) and "decode" in mod:
        def at(d, k):  # JSON turned int keys into strings
            d = d or {}
            return d.get(k, d.get(str(k), d.get(int(k)) if str(k).isdigit() else None))

        lines += [f"full model: {mod['layers']} layers, {mod['hot_experts']} hot experts/layer, context {mod['context']}; "
                  "CPU roofline = cold-expert bytes / CPU read bandwidth; serial bound = CPU roofline + the GPU-only "
                  "step (model with routed experts removed), since each layer's GPU work and CPU work depend on each other",
                  "", "| batch | eager tok/s | graph tok/s | all-GPU tok/s | CPU roofline tok/s | graph % of CPU roofline | "
                  "GPU-only ms/step | serial bound tok/s | graph % of serial bound | graph ms/step | engine ms/step | "
                  "between layers ms/step | engine alone ms/layer | graph vs eager logits | eager rerun logits | "
                  "hybrid vs all-GPU logits |", "|" + "---|" * 16]
        for b, v in mod["decode"].items():
            f = lambda k, p=".1f": (format(v[k], p) if k in v else "-")  # noqa: E731
            gpu_only = at(mod.get("nonmoe_graph_ms_per_step"), b)
            serial = (int(b) * 1e3 / (v["cpu_roofline_ms_per_step"] + gpu_only)
                      if gpu_only and "cpu_roofline_ms_per_step" in v else None)
            alone = at(mod.get("engine_back_to_back_ms_per_layer"), b)
            lines.append(f"| {b} | {f('eager_tok_s')} | {f('graph_tok_s')} | {f('allgpu_tok_s')} | {f('cpu_roofline_tok_s')} | "
                         f"{f('pct_of_roofline_graph', '.0f')} | {gpu_only or float('nan'):.1f} | {serial or float('nan'):.1f} | "
                         f"{100 * v['graph_tok_s'] / serial if serial else float('nan'):.0f} | {f('graph_ms_per_step')} | "
                         f"{f('graph_engine_ms_per_step')} | {f('graph_between_layers_ms_per_step')} | "
                         f"{alone or float('nan'):.3f} | {f('max_rel_logits_graph_vs_eager', '.1e')} | "
                         f"{f('max_rel_logits_eager_rerun', '.1e')} | {f('max_rel_logits_hybrid_vs_allgpu', '.1e')} |")
        lines += ["", "prefill bound = max(layers x store bytes / H2D, GPU-only prefill + layers x expert GEMM flops / GEMM "
                  "rate): the copies overlap everything else", "",
                  "| prefill tokens | GPU prefill on tok/s | GPU-only ms | bound tok/s | % of bound | "
                  "off (CPU engine) tok/s | on vs off logits |", "|---|---|---|---|---|---|---|"]
        bw, store = r.get("bw", {}), (r.get("prefill") or {}).get("layer_store_bytes")
        for t, v in mod.get("prefill", {}).items():
            bound, nonmoe = None, at(mod.get("nonmoe_prefill_ms"), t)
            if "h2d_pinned_gb_s" in bw and store:
                copy = mod["layers"] * store / (bw["h2d_pinned_gb_s"] * 1e6)
                gemm = mod["layers"] * 2 * int(t) * K * 3 * H * I / (bw["gemm_bf16_tflops"] * 1e9)
                bound = int(t) * 1e3 / max(copy, (nonmoe or 0.0) + gemm)
            on = v.get("gpu_prefill_tok_s", float("nan"))
            lines.append(f"| {t} | {on:.0f} | {nonmoe or float('nan'):.1f} | {bound or float('nan'):.0f} | "
                         f"{100 * on / bound if bound else float('nan'):.0f} | {v.get('cpu_prefill_tok_s', float('nan')):.0f} | "
                         f"{v.get('rel_logits_gpu_vs_cpu_prefill', float('nan')):.1e} |")
    errs = [f"- {k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    if errs:
        lines += ["", "errors:"] + errs
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--stages", default="env,bw,layer,prefill,model")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--hot", default="16", help="hot experts per layer (the first ids), or 'plan': lvllm plan's count "
                                                "for the whole model on this GPU")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--engine-cpus", default=None, help="e.g. 2-15 (default: all but the first two)")
    ap.add_argument("--check-steps", type=int, default=24)
    ap.add_argument("--time-steps", type=int, default=30)
    ap.add_argument("--prefill-layers", type=int, default=6)
    ap.add_argument("--prefill-tokens", type=lambda s: [int(x) for x in s.split(",")],
                    default=[128, 256, 512, 1024, 2048, 8192])
    ap.add_argument("--cpu-layer-max", type=int, default=8192, help="one-layer CPU engine timing only up to this T")
    ap.add_argument("--work", default="/tmp/lvllm-bench", help="where the random stores are written (and kept)")
    ap.add_argument("--cpu-prefill-max", type=int, default=1024, help="full-model CPU prefill only up to this T")
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--gpu-prefill-min", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--skip-allgpu", action="store_true")
    ap.add_argument("--blocking-sync", action="store_true", help="waiting threads sleep (cudaDeviceScheduleBlockingSync)")
    ap.add_argument("--main-cpus", default=None,
                    help="pin this thread (and so the CUDA driver's callback thread, created later) e.g. 0 or 0-1")
    args = ap.parse_args()
    if args.main_cpus:
        os.sched_setaffinity(0, cpu_range(args.main_cpus))  # before CUDA starts its threads
    else:  # as the plugin does: this process's threads (and CUDA's, started later) off the engine's spinning cpus
        keep_other_threads_off(engine_cpus(args.engine_cpus))
    if args.blocking_sync:
        args.blocking_sync = blocking_sync()  # False (recorded in env) when CUDA had started already
    if not torch.cuda.is_available():
        print("bench/gpu_hybrid.py needs CUDA; the CPU fallbacks are tested by tests/test_gpu_paths.py", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_shape(args.shape)
    RESULTS["shape"] = {"name": args.shape, "H": H, "I": I, "E": E, "K": K, "expert_int4_bytes": expert_bytes()}
    if args.hot == "plan":
        try:
            RESULTS["plan"] = plan_hot(args)
            args.hot = max(RESULTS["plan"]["hot_per_layer"])
            if any(v != list(range(len(v))) for v in RESULTS["plan"]["hot"].values()):
                raise ValueError("the plan's hot ids are not the first ids of each layer (routing profile?)")
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on with no hot experts
            traceback.print_exc()
            RESULTS["plan"] = {"error": f"{type(e).__name__}: {e}"}
            args.hot = 0
        RESULTS.get("plan", {}).pop("hot", None)
        log("plan", RESULTS["plan"], "-> hot experts per layer", args.hot)
    args.hot = int(args.hot)
    torch.set_num_threads(1)  # the engine owns the cores (engine.py thread budget)
    fns = {"env": stage_env, "bw": stage_bw, "layer": stage_layer, "prefill": stage_prefill, "model": stage_model}
    for name in args.stages.split(","):
        log(f"stage {name}")
        t0 = time.perf_counter()
        try:
            RESULTS[name] = fns[name](args)
        except Exception as e:  # a failed stage is recorded; the next ones still run
            traceback.print_exc()
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
        if isinstance(RESULTS[name], dict):
            RESULTS[name]["seconds"] = round(time.perf_counter() - t0, 1)
        save(out)
        gc.collect()  # engines of finished stages (and their pinned threads) go now
        torch.cuda.empty_cache()
    md = table()
    (out / "gpu_hybrid.md").write_text(md)
    print(md)
    return 0 if all("error" not in v for v in RESULTS.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
