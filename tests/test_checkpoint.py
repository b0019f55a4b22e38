"""Checkpoint reader: FP8 dequantization variants, sharded index == single file, compressed-tensors FP8, gpt-oss
MXFP4 against transformers' dequantization, and every malformed input found at open with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lvllm_runtime.checkpoint import Checkpoint, SafetensorsFile, _dequant_fp8
from lvllm_runtime.errors import BadInput, CorruptCheckpoint, UnsupportedArchitecture


def _fp8_ref(q: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].float()
            out[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = blk * scale[i, j].float()
    return out


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])
def test_fp8_dequant_block_tensor_channel(shape):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
    n, k = shape
    block = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.5
    assert torch.equal(_dequant_fp8(q, block, (128, 128)), _fp8_ref(q, block, 128, 128))
    assert torch.equal(_dequant_fp8(q, block, None), _fp8_ref(q, block, 128, 128))  # block inferred from shapes
    chan = (torch.rand(n, 1, generator=g) + 0.5).to(torch.bfloat16)
    assert torch.equal(_dequant_fp8(q, chan, None), q.float() * chan.float())
    per_tensor = torch.tensor([0.25])
    assert torch.equal(_dequant_fp8(q, per_tensor, None), q.float() * 0.25)
    with pytest.raises(CorruptCheckpoint, match="does not tile"):
        _dequant_fp8(q, block[:1], (128, 128))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard(ckpt: Path, dst: Path) -> Path:
    """Rewrite a single-file checkpoint as two shards plus model.safetensors.index.json."""
    out = _copy(ckpt, dst)
    tensors = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_sharded_index_reads_like_single_file(zoo, tmp_path):
    src = zoo("qwen3_moe", "fp8")
    one, two = Checkpoint.open(src), Checkpoint.open(_shard(src, tmp_path / "sharded"))
    assert two.source_format == one.source_format == "fp8_block"
    for layer in one.model.moe_layers:
        a, b = one.read_expert(layer, 5), two.read_expert(layer, 5)
        assert a.keys() == b.keys() == {"gate", "up", "down"}
        for k in a:
            assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k])
    # BF16 read is the FP32 read rounded.
    assert torch.equal(one.read_expert(0, 1, torch.bfloat16)["up"], one.read_expert(0, 1)["up"].bfloat16())


def test_compressed_tensors_fp8_reads_like_block_fp8(zoo, tmp_path):
    src = zoo("qwen3_moe", "fp8")
    out = _copy(src, tmp_path / "ct")
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
        tensors[name.replace("_scale_inv", "_scale")] = tensors.pop(name).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}}},
    }
    (out / "config.json").write_text(json.dumps(config))
    ct, block = Checkpoint.open(out), Checkpoint.open(src)
    assert ct.source_format == "fp8_ct"
    a, b = ct.read_expert(1, 7), block.read_expert(1, 7)
    for k in a:  # the only difference is the BF16 rounding of the scales
        assert (a[k] - b[k]).norm() / b[k].norm() < 1e-2


def test_int4_source_reads_packed_and_dequantized(zoo):
    ck = Checkpoint.open(zoo("qwen3_moe", "int4"))
    group = ck.config["quantization_config"]["config_groups"]["W4A16"]["weights"]["group_size"]
    assert ck.source_format == "int4_ct" and ck.group_size == group
    packed = ck.read_expert_int4(0, 2)
    raw = load_file(ck.path / "model.safetensors")
    base = ck.model.expert_names(0, 2)["down"]
    assert torch.equal(packed["down"][0], raw[base + ".weight_packed"])
    assert torch.equal(packed["down"][1], raw[base + ".weight_scale"])
    assert ck.read_expert(0, 2)["down"].shape == (ck.model.hidden_size, ck.model.intermediate_size)


def test_missing_index_and_file(zoo, tmp_path):
    out = _copy(zoo("qwen3_moe", "bf16"), tmp_path / "m")
    (out / "model.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="neither model.safetensors.index.json nor model.safetensors"):
        Checkpoint.open(out)


def test_truncated_and_corrupt_header(zoo, tmp_path):
    out = _copy(zoo("qwen3_moe", "bf16"), tmp_path / "m")
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        Checkpoint.open(out)
    n = int.from_bytes(data[:8], "little")
    f.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n :])
    with pytest.raises(CorruptCheckpoint, match="not valid JSON"):
        Checkpoint.open(out)
    f.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CorruptCheckpoint, match="header length"):
        SafetensorsFile(f)
    f.write_bytes(b"abc")
    with pytest.raises(CorruptCheckpoint, match="too short"):
        Checkpoint.open(out)


def test_tensor_in_index_missing_from_file(zoo, tmp_path):
    out = _shard(zoo("qwen3_moe", "bf16"), tmp_path / "m")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.experts.99.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpoint, match="experts.99.up_proj.weight is in model.safetensors.index.json but missing"):
        Checkpoint.open(out)


def test_expert_tensor_missing(zoo, tmp_path):
    out = _copy(zoo("qwen3_moe", "bf16"), tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.6.down_proj.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="experts.6.down_proj.weight is not in"):
        Checkpoint.open(out)


def test_unsupported_architecture_and_asymmetric_int4(zoo, tmp_path):
    out = _copy(zoo("qwen3_moe", "bf16"), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UnsupportedArchitecture, match="'llama'.*supported: .*qwen3_moe"):
        Checkpoint.open(out)
    out = _copy(zoo("qwen3_moe", "int4"), tmp_path / "a")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.experts.0.up_proj.weight_zero_point"] = torch.zeros(16, 1, dtype=torch.int32)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(BadInput, match="asymmetric"):
        Checkpoint.open(out)


FP4_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [E, N, K] -> (blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32]): per 32 columns a power-of-two
    scale putting max|w| within E2M1's 6, each value rounded to the nearest E2M1 code, even column in the low nibble."""
    g = w.float().reshape(*w.shape[:-1], -1, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(2.0**-100) / 6)).clamp(-127, 127)
    codes = (g / torch.exp2(exp).unsqueeze(-1)).unsqueeze(-1).sub(FP4_E2M1).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def _gpt_oss_mxfp4(src: Path, dst: Path) -> Path:
    """The zoo's BF16 gpt-oss rewritten as the hub ships it: experts in MXFP4, [out, in] blocks, biases in BF16."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        # BF16 layout: gate_up [E, H, 2I], down [E, I, H]; MXFP4 stores [E, 2I, H] and [E, H, I]
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = _mxfp4_encode(tensors.pop(name).transpose(1, 2))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_gpt_oss_mxfp4_reads_as_transformers_dequantizes(zoo, tmp_path):
    """An MXFP4 gpt-oss checkpoint: every expert equals transformers' own MXFP4 dequantization (de-interleaved),
    biases pass, a BF16 store of it holds exactly those weights, and its expert bytes are predicted from config.json."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from lvllm_runtime import model_sizes
    from lvllm_runtime.model_shapes import ROUTED
    from lvllm_runtime.quantize import QuantizeOptions, quantize
    from lvllm_runtime.store import ExpertStore

    path = _gpt_oss_mxfp4(zoo("gpt_oss", "bf16"), tmp_path / "mxfp4")
    ckpt = Checkpoint.open(path)
    assert ckpt.source_format == "mxfp4" and ckpt.expert_bias
    raw = load_file(path / "model.safetensors")
    for layer in ckpt.model.moe_layers:
        base = f"model.layers.{layer}.mlp.experts"
        # transformers returns the BF16 layout: gate_up [E, H, 2I] (gate/up interleaved columns), down [E, I, H]
        gate_up = convert_moe_packed_tensors(raw[f"{base}.gate_up_proj_blocks"], raw[f"{base}.gate_up_proj_scales"])
        down = convert_moe_packed_tensors(raw[f"{base}.down_proj_blocks"], raw[f"{base}.down_proj_scales"])
        for e in range(ckpt.model.num_experts):
            got = ckpt.read_expert(layer, e)
            assert torch.equal(got["gate"], gate_up[e, :, 0::2].t().float())
            assert torch.equal(got["up"], gate_up[e, :, 1::2].t().float())
            assert torch.equal(got["down"], down[e].t().float())
            assert got["gate"].abs().max() > 0
    out = tmp_path / "store"
    quantize(path, out, QuantizeOptions(weight_format="bf16", numa_nodes=2, workers=1))
    store = ExpertStore.open(out)
    assert store.manifest.source_format == "mxfp4" and store.manifest.expert_bias
    for e in range(ckpt.model.num_experts):
        src = ckpt.read_expert(1, e)
        w13, w2 = store.expert(1, e)
        assert torch.equal(w13, torch.cat([src["gate"], src["up"]])) and torch.equal(w2, src["down"])
        b = ckpt.read_expert_bias(1, e)
        assert torch.equal(store.expert_bias(1, e)[0], torch.cat([b["gate"], b["up"]]))
    sizes = model_sizes.load_model(path)
    assert sizes.expert_source_format == "mxfp4"
    assert model_sizes.predicted_checkpoint_bytes(sizes)[ROUTED] == sizes.checkpoint_bytes[ROUTED]


def test_mxfp4_scales_of_the_wrong_shape(zoo, tmp_path):
    path = _gpt_oss_mxfp4(zoo("gpt_oss", "bf16"), tmp_path / "mxfp4")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][:, :, :1].contiguous()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="down_proj_scales has shape"):
        Checkpoint.open(path)
