"""Zoo checkpoints load with transformers and match the in-memory model; FP8/INT4 variants dequantize back to the
BF16 weights; the INT4 layout agrees with compressed-tensors' own pack/unpack; builds are deterministic and atomic."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lvllm_runtime import arch
from lvllm_runtime import zoo as zoo_lib
from lvllm_runtime.errors import BadInput

CASES = [(m, v) for m in sorted(zoo_lib.ZOO) for v in zoo_lib.variants(m)]
_REF: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
IDS = torch.tensor([[7, 42, 284, 78, 81, 383, 450, 14, 347, 100, 11]])


def _reference(model_type: str) -> torch.Tensor:
    """Logits f32 [1, T, V] of the in-memory model the zoo saves."""
    if model_type not in _REF:
        with torch.no_grad():
            _REF[model_type] = zoo_lib.make_model(model_type)(IDS).logits.float()
    return _REF[model_type]


@pytest.mark.parametrize("model_type,variant", CASES)
def test_checkpoint_loads_and_matches_in_memory_model(zoo, model_type, variant):
    path = zoo(model_type, variant)
    model = zoo_lib.auto_class(model_type).from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(IDS).logits.float()
    ref = _reference(model_type)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # random weights that do not collapse
    if variant == "bf16":
        torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    else:  # quantized weights: close, not equal
        rel = ((logits - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.35, rel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("model_type", [m for m in sorted(zoo_lib.ZOO) if "fp8" in zoo_lib.variants(m)])
def test_fp8_dequantizes_to_bf16(zoo, model_type):
    bf16 = load_file(zoo(model_type, "bf16") / "model.safetensors")
    path = zoo(model_type, "fp8")
    fp8 = load_file(path / "model.safetensors")
    moe = arch.resolve(json.loads((path / "config.json").read_text()))
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    assert {k: qconfig[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    quantized = {k for k, t in fp8.items() if t.dtype == torch.float8_e4m3fn}
    for layer in moe.moe_layers:  # every routed expert and the router stays unquantized
        assert moe.router_name(layer) not in quantized
        for e in range(moe.num_experts):
            assert {b + ".weight" for b in moe.expert_names(layer, e).values()} <= quantized
    assert any("self_attn" in k or ".mixer.q_proj" in k for k in quantized)
    assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) or "norm" in k for k in quantized)
    assert set(fp8) == set(bf16) | {k + "_scale_inv" for k in quantized}
    for name in quantized:
        scale = fp8[name + "_scale_inv"]
        n, k = fp8[name].shape
        assert scale.dtype == torch.float32 and scale.shape == (math.ceil(n / 128), math.ceil(k / 128))
        assert _rel(zoo_lib.fp8_block_dequantize(fp8[name], scale), bf16[name]) < 0.07
    for name in set(bf16) - quantized:
        assert torch.equal(fp8[name], bf16[name])


def test_fp8_edge_blocks_and_transformers_dequantization(zoo):
    """Ceil-division edge blocks, and transformers' own FP8 dequantization equals ours on a zoo checkpoint."""
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(3)) * 0.05
    w[130:, 260:] *= 40  # an edge block with its own range
    q, scale = zoo_lib.fp8_block_quantize(w)
    assert q.shape == (200, 300) and scale.shape == (2, 3)
    assert _rel(zoo_lib.fp8_block_dequantize(q, scale)[130:, 260:], w[130:, 260:]) < 0.07
    assert scale[1, 2] > 10 * scale[0, 0]
    path = zoo("deepseek_v3", "fp8")
    loaded = zoo_lib.auto_class("deepseek_v3").from_pretrained(path, dtype=torch.bfloat16).state_dict()
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 96 rows: an edge block
    mine = zoo_lib.fp8_block_dequantize(tensors[name], tensors[name + "_scale_inv"]).to(torch.bfloat16)
    assert torch.equal(loaded[name], mine)


def _ct_scheme(qconfig: dict):
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(qconfig)  # our JSON parses as compressed-tensors' own config
    (scheme,) = config.config_groups.values()
    return config, scheme


@pytest.mark.parametrize("model_type", [m for m in sorted(zoo_lib.ZOO) if "int4" in zoo_lib.variants(m)])
def test_int4_dequantizes_to_bf16_and_matches_compressed_tensors(zoo, model_type):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.utils.match import match_name

    bf16 = load_file(zoo(model_type, "bf16") / "model.safetensors")
    path = zoo(model_type, "int4")
    int4 = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    moe = arch.resolve(config)
    ct_config, scheme = _ct_scheme(config["quantization_config"])
    group = scheme.weights.group_size
    assert scheme.weights.num_bits == 4 and scheme.weights.symmetric and scheme.format == "pack-quantized"
    assert moe.hidden_size % group == 0 and (moe.intermediate_size // 2) % group == 0  # passes into 2 nodes
    experts = {b for L in moe.moe_layers for e in range(moe.num_experts) for b in moe.expert_names(L, e).values()}
    for name, t in bf16.items():  # ignore covers everything but the routed experts, under either prefix
        if name.endswith(".weight") and t.dim() == 2:
            module = name[: -len(".weight")]
            for prefixed in {module, module.replace("backbone.", "model.", 1)}:
                ignored = any(match_name(prefixed, target) for target in ct_config.ignore)
                assert ignored != (module in experts), module
    for base in sorted(experts):
        w = bf16[base + ".weight"]
        packed, scale = int4[base + ".weight_packed"], int4[base + ".weight_scale"]
        assert packed.dtype == torch.int32 and packed.shape == (w.shape[0], w.shape[1] // 8)
        assert scale.dtype == torch.bfloat16 and scale.shape == (w.shape[0], w.shape[1] // group)
        assert int4[base + ".weight_shape"].tolist() == list(w.shape)
        ours = zoo_lib.int4_unpack(packed, scale, group)
        assert _rel(ours, w) < 0.15
        state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": int4[base + ".weight_shape"]}
        theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]  # bf16 q * scale
        assert torch.equal(theirs, ours.to(torch.bfloat16))
        q = unpack_from_int32(packed, 4, w.shape)  # int8 in [-8, 7]
        assert torch.equal(q.float() * scale.float().repeat_interleave(group, 1), ours)
    # compressed-tensors' own RTN quantize + pack of the same BF16 weight gives the same bits and scales
    from compressed_tensors.quantization.utils import calculate_qparams

    w = bf16[sorted(experts)[0] + ".weight"]
    groups = w.view(w.shape[0], -1, group)
    ct_scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    compressed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": ct_scale}, scheme)
    packed, scale = zoo_lib.int4_pack(w, group)
    assert torch.equal(ct_scale, scale)
    assert torch.equal(compressed["weight_packed"], packed)


def test_int4_pack_layout_by_hand():
    """FORMATS.md §3: the row -8..7 packs to words 0x76543210, 0xfedcba98 (column 8j+k in bits 4k..4k+3).
    amax 7.5 gives scale 1; -7.5 rounds half-to-even to -8."""
    row = torch.tensor([-7.5] + list(range(-7, 8)), dtype=torch.float32)
    packed, scale = zoo_lib.int4_pack(torch.stack([row, row / 2]), 16)
    for r in range(2):
        assert [v & 0xFFFFFFFF for v in packed[r].tolist()] == [0x76543210, 0xFEDCBA98]
    assert scale.float().flatten().tolist() == [1.0, 0.5]


def test_builds_are_deterministic(tmp_path):
    a = zoo_lib.build("deepseek_v3", tmp_path / "a", "int4", seed=5)
    b = zoo_lib.build("deepseek_v3", tmp_path / "b", "int4", seed=5)
    c = zoo_lib.build("deepseek_v3", tmp_path / "c", "int4", seed=6)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert "tokenizer.json" in files and "generation_config.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_build_is_idempotent_and_refuses_foreign_dirs(tmp_path):
    out = zoo_lib.build("mixtral", tmp_path / "m")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert zoo_lib.build("mixtral", tmp_path / "m") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    other = (out / "model.safetensors").read_bytes()
    assert zoo_lib.build("mixtral", tmp_path / "m", seed=1) == out  # a different zoo build is regenerated
    assert (out / "model.safetensors").read_bytes() != other
    assert json.loads((out / zoo_lib.MARKER).read_text())["seed"] == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not a zoo build"):
        zoo_lib.build("mixtral", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(BadInput, match="no 'llama'"):
        zoo_lib.build("llama", tmp_path / "x")
    with pytest.raises(BadInput, match="variant"):
        zoo_lib.build("mixtral", tmp_path / "x", "fp4")
    with pytest.raises(BadInput, match="bf16 only"):
        zoo_lib.build("gpt_oss", tmp_path / "x", "int4")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp directories left behind


def test_tokenizer_and_chat_template(zoo):
    from transformers import AutoTokenizer

    path = zoo("qwen3_moe")
    tok = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert 256 < len(tok) <= config["vocab_size"]
    text = "Hello, wie geht's? 你好 def f(x): return x"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges learned, bytes round-trip
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == config["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((path / "generation_config.json").read_text())
    assert config["eos_token_id"] in generation["eos_token_id"]


def test_demo_model(tmp_path):
    path = zoo_lib.demo_model(tmp_path)
    assert path.parent.parent == tmp_path
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert zoo_lib.demo_model(tmp_path) == path
