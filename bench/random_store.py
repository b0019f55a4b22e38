"""A random expert store written straight to disk, no source checkpoint: what the GPU benches serve through the hybrid
runtime (hybrid_runtime.HybridRuntime, as `lvllm serve` does), at full model shapes in seconds.

    write(path, layers, E, H, I, group=128, nodes=1) -> StoreManifest   (INT4; random nibbles, bf16 scales giving
                                                                         outputs of about unit variance)
    bench_plan(store_dir, cpus, hot=0, gpu_prefill_min_tokens=None, window=1, max_batch_tokens=8192) -> plan dict

The files are the store's own format (manifest.py's layout through store.LayerFileWriter, manifest written last), so
the runtime maps, registers and streams them exactly as it does a quantized model's.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvllm_runtime.manifest import FORMAT_VERSION, StoreManifest, layer_file, read_complete_manifest  # noqa: E402
from lvllm_runtime.store import LayerFileWriter, write_manifest  # noqa: E402
from lvllm_runtime.errors import StoreError  # noqa: E402


def _tensor(name: str, shape: tuple[int, ...], h: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    if name.endswith(".packed"):
        return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=device, dtype=torch.int64).to(torch.int32)
    fan_in = h if name.startswith("w13") else n
    return ((torch.rand(*shape, generator=gen, device=device) + 0.5) / (4.6 * fan_in**0.5)).bfloat16()


def write(path: str | Path, layers: int, e: int, h: int, i: int, group: int = 128, nodes: int = 1, seed: int = 0,
          device: str | torch.device = "cpu", config_sha256: str = "") -> StoreManifest:
    """A complete random INT4 store of `layers` MoE layers (kept when one of these shapes is there already);
    `config_sha256` ties it to a model directory (manifest.config_sha256 of its config.json) for `lvllm serve`."""
    path = Path(path)
    man = StoreManifest(format_version=FORMAT_VERSION, model_type="qwen3_moe", config_sha256=config_sha256,
                        source_path="random",
                        weight_format="int4", group_size=group, numa_nodes=nodes, num_experts=e, hidden_size=h,
                        intermediate_size=i, activation="silu_glu", gated=True, moe_layers=tuple(range(layers)))
    try:
        old = read_complete_manifest(path)
        if (old.moe_layers, old.num_experts, old.hidden_size, old.intermediate_size, old.group_size,
                old.numa_nodes, old.config_sha256) == (man.moe_layers, e, h, i, group, nodes, config_sha256):
            return old
    except StoreError:
        pass
    gen = torch.Generator(device=device).manual_seed(seed)
    files = {}
    for layer in range(layers):
        for node in range(nodes):
            specs = man.tensor_specs(node)
            w = LayerFileWriter(path / layer_file(layer, node), specs, man.file_metadata(layer, node))
            full = {name: _tensor(name, shape, h, i, gen, device).cpu() for name, _, shape in specs}
            for x in range(e):
                w.write_expert(x, {k: v[x] for k, v in full.items()})
            files[layer_file(layer, node)] = w.finish()
    man = dataclasses.replace(man, files=files, complete=True)
    write_manifest(path, man)
    return man


def bench_plan(store_dir: str | Path, cpus: list[int], hot: int = 0, gpu_prefill_min_tokens: int | None = None,
               window: int = 1, max_batch_tokens: int = 8192) -> dict:
    """A plan (plan.py's schema) for a random store: one node on `cpus`, the first `hot` ids of every layer hot."""
    m = read_complete_manifest(store_dir)
    return {
        "plan_version": 1,
        "model": {"path": "random", "model_type": m.model_type, "config_sha256": ""},
        "store": {"path": str(store_dir), "weight_format": m.weight_format, "group_size": m.group_size,
                  "numa_nodes": m.numa_nodes},
        "runtime": {"nodes": [{"node": n, "cpus": list(cpus), "threads": len(cpus)} for n in range(m.numa_nodes)],
                    "tp_size": 1, "rank_nodes": [list(range(m.numa_nodes))],
                    "hot_experts": {str(L): list(range(hot)) for L in m.moe_layers} if hot else {},
                    "gpu_prefill_min_tokens": gpu_prefill_min_tokens, "prefetch_window": window,
                    "max_batch_tokens": max_batch_tokens},
    }
