"""arch.resolve against zoo checkpoints (names that exist in the files, MoE layers, sizes) and against the routing
transformers actually performs, plus configs written the way hub checkpoints write them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from lvllm_runtime import arch
from lvllm_runtime import zoo as zoo_lib
from lvllm_runtime.errors import UnsupportedArchitecture

FAMILIES = sorted(zoo_lib.ZOO)


def _resolve(path):
    return arch.resolve(json.loads((path / "config.json").read_text()))


def _shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _experts_modules(model) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """layer -> (router module, experts module), found from the in-memory module tree."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith(".experts") and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            block = model.get_submodule(name.rsplit(".", 1)[0])
            router = getattr(block, "gate", None) or block.router
            found[int(re.search(r"layers\.(\d+)\.", name).group(1))] = (router, module)
    return found


@pytest.mark.parametrize("model_type", FAMILIES)
def test_resolve_names_exist_in_zoo_files(zoo, model_type):
    path = zoo(model_type)
    moe = _resolve(path)
    shapes = _shapes(path)
    H, I, E = moe.hidden_size, moe.intermediate_size, moe.num_experts
    model = zoo_model(model_type)
    assert moe.moe_layers == tuple(sorted(_experts_modules(model)))
    assert moe.num_layers > max(moe.moe_layers)
    assert (E, I) == (8, 128) and H == moe.config["hidden_size"]
    for layer in moe.moe_layers:
        assert shapes[moe.router_name(layer)] == (E, H)
        if moe.routing.correction_bias:
            assert shapes[moe.correction_bias_name(layer)] == (E,)
        else:
            assert moe.correction_bias_name(layer) is None
        if moe.router_bias_name(layer):
            assert shapes[moe.router_bias_name(layer)] == (E,)
        if moe.layout == "fused":
            names = moe.fused_names(layer)
            gate_up = (E, H, 2 * I) if moe.fused_transposed else (E, 2 * I, H)
            assert shapes[names["gate_up"]] == gate_up
            assert shapes[names["down"]] == ((E, I, H) if moe.fused_transposed else (E, H, I))
            with pytest.raises(ValueError):
                moe.expert_names(layer, 0)
            continue
        for e in range(E):
            names = moe.expert_names(layer, e)
            assert ("gate" in names) == moe.gated
            for role, base in names.items():
                assert shapes[base + ".weight"] == ((H, I) if role == "down" else (I, H))
    expert_tensors = sum(1 for k in shapes if ".experts." in k)
    per_layer = 2 if moe.layout == "fused" else E * (3 if moe.gated else 2)
    assert expert_tensors == len(moe.moe_layers) * per_layer * (2 if moe.expert_bias else 1)
    dense = [L for L in range(moe.num_layers) if L not in moe.moe_layers]
    for layer in dense[:1]:
        with pytest.raises(ValueError, match="not a MoE layer"):
            moe.router_name(layer)
    assert moe.expert_bytes(2) == (3 if moe.gated else 2) * I * H * 2
    assert moe.total_expert_bytes(0.5) == len(moe.moe_layers) * E * moe.expert_bytes(0.5)


def reference_route(logits: torch.Tensor, r: arch.Routing, bias: torch.Tensor | None, expert_scale=None):
    """Plain restatement of the routing math in FORMATS.md §1: logits f32 [T, E] -> (weights [T, k], ids [T, k])."""
    if r.softmax_after_topk:
        values, ids = logits.topk(r.top_k, dim=-1)
        return values.softmax(-1), ids
    scores = logits.softmax(-1) if r.scoring == "softmax" else logits.sigmoid()
    choice = scores + bias if r.correction_bias else scores
    if r.n_group > 1:
        t, e = choice.shape
        group_score = choice.view(t, r.n_group, -1).topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(r.topk_group, dim=-1).indices
        mask = torch.zeros(t, r.n_group, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(e // r.n_group, 1), float("-inf"))
    ids = choice.topk(r.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if r.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if r.per_expert_scale:
        weights = weights * expert_scale[ids]
    return weights * r.routed_scaling_factor, ids


_MODELS: dict[str, torch.nn.Module] = {}


def zoo_model(model_type: str) -> torch.nn.Module:
    if model_type not in _MODELS:
        _MODELS[model_type] = zoo_lib.make_model(model_type)
    return _MODELS[model_type]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routing_params_reproduce_transformers(zoo, model_type):
    """Routing + router/bias tensors read by the resolved names reproduce the expert choice and weights that the
    transformers forward hands to its experts, for every MoE layer."""
    path = zoo(model_type)
    moe = _resolve(path)
    model = zoo_model(model_type)
    seen: dict[int, dict] = {}
    hooks = []
    for layer, (router, experts) in _experts_modules(model).items():
        rec = seen.setdefault(layer, {})
        hooks.append(router.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("x", a[0])))
        hooks.append(experts.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("route", a[1:3])))
    ids = torch.randint(7, zoo_lib.VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    changed_by_bias = changed_by_groups = 0
    with safe_open(path / "model.safetensors", "pt") as f:
        for layer in moe.moe_layers:
            x = seen[layer]["x"].reshape(-1, moe.hidden_size).float()
            got_ids, got_w = seen[layer]["route"]
            if moe.router_input_scale_name(layer):  # gemma4: rmsnorm without weight, * scale * H**-0.5
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + moe.config["rms_norm_eps"])
                x = x * f.get_tensor(moe.router_input_scale_name(layer)).float() * moe.hidden_size**-0.5
            logits = torch.nn.functional.linear(x, f.get_tensor(moe.router_name(layer)).float())
            if moe.router_bias_name(layer):
                logits = logits + f.get_tensor(moe.router_bias_name(layer)).float()
            bias = f.get_tensor(moe.correction_bias_name(layer)).float() if moe.routing.correction_bias else None
            scale = f.get_tensor(moe.per_expert_scale_name(layer)).float() if moe.routing.per_expert_scale else None
            w, idx = reference_route(logits, moe.routing, bias, scale)
            order_got, order_ref = got_ids.sort(-1), idx.sort(-1)
            same = (order_got.values == order_ref.values).all(-1)
            assert same.float().mean() >= 0.9, f"layer {layer}: expert choice differs for {(~same).sum()} tokens"
            w_got = got_w.float().gather(1, order_got.indices)[same]
            w_ref = w.gather(1, order_ref.indices)[same]
            torch.testing.assert_close(w_got, w_ref, rtol=2e-2, atol=2e-2)
            if bias is not None:
                plain = arch.Routing(**{**moe.routing.__dict__, "correction_bias": False})
                changed_by_bias += (reference_route(logits, plain, None)[1].sort(-1).values != order_ref.values).any()
            if moe.routing.n_group > 1:
                flat = arch.Routing(**{**moe.routing.__dict__, "n_group": 1, "topk_group": 1})
                changed_by_groups += (reference_route(logits, flat, bias)[1].sort(-1).values != order_ref.values).any()
            if scale is not None:  # the zoo's per-expert scales are not all 1
                assert scale.std() > 0
    # the zoo's random selection bias and groups must matter, or these paths go untested downstream
    assert changed_by_bias or not moe.routing.correction_bias
    assert changed_by_groups or moe.routing.n_group == 1


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UnsupportedArchitecture) as err:
        arch.resolve({"model_type": "llama", "num_hidden_layers": 2})
    assert "'llama'" in str(err.value) and "qwen3_moe" in err.value.fix and "deepseek_v3" in err.value.fix
    assert set(arch.supported()) == set(zoo_lib.ZOO) | set(zoo_lib.NOT_IN_ZOO)  # every row is exercised or excused


def test_missing_key_and_no_moe_layers_are_clear():
    with pytest.raises(UnsupportedArchitecture, match="moe_intermediate_size"):
        arch.resolve({"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2})
    dense = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 2, "n_routed_experts": 8,
             "num_experts_per_tok": 2, "moe_intermediate_size": 64, "hidden_size": 64}
    with pytest.raises(UnsupportedArchitecture, match="no MoE layers"):
        arch.resolve(dense)


def test_hub_style_configs():
    """Keys as hub config.json files spell them (FORMATS.md §1), not as transformers 5.19 re-saves them."""
    ds = arch.resolve({
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "n_routed_experts": 256,
        "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 3,
        "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "moe_layer_freq": 1,
    })
    assert ds.moe_layers == tuple(range(3, 61)) and ds.shared_intermediate_size == 2048
    assert ds.routing == arch.Routing("sigmoid", 8, True, 8, 4, True, 2.5)
    assert ds.correction_bias_name(3) == "model.layers.3.mlp.gate.e_score_correction_bias"
    q3 = arch.resolve({
        "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 2,
        "mlp_only_layers": [5],
    })
    assert q3.moe_layers == tuple(L for L in range(1, 48, 2) if L != 5)
    assert q3.expert_names(47, 127)["down"] == "model.layers.47.mlp.experts.127.down_proj"
    mm = arch.resolve({
        "model_type": "minimax_m2", "num_hidden_layers": 62, "hidden_size": 3072, "num_local_experts": 256,
        "num_experts_per_tok": 8, "intermediate_size": 1536, "scoring_func": "sigmoid", "use_routing_bias": True,
    })
    assert mm.correction_bias_name(0) == "model.layers.0.block_sparse_moe.e_score_correction_bias"
    assert mm.expert_names(0, 0) == {f"{r}": f"model.layers.0.block_sparse_moe.experts.0.{w}"
                                     for r, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}
    nh = arch.resolve({
        "model_type": "nemotron_h", "hybrid_override_pattern": "MEM*EME", "hidden_size": 2688, "n_routed_experts": 128,
        "num_experts_per_tok": 6, "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712,
        "routed_scaling_factor": 2.5, "mlp_hidden_act": "relu2",
    })
    assert nh.moe_layers == (1, 4, 6) and not nh.gated and nh.activation == "relu2"
    assert nh.expert_names(4, 3) == {"up": "backbone.layers.4.mixer.experts.3.up_proj",
                                     "down": "backbone.layers.4.mixer.experts.3.down_proj"}
    q35 = arch.resolve({"model_type": "qwen3_5_moe", "text_config": {
        "model_type": "qwen3_5_moe_text", "num_hidden_layers": 40, "hidden_size": 2048, "num_experts": 256,
        "num_experts_per_tok": 8, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}})
    assert q35.layout == "fused" and q35.routing.renormalize and q35.moe_layers == tuple(range(40))
    assert q35.fused_names(39)["gate_up"] == "model.language_model.layers.39.mlp.experts.gate_up_proj"
    kimi = arch.resolve({"model_type": "kimi_k25", "text_config": {
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "n_routed_experts": 384,
        "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "first_k_dense_replace": 1, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 2.827}})
    assert kimi.moe_layers == tuple(range(1, 61)) and kimi.routing.routed_scaling_factor == 2.827
    assert kimi.expert_names(60, 383)["gate"] == "language_model.model.layers.60.mlp.experts.383.gate_proj"


def _qwen3_moe():
    return arch.resolve(dict(model_type="qwen3_moe", num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                             hidden_size=128, moe_intermediate_size=64))


def test_served_layer_with_the_store_layout_passes():
    arch.check_served_layer("qwen3_moe", _qwen3_moe(), 8, 128, 64, True)


@pytest.mark.parametrize("served,words", [
    (dict(num_experts=16), "qwen3_moe: the served model's routed experts differ from the store: E=16 (store 8)"),
    (dict(intermediate_size=32), "I=32 (store 64)"),
    (dict(gated=False), "qwen3_moe: the expert store holds gate and up rows per expert, the served model's experts "
                        "have up only"),
    (dict(has_bias=True), "qwen3_moe: the served model's routed experts have biases, the expert store has none"),
])
def test_served_layer_unlike_the_store_is_one_line_naming_family_and_fix(served, words):
    layer = {**dict(num_experts=8, hidden_size=128, intermediate_size=64, gated=True), **served}
    with pytest.raises(UnsupportedArchitecture) as e:
        arch.check_served_layer("qwen3_moe", _qwen3_moe(), **layer)
    assert words in e.value.message and "\n" not in str(e.value)
    assert "lvllm quantize" in e.value.fix


def test_served_layer_of_an_unknown_family_names_it_and_the_fix():
    with pytest.raises(UnsupportedArchitecture, match="'llama4' is not an MoE family lvllm knows") as e:
        arch.check_served_layer("llama4", _qwen3_moe(), 8, 128, 64, True)
    assert "stock vLLM" in e.value.fix
