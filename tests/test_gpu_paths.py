"""The GPU paths' arithmetic and plumbing on the CPU (CI has no GPU; bench/gpu_hybrid.py proves them on the H100 box).

- dequant_int4_bf16 + grouped_experts (the GPU prefill and hot-expert computation) against the C++ engine and a
  float64 reference on the same random INT4 layer;
- the decode step's host call (csrc/hostfn.cpp, the C function a CUDA graph's host node runs) called directly, with
  hot experts split off, against the same reference over fresh routings;
- StreamedPrefill over several layers, INT4 and BF16 stores, one and two node slices (on the CPU nothing streams;
  on CUDA the same test streams from registered host memory);
- the CUDA-only pieces (cudaLaunchHostFunc, graph capture, Triton dequant) run only where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch

from lvllm_runtime.cuda_graph_step import CpuStep, HostCall, HybridDecodeLayer, StepBuffers, hot_experts, shared_steps
from lvllm_runtime.engine import Engine
from lvllm_runtime.errors import BadInput, EngineError
from lvllm_runtime.gpu_prefill import LayerShape, StreamedPrefill, dequant_int4_bf16, grouped_experts
from lvllm_runtime.hybrid import HybridMoE, LayerWeights, join_node_slices
from lvllm_runtime.quant import dequantize_int4

H, I, E, K, G = 128, 64, 8, 2, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_layer(gen: torch.Generator, nodes: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random INT4 store shards (random nibbles, random bf16 scales), one dict per node of In = I / nodes."""
    In = I // nodes
    out = []
    for _ in range(nodes):
        def packed(*shape):
            return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)

        out.append({
            "w13.packed": packed(E, 2 * In, H // 8),
            "w13.scale": ((torch.rand(E, 2 * In, H // G, generator=gen) + 0.5) / (4.6 * H**0.5)).bfloat16(),
            "w2.packed": packed(E, H, In // 8),
            "w2.scale": ((torch.rand(E, H, In // G, generator=gen) + 0.5) / (4.6 * I**0.5)).bfloat16(),
        })
    return out


def routing(gen: torch.Generator, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]).to(torch.int32)
    w = torch.softmax(torch.randn(t, K, generator=gen), -1)
    return w, ids


def reference(hidden, w, ids, layer: LayerWeights) -> torch.Tensor:
    """float64 reference over the dequantized weights, looped over tokens and picks."""
    t = layer.tensors
    if layer.weight_format == "bf16":
        w13, w2 = t["w13"].double(), t["w2"].double()
    else:
        w13 = dequantize_int4(t["w13.packed"], t["w13.scale"], G).double()
        w2 = dequantize_int4(t["w2.packed"], t["w2.scale"], G).double()
    x = hidden.double()
    out = torch.zeros_like(x)
    for ti in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[ti, j])
            if e < 0:
                continue
            g, u = (w13[e] @ x[ti]).chunk(2)
            out[ti] += float(w[ti, j]) * (w2[e] @ (torch.nn.functional.silu(g) * u))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_engine(shards, max_tokens=64) -> Engine:
    eng = Engine(H, I // len(shards), E, "silu_glu", True, "int4", G, [[0]] * len(shards), max_tokens)
    eng.load_layer(0, shards)
    return eng


def test_dequant_bf16_matches_quant():
    gen = torch.Generator().manual_seed(1)
    s = random_layer(gen)[0]
    got = dequant_int4_bf16(s["w13.packed"], s["w13.scale"], G)
    want = dequantize_int4(s["w13.packed"], s["w13.scale"], G)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel(got, want) < 4e-3  # bf16 rounding of q*scale only


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_grouped_experts_equals_engine_and_reference(tokens):
    gen = torch.Generator().manual_seed(tokens)
    shards = random_layer(gen)
    layer = LayerWeights(shards[0], "int4", G)
    eng = make_engine(shards)
    hidden = torch.randn(tokens, H, generator=gen).bfloat16()
    w, ids = routing(gen, tokens)
    ids[0, -1] = -1  # a skipped slot
    ref = reference(hidden, w, ids, layer)
    w13 = dequant_int4_bf16(shards[0]["w13.packed"], shards[0]["w13.scale"], G)
    w2 = dequant_int4_bf16(shards[0]["w2.packed"], shards[0]["w2.scale"], G)
    got = grouped_experts(hidden, w, ids, w13, w2, "silu_glu", True)
    out = torch.full((tokens, H), float("nan")).bfloat16()
    eng.forward(0, hidden, ids, w, out)
    assert torch.isfinite(got).all() and torch.isfinite(out.float()).all()
    assert rel(got, ref) < 1.5e-2
    assert rel(out, ref) < 1.5e-2
    assert rel(got, out.float()) < 2e-2


def test_grouped_experts_hot_subset_and_empty():
    gen = torch.Generator().manual_seed(7)
    shards = random_layer(gen)
    layer = LayerWeights(shards[0], "int4", G)
    hot = [1, 4, 6]
    sel = layer.select(hot)
    slot = torch.full((E,), -1, dtype=torch.long)
    slot[torch.tensor(hot)] = torch.arange(len(hot))
    hidden = torch.randn(6, H, generator=gen).bfloat16()
    w, ids = routing(gen, 6)
    w13 = dequant_int4_bf16(sel.tensors["w13.packed"], sel.tensors["w13.scale"], G)
    w2 = dequant_int4_bf16(sel.tensors["w2.packed"], sel.tensors["w2.scale"], G)
    got = grouped_experts(hidden, w, ids, w13, w2, "silu_glu", True, slot)
    hot_ids = torch.where(slot[ids.long()] >= 0, ids, -1)
    assert rel(got, reference(hidden, w, hot_ids, layer)) < 1.5e-2
    none = torch.full_like(ids, -1)
    assert torch.equal(grouped_experts(hidden, w, none, w13, w2, "silu_glu", True, slot), torch.zeros(6, H))


@pytest.mark.parametrize("nodes", [1, 2])
def test_decode_step_hostcall_with_hot_experts(nodes):
    """The host node's C function (called directly here) + hot experts == reference, over fresh routings."""
    gen = torch.Generator().manual_seed(10 + nodes)
    shards = random_layer(gen, nodes)
    from lvllm_runtime.hybrid import join_node_slices

    layer = join_node_slices(shards, "int4", True, G)
    eng = make_engine(shards)
    steps = {t: CpuStep(eng, [0], t, H, K, torch.bfloat16, "cpu") for t in (1, 4)}
    dec = HybridDecodeLayer(0, steps, "silu_glu", True, hot_experts(layer, [0, 3], E, "cpu"))
    for step in range(6):
        t = (1, 4)[step % 2]
        hidden = torch.randn(t, H, generator=gen).bfloat16()
        w, ids = routing(gen, t)
        got = dec(hidden, w, ids)
        assert got.shape == (t, H) and got.dtype == torch.bfloat16
        assert rel(got, reference(hidden, w, ids, layer)) < 2e-2
    assert steps[1].calls[0].last_run()[1] == 3 and steps[4].calls[0].last_run()[1] == 3


def test_shared_steps_serve_every_size_from_one_buffer_set():
    """The plugin's CUDA bookkeeping, run on the CPU: one max-size buffer set, a step per batch size viewing its leading
    rows, host calls added layer by layer; HybridMoE takes the step path for those sizes and the blocking path for the
    others, and both equal the reference (hot experts on the grouped-GEMM path either way)."""
    gen = torch.Generator().manual_seed(21)
    layers = {L: random_layer(gen, 2) for L in (3, 7)}
    eng = Engine(H, I // 2, E, "silu_glu", True, "int4", G, [[0], [0]], 16)
    sizes = (1, 2, 3, 5)
    steps = shared_steps(eng, [], sizes, H, K, torch.bfloat16, "cpu")
    moe = {}
    for L, shards in layers.items():
        eng.load_layer(L, shards)
        for step in steps.values():
            step.add_layer(L)
        hot = hot_experts(join_node_slices(shards, "int4", True, G), [1, 6], E, "cpu")
        moe[L] = HybridMoE(L, eng, HybridDecodeLayer(L, steps, "silu_glu", True, hot))
    base = steps[5].buffers
    for t, step in steps.items():
        assert step.buffers is base and step.h_pin.data_ptr() == base.h_pin.data_ptr()
        assert step.out_pin.data_ptr() == base.out_pin.data_ptr() and step.h_pin.shape == (t, H)
        assert sorted(step.calls) == [3, 7]
    for t in (1, 4, 3, 6, 5, 2):
        hidden = torch.randn(t, H, generator=gen).bfloat16()
        w, ids = routing(gen, t)
        for L in (3, 7):
            before = {s: step.calls[L].last_run()[1] for s, step in steps.items()}
            got = moe[L].forward(hidden, w, ids)
            assert got.shape == (t, H) and got.dtype == torch.bfloat16
            assert rel(got, reference(hidden, w, ids, join_node_slices(layers[L], "int4", True, G))) < 2e-2
            runs = {s: step.calls[L].last_run()[1] - before[s] for s, step in steps.items()}
            assert moe[L].uses_decode_step(t) == (t in sizes)
            assert runs == {s: int(s == t) for s in sizes}  # only the step of this exact size ran, once
    with pytest.raises(ValueError, match="cannot hold"):
        CpuStep(eng, [3], 6, H, K, torch.bfloat16, "cpu", base)
    with pytest.raises(ValueError, match="cannot hold"):
        CpuStep(eng, [3], 2, H, K, torch.float32, "cpu", StepBuffers(4, H, K, torch.bfloat16, "cpu"))


def test_hybrid_moe_all_hot_decode_needs_no_engine():
    gen = torch.Generator().manual_seed(22)
    layer = LayerWeights(random_layer(gen)[0], "int4", G)
    dec = HybridDecodeLayer(0, {}, "silu_glu", True, hot_experts(layer, list(range(E)), E, "cpu"))
    moe = HybridMoE(0, None, dec)
    hidden = torch.randn(3, H, generator=gen).bfloat16()
    w, ids = routing(gen, 3)
    assert moe.all_hot and not moe.uses_decode_step(3)
    assert rel(moe.forward(hidden, w, ids), reference(hidden, w, ids, layer)) < 2e-2
    with pytest.raises(ValueError, match="cold experts need an engine"):
        HybridMoE(0, None, HybridDecodeLayer(0, {}, "silu_glu", True, hot_experts(layer, [0], E, "cpu")))


def test_hot_experts_from_store_formats():
    gen = torch.Generator().manual_seed(4)
    layer = LayerWeights(random_layer(gen)[0], "int4", G)
    hot = hot_experts(layer, [5, 2], E, "cpu")
    w13, w2, slot = hot.w13, hot.w2, hot.slot
    assert slot.tolist() == [-1, -1, 1, -1, -1, 0, -1, -1]
    assert torch.equal(w13[1], dequant_int4_bf16(layer.tensors["w13.packed"][2], layer.tensors["w13.scale"][2], G))
    assert w2.shape == (2, H, I) and w2.dtype == torch.bfloat16
    bf = LayerWeights({"w13": torch.randn(E, 2 * I, H, generator=gen), "w2": torch.randn(E, H, I, generator=gen)}, "bf16")
    one = hot_experts(bf, [7], E, "cpu")
    assert torch.equal(one.w13[0], bf.tensors["w13"][7].bfloat16()) and one.b13 is None
    assert hot_experts(layer, [], E, "cpu") is None


def test_hostcall_reports_engine_errors_and_checks_buffers(capfd):
    gen = torch.Generator().manual_seed(3)
    eng = make_engine(random_layer(gen))
    h, ids, w, out = (torch.zeros(2, H).bfloat16(), torch.zeros(2, K, dtype=torch.int32), torch.zeros(2, K),
                      torch.zeros(2, H).bfloat16())
    with pytest.raises(BadInput):
        HostCall(eng, 0, h, ids, w, torch.zeros(2, H))  # out dtype differs from hidden
    call = HostCall(eng, 5, h, ids, w, out)  # layer 5 was never loaded: the callback must not crash
    call()
    # inside a replayed graph nobody calls check(): the failure is on stderr and in the output
    assert "host callback failed (layer 5): layer 5 is not loaded" in capfd.readouterr().err
    assert out.float().isnan().all()
    with pytest.raises(EngineError, match="layer 5 is not loaded"):
        call.check()
    call.check()  # the error was taken


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bf16_shards(shards: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The same weights as a BF16 store's node slices."""
    return [{"w13": dequantize_int4(s["w13.packed"], s["w13.scale"], G).bfloat16(),
             "w2": dequantize_int4(s["w2.packed"], s["w2.scale"], G).bfloat16()} for s in shards]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,nodes,chunk", [("int4", 1, None), ("int4", 2, None), ("bf16", 2, None), ("int4", 2, 3)])
def test_streamed_prefill_over_layers(device, fmt, nodes, chunk, monkeypatch):
    """The one prefill path: every layer, in order and out of order, equals the reference on its own weights; an
    INT4 slice larger than the dequantization buffer cap goes in expert chunks (here 3 experts: E=8 is 3+3+2)."""
    from lvllm_runtime import model_sizes

    if chunk:
        monkeypatch.setattr(model_sizes, "DEQUANT_BUFFER_CAP", chunk * 2 * (2 * (I // nodes) * H + H * (I // nodes)))
    gen = torch.Generator().manual_seed(5)
    layers = {L: random_layer(gen, nodes) for L in (0, 1, 2)}
    if fmt == "bf16":
        layers = {L: bf16_shards(s) for L, s in layers.items()}
    sp = StreamedPrefill(LayerShape(fmt, G if fmt == "int4" else None, True, "silu_glu"), device, window=1)
    for L, shards in layers.items():
        sp.add_layer(L, shards)
    assert sp.layer_bytes == sum(v.numel() * v.element_size() for s in layers[0] for v in s.values())
    if fmt == "int4":
        assert sp.chunk == (chunk or E) and sp.w13.shape[0] == sp.chunk
    hidden = torch.randn(33, H, generator=gen).bfloat16()
    w, ids = routing(gen, 33)
    try:
        for L in (0, 1, 2, 1, 0, 2):
            got = sp.forward(L, hidden.to(device), w.to(device), ids.to(device)).cpu()
            full = join_node_slices(layers[L], fmt, True, G if fmt == "int4" else None)
            ref = reference(hidden, w, ids, full)
            assert rel(got, ref) < 1.5e-2, (L, rel(got, ref))
    finally:
        sp.close()


def test_pinned_spans_cover_the_tensors_pages_and_never_a_gap():
    """What GPU prefill page-locks: each tensor's pages, touching ones merged, the memory between two apart not."""
    from lvllm_runtime.host_pinning import _PAGE, spans

    buf = torch.empty(16 * _PAGE, dtype=torch.uint8)
    base = -(-buf.data_ptr() // _PAGE) * _PAGE - buf.data_ptr()  # first page boundary inside buf
    a, b = buf[base:base + 100], buf[base + 100:base + _PAGE + 1]  # back to back, b ends 1 byte into page 2
    c = buf[base + 5 * _PAGE + 7:base + 6 * _PAGE]  # apart: pages 5
    p0 = buf.data_ptr() + base
    assert spans([c, a, b]) == [(p0, p0 + 2 * _PAGE), (p0 + 5 * _PAGE, p0 + 6 * _PAGE)]
    assert spans([buf[:0]]) == []


def test_streamed_prefill_refuses_shards_of_another_format():
    bf16 = {"w13": torch.zeros(E, 2 * I, H).bfloat16(), "w2": torch.zeros(E, H, I).bfloat16()}
    sp = StreamedPrefill(LayerShape("int4", G, True, "silu_glu"), "cpu")
    with pytest.raises(BadInput, match="int4 store"):
        sp.add_layer(0, [bf16])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU (bench/gpu_hybrid.py)")
def test_graph_replay_equals_eager_on_cuda():
    gen = torch.Generator().manual_seed(9)
    shards = random_layer(gen)
    eng = make_engine(shards)
    steps = {2: CpuStep(eng, [0], 2, H, K, torch.bfloat16, "cuda")}
    dec = HybridDecodeLayer(0, steps, "silu_glu", True)
    from lvllm_runtime.cuda_graph_step import capture

    x = torch.zeros(2, H, dtype=torch.bfloat16, device="cuda")
    w = torch.zeros(2, K, device="cuda")
    ids = torch.zeros(2, K, dtype=torch.int32, device="cuda")
    graph, out = capture(lambda: dec(x, w, ids))
    for _ in range(4):
        hw, hi = routing(gen, 2)
        x.copy_(torch.randn(2, H, generator=gen).bfloat16())
        w.copy_(hw)
        ids.copy_(hi)
        graph.replay()
        torch.cuda.synchronize()
        steps[2].check()
        assert rel(out.cpu(), dec(x, w, ids).cpu()) < 1e-6
