"""Routed picks per MoE layer and expert: counted while serving, written as the profile `lvllm plan` reads.

This module owns the file format (`lvllm serve --record-routing FILE` writes it, `lvllm plan --routing-profile FILE`
reads it):

    {"format": "lvllm-routing-profile", "version": 1, "model_type": ..., "config_sha256": ..., "num_experts": E,
     "top_k": k, "tokens": tokens routed, "layers": {"<layer>": [picks of expert 0, ..., picks of expert E-1]}}

A bare {"<layer>": [count per expert]} map (or one under "layers") is read too, for hand-written profiles.

Counting costs one scatter-add per MoE layer call on the device the ids are on, and one copy of the counts into
pinned host memory per step: both are plain kernels, so they are captured in CUDA graphs and run on every replay,
and the flush thread only reads host memory (a CUDA call from a second thread could break a capture in progress).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json
from .errors import BadInput

log = logging.getLogger("vllm.lvllm")

FORMAT, VERSION = "lvllm-routing-profile", 1
FIX = 'record one with `lvllm serve MODEL --record-routing FILE`, or write {"<layer>": [count per expert]}'


def read_profile(path: str | Path, num_experts: int) -> dict[int, list[float]]:
    """{layer: picks per expert} of a profile file; BadInput (one line, with the fix) for anything else."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"routing profile {path} is unreadable ({e})", FIX) from None
    if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT):
        raise BadInput(f"routing profile {path} is a {raw.get('format')!r} file", FIX)
    layers = raw.get("layers", raw) if isinstance(raw, dict) else raw
    try:
        prof = {int(k): [float(x) for x in v] for k, v in layers.items()}
    except (AttributeError, TypeError, ValueError):
        raise BadInput(f"routing profile {path} is not {{layer: [count per expert]}}", FIX) from None
    for layer, counts in prof.items():
        if len(counts) != num_experts:
            raise BadInput(f"routing profile layer {layer} has {len(counts)} counts, the model {num_experts} experts",
                           "use a profile recorded on this model")
        if any(c < 0 or c != c for c in counts):
            raise BadInput(f"routing profile layer {layer} has a negative or NaN count", FIX)
    return prof


def hottest(counts: Sequence[float], k: int) -> list[int]:
    """The k most picked experts (ties: lower id first), sorted by id."""
    return sorted(sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:k])


def hot_share(profile: Mapping[int, Sequence[float]], hot: Mapping[int, Sequence[int]]) -> float | None:
    """Picks the hot sets serve / all picks, over the profile's layers (None when it has no picks)."""
    total = sum(sum(c) for c in profile.values())
    if not total:
        return None
    return sum(sum(c[e] for e in hot.get(layer, ())) for layer, c in profile.items()) / total


class RoutingCounts:
    """Routed picks per (MoE layer, expert) and tokens per runtime path, counted on the device of the ids.

    `stats` int64 [layers * E + paths] lives on `device`; on CUDA `host` is its pinned host copy, refreshed by
    `publish` at each step's last MoE layer. `begin_step` takes the step's padding mask once; `add` then counts each
    layer's picks of real tokens only: on CUDA with row weights (1 real, 0 padding) in a scatter-add, so graph replays
    count exactly their real tokens; on the CPU with numpy's bincount on the same memory (a torch op costs ~7 us of
    dispatch per call here, numpy ~1 us: 48 layers a step).
    """

    def __init__(self, layers: Sequence[int], num_experts: int, top_k: int, paths: Sequence[str],
                 device: torch.device | str):
        self.layers, self.num_experts, self.top_k, self.paths = tuple(sorted(layers)), num_experts, top_k, tuple(paths)
        self.device = torch.device(device)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        n = len(self.layers) * num_experts
        self.stats = torch.zeros(n + len(self.paths), dtype=torch.int64, device=self.device)
        self.picks = self.stats[:n].view(len(self.layers), num_experts)
        self.path_tokens = self.stats[n:]
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda:
            self.host = torch.zeros(self.stats.shape, dtype=torch.int64, device="cpu", pin_memory=True)
        else:
            self.host = self.stats
            self._np_picks, self._np_paths = self.picks.numpy(), self.path_tokens.numpy()  # views: same memory
        self._weights: torch.Tensor | None = None  # CUDA: int64 [T * k] row weights of the current step
        self._real: np.ndarray | None = None  # CPU: bool [T * k] real picks of the current step (None: all)

    def begin_step(self, path: str, num_tokens: int, padding: torch.Tensor | None) -> None:
        """A model step of `num_tokens` rows on `path` starts; padding bool [T] marks rows that are not tokens."""
        i = self.paths.index(path)
        if self.on_cuda:
            real = (torch.ones(num_tokens, dtype=torch.int64, device=self.device) if padding is None
                    else 1 - padding.to(self.device, torch.int64))
            self._weights = real.unsqueeze(1).expand(num_tokens, self.top_k).reshape(-1)  # no host sync: capturable
            self.path_tokens[i: i + 1].add_(real.sum())
            return
        if padding is None:
            self._real = None
            self._np_paths[i] += num_tokens
        else:
            real = ~padding.numpy()
            self._real = np.repeat(real, self.top_k)
            self._np_paths[i] += int(real.sum())

    def add(self, layer: int, topk_ids: torch.Tensor) -> np.ndarray | None:
        """Count layer `layer`'s picks topk_ids [T, k] (ids >= 0) of the step's real tokens; on the CPU returns this
        call's picks per expert (int64 [E])."""
        if self.on_cuda:
            self.picks[self.row[layer]].scatter_add_(0, topk_ids.reshape(-1).long(), self._weights)
            return None
        ids = topk_ids.numpy().reshape(-1)
        if self._real is not None:
            ids = ids[self._real]
        picks = np.bincount(ids, minlength=self.num_experts)
        self._np_picks[self.row[layer]] += picks
        return picks

    def publish(self) -> None:
        """Copy the counts to the pinned host copy (asynchronously on the current stream; a graph node under
        capture). Nothing to do on the CPU."""
        if self.on_cuda:
            self.host.copy_(self.stats, non_blocking=True)

    def snapshot(self) -> tuple[dict[int, list[int]], dict[str, int]]:
        """({layer: picks per expert}, {path: tokens}) as last published (read from host memory only)."""
        values = self.host.tolist()
        n, e = len(self.layers), self.num_experts
        picks = {layer: values[i * e:(i + 1) * e] for i, layer in enumerate(self.layers)}
        return picks, dict(zip(self.paths, values[n * e:]))


class ProfileWriter:
    """Writes the counts as a profile file every `every_s` seconds (temp file, fsync, rename) from a daemon thread,
    and once more when the process exits; `also` is called with each snapshot (metrics)."""

    def __init__(self, counts: RoutingCounts, path: str | Path | None, every_s: float, meta: Mapping[str, object],
                 also=None):
        self.counts, self.path, self.every_s, self.meta, self.also = counts, path, float(every_s), dict(meta), also
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lvllm-routing", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            picks, path_tokens = self.counts.snapshot()
            if self.also is not None:
                self.also(picks, path_tokens)
            if self.path is None:
                return
            first = picks[self.counts.layers[0]] if self.counts.layers else []
            try:
                write_json(self.path, {"format": FORMAT, "version": VERSION, **self.meta,
                                       "num_experts": self.counts.num_experts, "top_k": self.counts.top_k,
                                       "tokens": sum(first) // max(self.counts.top_k, 1),
                                       "layers": {str(layer): c for layer, c in picks.items()}})
            except Exception as e:  # noqa: BLE001 - a full disk must not stop the server; said once per failure
                log.warning("lvllm: cannot write the routing profile %s: %s", self.path, e)

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self.flush()
