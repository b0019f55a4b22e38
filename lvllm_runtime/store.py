"""The expert store: one directory with the manifest `lvllm.json` and one safetensors file per MoE layer per NUMA
node, `layers/L{layer:03d}.n{node}.safetensors`:

    int4: w13.packed int32 [E, R, H/8], w13.scale bf16 [E, R, H/g], w2.packed int32 [E, H, In/8], w2.scale bf16 [E, H, In/g]
    bf16: w13 bf16 [E, R, H], w2 bf16 [E, H, In]

In = I / numa_nodes; node n holds rows [n*In, (n+1)*In) of gate and of up and the same columns of down. R = 2*In
(gate rows, then up rows) for gated experts, In (up only) for relu2 ones.

Writing: `LayerFileWriter` preallocates a file under a temp name with its header computed up front, takes each
expert's slices at their final offsets (any order, any thread), then fsyncs, hashes and renames it. The manifest
is written last and only then says `complete: true`; while a conversion runs it lists the finished files with
`complete: false`, which is what `--resume` trusts. Reading: `ExpertStore` maps each file copy-on-write (zero copy).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import fsync_dir, temp_name, write_json
from .checkpoint import DTYPES, SafetensorsFile
from .errors import DoesNotFit, StoreError
from .quant import dequantize_int4

FORMAT_VERSION = 1
MANIFEST = "lvllm.json"
WEIGHT_FORMATS = ("int4", "bf16")
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def layer_file(layer: int, node: int) -> str:
    """Path of one layer's node shard, relative to the store directory."""
    return f"layers/L{layer:03d}.n{node}.safetensors"


def config_sha256(config_path: str | os.PathLike) -> str:
    """Hash of config.json's bytes: ties a store and a plan to the model they were made from."""
    return hashlib.sha256(Path(config_path).read_bytes()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class StoreManifest:
    """What `lvllm.json` says. `files` maps each relative path to {"bytes": int, "sha256": str}."""

    format_version: int
    model_type: str
    config_sha256: str
    source_path: str
    weight_format: str
    group_size: int | None
    numa_nodes: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool
    moe_layers: tuple[int, ...]
    files: dict = field(default_factory=dict)
    complete: bool = False
    source_format: str = ""
    split_axis: str = "intermediate"
    calibration: dict | None = None  # calibrate.read_record of a GPTQ/AWQ source (method, data, versions); None: RTN

    def __post_init__(self) -> None:
        if self.weight_format not in WEIGHT_FORMATS:
            raise StoreError(f"unknown store weight format {self.weight_format!r}", f"use one of {WEIGHT_FORMATS}")
        if self.intermediate_size % self.numa_nodes:
            raise StoreError(
                f"intermediate size {self.intermediate_size} does not split over {self.numa_nodes} nodes",
                "choose a --numa-nodes that divides it",
            )

    @property
    def node_intermediate_size(self) -> int:
        """In: the slice of the expert's intermediate dimension each node holds."""
        return self.intermediate_size // self.numa_nodes

    def tensor_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor in one layer-node file, in file order (widest dtype first)."""
        e, h, n = self.num_experts, self.hidden_size, self.node_intermediate_size
        rows = 2 * n if self.gated else n
        if self.weight_format == "bf16":
            return [("w13", torch.bfloat16, (e, rows, h)), ("w2", torch.bfloat16, (e, h, n))]
        g = self.group_size
        return [
            ("w13.packed", torch.int32, (e, rows, h // 8)),
            ("w2.packed", torch.int32, (e, h, n // 8)),
            ("w13.scale", torch.bfloat16, (e, rows, h // g)),
            ("w2.scale", torch.bfloat16, (e, h, n // g)),
        ]

    def file_metadata(self, layer: int, node: int) -> dict[str, str]:
        return {"format": "pt", "lvllm_layer": str(layer), "lvllm_node": str(node)}

    def file_bytes(self, layer: int, node: int) -> int:
        """Exact size of one layer-node file, header included."""
        return file_layout(self.tensor_specs(), self.file_metadata(layer, node))[2]

    def file_names(self) -> list[str]:
        return [layer_file(layer, node) for layer in self.moe_layers for node in range(self.numa_nodes)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StoreManifest":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        return cls(**d)


def read_manifest(store_dir: str | os.PathLike) -> StoreManifest | None:
    """The manifest in `store_dir`, complete or not; None when there is none."""
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format {d.get('format_version')}, this lvllm reads {FORMAT_VERSION}",
                "re-run lvllm quantize into a new directory",
            )
        return StoreManifest.from_dict(d)
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise StoreError(f"{path} is not a valid store manifest ({e})", "remove the directory and re-run lvllm quantize") from None


def write_manifest(store_dir: str | os.PathLike, manifest: StoreManifest) -> None:
    """Atomically (re)write `lvllm.json`; files listed in sorted order so equal stores give equal bytes."""
    d = manifest.to_dict()
    d["files"] = {k: manifest.files[k] for k in sorted(manifest.files)}
    write_json(Path(store_dir) / MANIFEST, d)


def file_layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict, int]:
    """(header bytes incl. the 8-byte length, {name: (data offset of expert 0, bytes per expert)}, file size) of a
    safetensors file holding `specs` in order; the header is padded with spaces to a multiple of 8."""
    header: dict = {"__metadata__": metadata}
    slots: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in specs:
        nbytes = dtype.itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        slots[name] = (pos, nbytes // shape[0])
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    raw = len(raw).to_bytes(8, "little") + raw
    return raw, slots, len(raw) + pos


class LayerFileWriter:
    """One layer-node file, preallocated under a temp name; `write_expert` puts one expert's slices at their final
    offsets (thread-safe: positional writes to disjoint ranges); `finish` fsyncs, hashes and renames."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
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


class ExpertStore:
    """A complete store, opened read-only; layer files are mapped lazily and stay mapped."""

    def __init__(self, path: Path, manifest: StoreManifest):
        self.path = path
        self.manifest = manifest
        self._files: dict[str, SafetensorsFile] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ExpertStore":
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise StoreError(f"{path} holds no expert store ({MANIFEST} missing)", f"run: lvllm quantize MODEL_DIR {path}")
        if not manifest.complete:
            raise StoreError(f"the expert store in {path} is incomplete", f"finish it: lvllm quantize MODEL_DIR {path} --resume")
        return cls(path, manifest)

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

    def dequantized(self, layer: int, node: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 f32 [E, R, H], w2 f32 [E, H, In]) of one layer-node file."""
        return self._dequant(self.layer(layer, node))

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert reassembled from every node: (w13 f32 [R*nodes..., H] as gate rows then up rows, w2 f32 [H, I])."""
        parts13, parts2 = [], []
        for node in range(self.manifest.numa_nodes):
            w13, w2 = self._dequant({k: v[expert : expert + 1] for k, v in self.layer(layer, node).items()})
            parts13.append(w13[0])
            parts2.append(w2[0])
        if self.manifest.gated:
            n = self.manifest.node_intermediate_size
            gate = torch.cat([p[:n] for p in parts13])
            up = torch.cat([p[n:] for p in parts13])
            return torch.cat([gate, up]), torch.cat(parts2, dim=1)
        return torch.cat(parts13), torch.cat(parts2, dim=1)

    def _dequant(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.manifest.weight_format == "bf16":
            return t["w13"].float(), t["w2"].float()
        g = self.manifest.group_size
        return dequantize_int4(t["w13.packed"], t["w13.scale"], g), dequantize_int4(t["w2.packed"], t["w2.scale"], g)
