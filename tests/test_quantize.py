"""`lvllm quantize` end to end on zoo checkpoints: every architecture and source format, node splits, INT4
pass-through, manifest hashes, resume after SIGKILL, and each bad input as one line with nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvllm_runtime import quantize as quantize_mod
from lvllm_runtime import zoo as zoo_module
from lvllm_runtime.checkpoint import Checkpoint
from lvllm_runtime.errors import BadInput
from lvllm_runtime.quant import dequantize_int4, quantize_int4
from lvllm_runtime.quantize import QuantizeOptions, quantize
from lvllm_runtime.store import ExpertStore, file_sha256, format_bytes, layer_file

CASES = [(arch, variant) for arch in sorted(zoo_module.ZOO) for variant in zoo_module.variants(arch)]


def _check_manifest(store: ExpertStore) -> None:
    """(d) every file the store should have is listed, with its real size and sha256, and nothing else is there."""
    man = store.manifest
    assert man.complete and sorted(man.files) == sorted(man.file_names())
    for name, entry in man.files.items():
        path = store.path / name
        assert entry == {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    on_disk = sorted(str(p.relative_to(store.path)) for p in (store.path / "layers").iterdir())
    assert on_disk == sorted(man.files)


def _whole(store: ExpertStore, layer: int, key: str) -> torch.Tensor:
    """(b) one tensor of a layer with the node splits put back together: w13 rows per projection, w2 columns."""
    man = store.manifest
    parts = [store.layer(layer, n)[key] for n in range(man.numa_nodes)]
    if key.startswith("w2"):
        return torch.cat(parts, dim=2)
    projections = 2 if man.gated else 1
    split = [p.chunk(projections, dim=1) for p in parts]
    return torch.cat([torch.cat([s[j] for s in split], dim=1) for j in range(projections)], dim=1)


@pytest.mark.parametrize("arch,variant", CASES)
def test_every_zoo_architecture_and_format(zoo, tmp_path, arch, variant):
    src = zoo(arch, variant)
    ckpt = Checkpoint.open(src)
    for fmt in ("int4", "bf16") if variant != "int4" else ("int4",):
        out = tmp_path / fmt
        result = quantize(src, out, QuantizeOptions(weight_format=fmt, numa_nodes=2, workers=2))
        store = ExpertStore.open(out)
        _check_manifest(store)
        assert result.passed and result.layers_written == ckpt.model.moe_layers
        assert store.manifest.numa_nodes == 2 and store.manifest.source_format == ckpt.source_format
        for layer in ckpt.model.moe_layers:
            names = ["w13", "w2"] if fmt == "bf16" else ["w13.packed", "w13.scale", "w2.packed", "w2.scale"]
            whole = {k: _whole(store, layer, k) for k in names}
            for e in range(ckpt.model.num_experts):
                src_w = ckpt.read_expert(layer, e)
                ref13 = torch.cat([src_w["gate"], src_w["up"]]) if ckpt.model.gated else src_w["up"]
                got13, got2 = store.expert(layer, e)
                if fmt == "bf16":  # (a) exact: the source rounded to BF16, nothing else
                    assert torch.equal(got13, ref13.bfloat16().float()) and torch.equal(got2, src_w["down"].bfloat16().float())
                    assert torch.equal(whole["w13"][e].float(), got13) and torch.equal(whole["w2"][e].float(), got2)
                    continue
                for got, ref in ((got13, ref13), (got2, src_w["down"])):  # (a) within INT4 error
                    assert ((got - ref).norm() / ref.norm()).item() < 0.15
                g = store.manifest.group_size
                if variant == "int4":  # (c) pass-through: bit-identical to the source tensors
                    raw = ckpt.read_expert_int4(layer, e)
                    keys = [k for k in ("gate", "up") if k in raw]
                    assert torch.equal(whole["w13.packed"][e], torch.cat([raw[k][0] for k in keys]))
                    assert torch.equal(whole["w13.scale"][e], torch.cat([raw[k][1] for k in keys]))
                    assert torch.equal(whole["w2.packed"][e], raw["down"][0])
                    assert torch.equal(whole["w2.scale"][e], raw["down"][1])
                else:  # (b) the node files concatenate back to the whole expert quantized at once
                    p13, s13 = quantize_int4(ref13.bfloat16(), g)
                    assert torch.equal(whole["w13.packed"][e], p13) and torch.equal(whole["w13.scale"][e], s13)
                    assert torch.equal(dequantize_int4(whole["w2.packed"][e], whole["w2.scale"][e], g), got2)


@pytest.mark.parametrize("fmt,nodes", [("int4", 1), ("int4", 2), ("bf16", 1), ("bf16", 2)])
def test_gpt_oss_expert_biases(zoo, tmp_path, fmt, nodes):
    """gpt-oss keeps its expert biases: w13.bias node slices put back together are the source's interleaved
    gate_up bias de-interleaved (gate, then up), bit for bit; w2.bias is the source's down bias, in node 0 only;
    the weights are de-interleaved the same way; the predicted store bytes are the files' bytes."""
    from lvllm_runtime import model_sizes
    from lvllm_runtime.model_shapes import from_config

    src = zoo("gpt_oss", "bf16")
    raw = load_file(src / "model.safetensors")
    result = quantize(src, tmp_path / "s", QuantizeOptions(weight_format=fmt, numa_nodes=nodes, workers=2))
    store = ExpertStore.open(tmp_path / "s")
    _check_manifest(store)
    man = store.manifest
    assert result.passed and man.expert_bias and json.loads((tmp_path / "s" / "lvllm.json").read_text())["expert_bias"]
    for layer in man.moe_layers:
        base = f"model.layers.{layer}.mlp.experts"
        b13, b2 = raw[f"{base}.gate_up_proj_bias"], raw[f"{base}.down_proj_bias"]  # [E, 2I] interleaved, [E, H]
        assert torch.equal(_whole(store, layer, "w13.bias"), torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1))
        shards = [store.layer(layer, n) for n in range(nodes)]
        assert all(s["w13.bias"].dtype == torch.bfloat16 for s in shards)
        assert torch.equal(shards[0]["w2.bias"], b2) and all("w2.bias" not in s for s in shards[1:])
        w13 = raw[f"{base}.gate_up_proj"].transpose(1, 2)  # on disk [E, H, 2I]: columns interleaved gate/up
        ref13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1).float()
        for e in range(man.num_experts):
            got13, got2 = store.expert(layer, e)
            if fmt == "bf16":
                assert torch.equal(got13, ref13[e]) and torch.equal(got2, raw[f"{base}.down_proj"][e].t().float())
            else:
                assert ((got13 - ref13[e]).norm() / ref13[e].norm()).item() < 0.15
            bias13, bias2 = store.expert_bias(layer, e)
            assert torch.equal(bias13, torch.cat([b13[e, 0::2], b13[e, 1::2]]).float()) and torch.equal(bias2, b2[e].float())
    shape = from_config(json.loads((src / "config.json").read_text()))
    data = [0] * nodes
    for name in man.files:
        header = model_sizes.safetensors_header(store.path / name)
        node = int(header["__metadata__"]["lvllm_node"])
        data[node] += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    layers = len(man.moe_layers)
    assert model_sizes.store_layer_total_bytes(shape, fmt, man.group_size, nodes) * layers == sum(data)
    # node 0's shard is the bigger one: it alone holds w2.bias
    assert [model_sizes.store_layer_bytes(shape, fmt, man.group_size, nodes, n) * layers for n in range(nodes)] == data

    # The biases are covered by the sha256: a flipped byte of w2.bias (node 0's last tensor) is redone on --resume.
    damaged = store.path / layer_file(man.moe_layers[-1], 0)
    good = damaged.read_bytes()
    damaged.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    again = quantize(src, tmp_path / "s", QuantizeOptions(weight_format=fmt, numa_nodes=nodes, workers=2, resume=True))
    assert again.layers_written == (man.moe_layers[-1],) and damaged.read_bytes() == good


@pytest.mark.parametrize("fmt,nodes", [("bf16", 1), ("bf16", 2), ("int4", 2)])
def test_gpt_oss_store_through_the_engine_matches_transformers(zoo, tmp_path, fmt, nodes):
    """The store's bias layout is the engine's: a gpt-oss store loaded into the CPU engine gives transformers'
    GptOssExperts output (biases, interleaved gate/up, clamped GLU) computed on the weights the store holds."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from lvllm_runtime.engine import Engine

    src = zoo("gpt_oss", "bf16")
    quantize(src, tmp_path / "s", QuantizeOptions(weight_format=fmt, numa_nodes=nodes, workers=2))
    store = ExpertStore.open(tmp_path / "s")
    m = store.manifest
    eng = Engine(m.hidden_size, m.node_intermediate_size, m.num_experts, m.activation, m.gated, fmt, m.group_size,
                 [[0], [1]][:nodes], max_tokens=16)
    experts = GptOssExperts(GptOssConfig(**json.loads((src / "config.json").read_text()))).float()
    gen = torch.Generator().manual_seed(0)
    for layer in m.moe_layers:
        eng.load_layer(layer, [store.layer(layer, n) for n in range(nodes)])
        with torch.no_grad():  # transformers' layout from the store's weights: gate_up [E, H, 2I] interleaved
            for e in range(m.num_experts):
                w13, w2 = store.expert(layer, e)
                b13, b2 = store.expert_bias(layer, e)
                i = m.intermediate_size
                experts.gate_up_proj[e] = torch.stack([w13[:i], w13[i:]], dim=1).reshape(2 * i, -1).t()
                experts.gate_up_proj_bias[e] = torch.stack([b13[:i], b13[i:]], dim=1).reshape(-1)
                experts.down_proj[e], experts.down_proj_bias[e] = w2.t(), b2
            x = torch.randn(16, m.hidden_size, generator=gen)
            ids = torch.stack([torch.randperm(m.num_experts, generator=gen)[:2] for _ in range(16)]).to(torch.int32)
            w = torch.rand(16, 2, generator=gen)
            ref = experts(x, ids.long(), w)
        out = torch.empty_like(x)
        eng.forward(layer, x, ids, w, out)
        err = ((out - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        # tests/test_engine.py's tolerances: fp32 I/O on BF16 weights 2e-4; INT4 with int8 activations 3e-2
        assert err < (2e-4 if fmt == "bf16" else 3e-2), err


# --- the command line -----------------------------------------------------------------------------------------


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `lvllm quantize ARGS` in-process through the real entry point; (exit code, stdout, stderr)."""
    from lvllm_cli.app import main

    monkeypatch.setattr(sys, "argv", ["lvllm", "quantize", *map(str, args)])
    capsys.readouterr()  # drop what building the zoo model printed
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def _one_line_error(code: int, err: str, match: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err


def test_cli_json_summary_and_verify_threshold(zoo, tmp_path, monkeypatch, capsys):
    src = zoo("qwen3_moe", "fp8")
    same = ("--numa-nodes", "2", "--group-size", "32")
    code, out, _ = _cli(monkeypatch, capsys, src, tmp_path / "s", *same, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["group_size"] == 32 and summary["source_format"] == "fp8_block"
    assert summary["input_bytes"] > summary["output_bytes"] > 0 and summary["peak_rss_bytes"] > 0
    assert summary["verify"]["mode"] == "sample" and 0 < summary["verify"]["max_rel_error"] < 0.15
    code, out, err = _cli(monkeypatch, capsys, src, tmp_path / "s", *same, "--resume", "--verify", "--verify-threshold", "0.01", "--json")
    summary = json.loads(out)
    assert code == 1 and summary["layers_written"] == [] and summary["verify"]["mode"] == "full"
    assert summary["verify"]["layers"][0]["experts"] == 8 and "threshold 0.01" in err
    monkeypatch.setenv("LVLLM_VIRTUAL_NUMA", "2")  # --numa-nodes auto follows the topology probe
    code, out, _ = _cli(monkeypatch, capsys, src, tmp_path / "one", "--layers", "1-1", "--format", "bf16", "--numa-nodes", "auto")
    assert code == 0 and "bf16" in out
    assert sorted(os.listdir(tmp_path / "one" / "layers")) == ["L001.n0.safetensors", "L001.n1.safetensors"]


def _truncated(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def _without_weights(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def _index_names_missing(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    names = list(load_file(dst / "model.safetensors"))
    os.rename(dst / "model.safetensors", dst / "model-00001-of-00001.safetensors")
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names + ["model.layers.0.mlp.experts.3.gate_proj.weight_x"]}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def _llama(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return dst


@pytest.mark.parametrize(
    "make,match",
    [
        (_without_weights, "neither model.safetensors.index.json nor model.safetensors"),
        (_truncated, "truncated"),
        (_index_names_missing, "is in model.safetensors.index.json but missing from"),
        (_llama, "'llama' is not a supported MoE architecture"),
    ],
)
def test_bad_checkpoint_one_line_no_store(zoo, tmp_path, monkeypatch, capsys, make, match):
    bad = make(zoo("qwen3_moe", "bf16"), tmp_path / "bad")
    code, _, err = _cli(monkeypatch, capsys, bad, tmp_path / "out")
    _one_line_error(code, err, match)
    assert not (tmp_path / "out").exists()


def test_no_group_size_divides(zoo, tmp_path, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, zoo("qwen3_moe", "bf16", moe_intermediate_size=72), tmp_path / "out")
    _one_line_error(code, err, "no INT4 group size in [128, 64, 32] divides the expert dimensions [128, 72]")
    assert not (tmp_path / "out").exists()
    code, _, err = _cli(monkeypatch, capsys, zoo("qwen3_moe", "int4"), tmp_path / "out", "--numa-nodes", "8")
    _one_line_error(code, err, "cannot be split over 8 nodes")


@pytest.mark.parametrize("variant", ["int4", "bf16"])
def test_int4_group_128_over_nodes_narrower_than_it(zoo, tmp_path, variant):
    """I = 128 over 2 nodes: 64 columns of down_proj per node. A 128-group is stored as two 64-groups with its scale
    written twice; the packed codes do not change, so the dequantized experts equal the 128-group ones exactly."""
    src = zoo("qwen3_moe", variant, **({"group_size": 128} if variant == "int4" else {}))
    options = QuantizeOptions(numa_nodes=2, workers=1, group_size=128 if variant == "bf16" else "auto")
    result = quantize(src, tmp_path / "s", options)
    store = ExpertStore.open(tmp_path / "s")
    man = store.manifest
    assert result.passed and (man.group_size, man.quantized_group_size) == (64, 128)
    ckpt = Checkpoint.open(src)
    for layer in man.moe_layers:
        w = ckpt.read_expert(layer, 5, dtype=torch.bfloat16)
        gate = quantize_int4(w["gate"], 128) if variant == "bf16" else ckpt.read_expert_int4(layer, 5)["gate"]
        down = quantize_int4(w["down"], 128) if variant == "bf16" else ckpt.read_expert_int4(layer, 5)["down"]
        assert torch.equal(_whole(store, layer, "w2.packed")[5], down[0])
        assert torch.equal(_whole(store, layer, "w2.scale")[5], down[1].repeat_interleave(2, dim=-1))
        assert torch.equal(_whole(store, layer, "w13.scale")[5][:128], gate[1].repeat_interleave(2, dim=-1))
        w13, w2 = store.expert(layer, 5)
        assert torch.equal(w2, dequantize_int4(*down, 128)) and torch.equal(w13[:128], dequantize_int4(*gate, 128))


def test_output_dir_of_another_model_and_full_disk(zoo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _cli(monkeypatch, capsys, zoo("qwen3_moe", "bf16"), out)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = _cli(monkeypatch, capsys, zoo("mixtral", "bf16"), out, "--resume")
    _one_line_error(code, err, "holds the expert store of a different model (qwen3_moe")
    code, _, err = _cli(monkeypatch, capsys, zoo("qwen3_moe", "bf16"), out)
    _one_line_error(code, err, "already holds a complete store of this model")
    code, _, err = _cli(monkeypatch, capsys, zoo("qwen3_moe", "bf16"), out, "--resume", "--format", "bf16")
    _one_line_error(code, err, "made with other settings (group_size, weight_format)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    code, _, err = _cli(monkeypatch, capsys, zoo("qwen3_moe", "bf16"), tmp_path / "junk")
    _one_line_error(code, err, "is not empty and holds no expert store")

    monkeypatch.setattr(quantize_mod, "free_disk_bytes", lambda path: 10_000)
    code, _, err = _cli(monkeypatch, capsys, zoo("qwen3_moe", "bf16"), tmp_path / "full")
    _one_line_error(code, err, f"plus a {format_bytes(quantize_mod.DISK_MARGIN)} margin, 10 kB free")
    assert "not enough disk space" in err and not (tmp_path / "full").exists()


def test_sigkill_then_resume_is_byte_identical(zoo, tmp_path):
    src = zoo("qwen3_moe", "bf16", num_hidden_layers=4)
    args = ["--numa-nodes", "2", "--workers", "1"]
    killed = tmp_path / "killed"
    env = {**os.environ, quantize_mod.TEST_DELAY_ENV: "0.15"}
    cmd = [sys.executable, "-c", "from lvllm_cli.app import main; main()", "quantize", str(src), str(killed), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = killed / "lvllm.json"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.is_file() and len(json.loads(manifest.read_text())["files"]) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.3)  # into the next layer's experts
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Nothing looks complete: the manifest says so, and every visible layer file is a finished one it lists.
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 2 <= len(state["files"]) < 8
    visible = sorted(str(p.relative_to(killed)) for p in (killed / "layers").iterdir() if not p.name.startswith("."))
    assert visible == sorted(state["files"])
    with pytest.raises(Exception, match="incomplete"):
        ExpertStore.open(killed)

    resumed = quantize(src, killed, QuantizeOptions(numa_nodes=2, workers=2, resume=True))
    assert resumed.layers_skipped and resumed.layers_written
    clean = tmp_path / "clean"
    quantize(src, clean, QuantizeOptions(numa_nodes=2, workers=2))
    files = sorted(str(p.relative_to(clean)) for p in clean.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(killed)) for p in killed.rglob("*") if p.is_file())
    for name in files:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name

    # A damaged finished file is redone on --resume, and the store comes back identical.
    damaged = killed / layer_file(0, 1)
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    again = quantize(src, killed, QuantizeOptions(numa_nodes=2, workers=2, resume=True))
    assert again.layers_written == (0,)
    assert damaged.read_bytes() == (clean / layer_file(0, 1)).read_bytes()
