"""The plan file: what `lvllm plan` writes and what `lvllm serve` and the vLLM plugin follow.

A plan is a plain JSON object (schema below, version PLAN_VERSION). This module owns only the runtime-facing
part that the plugin needs (`RuntimePlan`) and reading/writing; `planner.py` computes the rest (memory, forecast).

    {
      "plan_version": 1,
      "model":   {"path": str, "model_type": str, "config_sha256": str},
      "store":   {"path": str, "weight_format": "int4"|"bf16", "group_size": int|null, "numa_nodes": int},
      "runtime": {
        "nodes": [{"node": int, "numa_node": int, "cpus": [int, ...], "threads": int, "virtual": bool}, ...],
                                             # node = store slice index, numa_node = where its cpus and pages are
        "tp_size": int,
        "rank_nodes": [[int, ...], ...],     # rank r computes the store slices of these nodes (len == tp_size)
        "hot_experts": {"<layer>": [expert, ...]},   # routed experts kept on the GPU (empty on CPU-only)
        "gpu_prefill_min_tokens": int|null,  # at or above this many tokens a layer runs fully on the GPU
        "prefetch_window": int,              # layers streamed ahead for GPU prefill
        "max_batch_tokens": int              # most tokens one engine call sees (vLLM's max_num_batched_tokens)
      },
      "vllm":    {"max_model_len": int, "max_num_seqs": int, "gpu_memory_utilization": float, "kv_cache_dtype": str},
      "memory":  {...}, "forecast": {...}, "fits": bool, "reasons": [{"why": str, "fix": str}, ...]
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import BadInput

PLAN_VERSION = 1


@dataclass(frozen=True)
class NodeSlot:
    """One (real or virtual) NUMA node the engine runs on."""

    node: int  # the store slice's index
    cpus: tuple[int, ...]
    threads: int
    virtual: bool = False
    numa_node: int | None = None  # the (real or virtual) NUMA node the cpus belong to; older plans lack it

    @property
    def engine_cpus(self) -> tuple[int, ...]:
        """The cpus the engine's threads pin to: the first `threads` of `cpus` (all of them when threads is 0)."""
        return self.cpus[: self.threads or None]


@dataclass(frozen=True)
class RuntimePlan:
    """What the hybrid runtime needs at start-up: the store, the nodes and their threads, the GPU policy."""

    store_path: str
    weight_format: str
    group_size: int | None
    store_numa_nodes: int
    nodes: tuple[NodeSlot, ...]
    tp_size: int = 1
    rank_nodes: tuple[tuple[int, ...], ...] = ((0,),)
    hot_experts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    gpu_prefill_min_tokens: int | None = None
    prefetch_window: int = 1
    max_batch_tokens: int = 8192
    model_type: str = ""
    config_sha256: str = ""

    def nodes_for_rank(self, rank: int) -> tuple[NodeSlot, ...]:
        """The node slots whose store slices rank `rank` computes."""
        wanted = self.rank_nodes[rank]
        by_id = {n.node: n for n in self.nodes}
        return tuple(by_id[i] for i in wanted)

    @classmethod
    def from_dict(cls, plan: dict[str, Any]) -> "RuntimePlan":
        if not isinstance(plan, dict):
            raise BadInput(f"plan is a JSON {type(plan).__name__}, not an object", "make a new plan with `lvllm plan`")
        version = plan.get("plan_version")
        if version != PLAN_VERSION:
            raise BadInput(
                f"plan version {version!r} is not the version this lvllm reads ({PLAN_VERSION})",
                "make a new plan with `lvllm plan`",
            )
        try:
            store, rt = plan["store"], plan["runtime"]
            nodes = tuple(
                NodeSlot(int(n["node"]), tuple(int(c) for c in n["cpus"]), int(n["threads"]), bool(n.get("virtual")),
                         None if n.get("numa_node") is None else int(n["numa_node"]))
                for n in rt["nodes"]
            )
            return cls(
                store_path=str(store["path"]),
                weight_format=str(store["weight_format"]),
                group_size=store.get("group_size"),
                store_numa_nodes=int(store["numa_nodes"]),
                nodes=nodes,
                tp_size=int(rt.get("tp_size", 1)),
                rank_nodes=tuple(tuple(int(x) for x in r) for r in rt.get("rank_nodes", [[n.node for n in nodes]])),
                hot_experts={int(k): tuple(int(e) for e in v) for k, v in rt.get("hot_experts", {}).items()},
                gpu_prefill_min_tokens=rt.get("gpu_prefill_min_tokens"),
                prefetch_window=int(rt.get("prefetch_window", 1)),
                max_batch_tokens=int(rt.get("max_batch_tokens", 8192)),
                model_type=str(plan.get("model", {}).get("model_type", "")),
                config_sha256=str(plan.get("model", {}).get("config_sha256", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadInput(f"plan is missing or has a malformed field: {e}", "make a new plan with `lvllm plan`") from None


def load_plan(path: str | Path) -> dict[str, Any]:
    """Read a plan file; one clear error for a missing or malformed one."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"plan file {p} does not exist", "make one with `lvllm plan MODEL --out plan.json`")
    try:
        plan = json.loads(p.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8 (a binary file)
        raise BadInput(f"plan file {p} is not valid JSON ({e})", "make a new one with `lvllm plan`") from None
    RuntimePlan.from_dict(plan)  # validates the runtime part
    return plan


def save_plan(plan: dict[str, Any], path: str | Path) -> None:
    write_json(path, plan)
