"""Bad inputs to `lvllm plan` and to the plan file `lvllm serve --plan` reads (issues 20 and 21): each is one
`error:` line naming the fix, exit 1, and no plan file left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvllm_runtime.errors import BadInput
from lvllm_runtime.manifest import FORMAT_VERSION, StoreManifest, write_manifest
from lvllm_runtime.model_sizes import load_model
from lvllm_runtime.plan import load_plan

HW = Path(__file__).parent / "fixtures" / "hardware"
RECIPE = "Qwen3-Coder-30B-A3B-Instruct"


def _lvllm(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LVLLM_VIRTUAL_NUMA", "LVLLM_DEBUG")}
    return subprocess.run([str(Path(sys.executable).with_name("lvllm")), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _one_error_line(p: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), (p.returncode, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _hardware(tmp_path: Path, edit) -> Path:
    d = json.loads((HW / "h100-box.json").read_text())
    edit(d["topology"])
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.update(nodes=[]), ("no NUMA nodes", "lvllm doctor --json")),
    (lambda t: t.pop("isa"), ("`isa`", "lvllm doctor --json")),
    (lambda t: t.update(isa=["avx2"]), ("`isa`",)),
    (lambda t: t["isa"].update(avx2="yes"), ("isa.avx2",)),
    (lambda t: t["nodes"][0].update(mem_total="lots"), ("'lots' is not a number",)),
    (lambda t: t["nodes"][0].update(cpus="0-15"), ("cpus",)),
    (lambda t: t["nodes"][0].update(cores=[]), ("no cores", "memory_nodes")),
    (lambda t: t.update(ram_total=None), ("None is not a number",)),
    (lambda t: t["gpus"][0].update(pcie_gen="five"), ("'five' is not a number",)),
], ids=["empty-nodes", "no-isa", "isa-list", "isa-string", "mem-string", "cpus-string", "node-no-cores",
        "ram-null", "pcie-string"])
def test_bad_hardware_json_is_one_line(tmp_path, edit, words):
    out = tmp_path / "plan.json"
    p = _lvllm("plan", "--recipe", RECIPE, "--hardware", str(_hardware(tmp_path, edit)), "--out", str(out))
    _one_error_line(p, "hardware description", *words)
    assert not out.exists()


def test_bad_bench_object_is_one_line(tmp_path):
    d = json.loads((HW / "h100-box.json").read_text())
    d["bench"] = {"nodes": [{"node": 0, "gb_s": "fast"}]}
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(d))
    _one_error_line(_lvllm("plan", "--recipe", RECIPE, "--hardware", str(path)), "`bench`", "lvllm doctor --bench")


def test_hardware_file_that_is_binary_is_one_line(tmp_path):
    path = tmp_path / "hw.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    _one_error_line(_lvllm("plan", "--recipe", RECIPE, "--hardware", str(path)), "not valid JSON")


def test_negative_hot_experts_is_refused(tmp_path):
    out = tmp_path / "plan.json"
    p = _lvllm("plan", "--recipe", RECIPE, "--hardware", str(HW / "h100-box.json"), "--hot-experts", "-1",
               "--out", str(out))
    _one_error_line(p, "--hot-experts -1", "auto")
    assert not out.exists()


def test_max_model_len_above_the_models_positions(zoo, tmp_path):
    """The zoo model allows 4096 positions: asking for more is refused; the 32K default is capped to it, so the
    plan `serve --plan` starts vLLM with is one vLLM accepts."""
    model = zoo("qwen3_moe", "bf16")
    assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == 4096
    out = tmp_path / "plan.json"
    hw = str(HW / "ci-epyc-2core.json")
    _one_error_line(_lvllm("plan", str(model), "--hardware", hw, "--max-model-len", "8192", "--out", str(out)),
                    "--max-model-len 8192", "max_position_embeddings 4096", "--max-model-len 4096")
    assert not out.exists()
    p = _lvllm("plan", str(model), "--hardware", hw, "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert load_plan(out)["vllm"]["max_model_len"] == 4096


def _store_of(tmp_path: Path, **changes) -> Path:
    """A finished store's manifest (no layer files: the planner reads only the manifest)."""
    fields = dict(format_version=FORMAT_VERSION, model_type="qwen3_moe", config_sha256="0" * 64, source_path="/elsewhere",
                  weight_format="int4", group_size=64, numa_nodes=1, num_experts=8, hidden_size=64,
                  intermediate_size=64, activation="silu_glu", gated=True, moe_layers=(0, 1), complete=True)
    fields.update(changes)
    d = tmp_path / "store"
    d.mkdir()
    write_manifest(d, StoreManifest(**fields))
    return d


def test_store_of_another_model_is_refused(zoo, tmp_path):
    model = zoo("qwen3_moe", "bf16")
    shape = load_model(model).shape
    store = _store_of(tmp_path, num_experts=shape.num_experts * 2, hidden_size=shape.expert_hidden,
                      intermediate_size=shape.expert_intermediate, moe_layers=shape.moe_layers)
    out = tmp_path / "plan.json"
    p = _lvllm("plan", str(model), "--hardware", str(HW / "ci-epyc-2core.json"), "--store", str(store), "--out",
               str(out))
    _one_error_line(p, "--store", "not this model", "lvllm quantize")
    assert not out.exists()


def test_store_of_some_layers_only_names_the_missing_ones(zoo, tmp_path):
    """A store quantized with --layers (or an interrupted one relabelled) is this model's, but not all of it."""
    model = zoo("qwen3_moe", "bf16")
    shape = load_model(model).shape
    store = _store_of(tmp_path, num_experts=shape.num_experts, hidden_size=shape.expert_hidden,
                      intermediate_size=shape.expert_intermediate, moe_layers=shape.moe_layers[:1])
    out = tmp_path / "plan.json"
    p = _lvllm("plan", str(model), "--hardware", str(HW / "ci-epyc-2core.json"), "--store", str(store), "--out",
               str(out))
    _one_error_line(p, "--store", f"lacks MoE layers {list(shape.moe_layers[1:])}", "lvllm quantize MODEL STORE_DIR")
    assert not out.exists()


def test_store_from_another_config_is_refused(zoo, tmp_path):
    """Same shapes, another checkpoint: the manifest's config hash tells them apart."""
    model = zoo("qwen3_moe", "bf16")
    shape = load_model(model).shape
    store = _store_of(tmp_path, num_experts=shape.num_experts, hidden_size=shape.expert_hidden,
                      intermediate_size=shape.expert_intermediate, moe_layers=shape.moe_layers)
    p = _lvllm("plan", str(model), "--hardware", str(HW / "ci-epyc-2core.json"), "--store", str(store))
    _one_error_line(p, "another config.json")


@pytest.mark.parametrize("content,words", [
    (b"\x00\x01\xff\xfe binary", "not valid JSON"),
    (b"[1, 2, 3]", "JSON list, not an object"),
    (b"\"a string\"", "JSON str, not an object"),
], ids=["binary", "list", "string"])
def test_bad_plan_file_is_one_error(tmp_path, content, words):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=words) as e:
        load_plan(path)
    assert "lvllm plan" in e.value.fix
