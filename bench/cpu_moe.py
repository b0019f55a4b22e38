"""Benchmark one MoE layer on the CPU: lvllm's engine next to a plain torch implementation and kt-kernel.

Prints a table and writes JSON: time per layer, effective GB/s of expert weights read, GFLOP/s, and the read
bandwidth the engine's own pinned threads measure on this machine (the decode roofline). Layers are cycled and
routing is random per step so weights never sit in cache (working set >= 8 x L3).

    python bench/cpu_moe.py                      # full shapes (needs ~20 GB RAM for DeepSeek-V3 BF16)
    python bench/cpu_moe.py --reduced            # fewer experts/layers, short runs: a few minutes on 2 cores
    python bench/cpu_moe.py --kt-ext PATH.so     # add kt-kernel (its kt_kernel_ext extension, loaded by path)
    python bench/cpu_moe.py --fp32-act           # INT4 without int8 activations (the kernels before the int8 ones)
    python bench/cpu_moe.py --repeat 3           # each configuration 3 times in this process: median and spread

The header and the JSON name the box (CPU model, microcode, L3 as this process sees it, the kernel table chosen) so
numbers from two boxes of the same kind can be told apart; each row names the kernel paths its last forward took.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lvllm_runtime.engine import Engine  # noqa: E402

SHAPES = {  # published layer shapes: experts, top-k, hidden, expert intermediate
    "qwen3-30b-a3b": dict(E=128, k=8, H=2048, I=768),
    "deepseek-v3": dict(E=256, k=8, H=7168, I=2048),
}
REDUCED_EXPERTS = {"qwen3-30b-a3b": 16, "deepseek-v3": 8}


def l3_bytes() -> int:
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (p / "level").read_text().strip() == "3":
                txt = (p / "size").read_text().strip()
                best = max(best, int(txt.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1))
        except OSError:
            pass
    return best or 32 << 20


def expert_bytes(fmt: str, H: int, I: int, g: int) -> int:
    """Bytes of one expert as stored (INT4: nibbles + bf16 scales; BF16: 2 per weight)."""
    n = 3 * H * I
    return n // 2 + 2 * n // g if fmt == "int4" else 2 * n


def make_layer(fmt: str, E: int, H: int, I: int, g: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights in the store layout (DESIGN.md); scales chosen so outputs stay O(1)."""
    if fmt == "int4":
        def packed(*shape):
            return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)
        return {"w13.packed": packed(E, 2 * I, H // 8), "w13.scale": torch.full((E, 2 * I, H // g), 0.2 / H**0.5).bfloat16(),
                "w2.packed": packed(E, H, I // 8), "w2.scale": torch.full((E, H, I // g), 0.2 / I**0.5).bfloat16()}
    return {"w13": (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16(),
            "w2": (torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16()}


def dequant(packed: torch.Tensor, scale: torch.Tensor, g: int, dtype=torch.float32) -> torch.Tensor:
    u = (packed.unsqueeze(-1) >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF
    q = u.reshape(*packed.shape[:-1], -1).to(torch.float32) - 8
    return (q * scale.float().repeat_interleave(g, dim=-1)).to(dtype)


def torch_moe(x, ids, w, layer, fmt, g, out):
    """Plain torch: per routed expert, gather its tokens, two matmuls, scatter-add. INT4 experts are dequantized to
    fp32 on the fly (torch has no int4 matmul on the CPU); BF16 experts multiply in bf16."""
    I = (layer["w2.packed"].shape[-1] * 8) if fmt == "int4" else layer["w2"].shape[-1]
    acc = torch.zeros(out.shape, dtype=torch.float32)
    for e in torch.unique(ids).tolist():
        t, j = torch.nonzero(ids == e, as_tuple=True)
        if fmt == "int4":
            w13 = dequant(layer["w13.packed"][e], layer["w13.scale"][e], g)
            w2 = dequant(layer["w2.packed"][e], layer["w2.scale"][e], g)
        else:
            w13, w2 = layer["w13"][e], layer["w2"][e]
        z = x[t].to(w13.dtype) @ w13.T
        h = F.silu(z[:, :I]) * z[:, I:]
        acc.index_add_(0, t, (h.to(w2.dtype) @ w2.T).float() * w[t, j].unsqueeze(1))
    out.copy_(acc)


class KtLayer:
    """kt-kernel's standalone MoE (AMXBF16_MOE / AMXInt4_MOE), quantized by kt itself from the same BF16 weights."""

    def __init__(self, ext, cpuinfer, fmt, E, k, H, I, layer, g, max_len):
        if fmt == "int4":
            w13 = dequant(layer["w13.packed"], layer["w13.scale"], g, torch.bfloat16)
            w2 = dequant(layer["w2.packed"], layer["w2.scale"], g, torch.bfloat16)
        else:
            w13, w2 = layer["w13"], layer["w2"]
        self.gate, self.up = w13[:, :I].contiguous(), w13[:, I:].contiguous()
        self.down = w2.contiguous()
        cfg = ext.moe.MOEConfig(E, k, H, I, 0)
        cfg.max_len = max_len
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = self.gate.data_ptr(), self.up.data_ptr(), self.down.data_ptr()
        cfg.pool = cpuinfer.backend_
        self.moe = (ext.moe.AMXInt4_MOE if fmt == "int4" else ext.moe.AMXBF16_MOE)(cfg)
        self.map = torch.arange(E, dtype=torch.int64)
        try:
            cpuinfer.submit(self.moe.load_weights_task(self.map.data_ptr()))
        except TypeError:
            cpuinfer.submit(self.moe.load_weights_task())
        cpuinfer.sync()
        if fmt == "int4":  # kt keeps its own repacked copy
            self.gate = self.up = self.down = None

    def forward(self, cpuinfer, x, ids, w, out, qlen):
        cpuinfer.submit(self.moe.forward_task(qlen.data_ptr(), ids.shape[1], ids.data_ptr(), w.data_ptr(),
                                              x.data_ptr(), out.data_ptr(), False))
        cpuinfer.sync()


def load_kt(path: str | None):
    """kt_kernel_ext from an explicit .so (its vendored libs beside it), else from an installed kt_kernel; or None."""
    try:
        if path:
            spec = importlib.util.spec_from_file_location("kt_kernel_ext", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod, None
        from kt_kernel import kt_kernel_ext  # type: ignore
        return kt_kernel_ext, None
    except Exception as e:  # noqa: BLE001 - any import failure just drops the column
        return None, f"{type(e).__name__}: {e}"


def l3_seen() -> dict:
    """cpu0's L3 as sysfs shows it: size and the cpus sharing it (a VM or a partitioned host may see less)."""
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (p / "level").read_text().strip() == "3":
                return {"size": (p / "size").read_text().strip(), "shared_cpu_list": (p / "shared_cpu_list").read_text().strip()}
        except OSError:
            pass
    return {}


def box_identity() -> dict:
    """What tells two boxes of one kind apart: CPU model, microcode, L3 as seen, kernel version, CPU count."""
    info = {"cpu_model": _cpu_model(), "microcode": None, "l3": l3_seen(), "kernel": platform.release(),
            "cpus_online": os.cpu_count(), "host": platform.node()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("microcode"):
                info["microcode"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def time_steps(fn, steps, min_seconds):
    """Mean wall seconds per step, steps run, and mean process CPU seconds per step (all threads: on a shared,
    oversubscribed machine cpu/wall shows how much of the wall time the threads actually ran)."""
    fn(0)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    while n < steps or (time.perf_counter() - t0 < min_seconds and n < 50 * steps):
        fn(n + 1)
        n += 1
    return (time.perf_counter() - t0) / n, n, (time.process_time() - c0) / n


def time_repeats(who, fn, steps, min_seconds, repeat, row):
    """time_steps `repeat` times; row gets who_ms (median), who_runs_ms, who_spread ((max - min) / median), steps and
    the median CPU ms."""
    runs = [time_steps(fn, steps, min_seconds) for _ in range(repeat)]
    ms = [r[0] * 1e3 for r in runs]
    med = statistics.median(ms)
    row.update({f"{who}_ms": med, f"{who}_runs_ms": ms, f"{who}_spread": (max(ms) - min(ms)) / med,
                f"{who}_steps": sum(r[1] for r in runs), f"{who}_cpu_ms": statistics.median(r[2] for r in runs) * 1e3})


def bench_shape(name, shape, fmt, args, cpus, kt_ext, results):
    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    if args.reduced:
        E = REDUCED_EXPERTS[name]
    if args.experts:
        E = min(E, args.experts)
    g = args.group
    ebytes = expert_bytes(fmt, H, I, g)
    layer_bytes = E * ebytes
    L = max(1, math.ceil(8 * l3_bytes() / layer_bytes))
    L = max(1, min(L, int(args.max_gb * 2**30 // layer_bytes), args.max_layers))
    if L * layer_bytes > args.max_gb * 2**30:
        print(f"skip {name} {fmt}: one layer is {layer_bytes / 2**30:.1f} GiB > --max-gb {args.max_gb}", file=sys.stderr)
        return
    gen = torch.Generator().manual_seed(0)
    nodes = [cpus[i::args.nodes] for i in range(args.nodes)]
    In = I // args.nodes
    eng = Engine(H, In, E, "silu_glu", True, fmt, g, nodes, max_tokens=max(args.tokens), isa=args.isa,
                 int8_activations=not args.fp32_act)
    layers = []
    for li in range(L):
        lay = make_layer(fmt, E, H, I, g, gen)
        shards = []
        for n in range(args.nodes):  # the store's node split: rows [n In, (n+1) In) of gate/up, same columns of down
            sl = slice(n * In, (n + 1) * In)
            if fmt == "int4":
                w13p, w13s = lay["w13.packed"], lay["w13.scale"]
                shards.append({"w13.packed": torch.cat([w13p[:, :I][:, sl], w13p[:, I:][:, sl]], 1).contiguous(),
                               "w13.scale": torch.cat([w13s[:, :I][:, sl], w13s[:, I:][:, sl]], 1).contiguous(),
                               "w2.packed": lay["w2.packed"][:, :, n * In // 8:(n + 1) * In // 8].contiguous(),
                               "w2.scale": lay["w2.scale"][:, :, n * In // g:(n + 1) * In // g].contiguous()})
            else:
                shards.append({"w13": torch.cat([lay["w13"][:, :I][:, sl], lay["w13"][:, I:][:, sl]], 1).contiguous(),
                               "w2": lay["w2"][:, :, sl].contiguous()})
        eng.load_layer(li, shards)
        del shards
        layers.append(lay)
    kt_layers, kt_note = None, None
    if kt_ext is not None:
        try:
            cpuinfer = kt_ext.CPUInfer(len(cpus))
            kt_layers = [KtLayer(kt_ext, cpuinfer, fmt, E, k, H, I, lay, g, max(args.tokens)) for lay in layers]
        except Exception as e:  # noqa: BLE001
            kt_layers, kt_note = None, f"{type(e).__name__}: {e}"
    for T in args.tokens:
        steps = (2 if args.reduced else max(2, L)) if T >= 256 else max(args.steps, L)
        routes = [(torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k].contiguous(),
                   torch.rand(T, k, generator=gen)) for _ in range(steps + 1)]
        x = (torch.randn(T, H, generator=gen)).bfloat16()
        out = torch.empty(T, H, dtype=torch.bfloat16)
        touched = sum(len(torch.unique(r[0])) for r in routes) / len(routes)
        row = {"shape": name, "format": fmt, "group": g if fmt == "int4" else None, "E": E, "k": k, "H": H, "I": I,
               "T": T, "layers": L, "nodes": args.nodes, "threads": len(cpus), "experts_touched": touched,
               "bytes_per_step": touched * ebytes, "flop_per_step": 6 * H * I * T * k, "isa": eng.isa,
               "int8_act_max_tokens": eng.int8_activations_max_tokens}

        def run_eng(i):
            ids, w = routes[i % len(routes)]
            eng.forward(i % L, x, ids, w, out)

        time_repeats("lvllm", run_eng, steps, args.min_seconds, args.repeat, row)
        row["paths"] = eng.last_paths()
        cpu = row["lvllm_cpu_ms"] / 1e3
        row["lvllm_GFLOP_per_cpu_s"] = row["flop_per_step"] / cpu / 1e9 if cpu > 0 else None
        if not args.no_torch and not (args.reduced and T >= 256):  # reduced: torch prefill takes minutes on 2 cores
            def run_torch(i):
                ids, w = routes[i % len(routes)]
                torch_moe(x, ids, w, layers[i % L], fmt, g, out)
            t, _, _ = time_steps(run_torch, 1 if args.reduced else max(2, min(steps, 4)), 0)
            row["torch_ms"] = t * 1e3
        if kt_layers is not None:
            qlen = torch.tensor([T], dtype=torch.int32)

            def run_kt(i):
                ids, w = routes[i % len(routes)]
                kt_layers[i % L].forward(cpuinfer, x, ids, w, out, qlen)
            time_repeats("kt", run_kt, steps, args.min_seconds, args.repeat, row)
        elif kt_note:
            row["kt_error"] = kt_note
        for who in ("lvllm", "torch", "kt"):
            if f"{who}_ms" in row:
                s = row[f"{who}_ms"] / 1e3
                row[f"{who}_GBps"] = row["bytes_per_step"] / s / 1e9
                row[f"{who}_GFLOPps"] = row["flop_per_step"] / s / 1e9
        results.append(row)
        print_row(row)
    del eng, layers, kt_layers


HEADER = (f"{'shape':<14} {'fmt':<5} {'T':>4} {'L':>2} {'isa':<6} {'lvllm ms':>9} {'spread':>6} {'GB/s':>6} {'GFLOP/s':>8} "
          f"{'torch ms':>9} {'kt ms':>8} {'spread':>6} {'torch/lv':>8} {'kt/lv':>6} {'cpu/wall':>8}  paths")


def print_row(r):
    kt = f"{r['kt_ms']:8.3f} {100 * r['kt_spread']:5.1f}%" if "kt_ms" in r else f"{'-':>8} {'-':>6}"
    tr = f"{r['torch_ms']:9.3f}" if "torch_ms" in r else f"{'-':>9}"
    rt = f"{r['torch_ms'] / r['lvllm_ms']:8.2f}" if "torch_ms" in r else f"{'-':>8}"
    rk = f"{r['kt_ms'] / r['lvllm_ms']:6.2f}" if "kt_ms" in r else f"{'-':>6}"
    print(f"{r['shape']:<14} {r['format']:<5} {r['T']:>4} {r['layers']:>2} {r['isa']:<6} {r['lvllm_ms']:9.3f} "
          f"{100 * r['lvllm_spread']:5.1f}% {r['lvllm_GBps']:6.2f} {r['lvllm_GFLOPps']:8.1f} {tr} {kt} {rt} {rk} "
          f"{r['lvllm_cpu_ms'] / r['lvllm_ms']:8.2f}  {','.join(r['paths'])}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--formats", default="int4,bf16")
    ap.add_argument("--tokens", default="1,4,32,512")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--cpus", default=None, help="cpu ids for the engine (default: every cpu this process may use)")
    ap.add_argument("--nodes", type=int, default=1, help="split --cpus into this many (virtual) nodes")
    ap.add_argument("--reduced", action="store_true", help=f"experts per layer {REDUCED_EXPERTS}, short runs")
    ap.add_argument("--experts", type=int, default=0, help="cap experts per layer (memory); routing stays top-k")
    ap.add_argument("--isa", default="", help="engine kernel table (default: best available)")
    ap.add_argument("--fp32-act", action="store_true", help="INT4: fp32/bf16 activations instead of int8 (A/B)")
    ap.add_argument("--max-gb", type=float, default=24.0, help="cap on engine weight memory per shape/format")
    ap.add_argument("--max-layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="time each configuration this many times: median, spread")
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--kt-ext", default=None, help="path of kt-kernel's _kt_kernel_ext*.so (else: import kt_kernel)")
    ap.add_argument("--bw-mib", type=int, default=1024, help="buffer per node for the read-bandwidth measurement")
    ap.add_argument("--json", default="bench/results/cpu_moe.json")
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if args.reduced:
        args.steps, args.min_seconds = min(args.steps, 6), min(args.min_seconds, 0.5)
        args.max_gb = min(args.max_gb, 0.8)
        args.bw_mib = min(args.bw_mib, 256)
    cpus = _cpulist(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
    torch.set_num_threads(len(cpus))  # torch baseline gets the same cores (it runs alone, never beside the engine)
    kt_ext, kt_err = load_kt(args.kt_ext)
    probe = Engine(64, 64, 1, "silu_glu", True, "bf16", None, [cpus[i::args.nodes] for i in range(args.nodes)], 1)
    bw = probe.read_bandwidth(args.bw_mib << 20, reps=3)
    del probe
    load = os.getloadavg()
    box = box_identity()
    print(f"box: {box['cpu_model']}, microcode {box['microcode']}, L3 {box['l3'].get('size')} shared by cpus "
          f"{box['l3'].get('shared_cpu_list')}, {box['cpus_online']} cpus, kernel {box['kernel']}")
    print(f"engine cpus {cpus} in {args.nodes} node(s); kernel tables {Engine.available_isas()} (using "
          f"{args.isa or 'the first'}); load avg {load[0]:.1f}; repeat {args.repeat}")
    print(f"read bandwidth, engine threads: {bw:.2f} GB/s;  kt-kernel: {'yes' if kt_ext else 'no (' + str(kt_err) + ')'}")
    print(HEADER)
    results = []
    for name in args.shapes.split(","):
        for fmt in args.formats.split(","):
            bench_shape(name, SHAPES[name], fmt, args, cpus, kt_ext, results)
    for r in results:
        r["read_bw_GBps"] = bw
        r["lvllm_pct_of_read_bw"] = 100 * r["lvllm_GBps"] / bw
    doc = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_model": box["cpu_model"], "box": box,
           "repeat": args.repeat,
           "cpus": cpus, "nodes": args.nodes, "isas": Engine.available_isas(), "read_bw_GBps": bw,
           "load_avg_start": load, "load_avg_end": os.getloadavg(), "reduced": args.reduced,
           "kt_kernel": bool(kt_ext), "kt_error": kt_err, "results": results}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


def _cpulist(text: str) -> list[int]:
    """'2-15' or '0,2,4' -> cpu ids."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
