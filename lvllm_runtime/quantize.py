"""`lvllm quantize` as a library call: stream a checkpoint's routed experts into the expert store.

    Checkpoint.open -> checks (arch, group, nodes, output dir, disk) -> for each MoE layer: one LayerFileWriter per
    node, experts converted by a thread pool (read -> dequantize -> INT4 RTN or BF16 -> split per node -> pwrite)
    -> finish (fsync, sha256, rename) -> manifest in progress -> ... -> manifest complete -> verification
Expert biases (gpt-oss) travel with their expert in BF16: w13.bias split per node like w13's rows, w2.bias in node 0.

Memory: at most `2 * workers` experts are in flight. Each holds its source bytes, its BF16 copy and its quantized
slices, and while one projection quantizes, torch's temporaries (~4x that projection in BF16): about 4x the
expert's BF16 size at the peak (Qwen3-30B-A3B, 9.4 MB BF16: ~40 MB; Kimi-K2, 88 MB: ~350 MB). With the default
2 workers on 2 cores that is ~4 experts, plus torch itself (~250 MB). Sources are read with pread (checkpoint.py)
and output written with pwrite, so neither grows the resident set with the model: the bound is per expert. Nothing is written before every check has passed;
an interrupted run leaves only temp files (removed on `--resume`) and finished layer files listed in an
incomplete manifest, so `--resume` redoes exactly the unfinished layers and the result is byte-identical.

Test hook: LVLLM_QUANTIZE_TEST_DELAY_S=<seconds> sleeps after each expert write, so a kill test lands mid-layer.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .calibrate import read_record
from .checkpoint import Checkpoint
from .errors import BadInput, DoesNotFit, StoreError
from .manifest import ENGINE_ALIGN, engine_runs, file_problem
from .quant import GROUP_SIZES, pick_group_size, quantize_int4, regroup_scales, stored_group_size
from .store import (
    FORMAT_VERSION,
    LOCK,
    ExpertStore,
    LayerFileWriter,
    StoreLock,
    StoreManifest,
    config_sha256,
    format_bytes,
    layer_file,
    read_manifest,
    write_manifest,
)

TEST_DELAY_ENV = "LVLLM_QUANTIZE_TEST_DELAY_S"
DEFAULT_THRESHOLD = {"int4": 0.2, "bf16": 0.01}  # relative Frobenius error per expert matrix
DISK_MARGIN = 64 << 20  # beyond the store's exact size: the manifest, directory entries, the file system's own use


@dataclass(frozen=True)
class QuantizeOptions:
    weight_format: str = "int4"
    group_size: int | str = "auto"
    numa_nodes: int | str = 1
    workers: int | None = None  # None: physical cores
    layers: tuple[int, int] | None = None  # inclusive range of layer indices
    resume: bool = False
    verify: bool = False  # every expert of every layer, instead of a sample
    verify_threshold: float | None = None  # None: DEFAULT_THRESHOLD[weight_format]
    sample_experts: int = 3


@dataclass
class Progress:
    """Counters handed to the progress callback after each expert (from the calling thread)."""

    layers_done: int = 0
    layers_total: int = 0
    experts_done: int = 0
    experts_total: int = 0
    bytes_read: int = 0
    bytes_read_total: int = 0
    bytes_written: int = 0
    bytes_written_total: int = 0
    layer: int | None = None
    stage: str = "convert"  # "convert" | "verify"


@dataclass(frozen=True)
class LayerError:
    layer: int
    experts: int
    max_rel: float
    mean_rel: float


@dataclass(frozen=True)
class QuantizeResult:
    store: str
    manifest: StoreManifest
    input_bytes: int
    output_bytes: int
    seconds: float
    peak_rss_bytes: int
    peak_anon_rss_bytes: int
    layers_written: tuple[int, ...]
    layers_skipped: tuple[int, ...]
    verify_mode: str
    errors: tuple[LayerError, ...]
    threshold: float
    workers: int

    @property
    def max_rel_error(self) -> float:
        return max((e.max_rel for e in self.errors), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.threshold

    def to_dict(self) -> dict:
        return {
            "store": self.store,
            "model_type": self.manifest.model_type,
            "source_format": self.manifest.source_format,
            "weight_format": self.manifest.weight_format,
            "group_size": self.manifest.group_size,
            "numa_nodes": self.manifest.numa_nodes,
            "workers": self.workers,
            "layers_written": list(self.layers_written),
            "layers_skipped": list(self.layers_skipped),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3),
            "source_gb_per_s": round(self.input_bytes / self.seconds / 1e9, 3) if self.seconds else None,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_anon_rss_bytes": self.peak_anon_rss_bytes,
            "verify": {
                "mode": self.verify_mode,
                "threshold": self.threshold,
                "max_rel_error": self.max_rel_error,
                "passed": self.passed,
                "layers": [vars(e) for e in self.errors],
            },
        }


def parse_layer_range(text: str) -> tuple[int, int]:
    """"A-B" (inclusive) or "A" -> (A, B)."""
    try:
        a, _, b = text.partition("-")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise BadInput(f"--layers {text!r} is not a range", "write it as A-B, e.g. --layers 0-11") from None
    if lo < 0 or hi < lo:
        raise BadInput(f"--layers {text!r} is empty or negative", "write it as A-B with 0 <= A <= B")
    return lo, hi


def resolve_numa_nodes(value: int | str) -> int:
    """'auto' -> the topology's node count (1 when the probe is unavailable); else the number itself."""
    if value == "auto":
        try:
            from .topology import probe
        except ImportError:
            return 1
        return max(1, len(probe(gpus=False).nodes))
    n = int(value)
    if n < 1:
        raise BadInput(f"--numa-nodes {n} must be at least 1", "pass a node count or auto")
    return n


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem that will hold `path` (tests replace this to simulate a full disk)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _proc_status_bytes(key: str) -> int:
    """A kB field of /proc/self/status in bytes (0 where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_anon() -> int:
    return _proc_status_bytes("RssAnon")


def _peak_rss() -> int:
    """This process's peak resident set: VmHWM, not ru_maxrss, which Linux carries over from the parent across
    fork+exec (a parent's big heap would show up as ours)."""
    return _proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- planning: every check before anything is written ---------------------------------------------------------


def _target_manifest(ckpt: Checkpoint, opts: QuantizeOptions) -> StoreManifest:
    m = ckpt.model
    if opts.weight_format not in ("int4", "bf16"):
        raise BadInput(f"--format {opts.weight_format!r} is not a store format", "use int4 or bf16")
    nodes = resolve_numa_nodes(opts.numa_nodes)
    if m.intermediate_size % nodes:
        raise BadInput(
            f"expert intermediate size {m.intermediate_size} does not split over {nodes} NUMA nodes",
            "choose --numa-nodes that divides it",
        )
    inter = m.intermediate_size // nodes
    group = quantized_group = None
    if opts.weight_format == "int4":
        if ckpt.source_format == "int4_ct":
            quantized_group = ckpt.group_size
            if opts.group_size not in ("auto", quantized_group, str(quantized_group)):
                raise BadInput(
                    f"the checkpoint is INT4 with group {quantized_group}; passing it through cannot change the group "
                    f"to {opts.group_size}",
                    f"use --group-size auto (or {quantized_group})",
                )
            if quantized_group not in GROUP_SIZES:
                raise BadInput(f"the checkpoint's INT4 group {quantized_group} is not one the engine runs "
                               f"({list(GROUP_SIZES)})", "quantize from the BF16/FP8 checkpoint instead")
        else:  # auto: the largest group a node slice holds; an explicit group may span the node slices
            dims = [m.hidden_size, inter if opts.group_size == "auto" else m.intermediate_size]
            quantized_group = pick_group_size(dims, opts.group_size)
        group = stored_group_size(quantized_group, [m.hidden_size, inter])
        if group is None:
            raise BadInput(
                f"INT4 group {quantized_group} cannot be split over {nodes} nodes: no group of {list(GROUP_SIZES)} "
                f"divides both it and the per-node dimensions {[m.hidden_size, inter]}",
                "choose --numa-nodes so that intermediate_size / nodes is a multiple of 32",
            )
    if not engine_runs(m.hidden_size, inter):
        splits = engine_runs(m.hidden_size, m.intermediate_size)
        raise BadInput(
            f"the CPU engine runs experts whose hidden size and per-node intermediate size are multiples of "
            f"{ENGINE_ALIGN}; {nodes} node(s) give hidden {m.hidden_size}, intermediate {inter} per node",
            f"choose --numa-nodes so that {m.intermediate_size} / nodes is a multiple of {ENGINE_ALIGN}" if splits
            else "lvllm's CPU engine cannot run this model's experts",
        )
    layers = m.moe_layers
    if opts.layers is not None:
        lo, hi = opts.layers
        layers = tuple(L for L in layers if lo <= L <= hi)
        if not layers:
            raise BadInput(f"--layers {lo}-{hi} holds no MoE layer", f"MoE layers of this model: {list(m.moe_layers)}")
    return StoreManifest(
        format_version=FORMAT_VERSION,
        model_type=m.model_type,
        config_sha256=config_sha256(ckpt.path / "config.json"),
        source_path=str(ckpt.path),
        weight_format=opts.weight_format,
        group_size=group,
        numa_nodes=nodes,
        num_experts=m.num_experts,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        activation=m.activation,
        gated=m.gated,
        moe_layers=layers,
        source_format=ckpt.source_format,
        calibration=read_record(ckpt.path),
        expert_bias=ckpt.expert_bias,
        quantized_group_size=quantized_group if quantized_group != group else None,
    )


def _settings(man: StoreManifest) -> dict:
    """What must match to resume into a store (the source may have moved: its config hash says it is the same)."""
    d = man.to_dict()
    for k in ("files", "complete", "source_path"):
        d.pop(k)
    return d


def _leftover(out: Path, path: Path) -> bool:
    """A path a run of quantize leaves behind without content of its own: the lock, a temp file, `layers/`."""
    return path.name == LOCK or ".partial-" in path.name or path == out / "layers"


def _files_done(out: Path, target: StoreManifest, resume: bool) -> dict:
    """Check the output directory against the store to be written; return the finished files that can be kept."""
    existing = read_manifest(out)
    if existing is None:
        if out.is_dir() and not all(_leftover(out, p) for p in out.rglob("*")):
            raise BadInput(f"{out} is not empty and holds no expert store", "choose an empty or new output directory")
        return {}
    if existing.config_sha256 != target.config_sha256 or existing.model_type != target.model_type:
        raise StoreError(
            f"{out} holds the expert store of a different model ({existing.model_type} from {existing.source_path})",
            "choose another output directory, or remove that store",
        )
    if _settings(existing) != _settings(target):
        diff = sorted(k for k, v in _settings(target).items() if _settings(existing).get(k) != v)
        raise StoreError(
            f"{out} holds a store of this model made with other settings ({', '.join(diff)})",
            "re-run with the same options, or choose another output directory",
        )
    if not resume:
        state = "a complete" if existing.complete else "an unfinished"
        raise StoreError(f"{out} already holds {state} store of this model", "pass --resume to check and finish it")
    kept = {}
    for name, entry in existing.files.items():
        path = out / name
        if file_problem(path, entry, hashes=True) is None:
            kept[name] = entry
    return kept


# --- conversion -----------------------------------------------------------------------------------------------


def _node_slices(man: StoreManifest, parts: dict[str, torch.Tensor | tuple],
                 bias: dict[str, torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
    """Split one converted expert (and its bf16 biases {"gate" [I], "up" [I], "down" [H]}) into its per-node
    tensors (shapes of a store file without the leading E); the down bias goes to node 0 only."""
    n = man.node_intermediate_size
    projections = ["gate", "up"] if man.gated else ["up"]
    out = []
    for node in range(man.numa_nodes):
        rows = slice(node * n, (node + 1) * n)
        if man.weight_format == "bf16":
            shard = {"w13": torch.cat([parts[k][rows] for k in projections]), "w2": parts["down"][:, rows].contiguous()}
        else:
            g = man.group_size
            cols8, colsg = slice(node * n // 8, (node + 1) * n // 8), slice(node * n // g, (node + 1) * n // g)
            dp, ds = parts["down"]
            shard = {
                "w13.packed": torch.cat([parts[k][0][rows] for k in projections]),
                "w2.packed": dp[:, cols8].contiguous(),
                "w13.scale": torch.cat([parts[k][1][rows] for k in projections]),
                "w2.scale": ds[:, colsg].contiguous(),
            }
        if bias is not None:
            shard["w13.bias"] = torch.cat([bias[k][rows] for k in projections])
            if node == 0:
                shard["w2.bias"] = bias["down"]
        out.append(shard)
    return out


def _convert_expert(ckpt: Checkpoint, man: StoreManifest, layer: int, expert: int) -> list[dict[str, torch.Tensor]]:
    """One expert -> its per-node store tensors. INT4 sources pass through bit for bit (scales repeated when the
    store's groups are smaller, see quant.stored_group_size); biases are kept in BF16."""
    bias = ckpt.read_expert_bias(layer, expert, dtype=torch.bfloat16) if man.expert_bias else None
    if man.weight_format == "bf16":
        return _node_slices(man, ckpt.read_expert(layer, expert, dtype=torch.bfloat16), bias)
    group = man.quantized_group_size or man.group_size
    if ckpt.source_format == "int4_ct":
        parts = ckpt.read_expert_int4(layer, expert)
    else:  # RTN divides in BF16, as compressed-tensors does; each projection quantizes on its own (row-wise groups)
        parts = {k: quantize_int4(v, group) for k, v in ckpt.read_expert(layer, expert, dtype=torch.bfloat16).items()}
    parts = {k: (packed, regroup_scales(scale, group, man.group_size)) for k, (packed, scale) in parts.items()}
    return _node_slices(man, parts, bias)


class _Run:
    """State of one conversion: the pool, the counters, the progress callback."""

    def __init__(self, ckpt: Checkpoint, man: StoreManifest, out: Path, workers: int, progress: Callable | None):
        self.ckpt, self.man, self.out, self.workers = ckpt, man, out, workers
        self.progress = progress
        self.state = Progress()
        self.peak_anon = _rss_anon()
        self.delay = float(os.environ.get(TEST_DELAY_ENV) or 0)

    def report(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self.state, k, v)
        self.peak_anon = max(self.peak_anon, _rss_anon())
        if self.progress is not None:
            self.progress(replace(self.state))

    def convert_layer(self, pool: ThreadPoolExecutor, layer: int) -> list[LayerFileWriter]:
        """Write every expert of `layer` into its node files; returns the writers, still to be finished."""
        writers = []
        try:
            for node in range(self.man.numa_nodes):
                specs, meta = self.man.tensor_specs(node), self.man.file_metadata(layer, node)
                writers.append(LayerFileWriter(self.out / layer_file(layer, node), specs, meta))
            self._run_experts(pool, layer, writers)
            return writers
        except BaseException:
            for w in writers:
                w.abort()
            raise

    @staticmethod
    def finish_layer(layer: int, writers: list[LayerFileWriter]) -> dict:
        """fsync, hash and rename a layer's node files (runs beside the next layer's conversion)."""
        entries = {}
        try:
            for node, w in enumerate(writers):
                entries[layer_file(layer, node)] = w.finish()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        return entries

    def _one(self, layer: int, expert: int, writers: list[LayerFileWriter]) -> tuple[int, int]:
        written = 0
        for w, tensors in zip(writers, _convert_expert(self.ckpt, self.man, layer, expert)):
            written += w.write_expert(expert, tensors)
        if self.delay:
            time.sleep(self.delay)
        return self.ckpt.expert_source_bytes(layer, expert), written

    def _run_experts(self, pool: ThreadPoolExecutor, layer: int, writers: list[LayerFileWriter]) -> None:
        pending: set[Future] = set()
        try:
            for e in range(self.man.num_experts):
                if len(pending) >= 2 * self.workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    self._collect(done)
                pending.add(pool.submit(self._one, layer, e, writers))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                self._collect(done)
        except BaseException:
            # No writer may be closed while a worker still writes into it.
            for f in pending:
                f.cancel()
            wait(pending)
            raise

    def _collect(self, done: set[Future]) -> None:
        for f in done:
            read, written = f.result()
            s = self.state
            self.report(experts_done=s.experts_done + 1, bytes_read=s.bytes_read + read, bytes_written=s.bytes_written + written)


def quantize(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: QuantizeOptions = QuantizeOptions(),
    progress: Callable[[Progress], None] | None = None,
) -> QuantizeResult:
    """Convert the routed experts of `model_dir` into the store `out_dir` (see the module docstring)."""
    t0 = time.monotonic()
    ckpt = Checkpoint.open(model_dir)
    target = _target_manifest(ckpt, options)
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} is a file, not a directory", "pass a directory for the store (new, empty, or one to --resume)")
    with StoreLock(out):
        return _quantize_locked(t0, ckpt, target, out, options, progress)


def _quantize_locked(t0: float, ckpt: Checkpoint, target: StoreManifest, out: Path, options: QuantizeOptions,
                     progress: Callable[[Progress], None] | None) -> QuantizeResult:
    """`quantize` once this process holds the store's lock: no other writer runs, so every temp file is stale."""
    kept = _files_done(out, target, options.resume)
    todo = [L for L in target.moe_layers if not all(layer_file(L, n) in kept for n in range(target.numa_nodes))]
    needed = sum(target.file_bytes(L, n) for L in todo for n in range(target.numa_nodes))
    free = free_disk_bytes(out)
    if needed + DISK_MARGIN > free:
        raise DoesNotFit(
            f"not enough disk space in {out}: the store needs {format_bytes(needed)} more plus a "
            f"{format_bytes(DISK_MARGIN)} margin, "
            f"{format_bytes(free)} free",
            "free some space or choose another output directory",
        )

    manifest = replace(target, files=dict(kept), complete=False)
    try:
        for stale in out.rglob(".*.partial-*"):  # left by a killed run (layer files and the manifest alike)
            stale.unlink()
        (out / "layers").mkdir(parents=True, exist_ok=True)
        write_manifest(out, manifest)
    except OSError as e:
        raise BadInput(f"cannot write the store into {out}: {e.strerror}", "choose a writable output directory") from None

    workers = options.workers or _physical_cores()
    run = _Run(ckpt, manifest, out, workers, progress)
    experts = target.num_experts
    run.state = Progress(
        layers_total=len(todo),
        experts_total=len(todo) * experts,
        bytes_read_total=sum(ckpt.expert_source_bytes(L, e) for L in todo for e in range(experts)),
        bytes_written_total=needed,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))  # workers, not intra-op threads, fill the cores
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="lvllm-quantize") as pool, ThreadPoolExecutor(1) as finisher:
            finishing: Future | None = None
            for i, layer in enumerate(todo):
                run.report(layer=layer)
                writers = run.convert_layer(pool, layer)
                try:
                    if finishing is not None:
                        finishing.result()
                        run.report(layers_done=i)
                    finishing = finisher.submit(_finish_and_record, out, manifest, layer, writers)
                except BaseException:  # Ctrl-C, or the previous layer's finish failed: no temp file stays behind
                    for w in writers:
                        w.abort()
                    raise
            if finishing is not None:
                finishing.result()
                run.report(layers_done=len(todo))
    finally:
        torch.set_num_threads(threads)
    manifest = replace(manifest, complete=True)
    write_manifest(out, manifest)
    convert_seconds = time.monotonic() - t0

    threshold = options.verify_threshold if options.verify_threshold is not None else DEFAULT_THRESHOLD[options.weight_format]
    errors = verify_store(ExpertStore.open(out), ckpt, None if options.verify else options.sample_experts, run)
    return QuantizeResult(
        store=str(out),
        manifest=manifest,
        input_bytes=run.state.bytes_read,
        output_bytes=sum(manifest.files[layer_file(L, n)]["bytes"] for L in todo for n in range(manifest.numa_nodes)),
        seconds=convert_seconds,
        peak_rss_bytes=_peak_rss(),
        peak_anon_rss_bytes=run.peak_anon,
        layers_written=tuple(todo),
        layers_skipped=tuple(L for L in target.moe_layers if L not in todo),
        verify_mode="full" if options.verify else "sample",
        errors=tuple(errors),
        threshold=threshold,
        workers=workers,
    )


def _finish_and_record(out: Path, manifest: StoreManifest, layer: int, writers: list[LayerFileWriter]) -> None:
    """Put a layer's files in place and list them at once in the manifest in progress (what --resume trusts).
    Runs on the one finisher thread, so manifest writes never race."""
    manifest.files.update(_Run.finish_layer(layer, writers))
    write_manifest(out, manifest)


def verify_store(store: ExpertStore, ckpt: Checkpoint, sample: int | None = None, run: _Run | None = None) -> list[LayerError]:
    """Relative error ||stored - source|| / ||source|| per expert matrix (gate+up, down; and their biases where the
    experts have them), per layer: every expert, or `sample` experts spread evenly over each layer."""
    man = store.manifest
    e = man.num_experts
    experts = range(e) if sample is None or sample >= e else sorted({round(i * (e - 1) / max(1, sample - 1)) for i in range(sample)})
    if run is not None:
        run.report(stage="verify", experts_done=0, experts_total=len(man.moe_layers) * len(experts))
    out = []
    for layer in man.moe_layers:
        rels = []
        for x in experts:
            src = ckpt.read_expert(layer, x)
            w13, w2 = store.expert(layer, x)
            ref13 = torch.cat([src["gate"], src["up"]]) if man.gated else src["up"]
            pairs = [(w13, ref13), (w2, src["down"])]
            if man.expert_bias:
                b = ckpt.read_expert_bias(layer, x)
                b13, b2 = store.expert_bias(layer, x)
                pairs += [(b13, torch.cat([b["gate"], b["up"]]) if man.gated else b["up"]), (b2, b["down"])]
            for got, ref in pairs:
                rels.append(((got - ref).norm() / ref.norm().clamp_min(1e-30)).item())
            if run is not None:
                run.report(experts_done=run.state.experts_done + 1)
        out.append(LayerError(layer, len(experts), max(rels), sum(rels) / len(rels)))
    return out


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1
