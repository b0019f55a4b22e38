"""The C++ engine against a float64 torch reference on random weights of many shapes (issue 3).

INT4 weights are random packed nibbles + random bf16 scales, dequantized here with a few lines of torch (layout:
DESIGN.md), so these tests check the engine and not the quantizer. Output is poisoned (NaN) before every run.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvllm_runtime.engine import SPIN_US_SHARED_CPUS, Engine, keep_other_threads_off
from lvllm_runtime.errors import BadInput, EngineError

TOKENS = (1, 2, 7, 64, 513)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dequant(packed: torch.Tensor, scale: torch.Tensor, g: int) -> torch.Tensor:
    """packed int32 [..., N, K/8] (column 8j+k in bits 4k..4k+3, stored q+8), scale bf16 [..., N, K/g] -> f64 [..., N, K]."""
    u = (packed.unsqueeze(-1) >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF
    q = u.reshape(*packed.shape[:-1], packed.shape[-1] * 8).double() - 8
    return q * scale.double().repeat_interleave(g, dim=-1)


def act_ref(name: str, g: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    if name == "silu_glu":
        return F.silu(g) * u
    if name == "relu2":
        return torch.relu(u) ** 2
    if name == "gptoss_glu":
        g = g.clamp(max=7.0)
        return (u.clamp(-7.0, 7.0) + 1) * g * torch.sigmoid(1.702 * g)
    return F.gelu(g, approximate="tanh") * u


def make_shards(fmt, E, H, In, nodes, gated, g, gen):
    """Random store shards (one dict per node) and their f64 weights [(w13 [E, R, H], w2 [E, H, In]) per node]."""
    R = 2 * In if gated else In
    shards, dense = [], []
    for _ in range(nodes):
        if fmt == "int4":
            s13 = (torch.rand(E, R, H // g, generator=gen) + 0.5) / (4.6 * H**0.5)
            s2 = (torch.rand(E, H, In // g, generator=gen) + 0.5) / (4.6 * In**0.5)
            p13 = torch.randint(-2**31, 2**31 - 1, (E, R, H // 8), generator=gen, dtype=torch.int64).to(torch.int32)
            p2 = torch.randint(-2**31, 2**31 - 1, (E, H, In // 8), generator=gen, dtype=torch.int64).to(torch.int32)
            sh = {"w13.packed": p13, "w13.scale": s13.bfloat16(), "w2.packed": p2, "w2.scale": s2.bfloat16()}
            dense.append((dequant(p13, sh["w13.scale"], g), dequant(p2, sh["w2.scale"], g)))
        else:
            w13 = (torch.randn(E, R, H, generator=gen) / H**0.5).bfloat16()
            w2 = (torch.randn(E, H, In, generator=gen) / In**0.5).bfloat16()
            sh = {"w13": w13, "w2": w2}
            dense.append((w13.double(), w2.double()))
        shards.append(sh)
    return shards, dense


def reference(x, ids, w, dense, activation, gated):
    """f64 [T, H]: sum over nodes and routed experts of w * down(act(gate x, up x))."""
    x = x.double()
    out = torch.zeros_like(x)
    In = dense[0][1].shape[-1]
    for t, j in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        e = int(ids[t, j])
        if e < 0:
            continue
        for w13, w2 in dense:
            z = w13[e] @ x[t]
            h = act_ref(activation, z[:In], z[In:]) if gated else act_ref(activation, None, z)
            out[t] += float(w[t, j]) * (w2[e] @ h)
    return out


def q8(v: torch.Tensor, near: float = 0.0):
    """The engine's int8 activations (kernels.h): per 32-column block d = max|v| / 127, q = round_half_even(v * 127 /
    max|v|), in fp32 as the kernels do; returns d * q as f64. With near > 0 also returns d where v * 127 / max|v| is
    within `near` of a half step (else 0): where the engine's fp32 v may round the other way (one step of d)."""
    b = v.float().reshape(*v.shape[:-1], -1, 32)
    amax = b.abs().amax(dim=-1, keepdim=True)
    s = b * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    d = amax / 127
    out = (torch.round(s) * d).reshape(v.shape).double()
    if not near:
        return out
    tie = ((s - s.floor() - 0.5).abs() < near) * d
    return out, tie.reshape(v.shape).double()


def reference_fast(x, ids, w, dense, activation, gated, int8=False, biases=None):
    """Same as reference(), grouped by expert (the per-(t, j) loop is too slow for T=513). int8: both products take
    q8() activations, as the INT4 x int8 kernels do, and a second result [T] bounds per token what h values next to
    a rounding tie may change (|w| d |W2 column| for each). biases: per node (b13 f64 [E, R], b2 f64 [E, H] or None)."""
    x = x.double()
    out = torch.zeros_like(x)
    slack = torch.zeros(x.shape[0], dtype=torch.float64)
    In = dense[0][1].shape[-1]
    for e in torch.unique(ids[ids >= 0]).tolist():
        t, j = torch.nonzero(ids == e, as_tuple=True)
        for n, (w13, w2) in enumerate(dense):
            b13, b2 = biases[n] if biases else (None, None)
            z = (q8(x[t]) if int8 else x[t]) @ w13[e].T + (0 if b13 is None else b13[e])
            h = act_ref(activation, z[:, :In], z[:, In:]) if gated else act_ref(activation, None, z)
            if int8:
                h, tie = q8(h, near=1e-4)
                slack.index_add_(0, t, (tie @ w2[e].norm(dim=0)) * w[t, j].double().abs())
            y = h @ w2[e].T + (0 if b2 is None else b2[e])
            out.index_add_(0, t, y * w[t, j].double().unsqueeze(1))
    return (out, slack) if int8 else out


def route(T, k, E, gen, skip):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    if skip:
        ids[torch.rand(T, k, generator=gen) < 0.3] = -1
        ids[0] = -1  # a token with every expert computed elsewhere
    w = torch.rand(T, k, generator=gen)
    return ids, w


def check_close(out, ref, ids, tol):
    assert not torch.isnan(out.float()).any(), "NaN left in output: rows not written"
    out = out.double()
    empty = (ids < 0).all(dim=1)
    assert (out[empty] == 0).all(), "a token with no expert got a non-zero output"
    err = (out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    err[empty] = 0
    worst = int(err.argmax())
    assert err[worst] < tol, f"token {worst}: relative error {err[worst]:.3e} >= {tol}"


# INT4 tables other than 'ref' quantize activations to int8 per 32-column block (llama.cpp Q8_0 style) for both
# products. Measured on this grid (avx2, 2026-11-26): 1.1-1.5e-2 relative error against the f64 reference, the size of
# int8 rounding of Gaussian x and of the heavier-tailed act() output (a numpy simulation of the same rounding gives
# 1.2-1.4e-2 at Qwen3-30B shapes); INT4 weight rounding itself is ~7e-2 against the source weights, so this is a small
# part of the INT4 error. Hence 3e-2 for them, while test_int8_kernels_match_int8_reference holds the same kernels to
# 2e-4 against a reference that rounds activations the same way, on inputs where x's int8 rounding is exact, plus, per
# token, what h values lying next to a rounding tie may change (the engine's fp32 h and the reference's f64 h may
# round those to neighbouring int8 values; on random Gaussian inputs such flips gave up to 7.7e-3 relative).
INT8_ACT_TOL = 3e-2


def tolerance(eng, fmt, dtype):
    """bf16 I/O or AMX (bf16 activations times bf16 or dequantized-to-bf16 weights): the issue's 1e-2; INT4 with int8
    activations: INT8_ACT_TOL; the fp32 paths must be much tighter."""
    if fmt == "int4" and eng.int8_activations_max_tokens > 0:
        return INT8_ACT_TOL
    return 1e-2 if dtype == torch.bfloat16 or eng.isa == "amx" else 2e-4


NODE_SETS = {1: [[0]], 2: [[0], [1]], 3: [[0], [1], [0, 1]]}
NODE_SETS_2T = {1: [[0, 1]], 2: [[0, 1], [0, 1]], 3: [[0, 1], [1, 0], [0, 1]]}

# (fmt, group, activation, H, I (all nodes), E, k, nodes, threads per node)
CASES = [
    ("int4", 32, "silu_glu", 96, 192, 8, 2, 1, 1),
    ("int4", 64, "silu_glu", 320, 384, 64, 8, 2, 1),
    ("int4", 128, "silu_glu", 384, 768, 16, 8, 3, 2),
    ("int4", 32, "relu2", 160, 192, 12, 1, 2, 2),
    ("int4", 32, "gptoss_glu", 224, 96, 5, 2, 1, 2),
    ("int4", 64, "gelu_tanh_glu", 192, 384, 32, 8, 3, 1),
    ("bf16", None, "silu_glu", 160, 288, 64, 8, 3, 1),
    ("bf16", None, "relu2", 96, 320, 10, 2, 1, 2),
    ("bf16", None, "gptoss_glu", 288, 192, 8, 1, 2, 1),
    ("bf16", None, "gelu_tanh_glu", 224, 96, 6, 2, 1, 1),
    ("bf16", None, "silu_glu", 480, 64, 3, 2, 2, 2),
]


# Every kernel table this CPU runs except the portable one (tested below): avx2 here; amx, avx512, avx2 on Sapphire Rapids.
ISAS = [i for i in Engine.available_isas() if i != "ref"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_forward_matches_reference(case, isa):
    fmt, g, activation, H, I, E, k, nn, threads = case
    gated = activation != "relu2"
    In = I // nn
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    shards, dense = make_shards(fmt, E, H, In, nn, gated, g, gen)
    nodes = (NODE_SETS if threads == 1 else NODE_SETS_2T)[nn]
    eng = Engine(H, In, E, activation, gated, fmt, g, nodes, max_tokens=max(TOKENS), isa=isa)
    assert eng.isa == isa
    eng.load_layer(3, shards)
    for i, T in enumerate(TOKENS):
        ids, w = route(T, k, E, gen, skip=i % 2 == 1)
        if i % 2:
            ids = ids.long()
        dtype = torch.bfloat16 if i % 3 == 2 else torch.float32
        x = torch.randn(T, H, generator=gen).to(dtype)
        out = torch.full((T, H), float("nan"), dtype=dtype)
        eng.forward(3, x, ids, w, out)
        ref = reference_fast(x, ids, w, dense, activation, gated)
        check_close(out, ref, ids, tolerance(eng, fmt, dtype))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "int4"], ids=lambda c: "-".join(str(v) for v in c))
def test_int8_kernels_match_int8_reference(case, isa):
    """The INT4 x int8 kernels equal a reference that rounds activations to int8 the same way (fp32 I/O): the int8
    error allowance above covers rounding, never a kernel bug."""
    fmt, g, activation, H, I, E, k, nn, threads = case
    gated = activation != "relu2"
    In = I // nn
    gen = torch.Generator().manual_seed(hash(case) % 2**31 + 1)
    shards, _ = make_shards(fmt, E, H, In, nn, gated, g, gen)
    # Power-of-two weight scales and x = q / 32 with a +-127 in every block: x rounds to int8 exactly and the
    # engine's W13 x equals the f64 one, so h differs from the reference's only by act()'s fp32 rounding.
    dense = []
    for sh in shards:
        for key in ("w13.scale", "w2.scale"):
            sh[key] = torch.full_like(sh[key], 2.0**-7)
        dense.append((dequant(sh["w13.packed"], sh["w13.scale"], g), dequant(sh["w2.packed"], sh["w2.scale"], g)))
    eng = Engine(H, In, E, activation, gated, fmt, g, (NODE_SETS if threads == 1 else NODE_SETS_2T)[nn],
                 max_tokens=70, isa=isa)
    eng.load_layer(0, shards)
    # amx: only calls under 16 tokens per expert take the int8 kernel (bf16 tiles above); T bounds that count.
    for T in [t for t in (1, 2, 3, 5, 70) if t <= eng.int8_activations_max_tokens]:
        ids, w = route(T, k, E, gen, skip=T > 2)
        q = torch.randint(-127, 128, (T, H // 32, 32), generator=gen)
        q[:, :, 0] = 127 * (2 * torch.randint(0, 2, (T, H // 32), generator=gen) - 1)
        x = (q.reshape(T, H) / 32.0).float()
        out = torch.full((T, H), float("nan"))
        eng.forward(0, x, ids, w, out)
        ref, slack = reference_fast(x, ids, w, dense, activation, gated, int8=True)
        assert not torch.isnan(out).any()
        err = (out.double() - ref).norm(dim=1)
        bound = 2e-4 * ref.norm(dim=1) + slack
        worst = int((err - bound).argmax())
        assert err[worst] <= bound[worst], f"T={T} token {worst}: error {err[worst]:.3e} > bound {bound[worst]:.3e}"


# Every INT4 x int8 kernel table there is; a CPU without one skips it by name (AMX: Sapphire Rapids and later).
INT8_TABLES = ("amx", "avx512", "avx2")
PREFILL_TOKENS = (1, 4, 16, 33, 128)


def prefill_route(T, k, E, gen):
    """Random top-k routing with expert 0 in every token: one expert gets all T tokens, so calls of every size from
    1 to T (the GEMV's and the prefill GEMM's) happen in one forward."""
    ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.int64), 1 + torch.randperm(E - 1, generator=gen)[:k - 1]])
                       for _ in range(T)]).to(torch.int32)
    return ids, torch.rand(T, k, generator=gen)


@pytest.mark.parametrize("isa", INT8_TABLES)
@pytest.mark.parametrize("g", [32, 64, 128])
def test_int8_prefill_gemm(isa, g):
    """Calls of >= 4 tokens per expert take the INT4 x int8 prefill GEMM (fewer: the GEMV; amx: AMX-INT8 tiles for
    each call's whole 16s of tokens, the GEMM or GEMV for the rest), which equals (a) a reference rounding activations
    to int8 the same way within the GEMV's bound, and (b) the fp32-activation reference within INT8_ACT_TOL (measured
    max 1.6e-2 over this grid: avx512 with VNNI, avx2, and amx on emulated tiles, 2026-12-08)."""
    if isa not in Engine.available_isas():
        pytest.skip(f"this CPU has no '{isa}' kernel table")
    H, In, E, k = 256, 256, 8, 3
    gen = torch.Generator().manual_seed(g)
    shards, dense = make_shards("int4", E, H, In, 1, True, g, gen)
    exact = [dict(sh, **{key: torch.full_like(sh[key], 2.0**-7) for key in ("w13.scale", "w2.scale")}) for sh in shards]
    exact_dense = [(dequant(sh["w13.packed"], sh["w13.scale"], g), dequant(sh["w2.packed"], sh["w2.scale"], g))
                   for sh in exact]
    eng = Engine(H, In, E, "silu_glu", True, "int4", g, [[0, 1]], max_tokens=max(PREFILL_TOKENS), isa=isa)
    eng.load_layer(0, exact)
    eng.load_layer(1, shards)
    for T in PREFILL_TOKENS:
        ids, w = prefill_route(T, k, E, gen)
        # (a) x = q / 32 with a +-127 in every block: x rounds to int8 exactly (see test_int8_kernels_match_int8_reference)
        q = torch.randint(-127, 128, (T, H // 32, 32), generator=gen)
        q[:, :, 0] = 127 * (2 * torch.randint(0, 2, (T, H // 32), generator=gen) - 1)
        x = (q.reshape(T, H) / 32.0).float()
        out = torch.full((T, H), float("nan"))
        eng.forward(0, x, ids, w, out)
        paths = eng.last_paths()
        assert ("int4_q8_gemm" in paths or "int4_q8_tiles" in paths) == (T >= 4) and "int4_fp32_act" not in paths
        assert ("int4_q8_tiles" in paths) == (isa == "amx" and T >= 16), (T, paths)
        ref, slack = reference_fast(x, ids, w, exact_dense, "silu_glu", True, int8=True)
        assert not torch.isnan(out).any()
        err = (out.double() - ref).norm(dim=1)
        bound = 2e-4 * ref.norm(dim=1) + slack
        worst = int((err - bound).argmax())
        assert err[worst] <= bound[worst], f"T={T} token {worst}: error {err[worst]:.3e} > bound {bound[worst]:.3e}"
        # (b) Gaussian x, random scales, against fp32 activations
        x = torch.randn(T, H, generator=gen)
        out = torch.full((T, H), float("nan"))
        eng.forward(1, x, ids, w, out)
        check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, INT8_ACT_TOL)


@pytest.mark.parametrize("isa", ISAS)
def test_int8_activations_off(isa):
    """int8_activations=False: INT4 weights times fp32 activations (amx: dequantized to bf16 tiles from 16 tokens),
    within the fp32 bound (amx: the bf16 one)."""
    H, In, E, k, g = 128, 96, 6, 2, 32
    gen = torch.Generator().manual_seed(21)
    shards, dense = make_shards("int4", E, H, In, 1, True, g, gen)
    eng = Engine(H, In, E, "silu_glu", True, "int4", g, [[0, 1]], max_tokens=64, isa=isa, int8_activations=False)
    assert eng.int8_activations_max_tokens == 0
    eng.load_layer(0, shards)
    for T in (1, 16, 64):
        ids, w = prefill_route(T, k, E, gen)
        x = torch.randn(T, H, generator=gen)
        out = torch.full((T, H), float("nan"))
        eng.forward(0, x, ids, w, out)
        assert eng.last_paths() == ["int4_fp32_act"]
        check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, tolerance(eng, "int4", torch.float32))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_untileable_group_size_falls_back_to_portable_kernels():
    """A group size the SIMD kernels cannot tile (48: not whole 32-column blocks) runs the portable kernels, says so
    once in the log, and computes the same numbers as the fp32 reference."""
    H, In, E, k, g = 96, 96, 4, 2, 48
    gen = torch.Generator().manual_seed(48)
    shards, dense = make_shards("int4", E, H, In, 1, True, g, gen)
    logger = logging.getLogger("vllm.lvllm")
    records = _Records()
    logger.addHandler(records)
    try:
        eng = Engine(H, In, E, "silu_glu", True, "int4", g, [[0, 1]], max_tokens=40)
        eng.load_layer(0, shards)
        for T in (1, 5, 40):
            ids, w = route(T, k, E, gen, skip=T > 1)
            x = torch.randn(T, H, generator=gen)
            out = torch.full((T, H), float("nan"))
            eng.forward(0, x, ids, w, out)
            check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, 2e-4)
            assert eng.last_paths() == ["int4_fp32_act"]
    finally:
        logger.removeHandler(records)
    assert eng.isa == "ref" and "group_size=48" in eng.kernel_note and "32, 64 or 128" in eng.kernel_note
    assert records.lines == [f"CPU engine: {eng.kernel_note}"]
    assert Engine(H, In, E, "silu_glu", True, "int4", 32, [[0]], max_tokens=4).kernel_note == ""


def test_grouped_reference_agrees_with_loop():
    """The test's own grouped reference equals the literal per-(token, k) definition."""
    gen = torch.Generator().manual_seed(1)
    shards, dense = make_shards("int4", 6, 64, 64, 2, True, 32, gen)
    ids, w = route(5, 2, 6, gen, skip=True)
    x = torch.randn(5, 64, generator=gen)
    a = reference(x, ids, w, dense, "silu_glu", True)
    b = reference_fast(x, ids, w, dense, "silu_glu", True)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ["int4", "bf16"])
def test_portable_reference_kernel_matches(fmt):
    """The 'ref' kernel table (every ISA falls back to it) gives the same results as the default one."""
    gen = torch.Generator().manual_seed(7)
    H, In, E, k = 128, 96, 8, 2
    shards, dense = make_shards(fmt, E, H, In, 1, True, 32, gen)
    outs = []
    ids, w = route(9, k, E, gen, skip=True)
    x = torch.randn(9, H, generator=gen)
    for isa in ("ref", ""):
        eng = Engine(H, In, E, "silu_glu", True, fmt, 32, [[0]], 16, isa=isa)
        eng.load_layer(0, shards)
        out = torch.full((9, H), float("nan"))
        eng.forward(0, x, ids, w, out)
        check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, tolerance(eng, fmt, torch.float32))
        outs.append(out)
    if tolerance(eng, fmt, torch.float32) < 1e-3:
        assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def small_engine(fmt="int4", **kw):
    gen = torch.Generator().manual_seed(3)
    H, In, E = 64, 64, 4
    shards, dense = make_shards(fmt, E, H, In, 1, True, 32, gen)
    eng = Engine(H, In, E, "silu_glu", True, fmt, 32, kw.get("nodes", [[0, 1]]), max_tokens=8,
                 spin_us=kw.get("spin_us", SPIN_US_SHARED_CPUS))
    eng.load_layer(0, shards)
    return eng, shards, dense


def small_forward_checked(eng, dense, T, gen):
    """One forward of small_engine's layer on T random tokens, checked against the reference."""
    ids, w = route(T, 2, 4, gen, skip=False)
    x = torch.randn(T, 64, generator=gen)
    out = torch.full((T, 64), float("nan"))
    eng.forward(0, x, ids, w, out)
    check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, tolerance(eng, "int4", torch.float32))


def test_async_submit_wait_and_numpy():
    eng, shards, dense = small_engine()
    gen = torch.Generator().manual_seed(5)
    ids, w = route(6, 2, 4, gen, skip=False)
    x = torch.randn(6, 64, generator=gen)
    ref = reference_fast(x, ids, w, dense, "silu_glu", True)
    out = torch.full((6, 64), float("nan"))
    eng.submit(0, x, ids, w, out)
    eng.wait()
    check_close(out, ref, ids, tolerance(eng, "int4", torch.float32))
    out_np = np.full((6, 64), np.nan, dtype=np.float32)
    eng.forward(0, x.numpy(), ids.numpy(), w.numpy(), out_np)
    check_close(torch.from_numpy(out_np), ref, ids, tolerance(eng, "int4", torch.float32))
    # numpy shards: bf16 as uint16 bits
    np_shards = [{k: (v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 else v.numpy())
                  for k, v in shards[0].items()}]
    eng.load_layer(1, np_shards)
    out2 = torch.full((6, 64), float("nan"))
    eng.forward(1, x, ids, w, out2)
    assert torch.equal(out, out2)


def test_c_callback_pointers_drive_a_forward():
    eng, _, dense = small_engine()
    gen = torch.Generator().manual_seed(6)
    ids, w = route(3, 2, 4, gen, skip=False)
    x = torch.randn(3, 64, generator=gen)
    out = torch.full((3, 64), float("nan"))
    submit_fn, wait_fn, ctx = eng.arm(0, x, ids, w, out)
    proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    proto(submit_fn)(ctx)
    proto(wait_fn)(ctx)
    eng.wait()
    check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, tolerance(eng, "int4", torch.float32))


def test_forward_from_two_threads():
    """Blocking forwards from several host threads take turns (the GIL is released inside)."""
    eng, _, dense = small_engine()
    gen = torch.Generator().manual_seed(8)
    jobs = []
    for _ in range(2):
        ids, w = route(5, 2, 4, gen, skip=False)
        x = torch.randn(5, 64, generator=gen)
        jobs.append((x, ids, w, reference_fast(x, ids, w, dense, "silu_glu", True)))
    errors = []

    def worker(x, ids, w, ref):
        try:
            for _ in range(30):
                out = torch.full((5, 64), float("nan"))
                eng.forward(0, x, ids, w, out)
                check_close(out, ref, ids, tolerance(eng, "int4", torch.float32))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("spin_us", [0, 5000])
def test_spin_time_and_trace(spin_us):
    """Workers that sleep at once (0) or spin through the gap (5 ms) give the same result; the last forward's
    timeline has every thread's phase ends in order, after its launch."""
    eng, _, dense = small_engine(spin_us=spin_us)
    assert eng.last_trace() == {"threads": [], "routing_us": None}
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        small_forward_checked(eng, dense, 4, gen)
        tr = eng.last_trace()
        assert len(tr["threads"]) == 2 and tr["routing_us"] >= 0
        for row in tr["threads"]:
            assert len(row) == 7 and row[0] >= 0 and row == sorted(row), row
        time.sleep(0.002)


def test_late_worker_does_not_hold_the_forward():
    """A worker kept off its cpu (nice 10 there behind a busy process) finds its share of a forward taken by the other
    worker: forwards come back correct without waiting for it, and its trace starts after the forward's work was done
    (with phase barriers it could never start after the others ended)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two cpus")
    eng, _, dense = small_engine(nodes=[[cpus[0], cpus[1]]], spin_us=0)
    late_tid = next(int(t) for t in os.listdir("/proc/self/task")
                    if open(f"/proc/self/task/{t}/comm").read().strip() == "lvllm-n0t1")
    busy = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpus[1]}}})\nwhile True: pass"])
    gen = torch.Generator().manual_seed(13)
    late = 0
    try:
        os.setpriority(os.PRIO_PROCESS, late_tid, 10)
        time.sleep(0.2)  # the busy process is up and on its cpu
        for _ in range(30):
            small_forward_checked(eng, dense, 3, gen)
            first, second = eng.last_trace()["threads"]  # waits for the late worker to run through
            late += second[0] > first[6]
            if late >= 3:
                break
    finally:
        busy.kill()
        busy.wait()
        os.setpriority(os.PRIO_PROCESS, late_tid, 0)
    assert late >= 3, f"the worker behind the busy process was late in {late} of 30 forwards"


def test_keep_other_threads_off():
    """Every thread but the engine's workers leaves the engine's cpus (threads started later inherit that)."""
    everything = os.sched_getaffinity(0)
    if len(everything) < 2:
        pytest.skip("needs two cpus")
    cpu = max(everything)
    eng, _, dense = small_engine(nodes=[[cpu]])
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    try:
        assert keep_other_threads_off([cpu]) >= 2
        assert os.sched_getaffinity(0) == everything - {cpu}
        assert os.sched_getaffinity(other.native_id) == everything - {cpu}
        workers = [t for t in tasks if open(f"/proc/self/task/{t}/comm").read().startswith("lvllm-n")]
        assert workers and all(os.sched_getaffinity(t) == {cpu} for t in workers)
        seen = []
        later = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert seen == [everything - {cpu}]
        ids, w = torch.tensor([[0, 3]], dtype=torch.int32), torch.ones(1, 2)
        x, out = torch.randn(1, 64), torch.full((1, 64), float("nan"))
        eng.forward(0, x, ids, w, out)
        check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, tolerance(eng, "int4", torch.float32))
    finally:
        stop.set()
        other.join()
        for t in tasks:
            try:
                os.sched_setaffinity(t, everything)
            except OSError:
                pass
        del eng


def test_unpinnable_cpu_is_not_an_error():
    eng, _, dense = small_engine(nodes=[[0, 4095]])
    assert eng.pin_failures == 1
    ids = torch.tensor([[0, 3]], dtype=torch.int32)
    w = torch.ones(1, 2)
    x = torch.randn(1, 64)
    out = torch.full((1, 64), float("nan"))
    eng.forward(0, x, ids, w, out)
    check_close(out, reference_fast(x, ids, w, dense, "silu_glu", True), ids, tolerance(eng, "int4", torch.float32))


# ---- bad input: one clear exception, never a crash ------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=96, intermediate_size=96, group_size=64), "divisible by group_size"),
    (dict(hidden_size=100), "multiple of 32"),
    (dict(group_size=12), "not a positive multiple of 8"),
    (dict(activation="relu2"), "pass gated=False"),
    (dict(activation="swish"), "unknown"),
    (dict(weight_format="fp8"), "unknown"),
    (dict(nodes=[]), "at least one node"),
    (dict(nodes=[[0], []]), "has no cpus"),
    (dict(nodes=[[-1]]), "negative"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(num_experts=0), "num_experts"),
    (dict(spin_us=-1), "spin_us"),
])
def test_bad_construction(kwargs, match):
    args = dict(hidden_size=64, intermediate_size=64, num_experts=4, activation="silu_glu", gated=True,
                weight_format="int4", group_size=32, nodes=[[0]], max_tokens=8)
    args.update(kwargs)
    with pytest.raises(BadInput, match=match):
        Engine(**args)


def test_unavailable_isa_is_engine_error():
    missing = [i for i in ("amx", "avx512", "avx2") if i not in Engine.available_isas()]
    if not missing:
        pytest.skip("this CPU runs every kernel table")
    with pytest.raises(EngineError, match="not available"):
        Engine(64, 64, 4, "silu_glu", True, "int4", 32, [[0]], 8, isa=missing[0])


def test_bad_shards():
    eng, shards, _ = small_engine()
    sh = shards[0]
    bad = [
        ([], "1 nodes"),
        ([{k: v for k, v in sh.items() if k != "w2.scale"}], "missing key 'w2.scale'"),
        ([dict(sh, **{"w13.packed": sh["w13.packed"][:, :, :4]})], r"w13.packed has shape \[4, 128, 4\], expected \[4, 128, 8\]"),
        ([dict(sh, **{"w13.packed": sh["w13.packed"].float()})], "w13.packed has dtype float32, expected int32"),
        ([dict(sh, **{"w2.packed": sh["w2.packed"].transpose(1, 2).contiguous().transpose(1, 2)})], "not C-contiguous"),
        ([dict(sh, **{"w2.scale": [1, 2, 3]})], "not an array"),
        (["nope"], "not a dict"),
    ]
    for shard_list, match in bad:
        with pytest.raises(BadInput, match=match):
            eng.load_layer(0, shard_list)


def test_bad_forward_inputs():
    eng, _, _ = small_engine()
    x = torch.randn(2, 64)
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    w = torch.ones(2, 2)
    out = torch.zeros(2, 64)
    bad = [
        (dict(layer=9), "layer 9 is not loaded"),
        (dict(x=torch.randn(9, 64), ids=ids.repeat(5, 1)[:9], w=torch.ones(9, 2), out=torch.zeros(9, 64)), "over max_tokens=8"),
        (dict(ids=torch.tensor([[0, 4], [2, 3]], dtype=torch.int32)), r"topk_ids\[0, 1\] = 4 is outside \[-1, 4\)"),
        (dict(ids=torch.tensor([[0, 1], [-2, 3]])), r"topk_ids\[1, 0\] = -2"),
        (dict(ids=ids.float()), "topk_ids has dtype float32"),
        (dict(w=torch.ones(2, 3)), "topk_weights has shape"),
        (dict(w=torch.ones(2, 2, dtype=torch.float64)), "unsupported dtype|expected float32"),
        (dict(out=torch.zeros(2, 64, dtype=torch.bfloat16)), "give out the hidden dtype"),
        (dict(x=torch.randn(2, 32)), r"hidden has shape \[2, 32\]"),
        (dict(x=torch.randn(64, 2).T), "not C-contiguous"),
        (dict(out=x), "must not alias"),
        (dict(ids=torch.zeros(2, 5, dtype=torch.int32), w=torch.ones(2, 5)), r"top-k=5 must be in \[1, num_experts=4\]"),
        (dict(ids=[[0, 1], [2, 3]]), "torch tensor or numpy|incompatible|not an array|dlpack|DLPack"),
    ]
    for over, match in bad:
        a = dict(layer=0, x=x, ids=ids, w=w, out=out)
        a.update(over)
        with pytest.raises(BadInput, match=match):
            eng.forward(a["layer"], a["x"], a["ids"], a["w"], a["out"])
    eng.forward(0, x, ids, w, out)  # the engine is still usable after every refusal
    assert not torch.isnan(out).any()
    empty = torch.zeros(0, 64)
    eng.forward(0, empty, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2), torch.zeros(0, 64))  # T=0: no-op


# ---- expert biases (gpt-oss; CONTRACTS2.md): w13.bias in every node's shard, w2.bias only in node 0's ----------


def add_biases(shards, E, H, dtype, gen):
    """Adds w13.bias [E, R] to every shard and w2.bias [E, H] to node 0's; returns their f64 values per node."""
    out = []
    for n, sh in enumerate(shards):
        R = (sh["w13.packed"] if "w13.packed" in sh else sh["w13"]).shape[1]
        b13 = (torch.randn(E, R, generator=gen) * 0.5).to(dtype)
        sh["w13.bias"] = b13
        b2 = None
        if n == 0:
            b2 = (torch.randn(E, H, generator=gen) * 0.5).to(dtype)
            sh["w2.bias"] = b2
        out.append((b13.double(), None if b2 is None else b2.double()))
    return out


def numpy_shard(sh):
    """torch shard -> numpy (bf16 as uint16 bits, numpy has no bfloat16)."""
    return {k: v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in sh.items()}


@pytest.mark.parametrize("fmt, activation, bias_dtype, lib", [
    ("int4", "gptoss_glu", torch.bfloat16, "torch"),
    ("int4", "relu2", torch.float32, "numpy"),
    ("bf16", "gptoss_glu", torch.float32, "torch"),
    ("bf16", "silu_glu", torch.bfloat16, "numpy"),
])
@pytest.mark.parametrize("isa", ISAS + ["ref"])
def test_expert_biases(fmt, activation, bias_dtype, lib, isa):
    """out[t] = sum_j w_tj (W2 act(W13 x + b13) + b2), over 2 nodes with -1 ids; b2 counted once (node 0 only)."""
    gated = activation != "relu2"
    E, H, In, k, g = 6, 96, 64, 2, 32
    gen = torch.Generator().manual_seed(11)
    shards, dense = make_shards(fmt, E, H, In, 2, gated, g, gen)
    biases = add_biases(shards, E, H, bias_dtype, gen)
    eng = Engine(H, In, E, activation, gated, fmt, g, [[0], [1]], max_tokens=40, isa=isa)
    eng.load_layer(2, [numpy_shard(sh) for sh in shards] if lib == "numpy" else shards)
    for T in (1, 3, 40):
        ids, w = route(T, k, E, gen, skip=T > 1)
        x = torch.randn(T, H, generator=gen)
        out = torch.full((T, H), float("nan"))
        eng.forward(2, x, ids, w, out)
        check_close(out, reference_fast(x, ids, w, dense, activation, gated, biases=biases), ids,
                    tolerance(eng, fmt, torch.float32))
    # Without its biases the same layer gives the bias-free reference (absent keys = zero bias).
    eng.load_layer(3, [{k: v for k, v in sh.items() if not k.endswith(".bias")} for sh in shards])
    out = torch.full((T, H), float("nan"))
    eng.forward(3, x, ids, w, out)
    check_close(out, reference_fast(x, ids, w, dense, activation, gated), ids, tolerance(eng, fmt, torch.float32))


def test_bad_biases():
    E, H, In = 4, 64, 64
    gen = torch.Generator().manual_seed(12)
    shards, _ = make_shards("int4", E, H, In, 2, True, 32, gen)
    add_biases(shards, E, H, torch.bfloat16, gen)
    eng = Engine(H, In, E, "silu_glu", True, "int4", 32, [[0], [1]], max_tokens=4)
    s0, s1 = shards
    bad = [
        ([dict(s0, **{"w13.bias": s0["w13.bias"][:, :64]}), s1], r"shard 0 w13.bias has shape \[4, 64\], expected \[4, 128\]"),
        ([dict(s0, **{"w2.bias": s0["w2.bias"].T.contiguous()[:, :4]}), s1], r"w2.bias has shape \[64, 4\], expected \[4, 64\]"),
        ([dict(s0, **{"w13.bias": s0["w13.bias"].to(torch.int32)}), s1], "w13.bias has dtype int32, expected float32 or bfloat16"),
        ([s0, dict(s1, **{"w2.bias": s0["w2.bias"]})], "shard 1 has w2.bias: it belongs in node 0's shard only"),
        ([dict(s0, **{"w13.bais": s0["w13.bias"]}), s1], "shard 0 has unknown key 'w13.bais'"),
    ]
    for shard_list, match in bad:
        with pytest.raises(BadInput, match=match) as e:
            eng.load_layer(0, shard_list)
        assert "\n" not in str(e.value)
    eng.load_layer(0, shards)  # still usable, and the good shards load
