"""The hybrid runtime assembled as `lvllm serve` assembles it, without vLLM: plan + store -> HybridRuntime -> one
HybridMoE per MoE layer, run inside a transformers model in place of its routed experts, against the same transformers
model holding the store's dequantized weights (an independent reference: transformers' own expert code), teacher-forced
over a fixed token sequence. Every path the runtime has: engine only, hot + engine over two node slices, the
whole-layer (GPU-prefill) path, every expert hot; and the checks that fail before any weight is read."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from lvllm_runtime import hybrid_runtime as hr
from lvllm_runtime.errors import StoreError
from lvllm_runtime.plan import RuntimePlan
from lvllm_runtime.quantize import QuantizeOptions, quantize
from lvllm_runtime.store import ExpertStore
from vllm_harness import make_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQ = 24


@pytest.fixture(scope="module")
def model_and_stores(zoo, tmp_path_factory):
    src = zoo("qwen3_moe", "bf16")
    root = tmp_path_factory.mktemp("runtime_stores")
    stores = {}
    for fmt, nodes in (("int4", 1), ("int4", 2), ("bf16", 1)):
        stores[fmt, nodes] = root / f"{fmt}x{nodes}"
        quantize(src, stores[fmt, nodes], QuantizeOptions(weight_format=fmt, numa_nodes=nodes, workers=1))
    return src, stores


class _RuntimeExperts(torch.nn.Module):
    """Stands where transformers' experts module stood: (hidden, top_k_index, top_k_weights) -> the runtime's layer."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.moe.forward(hidden, top_k_weights.float(), top_k_index.to(torch.int32))


def _model(src, store_dir):
    """transformers' model in f32 with every routed expert replaced by its dequantized store copy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    store = ExpertStore.open(store_dir)
    with torch.no_grad():
        for L in store.manifest.moe_layers:
            experts = model.model.layers[L].mlp.experts
            for e in range(store.manifest.num_experts):
                w13, w2 = store.expert(L, e)
                experts.gate_up_proj[e].copy_(w13)
                experts.down_proj[e].copy_(w2)
    return model


def _resident_store_bytes(store_dir) -> int:
    """Resident bytes of this process's mappings of files in `store_dir` (/proc/self/smaps)."""
    root, total, inside = os.path.realpath(store_dir) + os.sep, 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.split()[-1].startswith(root)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].double(), dim=-1)


CASES = {
    "engine": (("int4", 1), {}, None),
    "hot+engine, 2 node slices": (("int4", 2), {"hot": {0: [0, 3, 5]}}, None),
    "whole layer int4": (("int4", 1), {}, 1),
    "whole layer bf16": (("bf16", 1), {}, 1),
    "all hot": (("bf16", 1), {"hot": "all"}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_in_transformers_equals_transformers_on_store_weights(model_and_stores, case):
    src, stores = model_and_stores
    kind, opts, prefill_min = CASES[case]
    store_dir = stores[kind]
    m = ExpertStore.open(store_dir).manifest
    hot = opts.get("hot", {})
    if hot == "all":
        hot = {L: list(range(m.num_experts)) for L in m.moe_layers}
    plan = make_plan(src, store_dir, hot=hot)
    plan["runtime"]["gpu_prefill_min_tokens"] = prefill_min
    plan["runtime"]["max_batch_tokens"] = SEQ

    rt = hr.HybridRuntime.open(RuntimePlan.from_dict(plan), hr.Placement(torch.device("cpu"), top_k=2,
                                                                          dtype=torch.float32), src)
    assert (rt.engine is None) == (case == "all hot") and (rt.prefill is not None) == (prefill_min is not None)
    layers = rt.load_all()
    want_path = {"engine": "engine", "hot+engine, 2 node slices": "engine", "all hot": "hot"}.get(case, "gpu_prefill")
    assert {moe.path(SEQ) for moe in layers.values()} == {want_path}
    # one host copy: the engine's (or the hot experts'); the store pages stay resident only for the whole-layer path,
    # which streams from them
    resident = _resident_store_bytes(store_dir)
    assert (resident > 0) if prefill_min is not None else (resident == 0), resident

    reference = _model(src, store_dir)
    served = _model(src, store_dir)
    for L, moe in layers.items():
        served.model.layers[L].mlp.experts = _RuntimeExperts(moe)
    ids = torch.randint(0, served.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    p, q = _logprobs(reference, ids), _logprobs(served, ids)
    kl = (p.exp() * (p - q)).sum(-1)
    top2 = p.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05
    print(f"{case}: KL max {kl.max():.2e} mean {kl.mean():.2e}; {int(clear.sum())} positions with a clear top-1")
    # f32 everywhere; the engine's int8 activations (INT4 stores) are its only rounding (tests/vllm_harness.py's floor)
    assert float(kl.max()) < (1e-4 if kind[0] == "int4" and prefill_min is None else 1e-6)
    assert clear.sum() > SEQ // 2 and torch.equal(p.argmax(-1)[clear], q.argmax(-1)[clear])


def test_checks_fail_before_any_weight_is_read(model_and_stores, monkeypatch):
    src, stores = model_and_stores
    plan = make_plan(src, stores["int4", 1])
    place = hr.Placement(torch.device("cpu"), top_k=2)
    other = RuntimePlan.from_dict({**plan, "store": {**plan["store"], "numa_nodes": 2}})
    with pytest.raises(StoreError, match="split for 2 nodes"):
        hr.HybridRuntime.open(other, place)
    with pytest.raises(StoreError, match="tensor-parallel size 1, vLLM runs 2"):
        hr.HybridRuntime.open(RuntimePlan.from_dict(plan), hr.Placement(torch.device("cpu"), top_k=2, tp_size=2))
    with pytest.raises(StoreError, match="another model"):
        hr.HybridRuntime.open(RuntimePlan.from_dict(plan), place, model_dir=_other(src))
    read = []
    monkeypatch.setattr(ExpertStore, "layer", lambda *a: read.append(a))
    hr.HybridRuntime.open(RuntimePlan.from_dict(plan), place)  # building reads no weight; load_layer does
    assert read == []


def _other(src):
    """A model dir whose config.json differs from the store's source."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    shutil.copy(src / "config.json", d / "config.json")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_pinnable_and_staging_predicates(monkeypatch):
    import resource

    monkeypatch.setattr(hr.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (64 << 20, 64 << 20))
    ok, why = hr.pinnable(1 << 30)
    assert not ok and "locked-memory limit is 0.06 GiB" in why
    assert hr.pinnable(1 << 20) == (True, "")
    assert hr.staging_fits(1 << 50, hr.Placement(torch.device("cpu"), top_k=2)) == (True, "")
    assert not hr.decode_steps_supported(hr.Placement(torch.device("cpu"), top_k=2))[0]


def test_the_plan_reserves_what_the_runtime_holds(model_and_stores):
    """`lvllm plan`'s GPU-prefill staging is the runtime's allocation (window + 1 slots and the INT4 bf16 buffer), and
    with GPU prefill each node's host need counts the store pages the runtime keeps registered; without it, none."""
    from lvllm_runtime.hardware import Hardware
    from lvllm_runtime.planner import PlanOptions, make_plan as plan_for

    src, stores = model_and_stores
    hw = Hardware.load(Path(__file__).parent / "fixtures" / "hardware" / "h100-box.json")
    for (fmt, nodes), store_dir in stores.items():
        m = ExpertStore.open(store_dir).manifest
        for min_tokens in (64, 0):
            plan = plan_for(src, hw, PlanOptions(store=str(store_dir), numa_nodes=nodes, hot_experts=0,
                                                 gpu_prefill_min_tokens=min_tokens, prefetch_window=2))
            assert plan["fits"], plan["reasons"]
            staging = plan["memory"]["gpus"][0]["parts"]["prefill_staging"]
            pinned = [n["pinned_store"] for n in plan["memory"]["nodes"]]
            if min_tokens:
                assert staging == hr.prefill_staging_bytes(m, tuple(range(nodes)), 2) > 0
                assert sum(pinned) == sum(f["bytes"] for f in m.files.values())
            else:
                assert staging == 0 and pinned == [0] * nodes
