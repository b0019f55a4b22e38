"""One table of MoE architectures: where each family keeps its routed experts on disk, how it routes, which
layers are MoE. Adding a model is adding a row to `_FAMILIES`.

Names are the tensor names exactly as they appear in the safetensors files of hub checkpoints (and of the zoo's,
which writes the same names): transformers v5 fuses experts in memory only, `save_pretrained` converts back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UnsupportedArchitecture

ACTIVATIONS = ("silu_glu", "relu2", "gptoss_glu", "gelu_tanh_glu")


@dataclass(frozen=True)
class Routing:
    """How router logits [T, E] become (weights, ids) [T, top_k].

    softmax: p = softmax(logits); sigmoid: p = sigmoid(logits). With `correction_bias`, experts are chosen on
    p + bias (bias does not enter the weights). With n_group > 1, only the `topk_group` groups with the best sum of
    their top-2 choice scores compete. `renormalize` divides the chosen weights by their sum; the result is
    multiplied by `routed_scaling_factor`. `softmax_after_topk` (gpt-oss): top-k on the raw logits, softmax over
    those k only. `per_expert_scale` (gemma4): the weights are then multiplied by a learned [E] vector
    (`MoEModel.per_expert_scale_name`), and the router sees rmsnorm(x) * scale * H**-0.5 (`router_input_scale_name`).
    """

    scoring: str
    top_k: int
    renormalize: bool
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    softmax_after_topk: bool = False
    per_expert_scale: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be softmax or sigmoid, got {self.scoring!r}")
        if self.top_k < 1 or self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"bad routing sizes: top_k={self.top_k} n_group={self.n_group} topk_group={self.topk_group}")


@dataclass(frozen=True)
class MoEModel:
    """What lvllm needs to know about one checkpoint's routed experts.

    Per expert (HF Linear orientation): gate [I, H], up [I, H], down [H, I]. layout "per_expert": one tensor per
    projection per expert; "fused": per layer gate_up [E, 2I, H] (gate rows first) and down [E, H, I], unless
    `fused_transposed` ([E, H, 2I] / [E, I, H], gpt-oss) or `gate_up_interleaved` (even rows gate, gpt-oss).
    """

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool
    routing: Routing
    shared_intermediate_size: int
    layout: str
    config: dict = field(repr=False, compare=False)
    layer_prefix: str = "model.layers"
    moe_module: str = "mlp"
    proj: tuple[str | None, str, str] = ("gate_proj", "up_proj", "down_proj")
    router: str = "gate.weight"
    router_bias: str | None = None
    correction_bias: str | None = None
    per_expert_scale: str | None = None
    router_input_scale: str | None = None
    fused_transposed: bool = False
    gate_up_interleaved: bool = False
    expert_bias: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {ACTIVATIONS}")
        if self.layout not in ("per_expert", "fused"):
            raise ValueError(f"layout must be per_expert or fused, got {self.layout!r}")

    def _moe(self, layer: int) -> str:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} is not a MoE layer of this {self.model_type} (MoE layers: {self.moe_layers})")
        base = f"{self.layer_prefix}.{layer}"
        return f"{base}.{self.moe_module}" if self.moe_module else base

    def expert_names(self, layer: int, expert: int) -> dict[str, str]:
        """On-disk base names (without ".weight") of one expert's projections; no "gate" when not gated."""
        if self.layout != "per_expert":
            raise ValueError(f"{self.model_type} stores experts fused; use fused_names()")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range 0..{self.num_experts - 1}")
        base = f"{self._moe(layer)}.experts.{expert}"
        gate, up, down = self.proj
        names = {"up": f"{base}.{up}", "down": f"{base}.{down}"}
        if gate is not None:
            names = {"gate": f"{base}.{gate}", **names}
        return names

    def fused_names(self, layer: int) -> dict[str, str]:
        """On-disk names of a layer's fused expert tensors (full names; these carry no ".weight")."""
        if self.layout != "fused":
            raise ValueError(f"{self.model_type} stores experts per expert; use expert_names()")
        base = f"{self._moe(layer)}.experts"
        return {"gate_up": f"{base}.gate_up_proj", "down": f"{base}.down_proj"}

    def router_name(self, layer: int) -> str:
        return f"{self._moe(layer)}.{self.router}"

    def router_bias_name(self, layer: int) -> str | None:
        return f"{self._moe(layer)}.{self.router_bias}" if self.router_bias else None

    def correction_bias_name(self, layer: int) -> str | None:
        """The [E] float32 selection bias of noaux_tc routing; None when the routing uses none."""
        if not (self.correction_bias and self.routing.correction_bias):
            return None
        return f"{self._moe(layer)}.{self.correction_bias}"

    def per_expert_scale_name(self, layer: int) -> str | None:
        return f"{self._moe(layer)}.{self.per_expert_scale}" if self.per_expert_scale else None

    def router_input_scale_name(self, layer: int) -> str | None:
        return f"{self._moe(layer)}.{self.router_input_scale}" if self.router_input_scale else None

    def expert_params(self) -> int:
        """Weights in one routed expert (gate, up, down)."""
        return (3 if self.gated else 2) * self.intermediate_size * self.hidden_size

    def expert_bytes(self, dtype_bytes: float) -> int:
        """Bytes of one routed expert's weights at `dtype_bytes` per weight (0.5 for INT4, scales not included)."""
        return int(self.expert_params() * dtype_bytes)

    def layer_expert_bytes(self, dtype_bytes: float) -> int:
        return self.num_experts * self.expert_bytes(dtype_bytes)

    def total_expert_bytes(self, dtype_bytes: float) -> int:
        return len(self.moe_layers) * self.layer_expert_bytes(dtype_bytes)


def _get(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _need(cfg: dict, *keys: str) -> Any:
    value = _get(cfg, *keys)
    if value is None:
        raise UnsupportedArchitecture(
            f"config.json of model_type {cfg.get('model_type')!r} lacks {' / '.join(keys)}",
            "use the config.json that ships with the checkpoint",
        )
    return value


def _num_experts(cfg: dict) -> int:
    return int(_need(cfg, "num_experts", "num_local_experts", "n_routed_experts"))


def _top_k(cfg: dict) -> int:
    return int(_need(cfg, "num_experts_per_tok", "top_k_experts", "experts_per_token"))


_LANGUAGE_MODEL = "model.language_model.layers"  # multimodal checkpoints keep the text model here


# --- one function per routing/layer convention; each returns the MoEModel keyword arguments it decides ---------


def _qwen(cfg: dict) -> dict:
    """Qwen2/3-MoE, Qwen3-Next: softmax routing; MoE where (L+1) % decoder_sparse_step == 0 outside mlp_only_layers."""
    n = int(cfg["num_hidden_layers"])
    step = int(_get(cfg, "decoder_sparse_step", default=1))
    dense = set(_get(cfg, "mlp_only_layers", default=[]))
    experts = _num_experts(cfg)
    moe = tuple(L for L in range(n) if L not in dense and experts > 0 and (L + 1) % step == 0)
    return dict(
        num_layers=n,
        moe_layers=moe,
        num_experts=experts,
        intermediate_size=int(_need(cfg, "moe_intermediate_size")),
        routing=Routing("softmax", _top_k(cfg), bool(_get(cfg, "norm_topk_prob", default=False))),
        shared_intermediate_size=int(_get(cfg, "shared_expert_intermediate_size", default=0)),
    )


def _every_layer(cfg: dict, inter_key: str, routing: Routing, shared_key: str | None = None) -> dict:
    n = int(cfg["num_hidden_layers"])
    return dict(
        num_layers=n,
        moe_layers=tuple(range(n)),
        num_experts=_num_experts(cfg),
        intermediate_size=int(_need(cfg, inter_key)),
        routing=routing,
        shared_intermediate_size=int(_get(cfg, shared_key, default=0)) if shared_key else 0,
    )


def _qwen3_5(cfg: dict) -> dict:
    """Qwen3.5-MoE: every layer MoE, top-k always renormalised, experts fused on disk."""
    routing = Routing("softmax", _top_k(cfg), True)
    return _every_layer(cfg, "moe_intermediate_size", routing, "shared_expert_intermediate_size")


def _qwen3_vl(cfg: dict) -> dict:
    """Qwen3-VL-MoE: Qwen layer rule; the router always renormalises its top-k."""
    return dict(_qwen(cfg), routing=Routing("softmax", _top_k(cfg), True))


def _gemma4(cfg: dict) -> dict:
    """Gemma-4: every layer has the MoE block (beside its dense MLP) when enable_moe_block; softmax, renormalised,
    then scaled per expert."""
    n = int(cfg["num_hidden_layers"])
    routing = Routing("softmax", _top_k(cfg), True, per_expert_scale=True)
    return dict(_every_layer(cfg, "moe_intermediate_size", routing), moe_layers=tuple(range(n)) if cfg.get(
        "enable_moe_block") else ())


def _mixtral(cfg: dict) -> dict:
    """Mixtral: every layer MoE, softmax, renormalised; `intermediate_size` is the expert size."""
    return _every_layer(cfg, "intermediate_size", Routing("softmax", _top_k(cfg), True))


def _minimax_m2(cfg: dict) -> dict:
    """MiniMax-M2: sigmoid + optional selection bias, always renormalised, no scaling."""
    out = _mixtral(cfg)
    scoring = _get(cfg, "scoring_func", default="sigmoid")
    out["routing"] = Routing(
        scoring,
        _top_k(cfg),
        True,
        correction_bias=bool(_get(cfg, "use_routing_bias", default=True)),
    )
    return out


def _deepseek(cfg: dict) -> dict:
    """DeepSeek-V3 / Kimi-K2 / GLM-4.5: noaux_tc grouped sigmoid routing; layers < first_k_dense_replace dense."""
    n = int(cfg["num_hidden_layers"])
    first = int(_get(cfg, "first_k_dense_replace", default=0))
    freq = int(_get(cfg, "moe_layer_freq", default=1))
    if cfg.get("mlp_layer_types"):  # glm4_moe_lite
        moe = tuple(L for L, t in enumerate(cfg["mlp_layer_types"]) if t == "sparse")
    else:
        moe = tuple(L for L in range(n) if L >= first and L % freq == 0)
    inter = int(_need(cfg, "moe_intermediate_size"))
    return dict(
        num_layers=n,
        moe_layers=moe,
        num_experts=_num_experts(cfg),
        intermediate_size=inter,
        routing=Routing(
            _get(cfg, "scoring_func", default="sigmoid"),
            _top_k(cfg),
            bool(_get(cfg, "norm_topk_prob", default=True)),
            n_group=int(_get(cfg, "n_group", default=1)),
            topk_group=int(_get(cfg, "topk_group", default=1)),
            correction_bias=_get(cfg, "topk_method", default="noaux_tc") == "noaux_tc",
            routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", default=1.0)),
        ),
        shared_intermediate_size=inter * int(_get(cfg, "n_shared_experts", default=0)),
    )


def _gpt_oss(cfg: dict) -> dict:
    """gpt-oss: every layer MoE; top-k on the biased logits, softmax over the k."""
    return _every_layer(cfg, "intermediate_size", Routing("softmax", _top_k(cfg), False, softmax_after_topk=True))


def _nemotron_h(cfg: dict) -> dict:
    """Nemotron-H: hybrid Mamba/attention/MoE stack; MoE layers are "moe" in layers_block_type ('E' in the old
    hybrid_override_pattern); DeepSeek noaux_tc routing."""
    kinds = cfg.get("layers_block_type")
    if not kinds and cfg.get("hybrid_override_pattern"):
        kinds = ["moe" if c == "E" else c for c in cfg["hybrid_override_pattern"]]
    if not kinds:
        raise UnsupportedArchitecture(
            "nemotron_h config.json has neither layers_block_type nor hybrid_override_pattern",
            "use the config.json that ships with the checkpoint",
        )
    inter = int(_need(cfg, "moe_intermediate_size"))
    return dict(
        num_layers=len(kinds),
        moe_layers=tuple(L for L, t in enumerate(kinds) if t == "moe"),
        num_experts=_num_experts(cfg),
        intermediate_size=inter,
        routing=Routing(
            "sigmoid",
            _top_k(cfg),
            bool(_get(cfg, "norm_topk_prob", default=True)),
            n_group=int(_get(cfg, "n_group", default=1)),
            topk_group=int(_get(cfg, "topk_group", default=1)),
            correction_bias=True,
            routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", default=1.0)),
        ),
        shared_intermediate_size=int(_get(cfg, "moe_shared_expert_intermediate_size", default=0))
        * int(_get(cfg, "n_shared_experts", default=1)),
    )


@dataclass(frozen=True)
class _Family:
    parse: Callable[[dict], dict]
    names: dict = field(default_factory=dict)  # MoEModel naming/layout fields that differ from the defaults
    activation: str = "silu_glu"
    text_config: bool = False  # the language model lives under config["text_config"]


_MIXTRAL_NAMES = dict(moe_module="block_sparse_moe", proj=("w1", "w3", "w2"))
_DEEPSEEK_NAMES = dict(correction_bias="gate.e_score_correction_bias")

_FAMILIES: dict[str, _Family] = {
    "qwen3_moe": _Family(_qwen),
    "qwen2_moe": _Family(_qwen),
    "qwen3_next": _Family(_qwen),
    "qwen3_5_moe": _Family(_qwen3_5, dict(layout="fused", layer_prefix=_LANGUAGE_MODEL), text_config=True),
    # stored transposed on disk: gate_up [E, H, 2I] (gate columns first), down [E, I, H]
    "qwen3_vl_moe": _Family(
        _qwen3_vl, dict(layout="fused", layer_prefix=_LANGUAGE_MODEL, fused_transposed=True), text_config=True
    ),
    "mixtral": _Family(_mixtral, _MIXTRAL_NAMES),
    "minimax_m2": _Family(_minimax_m2, dict(_MIXTRAL_NAMES, correction_bias="e_score_correction_bias")),
    "deepseek_v3": _Family(_deepseek, _DEEPSEEK_NAMES),
    "kimi_k2": _Family(_deepseek, _DEEPSEEK_NAMES),
    "glm4_moe": _Family(_deepseek, _DEEPSEEK_NAMES),
    "glm4_moe_lite": _Family(_deepseek, _DEEPSEEK_NAMES),
    "glm4v_moe": _Family(_deepseek, dict(_DEEPSEEK_NAMES, layer_prefix=_LANGUAGE_MODEL), text_config=True),
    # Kimi-K2.5 keeps the llava-style prefix on disk (transformers renames it to model.language_model in memory)
    "kimi_k25": _Family(_deepseek, dict(_DEEPSEEK_NAMES, layer_prefix="language_model.model.layers"), text_config=True),
    "gemma4": _Family(
        _gemma4,
        dict(
            layout="fused",
            layer_prefix=_LANGUAGE_MODEL,
            moe_module="",
            router="router.proj.weight",
            per_expert_scale="router.per_expert_scale",
            router_input_scale="router.scale",
        ),
        activation="gelu_tanh_glu",
        text_config=True,
    ),
    "gpt_oss": _Family(
        _gpt_oss,
        dict(
            layout="fused",
            router="router.weight",
            router_bias="router.bias",
            fused_transposed=True,
            gate_up_interleaved=True,
            expert_bias=True,
        ),
        activation="gptoss_glu",
    ),
    "nemotron_h": _Family(
        _nemotron_h,
        dict(
            layer_prefix="backbone.layers",
            moe_module="mixer",
            proj=(None, "up_proj", "down_proj"),
            correction_bias="gate.e_score_correction_bias",
        ),
        activation="relu2",
    ),
}


def supported() -> list[str]:
    """model_type values `resolve` understands."""
    return sorted(_FAMILIES)


def resolve(config: dict) -> MoEModel:
    """Describe the routed experts of the checkpoint whose config.json is `config`.

    Raises UnsupportedArchitecture naming the model_type and the supported ones.
    """
    model_type = config.get("model_type")
    family = _FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not a supported MoE architecture",
            f"supported: {', '.join(supported())}",
        )
    cfg = config
    if family.text_config:
        cfg = config.get("text_config")
        if not isinstance(cfg, dict):
            raise UnsupportedArchitecture(
                f"{model_type} config.json has no text_config", "use the config.json that ships with the checkpoint"
            )
    parsed = family.parse(cfg)
    if not parsed["moe_layers"]:
        raise UnsupportedArchitecture(
            f"{model_type} config.json describes no MoE layers", "lvllm only serves Mixture-of-Experts models"
        )
    names = dict(family.names)
    return MoEModel(
        model_type=model_type,
        hidden_size=int(_need(cfg, "hidden_size")),
        activation=family.activation,
        gated=names.get("proj", ("gate_proj",))[0] is not None,
        layout=names.pop("layout", "per_expert"),
        config=dict(cfg),
        **parsed,
        **names,
    )


def check_served_layer(model_type: str, store: Any, num_experts: int, hidden_size: int, intermediate_size: int,
                       gated: bool, has_bias: bool = False) -> None:
    """Raise UnsupportedArchitecture, one line naming the family and the fix, unless `model_type` (the served
    model's config) is a family in this table and its routed-expert layer (what vLLM built: E, H, I, gated) has the
    layout of `store` (a StoreManifest or MoEModel: num_experts, hidden_size, intermediate_size, gated, and
    expert_bias where it has one). The plugin
    calls it at the first MoE layer, before any weight is read."""
    if model_type not in _FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not an MoE family lvllm knows (known: {', '.join(supported())})",
            "serve it with stock vLLM (no --plan), or add its row to lvllm_runtime/arch.py",
        )
    fix = "quantize this model again into a new store (`lvllm quantize MODEL STORE_DIR`) and make a new plan"
    if gated != store.gated:
        have, want = ("gate and up", "up only") if store.gated else ("up only", "gate and up")
        raise UnsupportedArchitecture(
            f"{model_type}: the expert store holds {have} rows per expert, the served model's experts have {want}", fix)
    served = dict(E=num_experts, H=hidden_size, I=intermediate_size)
    stored = dict(E=store.num_experts, H=store.hidden_size, I=store.intermediate_size)
    if served != stored:
        diff = ", ".join(f"{k}={served[k]} (store {stored[k]})" for k in served if served[k] != stored[k])
        raise UnsupportedArchitecture(f"{model_type}: the served model's routed experts differ from the store: {diff}",
                                      fix)
    stored_bias = bool(getattr(store, "expert_bias", False))
    if has_bias != stored_bias:
        raise UnsupportedArchitecture(
            f"{model_type}: the served model's routed experts have {'' if has_bias else 'no '}biases, the expert store "
            f"has {'none' if has_bias else 'some'}", fix)
