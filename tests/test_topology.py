"""topology.probe against fixture sysfs/procfs trees (tests/fixtures/sysfs, described in generate.py there), the live
machine (checked against independent sources), LVLLM_VIRTUAL_NUMA, NVML failure and the JSON round trip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lvllm_runtime import topology as T
from lvllm_runtime.errors import BadInput

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
KB = 1024
ALL_ISA = dict.fromkeys(T.ISA_FLAGS, True)


def fixture(name: str) -> T.Topology:
    return T.probe(FIXTURES / name / "sys", FIXTURES / name / "proc", gpus=False)


@pytest.fixture(autouse=True)
def _no_virtual(monkeypatch):
    monkeypatch.delenv("LVLLM_VIRTUAL_NUMA", raising=False)


def test_two_socket_xeon_without_smt():
    t = fixture("xeon_2s")
    assert t.cpu_model == "Intel(R) Xeon(R) Gold 5415+"
    assert [n.id for n in t.nodes] == [0, 1]
    assert t.nodes[0].cpus == tuple(range(8)) and t.nodes[1].cpus == tuple(range(8, 16))
    assert t.nodes[0].cores == t.nodes[0].cpus and t.nodes[1].cores == t.nodes[1].cpus
    assert [n.smt_threads for n in t.nodes] == [1, 1]
    assert (t.nodes[0].mem_total, t.nodes[0].mem_free) == (263856640 * KB, 250011136 * KB)
    assert (t.nodes[1].mem_total, t.nodes[1].mem_free) == (264233472 * KB, 258998272 * KB)
    assert t.isa == ALL_ISA
    assert t.l3_bytes == 23040 * KB
    assert (t.ram_total, t.ram_available) == (528090112 * KB, 515000320 * KB)
    assert (t.thp, t.numa_balancing) == ("never", 1)
    assert not t.virtual_numa and not any(n.virtual for n in t.nodes)


def test_epyc_nps4_eight_nodes_with_smt():
    t = fixture("epyc_nps4")
    assert t.cpu_model == "AMD EPYC 7313 16-Core Processor"
    assert len(t.nodes) == 8 and (t.cores, t.cpus) == (32, 64)
    for n in t.nodes:
        first = tuple(range(4 * n.id, 4 * n.id + 4))
        assert n.cores == first
        assert n.cpus == first + tuple(c + 32 for c in first)
        assert n.smt_threads == 2
        assert n.mem_total == (32_890_000 + 1000 * n.id) * KB
        assert n.mem_free == (30_100_000 + 7000 * n.id) * KB
    assert T.format_cpulist(t.nodes[4].cpus) == "16-19,48-51"
    assert t.isa == {k: k in ("avx2", "fma") for k in T.ISA_FLAGS}
    assert t.l3_bytes == 32 << 20
    assert (t.thp, t.numa_balancing) == ("always", 0)


def test_smt_desktop_without_node_dir_and_an_offline_cpu():
    t = fixture("ryzen_smt")
    (node,) = t.nodes
    assert node.id == 0 and not node.virtual
    assert node.cpus == tuple(range(31))  # cpu 31 is offline
    assert node.cores == tuple(range(16))  # cpu c+16 is the SMT sibling of c
    assert node.smt_threads == 2
    assert (node.mem_total, node.mem_free) == (65_536_000 * KB, 60_000_000 * KB)  # /proc/meminfo, no node dir
    assert t.ram_available == 62_500_000 * KB
    assert t.isa == {k: not k.startswith("amx") for k in T.ISA_FLAGS}
    assert (t.thp, t.numa_balancing) == ("madvise", None)


def test_virtual_numa_splits_physical_cores_and_keeps_siblings(monkeypatch):
    real = fixture("epyc_nps4")
    monkeypatch.setenv("LVLLM_VIRTUAL_NUMA", "3")
    t = fixture("epyc_nps4")
    assert t.virtual_numa and all(n.virtual for n in t.nodes)
    assert [len(n.cores) for n in t.nodes] == [10, 11, 11]
    assert t.nodes[0].cores == tuple(range(10))
    assert t.nodes[0].cpus == tuple(range(10)) + tuple(range(32, 42))
    all_cpus = [c for n in t.nodes for c in n.cpus]
    assert sorted(all_cpus) == list(range(64))  # a partition: every cpu once
    total = sum(n.mem_total for n in real.nodes)
    assert all(n.mem_total == total // 3 for n in t.nodes)


def test_virtual_numa_more_nodes_than_cores(monkeypatch):
    monkeypatch.setenv("LVLLM_VIRTUAL_NUMA", "17")
    with pytest.raises(BadInput, match="only 16 physical cores"):
        fixture("ryzen_smt")


def test_unreadable_sysfs_and_procfs(tmp_path):
    with pytest.raises(BadInput, match="cannot read"):
        T.probe(tmp_path / "nosys", FIXTURES / "xeon_2s" / "proc", gpus=False)
    with pytest.raises(BadInput, match="meminfo"):
        T.probe(FIXTURES / "xeon_2s" / "sys", tmp_path, gpus=False)


def test_missing_topology_files_make_each_cpu_its_own_core(tmp_path):
    tree = tmp_path / "epyc"
    shutil.copytree(FIXTURES / "epyc_nps4", tree)
    for d in (tree / "sys/devices/system/cpu").glob("cpu*/topology"):
        shutil.rmtree(d)
    t = T.probe(tree / "sys", tree / "proc", gpus=False)
    assert t.nodes[0].cores == t.nodes[0].cpus and t.cores == 64


def test_json_round_trip_and_doctor_wrapper():
    t = replace(
        fixture("xeon_2s"),
        gpus=(T.Gpu(0, "NVIDIA H100 PCIe", 80 << 30, 79 << 30, "9.0", 5, 16, 1),),
        gpu_note=None,
    )
    d = t.to_dict()
    assert d["topology_version"] == T.TOPOLOGY_VERSION
    assert T.Topology.from_dict(d) == t
    assert T.Topology.from_dict({"topology": d, "checks": [], "bench": None}) == t
    del d["nodes"]
    with pytest.raises(BadInput, match="nodes"):
        T.Topology.from_dict(d)


@pytest.mark.parametrize("text", ["0", "0-3", "0-3,8,10-11", "1,3,5"])
def test_cpulist_round_trip(text):
    assert T.format_cpulist(T.parse_cpulist(text)) == text


def test_live_machine_matches_independent_sources():
    """The live probe against os, psutil, py-cpuinfo (CPUID) and /sys/devices/system/node itself."""
    import cpuinfo
    import psutil

    t = T.probe()
    allowed = sorted(os.sched_getaffinity(0))
    assert sorted(c for n in t.nodes for c in n.cpus) == allowed
    physical = psutil.cpu_count(logical=False)
    if len(allowed) == os.cpu_count():
        assert t.cores == physical
    node_dirs = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert len(t.nodes) == max(1, sum(1 for d in node_dirs if (d / "cpulist").read_text().strip()))
    flags = set(cpuinfo.get_cpu_info().get("flags", []))
    for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile"):
        assert t.isa[k] == (k in flags or k.replace("_", "") in flags), k
    assert t.ram_total == psutil.virtual_memory().total
    assert 0 < t.ram_available <= t.ram_total
    assert t.versions["python"] == ".".join(map(str, sys.version_info[:3]))
    print(f"live: {len(t.nodes)} node(s), {t.cores} cores, isa={[k for k, v in t.isa.items() if v]}, gpus={t.gpus}")


def test_nvml_driver_not_loaded_is_a_clean_no_gpu(monkeypatch):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    t = T.probe()
    assert t.gpus == ()
    assert "driver not loaded" in t.gpu_note.lower()


def test_nvml_gpu_fields_are_mapped(monkeypatch, tmp_path):
    """A simulated one-GPU NVML (no GPU here): monkeypatch refuses names the installed pynvml lacks, so this checks
    the calls exist and how their answers land in Gpu; NUMA affinity comes from the PCI device's sysfs entry when
    NVML does not support the NUMA query."""
    import pynvml

    class Mem:
        total, free = 80 << 30, 70 << 30

    class Pci:
        busId = b"00000000:17:00.0"

    def not_supported(*_):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    calls = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "580.65.06",
        "nvmlSystemGetCudaDriverVersion": lambda: 13000,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: ("h", i),
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetMemoryInfo": lambda h: Mem,
        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
        "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: 5,
        "nvmlDeviceGetMaxPcieLinkWidth": lambda h: 16,
        "nvmlDeviceGetNumaNodeId": not_supported,
        "nvmlDeviceGetPciInfo": lambda h: Pci,
    }
    for name, fn in calls.items():
        monkeypatch.setattr(pynvml, name, fn)
    sysfs = tmp_path / "sys"
    shutil.copytree(FIXTURES / "xeon_2s" / "sys", sysfs)
    (sysfs / "bus/pci/devices/0000:17:00.0").mkdir(parents=True)
    (sysfs / "bus/pci/devices/0000:17:00.0/numa_node").write_text("1\n")
    t = T.probe(sysfs, FIXTURES / "xeon_2s" / "proc")
    assert t.gpus == (T.Gpu(0, "NVIDIA H100 80GB HBM3", 80 << 30, 70 << 30, "9.0", 5, 16, 1),)
    assert t.gpu_note is None
    assert (t.versions["driver"], t.versions["cuda_driver"]) == ("580.65.06", "13.0")


def test_import_and_probe_stay_light():
    """Importing and probing never imports vllm, and imports torch only for the CUDA fallback (never with a CPU-only
    torch, as here)."""
    code = (
        "import sys, importlib.metadata as m\n"
        "import lvllm_runtime.topology as t\n"
        "assert 'torch' not in sys.modules and 'vllm' not in sys.modules\n"
        "t.probe()\n"
        "cpu_torch = '+cpu' in (m.version('torch') if m.packages_distributions().get('torch') else '+cpu')\n"
        "assert 'vllm' not in sys.modules\n"
        "assert not cpu_torch or 'torch' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LVLLM_VIRTUAL_NUMA"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cxl_memory_only_node_is_listed_not_dropped():
    t = fixture("xeon_cxl")
    (node,) = t.nodes
    assert node.id == 0 and node.cores == tuple(range(8)) and node.mem_free == 6_144_000 * KB
    assert t.memory_nodes == (T.MemoryNode(1, 262_144_000 * KB, 261_000_000 * KB),)
    assert t.numa_balancing == 2
    assert T.Topology.from_dict(t.to_dict()).memory_nodes == t.memory_nodes


def test_hybrid_p_and_e_cores_from_the_hybrid_pmu():
    t = fixture("core_ultra")
    (node,) = t.nodes
    assert t.hybrid
    assert node.cores == (0, 2, 4, 6, 8, 10, *range(12, 22))  # P-cores have SMT siblings, E-cores none
    assert node.efficiency_cores == tuple(range(12, 22))
    assert node.performance_cores == (0, 2, 4, 6, 8, 10)
    assert T.Topology.from_dict(t.to_dict()).nodes == t.nodes


def test_offline_cpus_and_sockets():
    assert fixture("ryzen_smt").offline_cpus == (31,)
    assert fixture("xeon_2s").offline_cpus == ()
    assert [n.package for n in fixture("xeon_2s").nodes] == [0, 1]
    assert [n.package for n in fixture("epyc_nps4").nodes] == [0] * 4 + [1] * 4
