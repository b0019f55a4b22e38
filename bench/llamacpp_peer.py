"""llama.cpp as the peer (issue 17): run llama-bench and llama-batched-bench on bench/gguf_random.py's GGUF, step by
step within a time budget, and write one JSON + one markdown table. bench/llamacpp_peer.sh builds the tools and calls
this.

    python bench/llamacpp_peer.py --bin BUILD/bin --model M.gguf --work /tmp/glp/results --out $OUT
                                  [--deadline EPOCH] [--threads 16,14] [--expert-vram-gb G] [--layers 48]

Steps run in priority order (steps()); each one's raw output is kept in --work, a step already there is not run
again (a second call on a warm box carries on where the first stopped), and a step is started only while at least
--min-step-s remain before --deadline; one that runs past the deadline is stopped (its raw output stays) and runs
again next call; a failed one is recorded with its exit code and not retried. Every configuration uses `-ngl 99
-fa on -lm none` (this llama.cpp's spelling of --no-mmap): experts on the CPU are `-ot exps=CPU`, some layers'
experts on the GPU `--n-cpu-moe N` (the first N layers' experts stay on the CPU). llama-bench tests are `-r 3` and
the table gives the median of the three samples; the batched bench runs each point once. Each step also records its
peak GPU memory (nvidia-smi, sampled every 0.5 s) and its peak host RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_random import SMALL, Shape, describe  # noqa: E402

BASE = ["-ngl", "99", "-fa", "on"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One llama.cpp invocation: `tool` is llama-bench or llama-batched-bench, `args` its test arguments."""
    name: str
    tool: str
    placement: list[str]
    args: list[str]
    what: str


def expert_layers_in(vram_gb: float, shape: Shape) -> int:
    """Layers whose Q4_0 experts fit vram_gb (1e9 bytes), at most all of them."""
    return min(shape.layers, int(vram_gb * 1e9 // describe(shape)["expert_bytes_per_layer"]))


# Prompt, depth and batch sizes: the (1K/8K/32K prompts, decode at 1K and 16K context, batch 1/4/16) and a
# --small set that a CPU-only build runs in seconds.
SIZES = {False: {"pp": "1024,8192,32768", "pp_part": "1024,8192", "pp_long": "8192,32768", "ub_long": 4096,
                 "depth": "0,1024,16384", "depth_part": "0,1024", "tg": 128, "npp": 1024, "npp_long": 16384},
         True: {"pp": "64,256", "pp_part": "64,256", "pp_long": "256", "ub_long": 128,
                "depth": "0,256", "depth_part": "0,256", "tg": 16, "npp": 128, "npp_long": 512}}
BATCHES = (1, 4, 16)


def steps(shape: Shape, threads: list[int], expert_vram_gb: float, small: bool) -> list[Step]:
    """The measurement plan, most important first."""
    layers = shape.layers
    z, t, tl = SIZES[small], str(threads[0]), ",".join(map(str, threads))
    tg, npl, b = str(z["tg"]), ",".join(map(str, BATCHES)), max(BATCHES)
    cpu = ["-ot", "exps=CPU"]
    bench = ["-lm", "none", "-r", "3", "-o", "jsonl", "-oe", "md"]
    batched = ["-lm", "none", "-fit", "off", "--output-format", "jsonl", "-t", t, "-ntg", tg, "-npl", npl]
    part = ["-p", z["pp_part"], "-n", tg, "-d", z["depth_part"], "-t", t] + bench
    out = [Step("cpu-decode", "llama-bench", cpu, ["-p", "0", "-n", tg, "-d", z["depth"], "-t", tl] + bench,
                "experts on the CPU: decode at depths"),
           Step("cpu-prefill", "llama-bench", cpu, ["-p", z["pp"], "-n", "0", "-t", t] + bench,
                "experts on the CPU: prefill"),
           Step("cpu-batched", "llama-batched-bench", cpu,
                ["-npp", str(z["npp"]), "-c", str(b * (z["npp"] + z["tg"]))] + batched,
                "experts on the CPU: batch 1/4/16, a prompt each"),
           # llama.cpp runs a batch of >= 32 tokens on the GPU, CPU-held experts included (op offload), copying the
           # experts each ubatch uses (ggml-backend.cpp): a larger ubatch copies them fewer times
           Step(f"cpu-prefill-ub{z['ub_long']}", "llama-bench", cpu,
                ["-p", z["pp_long"], "-n", "0", "-b", str(z["ub_long"]), "-ub", str(z["ub_long"]), "-t", t] + bench,
                f"experts on the CPU: prefill, ubatch {z['ub_long']}")]
    on_gpu = [16] if layers > 16 else []
    if expert_vram_gb > 0:
        on_gpu.insert(0, expert_layers_in(expert_vram_gb, shape))
    for k in dict.fromkeys(on_gpu):
        budget = f" ({expert_vram_gb:g} GB budget)" if k == on_gpu[0] and expert_vram_gb > 0 else ""
        out.append(Step(f"ncmoe-{layers - k}", "llama-bench", ["--n-cpu-moe", str(layers - k)], part,
                        f"{k} layers' experts on the GPU{budget}"))
    out += [Step("cpu-batched-long", "llama-batched-bench", cpu,
                 ["-npp", str(z["npp_long"]), "-c", str(z["npp_long"] + b * z["tg"]), "-pps", "-kvu"] + batched,
                 "experts on the CPU: batch 1/4/16 sharing one long prompt"),
            Step("gpu-all", "llama-bench", [], part, "everything on the GPU")]
    return out


class GpuPeak:
    """Peak `memory.used` (MiB) of GPU 0 while the block runs; None without nvidia-smi. One nvidia-smi in its own
    loop mode (-lms), not one process per sample: the tools under test use every core."""

    def __init__(self):
        self.peak: int | None = None
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self):
        for line in self._proc.stdout:
            try:
                used = int(line.split()[0])
            except (ValueError, IndexError):
                continue
            self.peak = used if self.peak is None else max(self.peak, used)

    def __enter__(self):
        try:
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                           "-i", "0", "-lms", "500"], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join()


def expected_results(step: Step) -> int:
    """How many result lines the step's arguments ask for: llama-bench runs each prompt size and each generation size at
    each depth and thread count; llama-batched-bench each (prompt, generation, batch) triple."""
    a = step.args

    def count(flag: str, zero_counts: bool = True) -> int:
        if flag not in a:
            return 1
        vals = a[a.index(flag) + 1].split(",")
        return sum(1 for v in vals if zero_counts or int(v) != 0)
    if step.tool == "llama-bench":
        return (count("-p", False) + count("-n", False)) * count("-d") * count("-t")
    return count("-npp") * count("-ntg") * count("-npl")


def run_step(step: Step, bin_dir: Path, model: Path, work: Path, timeout_s: float) -> dict:
    """Run one step, keep its stdout/stderr in work/<name>.{out,log}; the record is written last (work/<name>.json),
    and only when the tool exited by itself."""
    cmd = [str(bin_dir / step.tool), "-m", str(model)] + BASE + step.placement + step.args
    print(f"llamacpp_peer: {step.name}: {shlex.join(cmd)}", flush=True)
    t0, date = time.time(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(work / f"{step.name}.out", "w") as out, open(work / f"{step.name}.log", "w") as log, GpuPeak() as gpu:
        p = subprocess.Popen(cmd, stdout=out, stderr=log)
        try:
            _, status, usage = _wait4(p, timeout_s)
            rc, cut = os.waitstatus_to_exitcode(status), False
        except subprocess.TimeoutExpired:
            p.kill()
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = rc = os.waitstatus_to_exitcode(status)
            cut = True
    text = (work / f"{step.name}.out").read_text()
    rec = {"step": step.name, "what": step.what, "date": date, "cmd": shlex.join(cmd), "rc": rc, "cut_at_deadline": cut,
           "wall_s": round(time.time() - t0, 1), "peak_gpu_mib": gpu.peak,
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "results": parse_jsonl(text),
           "expected_results": expected_results(step)}
    if not cut:
        (work / f"{step.name}.json").write_text(json.dumps(rec, indent=1))
    status = "cut at the deadline (runs again next call)" if cut else f"rc={rc}"
    print(f"llamacpp_peer: {step.name}: {status}, {rec['wall_s']} s, {len(rec['results'])} results, "
          f"peak GPU {gpu.peak} MiB, peak RSS {rec['peak_rss_gib']} GiB", flush=True)
    if len(rec["results"]) != rec["expected_results"] and not cut:
        print(f"llamacpp_peer: {step.name}: {len(rec['results'])} results, {rec['expected_results']} asked for "
              f"(see {work / (step.name + '.log')})", flush=True)
    if rc != 0 and not cut:
        print(f"llamacpp_peer: {step.name} failed; last lines of {work / (step.name + '.log')}:\n"
              + "\n".join((work / f"{step.name}.log").read_text().splitlines()[-15:]), flush=True)
    return rec


def _wait4(p: subprocess.Popen, timeout_s: float):
    """os.wait4 with a timeout (for the child's own peak RSS, which Popen.wait does not give)."""
    end = time.time() + timeout_s
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.time() > end:
            raise subprocess.TimeoutExpired(p.args, timeout_s)
        time.sleep(0.2)


def parse_jsonl(text: str) -> list[dict]:
    """The result objects of `llama-bench -o jsonl` or `llama-batched-bench --output-format jsonl` in `text` (other
    lines, e.g. logs, are skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def rows(rec: dict) -> list[dict]:
    """Table rows of one step's record: llama-bench tests as pp/tg with the median of their samples, batched-bench
    points as batch size with prompt and decode speeds."""
    out = []
    for r in rec["results"]:
        if "samples_ts" in r:
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            if r["n_depth"]:
                test += f" @ d{r['n_depth']}"
            s = r["samples_ts"]
            out.append({"step": rec["step"], "test": test, "threads": r["n_threads"],
                        "tok_s": round(statistics.median(s), 1), "min": round(min(s), 1), "max": round(max(s), 1),
                        "n": len(s)})
        elif "speed_tg" in r:
            out.append({"step": rec["step"], "test": f"B{r['pl']} pp{r['pp']} tg{r['tg']}"
                        + (" (shared prompt)" if r.get("is_pp_shared") else ""),
                        "threads": r["n_threads"], "prefill_tok_s": round(r["speed_pp"], 1),
                        "decode_tok_s": round(r["speed_tg"], 1), "n": 1})
    return out


def markdown(recs: list[dict], box: dict) -> str:
    dates = sorted(rec["date"] for rec in recs) or ["-"]
    head = (f"llama.cpp {box.get('build_commit') or '?'} (sdist llama_cpp_python-0.3.36), "
            f"{box.get('gpu_info') or '?'}, {box.get('cpu_info') or '?'} ({box['cpus']} cpus), measured {dates[0]}"
            f"{' - ' + dates[-1] if dates[-1] != dates[0] else ''}; random Q4_0 experts (4.5 bits/weight; lvllm INT4 "
            "g128: 4.125, g32: 4.5), BF16 rest; -ngl 99 -fa on -lm none\n\n")
    lines = ["| step | placement | test | threads | tok/s (median) | min-max | peak GPU MiB | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for rec in recs:
        if rec["rc"] != 0:
            lines.append(f"| {rec['step']} | {rec['what']} | failed, rc={rec['rc']} (raw/{rec['step']}.log) "
                         "| | | | | |")
        for r in rows(rec):
            if "tok_s" in r:
                val, spread = f"{r['tok_s']}", f"{r['min']}-{r['max']} (n={r['n']})"
            else:
                val, spread = f"decode {r['decode_tok_s']} (prefill {r['prefill_tok_s']})", "1 run"
            lines.append(f"| {rec['step']} | {rec['what']} | {r['test']} | {r['threads']} | {val} | {spread} | "
                         f"{rec['peak_gpu_mib']} | {rec['peak_rss_gib']} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, required=True, help="folder with llama-bench and llama-batched-bench")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="raw outputs and finished steps (kept between calls)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deadline", type=float, default=0, help="epoch seconds; 0 = none")
    ap.add_argument("--min-step-s", type=float, default=40)
    ap.add_argument("--threads", default="16,14", help="first = all steps, all = the decode step")
    ap.add_argument("--expert-vram-gb", type=float, default=0, help="GPU bytes (1e9) for whole layers' experts")
    ap.add_argument("--layers", type=int, help="the GGUF's layers, as given to gguf_random.py (default its)")
    ap.add_argument("--small", action="store_true", help="the GGUF is gguf_random.py --small; short prompts")
    ap.add_argument("--only", default="", help="comma-separated step names (default: all; none: just the table)")
    args = ap.parse_args(argv)
    for tool in ("llama-bench", "llama-batched-bench"):
        if not os.access(args.bin / tool, os.X_OK):
            sys.exit(f"llamacpp_peer: no {tool} in {args.bin}: build it first (bash bench/llamacpp_peer.sh)")
    if not args.model.is_file():
        sys.exit(f"llamacpp_peer: no model at {args.model}: write it with bench/gguf_random.py")
    threads = [int(x) for x in args.threads.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SMALL if args.small else Shape()
    shape = dataclasses.replace(shape, layers=args.layers or shape.layers)
    plan = steps(shape, threads, args.expert_vram_gb, args.small)
    if args.only:
        names, known = args.only.split(","), [s.name for s in plan]
        if unknown := [n for n in names if n not in known and n != "none"]:
            sys.exit(f"llamacpp_peer: no step {', '.join(unknown)}: --only takes none or some of {', '.join(known)}")
        plan = [s for s in plan if s.name in names]
    cut = False
    for step in plan:
        if (args.work / f"{step.name}.json").exists():
            print(f"llamacpp_peer: {step.name}: done in an earlier call, kept", flush=True)
            continue
        left = args.deadline - time.time() if args.deadline else float("inf")
        if cut or left < args.min_step_s:
            print(f"llamacpp_peer: {step.name}: not started, {max(left, 0):.0f} s left; run the same command again "
                  "on the warm box to carry on", flush=True)
            continue
        cut = run_step(step, args.bin, args.model, args.work, left)["cut_at_deadline"]
    recs = [json.loads((args.work / f"{s.name}.json").read_text()) for s in plan
            if (args.work / f"{s.name}.json").exists()]
    first = next((r for rec in recs for r in rec["results"] if "build_commit" in r), {})
    box = {k: first.get(k) for k in ("build_commit", "cpu_info", "gpu_info", "backends", "model_size",
                                     "model_n_params")}
    box["cpus"] = os.cpu_count()
    doc = {"box": box, "gguf": describe(shape),
           "steps": recs, "rows": [r for rec in recs for r in rows(rec)]}
    (args.out / "llamacpp_peer.json").write_text(json.dumps(doc, indent=1))
    table = markdown(recs, box)
    (args.out / "llamacpp_peer.md").write_text(table)
    print(table, flush=True)
    missing = [s.name for s in plan if not (args.work / f"{s.name}.json").exists()]
    if missing:
        print(f"llamacpp_peer: not done yet: {', '.join(missing)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
