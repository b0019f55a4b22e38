"""GPU prefill: a whole MoE layer computed on the device from INT4 store bytes streamed out of pinned host memory.

For batches at or above the plan's `gpu_prefill_min_tokens`, moving a layer's INT4 bytes over PCIe (~0.3 GB for a
Qwen3-30B-A3B layer, ~6 ms at 54 GB/s) is cheaper than the CPU computing thousands of tokens. The pieces:

    pinned host INT4 (per layer) --side stream, `prefetch_window` layers ahead--> staging slot (window + 1 slots)
    staging slot --dequant_int4_bf16 (Triton on CUDA)--> one bf16 layer buffer --grouped_experts--> out
    the slot is handed back (event) as soon as its dequant has run, so the copy of layer L+window+1 overlaps the
    GEMMs of layer L.

`grouped_experts` is also the graph-safe hot-expert path of the decode step (cuda_graph_step.py): no host sync, so it
can be captured. Both run on the CPU too (torch fallbacks) so CI checks the same arithmetic against the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import BadInput
from .hybrid import LayerWeights, activate, join_node_slices
from .quant import dequantize_int4

try:  # Triton is optional: only the CUDA dequant uses it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _dequant_kernel(p_ptr, s_ptr, o_ptr, n_words, words_per_row, groups_per_row,
                        WORDS_PER_GROUP: tl.constexpr, BLOCK: tl.constexpr):
        # One int32 word = 8 columns (column 8j+k in bits 4k..4k+3, stored q+8); out = (q) * scale[row, col // g].
        w = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = w < n_words
        word = tl.load(p_ptr + w, mask=m, other=0)
        row = w // words_per_row
        s = tl.load(s_ptr + row * groups_per_row + (w % words_per_row) // WORDS_PER_GROUP, mask=m, other=0)
        k = tl.arange(0, 8)
        nib = (word[:, None] >> (k[None, :] * 4)) & 0xF
        val = (nib.to(tl.float32) - 8.0) * s.to(tl.float32)[:, None]
        tl.store(o_ptr + w[:, None] * 8 + k[None, :], val.to(tl.bfloat16), mask=m[:, None])


def dequant_int4_bf16(packed: torch.Tensor, scale: torch.Tensor, group: int, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """packed int32 [..., N, K/8], scale bf16 [..., N, K/group] -> bf16 [..., N, K] (into `out` when given).

    CUDA: one Triton pass (reads 4.1 bits, writes 16 bits per weight). CPU: quant.dequantize_int4 then a cast.
    """
    *lead, n, words = packed.shape
    shape = (*lead, n, words * 8)
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16, device=packed.device)
    if packed.device.type != "cuda" or triton is None:
        out.copy_(dequantize_int4(packed, scale, group))
        return out
    assert packed.is_contiguous() and scale.is_contiguous() and out.is_contiguous() and tuple(out.shape) == shape
    n_words = packed.numel()
    block = 512
    _dequant_kernel[(triton.cdiv(n_words, block),)](packed, scale, out, n_words, words, scale.shape[-1],
                                                    WORDS_PER_GROUP=group // 8, BLOCK=block, num_warps=4)
    return out


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x bf16 [S, K] (rows sorted by group), w bf16 [G, N, K], offs int32 [G] group end rows -> bf16 [S, N].

    Rows past offs[-1] are left unspecified (callers mask them). torch._grouped_mm runs one CUTLASS grouped GEMM on
    sm90 with the offsets read on the device; elsewhere (no kernel for this device/dtype) a per-group loop.
    """
    try:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs)
    except (RuntimeError, NotImplementedError, AttributeError):
        if x.device.type == "cuda":
            raise
        out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for g, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = x[start:end] @ w[g].T
            start = end
        return out


def _weighted_act(h: torch.Tensor, wts: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """act(h) * wts as bf16 [S, I]; h bf16 [S, R], wts f32 [S]. silu_glu stays in bf16 tensors (torch computes each
    op in f32 internally), the other activations go through hybrid.activate."""
    if activation == "silu_glu" and gated:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) * up).mul_(wts.unsqueeze(-1))
    return (activate(h, activation, gated).float() * wts.unsqueeze(-1)).to(torch.bfloat16)


def grouped_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, activation: str, gated: bool, slot: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j w_j * down(act(w13 x)) over the (token, j) pairs whose expert is in w13/w2; no host synchronisation.

    hidden [T, H]; topk_weights f32 [T, k]; topk_ids int [T, k] (-1 = skip); w13 bf16 [G, R, H] (R = 2I gated, gate
    rows first; else I), w2 bf16 [G, H, I]; slot int64 [E] global id -> row of w13/w2 (-1 = not here), or None when
    w13/w2 hold every expert. Returns f32 [T, H].

    Pairs are sorted by expert so each expert's weights are read once for all its tokens (one grouped GEMM per
    projection); pairs of absent experts sort last, past the last group, and are zeroed. The routing weight is applied
    before the (linear) down projection, on I columns instead of H; the k results of a token are summed in f32 after
    un-sorting, with no atomics, so the result does not depend on scheduling (graph replay == eager, bit for bit).
    """
    t, k = topk_ids.shape
    g = w13.shape[0]
    ids = topk_ids.reshape(-1).long()
    if slot is not None:
        ids = torch.where(ids >= 0, slot[ids.clamp(min=0)], -1)
    key = torch.where(ids >= 0, ids, g)
    key_sorted, order = torch.sort(key, stable=True)
    counts = torch.zeros(g + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = torch.cumsum(counts[:g], 0, dtype=torch.int32)
    valid = (key_sorted < g).unsqueeze(-1)
    x = hidden.index_select(0, order // k).to(torch.bfloat16)
    wts = topk_weights.reshape(-1).float().index_select(0, order)
    a = _weighted_act(_grouped_mm(x, w13, offs), wts, activation, gated)
    y = torch.where(valid, _grouped_mm(a, w2, offs), 0.0)  # rows past the last group hold garbage (maybe NaN)
    y = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, j) order
    return y.view(t, k, -1).sum(1, dtype=torch.float32)


class StreamedPrefill:
    """Whole-layer GPU prefill over INT4 layers held in pinned host memory (see the module docstring).

    layers: {layer: LayerWeights int4 (node slices joined, `join_node_slices`)}, all of one shape. On CUDA the host
    tensors are pinned once here; `window` layers ahead are copied on a side stream into `window + 1` staging slots.
    On the CPU nothing moves: the layer is dequantized from the host tensors and computed by grouped_experts.
    """

    def __init__(self, layers: Mapping[int, LayerWeights], activation: str, gated: bool,
                 device: torch.device | str, window: int = 1):
        first = next(iter(layers.values()))
        if first.weight_format != "int4":
            raise BadInput(f"GPU prefill streams INT4 store bytes, this store is {first.weight_format}",
                           "quantize the store with --format int4, or leave gpu_prefill_min_tokens unset in the plan")
        self.device, self.activation, self.gated = torch.device(device), activation, gated
        self.group = first.group_size
        self.window = max(int(window), 0)
        self.order = sorted(layers)
        self.on_cuda = self.device.type == "cuda"
        self.host = {k: (v.pin() if self.on_cuda else v) for k, v in layers.items()}
        t = first.tensors
        e, r, h = t["w13.packed"].shape[0], t["w13.packed"].shape[1], t["w13.packed"].shape[2] * 8
        i = t["w2.packed"].shape[2] * 8
        self.w13 = torch.empty(e, r, h, dtype=torch.bfloat16, device=self.device)
        self.w2 = torch.empty(e, h, i, dtype=torch.bfloat16, device=self.device)
        self.layer_bytes = first.nbytes
        if self.on_cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.slots = [{k: torch.empty_like(v, device=self.device) for k, v in t.items()}
                          for _ in range(self.window + 1)]
            self.free = [None] * len(self.slots)   # event: the slot's last dequant has run
            self.ready: dict[int, tuple[int, torch.cuda.Event]] = {}  # layer -> (slot, copy done)
            self.next_slot = 0

    def _issue(self, layer: int) -> None:
        """Start copying `layer` into the next slot once that slot's previous dequant is done."""
        if layer in self.ready:
            return
        s = self.next_slot
        self.next_slot = (s + 1) % len(self.slots)
        with torch.cuda.stream(self.stream):
            if self.free[s] is not None:
                self.stream.wait_event(self.free[s])
            for k, v in self.host[layer].tensors.items():
                self.slots[s][k].copy_(v, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.ready[layer] = (s, done)

    def weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 bf16 [E, R, H], w2 bf16 [E, H, I]) of `layer` in the shared device buffer, valid until the next call;
        on CUDA this also starts the copies of the next `window` layers."""
        if not self.on_cuda:
            t = self.host[layer].tensors
            dequant_int4_bf16(t["w13.packed"], t["w13.scale"], self.group, self.w13)
            dequant_int4_bf16(t["w2.packed"], t["w2.scale"], self.group, self.w2)
            return self.w13, self.w2
        pos = self.order.index(layer)
        for nxt in self.order[pos: pos + 1 + self.window]:
            self._issue(nxt)
        s, done = self.ready.pop(layer)
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(done)
        t = self.slots[s]
        dequant_int4_bf16(t["w13.packed"], t["w13.scale"], self.group, self.w13)
        dequant_int4_bf16(t["w2.packed"], t["w2.scale"], self.group, self.w2)
        freed = torch.cuda.Event()
        freed.record(cur)
        self.free[s] = freed
        return self.w13, self.w2

    def get(self, layer: int) -> LayerWeights:
        """ExpertStreamer's face (hybrid.HybridMoE): the layer as bf16 LayerWeights on the device."""
        w13, w2 = self.weights(layer)
        return LayerWeights({"w13": w13, "w2": w2}, "bf16")

    def forward(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
        """hidden [T, H] on the device, topk_weights f32 [T, k], topk_ids int [T, k] -> [T, H] hidden's dtype."""
        w13, w2 = self.weights(layer)
        return grouped_experts(hidden, topk_weights, topk_ids, w13, w2, self.activation, self.gated).to(hidden.dtype)

    @classmethod
    def from_shards(cls, shards: Mapping[int, Sequence[Mapping[str, torch.Tensor]]], activation: str, gated: bool,
                    group_size: int, device: torch.device | str, window: int = 1) -> "StreamedPrefill":
        """From store shards {layer: [node 0 dict, node 1 dict, ...]} (ExpertStore.layer(layer, node) per node)."""
        return cls({k: join_node_slices(v, "int4", gated, group_size) for k, v in shards.items()},
                   activation, gated, device, window)
