"""Where one engine decode call's time goes: wake-up, phase A (gate/up), barrier, phase B (down), reduction.

The engine runs MoE layers that never sit in cache (layers cycled, fresh random routing per call) at decode sizes,
back to back ("hot": workers still spinning) and with a gap between calls like the GPU's part of a layer ("gap").
Each call's `Engine.last_trace()` gives per-thread phase ends; each row shows medians over the calls of: wake = the
first / last thread started, A = first / last thread done with phase A, B = the same for phase B, end = last thread
done; microseconds after launch, next to the call's wall time (the Python call), the routing before the launch and the
roofline (distinct experts x INT4 bytes / the same threads' read bandwidth, measured first). Layers must be larger
than L3 together (the default 4 are: 1.2 GB / 0.6 GB).

    python bench/cpu_decode.py --cpus 1-15 --json bench/results/cpu_decode.json
    python bench/cpu_decode.py --reduced     # small, for a 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_moe import expert_bytes, make_layer  # noqa: E402
from lvllm_runtime.engine import Engine  # noqa: E402

SHAPES = {  # name: experts held, top-k routed to them, hidden, expert intermediate
    "qwen3-30b-a3b": dict(E=128, k=8, H=2048, I=768),
    # Qwen3-235B-A22B with the plan's 111 of 128 experts hot on the GPU: ~1 cold expert per token
    "qwen3-235b-a22b-cold": dict(E=16, k=1, H=4096, I=1536),
}


def parse_cpus(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def spin_until(t: float) -> None:
    while time.perf_counter() < t:
        pass


def run(eng: Engine, L: int, E: int, k: int, H: int, T: int, calls: int, gap_us: float, gen: torch.Generator):
    x = torch.randn(T, H, generator=gen).bfloat16()
    out = torch.empty(T, H, dtype=torch.bfloat16)
    routes = [(torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k].to(torch.int32).contiguous(),
               torch.rand(T, k, generator=gen)) for _ in range(calls)]
    walls, traces = [], []
    eng.forward(0, x, *routes[0], out)
    nxt = time.perf_counter()
    for i, (ids, w) in enumerate(routes):
        spin_until(nxt)
        t0 = time.perf_counter()
        eng.forward(i % L, x, ids, w, out)
        t1 = time.perf_counter()
        walls.append((t1 - t0) * 1e6)
        traces.append(eng.last_trace())
        nxt = t1 + gap_us / 1e6
    touched = statistics.mean(len(torch.unique(r[0])) for r in routes)
    med = statistics.median

    def last(point):
        return med(max(th[point] for th in tr["threads"]) for tr in traces)

    def first(point):
        return med(min(th[point] for th in tr["threads"]) for tr in traces)

    return {"wall_us": med(walls), "routing_us": med(tr["routing_us"] for tr in traces),
            "wake_first_us": first(0), "wake_last_us": last(0), "a_first_us": first(2), "a_last_us": last(2),
            "b_first_us": first(4), "b_last_us": last(4), "end_us": last(6), "experts": touched}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", default=None, help="engine cpus, e.g. 1-15 (default: all this process may use)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--gap-us", type=float, default=300.0, help="pause between calls in the 'gap' rows")
    ap.add_argument("--spin-us", type=int, default=50)
    ap.add_argument("--label", default="")
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--json", default="bench/results/cpu_decode.json")
    args = ap.parse_args()
    cpus = parse_cpus(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        s = dict(SHAPES[name])
        if args.reduced:
            s["E"] = min(s["E"], 16)
        E, k, H, I, g = s["E"], s["k"], s["H"], s["I"], 128
        eng = Engine(H, I, E, "silu_glu", True, "int4", g, [cpus], max_tokens=64, spin_us=args.spin_us)
        for li in range(args.layers):
            eng.load_layer(li, [make_layer("int4", E, H, I, g, gen)])
        bw = eng.read_bandwidth(256 << 20 if args.reduced else 1 << 30)
        for T in [int(t) for t in args.tokens.split(",")]:
            for mode, gap in (("hot", 0.0), ("gap", args.gap_us)):
                r = run(eng, args.layers, E, k, H, T, args.calls, gap, gen)
                roof = r["experts"] * expert_bytes("int4", H, I, g) / (bw * 1e9) * 1e6
                r.update(label=args.label, shape=name, T=T, mode=mode, threads=len(cpus), read_GBps=bw,
                         roofline_us=roof, isa=eng.isa, spin_us=args.spin_us)
                rows.append(r)
                print(f"{args.label:<10} {name:<22} T={T:<2} {mode:<3} wall {r['wall_us']:7.1f}  route {r['routing_us']:5.1f}"
                      f"  wake {r['wake_first_us']:5.1f}/{r['wake_last_us']:5.1f}  A {r['a_first_us']:6.1f}/{r['a_last_us']:6.1f}"
                      f"  B {r['b_first_us']:6.1f}/{r['b_last_us']:6.1f}  end {r['end_us']:6.1f}  roof {roof:6.1f}"
                      f"  ({roof / r['wall_us']:4.0%})  bw {bw:5.1f}", flush=True)
        del eng
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.node(), "cpu": platform.processor(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
