"""Store writer and reader on random tensors: streamed out-of-order writes give a file the safetensors library reads
back exactly; aborts leave nothing; the manifest round-trips; the reader refuses missing or unfinished stores."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open

from lvllm_runtime.checkpoint import DTYPES
from lvllm_runtime.errors import StoreError
from lvllm_runtime.quant import quantize_int4
from lvllm_runtime.store import (
    ExpertStore,
    LayerFileWriter,
    StoreManifest,
    file_sha256,
    layer_file,
    read_manifest,
    write_manifest,
)


def _manifest(**kw) -> StoreManifest:
    base = dict(
        format_version=1, model_type="qwen3_moe", config_sha256="ab" * 32, source_path="/src", weight_format="int4",
        group_size=32, numa_nodes=2, num_experts=6, hidden_size=64, intermediate_size=128, activation="silu_glu",
        gated=True, moe_layers=(1,),
    )
    return StoreManifest(**{**base, **kw})


def _expert_tensors(man: StoreManifest, seed: int, node: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, dtype, shape in man.tensor_specs(node):
        dtype = DTYPES[dtype]
        if dtype == torch.int32:
            out[name] = torch.randint(-(2**31), 2**31 - 1, shape[1:], generator=g, dtype=torch.int32)
        else:
            out[name] = torch.randn(shape[1:], generator=g).to(dtype)
    return out


@pytest.mark.parametrize("fmt,gated,bias,node", [("int4", True, False, 0), ("bf16", True, False, 0), ("int4", False, False, 0),
                                                ("bf16", True, True, 0), ("int4", True, True, 1)])
def test_streamed_file_reads_back_with_safetensors(tmp_path, fmt, gated, bias, node):
    man = _manifest(weight_format=fmt, gated=gated, group_size=32 if fmt == "int4" else None, expert_bias=bias)
    path = tmp_path / layer_file(1, node)
    w = LayerFileWriter(path, man.tensor_specs(node), man.file_metadata(1, node))
    assert not path.exists() and w.tmp.exists()
    experts = {e: _expert_tensors(man, e, node) for e in range(man.num_experts)}
    order = list(experts)
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda e: w.write_expert(e, experts[e]), order))
    entry = w.finish()
    assert path.exists() and not w.tmp.exists()
    assert entry == {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    assert entry["bytes"] == man.file_bytes(1, node)
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0
    with safe_open(path, "pt") as f:
        assert f.metadata()["lvllm_layer"] == "1"
        assert sorted(f.keys()) == sorted(n for n, _, _ in man.tensor_specs(node))
        # biases: w13.bias [E, R] in every node's file, w2.bias [E, H] in node 0's only
        assert ("w13.bias" in f.keys()) == bias and ("w2.bias" in f.keys()) == (bias and node == 0)
        for name, dtype, shape in man.tensor_specs(node):
            t = f.get_tensor(name)
            assert t.dtype == DTYPES[dtype] and tuple(t.shape) == shape
            for e in range(man.num_experts):
                assert torch.equal(t[e], experts[e][name])


def test_abort_and_bad_slice_leave_nothing(tmp_path):
    man = _manifest()
    path = tmp_path / layer_file(1, 0)
    w = LayerFileWriter(path, man.tensor_specs(0), man.file_metadata(1, 0))
    bad = _expert_tensors(man, 0)
    bad["w2.scale"] = bad["w2.scale"][:, :1]
    with pytest.raises(ValueError, match="w2.scale"):
        w.write_expert(0, bad)
    w.abort()
    assert list(tmp_path.rglob("*.safetensors*")) == []


def test_manifest_round_trip_and_reader(tmp_path):
    man = _manifest(weight_format="int4", group_size=32, numa_nodes=2)
    g = torch.Generator().manual_seed(3)
    i, n = man.intermediate_size, man.node_intermediate_size
    full13 = torch.randn(man.num_experts, 2 * i, man.hidden_size, generator=g)
    full2 = torch.randn(man.num_experts, man.hidden_size, i, generator=g)
    files = {}
    for node in range(2):
        rows = torch.cat([torch.arange(node * n, (node + 1) * n), i + torch.arange(node * n, (node + 1) * n)])
        p13, s13 = quantize_int4(full13[:, rows], 32)
        p2, s2 = quantize_int4(full2[:, :, node * n : (node + 1) * n], 32)
        w = LayerFileWriter(tmp_path / layer_file(1, node), man.tensor_specs(node), man.file_metadata(1, node))
        for e in range(man.num_experts):
            w.write_expert(e, {"w13.packed": p13[e], "w2.packed": p2[e], "w13.scale": s13[e], "w2.scale": s2[e]})
        files[layer_file(1, node)] = w.finish()
    with pytest.raises(StoreError, match="holds no expert store"):
        ExpertStore.open(tmp_path)
    write_manifest(tmp_path, StoreManifest(**{**man.__dict__, "files": files}))
    with pytest.raises(StoreError, match="incomplete"):
        ExpertStore.open(tmp_path)
    done = StoreManifest(**{**man.__dict__, "files": files, "complete": True})
    write_manifest(tmp_path, done)
    assert read_manifest(tmp_path) == done
    store = ExpertStore.open(tmp_path)
    layer = store.layer(1, 1)
    assert layer["w13.packed"].shape == (6, 2 * n, 64 // 8) and layer["w2.scale"].shape == (6, 64, n // 32)
    w13, w2 = store.dequantized(1, 0)
    assert w13.shape == (6, 2 * n, 64) and w2.shape == (6, 64, n) and w13.dtype == torch.float32
    # Whole experts reassemble from the two nodes and sit within INT4 error of the originals.
    for e in (0, 5):
        a13, a2 = store.expert(1, e)
        assert a13.shape == full13[e].shape and a2.shape == full2[e].shape
        assert (a13 - full13[e]).norm() / full13[e].norm() < 0.15
        assert (a2 - full2[e]).norm() / full2[e].norm() < 0.15
    with pytest.raises(StoreError, match="has no layers/L002"):
        store.layer(2, 0)
    (tmp_path / layer_file(1, 1)).write_bytes(b"short")
    with pytest.raises(StoreError, match="wrong size"):
        ExpertStore.open(tmp_path).layer(1, 1)


def test_manifest_rejects_bad_split():
    with pytest.raises(StoreError, match="does not split"):
        _manifest(intermediate_size=100, numa_nodes=3)


def test_manifest_without_expert_bias_key_reads_as_false(tmp_path):
    """Stores written before expert biases existed have no `expert_bias` key: they read as bias-free."""
    man = _manifest(expert_bias=True, complete=True)
    write_manifest(tmp_path, man)
    assert read_manifest(tmp_path).expert_bias
    d = json.loads((tmp_path / "lvllm.json").read_text())
    del d["expert_bias"]
    (tmp_path / "lvllm.json").write_text(json.dumps(d))
    old = read_manifest(tmp_path)
    assert old == StoreManifest(**{**man.__dict__, "expert_bias": False})
    assert [n for n, _, _ in old.tensor_specs(0)] == ["w13.packed", "w2.packed", "w13.scale", "w2.scale"]


def test_manifest_and_sizes_import_without_torch():
    """The planner and launcher read manifests and predict store sizes without loading torch."""
    code = ("import sys; import lvllm_runtime.manifest, lvllm_runtime.model_sizes; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
