"""Python face of the C++ CPU expert engine (`lvllm_runtime._cpu`); works with torch tensors or numpy arrays (DLPack).

One `Engine` serves the routed experts of every MoE layer of a model on this host: each node in `nodes` holds its
slice `In = I / len(nodes)` of every expert (the store's split, DESIGN.md) and computes it for every token with its
own pinned threads; the partial outputs are summed once.

Thread budget: the engine starts one thread per entry of `nodes` and pins it there. Give it the cores torch/OpenMP
do not use (or set torch.set_num_threads low): both spinning on the same cores makes each several times slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import BadInput, EngineError

log = logging.getLogger("vllm.lvllm")  # a child of vLLM's logger, as hybrid_runtime.py's

ACTIVATIONS = ("silu_glu", "relu2", "gptoss_glu", "gelu_tanh_glu")
WEIGHT_FORMATS = ("int4", "bf16")


def _module():
    try:
        from . import _cpu
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise EngineError(f"the C++ engine lvllm_runtime._cpu is not built ({e})",
                          "reinstall lvllm: pip install --no-build-isolation -e .") from None
    return _cpu


def _bad(e: Exception) -> BadInput:
    return BadInput(str(e), "see the Engine docstring in lvllm_runtime/engine.py for shapes and dtypes")


# Idle workers spin this long (microseconds) before they sleep. Shared: the engine's cpus also run vLLM-CPU's own
# threads, which a spinning worker would slow. Own cores (a GPU host: the plan leaves two for vLLM): spin through
# the GPU's part of each decode layer (~0.1-0.5 ms), so a call finds its workers awake (waking 15 sleeping threads
# cost ~60 us a call on the H200 host's Sapphire Rapids, bench/cpu_decode.py).
SPIN_US_SHARED_CPUS = 50
SPIN_US_OWN_CPUS = 1000


def keep_other_threads_off(cpus: Iterable[int]) -> int:
    """Take `cpus` out of the affinity of every thread of this process but the engine's workers (named lvllm-n*);
    threads they start later inherit it. Own-cpu engines spin on their cores: a main thread or CUDA host-callback
    thread landing there stalled every call by a scheduler slice (30B graph decode on the H100 host: 5.2 tok/s vs
    35.5 with them on two cores of their own). A thread left with no cpu keeps its set. Returns the threads moved."""
    engine = set(cpus)
    moved = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("lvllm-n"):
                    continue
            have = os.sched_getaffinity(int(tid))
            keep = have - engine
            if keep and keep != have:
                os.sched_setaffinity(int(tid), keep)
                moved += 1
        except OSError:  # the thread ended meanwhile
            continue
    return moved


class Engine:
    """Routed experts of a model's MoE layers on the CPU.

    hidden_size H, intermediate_size In (this host's per-node slice: I / len(nodes)), num_experts E;
    activation one of ACTIVATIONS (relu2 means gated=False: w13 holds only the up rows);
    weight_format "int4" (group_size a multiple of 8 that divides H and In; the SIMD kernels need a multiple of 32,
    other sizes run the slow portable kernels and say so once in the log: see kernel_note) or "bf16"; nodes: cpu ids per node, one pinned thread each;
    max_tokens: the largest T a forward may get. isa: "" picks the best kernel table (see available_isas()).
    int8_activations: INT4 only; False keeps fp32/bf16 activations (exact to fp32, slower: see
    int8_activations_max_tokens). spin_us: how long idle workers spin before they sleep; long (a few ms) when the
    engine's cpus are its own and its calls come every layer (GPU decode), short when vLLM-CPU's threads share them.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, activation: str, gated: bool,
                 weight_format: str, group_size: int | None, nodes: Sequence[Sequence[int]], max_tokens: int,
                 isa: str = "", int8_activations: bool = True, spin_us: int = SPIN_US_SHARED_CPUS):
        if activation not in ACTIVATIONS:
            raise BadInput(f"activation {activation!r} is unknown", f"use one of {', '.join(ACTIVATIONS)}")
        if weight_format not in WEIGHT_FORMATS:
            raise BadInput(f"weight_format {weight_format!r} is unknown", "use int4 or bf16")
        if weight_format == "int4" and group_size is None:
            raise BadInput("weight_format int4 needs a group_size", "pass the store's group_size (32, 64 or 128)")
        try:
            node_lists = [[int(c) for c in cpus] for cpus in nodes]
        except TypeError:
            raise BadInput("nodes must be a list of cpu-id lists", "e.g. nodes=[[0, 1], [2, 3]]") from None
        self._inflight: tuple[Any, ...] | None = None
        try:
            self._e = _module().Engine(int(hidden_size), int(intermediate_size), int(num_experts), activation,
                                       bool(gated), weight_format, int(group_size or 0), node_lists, int(max_tokens),
                                       isa, bool(int8_activations), int(spin_us))
        except ValueError as e:
            msg = str(e)
            if "AVX2" in msg or "not available" in msg:
                raise EngineError(msg, "run on a CPU with AVX2+FMA, or pick one of Engine.available_isas()") from None
            raise _bad(e) from None
        self.hidden_size, self.intermediate_size, self.num_experts = int(hidden_size), int(intermediate_size), int(num_experts)
        self.nodes = node_lists
        if self.kernel_note:
            log.warning("CPU engine: %s", self.kernel_note)

    @staticmethod
    def available_isas() -> list[str]:
        """Kernel tables this CPU and build can run, best first (e.g. ['avx512', 'avx2', 'ref'])."""
        return list(_module().available_isas())

    @property
    def isa(self) -> str:
        """The kernel table in use."""
        return self._e.isa

    @property
    def int8_activations_max_tokens(self) -> int:
        """INT4 kernel calls with at most this many tokens per expert quantize activations to int8 per 32-column
        block (llama.cpp Q8_0 style, ~1e-2 relative error against fp32 activations); 0: fp32/bf16 activations only."""
        return int(self._e.int8_activations_max_tokens)

    @property
    def kernel_note(self) -> str:
        """Why this engine runs slower kernels than the CPU has (e.g. an INT4 group size the SIMD kernels cannot
        tile), or "" when it does not. Logged once, at construction."""
        return self._e.kernel_note

    def last_paths(self) -> list[str]:
        """Kernel paths the last forward called, of int4_fp32_act (INT4 x fp32/bf16 activations), int4_q8_gemv
        (INT4 x int8, few tokens per expert), int4_q8_gemm (INT4 x int8 prefill GEMM), bf16: so a test or a bench
        can tell which one it measured."""
        return list(self._e.last_paths())

    @property
    def pin_failures(self) -> int:
        """Threads that could not be pinned to their cpu (pinning is best effort)."""
        return self._e.pin_failures

    def last_trace(self) -> dict[str, Any]:
        """Where the last forward's time went, in microseconds after its launch: per thread, when it started and when
        it left phase 0, its phase A items, the wait for its node's phase A, its phase B items, the wait for every
        node's phase B and phase C; plus the routing before. A phase ends when its work is done, so a late thread
        starts after the others finished it and skips ahead."""
        raw = list(self._e.last_trace())
        if not raw:
            return {"threads": [], "routing_us": None}
        n = _module().Engine.TRACE_POINTS
        rows = [[v / 1e3 for v in raw[i:i + n]] for i in range(0, len(raw) - 1, n)]
        return {"threads": rows, "routing_us": raw[-1] / 1e3}

    def read_bandwidth(self, bytes_per_node: int = 1 << 30, reps: int = 3) -> float:
        """GB/s the engine's own pinned threads read from node-local buffers (best of reps): the decode roofline."""
        self.wait()
        return float(self._e.read_bandwidth(int(bytes_per_node), int(reps)))

    def load_layer(self, layer: int, shards: Sequence[Mapping[str, Any]]) -> None:
        """Copy (bf16) or repack (int4) one layer's per-node store shards into node-local memory.

        shards[n]: int4 {"w13.packed": int32 [E, R, H/8], "w13.scale": bf16 [E, R, H/g], "w2.packed": int32
        [E, H, In/8], "w2.scale": bf16 [E, H, In/g]} or bf16 {"w13": [E, R, H], "w2": [E, H, In]};
        R = 2 In (gate rows then up rows), or In when not gated. numpy callers pass bf16 as uint16 bits.
        Optional expert biases (gpt-oss): "w13.bias" bf16|f32 [E, R] in every shard, "w2.bias" bf16|f32 [E, H] in
        shards[0] only (the node sum adds it once); absent = zero. Any other key is refused.
        """
        self.wait()
        try:
            self._e.load_layer(int(layer), [dict(s) if isinstance(s, Mapping) else s for s in shards])
        except (ValueError, TypeError) as e:
            raise _bad(e) from None

    def forward(self, layer: int, hidden, topk_ids, topk_weights, out) -> None:
        """out [T, H] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t]) over every node's slice;
        expert(x) = W2 act(W13 x + b13) + b2 with the loaded biases (zero when absent).

        hidden [T, H] f32|bf16, topk_ids [T, k] int32|int64 (-1 = skip), topk_weights [T, k] f32,
        out [T, H] with hidden's dtype. Blocks until done; safe to call from several threads (they take turns).
        """
        try:
            self._e.forward(int(layer), hidden, topk_ids, topk_weights, out)
        except (ValueError, TypeError) as e:
            raise _bad(e) from None

    def submit(self, layer: int, hidden, topk_ids, topk_weights, out) -> None:
        """Start forward() and return at once; `hidden` and `out` must not change until wait() returns."""
        self.wait()
        try:
            self._e.submit(int(layer), hidden, topk_ids, topk_weights, out)
        except (ValueError, TypeError) as e:
            raise _bad(e) from None
        self._inflight = (hidden, topk_ids, topk_weights, out)

    def wait(self) -> None:
        """Block until the submitted forward (if any) has written `out`."""
        try:
            self._e.wait()
        except ValueError as e:
            raise _bad(e) from None
        finally:
            self._inflight = None

    def arm(self, layer: int, hidden, topk_ids, topk_weights, out) -> tuple[int, int, int]:
        """Store arguments for a C-level driver (CUDA host callback) and return (submit_fn, wait_fn, user_data):
        addresses of `void fn(void*)` functions to call with user_data. Arrays must stay alive until wait()."""
        self.wait()
        try:
            self._e.arm(int(layer), hidden, topk_ids, topk_weights, out)
        except (ValueError, TypeError) as e:
            raise _bad(e) from None
        self._inflight = (hidden, topk_ids, topk_weights, out)
        return tuple(self._e.callback_pointers())
