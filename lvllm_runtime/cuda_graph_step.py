"""The CUDA-graph-safe hybrid decode step: the CPU engine's work inside a captured graph, as a host-callback node.

Per MoE layer, for a batch of T tokens (one static buffer set per T, shared by every layer; `shared_steps` makes the
sets of several T views of one set of the largest T, as vLLM's capture sizes and eager decode sizes need):

    main stream  : cold ids (hot ids masked -1) ──fork──> hot experts on the GPU (grouped_experts) ──join──> hot + cold
    side stream  :      hidden, ids, weights D2H into pinned ─> host node: engine forward ─> pinned out H2D ──┘

The host node is `lvllm_hostcall_run` (csrc/hostfn.cpp), a C function launched with cudaLaunchHostFunc through
ctypes on torch's own libcudart: it runs the engine's C++ core on the pinned buffers with no CUDA call, no Python and
no GIL, so it is legal inside a graph and costs no interpreter time on replay. Routing may change on every replay:
only buffer contents change, never addresses. The same code runs eagerly (profiled with events) for the timing split.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .engine import Engine
from .errors import EngineError
from .gpu_prefill import dequant_int4_bf16, grouped_experts
from .hybrid import LayerWeights

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.int32: 2, torch.int64: 3}  # lvllm::Dtype


def _loaded_cudart() -> str | None:
    """Path of the libcudart this process has mapped (torch maps its own when it is imported), if any."""
    with open("/proc/self/maps") as f:
        for line in f:
            if "libcudart.so" in line:
                return line.split()[-1]
    return None


@functools.lru_cache(maxsize=None)
def cudart() -> ctypes.CDLL:
    """The libcudart torch uses (found in /proc/self/maps, so one runtime instance serves both)."""
    path = _loaded_cudart()
    if path is None:
        torch.cuda.init()
        path = _loaded_cudart()
    try:
        lib = ctypes.CDLL(path or "libcudart.so", mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise EngineError(f"cannot load libcudart ({e})", "use a CUDA build of torch (torch.version.cuda set)") from None
    lib.cudaLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cudaLaunchHostFunc.restype = ctypes.c_int
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    lib.cudaSetDeviceFlags.argtypes = [ctypes.c_uint]
    lib.cudaSetDeviceFlags.restype = ctypes.c_int
    return lib


def blocking_sync() -> bool:
    """Make threads that wait for the GPU sleep instead of spinning (cudaDeviceScheduleBlockingSync); call before
    CUDA starts. A spinning waiter can take the core the host-callback thread needs: pinned together they turned a
    0.35 ms engine call into 3.7 ms on the H200 box (bench/README.md). Returns False when CUDA had already started."""
    return cudart().cudaSetDeviceFlags(0x04) == 0


@functools.lru_cache(maxsize=None)
def _hostfn() -> ctypes.CDLL:
    """csrc/hostfn.cpp's C entry points, exported from the engine module itself."""
    from . import _cpu

    lib = ctypes.CDLL(_cpu.__file__)
    try:
        lib.lvllm_hostcall_create.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                              ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int64, ctypes.c_int64]
    except AttributeError:
        raise EngineError("the engine build has no lvllm_hostcall_* symbols (csrc/hostfn.cpp)",
                          "rebuild: pip install --no-build-isolation -e .") from None
    lib.lvllm_hostcall_create.restype = ctypes.c_void_p
    lib.lvllm_hostcall_destroy.argtypes = [ctypes.c_void_p]
    lib.lvllm_hostcall_error.argtypes = [ctypes.c_void_p]
    lib.lvllm_hostcall_error.restype = ctypes.c_char_p
    lib.lvllm_hostcall_times.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
    return lib


class HostCall:
    """One engine forward over fixed host buffers, runnable as a cudaHostFn_t (or called directly on the CPU).

    hidden [T, H] f32|bf16, topk_ids [T, k] int32|int64, topk_weights f32 [T, k], out [T, H] hidden's dtype: host
    tensors that must keep their addresses while this object lives (pinned, for asynchronous copies). The engine
    checks shapes and dtypes once here (Engine.arm); the callback itself never raises: `check()` does, after the
    stream it ran on has been synchronized.
    """

    def __init__(self, engine: Engine, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, out: torch.Tensor):
        _, _, user_data = engine.arm(layer, hidden, topk_ids, topk_weights, out)  # validates; same checks as forward
        engine.wait()  # nothing was submitted: only clears the armed arrays' keep-alive
        self._lib = _hostfn()
        self._tensors = (hidden, topk_ids, topk_weights, out)
        self._ptr = self._lib.lvllm_hostcall_create(
            user_data, int(layer), hidden.data_ptr(), _DTYPE_CODE[hidden.dtype], topk_ids.data_ptr(),
            _DTYPE_CODE[topk_ids.dtype], topk_weights.data_ptr(), out.data_ptr(), hidden.shape[0], topk_ids.shape[1])
        if not self._ptr:
            raise MemoryError("lvllm_hostcall_create")
        self._fn = ctypes.cast(self._lib.lvllm_hostcall_run, ctypes.c_void_p).value
        self.layer = int(layer)

    def launch(self, stream: torch.cuda.Stream) -> None:
        """Enqueue the forward on `stream` (captured as a host node when the stream is capturing)."""
        rt = cudart()
        rc = rt.cudaLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(self._fn),
                                   ctypes.c_void_p(self._ptr))
        if rc != 0:
            raise EngineError(f"cudaLaunchHostFunc failed: {rt.cudaGetErrorString(rc).decode()}",
                              "check the CUDA context (torch.cuda.init()) and the stream")

    def __call__(self) -> None:
        """Run the forward on this thread (what the host node does)."""
        self._lib.lvllm_hostcall_run(ctypes.c_void_p(self._ptr))

    def check(self) -> None:
        """Raise the error of the last run, if any (call after synchronizing the stream)."""
        err = self._lib.lvllm_hostcall_error(ctypes.c_void_p(self._ptr)).decode()
        if err:
            raise EngineError(f"engine forward in a host callback failed (layer {self.layer}): {err}",
                              "the message names the bad argument; the graph was captured over wrong buffers")

    def last_times(self) -> tuple[int, int, int]:
        """(monotonic ns when the last callback began, ns when the engine finished, number of runs so far)."""
        times = (ctypes.c_int64 * 2)()
        runs = ctypes.c_int64()
        self._lib.lvllm_hostcall_times(ctypes.c_void_p(self._ptr), times, ctypes.byref(runs))
        return times[0], times[1], runs.value

    def last_run(self) -> tuple[float, int]:
        """(seconds the last callback took, number of runs so far)."""
        t0, t1, runs = self.last_times()
        return (t1 - t0) * 1e-9, runs

    def __del__(self) -> None:
        if getattr(self, "_ptr", None):
            self._lib.lvllm_hostcall_destroy(ctypes.c_void_p(self._ptr))
            self._ptr = None


class StepBuffers:
    """The pinned/device buffers and side stream of a decode step, sized for the largest batch `tokens`.

    h_pin [N, H] dtype, ids_pin int32 [N, k] (-1 = skip), w_pin f32 [N, k], out_pin [N, H] dtype: pinned host memory
    (plain host memory without CUDA); out_dev [N, H] on `device` (CUDA only). CpuSteps of smaller batches use views of
    their leading rows, so every size's host nodes read fixed addresses and one allocation serves them all.
    """

    def __init__(self, tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype, device: torch.device | str):
        pin = torch.cuda.is_available()
        self.tokens, self.device = tokens, torch.device(device)
        host = {"device": "cpu", "pin_memory": pin}  # explicit: loaders may run under a default-device context
        self.h_pin = torch.zeros(tokens, hidden_size, dtype=dtype, **host)
        self.ids_pin = torch.full((tokens, top_k), -1, dtype=torch.int32, **host)
        self.w_pin = torch.zeros(tokens, top_k, dtype=torch.float32, **host)
        self.out_pin = torch.zeros(tokens, hidden_size, dtype=dtype, **host)
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda:
            self.out_dev = torch.empty(tokens, hidden_size, dtype=dtype, device=self.device)
            self.stream = torch.cuda.Stream(self.device)


class CpuStep:
    """Static pinned/device buffers of one batch size T and a host call per layer; shared by a model's layers.

    The layers of one step run one after another, so one buffer set serves all of them: layer L+1's copies start only
    after the main stream has consumed layer L's result. `buffers` (StepBuffers of at least T rows) makes this step a
    view of a set shared with other sizes (`shared_steps`); the host calls read exactly T rows.
    """

    def __init__(self, engine: Engine, layers: Sequence[int], tokens: int, hidden_size: int, top_k: int,
                 dtype: torch.dtype, device: torch.device | str, buffers: StepBuffers | None = None):
        b = buffers if buffers is not None else StepBuffers(tokens, hidden_size, top_k, dtype, device)
        if b.tokens < tokens or b.h_pin.shape[1] != hidden_size or b.ids_pin.shape[1] != top_k \
                or b.h_pin.dtype != dtype or b.device != torch.device(device):
            raise ValueError(f"step buffers ({b.tokens} x {tuple(b.h_pin.shape[1:])}, {b.h_pin.dtype}, {b.device}) "
                             f"cannot hold a {tokens}-token step of hidden {hidden_size}, top-{top_k}, {dtype}")
        self.engine, self.tokens, self.device, self.buffers = engine, tokens, b.device, b
        self.h_pin, self.ids_pin = b.h_pin[:tokens], b.ids_pin[:tokens]
        self.w_pin, self.out_pin = b.w_pin[:tokens], b.out_pin[:tokens]
        self.on_cuda = b.on_cuda
        if self.on_cuda:
            self.out_dev, self.stream = b.out_dev[:tokens], b.stream
        self.calls: dict[int, HostCall] = {}
        self._inputs: tuple[torch.Tensor, ...] | None = None  # begin's device inputs, held until end
        for layer in layers:
            self.add_layer(layer)
        self.events: dict[str, torch.cuda.Event] | None = None  # set by `profile` (eager runs only)

    def add_layer(self, layer: int) -> None:
        """Make the host call of `layer` (validated by the engine now; no forward may be in flight)."""
        self.calls[int(layer)] = HostCall(self.engine, layer, self.h_pin, self.ids_pin, self.w_pin, self.out_pin)

    def begin(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, cold_ids: torch.Tensor) -> None:
        """Fork: copy inputs to pinned memory, run the engine and copy the result back, all on the side stream."""
        call = self.calls[layer]
        if not self.on_cuda:
            self.h_pin.copy_(hidden)
            self.ids_pin.copy_(cold_ids)
            self.w_pin.copy_(topk_weights)
            call()
            call.check()
            return
        ev = self.events
        # The side stream reads these after this call returns: keep them (a temporary cold_ids above all) alive until
        # `end` has joined the streams, or the caching allocator hands their memory to the main stream's next
        # kernels (under graph capture too) while the copies have not run yet.
        self._inputs = (hidden, topk_weights, cold_ids)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if ev:
                ev["start"].record()
            self.h_pin.copy_(hidden, non_blocking=True)
            self.ids_pin.copy_(cold_ids, non_blocking=True)
            self.w_pin.copy_(topk_weights, non_blocking=True)
            if ev:
                ev["d2h"].record()
            call.launch(self.stream)
            if ev:
                ev["cpu"].record()
            self.out_dev.copy_(self.out_pin, non_blocking=True)
            if ev:
                ev["h2d"].record()

    def end(self) -> torch.Tensor:
        """Join: the main stream waits for the side stream; returns the engine's result [T, H] on the device."""
        if not self.on_cuda:
            return self.out_pin.clone()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._inputs = None
        return self.out_dev

    def check(self) -> None:
        for c in self.calls.values():
            c.check()


def shared_steps(engine: Engine, layers: Sequence[int], sizes: Sequence[int], hidden_size: int, top_k: int,
                 dtype: torch.dtype, device: torch.device | str) -> dict[int, CpuStep]:
    """{T: CpuStep} for every batch size in `sizes`, all views of one StepBuffers of max(sizes) rows and one side
    stream (CUDA graphs of different sizes never replay at once, and eager steps are stream-ordered)."""
    sizes = sorted({int(t) for t in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"decode step sizes must be positive, got {sizes}")
    buffers = StepBuffers(sizes[-1], hidden_size, top_k, dtype, device)
    return {t: CpuStep(engine, layers, t, hidden_size, top_k, dtype, device, buffers) for t in sizes}


@dataclass(frozen=True)
class GpuExperts:
    """A layer's routed experts resident on the device, as grouped_experts takes them: w13 bf16 [Gh, R, H], w2 bf16
    [Gh, H, I], slot int64 [E] (global id -> row, -1 = not here), biases b13 [Gh, R] / b2 [Gh, H] where the store has
    them (gpt-oss; b2 only on the rank that holds node 0's slice)."""

    w13: torch.Tensor
    w2: torch.Tensor
    slot: torch.Tensor
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2, self.b13, self.b2) if t is not None)


def hot_experts(weights: LayerWeights, experts: Sequence[int], num_experts: int, device: torch.device | str,
                dtype: torch.dtype = torch.bfloat16) -> GpuExperts | None:
    """A plan's hot experts of one layer on the device, from store-format weights (node slices joined; INT4
    dequantized on the device); `dtype` f32 only for f32 models on the CPU. None when `experts` is empty."""
    if not experts:
        return None
    t = weights.select(experts).to(device).tensors
    if weights.weight_format == "int4":
        w13 = dequant_int4_bf16(t["w13.packed"], t["w13.scale"], weights.group_size)
        w2 = dequant_int4_bf16(t["w2.packed"], t["w2.scale"], weights.group_size)
    else:
        w13, w2 = t["w13"], t["w2"]
    slot = torch.full((num_experts,), -1, dtype=torch.long, device="cpu")
    slot[torch.tensor(list(experts), dtype=torch.long, device="cpu")] = torch.arange(len(experts), device="cpu")
    bias = {k: t[k].to(dtype) for k in ("w13.bias", "w2.bias") if k in t}
    return GpuExperts(w13.to(dtype), w2.to(dtype), slot.to(device), bias.get("w13.bias"), bias.get("w2.bias"))


class HybridDecodeLayer:
    """Routed experts of one MoE layer for decode, graph-capturable: hot experts on the GPU, the rest on the engine.

    hot: `hot_experts(...)` of this layer, or None (every expert on the engine). steps: {T: CpuStep} shared by all
    layers of a model ({} where no graph-safe step exists: the CPU, or eager-only runs).
    """

    def __init__(self, layer: int, steps: dict[int, CpuStep], activation: str, gated: bool,
                 hot: GpuExperts | None = None):
        self.layer, self.steps, self.activation, self.gated, self.experts = layer, steps, activation, gated, hot
        self.hot_slot = hot.slot if hot is not None else None
        self.all_hot = hot is not None and bool((hot.slot >= 0).all())

    def cold_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """int32 [T, k]: topk_ids with the hot experts' picks masked to -1 (what the engine computes)."""
        ids = topk_ids.to(torch.int32)
        return ids if self.hot_slot is None else torch.where(self.hot_slot[ids.long().clamp(min=0)] >= 0, -1, ids)

    def hot(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor | None:
        """The hot experts' part, f32 [T, H] (no host sync: capturable), or None when the layer has none."""
        x = self.experts
        if x is None:
            return None
        return grouped_experts(hidden, topk_weights, topk_ids.to(torch.int32), x.w13, x.w2, self.activation,
                               self.gated, x.slot, x.b13, x.b2)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] bf16, topk_weights f32 [T, k], topk_ids int [T, k] -> [T, H] hidden's dtype.

        T must be one of the steps' batch sizes (pad the batch to the captured size)."""
        step = self.steps[hidden.shape[0]]
        step.begin(self.layer, hidden, topk_weights, self.cold_ids(topk_ids))
        ev = step.events
        if ev:
            ev["gpu0"].record()
        hot = self.hot(hidden, topk_weights, topk_ids)
        if ev:
            ev["gpu1"].record()
        cold = step.end()
        out = cold.float() if hot is None else hot + cold.float()
        if ev:
            ev["end"].record()
        return out.to(hidden.dtype)

    __call__ = forward


EVENT_NAMES = ("start", "d2h", "cpu", "h2d", "gpu0", "gpu1", "end")


def profile(step: CpuStep, layer: int, run: Callable[[], object]) -> dict[str, float]:
    """Run one eager step of `layer` (run()) with timing events; milliseconds of: D2H copies, the host node (GPU
    clock, launch latency included) and the engine's own time inside it (host clock), H2D copy, hot-expert GPU work,
    the main stream's wait for the CPU result after its own work, and the whole step."""
    step.events = {k: torch.cuda.Event(enable_timing=True) for k in EVENT_NAMES}
    try:
        run()
        torch.cuda.synchronize()
    finally:
        ev, step.events = step.events, None
    step.check()
    cpu_s = step.calls[layer].last_run()[0]
    t = lambda a, b: ev[a].elapsed_time(ev[b])  # noqa: E731
    return {"d2h": t("start", "d2h"), "hostfn": t("d2h", "cpu"), "cpu": cpu_s * 1e3, "h2d": t("cpu", "h2d"),
            "gpu": t("gpu0", "gpu1"), "wait": t("gpu1", "end"), "total": t("start", "end")}


def capture(fn: Callable[[], torch.Tensor], warmup: int = 2, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture fn() (reading and writing only static buffers) into a CUDA graph; returns (graph, static output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out
