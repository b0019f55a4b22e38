"""The expert store's manifest `lvllm.json` and the exact byte layout of its layer files, without torch: the planner
and the launcher read stores before (or without) loading torch; store.py writes and maps the files it describes.

One layer-node file `layers/L{layer:03d}.n{node}.safetensors` holds, with In = I / numa_nodes and R = 2*In (gate rows,
then up rows) for gated experts, In (up only) for relu2 ones:

    int4: w13.packed I32 [E, R, H/8], w2.packed I32 [E, H, In/8], w13.scale BF16 [E, R, H/g], w2.scale BF16 [E, H, In/g]
    bf16: w13 BF16 [E, R, H], w2 BF16 [E, H, In]
    expert biases (gpt-oss), after those: w13.bias BF16 [E, R] in every node's file (rows as w13's);
        w2.bias BF16 [E, H] only in node 0's (the node outputs are summed, so it must be added once)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_json
from .errors import StoreError

FORMAT_VERSION = 1
MANIFEST = "lvllm.json"
WEIGHT_FORMATS = ("int4", "bf16")
ENGINE_ALIGN = 32  # csrc/engine.cpp refuses a hidden size or per-node intermediate size that is not a multiple of it
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "F32": 4, "I64": 8, "F64": 8}  # safetensors dtype -> bytes per element

Spec = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype, shape)


def layer_file(layer: int, node: int) -> str:
    """Path of one layer's node shard, relative to the store directory."""
    return f"layers/L{layer:03d}.n{node}.safetensors"


def config_sha256(config_path: str | os.PathLike) -> str:
    """Hash of config.json's bytes: ties a store and a plan to the model they were made from."""
    return hashlib.sha256(Path(config_path).read_bytes()).hexdigest()


def format_bytes(n: int) -> str:
    """A size for a person, three digits: 1.23 GB, 45.6 MB, 7.8 kB (messages about store files and free disk)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def engine_runs(hidden: int, node_intermediate: int) -> bool:
    """Whether the CPU engine runs experts of this hidden size and per-node intermediate size (ENGINE_ALIGN)."""
    return hidden % ENGINE_ALIGN == 0 and node_intermediate % ENGINE_ALIGN == 0


def file_problem(path: Path, entry: dict | None, hashes: bool) -> str | None:
    """What is wrong with one store file against its manifest entry (`hashes`: its sha256 too), or None."""
    size = path.stat().st_size if path.is_file() else None
    return ("is not listed in the manifest" if entry is None else "is missing" if size is None
            else f"is {size} bytes, the manifest says {entry['bytes']}" if size != entry["bytes"]
            else f"does not match its sha256 in {MANIFEST}" if hashes and file_sha256(path) != entry["sha256"]
            else None)


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
    expert_bias: bool = False  # w13.bias / w2.bias present (gpt-oss); manifests older than the key have none
    # INT4 only: the group the weights were quantized in, when a node slice is narrower than it and the store keeps
    # them in smaller `group_size` groups, each scale repeated (quant.stored_group_size); None: group_size itself
    quantized_group_size: int | None = None

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

    def tensor_specs(self, node: int) -> list[Spec]:
        """(name, dtype, shape) of every tensor in node `node`'s layer file, in file order (widest dtype first)."""
        e, h, n = self.num_experts, self.hidden_size, self.node_intermediate_size
        rows = 2 * n if self.gated else n
        if self.weight_format == "bf16":
            specs = [("w13", "BF16", (e, rows, h)), ("w2", "BF16", (e, h, n))]
        else:
            g = self.group_size
            specs = [
                ("w13.packed", "I32", (e, rows, h // 8)),
                ("w2.packed", "I32", (e, h, n // 8)),
                ("w13.scale", "BF16", (e, rows, h // g)),
                ("w2.scale", "BF16", (e, h, n // g)),
            ]
        if self.expert_bias:
            specs.append(("w13.bias", "BF16", (e, rows)))
            if node == 0:
                specs.append(("w2.bias", "BF16", (e, h)))
        return specs

    def file_metadata(self, layer: int, node: int) -> dict[str, str]:
        return {"format": "pt", "lvllm_layer": str(layer), "lvllm_node": str(node)}

    def file_bytes(self, layer: int, node: int) -> int:
        """Exact size of one layer-node file, header included."""
        return file_layout(self.tensor_specs(node), self.file_metadata(layer, node))[2]

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
    except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not a valid store manifest ({e})", "remove the directory and re-run lvllm quantize") from None


def read_complete_manifest(store_dir: str | os.PathLike) -> StoreManifest:
    """The manifest of a finished store; StoreError when there is none or the conversion has not finished."""
    manifest = read_manifest(store_dir)
    if manifest is None:
        raise StoreError(f"{store_dir} holds no expert store ({MANIFEST} missing)", f"run: lvllm quantize MODEL_DIR {store_dir}")
    if not manifest.complete:
        raise StoreError(f"the expert store in {store_dir} is incomplete", f"finish it: lvllm quantize MODEL_DIR {store_dir} --resume")
    return manifest


def write_manifest(store_dir: str | os.PathLike, manifest: StoreManifest) -> None:
    """Atomically (re)write `lvllm.json`; files listed in sorted order so equal stores give equal bytes."""
    d = manifest.to_dict()
    d["files"] = {k: manifest.files[k] for k in sorted(manifest.files)}
    write_json(Path(store_dir) / MANIFEST, d)


def file_layout(specs: list[Spec], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """(header bytes incl. the 8-byte length, {name: (data offset of expert 0, bytes per expert)}, file size) of a
    safetensors file holding `specs` in order; the header is padded with spaces to a multiple of 8."""
    header: dict = {"__metadata__": metadata}
    slots: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in specs:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = DTYPE_BYTES[dtype] * numel
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        slots[name] = (pos, nbytes // shape[0])
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    raw = len(raw).to_bytes(8, "little") + raw
    return raw, slots, len(raw) + pos
