"""The hybrid MoE layer: routed experts split between the device (hot) and the CPU engine (cold), torch only.

Nothing here knows vLLM: `vllm_plugin.py` hands this layer the hidden states and vLLM's routing, the standalone
harness calls `route` itself. The same code runs on the CPU (CI) and on CUDA (the GPU box):

    hidden [T,H] --route--> (topk_weights f32 [T,k], topk_ids int32 [T,k])
        T >= gpu_prefill_min_tokens : whole layer on the device, store bytes streamed (gpu_prefill.StreamedPrefill)
        T among the decode steps    : (CUDA) the engine's part goes device -> pinned -> host-callback node -> pinned
                                      -> device on the current stream, capturable in a CUDA graph, beside the hot
                                      experts' grouped GEMM (cuda_graph_step.HybridDecodeLayer)
        otherwise                   : hot ids -> grouped GEMM on the device; cold ids (hot ones masked to -1) ->
                                      engine.forward on host copies; sum of both
Shared experts are the caller's business (vLLM runs them itself), so they overlap with the engine's host work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .arch import Routing
    from .cuda_graph_step import HybridDecodeLayer
    from .gpu_prefill import StreamedPrefill
    from .metrics import StepObserver

GPTOSS_ALPHA, GPTOSS_LIMIT = 1.702, 7.0


class ColdEngine(Protocol):
    """What HybridMoE needs from `engine.Engine`: one blocking call per layer step on host tensors."""

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                out: torch.Tensor) -> None: ...


def route(router_logits: torch.Tensor, routing: "Routing", correction_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts as the architecture does (HF reference semantics).

    router_logits [T,E] any float dtype; correction_bias f32 [E] (DeepSeek-V3 style, only steers selection).
    Returns topk_weights f32 [T,k] (renormalised and times routed_scaling_factor as configured), topk_ids int32 [T,k].
    """
    logits = router_logits.float()
    k = routing.top_k
    if routing.softmax_after_topk:
        top_logits, ids = torch.topk(logits, k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
    else:
        scores = torch.softmax(logits, dim=-1) if routing.scoring == "softmax" else torch.sigmoid(logits)
        choice = scores + correction_bias.float() if correction_bias is not None else scores
        if routing.n_group > 1:
            t, e = choice.shape
            grouped = choice.view(t, routing.n_group, e // routing.n_group)
            group_score = (grouped.topk(2, dim=-1)[0].sum(-1) if correction_bias is not None
                           else grouped.max(dim=-1).values)
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(routing.topk_group, dim=-1)[1], 1.0)
            mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)
            choice = choice.masked_fill(mask == 0, float("-inf"))
        ids = torch.topk(choice, k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if routing.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if routing.scoring == "sigmoid" else 0.0))
    weights = weights * routing.routed_scaling_factor
    return weights.float(), ids.to(torch.int32)


def activate(h: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """Expert activation on the up-projection output h [T, 2I] (gated: gate half first) or [T, I]; same dtype back."""
    x = h.float()
    if not gated:
        if activation != "relu2":
            raise ValueError(f"activation {activation!r} needs gate rows; only relu2 runs without them")
        return F.relu(x).square().to(h.dtype)
    gate, up = x.chunk(2, dim=-1)
    if activation == "silu_glu":
        y = F.silu(gate) * up
    elif activation == "gelu_tanh_glu":
        y = F.gelu(gate, approximate="tanh") * up
    elif activation == "gptoss_glu":
        gate = gate.clamp(max=GPTOSS_LIMIT)
        up = up.clamp(-GPTOSS_LIMIT, GPTOSS_LIMIT)
        y = (up + 1) * gate * torch.sigmoid(gate * GPTOSS_ALPHA)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return y.to(h.dtype)


@dataclass(frozen=True)
class LayerWeights:
    """One layer's routed experts for one rank, in store format (node slices already joined along I).

    bf16: tensors {"w13": bf16 [E, (2)I, H], "w2": bf16 [E, H, I]};
    int4: {"w13.packed": int32 [E, (2)I, H/8], "w13.scale": bf16 [E, (2)I, H/g], "w2.packed": int32 [E, H, I/8],
           "w2.scale": bf16 [E, H, I/g]} with group size g.
    Either may add the expert biases (gpt-oss): "w13.bias" bf16 [E, (2)I] (rows as w13), "w2.bias" bf16 [E, H]
    (absent on a rank whose slices exclude node 0: the sum over ranks adds it once).
    """

    tensors: Mapping[str, torch.Tensor]
    weight_format: str
    group_size: int | None = None

    @property
    def num_experts(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e as (w13 [(2)I, H], w2 [H, I]) in `dtype`, dequantized on the tensors' own device."""
        t = self.tensors
        if self.weight_format == "bf16":
            return t["w13"][e].to(dtype), t["w2"][e].to(dtype)
        from .quant import dequantize_int4

        return (dequantize_int4(t["w13.packed"][e], t["w13.scale"][e], self.group_size).to(dtype),
                dequantize_int4(t["w2.packed"][e], t["w2.scale"][e], self.group_size).to(dtype))

    def bias(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Expert e's biases (b13 [(2)I], b2 [H]) in `dtype`; None for each one these weights lack."""
        b13, b2 = self.tensors.get("w13.bias"), self.tensors.get("w2.bias")
        return (None if b13 is None else b13[e].to(dtype)), (None if b2 is None else b2[e].to(dtype))

    def select(self, experts: Sequence[int]) -> "LayerWeights":
        idx = torch.tensor(list(experts), dtype=torch.long, device="cpu")  # explicit: loaders set default devices
        return LayerWeights({k: v.index_select(0, idx.to(v.device)) for k, v in self.tensors.items()},
                            self.weight_format, self.group_size)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LayerWeights":
        return LayerWeights({k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()},
                            self.weight_format, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())


def join_node_slices(shards: Sequence[Mapping[str, torch.Tensor]], weight_format: str, gated: bool,
                     group_size: int | None = None) -> LayerWeights:
    """Join store node slices (each In wide, in node order) into one [.., sum In, ..] rank slice.

    Gated w13 rows are [gate slice | up slice] per node, so gate halves and up halves are joined separately; so are
    the rows of "w13.bias". "w2.bias" lives in node 0's shard only and is kept as it is.
    """
    if len(shards) == 1:
        return LayerWeights(dict(shards[0]), weight_format, group_size)

    def rows(key: str) -> torch.Tensor:
        if not gated:
            return torch.cat([s[key] for s in shards], dim=1)
        halves = [s[key].chunk(2, dim=1) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)

    def cols(key: str) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=2)

    biases = {}
    if "w13.bias" in shards[0]:
        biases["w13.bias"] = rows("w13.bias")
    if "w2.bias" in shards[0]:
        biases["w2.bias"] = shards[0]["w2.bias"]
    if weight_format == "bf16":
        return LayerWeights({"w13": rows("w13"), "w2": cols("w2"), **biases}, weight_format, group_size)
    return LayerWeights({"w13.packed": rows("w13.packed"), "w13.scale": rows("w13.scale"),
                         "w2.packed": cols("w2.packed"), "w2.scale": cols("w2.scale"), **biases}, weight_format,
                        group_size)


class HybridMoE:
    """Routed-expert computation for one MoE layer: engine (cold) + hot experts on the device + GPU prefill path.

    `engine` is anything with `forward(layer, hidden, topk_ids, topk_weights, out)` on host tensors (the C++
    `engine.Engine`); None is allowed only when every expert is hot. `decode` holds the hot experts (grouped GEMMs on
    the device, torch's CPU kernels in CI) and the graph-safe engine steps of its batch sizes (CUDA). `prefill`
    serves the whole-layer path at or above `gpu_prefill_min_tokens` tokens (None disables it).
    Built by `hybrid_runtime.HybridRuntime`, never by hand outside tests.
    """

    def __init__(self, layer: int, engine: ColdEngine | None, decode: "HybridDecodeLayer",
                 prefill: "StreamedPrefill | None" = None, gpu_prefill_min_tokens: int | None = None):
        self.layer, self.engine, self.decode, self.prefill = layer, engine, decode, prefill
        self.gpu_prefill_min_tokens = gpu_prefill_min_tokens
        self.all_hot = decode.all_hot
        if engine is None and not self.all_hot:
            raise ValueError(f"layer {layer}: cold experts need an engine")
        self.observer: "StepObserver | None" = None  # metrics.observe: routed picks, paths, engine time

    def uses_whole_layer(self, num_tokens: int) -> bool:
        return (self.prefill is not None and self.gpu_prefill_min_tokens is not None
                and num_tokens >= self.gpu_prefill_min_tokens)

    def uses_decode_step(self, num_tokens: int) -> bool:
        """True when a T-token batch runs through the graph-safe step (pinned buffers, host-callback node)."""
        return not self.all_hot and num_tokens in self.decode.steps

    def path(self, num_tokens: int) -> str:
        """Which path a T-token batch takes: "gpu_prefill", "decode_step", "hot" (every expert on the device) or
        "engine" (blocking copies around the engine, plus any hot experts)."""
        if self.uses_whole_layer(num_tokens):
            return "gpu_prefill"
        if self.uses_decode_step(num_tokens):
            return "decode_step"
        return "hot" if self.all_hot else "engine"

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                padding: torch.Tensor | None = None, observe: bool = True) -> torch.Tensor:
        """hidden [T,H] bf16|f32 on the device, topk_weights f32 [T,k], topk_ids int [T,k] -> [T,H] hidden's dtype.

        The observer (if any) is told of the call unless `observe` is False (vLLM's profile and warm-up runs);
        padding bool [T] marks the padding rows of a padded batch (None: every row is a token)."""
        if hidden.shape[0] == 0:
            return torch.zeros_like(hidden)
        path = self.path(hidden.shape[0])
        obs = self.observer if observe else None
        if obs is not None:
            obs.begin(self.layer, path, topk_ids, padding)
        if path == "gpu_prefill":
            out = self.prefill.forward(self.layer, hidden, topk_weights, topk_ids)
        elif path == "decode_step":
            out = self.decode(hidden, topk_weights, topk_ids)
        else:
            out = self.decode.hot(hidden, topk_weights, topk_ids)
            if not self.all_hot:
                cold = self._engine_forward(hidden, topk_weights, self.decode.cold_ids(topk_ids), obs)
                out = cold.float() if out is None else out + cold.float()
            out = out.to(hidden.dtype)
        if obs is not None:
            obs.end(self.layer)
        return out

    def _engine_forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        obs: "StepObserver | None" = None) -> torch.Tensor:
        """The engine's part on host copies (none needed on the CPU); result back on hidden's device."""
        host = torch.device("cpu")
        h = hidden.to(host).contiguous()
        out = torch.empty_like(h)
        ids = topk_ids.to(host, torch.int32).contiguous()
        t0 = time.perf_counter()
        self.engine.forward(self.layer, h, ids, topk_weights.to(host, torch.float32).contiguous(), out)
        if obs is not None:
            obs.engine_call(time.perf_counter() - t0, ids)
        return out.to(hidden.device)
