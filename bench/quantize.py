"""Benchmark `lvllm quantize` on a generated checkpoint with Qwen3-30B-A3B expert shapes (E=128, H=2048, I=768).

Writes a BF16 and a DeepSeek-style FP8-block source (one shard per layer + index, experts only; >= 4 GB each by
default), measures the sequential read speed of those same files, then runs `lvllm quantize --json` on each in a
subprocess (its own peak RSS and CPU seconds: on a shared machine GB per CPU-second says what the cores would do
alone) and prints a table: source GB/s, output GB/s, peak RSS. llm-compressor's
`model_free_ptq` gets a column only when it is installed.

    python bench/quantize.py                      # 4 BF16 layers (4.8 GB) + 8 FP8 layers (4.9 GB), ~10 GB disk
    python bench/quantize.py --layers 1 --workdir /tmp/qb   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lvllm_runtime.manifest import file_layout  # noqa: E402

E, H, I = 128, 2048, 768
FP8_BLOCK = 128
GB = 1e9


def _config(layers: int, fp8: bool) -> dict:
    cfg = {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": layers,
        "hidden_size": H, "moe_intermediate_size": I, "intermediate_size": 6144, "num_experts": E,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "torch_dtype": "bfloat16",
    }
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    return cfg


def _pool(fp8: bool, seed: int = 0) -> torch.Tensor:
    """A 64M-element block of weights every tensor is a window of (generating 5 GB of randn would dominate)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64 << 20, generator=g) * 0.02
    return (w / (0.02 * 4 / 448)).to(torch.float8_e4m3fn) if fp8 else w.to(torch.bfloat16)


def write_checkpoint(out: Path, layers: int, fp8: bool) -> int:
    """Streams one safetensors shard per layer; returns the total bytes of the shards."""
    if (out / "done").is_file():
        return int((out / "done").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pool = _pool(fp8)
    weight_map, total = {}, 0
    scale_g = torch.Generator().manual_seed(1)
    for layer in range(layers):
        fname = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        specs, data = [], []
        for e in range(E):
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                base = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                n = shape[0] * shape[1]
                start = (layer * 7919 + e * 104729 + len(proj) * 15485863) % (pool.numel() - n)
                w = pool[start : start + n].view(shape)
                specs.append((base + ".weight", "F8_E4M3" if fp8 else "BF16", shape))
                data.append(w)
                if fp8:
                    s = torch.rand(-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK), generator=scale_g) * 1e-4 + 1e-4
                    specs.append((base + ".weight_scale_inv", "F32", tuple(s.shape)))
                    data.append(s)
        raw, _, size = file_layout(specs, {"format": "pt"})
        with open(out / fname, "wb") as f:
            f.write(raw)
            for t in data:
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        weight_map.update({n: fname for n, _, _ in specs})
        total += size
    (out / "config.json").write_text(json.dumps(_config(layers, fp8), indent=1))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "done").write_text(str(total))
    return total


def sequential_read(paths: list[Path]) -> float:
    """GB/s reading the files once, 16 MiB at a time (whatever of them the page cache holds comes from there)."""
    buf = bytearray(16 << 20)
    n, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n / (time.perf_counter() - t0) / GB


def run_quantize(src: Path, out: Path, workers: int, fmt: str) -> dict:
    """`lvllm quantize --json` in a subprocess; adds the CPU seconds it used and the load average around it."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", "from lvllm_cli.app import main; main()", "quantize", str(src), str(out),
           "--format", fmt, "--workers", str(workers), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"lvllm quantize failed: {proc.stderr.strip()}")
    res = json.loads(proc.stdout)
    res["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    res["load_avg"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    return res


def model_free_ptq_available() -> str | None:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return None
    return getattr(llmcompressor, "__version__", "installed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lvllm-bench-quantize"))
    ap.add_argument("--layers", type=int, default=4, help="BF16 layers (FP8 gets twice as many: same bytes)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=Path("bench/results/quantize.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and stores")
    args = ap.parse_args()

    rows = []
    for name, fp8, layers in (("bf16", False, args.layers), ("fp8_block", True, 2 * args.layers)):
        src = args.workdir / f"src-{name}"
        t0 = time.perf_counter()
        size = write_checkpoint(src, layers, fp8)
        gen_s = time.perf_counter() - t0
        read_gbs = sequential_read(sorted(src.glob("*.safetensors")))
        res = run_quantize(src, args.workdir / f"store-{name}", args.workers, "int4")
        rows.append({
            "source": name, "layers": layers, "source_bytes": size, "generate_s": round(gen_s, 1),
            "sequential_read_gb_s": round(read_gbs, 3),
            "source_gb_s": round(res["input_bytes"] / res["seconds"] / GB, 3),
            "output_gb_s": round(res["output_bytes"] / res["seconds"] / GB, 3),
            "seconds": res["seconds"], "output_bytes": res["output_bytes"], "cpu_s": round(res["cpu_s"], 1),
            "source_gb_per_cpu_s": round(res["input_bytes"] / res["cpu_s"] / GB, 3), "load_avg": res["load_avg"],
            "peak_rss_mib": round(res["peak_rss_bytes"] / 2**20), "peak_anon_rss_mib": round(res["peak_anon_rss_bytes"] / 2**20),
            "max_rel_error": round(res["verify"]["max_rel_error"], 4),
        })
        if not args.keep:
            shutil.rmtree(args.workdir / f"store-{name}", ignore_errors=True)

    ptq = model_free_ptq_available()
    hdr = (f"{'source':10} {'GB':>6} {'seq read GB/s':>13} {'source GB/s':>11} {'output GB/s':>11} {'s':>7} {'CPU s':>7} "
           f"{'GB/CPU-s':>8} {'load':>9} {'peak RSS MiB':>12} {'anon MiB':>8} {'rel err':>7}")
    print(hdr)
    for r in rows:
        load = "%.0f->%.0f" % tuple(r["load_avg"])
        print(f"{r['source']:10} {r['source_bytes'] / GB:6.2f} {r['sequential_read_gb_s']:13.2f} {r['source_gb_s']:11.3f} "
              f"{r['output_gb_s']:11.3f} {r['seconds']:7.1f} {r['cpu_s']:7.1f} {r['source_gb_per_cpu_s']:8.3f} {load:>9} "
              f"{r['peak_rss_mib']:12d} {r['peak_anon_rss_mib']:8d} {r['max_rel_error']:7.4f}")
    print("model_free_ptq:", f"llmcompressor {ptq} is installed but not wired here" if ptq else "llmcompressor is not installed (no column)")
    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "config": {"E": E, "H": H, "I": I, "workers": args.workers, "format": "int4", "group": "auto"},
        "model_free_ptq": ptq, "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
