"""What a model weighs in each format, from config.json alone or from the files: checkpoint tensor bytes per role
(BF16, block FP8, compressed-tensors INT4), expert-store bytes per layer and node, and the model inputs of a plan
(`ModelSource`: a checkpoint folder, possibly only its config.json, or a recipe's architecture numbers).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .manifest import read_complete_manifest
from .model_shapes import QUANTIZABLE, ROUTED, ModelShape, Tensor, from_config

@dataclass(frozen=True)
class ModelSource:
    """What the plan is for: a shape, its checkpoint format, and exact tensor bytes when the files are present."""

    shape: ModelShape
    path: str
    config_sha256: str
    nonexpert_format: str  # bf16 | fp16 | fp32 | fp8
    expert_source_format: str  # bf16 | fp16 | fp32 | fp8 | int4 | mxfp4
    source_group_size: int | None = None
    checkpoint_bytes: dict[str, int] | None = None  # role -> bytes, from safetensors headers
    unquantized: frozenset[str] = frozenset()  # roles a quantized checkpoint keeps in 16 bits
    recipe: dict | None = None


# Substrings of quantization_config's not-converted module names -> the role they keep in 16 bits.
_SKIP_ROLES = {"linear_attn": "linear_attention", "self_attn": "attention", "shared_expert.": "shared_expert", "shared_experts.": "shared_expert",
               "mixer.in_proj": "mamba", "mixer.out_proj": "mamba"}


def _unquantized_roles(config: dict) -> frozenset[str]:
    q = config.get("quantization_config") or {}
    names = [str(x) for k in ("modules_to_not_convert", "ignore", "ignored_layers") for x in (q.get(k) or [])]
    return frozenset(role for key, role in _SKIP_ROLES.items() if any(key in n for n in names))


def _formats(config: dict) -> tuple[str, str, int | None]:
    """(non-expert format, routed-expert format, int4 group) from config.json's dtype and quantization_config."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or
                (config.get("text_config") or {}).get("dtype") or "bfloat16")
    base = {"float16": "fp16", "float32": "fp32"}.get(dtype, "bf16")
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method == "fp8":
        return "fp8", "fp8", None
    if method == "mxfp4":  # gpt-oss: only the routed experts are MXFP4
        return base, "mxfp4", None
    if method == "compressed-tensors":
        fmt = q.get("format")
        group = None
        for grp in (q.get("config_groups") or {}).values():
            w = grp.get("weights") or {}
            group = w.get("group_size") or group
            if w.get("num_bits") == 8 and w.get("type") == "float":
                fmt = "float-quantized"
        if fmt == "pack-quantized":
            return base, "int4", group
        if fmt == "float-quantized":
            return "fp8", "fp8", None
    return base, base, None


BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


def tensor_bytes(t: Tensor, fmt: str, group: int | None = None) -> int:
    """Bytes of `t.count` tensors stored in `fmt`: fp8 = block-scaled (f32 scale per 128x128); int4 = compressed-
    tensors pack-quantized (packed int32 [N, K/8], bf16 scale [N, K/g], int64 shape [2]); mxfp4 = two E2M1 codes a
    byte plus one E8M0 scale per 32 columns. Only 2-D projections are quantized; vectors stay 16-bit (f32 where the
    tensor is f32)."""
    if t.f32 or (fmt == "fp32"):
        return 4 * t.numel * t.count
    if not t.linear:  # vectors, embeddings, routers: 16-bit in every checkpoint format
        return 2 * t.numel * t.count
    if t.linear and fmt == "fp8":
        n, k = t.shape
        return t.count * (n * k + 4 * math.ceil(n / 128) * math.ceil(k / 128))
    if t.linear and fmt == "mxfp4":
        n, k = t.shape
        return t.count * (n * k // 2 + n * k // 32)
    if t.linear and fmt == "int4":
        n, k = t.shape
        return t.count * (n * k // 2 + 2 * n * (k // int(group or 128)) + 16)
    return BYTES.get(fmt, 2) * t.numel * t.count


def checkpoint_bytes_by_role(shape: ModelShape, nonexpert_format: str, expert_format: str,
                             group: int | None = None, unquantized: frozenset[str] = frozenset()) -> dict[str, int]:
    """Predicted checkpoint tensor bytes per role (what the safetensors files hold, headers excluded);
    `unquantized` roles keep 16-bit weights in a quantized checkpoint (its modules_to_not_convert)."""
    out: dict[str, int] = {}
    base = "fp32" if nonexpert_format == "fp32" else "bf16"
    for t in shape.tensors():
        if t.role == ROUTED:
            fmt = expert_format
        elif t.role in QUANTIZABLE and t.role not in unquantized:
            fmt = nonexpert_format
        else:
            fmt = base
        out[t.role] = out.get(t.role, 0) + tensor_bytes(t, fmt, group)
    return out


def predicted_checkpoint_bytes(src: "ModelSource") -> dict[str, int]:
    """What the model's safetensors should hold per role, from config.json alone."""
    return checkpoint_bytes_by_role(src.shape, src.nonexpert_format, src.expert_source_format,
                                    src.source_group_size, src.unquantized)


def _node_layer_bytes(shape: ModelShape, weight_format: str, group: int | None, numa_nodes: int, node: int,
                      scale_bytes: int, bias_bytes: int) -> int:
    """Bytes of one layer's routed experts on node `node`: INT4 nibbles and per-group scales of `scale_bytes`, or BF16
    weights; expert biases of `bias_bytes` (node 0 alone holds the down bias, so the node sum adds it once)."""
    E, H = shape.num_experts, shape.expert_hidden
    In = shape.expert_intermediate // numa_nodes
    rows13 = (2 if shape.gated else 1) * In
    if weight_format == "bf16":
        n = 2 * E * (rows13 * H + H * In)
    else:
        g = int(group or 128)
        n = E * (rows13 * H // 2 + scale_bytes * rows13 * (H // g) + H * In // 2 + scale_bytes * H * (In // g))
    if shape.expert_bias:
        n += bias_bytes * E * (rows13 + (H if node == 0 else 0))
    return n


def store_layer_bytes(shape: ModelShape, weight_format: str, group: int | None, numa_nodes: int, node: int = 0) -> int:
    """Tensor bytes of one layer's store shard on node `node` (manifest.py layout, bf16 scales and biases; headers
    excluded). Node 0's is the largest."""
    return _node_layer_bytes(shape, weight_format, group, numa_nodes, node, 2, 2)


def store_layer_total_bytes(shape: ModelShape, weight_format: str, group: int | None, numa_nodes: int) -> int:
    """Tensor bytes of one layer's store shards over all nodes (headers excluded)."""
    return sum(store_layer_bytes(shape, weight_format, group, numa_nodes, node) for node in range(numa_nodes))


def engine_layer_bytes(shape: ModelShape, weight_format: str, group: int | None, numa_nodes: int, node: int = 0) -> int:
    """Bytes of one layer's node slice as the CPU engine holds it in node-local memory (csrc/engine.cpp
    `load_layer`: INT4 nibbles with f32 scales, BF16 as stored, biases as f32)."""
    return _node_layer_bytes(shape, weight_format, group, numa_nodes, node, 4, 4)


# GPU prefill dequantizes an INT4 node slice into bf16 at most this many bytes at a time (a Qwen3-30B-A3B slice, 1.2
# GB, in one piece; a DeepSeek-V3 or Kimi slice, ~16 GB, in expert chunks that a 24-32 GB card can hold)
DEQUANT_BUFFER_CAP = 2 << 30


def dequant_chunk_experts(num_experts: int, expert_bf16_bytes: int) -> int:
    """Experts dequantized at once: a whole node slice when it fits DEQUANT_BUFFER_CAP, else as many as fit (>= 1)."""
    return max(1, min(num_experts, DEQUANT_BUFFER_CAP // max(1, expert_bf16_bytes)))


def prefill_staging_bytes(layer_rank_bytes: int, num_experts: int, rows13: int, hidden: int, node_intermediate: int,
                          weight_format: str, window: int) -> int:
    """GPU bytes the GPU-prefill path holds on one rank (gpu_prefill.StreamedPrefill allocates exactly these):
    window + 1 slots of the rank's store bytes of one layer (`window` copies in flight beside the layer computed) and,
    for INT4, the bf16 buffer each node's weights are dequantized into (dequant_chunk_experts experts)."""
    slots = (max(int(window), 0) + 1) * layer_rank_bytes
    if weight_format != "int4":
        return slots
    per_expert = 2 * (rows13 * hidden + hidden * node_intermediate)
    return slots + dequant_chunk_experts(num_experts, per_expert) * per_expert


def pick_group(shape: ModelShape, numa_nodes: int, requested: int | str) -> int:
    """Largest of 128/64/32 dividing H and the per-node slice of I (as quant.pick_group_size), or the request."""
    dims = (shape.expert_hidden, shape.expert_intermediate // numa_nodes)
    choices = (128, 64, 32) if requested in ("auto", None) else (int(requested),)
    working = [g for g in (128, 64, 32) if all(d % g == 0 and d >= g for d in dims)]
    for g in choices:
        if g in working:
            return g
    raise BadInput(
        f"no INT4 group size in {list(choices)} divides hidden {dims[0]} and the per-node expert slice {dims[1]}",
        f"use --group-size {working[0]}" if working else "use fewer --numa-nodes, or --expert-format bf16",
    )


def read_checkpoint_bytes(model_dir: Path, shape: ModelShape) -> dict[str, int] | None:
    """Tensor bytes per role from the safetensors headers (index + shard headers); None when no weights are present."""
    from .arch import resolve

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    try:
        moe = resolve(shape.config)
        expert_prefixes = _expert_prefixes(moe)
    except Exception:  # noqa: BLE001 - planning works without arch.py's names: fall back on name patterns
        expert_prefixes = None
    out: dict[str, int] = {}
    for f in files:
        for name, info in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            role = _role_of(name, expert_prefixes)
            if role is None:
                continue
            out[role] = out.get(role, 0) + (e - b)
    return out


def _expert_prefixes(moe) -> tuple[str, ...]:
    if moe.layout == "fused":
        return tuple(v for L in moe.moe_layers for v in moe.fused_names(L).values())
    return tuple(f"{moe.layer_prefix}.{L}.{moe.moe_module}.experts." for L in moe.moe_layers)


def _role_of(name: str, expert_prefixes: tuple[str, ...] | None) -> str | None:
    low = name.lower()
    if any(k in low for k in ("visual", "vision", "audio", "mm_projector", "multi_modal", "mtp.")):
        return None
    if expert_prefixes is not None:
        if name.startswith(expert_prefixes):
            return ROUTED
    elif ".experts." in name or name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return ROUTED
    return "non_expert"


def safetensors_header(path: Path) -> dict:
    from .errors import CorruptCheckpoint

    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError(f"header length {n}")
            return json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path} is not a readable safetensors file ({e})", "re-download that shard") from None


def load_model(model_dir: str | Path) -> ModelSource:
    """A model directory with at least config.json (weights optional: plan before downloading)."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise BadInput(f"{d} has no config.json", "pass a model directory (config.json is enough to plan)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{cfg_path} is not valid JSON ({e})", "re-download config.json") from None
    shape = from_config(config)
    ne, ex, group = _formats(config)
    return ModelSource(shape=shape, path=str(d.resolve()), config_sha256=hashlib.sha256(cfg_path.read_bytes()).hexdigest(),
                       nonexpert_format=ne, expert_source_format=ex, source_group_size=group,
                       checkpoint_bytes=read_checkpoint_bytes(d, shape), unquantized=_unquantized_roles(config))


def model_from_recipe(recipe: dict) -> ModelSource:
    """A recipe's architecture numbers stand in for config.json (no files at all)."""
    arch = dict(recipe["architecture"])
    shape = from_config(arch)
    return ModelSource(shape=shape, path=str(recipe.get("hf_repo", recipe["name"])), config_sha256="",
                       nonexpert_format=str(recipe.get("nonexpert_format", "bf16")),
                       expert_source_format=str(recipe.get("expert_source_format", "bf16")),
                       source_group_size=recipe.get("source_group_size"), recipe=recipe)


def read_store_manifest(path: str) -> dict:
    """A finished store's manifest as a dict (the `lvllm.json` keys); StoreError when missing or unfinished."""
    return read_complete_manifest(path).to_dict()
