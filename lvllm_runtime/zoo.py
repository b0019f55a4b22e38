"""Tiny random MoE checkpoints on disk, one per architecture the installed transformers has, in BF16, DeepSeek-style
FP8 block and compressed-tensors INT4 `pack-quantized`, each with a small trained byte-level BPE tokenizer and a
ChatML chat template, so transformers and vLLM load them offline. Used by `lvllm demo`, tests and benches.

Deterministic given the seed: the same call writes the same bytes. A build goes to a temp directory that is renamed
into place after its completion marker is written, so `build` on an existing output returns it at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from . import envs
from .arch import MoEModel, resolve
from .atomic import write_json
from .errors import BadInput

VARIANTS = ("bf16", "fp8", "int4")
MARKER = ".lvllm-zoo.json"  # written last; its presence means the directory is complete
VOCAB = 512
# ids 0..6; the vision ones let multimodal configs (qwen3_5_moe) point their token ids into the vocab
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COMMON = dict(
    hidden_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    vocab_size=VOCAB,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rms_norm_eps=1e-6,
)

_EXPERTS = dict(num_experts_per_tok=2)  # 8 experts top-2 everywhere; each family names the count its own way
_DEEPSEEK_ROUTING = dict(n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)

_VISION_TOKENS = dict(
    vision_start_token_id=3, vision_end_token_id=4, image_token_id=5, video_token_id=6, tie_word_embeddings=False
)

# model_type -> config keyword arguments of the tiny model (on top of _COMMON; multimodal families: of the
# text_config). 8 experts, top-2, expert I = 128 everywhere.
ZOO: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        _EXPERTS, num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        _EXPERTS, num_hidden_layers=3, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
        shared_expert_intermediate_size=256, mlp_only_layers=[0], norm_topk_prob=False,
    ),
    "mixtral": dict(_EXPERTS, num_hidden_layers=2, intermediate_size=128, num_local_experts=8),
    "deepseek_v3": dict(
        **_EXPERTS, **_DEEPSEEK_ROUTING, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=256,
        moe_intermediate_size=128, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
        v_head_dim=64, num_key_value_heads=2, head_dim=32, norm_topk_prob=True,
    ),
    "glm4_moe": dict(
        **_EXPERTS, **_DEEPSEEK_ROUTING, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=256,
        moe_intermediate_size=128, use_qk_norm=True, norm_topk_prob=True,
    ),
    "glm4_moe_lite": dict(
        **_EXPERTS, **_DEEPSEEK_ROUTING, num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
        intermediate_size=256, moe_intermediate_size=128, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32,
        qk_nope_head_dim=32, v_head_dim=64, num_key_value_heads=2, head_dim=32, norm_topk_prob=True,
    ),
    "minimax_m2": dict(
        _EXPERTS, num_hidden_layers=2, intermediate_size=128, num_local_experts=8, scoring_func="sigmoid",
        use_routing_bias=True, rotary_dim=32,
    ),
    "qwen3_next": dict(
        _EXPERTS, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], intermediate_size=256,
        moe_intermediate_size=128, num_experts=8, shared_expert_intermediate_size=128, linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=64, norm_topk_prob=True,
    ),
    "gpt_oss": dict(
        _EXPERTS, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=128,
        intermediate_size=128, num_local_experts=8,
    ),
    "nemotron_h": dict(
        _EXPERTS, layers_block_type=["linear_attention", "moe", "full_attention", "moe"], intermediate_size=256,
        n_routed_experts=8, n_group=2, topk_group=1, routed_scaling_factor=2.5, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=128, mamba_num_heads=4, mamba_head_dim=64, ssm_state_size=16,
        n_groups=2, chunk_size=64,
    ),
    # multimodal checkpoint with a one-block vision tower, as on the hub; the text model is the MoE
    "qwen3_5_moe": dict(
        text_config=dict(
            **_EXPERTS, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
            moe_intermediate_size=128, num_experts=8, shared_expert_intermediate_size=128, linear_num_key_heads=2,
            linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=64,
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                           num_position_embeddings=64),
        **_VISION_TOKENS,
    ),
    # H=384 (not I or 2I): transformers tells the hub's transposed experts from its own layout by shape alone
    "qwen3_vl_moe": dict(
        text_config=dict(
            **_EXPERTS, num_hidden_layers=2, hidden_size=384, num_attention_heads=6, intermediate_size=256,
            moe_intermediate_size=128, num_experts=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=384,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **_VISION_TOKENS,
    ),
    "glm4v_moe": dict(
        text_config=dict(
            **_EXPERTS, **_DEEPSEEK_ROUTING, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=256,
            moe_intermediate_size=128, norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                           image_size=56, patch_size=14),
        image_start_token_id=3, image_end_token_id=4, video_start_token_id=3, video_end_token_id=4,
        image_token_id=5, video_token_id=6, tie_word_embeddings=False,
    ),
    # DeepSeek-V3 text model under a one-block MoonViT; save_pretrained writes the hub's llava-style names
    # (language_model.model.*, fused vision wqkv) but for the two fixed by _HUB_RENAMES
    "kimi_k25": dict(
        text_config=dict(
            model_type="deepseek_v3", **_EXPERTS, **_DEEPSEEK_ROUTING, num_hidden_layers=3, first_k_dense_replace=1,
            intermediate_size=256, moe_intermediate_size=128, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32,
            qk_nope_head_dim=32, v_head_dim=64, num_key_value_heads=2, head_dim=32, norm_topk_prob=True,
        ),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           pos_emb_height=8, pos_emb_width=8),
        projection_hidden_size=64, vision_start_token_id=3, vision_end_token_id=4, image_token_id=5, video_token_id=6,
        tie_word_embeddings=False,
    ),
    "gemma4": dict(
        text_config=dict(
            num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=128,
            intermediate_size=256, enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=128,
            hidden_size_per_layer_input=0, global_head_dim=64, tie_word_embeddings=True,
        ),
        tie_word_embeddings=True,
    ),
}


# arch.py families the zoo does not build, and why
NOT_IN_ZOO = {
    "kimi_k2": "transformers has no kimi_k2 model type (the hub config runs DeepSeek-V3 code); the deepseek_v3 model "
    "has the same layout",
}
# (old prefix, new prefix) of tensor names save_pretrained writes unlike the hub: transformers 5.19 turns kimi_k25's
# text `layers` into `blocks` with the vision tower's rename
_HUB_RENAMES = {"kimi_k25": (("language_model.model.blocks.", "language_model.model.layers."),)}


def _config(model_type: str, overrides: dict) -> Any:
    from transformers import AutoConfig

    if model_type not in ZOO:
        raise BadInput(f"the zoo has no {model_type!r} model", f"choose one of: {', '.join(sorted(ZOO))}")
    spec = ZOO[model_type]
    if "text_config" in spec:  # overrides go to the language model
        return AutoConfig.for_model(model_type, **{**spec, "text_config": {**_COMMON, **spec["text_config"], **overrides}})
    return AutoConfig.for_model(model_type, **{**_COMMON, **spec, **overrides})


def auto_class(model_type: str) -> Any:
    """The transformers Auto class that builds and loads `model_type` zoo checkpoints."""
    import transformers

    multimodal = "text_config" in ZOO.get(model_type, {})
    return transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM


def variants(model_type: str) -> tuple[str, ...]:
    """The variants `build` writes for `model_type`: fused-expert families (hub layout unverified when quantized)
    and families with hub renames (transformers maps `.weight` back on load, not compressed-tensors' `.weight_packed`:
    a kimi_k25 int4 checkpoint loads with empty packed weights) come in bf16 only."""
    fused = resolve(_config(model_type, {}).to_dict()).layout == "fused"
    return ("bf16",) if fused or model_type in _HUB_RENAMES else VARIANTS


def _randomize(model: Any, seed: int) -> None:
    """Non-degenerate random weights: transformers' own init for the rest, then std 0.05 for every matrix and
    expert tensor, std 0.1 routers (so routing differs per token), norms +- noise, small random biases and random
    selection biases (so the correction bias visibly changes the choice)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 2)
            if name.endswith("e_score_correction_bias"):
                t.copy_(noise * 0.1)
            elif name.endswith("bias"):
                t.copy_(noise * 0.02)
            elif name.endswith(("router.per_expert_scale", "router.scale")):  # gemma4 routing scales
                t.copy_(1 + noise * 0.2)
            elif "norm" in name and t.dim() == 1:
                t.add_(noise * 0.05)
            elif leaf[-2:] in (["gate", "weight"], ["router", "weight"]) or name.endswith("router.proj.weight"):
                t.copy_(noise * 0.1)
            elif t.dim() == 2 and name.endswith(".weight") or "experts" in name and t.dim() == 3:
                t.copy_(noise * 0.05)


def make_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """The in-memory tiny model (bf16 weights, eval mode) that `build` saves; tests compare loaded checkpoints with
    it."""
    import torch

    config = _config(model_type, overrides)
    torch.manual_seed(seed)
    model = auto_class(model_type).from_config(config, dtype=torch.bfloat16)  # bf16 here keeps rope buffers fp32
    _randomize(model, seed)
    return model.eval()


def train_tokenizer() -> Any:
    """A byte-level BPE tokenizer (vocab VOCAB) trained on the bundled text; special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (Path(__file__).with_name("zoo_text.txt")).read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return tok


def _write_tokenizer(out: Path) -> None:
    train_tokenizer().save(str(out / "tokenizer.json"))
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": 4096,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(out / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def build(
    model_type: str,
    out_dir: str | os.PathLike,
    variant: str = "bf16",
    seed: int = 0,
    *,
    group_size: int | None = None,
    **overrides: Any,
) -> Path:
    """Write the tiny `model_type` checkpoint in `variant` to `out_dir` and return it (a no-op when out_dir already
    holds this exact build; another zoo build there is replaced, any other content refused). Files: config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json (with the chat template), special_tokens_map.json, and the completion marker.

    `overrides` are config keys of the (text) model. `group_size` (int4 only): the INT4 group; default the largest
    of 128/64/32 dividing H and I/2, so that the checkpoint passes into a 2-node store unchanged (64 for the zoo).
    """
    if variant not in VARIANTS:
        raise BadInput(f"unknown zoo variant {variant!r}", f"choose one of: {', '.join(VARIANTS)}")
    if group_size is not None and variant != "int4":
        raise BadInput(f"group_size applies to the int4 variant, not {variant}", "drop group_size")
    out = Path(out_dir)
    spec = {"model_type": model_type, "variant": variant, "seed": seed, "group_size": group_size,
            "overrides": overrides, "zoo_version": 2}
    if (out / MARKER).is_file():
        if _read_marker(out) == spec:
            return out
        # otherwise an older or different zoo build: regenerable, replaced below once the new one is complete
    elif out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not a zoo build", "remove it or choose another directory")
    _config(model_type, overrides)  # unknown model_type: fail before any work
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(model_type, tmp, variant, seed, group_size, overrides)
        write_json(tmp / MARKER, spec)
        if out.exists():
            shutil.rmtree(out) if (out / MARKER).is_file() else out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# A shared direction added to every token embedding (x its mean row norm) and the logit boost the favoured experts'
# router rows get along the router input's mean: measured on qwen3_moe, 2 favoured experts of 8 take 77-88% of each
# layer's picks over zoo_text lines the calibration did not see (offset 1, boost 2: 92-96%; the rest is what a plan's
# hit-rate forecast has to get right).
SKEW_OFFSET, SKEW_BOOST = 0.5, 2.5


def skewed_experts(layer: int, num_experts: int, hot: int) -> list[int]:
    """The `hot` experts `build_skewed` favours in MoE layer `layer` (another set in each layer)."""
    return sorted({(3 * layer + j * (num_experts // hot)) % num_experts for j in range(hot)})


def build_skewed(model_type: str, out_dir: str | os.PathLike, hot: int = 2, seed: int = 0) -> Path:
    """The bf16 `build` of `model_type`, with routing skewed so that `skewed_experts(layer, E, hot)` take most picks
    of each MoE layer (the plain zoo routes uniformly, so hot experts cannot show their value on it).

    Routers see normalised hidden states with no common direction a row could favour, so the embeddings get one
    (a shared vector), then layer by layer, over the first lines of zoo_text.txt: every router row loses its component
    along the router input's mean and the favoured rows gain SKEW_BOOST logits along it. Same bytes for the same
    arguments."""
    out = Path(out_dir)
    spec = {"model_type": model_type, "variant": "bf16", "seed": seed, "zoo_version": 2,
            "skew": {"hot": hot, "offset": SKEW_OFFSET, "boost": SKEW_BOOST}}
    if _read_marker(out) == spec:
        return out
    if out.exists() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not a zoo build", "remove it or choose another directory")
    tmp = out.with_name(f".{out.name}.skew-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(model_type, tmp, "bf16", seed)
        skew_routing(tmp, hot, seed)
        write_json(tmp / MARKER, spec)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def skew_routing(out: Path, hot: int, seed: int = 0) -> None:
    """Rewrite the embedding and router tensors of the single-file checkpoint in `out` in place so that
    `skewed_experts(layer, E, hot)` take most picks (see build_skewed; benches may skew a bigger checkpoint)."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((out / "config.json").read_text())
    model_type, moe = config["model_type"], resolve(config)
    if not 0 < hot < moe.num_experts:
        raise BadInput(f"hot={hot} favoured experts of {moe.num_experts}", f"pass 1..{moe.num_experts - 1}")
    model = auto_class(model_type).from_pretrained(out, dtype=torch.float32).eval()
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    tok = train_tokenizer()
    lines = [line for line in Path(__file__).with_name("zoo_text.txt").read_text().splitlines() if line.strip()]
    text = torch.tensor([tok.encode(line).ids[:32] for line in lines[:16] if len(tok.encode(line).ids) >= 32])
    changed = []
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        shared = torch.randn(emb.shape[1], generator=gen)
        emb += shared / shared.norm() * emb.norm(dim=1).mean() * SKEW_OFFSET
        changed.append(names[id(emb)])
        for layer in moe.moe_layers:
            name = moe.router_name(layer)
            router = model.get_submodule(name.removesuffix(".weight"))
            seen = []
            hook = router.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
            model(text)
            hook.remove()
            mean = seen[0].mean(0)
            w = router.weight
            w -= torch.outer(w @ mean, mean) / mean.dot(mean)
            w[skewed_experts(layer, moe.num_experts, hot)] += SKEW_BOOST * mean / mean.dot(mean)
            changed.append(names[id(w)])
    missing = [n for n in changed if n not in tensors]
    if missing:
        raise BadInput(f"{model_type} keeps {missing[0]} under another name on disk", "skew qwen3_moe or mixtral")
    for n in changed:
        tensors[n] = dict(model.named_parameters())[n].detach().to(tensors[n].dtype).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write(model_type: str, out: Path, variant: str, seed: int, group_size: int | None, overrides: dict) -> None:
    """config.json and generation_config.json as save_pretrained writes them; model.safetensors in hub layout."""
    import torch
    from safetensors.torch import load_file, save_file

    model = make_model(model_type, seed, **overrides)
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    moe = resolve(config)
    if moe.layout == "fused" and variant != "bf16":
        raise BadInput(f"the zoo writes {model_type} (fused experts) in bf16 only", "quantize it with `lvllm quantize`")
    tensors = load_file(out / "model.safetensors")
    for old, new in _HUB_RENAMES.get(model_type, ()):
        tensors = {new + k[len(old):] if k.startswith(old) else k: v for k, v in tensors.items()}
    layer = moe.moe_layers[0]
    hub_names = moe.fused_names(layer).values() if moe.layout == "fused" else [
        n + ".weight" for n in moe.expert_names(layer, 0).values()]
    if not all(n in tensors for n in hub_names):
        # save_pretrained splits experts these hub checkpoints keep fused, as they are in memory
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    for layer in moe.moe_layers if moe.fused_transposed else ():
        names = moe.fused_names(layer)
        if tensors[names["gate_up"]].shape[-1] == moe.hidden_size:  # memory [E, 2I, H]; the hub keeps [E, H, 2I]
            for name in names.values():
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
    for name in tensors:
        if name.endswith("e_score_correction_bias"):  # F32 on disk in DeepSeek / GLM / MiniMax releases
            tensors[name] = tensors[name].to(torch.float32)
    if variant == "fp8":
        tensors, config["quantization_config"] = quantize_fp8(tensors, moe)
    elif variant == "int4":
        tensors, config["quantization_config"] = quantize_int4(tensors, moe, int4_group(moe, group_size))
    if variant != "bf16":
        write_json(out / "config.json", config)
    (out / "model.safetensors").unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # save_file creates it 0600; the other files are 0644
    write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 0, "max_new_tokens": 64},
    )
    _write_tokenizer(out)


def demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny BF16 qwen3_moe model `lvllm demo` serves, built once into the cache directory."""
    root = Path(cache_dir) if cache_dir is not None else envs.cache_dir()
    return build("qwen3_moe", root / "zoo" / "qwen3_moe-bf16-s0", "bf16", seed=0)


# --- quantized variants, computed here from the BF16 tensors --------------------------------------------------

FP8_BLOCK = 128
FP8_MAX = 448.0


# Linear layers outside what DeepSeek's FP8 release quantizes: linear attention (qwen3_next), Mamba mixers, vision.
_FP8_SKIP = re.compile(r"\.linear_attn\.|\.mixer\.(in_proj|out_proj)$|\bvisual\.|\bvision_tower\.|\bmm_projector\.")


def _linear_weights(tensors: dict, moe: MoEModel) -> list[str]:
    """2-D Linear weights DeepSeek's FP8 release quantizes: attention projections, dense/shared/routed MLPs; not
    embeddings, lm_head, norms, routers, shared-expert gates, linear attention, Mamba or vision towers."""
    routers = {moe.router_name(L) for L in moe.moe_layers}
    keep = []
    for name, t in tensors.items():
        if t.dim() != 2 or not name.endswith(".weight") or name in routers:
            continue
        module = name[: -len(".weight")]
        if module.endswith(("embed_tokens", "embeddings", "lm_head", "shared_expert_gate")) or _FP8_SKIP.search(module):
            continue
        keep.append(name)
    return sorted(keep)


def _modules(names: Iterable[str]) -> list[str]:
    return sorted(n[: -len(".weight")] for n in names)


def fp8_block_quantize(w: Any) -> tuple[Any, Any]:
    """w [N, K] -> (q float8_e4m3fn [N, K], scale_inv float32 [ceil(N/128), ceil(K/128)]) with w ~ q * scale_inv
    per 128x128 block; edge blocks are zero-padded to full size before taking their amax."""
    import torch

    n, k = w.shape
    b = FP8_BLOCK
    nb, kb = math.ceil(n / b), math.ceil(k / b)
    padded = torch.zeros(nb * b, kb * b, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, b, kb, b)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * b, kb * b)[:n, :k].contiguous(), scale.contiguous()


def fp8_block_dequantize(q: Any, scale_inv: Any) -> Any:
    """(q float8_e4m3fn [N, K], scale_inv float32 [ceil(N/128), ceil(K/128)]) -> float32 [N, K]."""
    n, k = q.shape
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:n, :k]
    return q.float() * s


def quantize_fp8(tensors: dict, moe: MoEModel) -> tuple[dict, dict]:
    """DeepSeek-style block FP8: each targeted `X.weight` becomes float8_e4m3fn plus `X.weight_scale_inv`."""
    out = dict(tensors)
    targets = _linear_weights(tensors, moe)
    for name in targets:
        out[name], out[name + "_scale_inv"] = fp8_block_quantize(tensors[name])
    others = [n for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2 and n not in set(targets)]
    return out, {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "modules_to_not_convert": _modules(others),  # as Qwen's FP8 releases list them; loaders skip these
    }


def int4_group(moe: MoEModel, requested: int | None = None) -> int:
    """`requested` if it divides H and I, else the largest of 128/64/32 dividing H and I/2 (2-node splits)."""
    h, i = moe.hidden_size, moe.intermediate_size
    if requested is not None:
        if requested not in (32, 64, 128) or h % requested or i % requested:
            raise BadInput(f"INT4 group {requested} does not divide H={h} and I={i}", "use 32, 64 or 128")
        return requested
    for g in (128, 64, 32):
        if h % g == 0 and i % (2 * g) == 0:
            return g
    raise BadInput(f"H={h} / I={i} divide by no INT4 group", "use multiples of 64")


def int4_pack(w: Any, group: int) -> tuple[Any, Any]:
    """compressed-tensors pack-quantized, symmetric: w [N, K] -> (packed int32 [N, K/8], scale bf16 [N, K/group]).
    scale = amax/7.5 per group; q = clamp(round_half_even(w/scale), -8, 7) divided in bf16 as compressed-tensors
    does; u = q+8, column 8j+k in bits 4k..4k+3 of word j."""
    import torch

    n, k = w.shape
    wg = w.to(torch.bfloat16).view(n, k // group, group)
    scale = (wg.float().abs().amax(dim=2) / 7.5).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.finfo(torch.bfloat16).eps, scale)
    q = torch.round(wg / scale[:, :, None]).clamp(-8, 7).to(torch.int64).view(n, k) + 8
    words = (q.view(n, k // 8, 8) << torch.arange(0, 32, 4)).sum(dim=2)
    return (words - (words >> 31 << 32)).to(torch.int32), scale  # two's-complement wrap of the high bit


def int4_unpack(packed: Any, scale: Any, group: int) -> Any:
    """(packed int32 [N, K/8], scale bf16 [N, K/group]) -> float32 [N, K]; the inverse layout of int4_pack."""
    import torch

    n = packed.shape[0]
    u = (packed.to(torch.int64)[:, :, None] >> torch.arange(0, 32, 4)) & 15
    q = (u - 8).view(n, -1).float()
    return q * scale.float().repeat_interleave(group, dim=1)


def _expert_weights(moe: MoEModel) -> list[str]:
    """On-disk `.weight` names of every routed expert projection (per-expert layout)."""
    names = []
    for L in moe.moe_layers:
        for e in range(moe.num_experts):
            names += [base + ".weight" for base in moe.expert_names(L, e).values()]
    return names


def _ignore_pattern(module: str) -> str:
    """A compressed-tensors ignore entry for `module` that holds whatever prefix the loader uses (hub `backbone.`,
    transformers `model.`): "model.layers.3.mlp.gate" -> "re:.*mlp[backslash].gate$", "model.visual.x" ->
    "re:.*visual[backslash].x$"; "lm_head" stays."""
    if "." not in module:
        return module
    inside = re.match(r"^.*?\blayers\.\d+\.(.+)$", module)
    return "re:.*" + re.escape(inside.group(1) if inside else module.split(".", 1)[1]) + "$"


def quantize_int4(tensors: dict, moe: MoEModel, group: int) -> tuple[dict, dict]:
    """compressed-tensors W4A16 pack-quantized routed experts (`X.weight_packed`, `X.weight_scale`,
    `X.weight_shape`); everything else stays BF16 and is listed in `ignore`."""
    import torch

    experts = _expert_weights(moe)
    out = dict(tensors)
    for name in experts:
        w = out.pop(name)
        base = name[: -len(".weight")]
        out[base + ".weight_packed"], out[base + ".weight_scale"] = int4_pack(w, group)
        out[base + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    expert_set = set(experts)
    others = _modules(n for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2 and n not in expert_set)
    ignore = sorted({_ignore_pattern(m) for m in others})
    return out, {
        "config_groups": {
            "W4A16": {
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": group,
                    "num_bits": 4,
                    "observer": None,
                    "observer_kwargs": {},
                    "scale_dtype": None,
                    "strategy": "group",
                    "symmetric": True,
                    "type": "int",
                    "zp_dtype": None,
                },
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
        "version": "0.17.0",
    }
