"""The expert store: one directory with the manifest `lvllm.json` and one safetensors file per MoE layer per NUMA
node, `layers/L{layer:03d}.n{node}.safetensors` (tensor names, dtypes and shapes in manifest.py, which holds the
torch-free manifest and file layout; its public names are re-exported here).

Writing: `LayerFileWriter` preallocates a file under a temp name with its header computed up front, takes each
expert's slices at their final offsets (any order, any thread), then fsyncs, hashes and renames it. The manifest
is written last and only then says `complete: true`; while a conversion runs it lists the finished files with
`complete: false`, which is what `--resume` trusts. Reading: `ExpertStore` maps each file copy-on-write (zero copy).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from pathlib import Path

import torch

from .atomic import fsync_dir, temp_name, write_failure
from .checkpoint import SafetensorsFile
from .errors import DoesNotFit, StoreError
from .manifest import (  # noqa: F401 - re-exported: store.py is where callers have always found these
    FORMAT_VERSION,
    MANIFEST,
    WEIGHT_FORMATS,
    Spec,
    StoreManifest,
    config_sha256,
    file_layout,
    file_problem,
    file_sha256,
    format_bytes,
    layer_file,
    read_complete_manifest,
    read_manifest,
    write_manifest,
)
from .quant import dequantize_int4


class LayerFileWriter:
    """One layer-node file, preallocated under a temp name; `write_expert` puts one expert's slices at their final
    offsets (thread-safe: positional writes to disjoint ranges); `finish` fsyncs, hashes and renames."""

    def __init__(self, path: Path, specs: list[Spec], metadata: dict[str, str]):
        self.path = path
        self.tmp = temp_name(path)
        raw, self._slot, self.size = file_layout(specs, metadata)
        self._data_start = len(raw)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(self._fd, 0, self.size)
            os.pwrite(self._fd, raw, 0)
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise DoesNotFit(f"the disk under {path.parent} filled up ({self.size} bytes needed for {path.name})",
                                 "free some space, then re-run with --resume") from None
            raise
        except BaseException:
            self.abort()
            raise

    def write_expert(self, expert: int, tensors: dict[str, torch.Tensor]) -> int:
        """Write expert `expert`'s slice of each tensor (shapes without the leading E); returns bytes written."""
        written = 0
        for name, t in tensors.items():
            start, per_expert = self._slot[name]
            data = t.contiguous().view(-1).view(torch.uint8).numpy()
            if data.nbytes != per_expert:
                raise ValueError(f"{name}: expert slice is {data.nbytes} bytes, the layout needs {per_expert}")
            os.pwrite(self._fd, data, self._data_start + start + expert * per_expert)
            written += per_expert
        return written

    def finish(self) -> dict:
        """fsync, hash, rename into place; returns the manifest entry {"bytes", "sha256"}."""
        try:
            os.fsync(self._fd)
            os.lseek(self._fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(self._fd), "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        return {"bytes": self.size, "sha256": digest}

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


LOCK = ".lvllm.lock"  # in the store directory while a quantize writes it; holds the writer's pid


class StoreLock:
    """An exclusive `fcntl` lock on the store directory's LOCK file, held by the one process writing the store; a
    second writer gets a StoreError naming the pid that holds it. The kernel drops the lock when its holder dies
    (kill -9 included), so a stale file never blocks. On release the file is removed, and the directory too when
    this lock made it and nothing else was written (a refused run leaves no trace)."""

    def __init__(self, store_dir: Path):
        self.dir = store_dir
        self.path = store_dir / LOCK
        self._fd = -1
        self._made_dir = False

    def __enter__(self) -> "StoreLock":
        try:
            self._made_dir = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise StoreError(f"{self.dir} is being written by another lvllm quantize (pid {holder})",
                                     "wait for it to finish, or stop that process and run again with --resume") from None
                # The holder before us may have removed the file between our open and our lock: lock the new one.
                if _same_file(fd, self.path):
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            self._release_dir()
            raise write_failure(self.path, e) from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # while still locked, so no one locks the file we remove
        os.close(self._fd)
        self._fd = -1
        self._release_dir()

    def _release_dir(self) -> None:
        if self._made_dir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something (its manifest says what)
                self.dir.rmdir()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open `fd` is still the file at `path`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(os.fstat(fd), st)


def check_files(store_dir: Path, manifest: StoreManifest, hashes: bool) -> int:
    """StoreError at the first layer file that is missing, not the size the manifest lists, or (with `hashes`) of
    another sha256; returns the bytes hashed."""
    hashed = 0
    for name in manifest.file_names():
        path = store_dir / name
        why = file_problem(path, manifest.files.get(name), hashes)
        if why:
            raise StoreError(f"{path} {why}: the expert store is damaged",
                             f"repair it: lvllm quantize {manifest.source_path} {store_dir} --resume")
        hashed += path.stat().st_size if hashes else 0
    return hashed


class ExpertStore:
    """A complete store, opened read-only; layer files are mapped lazily and stay mapped."""

    def __init__(self, path: Path, manifest: StoreManifest):
        self.path = path
        self.manifest = manifest
        self._files: dict[str, SafetensorsFile] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ExpertStore":
        path = Path(path)
        return cls(path, read_complete_manifest(path))

    def _file(self, layer: int, node: int) -> SafetensorsFile:
        name = layer_file(layer, node)
        if name not in self.manifest.files:
            raise StoreError(f"the store in {self.path} has no {name}", f"layers in the store: {list(self.manifest.moe_layers)}")
        if name not in self._files:
            f = self.path / name
            if not f.is_file() or f.stat().st_size != self.manifest.files[name]["bytes"]:
                raise StoreError(f"{f} is missing or has the wrong size", f"repair: lvllm quantize MODEL_DIR {self.path} --resume")
            self._files[name] = SafetensorsFile(f)
        return self._files[name]

    def layer(self, layer: int, node: int) -> dict[str, torch.Tensor]:
        """The tensors of one layer-node file (names and shapes in the module docstring), mapped, not copied."""
        f = self._file(layer, node)
        return {name: f.tensor(name) for name in f.entries}

    def drop_pages(self, layer: int, node: int) -> None:
        """Release the resident pages of one layer-node file's mapping (SafetensorsFile.drop_pages)."""
        f = self._files.get(layer_file(layer, node))
        if f is not None:
            f.drop_pages()

    def dequantized(self, layer: int, node: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 f32 [E, R, H], w2 f32 [E, H, In]) of one layer-node file."""
        return self._dequant(self.layer(layer, node))

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert reassembled from every node: (w13 f32 [R*nodes, H] as gate rows then up rows, w2 f32 [H, I])."""
        parts13, parts2 = [], []
        for node in range(self.manifest.numa_nodes):
            w13, w2 = self._dequant({k: v[expert : expert + 1] for k, v in self.layer(layer, node).items()})
            parts13.append(w13[0])
            parts2.append(w2[0])
        return self._join_rows(parts13), torch.cat(parts2, dim=1)

    def expert_bias(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One expert's biases reassembled from every node: (b13 f32 [R*nodes] gate then up, b2 f32 [H]); None when
        the store holds none."""
        if not self.manifest.expert_bias:
            return None
        parts = [self.layer(layer, node)["w13.bias"][expert].float() for node in range(self.manifest.numa_nodes)]
        return self._join_rows(parts), self.layer(layer, 0)["w2.bias"][expert].float()

    def _join_rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Node slices of w13 rows [R, ...] -> the whole expert's rows: every node's gate rows, then every node's up."""
        if not self.manifest.gated:
            return torch.cat(parts)
        n = self.manifest.node_intermediate_size
        return torch.cat([p[:n] for p in parts] + [p[n:] for p in parts])

    def _dequant(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.manifest.weight_format == "bf16":
            return t["w13"].float(), t["w2"].float()
        g = self.manifest.group_size
        return dequantize_int4(t["w13.packed"], t["w13.scale"], g), dequantize_int4(t["w2.packed"], t["w2.scale"], g)
