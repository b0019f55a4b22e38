"""INT4 expert quality: round-to-nearest against llm-compressor's GPTQ and AWQ (and its model_free_ptq RTN), on a
zoo qwen3_moe scaled to Qwen3-30B-A3B expert shapes (H 2048, expert I 768; fewer experts and layers, see --experts).

Each method runs in its own child process (time and peak RSS are that process's) and ends in an lvllm expert store
(RTN: `lvllm quantize`'s streaming path; GPTQ/AWQ: `calibrate.calibrate` on the bundled calibration set, then the
pass-through; model_free_ptq: its checkpoint, then the pass-through). Quality is measured in float32 against the BF16
model on held-out text that is not in the calibration set:

  - per-layer MoE output relative error ||moe_q(x) - moe(x)|| / ||moe(x)||, x = that layer's MoE input in the BF16
    model (so the layer's own error, not the accumulated one);
  - the final logits' KL(P_bf16 || P_q), mean over tokens, with every MoE layer's experts replaced.

    .venv-cal/bin/python bench/quant_quality.py --out bench/results/quant_quality     # needs llm-compressor

`--max-memory-check` instead runs `lvllm quantize --method gptq --max-memory X` on a model of --layers layers with X
below what keeping every layer in RAM needs (weights offloaded to disk), then with X too small for one layer
(refused before loading), and prints the prediction next to the lvllm process's measured peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lvllm_runtime import zoo  # noqa: E402
from lvllm_runtime.store import ExpertStore  # noqa: E402

METHODS = ("rtn-g128", "rtn-g32", "gptq-g128", "awq-g128", "model_free_ptq-g128")
HELD_OUT = [  # written for this bench; none of it is in lvllm_runtime/calibration_data.jsonl
    "The harbour was quiet before sunrise. Two fishermen mended a net on the pier while gulls waited on the posts, "
    "and a ferry horn sounded somewhere behind the fog. By seven the cafe opened and the first buses arrived.",
    "Ein Zug fährt um acht Uhr ab und kommt um halb elf an. Wer früher reisen will, nimmt den Bus, der aber oft "
    "im Stau steht. Die Fahrkarten gelten den ganzen Tag und können am Automaten gekauft werden.",
    "def mean_and_variance(xs):\n    n = len(xs)\n    mu = sum(xs) / n\n    var = sum((x - mu) ** 2 for x in xs) / n\n"
    "    return mu, var\n\nprint(mean_and_variance([2.0, 4.0, 4.0, 5.0]))",
    "Les étudiants ont présenté leur projet devant le jury : une petite station météo qui envoie la température et "
    "l'humidité toutes les dix minutes. Le jury a surtout apprécié la documentation claire.",
    "猫がこたつの中で丸くなって眠っている。外は雪が降り続いていて、道路はもう真っ白だ。",
    "Q: How many seconds are in a day? A: 24 hours times 60 minutes times 60 seconds, which is 86400 seconds.",
]


def build_model(root: Path, experts: int, layers: int, top_k: int) -> Path:
    return zoo.build("qwen3_moe", root / f"qwen3_moe-30b-shapes-e{experts}-l{layers}", "bf16", seed=0,
                     hidden_size=2048, moe_intermediate_size=768, intermediate_size=768, num_experts=experts,
                     num_experts_per_tok=top_k, num_hidden_layers=layers)


# --- one method, in a child process -----------------------------------------------------------------------------


def run_method(method: str, model: Path, work: Path, samples: int, seq_len: int) -> dict:
    from lvllm_runtime.quantize import QuantizeOptions, quantize

    kind, group = method.rsplit("-g", 1)
    group = int(group)
    t0 = time.monotonic()
    source = model
    if kind in ("gptq", "awq"):
        from lvllm_runtime import calibrate

        source = calibrate.calibrate(model, work / "ct", kind, group, None, samples, seq_len)
    elif kind == "model_free_ptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor import model_free_ptq

        from lvllm_runtime.calibrate import EXPERT_RE

        scheme = QuantizationScheme(targets=[EXPERT_RE], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
        model_free_ptq(str(model), str(work / "ct"), scheme=scheme)
        source = work / "ct"
    quantize(source, work / "store", QuantizeOptions(group_size=group))
    return {"method": method, "seconds": round(time.monotonic() - t0, 2),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "store": str(work / "store")}


# --- quality ------------------------------------------------------------------------------------------------------


def held_out_ids(model: Path, seq_len: int) -> torch.Tensor:
    """int64 [n, seq_len]: the held-out paragraphs, tokenized and cut into windows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids: list[int] = []
    for text in HELD_OUT:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def load_f32(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def set_experts(lm, store: ExpertStore) -> None:
    """Replace each MoE layer's expert weights with the store's, dequantized to float32 (transformers' fused
    layout: gate_up_proj [E, 2I, H] gate rows first, down_proj [E, H, I])."""
    man = store.manifest
    for layer in man.moe_layers:
        experts = lm.model.layers[layer].mlp.experts
        with torch.no_grad():
            for e in range(man.num_experts):
                w13, w2 = store.expert(layer, e)
                experts.gate_up_proj[e].copy_(w13)
                experts.down_proj[e].copy_(w2)


def moe_io(lm, ids: torch.Tensor) -> tuple[dict[int, list], torch.Tensor]:
    """The inputs and outputs of every MoE block (per layer, per batch row) and the logits [n, T, V]."""
    io: dict[int, list] = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out, i=i: io.setdefault(i, []).append((a[0], out)))
             for i, layer in enumerate(lm.model.layers)]
    with torch.no_grad():
        logits = torch.cat([lm(input_ids=row[None]).logits for row in ids])
    for h in hooks:
        h.remove()
    return io, logits


def quality(lm, store: ExpertStore, ids: torch.Tensor, ref_io: dict, ref_logits: torch.Tensor) -> dict:
    set_experts(lm, store)
    layers = {}
    with torch.no_grad():
        for i, pairs in ref_io.items():
            num = sum(((lm.model.layers[i].mlp(x) - y).norm() ** 2).item() for x, y in pairs)
            den = sum((y.norm() ** 2).item() for _, y in pairs)
            layers[i] = (num / den) ** 0.5
        _, logits = moe_io(lm, ids)
    logp_ref = torch.log_softmax(ref_logits.double(), -1)
    kl = (logp_ref.exp() * (logp_ref - torch.log_softmax(logits.double(), -1))).sum(-1).mean().item()
    return {"moe_rel_error": layers, "logit_kl": kl}


# --- --max-memory-check: calibrating a model whose layers do not all fit ---------------------------------------


def max_memory_check(out: Path, experts: int, layers: int, top_k: int, samples: int, seq_len: int) -> dict:
    """`lvllm quantize --method gptq --max-memory X` with X below the in-RAM prediction (weights offloaded to disk)
    and a too-small X (refused before loading): predicted vs measured peak RSS of the lvllm process."""
    from lvllm_runtime import calibrate

    model = build_model(out, experts, layers, top_k)
    # The estimate counts the calling process as it is then, so it is made in a fresh process that has done what
    # `calibrate` has done before estimating (llm-compressor imported, tokenizer loaded), not in this one, which
    # holds the model it just built.
    probe = ("import json, sys; from dataclasses import asdict; from transformers import AutoTokenizer; "
             "from lvllm_runtime import calibrate; from lvllm_runtime.checkpoint import Checkpoint; "
             "calibrate.require_llmcompressor(); AutoTokenizer.from_pretrained(sys.argv[1]); est = "
             "calibrate.estimate_memory(Checkpoint.open(sys.argv[1]), 'gptq', int(sys.argv[2]), int(sys.argv[3]), None); "
             "print(json.dumps({**asdict(est), 'working_set': est.working_set, 'in_ram': est.in_ram}))")
    est = json.loads(subprocess.run([sys.executable, "-c", probe, str(model), str(samples), str(seq_len)], check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1])
    runs = {}
    for name, limit in (("too_small", est["working_set"] // 2), ("offloaded", est["working_set"] + est["weights"] // 4)):
        store = out / f"maxmem-{name}"
        subprocess.run(["rm", "-rf", str(store), f"{store}.calibrated"], check=True)
        cmd = [str(Path(sys.executable).with_name("lvllm")), "quantize", str(model), str(store), "--method", "gptq",
               "--max-memory", str(limit), "--calibration-samples", str(samples), "--calibration-seq-len",
               str(seq_len), "--numa-nodes", "1", "--group-size", "128"]
        log = out / f"maxmem-{name}.log"
        t0 = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # the lvllm process's own peak RSS, not this one's
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        run = {"max_memory_bytes": limit, "exit_code": os.waitstatus_to_exitcode(status),
               "seconds": round(time.monotonic() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
               "last_line": lines[-1] if lines else "", "store_written": store.exists()}
        record = calibrate.read_record(f"{store}.calibrated")
        if record:
            run.update(record["memory"])
            run["peak_within_prediction"] = run["peak_rss_bytes"] <= record["memory"]["predicted_peak_bytes"]
        runs[name] = run
        print(f"{name}: {json.dumps(run)}", file=sys.stderr)
    return {"model": {"experts": experts, "layers": layers, "top_k": top_k},
            "calibration": {"samples": samples, "seq_len": seq_len},
            "estimate": est,
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant_quality"))
    ap.add_argument("--experts", type=int, default=16, help="routed experts per layer (Qwen3-30B-A3B has 128)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4, help="calibration samples (GPTQ and AWQ alike)")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration tokens per sample")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: run this method, print JSON
    ap.add_argument("--max-memory-check", action="store_true",
                    help="instead: lvllm quantize --method gptq under a --max-memory the layers do not all fit in, and "
                         "under one too small for one layer; predicted vs measured peak")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.max_memory_check:
        report = max_memory_check(args.out, args.experts, args.layers, args.top_k, args.samples, args.seq_len)
        (args.out / "max_memory_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
        return
    model = build_model(args.out, args.experts, args.layers, args.top_k)
    if args.one:
        work = args.out / args.one
        print(json.dumps(run_method(args.one, model, work, args.samples, args.seq_len)))
        return

    runs = []
    for method in args.methods.split(","):
        work = args.out / method
        if (work / "run.json").is_file():  # reused only when made with this calibration
            done = json.loads((work / "run.json").read_text())
            if done.get("calibration") == [args.samples, args.seq_len]:
                runs.append(done)
                continue
        subprocess.run(["rm", "-rf", str(work)], check=True)
        cmd = [sys.executable, __file__, "--out", str(args.out), "--experts", str(args.experts), "--top-k",
               str(args.top_k), "--layers", str(args.layers), "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--one", method]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            runs.append({"method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            print(f"{method}: failed: {runs[-1]['error']}", file=sys.stderr)
            continue
        runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "calibration": [args.samples, args.seq_len],
                     "load_average": os.getloadavg()})
        (work / "run.json").write_text(json.dumps(runs[-1]))
        print(f"{method}: {runs[-1]['seconds']} s", file=sys.stderr)

    ids = held_out_ids(model, 64)
    lm = load_f32(model)
    ref_io, ref_logits = moe_io(lm, ids)
    for run in runs:
        if "store" in run:
            run.update(quality(lm, ExpertStore.open(run["store"]), ids, ref_io, ref_logits))
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": {"family": "qwen3_moe (zoo, random weights)", "hidden": 2048, "expert_intermediate": 768,
                  "experts": args.experts, "top_k": args.top_k, "layers": args.layers},
        "calibration": {"set": "bundled", "samples": args.samples, "seq_len": args.seq_len},
        "held_out": {"sequences": ids.shape[0], "tokens_each": ids.shape[1]},
        "runs": runs,
    }
    (args.out / "quant_quality.json").write_text(json.dumps(report, indent=2))
    print(f"| method | MoE rel. error per layer | logit KL | time s | peak RSS MiB |\n|---|---|---|---|---|")
    for r in runs:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} | | | |")
            continue
        errs = " / ".join(f"{v:.4f}" for v in r["moe_rel_error"].values())
        print(f"| {r['method']} | {errs} | {r['logit_kl']:.3e} | {r['seconds']} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
