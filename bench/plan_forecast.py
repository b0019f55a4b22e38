"""The planner's forecast next to published lvllm-class numbers on the seed's reference machines.

    python bench/plan_forecast.py [--json out.json]

Hardware comes from tests/fixtures/hardware (data-sheet fixtures, not measurements); the forecast is
`lvllm_runtime.planner` with its stated ASSUMPTIONS, the same for every model.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from lvllm_runtime import planner, recipes
from lvllm_runtime.hardware import Hardware

HW = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hardware"

# recipe, hardware fixture, plan options, published decode tok/s, published prefill tok/s, prompt lengths compared
CASES = [
    ("Qwen3-Next-80B-A3B-Instruct", "epyc9555x2-rtxpro6000", dict(expert_format="bf16"), 90.0, 15000.0, (32768, 65536)),
    ("MiniMax-M2.1", "epyc9684x2-rtx5090", dict(expert_format="bf16", max_num_seqs=1, kv_cache_dtype="fp8"), 29.0,
     5000.0, (32768,)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    for name, fixture, opts, dec, pre, lengths in CASES:
        rec = recipes.get(name).data
        plan = planner.make_plan(planner.model_from_recipe(rec), Hardware.load(HW / f"{fixture}.json"),
                                 planner.PlanOptions(**opts))
        d = plan["forecast"]["decode"][0]["tok_s"]
        rows.append(dict(model=name, hardware=fixture, phase="decode batch 1", forecast=d, published=dec,
                         ratio=d / dec, fits=plan["fits"]))
        by = {r["tokens"]: r for r in plan["forecast"]["prefill"]}
        for n in lengths:
            f = by[n]["tok_s"]
            rows.append(dict(model=name, hardware=fixture, phase=f"prefill {n} ({by[n]['path']})", forecast=f,
                             published=pre, ratio=f / pre, fits=plan["fits"]))
    print(f"{'model':30s} {'hardware':24s} {'phase':22s} {'forecast':>9s} {'published':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['model']:30s} {r['hardware']:24s} {r['phase']:22s} {r['forecast']:9.1f} {r['published']:9.1f} "
              f"{r['ratio']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "assumptions": planner.ASSUMPTIONS,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
