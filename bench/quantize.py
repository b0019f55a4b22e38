"""Benchmark `lvllm quantize` on a generated checkpoint with Qwen3-30B-A3B expert shapes (E=128, H=2048, I=768).

Writes a BF16 and a DeepSeek-style FP8-block source (one shard per layer + index, experts only; >= 4 GB each by
default), measures the sequential read speed of those same files, then runs `lvllm quantize --json` on each in a
subprocess (its own peak RSS and CPU seconds: on a shared machine GB per CPU-second says what the cores would do
alone) and prints a table: source GB/s, output GB/s, peak RSS.

The same conversion with llm-compressor's `model_free_ptq` (W4A16: symmetric INT4, group 128, RTN; targets the
routed experts' projections by name, the only tensors these sources hold; FP8 through compressed-tensors'
`FP8BlockDequantizer`) runs as extra rows when an interpreter with llmcompressor is given (`--ptq-python`, default
the calibration venv `.venv-cal`): this script re-runs itself there (`--model-free-ptq SRC OUT`), timed and
measured like lvllm's run, and the packed INT4 of a few experts is compared with lvllm's store.

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


EXPERTS_RE = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"
PTQ_PYTHON = Path(__file__).resolve().parents[1] / ".venv-cal" / "bin" / "python"


def ptq_child(src: Path, out: Path, workers: int) -> None:
    """Runs in the llmcompressor interpreter: model_free_ptq W4A16 on the experts of `src`; prints a JSON line with
    its wall seconds, peak RSS (VmHWM) and peak anonymous RSS (sampled every 20 ms), as lvllm's summary has them."""
    import threading

    import llmcompressor
    from compressed_tensors.entrypoints.convert import FP8BlockDequantizer
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor import model_free_ptq

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    peak_anon, done = [status("RssAnon")], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))

    fp8 = (json.loads((src / "config.json").read_text()).get("quantization_config") or {}).get("quant_method") == "fp8"
    converter = FP8BlockDequantizer(targets=[EXPERTS_RE], weight_block_size=(FP8_BLOCK, FP8_BLOCK)) if fp8 else None
    shutil.rmtree(out, ignore_errors=True)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    model_free_ptq(src, out, scheme=preset_name_to_scheme("W4A16", [EXPERTS_RE]), max_workers=workers, device="cpu",
                   converter=converter)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": status("VmHWM"), "peak_anon_rss_bytes": peak_anon[0],
                      "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
                      "version": llmcompressor.__version__, "max_workers": workers, "fp8_converter": fp8}))


def run_model_free_ptq(python: Path, src: Path, out: Path, workers: int) -> dict:
    """`ptq_child` in a subprocess of the llmcompressor interpreter; adds its CPU seconds and the load average."""
    cmd = [str(python), str(Path(__file__).resolve()), "--model-free-ptq", str(src), str(out), "--ptq-workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    res["load_avg"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    return res


def same_int4(store_dir: Path, ptq_dir: Path, layer: int = 0) -> bool:
    """Whether lvllm's store (1 node) and model_free_ptq's output hold the same packed codes and scales for the
    first and last expert of `layer` (gate, up and down)."""
    from safetensors import safe_open

    from lvllm_runtime.store import ExpertStore

    shard = ExpertStore.open(store_dir).layer(layer, 0)
    index = json.loads((ptq_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for e in (0, E - 1):
        base = f"model.layers.{layer}.mlp.experts.{e}"
        got = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for part in ("weight_packed", "weight_scale"):
                name = f"{base}.{proj}.{part}"
                with safe_open(ptq_dir / index[name], "pt") as f:
                    got[(proj, part)] = f.get_tensor(name)
        mine13 = (torch.cat([got[("gate_proj", "weight_packed")], got[("up_proj", "weight_packed")]]),
                  torch.cat([got[("gate_proj", "weight_scale")], got[("up_proj", "weight_scale")]]))
        if not (torch.equal(shard["w13.packed"][e], mine13[0]) and torch.equal(shard["w13.scale"][e], mine13[1].bfloat16())
                and torch.equal(shard["w2.packed"][e], got[("down_proj", "weight_packed")])
                and torch.equal(shard["w2.scale"][e], got[("down_proj", "weight_scale")].bfloat16())):
            return False
    return True


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _row(tool: str, name: str, layers: int, size: int, read_gbs: float, res: dict, input_bytes: int) -> dict:
    return {
        "tool": tool, "source": name, "layers": layers, "source_bytes": size, "sequential_read_gb_s": round(read_gbs, 3),
        "source_gb_s": round(input_bytes / res["seconds"] / GB, 3),
        "output_gb_s": round(res["output_bytes"] / res["seconds"] / GB, 3),
        "seconds": round(res["seconds"], 2), "output_bytes": res["output_bytes"], "cpu_s": round(res["cpu_s"], 1),
        "source_gb_per_cpu_s": round(input_bytes / res["cpu_s"] / GB, 3), "load_avg": res["load_avg"],
        "peak_rss_mib": round(res["peak_rss_bytes"] / 2**20), "peak_anon_rss_mib": round(res["peak_anon_rss_bytes"] / 2**20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lvllm-bench-quantize"))
    ap.add_argument("--layers", type=int, default=4, help="BF16 layers (FP8 gets twice as many: same bytes)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=Path("bench/results/quantize.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and stores")
    ap.add_argument("--ptq-python", type=Path, default=PTQ_PYTHON, help="interpreter with llmcompressor ('' skips it)")
    ap.add_argument("--ptq-workers", type=int, default=1,
                    help="model_free_ptq max_workers: shards in flight (each holds a whole 1.2 GB shard and its copies)")
    ap.add_argument("--model-free-ptq", nargs=2, type=Path, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model_free_ptq:
        ptq_child(*args.model_free_ptq, args.ptq_workers)
        return
    ptq_python = args.ptq_python if str(args.ptq_python) and args.ptq_python.is_file() else None

    rows, notes = [], []
    for name, fp8, layers in (("bf16", False, args.layers), ("fp8_block", True, 2 * args.layers)):
        src = args.workdir / f"src-{name}"
        size = write_checkpoint(src, layers, fp8)
        read_gbs = sequential_read(sorted(src.glob("*.safetensors")))
        store = args.workdir / f"store-{name}"
        res = run_quantize(src, store, args.workers, "int4")
        rows.append(dict(_row("lvllm", name, layers, size, read_gbs, res, res["input_bytes"]),
                         max_rel_error=round(res["verify"]["max_rel_error"], 4)))
        if ptq_python is not None:
            ptq_out = args.workdir / f"ptq-{name}"
            ptq = run_model_free_ptq(ptq_python, src, ptq_out, args.ptq_workers)
            if "error" in ptq:
                notes.append(f"model_free_ptq on {name}: failed: {ptq['error']}")
            else:
                rows.append(dict(_row("model_free_ptq", name, layers, size, read_gbs, ptq, size),
                                 version=ptq["version"], max_workers=ptq["max_workers"],
                                 same_int4_as_lvllm=same_int4(store, ptq_out)))
            if not args.keep:
                shutil.rmtree(ptq_out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)

    hdr = (f"{'tool':14} {'source':10} {'GB':>6} {'seq read GB/s':>13} {'source GB/s':>11} {'output GB/s':>11} {'s':>7} "
           f"{'CPU s':>7} {'GB/CPU-s':>8} {'load':>9} {'peak RSS MiB':>12} {'anon MiB':>8} {'rel err / same':>14}")
    print(hdr)
    for r in rows:
        load = "%.1f->%.1f" % tuple(r["load_avg"])
        last = f"{r['max_rel_error']:.4f}" if "max_rel_error" in r else ("same INT4" if r["same_int4_as_lvllm"] else "DIFFERS")
        print(f"{r['tool']:14} {r['source']:10} {r['source_bytes'] / GB:6.2f} {r['sequential_read_gb_s']:13.2f} "
              f"{r['source_gb_s']:11.3f} {r['output_gb_s']:11.3f} {r['seconds']:7.1f} {r['cpu_s']:7.1f} "
              f"{r['source_gb_per_cpu_s']:8.3f} {load:>9} {r['peak_rss_mib']:12d} {r['peak_anon_rss_mib']:8d} {last:>14}")
    if ptq_python is None:
        notes.append(f"model_free_ptq: no interpreter at {args.ptq_python} (no rows)")
    for n in notes:
        print(n)
    doc = {
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {"E": E, "H": H, "I": I, "workers": args.workers, "format": "int4", "group": "auto",
                   "ptq_workers": args.ptq_workers, "ptq_scheme": "W4A16", "ptq_targets": EXPERTS_RE},
        "results": rows, "notes": notes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
