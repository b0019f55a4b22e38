"""hybrid.py against transformers' own MoE blocks (routing + experts) and its three compute paths against each other
with the real C++ engine: all cold, hot + cold, and the whole-layer (GPU-prefill) path on the CPU."""

from __future__ import annotations

import pytest
import torch

from lvllm_runtime import arch, zoo
from lvllm_runtime.hybrid import (ExpertStreamer, HotExperts, HybridMoE, LayerWeights, experts_torch,
                                  join_node_slices, route)
from lvllm_runtime.quant import quantize_int4

ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe"]


@pytest.mark.parametrize("model_type", ARCHS)
def test_route_and_experts_equal_transformers_block(model_type):
    """route() + experts_torch() (+ the block's shared experts) == the transformers MoE block, float32."""
    torch.manual_seed(0)
    model = zoo.make_model(model_type).float()
    moe = arch.resolve(model.config.to_dict())
    block = model.model.layers[moe.moe_layers[0]].mlp
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:  # a zero bias would leave the biased selection untested
        with torch.no_grad():
            bias.copy_(torch.randn_like(bias) * 0.1)
    hidden = torch.randn(24, moe.hidden_size)
    with torch.no_grad():
        want = block(hidden[None])
        want = (want[0] if isinstance(want, tuple) else want)[0]
        weights, ids = route(hidden @ block.gate.weight.T, moe.routing, bias)
        layer = LayerWeights({"w13": block.experts.gate_up_proj, "w2": block.experts.down_proj}, "bf16")
        got = experts_torch(hidden, weights, ids, layer, moe.activation, moe.gated)
        if hasattr(block, "shared_experts"):
            got = got + block.shared_experts(hidden)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == (24, moe.routing.top_k)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


E, H, I, K, NODES, GROUP = 8, 128, 256, 2, 2, 64


def _random_layer(weight_format: str) -> tuple[LayerWeights, list[dict[str, torch.Tensor]]]:
    """A full layer and its NODES store-layout node slices (gate rows then up rows per node)."""
    g = torch.Generator().manual_seed(1)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.05
    w2 = torch.randn(E, H, I, generator=g) * 0.05
    n = I // NODES
    rows = [torch.cat([w13[:, k * n:(k + 1) * n], w13[:, I + k * n:I + (k + 1) * n]], 1) for k in range(NODES)]
    cols = [w2[:, :, k * n:(k + 1) * n] for k in range(NODES)]
    if weight_format == "bf16":
        shards = [{"w13": r.bfloat16().contiguous(), "w2": c.bfloat16().contiguous()} for r, c in zip(rows, cols)]
    else:
        shards = []
        for r, c in zip(rows, cols):
            p13, s13 = quantize_int4(r, GROUP)
            p2, s2 = quantize_int4(c, GROUP)
            shards.append({"w13.packed": p13, "w13.scale": s13, "w2.packed": p2, "w2.scale": s2})
    return join_node_slices(shards, weight_format, True, GROUP if weight_format == "int4" else None), shards


@pytest.mark.parametrize("weight_format", ["bf16", "int4"])
def test_node_slices_join_back_to_the_full_layer(weight_format):
    full, shards = _random_layer(weight_format)
    for e in (0, E - 1):
        w13, w2 = full.expert(e, torch.float32)
        n = I // NODES
        one13, one2 = LayerWeights(shards[1], weight_format, full.group_size).expert(e, torch.float32)
        torch.testing.assert_close(w13[n:2 * n], one13[:n], rtol=0, atol=0)  # node 1's gate rows
        torch.testing.assert_close(w13[I + n:], one13[n:], rtol=0, atol=0)  # node 1's up rows
        torch.testing.assert_close(w2[:, n:], one2, rtol=0, atol=0)


@pytest.mark.parametrize("weight_format", ["bf16", "int4"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_engine_hot_and_whole_layer_paths_agree(weight_format, tokens):
    """Cold (engine), hot+cold and whole-layer paths give the f32 reference on the same weights."""
    engine_mod = pytest.importorskip("lvllm_runtime.engine")
    full, shards = _random_layer(weight_format)
    engine = engine_mod.Engine(H, I // NODES, E, "silu_glu", True, weight_format, full.group_size,
                               [[0]] * NODES, 64)
    engine.load_layer(3, shards)
    torch.manual_seed(tokens)
    hidden = torch.randn(tokens, H).bfloat16()
    weights, ids = route(torch.randn(tokens, E), arch.Routing("softmax", K, True))
    ids[0, 1] = -1  # a skipped slot (as vLLM's expert map or a masked hot expert gives)
    reference = experts_torch(hidden.float(), weights, ids, full, "silu_glu", True)

    cold = HybridMoE(3, E, "silu_glu", True, engine).forward(hidden, weights, ids)
    hot = HotExperts.build(full, [0, 3, 5], E, "cpu")
    mixed = HybridMoE(3, E, "silu_glu", True, engine, hot=hot).forward(hidden, weights, ids)
    streamer = ExpertStreamer({3: full}, "cpu", window=1)
    whole = HybridMoE(3, E, "silu_glu", True, engine, streamer=streamer, gpu_prefill_min_tokens=1)
    assert whole.uses_whole_layer(tokens)
    layer_out = whole.forward(hidden, weights, ids)

    scale = reference.abs().max()
    for name, got in (("engine", cold), ("hot+engine", mixed), ("whole layer", layer_out)):
        assert got.dtype == torch.bfloat16 and got.shape == hidden.shape
        err = (got.float() - reference).abs().max() / scale
        assert err < 2e-2, f"{name}: max error {err:.3g} of the output scale"
    err = (layer_out.float() - cold.float()).abs().max() / scale
    assert err < 2e-2, f"whole-layer vs engine path: {err:.3g}"


def test_all_hot_needs_no_engine_and_cold_needs_one():
    full, _ = _random_layer("bf16")
    hidden = torch.randn(3, H).bfloat16()
    weights, ids = route(torch.randn(3, E), arch.Routing("softmax", K, True))
    out = HybridMoE(0, E, "silu_glu", True, None, hot=HotExperts.build(full, range(E), E, "cpu")).forward(
        hidden, weights, ids)
    torch.testing.assert_close(out.float(), experts_torch(hidden, weights, ids, full, "silu_glu", True), atol=1e-2,
                               rtol=1e-2)
    with pytest.raises(ValueError, match="cold experts need an engine"):
        HybridMoE(0, E, "silu_glu", True, None, hot=HotExperts.build(full, [1], E, "cpu"))


def test_route_grouped_topk_keeps_only_the_best_groups():
    """DeepSeek-V3 grouping: experts of groups outside the topk_group best (by top-2 biased sum) are never chosen."""
    routing = arch.Routing("sigmoid", 2, True, n_group=4, topk_group=2, correction_bias=True,
                           routed_scaling_factor=2.5)
    logits = torch.full((1, 8), -4.0)
    logits[0, 0] = 4.0  # the single best expert lives in group 0 ...
    bias = torch.tensor([0.0, 0, 0.5, 0.5, 0.6, 0.6, 0, 0])  # ... but groups 1 and 2 win on their top-2 sums
    weights, ids = route(logits, routing, bias)
    assert set(ids[0].tolist()) <= {2, 3, 4, 5}
    torch.testing.assert_close(weights.sum(), torch.tensor(2.5))  # renormalised, then scaled
