"""What the hybrid runtime does, as Prometheus series under `lvllm_` on vLLM's own /metrics endpoint.

vLLM's API server answers /metrics from a `prometheus_client.multiprocess` collector whenever
PROMETHEUS_MULTIPROC_DIR is set (vllm/v1/metrics/prometheus.py), so series registered in the engine's process (vLLM's
engine core or TP workers) show up there too: `lvllm serve` sets that variable to a fresh directory per server.
Without it (offline `vllm.LLM`, a bare `vllm serve`) the series stay in the engine's process and nothing breaks.

    lvllm_engine_step_seconds{rank}    histogram  CPU engine time of a model step, blocking calls summed over layers
    lvllm_engine_cold_experts{rank}    histogram  distinct experts the engine computed in a step, summed over layers
    lvllm_routed_picks_total           counter    routed (token, expert) picks, real tokens only
    lvllm_hot_picks_total              counter    of these, picks the hot experts on the GPU served
    lvllm_hot_hit_rate                 gauge      hot / routed picks since the server started
    lvllm_tokens_total{path}           counter    tokens per path: engine, decode_step (CUDA graph), gpu_prefill, hot
    lvllm_gpu_prefill_bytes_total      counter    store bytes streamed to the GPU by the whole-layer prefill path
    lvllm_gpu_prefill_gbps             histogram  per prefill step: those bytes / GPU time from its first MoE layer to
                                                  its last

Picks and tokens are counted on the device (routing_profile.RoutingCounts), so CUDA-graph replays count too; the
engine histograms see only the engine calls Python makes (every step on the CPU backend, GPU batches without a
graph-safe step), as a replayed graph runs its host nodes without Python. Picks, hit rate and tokens come from TP
rank 0 only (every rank sees the same routing); the engine series carry the rank.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .routing_profile import ProfileWriter, RoutingCounts

if TYPE_CHECKING:
    from .gpu_prefill import StreamedPrefill
    from .hybrid_runtime import HybridRuntime

PATHS = ("engine", "decode_step", "gpu_prefill", "hot")  # HybridMoE.path's answers
FLUSH_S = 10.0  # how often counts reach the series and the profile file


@functools.lru_cache(maxsize=None)
def series() -> dict | None:
    """The process's lvllm_ series (made once: prometheus_client refuses a name twice); None without
    prometheus_client (the runtime runs without vLLM)."""
    try:
        from prometheus_client import Counter, Gauge, Histogram
    except ImportError:
        return None
    return {
        "engine_s": Histogram("lvllm_engine_step_seconds", "CPU engine time per model step (blocking calls, summed "
                              "over MoE layers)", ["rank"],
                              buckets=(5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)),
        "cold": Histogram("lvllm_engine_cold_experts", "Distinct experts the CPU engine computed per model step, "
                          "summed over MoE layers", ["rank"], buckets=tuple(2 ** i for i in range(15))),
        "picks": Counter("lvllm_routed_picks", "Routed (token, expert) picks of real tokens"),
        "hot": Counter("lvllm_hot_picks", "Routed picks served by the hot experts on the GPU"),
        "hit": Gauge("lvllm_hot_hit_rate", "Hot-expert picks / routed picks since start",
                     multiprocess_mode="mostrecent"),
        "tokens": Counter("lvllm_tokens", "Tokens per runtime path", ["path"]),
        "prefill_bytes": Counter("lvllm_gpu_prefill_bytes", "Store bytes streamed to the GPU for whole-layer prefill"),
        "prefill_gbps": Histogram("lvllm_gpu_prefill_gbps", "GPU-prefill store bytes per second of GPU time of the "
                                  "step's MoE layers", buckets=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128)),
    }


class Publisher:
    """Turns routing snapshots into the counters and the hit-rate gauge (the flush thread calls it)."""

    def __init__(self, hot: Mapping[int, Sequence[int]]):
        self.hot = {int(k): tuple(v) for k, v in hot.items()}
        self.picks = self.hot_picks = 0
        self.tokens = dict.fromkeys(PATHS, 0)

    def __call__(self, picks: Mapping[int, Sequence[int]], path_tokens: Mapping[str, int]) -> None:
        s = series()
        if s is None:
            return
        total = sum(sum(c) for c in picks.values())
        hot = sum(sum(c[e] for e in self.hot.get(layer, ())) for layer, c in picks.items())
        s["picks"].inc(max(total - self.picks, 0))
        s["hot"].inc(max(hot - self.hot_picks, 0))
        self.picks, self.hot_picks = max(total, self.picks), max(hot, self.hot_picks)
        for path, n in path_tokens.items():
            if n > self.tokens[path]:
                s["tokens"].labels(path=path).inc(n - self.tokens[path])
                self.tokens[path] = n
        if total:
            s["hit"].set(hot / total)


class StepObserver:
    """What HybridMoE tells about each layer call, summed per model step (first to last MoE layer of this process).

    `counts` is None on TP ranks other than 0 (only the engine series are theirs). Cheap by design: per layer one
    count (routing_profile.RoutingCounts); per step the padding mask once and one device-to-host copy of the counts;
    engine calls add two clock reads and one numpy bincount of the host ids they already have.
    """

    def __init__(self, counts: RoutingCounts | None, num_experts: int, rank: int,
                 hot: Mapping[int, Sequence[int]] | None = None, prefill: "StreamedPrefill | None" = None,
                 writer: ProfileWriter | None = None):
        self.counts, self.num_experts, self.rank, self.writer = counts, num_experts, str(rank), writer
        self.cold = {}  # layer -> bool [E]: the experts the engine computes
        for layer, experts in (hot or {}).items():
            self.cold[int(layer)] = np.ones(num_experts, dtype=bool)
            self.cold[int(layer)][list(experts)] = False
        self.prefill = prefill if prefill is not None and prefill.on_cuda else None  # on the CPU nothing is streamed
        self.layers: list[int] = []
        self._counting = False  # a step began at the first layer (routing counts on rank 0)
        self._engine_s, self._cold_experts, self._streamed = 0.0, 0, 0
        self._layer, self._picks = -1, None  # the layer in progress and its picks per expert (CPU counting)
        self._prefill_start: tuple[torch.cuda.Event, torch.device] | None = None
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []

    def attach(self, layer: int) -> None:
        self.layers = sorted({*self.layers, int(layer)})

    def close(self) -> None:
        """Last flush of the counts (a runtime replaced in the same process)."""
        if self.writer is not None:
            self.writer.close()

    def begin(self, layer: int, path: str, topk_ids: torch.Tensor, padding: torch.Tensor | None) -> None:
        if layer == self.layers[0]:
            self._engine_s, self._cold_experts, self._streamed = 0.0, 0, 0
            self._resolve_prefill_rates()
            if self.counts is not None:
                self.counts.begin_step(path, topk_ids.shape[0], padding)
                self._counting = True
        if path == "gpu_prefill" and self.prefill is not None and not torch.cuda.is_current_stream_capturing():
            if self._prefill_start is None:
                self._prefill_start = _event(topk_ids.device), topk_ids.device
            self._streamed += self.prefill.layer_bytes
        self._layer = layer
        self._picks = self.counts.add(layer, topk_ids) if self._counting else None

    def engine_call(self, seconds: float, cold_ids: torch.Tensor) -> None:
        """One blocking engine call of `seconds` over host ids [T, k] (-1 = not the engine's): counts the distinct
        experts it computed, from the layer's picks when `begin` counted them on the CPU, else from the ids."""
        self._engine_s += seconds
        if self._picks is not None:
            used = self._picks[self.cold[self._layer]] if self._layer in self.cold else self._picks
        else:
            used = np.bincount(cold_ids.numpy().reshape(-1) + 1, minlength=self.num_experts + 1)[1:]
        self._cold_experts += int(np.count_nonzero(used))

    def end(self, layer: int) -> None:
        if layer != self.layers[-1]:
            return
        if self.counts is not None:
            self.counts.publish()
        s = series()
        if s is None:
            return
        if self._engine_s:
            s["engine_s"].labels(rank=self.rank).observe(self._engine_s)
            s["cold"].labels(rank=self.rank).observe(self._cold_experts)
        if self._streamed:
            s["prefill_bytes"].inc(self._streamed)
            if self._prefill_start is not None:
                start, device = self._prefill_start
                self._pending.append((start, _event(device), self._streamed))
        self._prefill_start = None

    def _resolve_prefill_rates(self) -> None:
        """Observe the GB/s of finished prefill steps (their events, queried without waiting; never while a CUDA
        graph is being captured)."""
        if not self._pending or torch.cuda.is_current_stream_capturing():
            return
        s = series()
        while self._pending and self._pending[0][1].query():
            start, end, nbytes = self._pending.pop(0)
            ms = start.elapsed_time(end)
            if s is not None and ms > 0:
                s["prefill_gbps"].observe(nbytes / ms / 1e6)


def _event(device: torch.device) -> torch.cuda.Event:
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(torch.cuda.current_stream(device))
    return ev


def observe(rt: "HybridRuntime", record_path: str | None = None, every_s: float = FLUSH_S) -> StepObserver:
    """The step observer of a runtime (attach it to each HybridMoE as it loads): counts and series on TP rank 0,
    engine series on every rank, and the profile file at `record_path` (rank 0) rewritten every `every_s` s."""
    m, p = rt.store.manifest, rt.placement
    counts = writer = None
    if p.tp_rank == 0:
        counts = RoutingCounts(m.moe_layers, m.num_experts, p.top_k, PATHS, p.device)
        meta = {"model_type": m.model_type, "config_sha256": m.config_sha256}
        writer = ProfileWriter(counts, record_path, every_s, meta, Publisher(rt.plan.hot_experts))
    return StepObserver(counts, m.num_experts, p.tp_rank, rt.plan.hot_experts, rt.prefill, writer)
