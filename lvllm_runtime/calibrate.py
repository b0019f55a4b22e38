"""Calibrated INT4 routed experts (GPTQ, AWQ) through llm-compressor: the only module that calls it.

    checks (llm-compressor, method, checkpoint, group, data, memory) -> load (in RAM, or disk-offloaded above the
    memory allowed) -> linearize the experts -> oneshot, sequential pipeline, recipe targeting only routed-expert
    Linear layers (W4A16, symmetric, group g; AWQ smoothing only up -> down inside each expert, see AWQ_MAPPINGS)
    -> save_pretrained(save_compressed) -> expert tensors renamed to the source checkpoint's names -> `calibrate`
    returns the directory, which `lvllm quantize` passes into the store

The returned directory is what llm-compressor wrote (compressed-tensors `pack-quantized` experts, every other weight
as it was), with two changes so that the store made from it belongs to the source model: config.json is the
source's, byte for byte (its hash ties store, plan and model; llm-compressor's `quantization_config` moves to
`lvllm_calibration.json`, next to what was used: method, group, data, versions, measured time and peak memory), and
expert tensors whose linearized names differ from the source's (Mixtral's w1/w3/w2) are renamed in the safetensors
header only, so their bytes stay bit-identical. It is built under a temp name and renamed into place when complete.

Memory: the sequential pipeline runs one decoder layer at a time, so the peak is the process itself, the weights
kept in RAM, and one layer's working set (its weights, GPTQ's float32 Hessians of every expert Linear, the cached
calibration activations). `estimate_memory` predicts it before anything is loaded; above `max_memory` the weights
that do not fit are offloaded to disk (compressed-tensors' DiskCache) and when not even one layer fits, it refuses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from .checkpoint import INDEX, SINGLE, Checkpoint, SafetensorsFile
from .errors import BadInput, CorruptCheckpoint, DoesNotFit, UnsupportedArchitecture
from .quant import pick_group_size

METHODS = ("gptq", "awq")
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 256
BUNDLED = Path(__file__).with_name("calibration_data.jsonl")
RESULT = "lvllm_calibration.json"
TESTED = "0.14"  # llmcompressor series the workarounds below were written against (compressed-tensors 0.19)
INSTALL_FIX = "pip install 'lvllm[calibrate]' (or: bash scripts/install_calibrate.sh), or use --method rtn"
# Linearized expert Linear modules: "<moe block>.experts.<e>.<proj>"; shared experts carry no index, so stay out.
EXPERT_RE = r"re:.*\.experts\.\d+\.[^.]+$"
# AWQ folds each smoothing scale s into a layer before (output / s) and the layers after (input columns * s). The store
# carries only routed-expert weights, so only pairs with both sides inside one expert are valid: llm-compressor's
# default MoE mappings also smooth post_attention_layernorm -> router + every expert's gate/up, which rescales the norm
# and the router that the served model takes from the source checkpoint, so the stored gate/up would see unscaled
# inputs. up -> down needs act(gate x) * up x to be linear in up x: gated experts only.
AWQ_MAPPINGS = [(r"re:.*\.experts\.\d+\.up_proj$", [r"re:.*\.experts\.\d+\.down_proj$"])]
PROCESS_SLACK = 512 << 20  # tracing, tokenizer, loguru/tqdm, allocator fragmentation (measured: 0.3-0.5 GB)


@dataclass(frozen=True)
class CalibrationData:
    """Token ids ready for calibration plus where they came from (recorded in the store's calibration record)."""

    source: str  # "bundled" or the absolute path of the JSONL file
    sha256: str
    records: int
    tokens: int  # all tokens the records gave, before cutting into samples
    samples: int
    seq_len: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident memory of one calibration, in bytes, by part."""

    process: int  # this process with torch/transformers/llm-compressor imported
    weights: int  # the whole checkpoint as loaded (BF16)
    layer: int  # the largest decoder layer's weights, onloaded plus one working copy
    hessians: int  # GPTQ: float32 [K, K] per expert Linear of one layer; AWQ: its activation caches
    activations: int  # calibration inputs and outputs of one layer, all samples
    allowed: int  # max_memory, or what is available now

    @property
    def working_set(self) -> int:
        """What one layer needs whatever is offloaded."""
        return self.process + self.layer + self.hessians + self.activations

    @property
    def in_ram(self) -> int:
        return self.working_set + self.weights

    @property
    def offload(self) -> bool:
        return self.in_ram > self.allowed

    @property
    def resident_budget(self) -> int:
        """Bytes of weights that may stay in RAM when offloading."""
        return max(0, self.allowed - self.working_set)

    @property
    def peak(self) -> int:
        return self.in_ram if not self.offload else self.working_set + self.resident_budget

    def describe(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        return (f"process {gb(self.process)} + one layer {gb(self.layer)} + "
                f"{'Hessians' if self.hessians else 'caches'} {gb(self.hessians)} + activations {gb(self.activations)}"
                f" + weights kept in RAM {gb(self.weights if not self.offload else self.resident_budget)}")


@dataclass(frozen=True)
class Progress:
    """Handed to the progress callback at each stage."""

    stage: str  # "load" | "calibrate" | "save"
    detail: str = ""


# --- llm-compressor and its version-specific workarounds ---------------------------------------------------------


def llmcompressor_version() -> str | None:
    try:
        return metadata.version("llmcompressor")
    except metadata.PackageNotFoundError:
        return None


def require_llmcompressor() -> str:
    """The installed llmcompressor version; BadInput naming the extra when it is missing or does not import."""
    version = llmcompressor_version()
    if version is None:
        raise BadInput("--method gptq/awq needs llm-compressor, which is not installed", INSTALL_FIX)
    # llm-compressor logs every module it quantizes at INFO, and a warning per call without an accelerator; lvllm
    # reports its own progress, so only its errors reach stderr unless the user set its level.
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    try:
        import llmcompressor  # noqa: F401
    except Exception as e:  # a broken install fails in many ways; say which
        raise BadInput(f"llmcompressor {version} is installed but does not import ({type(e).__name__}: {e})",
                       INSTALL_FIX) from None
    return version


def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


@contextlib.contextmanager
def _cpu_workarounds(version: str):
    """Upstream behaviours of llmcompressor 0.14 that break calibration on a machine without an accelerator.

    AWQ: `AWQModifier` pins the parent-module activation cache before each mapping's grid search
    (`IntermediatesCache.pin_memory`, for non-blocking host-to-device copies); pinning needs an accelerator, so on
    a CPU-only torch it raises. Onload and compute are both on the CPU here, so pinning buys nothing: skip it.
    (The other one, `load_quantizable_moe` registering a patch mapping whose transformers `apply_patches` walks
    every transformers module and imports torchvision through the image processors, is avoided by loading with
    plain `from_pretrained` and linearizing afterwards, see `_load`.)
    """
    import torch

    if _series(version) != TESTED or torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


# --- calibration data ---------------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike | None) -> tuple[list[dict], str, str]:
    """Records of a JSONL calibration file (or the bundled set when None) -> (records, source, sha256).

    Each line is {"text": str} or {"messages": [{"role": str, "content": str}, ...]}; blank lines are skipped.
    BadInput names the line of the first record that is neither.
    """
    file = BUNDLED if path is None else Path(path)
    source = "bundled" if path is None else str(file.resolve())
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read calibration file {file}: {e.strerror}", "pass a readable JSONL file") from None
    records = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file} line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where} is not JSON ({e.msg})", 'write one {"text": ...} or {"messages": [...]} per line') from None
        records.append(_check_record(rec, where))
    if not records:
        raise BadInput(f"calibration file {file} holds no record", 'write one {"text": ...} or {"messages": [...]} per line')
    return records, source, hashlib.sha256(raw).hexdigest()


def _check_record(rec: object, where: str) -> dict:
    fix = 'each line must be {"text": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}'
    if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
        return {"text": rec["text"]}
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    ):
        return {"messages": msgs}
    raise BadInput(f"{where} has no non-empty \"text\" string and no \"messages\" list of role/content", fix)


def tokenize(records: list[dict], tokenizer, samples: int, seq_len: int):
    """Records -> int64 [samples, seq_len]: each record as the model sees it (chat records through the model's
    chat template), joined with EOS and cut into consecutive windows. BadInput when they give too few tokens."""
    import torch

    if samples < 1 or seq_len < 8:
        raise BadInput(f"--calibration-samples {samples} / --calibration-seq-len {seq_len} are too small",
                       "use at least 1 sample of 8 tokens")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids: list[int] = []
    for i, rec in enumerate(records):
        if "messages" in rec:
            if not tokenizer.chat_template:
                raise BadInput(f"calibration record {i + 1} is a chat, and the model's tokenizer has no chat template",
                               'use {"text": ...} records for this model')
            text = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        else:
            text = rec["text"]
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    have = len(ids) // seq_len
    if have < samples:
        raise BadInput(
            f"the calibration data gives {len(ids)} tokens: {have} samples of {seq_len} tokens, {samples} were asked",
            "add records, or lower --calibration-samples / --calibration-seq-len",
        )
    return torch.tensor(ids[: samples * seq_len], dtype=torch.int64).view(samples, seq_len), len(ids)


# --- memory ---------------------------------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _weight_files(model_dir: Path) -> list[SafetensorsFile]:
    if (model_dir / INDEX).is_file():
        names = sorted(set(json.loads((model_dir / INDEX).read_text())["weight_map"].values()))
    else:
        names = [SINGLE]
    return [SafetensorsFile(model_dir / n) for n in names]


def estimate_memory(ckpt: Checkpoint, method: str, samples: int, seq_len: int, max_memory: int | None,
                    process: int | None = None) -> MemoryEstimate:
    """Predicted peak of `calibrate` (see the module docstring); `process` defaults to this process's RSS now."""
    import psutil

    m = ckpt.model
    bf16 = lambda f, n: f.nbytes(n) * 2 // max(1, f.dtype(n).itemsize) if f.dtype(n).is_floating_point else f.nbytes(n)  # noqa: E731
    layers: dict[int, int] = {}
    weights = 0
    for f in _weight_files(ckpt.path):
        for name in f.entries:
            size = bf16(f, name)
            weights += size
            hit = re.search(r"\blayers\.(\d+)\.", name)
            if hit:
                layers[int(hit.group(1))] = layers.get(int(hit.group(1)), 0) + size
    h, i, e = m.hidden_size, m.intermediate_size, m.num_experts
    tokens = samples * seq_len
    if method == "gptq":
        inputs = [h, h, i] if m.gated else [h, i]
        caches = e * sum(k * k for k in inputs) * 4
    else:  # AWQ: every expert's cached BF16 inputs (all tokens: calibrate-all-experts), then one expert's BF16
        # reference and quantized outputs and float32 loss temporaries
        caches = tokens * h * (2 * e + 2 + 2 + 4 * 2)
    # Layer inputs and outputs of every sample in BF16, the residual, position embeddings; the MoE forward of
    # one sample with every expert seeing every token (calibrate-all-experts) in float32.
    activations = tokens * h * 2 * 3 + seq_len * (e * i * 3 + h * 4) * 4
    allowed = max_memory if max_memory is not None else _rss() + psutil.virtual_memory().available
    return MemoryEstimate(
        process=(process if process is not None else _rss()) + PROCESS_SLACK,
        weights=weights,
        layer=2 * max(layers.values(), default=0),
        hessians=caches,
        activations=activations,
        allowed=allowed,
    )


def parse_memory(text: str) -> int:
    """"24GB", "512MiB", "1.5G", "800M" or plain bytes -> bytes (K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024)."""
    hit = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not hit:
        raise BadInput(f"--max-memory {text!r} is not a size", "write it like 24GB, 512MiB or 1.5G")
    number, unit, binary = hit.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


def read_record(ckpt_dir: str | os.PathLike) -> dict | None:
    """What `calibrate` recorded in a checkpoint it wrote (method, group, data, versions, memory, time), without
    llm-compressor's quantization_config; None for any other checkpoint. For the store manifest."""
    path = Path(ckpt_dir) / RESULT
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    record.pop("quantization_config", None)
    return record


# --- the run ----------------------------------------------------------------------------------------------------------


def _recipe(method: str, group: int):
    scheme = {
        "targets": [EXPERT_RE],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group},
    }
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(config_groups={"W4A16": scheme}, ignore=[])
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

    mappings = [AWQMapping(smooth, balance) for smooth, balance in AWQ_MAPPINGS]
    return [AWQModifier(mappings=mappings), QuantizationModifier(config_groups={"W4A16": scheme}, ignore=[])]


def _load(model_dir: Path, est: MemoryEstimate, offload_dir: Path):
    """The model in BF16 with linearized experts: in RAM when the estimate fits, else with the weights beyond the
    resident budget offloaded to `offload_dir`."""
    import torch
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    if not est.offload:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    else:
        from compressed_tensors.offload import load_offloaded_model

        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.bfloat16, device_map="auto_offload",
                max_memory={"cpu": est.resident_budget}, offload_folder=str(offload_dir),
            )
    linearize_moe(model)
    return model.eval()


def _expert_renames(ckpt: Checkpoint, saved: set[str]) -> dict[str, str]:
    """Saved tensor name -> the source checkpoint's name, for experts whose linearized module name differs
    ("...experts.3.gate_proj.weight_packed" -> "...experts.3.w1.weight_packed"). CorruptCheckpoint when an expert
    tensor is in neither form (llm-compressor did not quantize it)."""
    m = ckpt.model
    linear = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    renames = {}
    for layer in m.moe_layers:
        for e in range(m.num_experts):
            for key, base in m.expert_names(layer, e).items():
                for suffix in ("weight_packed", "weight_scale", "weight_shape"):
                    want = f"{base}.{suffix}"
                    got = f"{base.rsplit('.', 1)[0]}.{linear[key]}.{suffix}"
                    if want in saved:
                        continue
                    if got not in saved:
                        raise CorruptCheckpoint(f"llm-compressor wrote no {want} (nor {got})",
                                                "this architecture's experts were not quantized; use --method rtn")
                    renames[got] = want
    return renames


def rename_tensors(path: Path, renames: dict[str, str]) -> None:
    """Rename tensors of one safetensors file by rewriting its header; the data bytes are copied unchanged."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        new = {renames.get(k, k): v for k, v in header.items()}
        blob = json.dumps(new, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            shutil.copyfileobj(f, out, 16 << 20)
    os.replace(tmp, path)


def _finish_checkpoint(ckpt: Checkpoint, out: Path) -> dict:
    """Rename experts to the source's names, put the source config.json back; returns llm-compressor's
    quantization_config."""
    index = out / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE]
    saved = {name: fname for fname in files for name in SafetensorsFile(out / fname).entries}
    renames = _expert_renames(ckpt, set(saved))
    for fname in files:
        mine = {a: b for a, b in renames.items() if saved[a] == fname}
        if mine:
            rename_tensors(out / fname, mine)
    if index.is_file() and renames:
        data = json.loads(index.read_text())
        data["weight_map"] = {renames.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    qconfig = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    shutil.copyfile(ckpt.path / "config.json", out / "config.json")
    return qconfig


def calibrate(
    model_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    method: str = "gptq",
    group_size: int | str = "auto",
    calibration: str | os.PathLike | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_memory: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    numa_nodes: int = 1,
) -> Path:
    """Calibrate the routed experts of `model_dir` to INT4 with `method`; write the compressed-tensors checkpoint
    to `work_dir` (new or empty) and return it (see the module docstring for what it holds). `group_size` "auto"
    picks the largest group that still divides each node's slice of the store made with `numa_nodes`."""
    t0 = time.monotonic()
    say = progress or (lambda p: None)
    if method not in METHODS:
        raise BadInput(f"--method {method!r} is not a calibration method", f"use one of {', '.join(METHODS)} (or rtn)")
    version = require_llmcompressor()
    ckpt = Checkpoint.open(model_dir)
    m = ckpt.model
    if ckpt.source_format not in ("bf16", "fp16", "fp32"):
        raise BadInput(f"calibration starts from BF16/FP16 weights; {ckpt.path} is {ckpt.source_format}",
                       "calibrate the BF16 release of this model, or use --method rtn")
    if m.layout != "per_expert":
        raise UnsupportedArchitecture(
            f"{m.model_type} keeps its experts fused on disk; calibrated experts are written per expert",
            "use --method rtn for this model")
    if method == "awq" and not m.gated:
        raise UnsupportedArchitecture(
            f"{m.model_type}'s experts are not gated ({m.activation}): AWQ has no scale to fold inside an expert",
            "use --method gptq or rtn for this model")
    if m.intermediate_size % numa_nodes:
        raise BadInput(f"expert intermediate size {m.intermediate_size} does not split over {numa_nodes} NUMA nodes",
                       "choose --numa-nodes that divides it")
    group = pick_group_size([m.hidden_size, m.intermediate_size // numa_nodes], group_size)
    out = Path(work_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} is not empty", "choose a new or empty directory for the calibrated checkpoint")
    records, source, sha = read_records(calibration)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    ids, total = tokenize(records, tokenizer, samples, seq_len)
    data = CalibrationData(source, sha, len(records), total, samples, seq_len)
    est = estimate_memory(ckpt, method, samples, seq_len, max_memory)
    if est.working_set > est.allowed:
        raise DoesNotFit(
            f"calibrating one layer needs about {est.working_set / 1e9:.2f} GB ({est.describe()}), "
            f"{est.allowed / 1e9:.2f} GB are allowed",
            "raise --max-memory, or lower --calibration-samples / --calibration-seq-len",
        )

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        qconfig = _run(ckpt, tmp, method, group, ids, est, version, say)
        record = {
            "method": method,
            "group_size": group,
            "calibration": asdict(data),
            "versions": {p: _version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
            "memory": {"predicted_peak_bytes": est.peak, "allowed_bytes": est.allowed, "offloaded": est.offload,
                       "measured_peak_rss_bytes": _peak_rss()},
            "seconds": round(time.monotonic() - t0, 3),
            "quantization_config": qconfig,
        }
        (tmp / RESULT).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _run(ckpt: Checkpoint, tmp: Path, method: str, group: int, ids, est: MemoryEstimate, version: str,
         say: Callable[[Progress], None]) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    say(Progress("load", f"{'disk-offloaded' if est.offload else 'in RAM'}, predicted peak {est.peak / 1e9:.2f} GB"))
    offload_dir = tmp / ".offload"
    model = _load(ckpt.path, est, offload_dir)
    m = ckpt.model
    found = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and re.search(EXPERT_RE[3:], n)]
    want = len(m.moe_layers) * m.num_experts * (3 if m.gated else 2)
    if len(found) != want:
        raise UnsupportedArchitecture(
            f"llm-compressor exposes {len(found)} routed-expert Linear layers of {m.model_type}, {want} expected",
            "use --method rtn for this model")
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    say(Progress("calibrate", f"{method}, {ids.shape[0]} samples x {ids.shape[1]} tokens, {len(m.moe_layers)} MoE layers"))
    with _cpu_workarounds(version):
        try:
            oneshot(model=model, dataset=dataset, recipe=_recipe(method, group), num_calibration_samples=ids.shape[0],
                    max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
        except torch.fx.proxy.TraceError as e:
            raise UnsupportedArchitecture(
                f"llm-compressor cannot trace {m.model_type} layer by layer ({str(e).splitlines()[0][:200]})",
                "use --method rtn for this model") from None
    say(Progress("save"))
    model.save_pretrained(tmp, save_compressed=True, max_shard_size="2GB")
    del model
    shutil.rmtree(offload_dir, ignore_errors=True)
    return _finish_checkpoint(ckpt, tmp)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
