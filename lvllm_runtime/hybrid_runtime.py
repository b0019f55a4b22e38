"""The hybrid runtime: a plan and an expert store in, one `HybridMoE` per MoE layer out.

This is what `lvllm serve` runs (vllm_plugin.py only hands it vLLM's facts: device, TP rank, top-k, batch sizes)
and what the benches and tests build, so nothing is measured that users do not run. It knows nothing of vLLM.

    rt = HybridRuntime(plan, store, Placement(device, top_k, ...))   # every check below, before any weight is read
    rt.engine        the C++ engine over this rank's node slices (None when every expert is hot)
    rt.decode_steps  {T: CpuStep}: graph-safe engine steps shared by every layer (CUDA)
    rt.prefill       StreamedPrefill over the mapped store files, registered for DMA in place (not copied)
    rt.load_layer(L) -> HybridMoE: layer L's engine pages, hot experts and prefill source

Each capability is a `(ok, reason)` predicate (as vLLM's fused-MoE backends declare `_supports_*`): what the plan
asks for and the box cannot do fails here with one line naming the fix; what the plan leaves out is simply not built.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import model_sizes
from .cuda_graph_step import HybridDecodeLayer, hot_experts, shared_steps
from .errors import DoesNotFit, StoreError
from .gpu_prefill import LayerShape, StreamedPrefill
from .hybrid import HybridMoE, join_node_slices
from .manifest import DTYPE_BYTES, StoreManifest
from .plan import RuntimePlan
from .store import ExpertStore, config_sha256

log = logging.getLogger("vllm.lvllm")  # a child of vLLM's logger: `lvllm serve` shows these lines as stages

Support = tuple[bool, str]


@dataclass(frozen=True)
class Placement:
    """How this process runs the model: what vLLM (or a bench) knows and the plan does not."""

    device: torch.device
    top_k: int
    tp_rank: int = 0
    tp_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    decode_sizes: tuple[int, ...] = ()  # batch sizes that get graph-safe engine steps (CUDA): eager + capture sizes
    intermediate_per_partition: int | None = None  # vLLM's I / tp, checked against the rank's node slices

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def store_matches_plan(plan: RuntimePlan, m: StoreManifest, model_dir: str | Path | None = None) -> Support:
    """The store is the one the plan was made for, and of the model being served."""
    if model_dir is not None:
        config = Path(model_dir) / "config.json"
        if config.is_file() and config_sha256(config) != m.config_sha256:
            return False, f"expert store {plan.store_path} was made from another model than {model_dir}"
    if plan.config_sha256 and plan.config_sha256 != m.config_sha256:
        return False, f"plan and expert store {plan.store_path} belong to different models"
    if plan.weight_format != m.weight_format or plan.store_numa_nodes != m.numa_nodes:
        return False, (f"plan expects a {plan.weight_format} store split for {plan.store_numa_nodes} nodes, "
                       f"{plan.store_path} is {m.weight_format} for {m.numa_nodes}")
    return True, ""


def decode_steps_supported(p: Placement) -> Support:
    """Graph-safe engine steps need CUDA (a host-callback node) and batch sizes to build them for."""
    if not p.on_cuda:
        return False, "no CUDA device: the engine runs in blocking calls"
    if not p.decode_sizes:
        return False, "no decode batch sizes given"
    return True, ""


def gpu_prefill_supported(plan: RuntimePlan) -> Support:
    """The whole-layer path runs when the plan asks for it (on the CPU too: the same arithmetic, for tests)."""
    if plan.gpu_prefill_min_tokens is None:
        return False, "the plan sets no gpu_prefill_min_tokens"
    return True, ""


def layer_store_bytes(m: StoreManifest, nodes: tuple[int, ...]) -> int:
    """Tensor bytes of one layer's node slices `nodes` (every layer of a store has the same): what a staging slot
    holds and what registering the layer page-locks (headers aside)."""
    return sum(math.prod(shape) * DTYPE_BYTES[dtype] for n in nodes for _, dtype, shape in m.tensor_specs(n))


def prefill_staging_bytes(m: StoreManifest, nodes: tuple[int, ...], window: int) -> int:
    """Device bytes the GPU-prefill path allocates for this rank (what the planner reserves as prefill_staging)."""
    n = m.node_intermediate_size
    return model_sizes.prefill_staging_bytes(layer_store_bytes(m, nodes), m.num_experts, 2 * n if m.gated else n,
                                             m.hidden_size, n, m.weight_format, window)


def staging_fits(need: int, p: Placement) -> Support:
    """The GPU has room for the prefill staging now (checked before anything of the layers is allocated)."""
    if not p.on_cuda:
        return True, ""
    free, _ = torch.cuda.mem_get_info(p.device)
    if need > free:
        return False, (f"GPU prefill needs {need / 2**30:.2f} GiB of staging on {p.device}, "
                       f"{free / 2**30:.2f} GiB is free")
    return True, ""


def pinnable(nbytes: int) -> Support:
    """The process may page-lock `nbytes` (root and CAP_IPC_LOCK ignore RLIMIT_MEMLOCK)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= nbytes:
        return True, ""
    return False, f"GPU prefill page-locks {nbytes / 2**30:.1f} GiB of the store, the locked-memory limit is " \
                  f"{soft / 2**30:.2f} GiB"


def rank_nodes(plan: RuntimePlan, m: StoreManifest, p: Placement) -> tuple[int, ...]:
    """The store node slices rank `p.tp_rank` computes; they must be exactly vLLM's TP slice of I."""
    if plan.tp_size != p.tp_size or len(plan.rank_nodes) != p.tp_size:
        raise StoreError(f"plan was made for tensor-parallel size {plan.tp_size}, vLLM runs {p.tp_size}",
                         f"plan again with --tensor-parallel-size {p.tp_size}")
    nodes = tuple(plan.rank_nodes[p.tp_rank])
    k = m.numa_nodes // p.tp_size if m.numa_nodes % p.tp_size == 0 else 0
    want_i = p.intermediate_per_partition
    if k == 0 or nodes != tuple(range(p.tp_rank * k, (p.tp_rank + 1) * k)) or \
            (want_i is not None and k * m.node_intermediate_size != want_i):
        raise StoreError(f"store split into {m.numa_nodes} node slices cannot serve tensor-parallel rank "
                         f"{p.tp_rank} of {p.tp_size} (needs I/{p.tp_size} = {want_i} rows, plan gives nodes "
                         f"{list(nodes)})", f"quantize with --numa-nodes a multiple of {p.tp_size} and plan again")
    return nodes


def _require(support: Support, error: type, fix: str) -> None:
    ok, why = support
    if not ok:
        raise error(why, fix)


class HybridRuntime:
    """Per-process state shared by every MoE layer: plan, store, engine, decode steps, GPU-prefill streamer."""

    def __init__(self, plan: RuntimePlan, store: ExpertStore, placement: Placement,
                 model_dir: str | Path | None = None):
        m = store.manifest
        self.plan, self.store, self.placement = plan, store, placement
        _require(store_matches_plan(plan, m, model_dir), StoreError,
                 "make a new plan for this store with `lvllm plan` (or quantize this model: `lvllm quantize`)")
        self.nodes = rank_nodes(plan, m, placement)
        self.layers: dict[int, HybridMoE] = {}
        self.engine = None
        if any(len(set(plan.hot_experts.get(L, ()))) < m.num_experts for L in m.moe_layers):
            self.engine = self._make_engine()  # here, so a CPU it cannot run on fails before any weight is read
        self.decode_steps: dict = {}
        steps_ok, why_not = decode_steps_supported(placement)
        if self.engine is not None and steps_ok:
            sizes = sorted(t for t in placement.decode_sizes if t <= plan.max_batch_tokens)
            self.decode_steps = shared_steps(self.engine, [], sizes, m.hidden_size, placement.top_k,
                                             placement.dtype, placement.device)
            log.info("lvllm: graph-safe engine steps for batch sizes %s (%s, pinned host buffers)", sizes,
                     placement.dtype)
        elif self.engine is not None:
            log.info("lvllm: no graph-safe engine steps (%s)", why_not)
        self.prefill: StreamedPrefill | None = None
        if gpu_prefill_supported(plan)[0]:
            need = prefill_staging_bytes(m, self.nodes, plan.prefetch_window)
            _require(staging_fits(need, placement), DoesNotFit,
                     "lower --gpu-memory-utilization, plan with --prefetch-window 1, or disable GPU prefill "
                     "(lvllm plan --gpu-prefill-min-tokens 0)")
            if placement.on_cuda:
                pin = layer_store_bytes(m, self.nodes) * len(m.moe_layers)
                _require(pinnable(pin), DoesNotFit,
                         "raise the locked-memory limit (ulimit -l unlimited) or plan with --gpu-prefill-min-tokens 0")
            self.prefill = StreamedPrefill(LayerShape(m.weight_format, m.group_size, m.gated, m.activation),
                                           placement.device, plan.prefetch_window)
            log.info("lvllm: GPU prefill at >= %d tokens, %d layers ahead, %.2f GiB of staging",
                     plan.gpu_prefill_min_tokens, plan.prefetch_window, need / 2**30)

    @classmethod
    def open(cls, plan: RuntimePlan, placement: Placement, model_dir: str | Path | None = None) -> "HybridRuntime":
        return cls(plan, ExpertStore.open(plan.store_path), placement, model_dir)

    def _make_engine(self):
        """The engine over this rank's node slices. On CUDA, when the plan leaves this process two cpus outside every
        rank's engine cpus (its main thread, CUDA's host-callback thread), the engine cpus are the engines' own:
        their workers spin between calls and the process's other threads move off them."""
        from .engine import SPIN_US_OWN_CPUS, SPIN_US_SHARED_CPUS, Engine, keep_other_threads_off

        m, plan = self.store.manifest, self.plan
        slots = {n.node: n for n in plan.nodes}
        missing = [n for n in self.nodes if n not in slots]
        if missing:
            raise StoreError(f"plan's runtime.nodes has no entry for node(s) {missing}", "plan again")
        cpus = [list(slots[n].engine_cpus) for n in self.nodes]
        every_engine_cpu = {c for n in plan.nodes for c in n.engine_cpus}
        own_cpus = self.placement.on_cuda and len(os.sched_getaffinity(0) - every_engine_cpu) >= 2
        engine = Engine(m.hidden_size, m.node_intermediate_size, m.num_experts, m.activation, m.gated,
                        m.weight_format, m.group_size, cpus, plan.max_batch_tokens,
                        spin_us=SPIN_US_OWN_CPUS if own_cpus else SPIN_US_SHARED_CPUS)
        if own_cpus:
            log.info("lvllm: %d threads of this process moved off the engines' cpus",
                     keep_other_threads_off(every_engine_cpu))
        log.info("lvllm: TP rank %d computes store node slices %s with engine %s on cpus %s",
                 self.placement.tp_rank, list(self.nodes), engine.isa, cpus)
        return engine

    def load_layer(self, layer: int) -> HybridMoE:
        """Layer `layer` into the engine (its cold experts), onto the device (hot experts) and into the prefill
        streamer's sources; returns its HybridMoE (also kept in `layers`)."""
        m, p = self.store.manifest, self.placement
        if layer not in set(m.moe_layers):
            raise StoreError(f"expert store {self.plan.store_path} has no experts for layer {layer}",
                             "quantize this model again with `lvllm quantize`")
        shards = [self.store.layer(layer, n) for n in self.nodes]
        hot_ids = self.plan.hot_experts.get(layer, ())
        if self.engine is not None and len(set(hot_ids)) < m.num_experts:
            start = time.perf_counter()
            self.engine.load_layer(layer, shards)
            nbytes = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            log.info("lvllm: loaded layer %d experts (%.1f MB, %.2f GB/s)", layer, nbytes / 1e6,
                     nbytes / max(time.perf_counter() - start, 1e-9) / 1e9)
        hot = None
        if hot_ids:  # the joined rank slice is a copy when the rank has several nodes: made for hot experts only
            weights = join_node_slices(shards, m.weight_format, m.gated, m.group_size)
            dtype = p.dtype if not p.on_cuda else torch.bfloat16
            hot = hot_experts(weights, hot_ids, m.num_experts, p.device, dtype)
        if self.prefill is not None:
            self.prefill.add_layer(layer, shards)
        else:  # the engine and the GPU hold their copies: the mapped store pages need not stay resident
            for n in self.nodes:
                self.store.drop_pages(layer, n)
        steps = {}
        if self.decode_steps and len(set(hot_ids)) < m.num_experts:
            for step in self.decode_steps.values():
                step.add_layer(layer)
            steps = self.decode_steps
        moe = HybridMoE(layer, self.engine, HybridDecodeLayer(layer, steps, m.activation, m.gated, hot),
                        self.prefill, self.plan.gpu_prefill_min_tokens)
        self.layers[layer] = moe
        return moe

    def load_all(self) -> dict[int, HybridMoE]:
        for layer in self.store.manifest.moe_layers:
            self.load_layer(layer)
        return self.layers

    def close(self) -> None:
        """Give back what outlives the layers: the registered store pages (the engine goes with this object)."""
        if self.prefill is not None:
            self.prefill.close()
        self.layers.clear()
