"""Architecture numbers the planner needs, read from a config.json (or a recipe's copy of its keys).

`arch.MoEModel` knows where the routed experts live; planning also needs everything else: attention kind and KV
dims (GQA, MLA latent + rope, gated-DeltaNet and Mamba-2 state, sliding windows), dense and shared MLPs,
vocabulary. `ModelShape.tensors()` lists every weight tensor of the text model as (role, shape, count) so that
bytes in any checkpoint or store format are one sum; `kv_bytes_per_token` and `state_bytes_per_seq` size the cache.

Counted: what vLLM loads for text generation. Not counted: MTP / next-token-prediction layers (vLLM skips them
without speculative decoding) and vision/audio towers unless a recipe gives their parameter count
(`extra_params`, kept in BF16 on the GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedArchitecture

# Roles of a weight tensor. Routed experts go to the CPU store (or hot on the GPU); the rest sits on the GPU.
ROUTED = "routed_expert"
NON_EXPERT_ROLES = ("embed", "lm_head", "attention", "linear_attention", "mamba", "dense_mlp", "shared_expert",
                    "router", "norm")
# 2-D projections that FP8/INT4 checkpoints quantize (embeddings, lm_head, router, norms and SSM vectors never are).
QUANTIZABLE = frozenset({"attention", "linear_attention", "mamba", "dense_mlp", "shared_expert", ROUTED})

SUPPORTED = ("qwen3_moe", "qwen2_moe", "qwen3_vl_moe", "qwen3_next", "qwen3_5_moe", "mixtral", "minimax_m2",
             "deepseek_v3", "kimi_k2", "kimi_k25", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm46v", "gpt_oss",
             "nemotron_h", "gemma4")


@dataclass(frozen=True)
class Tensor:
    """`count` tensors of `shape` playing `role`; `linear` marks a 2-D projection [out, in] (quantizable)."""

    role: str
    shape: tuple[int, ...]
    count: int = 1
    linear: bool = False
    f32: bool = False  # kept in float32 whatever the checkpoint dtype (e.g. router correction bias)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    """The text model's sizes. `layers[i]` = (mixer, mlp) with mixer in full|sliding|linear|mamba|mla|none and mlp
    in moe|dense|none. Expert matrices in HF orientation: gate/up [I, H], down [H, I]."""

    model_type: str
    hidden_size: int
    vocab_size: int
    layers: tuple[tuple[str, str], ...]
    num_experts: int
    top_k: int
    expert_intermediate: int
    gated: bool = True
    moe_latent: int = 0  # Nemotron LatentMoE: experts work in this width, fc1/fc2_latent_proj map to and from H
    expert_bias: bool = False
    shared_intermediate: int = 0
    shared_gate: bool = False
    dense_intermediate: int = 0
    tie_word_embeddings: bool = False
    router_bias: bool = False
    correction_bias: bool = False
    # softmax attention (GQA/MHA) and MLA
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    attn_output_gate: bool = False
    qk_norm: str = "none"  # none | head (per head_dim) | full (over all heads)
    attention_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int | None = None
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # gated DeltaNet (Qwen3-Next / Qwen3.5)
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    conv_kernel: int = 4
    lin_split_proj: bool = False  # Qwen3.5 in_proj_qkv/z/b/a instead of in_proj_qkvz/ba
    # Mamba-2 (Nemotron-H)
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    ssm_state: int = 0
    mamba_groups: int = 0
    norms_per_layer: int = 2
    extra_params: int = 0
    max_positions: int = 0  # config's max_position_embeddings: the longest context vLLM accepts (0: not given)
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, (_, mlp) in enumerate(self.layers) if mlp == "moe")

    @property
    def expert_hidden(self) -> int:
        """Width experts read and write: H, or the latent size of a LatentMoE."""
        return self.moe_latent or self.hidden_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: (gate,) up [I, H] and down [H, I] (+ biases for gpt-oss)."""
        n = (3 if self.gated else 2) * self.expert_hidden * self.expert_intermediate
        if self.expert_bias:
            n += (2 if self.gated else 1) * self.expert_intermediate + self.expert_hidden
        return n

    @property
    def routed_expert_params(self) -> int:
        return self.expert_params * self.num_experts * len(self.moe_layers)

    def count(self, mixer: str) -> int:
        return sum(1 for m, _ in self.layers if m == mixer)

    # ---- weights -------------------------------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """Every text-model weight tensor (routed experts as per-expert 2-D matrices)."""
        H, out = self.hidden_size, []
        out.append(Tensor("embed", (self.vocab_size, H)))
        if not self.tie_word_embeddings:
            out.append(Tensor("lm_head", (self.vocab_size, H), linear=False))
        out.append(Tensor("norm", (H,)))  # final norm
        n_layers = self.num_layers
        out.append(Tensor("norm", (H,), n_layers * self.norms_per_layer))
        for mixer in ("full", "sliding", "mla"):
            n = self.count(mixer)
            if n:
                out += self._attention_tensors(n)
        if self.count("linear"):
            out += self._deltanet_tensors(self.count("linear"))
        if self.count("mamba"):
            out += self._mamba_tensors(self.count("mamba"))
        n_dense = sum(1 for _, m in self.layers if m == "dense")
        if n_dense:
            I = self.dense_intermediate
            out.append(Tensor("dense_mlp", (I, H), n_dense * (2 if self.gated else 1), linear=True))
            out.append(Tensor("dense_mlp", (H, I), n_dense, linear=True))
        n_moe = len(self.moe_layers)
        if n_moe:
            out.append(Tensor("router", (self.num_experts, H), n_moe))
            if self.router_bias:
                out.append(Tensor("router", (self.num_experts,), n_moe))
            if self.correction_bias:
                out.append(Tensor("router", (self.num_experts,), n_moe, f32=True))
            if self.shared_intermediate:
                S = self.shared_intermediate
                out.append(Tensor("shared_expert", (S, H), n_moe * (2 if self.gated else 1), linear=True))
                out.append(Tensor("shared_expert", (H, S), n_moe, linear=True))
                if self.shared_gate:
                    out.append(Tensor("shared_expert", (1, H), n_moe))
            if self.moe_latent:
                out.append(Tensor("shared_expert", (self.moe_latent, H), n_moe, linear=True))
                out.append(Tensor("shared_expert", (H, self.moe_latent), n_moe, linear=True))
            I, E, X = self.expert_intermediate, self.num_experts, self.expert_hidden
            out.append(Tensor(ROUTED, (I, X), n_moe * E * (2 if self.gated else 1), linear=True))
            out.append(Tensor(ROUTED, (X, I), n_moe * E, linear=True))
            if self.expert_bias:
                out.append(Tensor(ROUTED, ((2 if self.gated else 1) * I,), n_moe * E))
                out.append(Tensor(ROUTED, (X,), n_moe * E))
        if self.extra_params:
            out.append(Tensor("extra", (self.extra_params,)))
        return out

    def _attention_tensors(self, n: int) -> list[Tensor]:
        H, nh = self.hidden_size, self.num_heads
        if self.kv_lora_rank:  # MLA (DeepSeek-V3, Kimi, GLM-4.7-Flash)
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            t = []
            if self.q_lora_rank:
                t += [Tensor("attention", (self.q_lora_rank, H), n, linear=True),
                      Tensor("norm", (self.q_lora_rank,), n),
                      Tensor("attention", (nh * qk, self.q_lora_rank), n, linear=True)]
            else:
                t.append(Tensor("attention", (nh * qk, H), n, linear=True))
            t += [Tensor("attention", (self.kv_lora_rank + self.qk_rope_head_dim, H), n, linear=True),
                  Tensor("norm", (self.kv_lora_rank,), n),
                  Tensor("attention", (nh * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank), n,
                         linear=True),
                  Tensor("attention", (H, nh * self.v_head_dim), n, linear=True)]
            return t
        hd, kv = self.head_dim, self.num_kv_heads
        q_out = nh * hd * (2 if self.attn_output_gate else 1)
        t = [Tensor("attention", (q_out, H), n, linear=True),
             Tensor("attention", (kv * hd, H), 2 * n, linear=True),
             Tensor("attention", (H, nh * hd), n, linear=True)]
        if self.attention_bias:
            t += [Tensor("attention", (q_out,), n), Tensor("attention", (kv * hd,), 2 * n)]
            if self.model_type == "gpt_oss":
                t.append(Tensor("attention", (H,), n))  # o_proj bias
        if self.attention_sinks:
            t.append(Tensor("attention", (nh,), n))
        if self.qk_norm == "head":
            t.append(Tensor("norm", (hd,), 2 * n))
        elif self.qk_norm == "full":
            t += [Tensor("norm", (nh * hd,), n), Tensor("norm", (kv * hd,), n)]
        return t

    def _deltanet_tensors(self, n: int) -> list[Tensor]:
        H = self.hidden_size
        kd, vd = self.lin_k_heads * self.lin_k_dim, self.lin_v_heads * self.lin_v_dim
        conv_dim = 2 * kd + vd
        if self.lin_split_proj:
            t = [Tensor("linear_attention", (conv_dim, H), n, linear=True),
                 Tensor("linear_attention", (vd, H), n, linear=True),
                 Tensor("linear_attention", (self.lin_v_heads, H), 2 * n, linear=True)]
        else:
            t = [Tensor("linear_attention", (conv_dim + vd, H), n, linear=True),
                 Tensor("linear_attention", (2 * self.lin_v_heads, H), n, linear=True)]
        return t + [Tensor("linear_attention", (conv_dim, 1, self.conv_kernel), n),
                    Tensor("linear_attention", (self.lin_v_heads,), 2 * n),  # dt_bias, A_log
                    Tensor("norm", (self.lin_v_dim,), n),
                    Tensor("linear_attention", (H, vd), n, linear=True)]

    def _mamba_tensors(self, n: int) -> list[Tensor]:
        H, nh = self.hidden_size, self.mamba_heads
        d_inner = nh * self.mamba_head_dim
        conv_dim = d_inner + 2 * self.mamba_groups * self.ssm_state
        return [Tensor("mamba", (d_inner + conv_dim + nh, H), n, linear=True),
                Tensor("mamba", (conv_dim, 1, self.conv_kernel), n), Tensor("mamba", (conv_dim,), n),
                Tensor("mamba", (nh,), 3 * n),  # dt_bias, A_log, D
                Tensor("norm", (d_inner,), n),
                Tensor("mamba", (H, d_inner), n, linear=True)]

    def params(self, roles: set[str] | frozenset[str] | None = None) -> int:
        return sum(t.numel * t.count for t in self.tensors() if roles is None or t.role in roles)

    # ---- cache -------------------------------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype_bytes: float, tp: int = 1) -> float:
        """KV bytes per context token on one TP rank, over the layers whose cache grows with context."""
        if self.kv_lora_rank:  # MLA caches the latent and the rope key, replicated on every rank
            return self.count("mla") * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        kv_heads = max(1, math.ceil(self.num_kv_heads / tp))
        per_layer = 2 * kv_heads * self.head_dim * dtype_bytes
        n = self.count("full") + (self.count("sliding") if not self.sliding_window else 0)
        return n * per_layer

    def state_bytes_per_seq(self, dtype_bytes: float, context: int, tp: int = 1) -> float:
        """Per-sequence cache that does not grow with context: sliding windows, DeltaNet and Mamba states."""
        total = 0.0
        if self.sliding_window and self.count("sliding"):
            kv_heads = max(1, math.ceil(self.num_kv_heads / tp))
            total += self.count("sliding") * 2 * kv_heads * self.head_dim * dtype_bytes * min(context,
                                                                                               self.sliding_window)
        if self.count("linear"):
            vh = max(1, self.lin_v_heads // tp)
            conv = (2 * self.lin_k_heads * self.lin_k_dim + self.lin_v_heads * self.lin_v_dim) // tp
            total += self.count("linear") * (vh * self.lin_k_dim * self.lin_v_dim * 4  # fp32 recurrent state
                                             + conv * (self.conv_kernel - 1) * 2)
        if self.count("mamba"):
            nh = max(1, self.mamba_heads // tp)
            conv = (nh * self.mamba_head_dim + 2 * self.mamba_groups * self.ssm_state) // max(1, tp)
            total += self.count("mamba") * (nh * self.mamba_head_dim * self.ssm_state * 4
                                            + conv * (self.conv_kernel - 1) * 2)
        return total

    # ---- arithmetic ----------------------------------------------------------------------------------------
    def attention_flops_per_token(self, position: float) -> float:
        """FLOPs of score and value products for one token attending to `position` earlier tokens (all layers)."""
        if self.kv_lora_rank:
            d = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
            return 2 * self.count("mla") * self.num_heads * d * position
        d = 2 * self.head_dim
        full = self.count("full") * position
        sliding = self.count("sliding") * min(position, self.sliding_window or position)
        rec = self.count("linear") * 4 * self.lin_v_heads * self.lin_k_dim * self.lin_v_dim / max(1, position) \
            + self.count("mamba") * 4 * self.mamba_heads * self.mamba_head_dim * self.ssm_state / max(1, position)
        return 2 * self.num_heads * d * (full + sliding) + 2 * rec * position

    def summary(self) -> dict[str, Any]:
        mixers = {m: self.count(m) for m in ("full", "sliding", "mla", "linear", "mamba") if self.count(m)}
        return {
            "model_type": self.model_type, "layers": self.num_layers, "moe_layers": len(self.moe_layers),
            "hidden_size": self.hidden_size, "num_experts": self.num_experts, "top_k": self.top_k,
            "expert_intermediate": self.expert_intermediate, "shared_intermediate": self.shared_intermediate,
            "mixers": mixers, "vocab_size": self.vocab_size,
            "total_params": self.params(), "routed_expert_params": self.routed_expert_params,
        }


# ---- config.json -> ModelShape ---------------------------------------------------------------------------------
def _g(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _text(config: dict) -> dict:
    tc = config.get("text_config")
    if isinstance(tc, dict) and tc:
        merged = dict(tc)
        merged.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
        merged["_outer_model_type"] = config.get("model_type")
        return merged
    return config


def _moe_every(n: int, cfg: dict) -> list[str]:
    """Qwen-style: decoder_sparse_step and mlp_only_layers."""
    step, only = int(_g(cfg, "decoder_sparse_step", default=1)), set(_g(cfg, "mlp_only_layers", default=[]))
    return ["moe" if i not in only and (i + 1) % step == 0 else "dense" for i in range(n)]


def _common(cfg: dict) -> dict:
    H = int(cfg["hidden_size"])
    nh = int(_g(cfg, "num_attention_heads", default=0))
    return dict(
        hidden_size=H, vocab_size=int(cfg["vocab_size"]), num_heads=nh,
        num_kv_heads=int(_g(cfg, "num_key_value_heads", default=nh)),
        head_dim=int(_g(cfg, "head_dim", default=(H // nh if nh else 0))),
        tie_word_embeddings=bool(_g(cfg, "tie_word_embeddings", default=False)),
        attention_bias=bool(_g(cfg, "attention_bias", default=False)),
        max_positions=int(_g(cfg, "max_position_embeddings", default=0)),
    )


def _layer_types(cfg: dict, n: int, default: str = "full") -> list[str]:
    lt = cfg.get("layer_types")
    if lt:
        table = {"full_attention": "full", "linear_attention": "linear", "sliding_attention": "sliding"}
        return [table.get(x, default) for x in lt]
    interval = cfg.get("full_attention_interval")
    if interval:
        return ["full" if (i + 1) % int(interval) == 0 else "linear" for i in range(n)]
    return [default] * n


def from_config(config: dict) -> ModelShape:
    """Read a config.json dict (or a recipe's `architecture`). Raises UnsupportedArchitecture for other families."""
    cfg = _text(config)
    mt = str(cfg.get("model_type") or config.get("model_type") or "")
    mt = {"qwen3_5_moe_text": "qwen3_5_moe", "qwen3_vl_moe_text": "qwen3_vl_moe", "glm4v_moe_text": "glm4v_moe",
          "gemma4_text": "gemma4"}.get(mt, mt)
    if mt not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"model_type {mt!r} has no shape model for planning",
            f"supported: {', '.join(SUPPORTED)}; or plan from a recipe with `--recipe`",
        )
    try:
        return _from_text_config(mt, cfg, config)
    except (KeyError, TypeError, ValueError) as e:
        raise UnsupportedArchitecture(
            f"config.json for {mt!r} lacks or mangles a field the planner needs ({e!r})",
            "check that config.json is the model's own, complete file",
        ) from None


def _from_text_config(mt: str, cfg: dict, outer: dict) -> ModelShape:
    blocks = cfg.get("layers_block_type") or cfg.get("hybrid_override_pattern")
    n = int(cfg.get("num_hidden_layers") or len(blocks))
    c = _common(cfg)
    extra = int(outer.get("extra_params", 0) or 0)
    if mt in ("qwen3_moe", "qwen2_moe", "qwen3_vl_moe"):
        E = int(_g(cfg, "num_experts", "num_local_experts"))
        mlp = _moe_every(n, cfg)
        shared = int(_g(cfg, "shared_expert_intermediate_size", default=0)) if mt == "qwen2_moe" else 0
        return ModelShape(
            model_type=mt, layers=tuple(("full", m) for m in mlp), num_experts=E,
            top_k=int(cfg["num_experts_per_tok"]), expert_intermediate=int(cfg["moe_intermediate_size"]),
            shared_intermediate=shared, shared_gate=bool(shared), dense_intermediate=int(_g(cfg, "intermediate_size", default=0)),
            qk_norm="none" if mt == "qwen2_moe" else "head",
            **{**c, "attention_bias": c["attention_bias"] or (mt == "qwen2_moe" and cfg.get("qkv_bias", True))},
            extra_params=extra, config=outer)
    if mt in ("qwen3_next", "qwen3_5_moe"):
        mixers = _layer_types(cfg, n, "full")
        mlp = _moe_every(n, cfg) if mt == "qwen3_next" else ["moe"] * n
        return ModelShape(
            model_type=mt, layers=tuple(zip(mixers, mlp)), num_experts=int(cfg["num_experts"]),
            top_k=int(cfg["num_experts_per_tok"]), expert_intermediate=int(cfg["moe_intermediate_size"]),
            shared_intermediate=int(_g(cfg, "shared_expert_intermediate_size", default=0)), shared_gate=True,
            dense_intermediate=int(_g(cfg, "intermediate_size", default=0)), attn_output_gate=True, qk_norm="head",
            lin_k_heads=int(cfg["linear_num_key_heads"]), lin_v_heads=int(cfg["linear_num_value_heads"]),
            lin_k_dim=int(cfg["linear_key_head_dim"]), lin_v_dim=int(cfg["linear_value_head_dim"]),
            conv_kernel=int(_g(cfg, "linear_conv_kernel_dim", default=4)), lin_split_proj=mt == "qwen3_5_moe",
            **c, extra_params=extra, config=outer)
    if mt in ("mixtral", "minimax_m2"):
        minimax = mt == "minimax_m2"
        return ModelShape(
            model_type=mt, layers=tuple(("full", "moe") for _ in range(n)), num_experts=int(cfg["num_local_experts"]),
            top_k=int(cfg["num_experts_per_tok"]), expert_intermediate=int(cfg["intermediate_size"]),
            correction_bias=minimax and bool(_g(cfg, "use_routing_bias", default=True)),
            qk_norm="full" if minimax and _g(cfg, "use_qk_norm", default=True) else "none",
            **c, extra_params=extra, config=outer)
    if mt in ("deepseek_v3", "kimi_k2", "kimi_k25", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm46v"):
        first_dense = int(_g(cfg, "first_k_dense_replace", default=0))
        freq = int(_g(cfg, "moe_layer_freq", default=1))
        mlp_types = cfg.get("mlp_layer_types")
        if mlp_types:
            mlp = ["moe" if x == "sparse" else "dense" for x in mlp_types]
        else:
            mlp = ["moe" if i >= first_dense and i % freq == 0 else "dense" for i in range(n)]
        mla = bool(_g(cfg, "kv_lora_rank", default=0))
        E = int(_g(cfg, "n_routed_experts", "num_experts"))
        I = int(cfg["moe_intermediate_size"])
        kw = dict(c)
        if mla:
            kw.update(q_lora_rank=int(_g(cfg, "q_lora_rank", default=0) or 0), kv_lora_rank=int(cfg["kv_lora_rank"]),
                      qk_rope_head_dim=int(cfg["qk_rope_head_dim"]), qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
                      v_head_dim=int(cfg["v_head_dim"]))
        glm = mt.startswith("glm4")
        return ModelShape(
            model_type=mt, layers=tuple(("mla" if mla else "full", m) for m in mlp), num_experts=E,
            top_k=int(cfg["num_experts_per_tok"]), expert_intermediate=I,
            shared_intermediate=I * int(_g(cfg, "n_shared_experts", default=0)),
            dense_intermediate=int(cfg["intermediate_size"]), correction_bias=True,
            qk_norm="head" if glm and not mla and _g(cfg, "use_qk_norm", default=False) else "none",
            **kw, extra_params=extra, config=outer)
    if mt == "gpt_oss":
        mixers = _layer_types(cfg, n, "full")
        return ModelShape(
            model_type=mt, layers=tuple((m, "moe") for m in mixers), num_experts=int(cfg["num_local_experts"]),
            top_k=int(_g(cfg, "num_experts_per_tok", "experts_per_token")),
            expert_intermediate=int(cfg["intermediate_size"]), expert_bias=True, router_bias=True,
            attention_sinks=True, sliding_window=int(_g(cfg, "sliding_window", default=128)),
            **{**c, "attention_bias": True}, extra_params=extra, config=outer)
    if mt == "nemotron_h":
        blocks = cfg.get("layers_block_type")
        if not blocks:
            pat = cfg["hybrid_override_pattern"]
            blocks = [{"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}[ch] for ch in pat]
        table = {"mamba": ("mamba", "none"), "linear_attention": ("mamba", "none"), "moe": ("none", "moe"),
                 "attention": ("full", "none"), "full_attention": ("full", "none"), "mlp": ("none", "dense")}
        layers = tuple(table[b] for b in blocks)
        return ModelShape(
            model_type=mt, layers=layers, num_experts=int(cfg["n_routed_experts"]),
            top_k=int(cfg["num_experts_per_tok"]), expert_intermediate=int(cfg["moe_intermediate_size"]),
            gated=False, correction_bias=True, moe_latent=int(_g(cfg, "moe_latent_size", default=0) or 0),
            shared_intermediate=int(_g(cfg, "moe_shared_expert_intermediate_size", default=0))
            * max(1, int(_g(cfg, "n_shared_experts", default=1))),
            dense_intermediate=int(_g(cfg, "intermediate_size", default=0)),
            mamba_heads=int(cfg["mamba_num_heads"]), mamba_head_dim=int(cfg["mamba_head_dim"]),
            ssm_state=int(cfg["ssm_state_size"]), mamba_groups=int(cfg["n_groups"]),
            conv_kernel=int(_g(cfg, "conv_kernel", default=4)), norms_per_layer=1,
            **c, extra_params=extra, config=outer)
    if mt == "gemma4":
        mixers = _layer_types(cfg, n, "full")
        return ModelShape(
            model_type=mt, layers=tuple((m, "moe") for m in mixers), num_experts=int(cfg["num_experts"]),
            top_k=int(cfg["top_k_experts"]), expert_intermediate=int(cfg["moe_intermediate_size"]),
            shared_intermediate=int(cfg["intermediate_size"]),  # the dense MLP that runs beside the experts
            sliding_window=int(_g(cfg, "sliding_window", default=1024)), qk_norm="head", norms_per_layer=4,
            **c, extra_params=extra, config=outer)
    raise UnsupportedArchitecture(f"model_type {mt!r} has no shape model for planning", f"supported: {SUPPORTED}")
