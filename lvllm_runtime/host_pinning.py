"""Page-lock memory the process already holds (the mapped store files) for DMA, instead of copying it into pinned
buffers: GPU prefill streams each layer's store bytes straight from the pages the store's mapping reads.

`cudaHostRegister` with `cudaHostRegisterReadOnly` pins the page-cache pages of a private file mapping without
copying them (a writable pin would break copy-on-write and duplicate every page). torch then treats tensors inside a
registered range as pinned (`is_pinned()` asks cudaPointerGetAttributes), so `copy_(non_blocking=True)` is a DMA.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable

import torch

from .errors import DoesNotFit

_PORTABLE, _READ_ONLY = 0x01, 0x08  # cudaHostRegisterPortable, cudaHostRegisterReadOnly
_PAGE = mmap.PAGESIZE


def _runtime() -> ctypes.CDLL:
    from .cuda_graph_step import cudart

    rt = cudart()
    rt.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    rt.cudaHostRegister.restype = ctypes.c_int
    rt.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    rt.cudaHostUnregister.restype = ctypes.c_int
    rt.cudaGetLastError.restype = ctypes.c_int
    return rt


def spans(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Page-aligned [start, end) address ranges covering `tensors`, merged only where their pages touch or overlap
    (the tensors of one safetensors file lie back to back, so a layer file becomes one range). Never across a gap:
    memory between two allocations may be unmapped, or be someone else's and unmapped later while registered."""
    raw = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    out: list[list[int]] = []
    for a, b in raw:
        a, b = a // _PAGE * _PAGE, -(-b // _PAGE) * _PAGE
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _uncovered(a: int, b: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [a, b) outside every range in `ranges` (a page may hold the ends of two tensors)."""
    parts = [(a, b)]
    for x, y in ranges:
        parts = [q for p0, p1 in parts for q in ((p0, min(p1, x)), (max(p0, y), p1)) if q[0] < q[1]]
    return parts


class HostPins:
    """The ranges this process registered, each page once; the registered tensors are kept alive (so their mapping
    cannot go while CUDA holds it) until `close` unregisters them."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []
        self.read_only = True
        self._keep: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def register(self, tensors: Iterable[torch.Tensor]) -> int:
        """Page-lock the pages of `tensors` not registered yet; returns the bytes newly locked."""
        tensors = list(tensors)
        rt, added = _runtime(), 0
        for a0, b0 in spans(tensors):
            for a, b in _uncovered(a0, b0, self.ranges):
                rc = rt.cudaHostRegister(a, b - a, _PORTABLE | (_READ_ONLY if self.read_only else 0))
                if rc != 0 and self.read_only:  # no read-only registration on this device/driver: writable pin
                    rt.cudaGetLastError()
                    self.read_only = False
                    rc = rt.cudaHostRegister(a, b - a, _PORTABLE)
                if rc != 0:
                    rt.cudaGetLastError()
                    msg = rt.cudaGetErrorString(rc).decode()
                    raise DoesNotFit(f"cannot page-lock {(b - a) / 2**30:.2f} GiB of the expert store for GPU prefill "
                                     f"after {self.nbytes / 2**30:.1f} GiB ({msg})",
                                     "raise the locked-memory limit (ulimit -l unlimited) or plan with "
                                     "--gpu-prefill-min-tokens 0")
                self.ranges.append((a, b))
                added += b - a
        self._keep += tensors
        return added

    def close(self) -> None:
        """Unregister everything (after the GPU is done with the copies); the tensors may go after this."""
        if self.ranges:
            rt = _runtime()
            for a, _ in self.ranges:
                rt.cudaHostUnregister(a)
            self.ranges = []
        self._keep = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already; nothing to undo then
            pass
