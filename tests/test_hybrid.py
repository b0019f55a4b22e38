"""hybrid.py against transformers' own MoE blocks (routing + experts) and HybridMoE's paths against a float64
reference with the real C++ engine: all cold, hot + cold, all hot, and the whole-layer (GPU-prefill) path on the CPU."""

from __future__ import annotations

import pytest
import torch

from lvllm_runtime import arch, zoo
from lvllm_runtime.cuda_graph_step import HybridDecodeLayer, hot_experts
from lvllm_runtime.gpu_prefill import LayerShape, StreamedPrefill, grouped_experts
from lvllm_runtime.hybrid import HybridMoE, LayerWeights, join_node_slices, route
from lvllm_runtime.quant import quantize_int4

ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe"]


@pytest.mark.parametrize("model_type", ARCHS)
def test_route_and_experts_equal_transformers_block(model_type):
    """route() + grouped_experts() (+ the block's shared experts) == the transformers MoE block, float32."""
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
        got = grouped_experts(hidden, weights, ids, block.experts.gate_up_proj, block.experts.down_proj,
                              moe.activation, moe.gated)
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


def reference(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, full: LayerWeights) -> torch.Tensor:
    """float64 loop over tokens and picks on the dequantized weights: the math, written independently of the runtime."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                w13, w2 = (w.double() for w in full.expert(e, torch.float32))
                g, u = (w13 @ hidden[t].double()).chunk(2)
                out[t] += float(weights[t, j]) * (w2 @ (torch.nn.functional.silu(g) * u))
    return out


def _layer(engine, shards, weight_format, hot=(), whole=False, group=None):
    full = join_node_slices(shards, weight_format, True, group)
    prefill = None
    if whole:
        prefill = StreamedPrefill(LayerShape(weight_format, group, True, "silu_glu"), "cpu")
        prefill.add_layer(3, shards)
    dec = HybridDecodeLayer(3, {}, "silu_glu", True, hot_experts(full, list(hot), E, "cpu"))
    return HybridMoE(3, engine, dec, prefill, 1 if whole else None)


@pytest.mark.parametrize("weight_format", ["bf16", "int4"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_engine_hot_and_whole_layer_paths_agree(weight_format, tokens):
    """Cold (engine), hot+cold and whole-layer paths give the float64 reference on the same weights."""
    engine_mod = pytest.importorskip("lvllm_runtime.engine")
    full, shards = _random_layer(weight_format)
    engine = engine_mod.Engine(H, I // NODES, E, "silu_glu", True, weight_format, full.group_size,
                               [[0]] * NODES, 64)
    engine.load_layer(3, shards)
    torch.manual_seed(tokens)
    hidden = torch.randn(tokens, H).bfloat16()
    weights, ids = route(torch.randn(tokens, E), arch.Routing("softmax", K, True))
    ids[0, 1] = -1  # a skipped slot (as vLLM's expert map or a masked hot expert gives)
    want = reference(hidden, weights, ids, full)

    cold = _layer(engine, shards, weight_format, group=full.group_size)
    mixed = _layer(engine, shards, weight_format, hot=[0, 3, 5], group=full.group_size)
    whole = _layer(engine, shards, weight_format, whole=True, group=full.group_size)
    assert (cold.path(tokens), mixed.path(tokens), whole.path(tokens)) == ("engine", "engine", "gpu_prefill")
    outs = {name: moe.forward(hidden, weights, ids) for name, moe in
            (("engine", cold), ("hot+engine", mixed), ("whole layer", whole))}
    scale = want.abs().max()
    for name, got in outs.items():
        assert got.dtype == torch.bfloat16 and got.shape == hidden.shape
        err = (got.double() - want).abs().max() / scale
        assert err < 2e-2, f"{name}: max error {err:.3g} of the output scale"


def test_all_hot_needs_no_engine_and_cold_needs_one():
    full, shards = _random_layer("bf16")
    hidden = torch.randn(3, H).bfloat16()
    weights, ids = route(torch.randn(3, E), arch.Routing("softmax", K, True))
    moe = _layer(None, shards, "bf16", hot=range(E))
    assert moe.path(3) == "hot"
    want = reference(hidden, weights, ids, full)
    err = (moe.forward(hidden, weights, ids).double() - want).abs().max() / want.abs().max()
    assert err < 2e-2
    with pytest.raises(ValueError, match="cold experts need an engine"):
        _layer(None, shards, "bf16", hot=[1])


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
