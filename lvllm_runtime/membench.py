"""A short measured memory read bandwidth, per NUMA node: what decode speed is bound by (`lvllm doctor --bench`).

One thread per physical core, each pinned to its cpu, first-touches its own slice of the buffer (so the pages sit on
that cpu's node) and then sums it, pass after pass, in step with the others. Reported: the best pass, in decimal GB/s
(1e9 bytes/s), as STREAM does, with the median beside it. Summing uses torch when installed (about 1.5x numpy's
single-core read rate on Zen 3, measured on the 2-core dev box), else numpy; both release the GIL.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from .errors import LvllmError
from .topology import Topology, format_cpulist

MiB = 1 << 20


@dataclass(frozen=True)
class Bandwidth:
    """Read bandwidth of one node (`node` None: all nodes at once). `bytes` is read per pass by `threads` threads."""

    node: int | None
    cpus: tuple[int, ...]
    threads: int
    gb_s: float
    gb_s_median: float
    bytes: int
    passes: int
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kernel() -> tuple[str, Callable[[int], Any], Callable[[Any], Any]]:
    """(backend name, allocate-and-touch(nbytes) -> buffer, read(buffer))."""
    try:
        import torch
    except ImportError:
        import numpy as np

        return "numpy", lambda n: np.ones(n // 4, dtype=np.float32), lambda b: b.sum()
    return "torch", lambda n: torch.ones(n // 4, dtype=torch.float32), lambda b: b.sum()


def read_bandwidth(
    cpus: Sequence[int], total_bytes: int = 512 * MiB, min_seconds: float = 0.5, max_passes: int = 20, node=None
) -> Bandwidth:
    """Measure with one pinned thread per cpu in `cpus`, reading `total_bytes` in all per pass, for at least
    `min_seconds` and 3 timed passes after one warm-up."""
    backend, alloc, read = _kernel()
    cpus = tuple(cpus)
    per_thread = max(MiB, total_bytes // len(cpus)) // 64 * 64
    ready, start, done = (threading.Barrier(len(cpus) + 1) for _ in range(3))
    errors: list[Exception] = []

    def worker(cpu: int) -> None:
        buf = None
        try:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {cpu})  # pid 0 = this thread on Linux
            buf = alloc(per_thread)
        except Exception as e:  # raised by the caller once every thread is ready
            errors.append(e)
        try:
            ready.wait()
            while True:
                start.wait()
                read(buf)
                done.wait()
        except threading.BrokenBarrierError:  # the caller aborts the barriers to end the run
            return

    restore = None
    if backend == "torch":
        import torch

        # Each pinned thread must sum on its own core, not fan out into torch's intra-op pool.
        restore = torch.get_num_threads()
        torch.set_num_threads(1)
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in cpus]
    for t in threads:
        t.start()
    times: list[float] = []
    try:
        ready.wait()
        if errors:
            raise LvllmError(
                f"memory bandwidth test could not start on cpus {format_cpulist(cpus)}: {errors[0]}",
                "free memory, or check this process's cpu affinity (taskset / container cpuset)",
            )
        began = time.perf_counter()
        while len(times) < max_passes and (len(times) < 4 or time.perf_counter() - began < min_seconds):
            start.wait()
            t0 = time.perf_counter()
            done.wait()
            times.append(time.perf_counter() - t0)
    finally:
        for barrier in (ready, start, done):
            barrier.abort()
        for t in threads:
            t.join()
        if restore is not None:
            torch.set_num_threads(restore)
    nbytes = per_thread * len(cpus)
    # The first pass is a warm-up (TLB and cache state); it stays out of the statistics.
    kept = times[1:]
    return Bandwidth(
        node=node,
        cpus=cpus,
        threads=len(cpus),
        gb_s=round(nbytes / min(kept) / 1e9, 2),
        gb_s_median=round(nbytes / statistics.median(kept) / 1e9, 2),
        bytes=nbytes,
        passes=len(kept),
        backend=backend,
    )


def bench_topology(topo: Topology, total_bytes: int = 512 * MiB, min_seconds: float = 0.5) -> dict[str, Any]:
    """Each node on its own (its physical cores), then every node at once when there are several: the sum of the
    per-node figures overstates the machine when nodes share a memory controller (virtual nodes always do).
    Buffers stay under a quarter of each node's free memory."""
    per_node = []
    for n in topo.nodes:
        size = min(total_bytes, max(64 * MiB, n.mem_free // 4))
        per_node.append(read_bandwidth(n.cores, size, min_seconds, node=n.id))
    together = None
    if len(topo.nodes) > 1:
        cores = [c for n in topo.nodes for c in n.cores]
        size = min(total_bytes * len(topo.nodes), 2048 * MiB, max(64 * MiB, topo.ram_available // 4))
        together = read_bandwidth(cores, size, min_seconds)
    return {
        "unit": "GB/s (1e9 bytes/s), best pass",
        "nodes": [b.to_dict() for b in per_node],
        "all_nodes": together.to_dict() if together else None,
    }
