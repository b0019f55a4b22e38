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
import shutil
from pathlib import Path
from typing import Any

from . import envs
from .arch import MoEModel, resolve
from .atomic import write_json
from .errors import BadInput

VARIANTS = ("bf16", "fp8", "int4")
MARKER = ".lvllm-zoo.json"  # written last; its presence means the directory is complete
VOCAB = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
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

# model_type -> config keyword arguments of the tiny model (on top of _COMMON). Expert I = 128 everywhere.
ZOO: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        num_hidden_layers=2,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),
}


def _config(model_type: str, overrides: dict) -> Any:
    from transformers import AutoConfig

    if model_type not in ZOO:
        raise BadInput(f"the zoo has no {model_type!r} model", f"choose one of: {', '.join(sorted(ZOO))}")
    kwargs = {**_COMMON, **ZOO[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def _randomize(model: Any, seed: int) -> None:
    """Non-degenerate random weights: transformers' own init for the rest, then std 0.05 for every matrix and
    expert tensor, std 0.1 routers (so routing differs per token), norms 1 +- noise, random selection biases."""
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
    from transformers import AutoModelForCausalLM

    config = _config(model_type, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16 here keeps rope buffers fp32
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


def _spec(model_type: str, variant: str, seed: int, overrides: dict) -> dict:
    return {"model_type": model_type, "variant": variant, "seed": seed, "overrides": overrides, "zoo_version": 1}


def build(model_type: str, out_dir: str | os.PathLike, variant: str = "bf16", seed: int = 0, **overrides: Any) -> Path:
    """Write the tiny `model_type` checkpoint in `variant` to `out_dir` and return it (a no-op when out_dir already
    holds this exact build). Files: config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json (with the chat template), special_tokens_map.json, and the completion marker."""
    if variant not in VARIANTS:
        raise BadInput(f"unknown zoo variant {variant!r}", f"choose one of: {', '.join(VARIANTS)}")
    out = Path(out_dir)
    spec = _spec(model_type, variant, seed, overrides)
    if (out / MARKER).is_file():
        if json.loads((out / MARKER).read_text()) == spec:
            return out
        raise BadInput(f"{out} holds a different zoo build", "remove it or choose another directory")
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not a zoo build", "remove it or choose another directory")
    _config(model_type, overrides)  # unknown model_type: fail before any work
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(model_type, tmp, variant, seed, overrides)
        write_json(tmp / MARKER, spec)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(model_type: str, out: Path, variant: str, seed: int, overrides: dict) -> None:
    model = make_model(model_type, seed, **overrides)
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    moe = resolve(config)
    if variant != "bf16":
        from safetensors.torch import load_file, save_file

        tensors = load_file(out / "model.safetensors")
        if variant == "fp8":
            tensors, qconfig = quantize_fp8(tensors, moe)
        else:
            tensors, qconfig = quantize_int4(tensors, moe)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        config["quantization_config"] = qconfig
        write_json(out / "config.json", config)
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


def _linear_weights(tensors: dict, moe: MoEModel) -> list[str]:
    """2-D Linear weights DeepSeek's FP8 release quantizes: attention projections, dense/shared/routed MLPs; not
    embeddings, lm_head, norms, routers or shared-expert gates."""
    routers = {moe.router_name(L) for L in moe.moe_layers}
    keep = []
    for name, t in tensors.items():
        if t.dim() != 2 or not name.endswith(".weight") or name in routers:
            continue
        module = name[: -len(".weight")]
        if module.endswith(("embed_tokens", "lm_head", "shared_expert_gate")) or "norm" in module.rsplit(".", 1)[-1]:
            continue
        keep.append(name)
    return sorted(keep)


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
    for name in _linear_weights(tensors, moe):
        q, scale = fp8_block_quantize(tensors[name])
        out[name] = q
        out[name + "_scale_inv"] = scale
    return out, {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }


def int4_group(moe: MoEModel) -> int:
    """Largest compressed-tensors group (128, 64, 32) that divides both H and the expert I."""
    for g in (128, 64, 32):
        if moe.hidden_size % g == 0 and moe.intermediate_size % g == 0:
            return g
    raise BadInput(f"H={moe.hidden_size} / I={moe.intermediate_size} divide by no INT4 group", "use multiples of 32")


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


def quantize_int4(tensors: dict, moe: MoEModel) -> tuple[dict, dict]:
    """compressed-tensors W4A16 pack-quantized routed experts (`X.weight_packed`, `X.weight_scale`,
    `X.weight_shape`); everything else stays BF16 and is listed in `ignore`."""
    import torch

    group = int4_group(moe)
    experts = _expert_weights(moe)
    out = dict(tensors)
    for name in experts:
        w = out.pop(name)
        base = name[: -len(".weight")]
        out[base + ".weight_packed"], out[base + ".weight_scale"] = int4_pack(w, group)
        out[base + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    expert_modules = {n[: -len(".weight")] for n in experts}
    ignore = sorted(
        n[: -len(".weight")]
        for n, t in tensors.items()
        if n.endswith(".weight") and t.dim() == 2 and n[: -len(".weight")] not in expert_modules
    )
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
