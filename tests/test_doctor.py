"""`lvllm doctor` run as the installed console script (subprocess): exit codes, `--json`, `--bench`, `--model`, bad
inputs (one line, no traceback); and the checks themselves on hand-built topologies."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lvllm_runtime import checks as C
from lvllm_runtime import topology as T
from lvllm_runtime.errors import BadInput, CorruptCheckpoint

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
LVLLM = str(Path(sys.executable).with_name("lvllm"))


def run(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """`lvllm ARGS` (or `python -c CODE ARGS`) with LVLLM_VIRTUAL_NUMA cleared unless `env` sets it."""
    full = {k: v for k, v in os.environ.items() if k not in ("LVLLM_VIRTUAL_NUMA", "LVLLM_DEBUG")}
    full.update(env or {})
    cmd = [sys.executable, "-c", code, *args] if code else [LVLLM, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p


def tree(name: str) -> list[str]:
    return ["--sysfs", str(FIXTURES / name / "sys"), "--procfs", str(FIXTURES / name / "proc")]


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def one_error_line(p: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_live_json_matches_probe_and_exit_code_follows_checks():
    p = run("doctor", "--json")
    report = json.loads(p.stdout)  # stdout holds only JSON
    assert set(report) == {"topology", "checks", "bench", "status"} and report["bench"] is None
    topo = T.Topology.from_dict(report)
    live = T.probe()
    assert [(n.cpus, n.cores) for n in topo.nodes] == [(n.cpus, n.cores) for n in live.nodes]
    assert topo.isa == live.isa and topo.gpus == live.gpus
    statuses = {c["status"] for c in report["checks"]}
    assert statuses <= {"PASS", "WARN", "FAIL"}
    assert p.returncode == (1 if "FAIL" in statuses else 0)
    assert all(c["fix"] for c in report["checks"] if c["status"] != "PASS")
    human = run("doctor")
    assert human.returncode == p.returncode
    assert "NUMA nodes: 1" in human.stdout if len(live.nodes) == 1 else "NUMA nodes" in human.stdout
    assert "Checks" in human.stdout and human.stderr == ""


def test_virtual_numa_two_nodes():
    live = T.probe()
    p = run("doctor", "--json", env={"LVLLM_VIRTUAL_NUMA": "2"})
    topo = T.Topology.from_dict(json.loads(p.stdout))
    assert topo.virtual_numa and [n.virtual for n in topo.nodes] == [True, True]
    cores = [c for n in live.nodes for c in n.cores]
    assert [n.cores for n in topo.nodes] == [tuple(cores[: len(cores) // 2]), tuple(cores[len(cores) // 2 :])]
    if len(cores) == 2:  # this dev box / CI: one core each
        assert [len(n.cores) for n in topo.nodes] == [1, 1]
    human = run("doctor", env={"LVLLM_VIRTUAL_NUMA": "2"})
    assert "NUMA nodes: 2 (virtual" in human.stdout


def test_virtual_numa_bad_values():
    one_error_line(run("doctor", env={"LVLLM_VIRTUAL_NUMA": "9999"}), "LVLLM_VIRTUAL_NUMA=9999", "at most")
    one_error_line(run("doctor", env={"LVLLM_VIRTUAL_NUMA": "two"}), "not a number")


def test_fixture_warnings_carry_their_fixes():
    p = run("doctor", "--json", *tree("xeon_2s"))
    checks = by_name(json.loads(p.stdout))
    assert checks["numa_balancing"]["status"] == "WARN"
    assert checks["numa_balancing"]["fix"] == "sudo sysctl -w kernel.numa_balancing=0"
    assert checks["transparent_hugepages"]["status"] == "WARN" and "madvise" in checks["transparent_hugepages"]["fix"]
    assert checks["cpu_isa"]["status"] == "PASS" and "AMX" in checks["cpu_isa"]["message"]
    assert checks["gpu"]["status"] == "WARN" and "CPU-only" in checks["gpu"]["message"]
    assert p.returncode == 0
    human = run("doctor", *tree("xeon_2s"))
    assert "fix: sudo sysctl -w kernel.numa_balancing=0" in human.stdout  # on one line, copy-pasteable


def test_no_avx2_fails_with_exit_1(tmp_path):
    shutil.copytree(FIXTURES / "epyc_nps4", tmp_path / "old")
    info = tmp_path / "old/proc/cpuinfo"
    info.write_text(info.read_text().replace(" avx2", "").replace(" fma", ""))
    p = run("doctor", "--json", "--sysfs", str(tmp_path / "old/sys"), "--procfs", str(tmp_path / "old/proc"))
    report = json.loads(p.stdout)
    assert by_name(report)["cpu_isa"]["status"] == "FAIL" and report["status"] == "FAIL"
    assert p.returncode == 1


def test_unreadable_sysfs_is_one_line(tmp_path):
    p = run("doctor", "--sysfs", str(tmp_path / "missing"))
    assert p.returncode == 1 and p.stdout == ""
    one_error_line(p, "cannot read", "missing")


def test_model_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    p = run("doctor", "--model", str(tmp_path))
    assert p.returncode == 1 and p.stdout == ""
    one_error_line(p, "config.json", str(tmp_path))


def tiny_moe(path: Path, experts: int = 4, hidden: int = 64, inter: int = 32) -> tuple[int, int]:
    """A config.json and one real safetensors file with routed experts, a shared expert and attention.
    Returns (total tensor bytes, routed-expert bytes)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": experts}))
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((100, hidden), dtype=np.float32)}
    t["model.layers.0.self_attn.q_proj.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
    t["model.layers.0.mlp.shared_expert.up_proj.weight"] = rng.standard_normal((inter, hidden), dtype=np.float32)
    routed = 0
    for e in range(experts):
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for name, shape in shapes.items():
            t[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = rng.standard_normal(shape, dtype=np.float32)
            routed += inter * hidden * 4
    save_file(t, str(path / "model.safetensors"))
    return sum(a.nbytes for a in t.values()), routed


def test_model_fits_and_does_not_fit(tmp_path):
    total, routed = tiny_moe(tmp_path / "m")
    p = run("doctor", "--json", "--model", str(tmp_path / "m"), *tree("ryzen_smt"))
    check = by_name(json.loads(p.stdout))["model_fits_ram"]
    assert check["status"] == "PASS" and p.returncode == 0

    small = tmp_path / "small"
    shutil.copytree(FIXTURES / "ryzen_smt", small)
    meminfo = small / "proc/meminfo"
    meminfo.write_text(meminfo.read_text().replace("MemAvailable:   62500000 kB", "MemAvailable:   1 kB"))
    p = run("doctor", "--json", "--model", str(tmp_path / "m"), "--sysfs", str(small / "sys"), "--procfs",
            str(small / "proc"))
    check = by_name(json.loads(p.stdout))["model_fits_ram"]
    assert check["status"] == "FAIL" and p.returncode == 1
    assert "only 1.0 KiB RAM is available" in check["message"] and "int4" in check["fix"]

    fp = C.read_footprint(tmp_path / "m")
    assert (fp.total_bytes, fp.routed_expert_bytes, fp.model_type) == (total, routed, "qwen2_moe")


def test_model_check_counts_only_routed_experts_when_a_gpu_takes_the_rest(tmp_path):
    total, routed = tiny_moe(tmp_path / "m")
    fp = C.read_footprint(tmp_path / "m")
    cpu_only = replace(T.probe(FIXTURES / "xeon_2s/sys", FIXTURES / "xeon_2s/proc", gpus=False),
                       ram_available=(routed + total) // 2)
    with_gpu = replace(cpu_only, gpus=(T.Gpu(0, "H100", 80 << 30, 80 << 30, "9.0"),))
    assert C.check_model(cpu_only, fp).status is C.Status.FAIL
    assert C.check_model(with_gpu, fp).status is C.Status.PASS


def test_model_index_without_shards_uses_total_size(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    index = {"metadata": {"total_size": 5 << 40}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                 "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    fp = C.read_footprint(tmp_path)
    assert (fp.total_bytes, fp.routed_expert_bytes, fp.shards_missing) == (5 << 40, None, 2)
    topo = T.probe(FIXTURES / "xeon_2s/sys", FIXTURES / "xeon_2s/proc", gpus=False)
    check = C.check_model(topo, fp)
    assert check.status is C.Status.WARN and "5120.0 GiB" in check.message and "2 shard(s)" in check.message


def test_corrupt_safetensors_header_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"{not json")
    with pytest.raises(CorruptCheckpoint):
        C.read_footprint(tmp_path)
    p = run("doctor", "--model", str(tmp_path))
    assert p.returncode == 1
    one_error_line(p, "model.safetensors", "header")


def test_model_not_a_directory(tmp_path):
    with pytest.raises(BadInput, match="not a directory"):
        C.read_footprint(tmp_path / "nope")


def test_nvml_driver_not_loaded_through_the_cli():
    code = (
        "import sys, pynvml\n"
        "def fail(): raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)\n"
        "pynvml.nvmlInit = fail\n"
        "from lvllm_cli.app import main\n"
        "sys.argv = ['lvllm', *sys.argv[1:]]\n"
        "main()\n"
    )
    p = run("doctor", "--json", code=code)
    report = json.loads(p.stdout)
    assert report["topology"]["gpus"] == []
    gpu = by_name(report)["gpu"]
    assert gpu["status"] == "WARN" and "driver not loaded" in gpu["message"].lower() and "CPU-only" in gpu["message"]
    human = run("doctor", code=code)
    assert "NVIDIA driver not loaded" in human.stdout


def test_bench_reports_gb_s_per_node():
    p = run("doctor", "--json", "--bench", env={"LVLLM_VIRTUAL_NUMA": "2"})
    report = json.loads(p.stdout)
    topo = T.Topology.from_dict(report)
    nodes = report["bench"]["nodes"]
    assert [b["node"] for b in nodes] == [n.id for n in topo.nodes]
    for b, n in zip(nodes, topo.nodes):
        assert b["threads"] == len(n.cores) and tuple(b["cpus"]) == n.cores
        assert 0.1 < b["gb_s"] < 2000 and b["gb_s_median"] <= b["gb_s"] and b["passes"] >= 3
    assert report["bench"]["all_nodes"]["threads"] == topo.cores
    assert "measuring" in p.stderr
    human = run("doctor", "--bench")
    assert "Memory read bandwidth (GB/s" in human.stdout
    row = re.search(r"│\s+0 │\s+(\d+) │ [\d,-]+\s+│\s+([\d.]+) │", human.stdout)
    assert row and int(row.group(1)) == len(T.probe().nodes[0].cores) and float(row.group(2)) > 0.1


def test_bench_on_a_cpu_outside_the_affinity_mask_is_a_clear_error():
    from lvllm_runtime.errors import LvllmError
    from lvllm_runtime.membench import read_bandwidth

    bad = max(os.sched_getaffinity(0)) + 1000
    with pytest.raises(LvllmError, match=f"could not start on cpus 0,{bad}"):
        read_bandwidth([0, bad], 8 << 20, 0.05)


def test_cxl_node_is_listed_and_does_not_confuse_the_memory_check():
    """A memory-only (CXL) node: listed as such, its RAM counted with the rest (no 'nodes do not see all RAM'
    warning); numa_balancing=2 (tiering) warns as 1 does."""
    p = run("doctor", "--json", *tree("xeon_cxl"))
    report = json.loads(p.stdout)
    checks = by_name(report)
    assert checks["memory_only_nodes"]["status"] == "PASS" and "node 1" in checks["memory_only_nodes"]["message"]
    assert checks["node_memory"]["status"] == "PASS", checks["node_memory"]
    assert checks["numa_balancing"]["status"] == "WARN" and "tiering" in checks["numa_balancing"]["message"]
    assert checks["numa_balancing"]["fix"] == "sudo sysctl -w kernel.numa_balancing=0"
    assert [m["id"] for m in report["topology"]["memory_nodes"]] == [1]
    assert "memory only" in run("doctor", *tree("xeon_cxl")).stdout


def test_offline_cpus_warn_with_the_command_that_brings_them_back():
    checks = by_name(json.loads(run("doctor", "--json", *tree("ryzen_smt")).stdout))
    assert checks["offline_cpus"]["status"] == "WARN" and "31" in checks["offline_cpus"]["message"]
    assert "cpu31/online" in checks["offline_cpus"]["fix"]
    assert "offline_cpus" not in by_name(json.loads(run("doctor", "--json", *tree("xeon_2s")).stdout))


def test_low_free_memory_on_a_node_the_plan_uses(tmp_path):
    """xeon_cxl's node 0 has 5.9 GiB free: a plan putting 20 GiB there warns and names the node; one putting 2 GiB
    passes."""
    from lvllm_runtime.plan import PLAN_VERSION

    def plan_with(need_gib: int) -> Path:
        path = tmp_path / f"plan{need_gib}.json"
        path.write_text(json.dumps({
            "plan_version": PLAN_VERSION,
            "store": {"path": "", "weight_format": "int4", "group_size": 128, "numa_nodes": 1},
            "runtime": {"nodes": [{"node": 0, "numa_node": 0, "cpus": [0, 1], "threads": 2}]},
            "memory": {"nodes": [{"node": 0, "need": need_gib << 30}]}}))
        return path

    checks = by_name(json.loads(run("doctor", "--json", "--plan", str(plan_with(20)), *tree("xeon_cxl")).stdout))
    c = checks["node0_free_memory"]
    assert c["status"] == "WARN" and "20.0 GiB on NUMA node 0" in c["message"] and "drop_caches" in c["fix"]
    ok = by_name(json.loads(run("doctor", "--json", "--plan", str(plan_with(2)), *tree("xeon_cxl")).stdout))
    assert ok["plan_nodes_free_memory"]["status"] == "PASS" and "node0_free_memory" not in ok


def test_bad_plan_file_for_doctor_is_one_line(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_bytes(b"\xff\xfe\x00")
    p = run("doctor", "--plan", str(bad), *tree("xeon_2s"))
    assert p.returncode == 1
    one_error_line(p, "not valid JSON")


def test_hybrid_cpu_p_and_e_cores_and_the_plan_on_p_cores(tmp_path):
    """Core Ultra: the doctor tells P- from E-cores and `lvllm plan` on its JSON pins the engine to P-cores only."""
    p = run("doctor", "--json", *tree("core_ultra"))
    c = by_name(json.loads(p.stdout))["hybrid_cores"]
    assert c["status"] == "PASS" and "6 P-cores" in c["message"] and "10 E-cores" in c["message"]
    hw = tmp_path / "hw.json"
    hw.write_text(p.stdout)
    plan = json.loads(run("plan", "--recipe", "Qwen3-Coder-30B-A3B-Instruct", "--hardware", str(hw), "--json",
                          "--max-model-len", "4096").stdout)
    assert [n["cpus"] for n in plan["runtime"]["nodes"]] == [[0, 2, 4, 6, 8, 10]]


def test_hybrid_flag_without_the_hybrid_pmu_warns():
    t = T.probe(FIXTURES / "core_ultra" / "sys", FIXTURES / "core_ultra" / "proc", gpus=False)
    t = replace(t, nodes=tuple(replace(n, efficiency_cores=()) for n in t.nodes))
    (c,) = C.check_hybrid_cores(t)
    assert c.status is C.Status.WARN and "taskset" in c.fix
