"""A random GGUF of arch `qwen3moe` at Qwen3-30B-A3B shapes, written straight to disk: the model llama.cpp measures in
bench/llamacpp_peer.sh (issue 17's peer rows), with no checkpoint and no quantization pass.

    python bench/gguf_random.py --gguf-py <llama.cpp>/gguf-py --out /tmp/q3.gguf [--layers N] [--small] [--dry-run]

Routed experts (ffn_{gate,up,down}_exps) are Q4_0: 32 weights in 18 bytes (an f16 scale + 16 bytes of nibbles),
4.5 bits per weight; lvllm's INT4 g128 store is 4.125 (g32: 4.5). Everything else is BF16 (what lvllm serves; `--dense
f16` for F16) except the norms and the router, which stay F32 as llama.cpp's converter writes them.

Speed does not depend on the values, so one random Q4_0 buffer of one expert tensor's size is written for every expert
tensor, and the dense tensors are slices of one random BF16 pool; the routers are drawn fresh per layer, so tokens
spread over all experts as a trained router's do. Scales are f16 in [2^-9, 2^-8) and dense values of magnitude
[2^-7, 2^-6) with random signs: no inf/NaN anywhere. The vocabulary is tokenizer.ggml.model "none" with
`qwen3moe.vocab_size` dummy tokens (llama-bench and llama-batched-bench feed random ids). One streaming pass, to a
temporary name, fsync, rename: a file at --out is always complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np

Q4_0_BLOCK = 32  # weights per Q4_0 block
Q4_0_BYTES = 18  # bytes per block: f16 scale + 16 bytes of nibbles


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model shapes (HF Qwen3MoeConfig names in the comments)."""
    layers: int = 48          # num_hidden_layers
    hidden: int = 2048        # hidden_size
    experts: int = 128        # num_experts
    top_k: int = 8            # num_experts_per_tok
    expert_ffn: int = 768     # moe_intermediate_size
    dense_ffn: int = 6144     # intermediate_size (metadata only: every layer is MoE)
    heads: int = 32           # num_attention_heads
    kv_heads: int = 4         # num_key_value_heads
    head_dim: int = 128       # head_dim
    vocab: int = 151936       # vocab_size
    context: int = 40960      # max_position_embeddings
    rope_theta: float = 1e6
    rms_eps: float = 1e-6

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, numpy shape = reversed ggml ne, kind) in file order; kind is dense, norm, router or experts."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [("token_embd.weight", (self.vocab, h), "dense")]
        for i in range(self.layers):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (h,), "norm"),
                    (b + "attn_q.weight", (q, h), "dense"),
                    (b + "attn_k.weight", (kv, h), "dense"),
                    (b + "attn_v.weight", (kv, h), "dense"),
                    (b + "attn_output.weight", (h, q), "dense"),
                    (b + "attn_q_norm.weight", (self.head_dim,), "norm"),
                    (b + "attn_k_norm.weight", (self.head_dim,), "norm"),
                    (b + "ffn_norm.weight", (h,), "norm"),
                    (b + "ffn_gate_inp.weight", (self.experts, h), "router"),
                    (b + "ffn_gate_exps.weight", (self.experts, self.expert_ffn, h), "experts"),
                    (b + "ffn_up_exps.weight", (self.experts, self.expert_ffn, h), "experts"),
                    (b + "ffn_down_exps.weight", (self.experts, h, self.expert_ffn), "experts")]
        out += [("output_norm.weight", (h,), "norm"), ("output.weight", (self.vocab, h), "dense")]
        return out


SMALL = Shape(layers=2, hidden=256, experts=8, top_k=2, expert_ffn=128, dense_ffn=512, heads=4, kv_heads=2,
              head_dim=64, vocab=1024, context=4096)


def nbytes(shape: tuple[int, ...], kind: str) -> int:
    n = int(np.prod(shape))
    return {"experts": n // Q4_0_BLOCK * Q4_0_BYTES, "dense": 2 * n}.get(kind, 4 * n)


def load_gguf(gguf_py: Path) -> types.ModuleType:
    """gguf-py's writer and constants without its package __init__, which imports metadata.py and with it pyyaml
    (absent on the GPU box); the writer itself needs only numpy."""
    if not (gguf_py / "gguf" / "gguf_writer.py").is_file():
        sys.exit(f"gguf_random: no gguf-py at {gguf_py}: pass --gguf-py <llama.cpp>/gguf-py "
                 "(unpack .gl/llama.cpp.tar.xz, see bench/llamacpp_peer.sh)")
    pkg = types.ModuleType("gguf")
    pkg.__path__ = [str(gguf_py / "gguf")]
    sys.modules["gguf"] = pkg
    for sub in ("constants", "gguf_writer"):
        setattr(pkg, sub, importlib.import_module(f"gguf.{sub}"))
    return pkg


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random bytes as a writable uint8 array (the raw generator output: ~10x faster than Generator.bytes)."""
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]


def _bits16(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """n random 16-bit floats (as uint16 bits) of magnitude [2^-7, 2^-6) with random sign and mantissa."""
    r = _random_bytes(rng, 2 * n).view(np.uint16)
    if dtype == "bf16":  # 1 sign, 8 exponent (bias 127), 7 mantissa bits
        r &= np.uint16(0x807F)
        r |= np.uint16((127 - 7) << 7)
    else:  # f16: 1, 5 (bias 15), 10
        r &= np.uint16(0x83FF)
        r |= np.uint16((15 - 7) << 10)
    return r


def _q4_0_blocks(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """n_blocks random Q4_0 blocks as uint8 [n_blocks, 18]: f16 scale in [2^-9, 2^-8), then random nibbles."""
    blocks = _random_bytes(rng, n_blocks * Q4_0_BYTES).reshape(n_blocks, Q4_0_BYTES)
    d = (blocks[:, :2].copy().view(np.uint16)[:, 0] & np.uint16(0x03FF)) | np.uint16((15 - 9) << 10)
    blocks[:, :2] = d.astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    return blocks


def write(out: Path, gguf_py: Path, shape: Shape, dense: str = "bf16", seed: int = 0, log=print) -> int:
    """Write the GGUF to `out` (temporary name, fsync, rename); returns its size in bytes."""
    gguf = load_gguf(gguf_py)
    G, Q = gguf.gguf_writer.GGUFWriter, gguf.constants.GGMLQuantizationType
    dense_type = Q.BF16 if dense == "bf16" else Q.F16
    specs = shape.tensors()
    need = sum(nbytes(s, k) for _, s, k in specs)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free + (out.stat().st_size if out.exists() else 0)
    if free < need + (1 << 30):
        sys.exit(f"gguf_random: {out.parent} has {free / 1e9:.1f} GB free, the GGUF needs {need / 1e9:.1f} GB + 1: "
                 "free space there or pass --out on a larger disk")
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    w = G(tmp, "qwen3moe")
    a = "qwen3moe"
    w.add_name(f"random qwen3moe {shape.layers}L")
    w.add_uint32(f"{a}.block_count", shape.layers)
    w.add_uint32(f"{a}.context_length", shape.context)
    w.add_uint32(f"{a}.embedding_length", shape.hidden)
    w.add_uint32(f"{a}.feed_forward_length", shape.dense_ffn)
    w.add_uint32(f"{a}.expert_feed_forward_length", shape.expert_ffn)
    w.add_uint32(f"{a}.attention.head_count", shape.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.kv_heads)
    w.add_uint32(f"{a}.attention.key_length", shape.head_dim)
    w.add_uint32(f"{a}.attention.value_length", shape.head_dim)
    w.add_float32(f"{a}.rope.freq_base", shape.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", shape.rms_eps)
    w.add_uint32(f"{a}.expert_count", shape.experts)
    w.add_uint32(f"{a}.expert_used_count", shape.top_k)
    w.add_uint32(f"{a}.vocab_size", shape.vocab)
    w.add_string("tokenizer.ggml.model", "none")
    w.add_uint32("general.file_type", 2)  # LLAMA_FTYPE_MOSTLY_Q4_0
    w.add_quantization_version(2)
    for name, s, kind in specs:
        if kind == "experts":
            w.add_tensor_info(name, s[:-1] + (s[-1] // Q4_0_BLOCK * Q4_0_BYTES,), np.dtype(np.uint8),
                              nbytes(s, kind), raw_dtype=Q.Q4_0)
        elif kind == "dense":
            w.add_tensor_info(name, s, np.dtype(np.uint16), nbytes(s, kind), raw_dtype=dense_type)
        else:
            w.add_tensor_info(name, s, np.dtype(np.float32), nbytes(s, kind))
    t0 = time.time()
    rng = np.random.default_rng(seed)
    pool = _bits16(rng, max(int(np.prod(s)) for _, s, k in specs if k == "dense"), dense)
    expert_shape = next(s for _, s, k in specs if k == "experts")
    experts = _q4_0_blocks(rng, int(np.prod(expert_shape)) // Q4_0_BLOCK)  # gate, up and down hold as many weights
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, s, kind in specs:
            n = int(np.prod(s))
            if kind == "experts":
                data = experts
            elif kind == "dense":
                start = int(rng.integers(0, pool.size - n + 1))
                data = pool[start:start + n]
            elif kind == "router":
                data = (rng.standard_normal(n, dtype=np.float32) / np.float32(shape.hidden ** 0.5))
            else:
                data = np.ones(n, dtype=np.float32)
            w.write_tensor_data(data)
            if name.endswith("ffn_down_exps.weight"):
                done = int(name.split(".")[1]) + 1
                if done == shape.layers or done % 8 == 0:
                    log(f"gguf_random: {done}/{shape.layers} layers, {time.time() - t0:.1f} s")
        w.flush()
        for f in w.fout:
            os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


def describe(shape: Shape) -> dict:
    """Byte counts of the GGUF for `shape` (tensor data; the header adds a few hundred KB)."""
    specs = shape.tensors()
    exp = [(s, k) for _, s, k in specs if k == "experts"]
    expert_weights = sum(int(np.prod(s)) for s, _ in exp)
    expert_bytes = sum(nbytes(s, k) for s, k in exp)
    total = sum(nbytes(s, k) for _, s, k in specs)
    return {"layers": shape.layers, "params": sum(int(np.prod(s)) for _, s, _ in specs),
            "expert_params": expert_weights, "expert_bytes": expert_bytes,
            "expert_bytes_per_layer": expert_bytes // shape.layers,
            "expert_bits_per_weight": 8 * expert_bytes / expert_weights,
            "dense_bytes": total - expert_bytes, "total_bytes": total}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen3moe-random-q4_0.gguf"))
    ap.add_argument("--gguf-py", type=Path, default=Path(os.environ.get("GGUF_PY", "gguf-py")),
                    help="the gguf-py folder of the llama.cpp tree (default $GGUF_PY)")
    ap.add_argument("--layers", type=int, help="number of layers (default 48, or 2 with --small)")
    ap.add_argument("--small", action="store_true", help="tiny shapes for a quick CPU check")
    ap.add_argument("--dense", choices=("bf16", "f16"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the sizes, write nothing")
    args = ap.parse_args(argv)
    shape = SMALL if args.small else Shape()
    if args.layers is not None:
        if args.layers < 1:
            sys.exit("gguf_random: --layers must be >= 1")
        shape = dataclasses.replace(shape, layers=args.layers)
    d = describe(shape)
    print(f"gguf_random: {d['layers']} layers, {d['params'] / 1e9:.2f} B params; experts Q4_0 "
          f"({d['expert_bits_per_weight']:.3f} bits/weight; lvllm INT4 g128: 4.125, g32: 4.5) "
          f"{_size(d['expert_bytes'])} = {_size(d['expert_bytes_per_layer'])}/layer; "
          f"dense {args.dense} + f32 norms/router {_size(d['dense_bytes'])}; total {_size(d['total_bytes'])}")
    if args.dry_run:
        return
    t0 = time.time()
    size = write(args.out, args.gguf_py, shape, args.dense, args.seed)
    dt = time.time() - t0
    print(f"gguf_random: wrote {args.out} ({_size(size)}) in {dt:.1f} s ({size / 1e9 / dt:.2f} GB/s)")


if __name__ == "__main__":
    main()
