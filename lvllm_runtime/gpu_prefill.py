"""GPU prefill: a whole MoE layer computed on the device from store bytes streamed out of the mapped store files.

For batches at or above the plan's `gpu_prefill_min_tokens`, moving a layer's INT4 bytes over PCIe (~0.3 GB for a
Qwen3-30B-A3B layer, ~6 ms at 54 GB/s) is cheaper than the CPU computing thousands of tokens. The pieces:

    mapped store file (per layer and node; registered in place with cudaHostRegister, `host_pinning`: not copied)
      --side stream, `prefetch_window` layers ahead--> staging slot (window + 1 slots of one layer's store bytes)
    staging slot --dequant_int4_bf16 (Triton on CUDA; BF16 stores need none)--> one bf16 node-slice buffer (in
      expert chunks where a slice is larger than model_sizes.DEQUANT_BUFFER_CAP)
      --grouped_experts--> out, summed over the rank's node slices (the down projection is linear in I)
    the slot is handed back (event) once its layer has been computed, so the copy of layer L+window+1 overlaps the
    work of layer L.

`grouped_experts` is also the graph-safe hot-expert path of the decode step (cuda_graph_step.py): no host sync, so it
can be captured. Both run on the CPU too (torch fallbacks) so CI checks the same arithmetic against the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BadInput
from .hybrid import activate
from .model_sizes import dequant_chunk_experts
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
    """x [S, K] (rows sorted by group), w [G, N, K] of x's dtype, offs int32 [G] group end rows -> [S, N].

    Rows past offs[-1] are left unspecified (callers mask them). torch._grouped_mm runs one CUTLASS grouped GEMM on
    sm90 with the offsets read on the device (bf16); elsewhere (no kernel for this device/dtype) a per-group loop.
    """
    try:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs)
    except (RuntimeError, NotImplementedError, AttributeError):
        if x.device.type == "cuda" and x.dtype == torch.bfloat16:
            raise
        out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for g, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = x[start:end] @ w[g].T
            start = end
        return out


def _weighted_act(h: torch.Tensor, wts: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """act(h) * wts in h's dtype [S, I]; h [S, R], wts f32 [S]. silu_glu in bf16 stays in bf16 tensors (torch
    computes each op in f32 internally), the rest goes through hybrid.activate."""
    if activation == "silu_glu" and gated and h.dtype == torch.bfloat16:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) * up).mul_(wts.unsqueeze(-1))
    return (activate(h, activation, gated).float() * wts.unsqueeze(-1)).to(h.dtype)


def grouped_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, activation: str, gated: bool, slot: torch.Tensor | None = None,
                    b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j w_j * (down(act(w13 x + b13)) + b2) over the (token, j) pairs whose expert is in w13/w2; no host sync.

    hidden [T, H]; topk_weights f32 [T, k]; topk_ids int [T, k] (-1 = skip); w13 [G, R, H] (R = 2I gated, gate rows
    first; else I), w2 [G, H, I], both bf16 (or f32 for f32 models; the math runs in their dtype); slot int64 [E]
    global id -> row of w13/w2 (-1 = not here), or None when w13/w2 hold every expert; optional expert biases
    b13 [G, R], b2 [G, H] (gpt-oss). Returns f32 [T, H].

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
    x = hidden.index_select(0, order // k).to(w13.dtype)
    wts = topk_weights.reshape(-1).float().index_select(0, order)
    h = _grouped_mm(x, w13, offs)
    rows = key_sorted.clamp(max=g - 1)
    if b13 is not None:
        h = h + b13.to(h.dtype).index_select(0, rows)
    y = _grouped_mm(_weighted_act(h, wts, activation, gated), w2, offs)
    if b2 is not None:
        y = y + (b2.float().index_select(0, rows) * wts.unsqueeze(-1)).to(y.dtype)
    y = torch.where(valid, y, 0.0)  # rows past the last group hold garbage (maybe NaN)
    y = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, j) order
    return y.view(t, k, -1).sum(1, dtype=torch.float32)


@dataclass(frozen=True)
class LayerShape:
    """What one node slice of a layer looks like in the store (every layer of a store has the same)."""

    weight_format: str  # "int4" | "bf16"
    group_size: int | None
    gated: bool
    activation: str


class StreamedPrefill:
    """Whole-layer GPU prefill over store layers (see the module docstring): the one prefill path of the runtime.

    `add_layer(layer, shards)` takes one layer's store node slices as `ExpertStore.layer(layer, node)` maps them (the
    rank's nodes, in node order); on CUDA their files' mappings are registered for DMA once (`host_pinning.HostPins`,
    shared with the caller so a file is registered once). `window` layers ahead are copied on a side stream into
    `window + 1` staging slots. On the CPU nothing moves: each layer is dequantized from the mapped tensors and
    computed by grouped_experts (what CI checks against transformers).
    """

    def __init__(self, shape: LayerShape, device: torch.device | str, window: int = 1, pins=None):
        self.shape, self.device = shape, torch.device(device)
        self.window = max(int(window), 0)
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda and pins is None:
            from .host_pinning import HostPins

            pins = HostPins()
        self.pins = pins
        self.host: dict[int, list[Mapping[str, torch.Tensor]]] = {}
        self.order: list[int] = []
        self.slots: list[list[dict[str, torch.Tensor]]] = []
        self.w13: torch.Tensor | None = None  # bf16 buffer of one node slice (INT4 stores)
        self.w2: torch.Tensor | None = None
        self.layer_bytes = 0

    def add_layer(self, layer: int, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        shards = [dict(s) for s in shards]
        want = {"w13", "w2"} if self.shape.weight_format == "bf16" else {"w13.packed", "w13.scale", "w2.packed",
                                                                         "w2.scale"}
        if not want <= set(shards[0]):
            raise BadInput(f"layer {layer}: store shard has {sorted(shards[0])}, a {self.shape.weight_format} store "
                           f"has {sorted(want)}", "quantize this model again with `lvllm quantize`")
        if self.on_cuda:
            for s in shards:
                self.pins.register(s.values())
        if not self.host:
            self._allocate(shards)
        self.host[layer] = shards
        self.order = sorted(self.host)

    def _allocate(self, shards: list[dict[str, torch.Tensor]]) -> None:
        self.layer_bytes = sum(v.numel() * v.element_size() for s in shards for v in s.values())
        if self.shape.weight_format == "int4":
            p13, p2 = shards[0]["w13.packed"], shards[0]["w2.packed"]
            e, r, h, i = p13.shape[0], p13.shape[1], p13.shape[2] * 8, p2.shape[2] * 8
            self.chunk = dequant_chunk_experts(e, 2 * (r * h + h * i))
            self.w13 = torch.empty(self.chunk, r, h, dtype=torch.bfloat16, device=self.device)
            self.w2 = torch.empty(self.chunk, h, i, dtype=torch.bfloat16, device=self.device)
            ids = torch.arange(e, device=self.device)  # per chunk: global expert id -> row of the buffer, else -1
            self.chunk_slots = [torch.where((ids >= e0) & (ids < e0 + self.chunk), ids - e0, -1)
                                for e0 in range(0, e, self.chunk)] if self.chunk < e else [None]
        if self.on_cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.slots = [[{k: torch.empty_like(v, device=self.device) for k, v in s.items()} for s in shards]
                          for _ in range(self.window + 1)]
            self.free: list = [None] * len(self.slots)  # event: the slot's layer has been computed
            self.ready: dict[int, tuple[int, torch.cuda.Event]] = {}  # layer -> (slot, copy done)
            self.next_slot = 0

    def close(self) -> None:
        """Wait for the copies in flight and unregister the store pages (the runtime's close)."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            self.pins.close()

    def _issue(self, layer: int) -> None:
        """Start copying `layer` into the next slot once that slot's previous layer has been computed."""
        if layer in self.ready:
            return
        s = self.next_slot
        self.next_slot = (s + 1) % len(self.slots)
        with torch.cuda.stream(self.stream):
            if self.free[s] is not None:
                self.stream.wait_event(self.free[s])
            for dst, src in zip(self.slots[s], self.host[layer]):
                for k, v in src.items():
                    dst[k].copy_(v, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.ready[layer] = (s, done)

    def _node_parts(self, t: Mapping[str, torch.Tensor], dtype: torch.dtype):
        """(w13, w2, slot, b13, b2) per piece of one node slice: the whole slice, or for INT4 in bf16 one chunk of
        experts at a time dequantized into the buffer (slot maps the chunk's global ids to its rows)."""
        b13, b2 = t.get("w13.bias"), t.get("w2.bias")
        if self.shape.weight_format == "bf16":
            yield t["w13"].to(dtype), t["w2"].to(dtype), None, b13, b2
            return
        g = self.shape.group_size
        if dtype == torch.float32:  # f32 models on the CPU: exact q * scale, as the engine computes it
            yield (dequantize_int4(t["w13.packed"], t["w13.scale"], g),
                   dequantize_int4(t["w2.packed"], t["w2.scale"], g), None, b13, b2)
            return
        for c, slot in enumerate(self.chunk_slots):
            e0 = c * self.chunk
            e1 = min(e0 + self.chunk, t["w13.packed"].shape[0])
            w13, w2 = self.w13[:e1 - e0], self.w2[:e1 - e0]
            dequant_int4_bf16(t["w13.packed"][e0:e1], t["w13.scale"][e0:e1], g, w13)
            dequant_int4_bf16(t["w2.packed"][e0:e1], t["w2.scale"][e0:e1], g, w2)
            yield (w13, w2, slot, None if b13 is None else b13[e0:e1], None if b2 is None else b2[e0:e1])

    def forward(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
        """hidden [T, H] on the device, topk_weights f32 [T, k], topk_ids int [T, k] -> [T, H] hidden's dtype.
        The GEMMs run in bf16 (f32 only for f32 hidden states on the CPU)."""
        dtype = torch.float32 if hidden.dtype == torch.float32 and not self.on_cuda else torch.bfloat16
        if self.on_cuda:
            pos = self.order.index(layer)
            for nxt in self.order[pos: pos + 1 + self.window]:
                self._issue(nxt)
            s, done = self.ready.pop(layer)
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(done)
            shards = self.slots[s]
        else:
            shards = self.host[layer]
        out = None
        for t in shards:
            for w13, w2, slot, b13, b2 in self._node_parts(t, dtype):
                part = grouped_experts(hidden, topk_weights, topk_ids, w13, w2, self.shape.activation,
                                       self.shape.gated, slot, b13, b2)
                out = part if out is None else out + part
        if self.on_cuda:
            freed = torch.cuda.Event()
            freed.record(cur)
            self.free[s] = freed
        return out.to(hidden.dtype)
