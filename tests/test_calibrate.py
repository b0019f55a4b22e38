"""Calibrated INT4 experts (lvllm_runtime.calibrate): data checks run everywhere; the llm-compressor runs need the
calibration environment (`bash scripts/install_calibrate.sh`, then `.venv-cal/bin/python -m pytest
tests/test_calibrate.py`) and skip elsewhere, saying so."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from lvllm_runtime import calibrate
from lvllm_runtime.checkpoint import Checkpoint
from lvllm_runtime.errors import BadInput, DoesNotFit, UnsupportedArchitecture
from lvllm_runtime.quantize import QuantizeOptions, quantize
from lvllm_runtime.store import ExpertStore
from vllm_harness import (DEEPSEEK_FOR_VLLM_CPU, INT4_REFERENCE_GAP_FACTOR, kl, make_plan, model_info,
                          reference_logprobs, run_jobs)

NEEDS_LLMC = pytest.mark.skipif(
    calibrate.llmcompressor_version() is None,
    reason="llm-compressor is not installed here: bash scripts/install_calibrate.sh, then "
    ".venv-cal/bin/python -m pytest tests/test_calibrate.py",
)
SAMPLES, SEQ = 4, 64


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --- calibration data -------------------------------------------------------------------------------------------


def test_bundled_set_is_multilingual_text_code_and_chat(zoo):
    records, source, sha = calibrate.read_records(None)
    assert source == "bundled" and len(sha) == 64 and len(records) >= 40
    chats = [r for r in records if "messages" in r]
    texts = " ".join(r["text"] for r in records if "text" in r)
    assert chats and "def " in texts and "SELECT" in texts and "的" in texts and "ü" in texts
    tok = _tokenizer(zoo("qwen3_moe"))
    ids, total = calibrate.tokenize(records, tok, calibrate.DEFAULT_SAMPLES, calibrate.DEFAULT_SEQ_LEN)
    assert ids.shape == (calibrate.DEFAULT_SAMPLES, calibrate.DEFAULT_SEQ_LEN) and ids.dtype == torch.int64
    assert total >= ids.numel()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    everything, _ = calibrate.tokenize(records, tok, 1, total)
    assert (everything == start).sum() >= 2 * len(chats), "chat records go through the chat template"


def test_user_file_text_and_messages(tmp_path, zoo):
    f = tmp_path / "cal.jsonl"
    f.write_text('{"text": "hello world, the quick brown fox"}\n\n'
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    records, source, _ = calibrate.read_records(f)
    assert source == str(f.resolve()) and [list(r) for r in records] == [["text"], ["messages"]]
    ids, _ = calibrate.tokenize(records * 20, _tokenizer(zoo("qwen3_moe")), 2, 16)
    assert ids.shape == (2, 16)


@pytest.mark.parametrize(
    "content, line, what",
    [
        ("", None, "holds no record"),
        ("\n  \n", None, "holds no record"),
        ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', 3, "is not JSON"),
        ('{"text": "ok"}\n{"prompt": "no text key"}\n', 2, "no non-empty"),
        ('{"text": ""}\n', 1, "no non-empty"),
        ('{"messages": [{"role": "user"}]}\n', 1, "no non-empty"),
        ('["text"]\n', 1, "no non-empty"),
    ],
)
def test_bad_calibration_file_names_the_line(tmp_path, content, line, what):
    f = tmp_path / "cal.jsonl"
    f.write_text(content)
    with pytest.raises(BadInput) as e:
        calibrate.read_records(f)
    msg = str(e.value)
    assert what in msg and "\n" not in msg
    if line is not None:
        assert f"line {line} " in msg


def test_too_few_tokens_says_how_many(zoo):
    with pytest.raises(BadInput, match=r"gives \d+ tokens: 1 samples of 64 tokens, 8 were asked"):
        calibrate.tokenize([{"text": "a short record of a few words, " * 4}], _tokenizer(zoo("qwen3_moe")), 8, 64)


def test_missing_llmcompressor_names_the_extra(tmp_path, zoo, monkeypatch):
    monkeypatch.setattr(calibrate, "llmcompressor_version", lambda: None)
    with pytest.raises(BadInput, match=r"not installed .*lvllm\[calibrate\].*install_calibrate\.sh"):
        calibrate.calibrate(zoo("qwen3_moe"), tmp_path / "out", "gptq")
    assert not (tmp_path / "out").exists()


def test_unknown_method(tmp_path, zoo):
    with pytest.raises(BadInput, match="not a calibration method"):
        calibrate.calibrate(zoo("qwen3_moe"), tmp_path / "out", "hqq")


def test_pinning_needs_an_accelerator():
    """The upstream behaviour `_cpu_workarounds` exists for: pinned host memory needs an accelerator; when this
    starts passing on a CPU-only torch, the AWQ workaround can go."""
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinning works")
    with pytest.raises(RuntimeError):
        torch.empty(4).pin_memory()


@pytest.mark.parametrize("text, value", [("24GB", 24 * 10**9), ("512MiB", 512 << 20), ("1.5G", 1_500_000_000),
                                         ("800m", 800 * 10**6), ("4096", 4096), ("2 GiB", 2 << 30)])
def test_parse_memory(text, value):
    assert calibrate.parse_memory(text) == value


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-1G"])
def test_parse_memory_rejects(text):
    with pytest.raises(BadInput, match="is not a size"):
        calibrate.parse_memory(text)


# --- llm-compressor runs --------------------------------------------------------------------------------------


@NEEDS_LLMC
def test_not_enough_memory_for_one_layer(tmp_path, zoo):
    with pytest.raises(DoesNotFit) as e:
        calibrate.calibrate(zoo("qwen3_moe"), tmp_path / "out", "gptq", samples=SAMPLES, seq_len=SEQ,
                            max_memory=100 << 20)
    msg = str(e.value)
    assert "one layer needs about" in msg and "0.10 GB are allowed" in msg and "Hessians" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@NEEDS_LLMC
def test_output_directory_must_be_empty(tmp_path, zoo):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(BadInput, match="is not empty"):
        calibrate.calibrate(zoo("qwen3_moe"), tmp_path / "out", "gptq", samples=SAMPLES, seq_len=SEQ)


# The calibrated DeepSeek-V3 is served by vLLM below, whose CPU MLA kernel needs these sizes.
ZOO_ARGS = {"deepseek_v3": DEEPSEEK_FOR_VLLM_CPU}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, zoo):
    """(model_type, method) -> (source dir, calibrated dir, store), each made once."""
    made = {}

    def get(model_type: str, method: str):
        if (model_type, method) not in made:
            root = tmp_path_factory.mktemp(f"{model_type}-{method}")
            src = zoo(model_type, **ZOO_ARGS.get(model_type, {}))
            out = calibrate.calibrate(src, root / "ct", method, group_size=32, samples=SAMPLES, seq_len=SEQ)
            result = quantize(out, root / "store", QuantizeOptions(numa_nodes=2))
            made[model_type, method] = src, out, ExpertStore.open(result.store)
        return made[model_type, method]

    return get


def _ct_tensor(ckpt_dir, name):
    index = ckpt_dir / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(ckpt_dir / fname, "pt") as f:
        return f.get_tensor(name)


def _moe_reference(store, layer, hidden, weights, ids):
    """f32 [T, H]: sum_j w_j down(silu(gate x) * up x) from the store's dequantized experts."""
    out = torch.zeros(hidden.shape[0], hidden.shape[1])
    i = store.manifest.intermediate_size
    for t in range(hidden.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            w13, w2 = store.expert(layer, e)
            x = hidden[t].float()
            out[t] += w * (w2 @ (torch.nn.functional.silu(w13[:i] @ x) * (w13[i:] @ x)))
    return out


def _moe_inputs(model_dir, layer) -> torch.Tensor:
    """f32 [SAMPLES * SEQ, H]: the inputs of MoE block `layer` of the BF16 model for the calibration tokens."""
    from transformers import AutoModelForCausalLM

    ids, _ = calibrate.tokenize(calibrate.read_records(None)[0], _tokenizer(model_dir), SAMPLES, SEQ)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    seen = []
    hook = model.model.layers[layer].mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    return torch.cat(seen).reshape(-1, seen[0].shape[-1]).float()


ARCHS = ("qwen3_moe", "deepseek_v3", "mixtral")
CASES = [(arch, method) for arch in ARCHS for method in calibrate.METHODS]


@NEEDS_LLMC
@pytest.mark.parametrize("model_type, method", CASES)
def test_calibrated_store_is_what_llmcompressor_wrote(calibrated, model_type, method):
    """Pass-through: every stored expert word and scale equals llm-compressor's output, split over 2 nodes."""
    src, out, store = calibrated(model_type, method)
    man = store.manifest
    assert man.weight_format == "int4" and man.group_size == 32 and man.numa_nodes == 2
    assert man.source_format == "int4_ct"
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    record = json.loads((out / calibrate.RESULT).read_text())
    assert calibrate.read_record(out) == {k: v for k, v in record.items() if k != "quantization_config"}
    assert record["method"] == method and record["calibration"]["source"] == "bundled"
    assert record["quantization_config"]["format"] == "pack-quantized"
    moe = store.manifest
    n, g = moe.node_intermediate_size, moe.group_size
    from lvllm_runtime.arch import resolve

    model = resolve(json.loads((src / "config.json").read_text()))
    for layer in man.moe_layers:
        shards = [store.layer(layer, node) for node in range(2)]
        for e in range(man.num_experts):
            names = model.expert_names(layer, e)
            gate, up, down = (( _ct_tensor(out, f"{names[k]}.weight_packed"), _ct_tensor(out, f"{names[k]}.weight_scale"))
                              for k in ("gate", "up", "down"))
            for node, s in enumerate(shards):
                rows = slice(node * n, (node + 1) * n)
                for got, want in (
                    (s["w13.packed"][e], torch.cat([gate[0][rows], up[0][rows]])),
                    (s["w13.scale"][e], torch.cat([gate[1][rows], up[1][rows]])),
                    (s["w2.packed"][e], down[0][:, node * n // 8:(node + 1) * n // 8]),
                    (s["w2.scale"][e], down[1][:, node * n // g:(node + 1) * n // g]),
                ):
                    assert got.dtype == want.dtype and torch.equal(got, want), (layer, e, node)


@NEEDS_LLMC
@pytest.mark.parametrize("model_type, method", CASES)
def test_only_routed_experts_change(calibrated, model_type, method):
    """Every tensor that is not a routed expert (attention, norms, router, shared experts, embeddings) comes out of
    llm-compressor bit-identical to the source: the store takes only the experts and the served model takes the
    rest from the source, so a calibration that rescaled anything else (AWQ smoothing a norm into the experts) would
    leave the stored experts computing on inputs they were not calibrated for."""
    src, out, _ = calibrated(model_type, method)
    source = Checkpoint.open(src)
    m = source.model
    experts = {base for layer in m.moe_layers for e in range(m.num_experts) for base in m.expert_names(layer, e).values()}
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    checked = 0
    for fname in files:
        with safe_open(src / fname, "pt") as f:
            for name in f.keys():
                if name.removesuffix(".weight") in experts:
                    continue
                want, got = f.get_tensor(name), _ct_tensor(out, name)
                assert got.dtype == want.dtype and torch.equal(got, want), name
                checked += 1
    assert checked > 0


@NEEDS_LLMC
def test_awq_refuses_ungated_experts(tmp_path, zoo):
    """relu2(up x) is not linear in up x, so no AWQ scale folds from up into down; said before anything loads."""
    with pytest.raises(UnsupportedArchitecture, match="not gated.*--method gptq or rtn"):
        calibrate.calibrate(zoo("nemotron_h"), tmp_path / "out", "awq", samples=SAMPLES, seq_len=SEQ)
    assert not list(tmp_path.iterdir())


@NEEDS_LLMC
@pytest.mark.parametrize("model_type, method", CASES)
def test_calibrated_store_runs_in_the_engine(calibrated, model_type, method):
    """The CPU engine computes each MoE layer from the store; calibrated weights stay close to the BF16 source
    and differ from round-to-nearest (the calibration changed them)."""
    from lvllm_runtime.engine import Engine
    from lvllm_runtime.quant import dequantize_int4, quantize_int4

    src, _, store = calibrated(model_type, method)
    man = store.manifest
    engine = Engine(man.hidden_size, man.node_intermediate_size, man.num_experts, man.activation, man.gated, "int4",
                    man.group_size, [[0], [0]], max_tokens=8)
    torch.manual_seed(0)
    for layer in man.moe_layers:
        engine.load_layer(layer, [store.layer(layer, node) for node in range(2)])
        hidden = torch.randn(5, man.hidden_size).bfloat16()
        ids = torch.stack([torch.randperm(man.num_experts)[:2] for _ in range(5)]).to(torch.int32)
        weights = torch.rand(5, 2)
        out = torch.empty_like(hidden)
        engine.forward(layer, hidden, ids, weights, out)
        ref = _moe_reference(store, layer, hidden, weights, ids)
        assert ((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2

    # On the first MoE layer's inputs for the calibration data (earlier layers are not quantized, so these are the
    # activations the calibration saw) every expert computes closer to BF16 than round-to-nearest at the same group
    # (GPTQ minimizes exactly this per Linear; AWQ's grid search includes s = 1, which is RTN). AWQ moves a per-channel
    # scale from up into down, so single weights may move far from the source's; each expert's function may not.
    source = Checkpoint.open(src)
    i, layer = man.intermediate_size, man.moe_layers[0]
    x = _moe_inputs(src, layer)
    expert = lambda gate, up, down: (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T  # noqa: E731
    rtn = lambda w: dequantize_int4(*quantize_int4(w.bfloat16(), man.group_size), man.group_size)  # noqa: E731
    errs, errs_rtn, same_as_rtn = [], [], 0
    for e in range(man.num_experts):
        w = source.read_expert(layer, e)
        w13, w2 = store.expert(layer, e)
        want = expert(w["gate"], w["up"], w["down"])
        errs.append(((expert(w13[:i], w13[i:], w2) - want).norm() / want.norm()).item())
        errs_rtn.append(((expert(rtn(w["gate"]), rtn(w["up"]), rtn(w["down"])) - want).norm() / want.norm()).item())
        same_as_rtn += torch.equal(rtn(w["down"]), w2)
    print(f"{model_type}/{method} expert errors", [f"{a:.3f}/{b:.3f}" for a, b in zip(errs, errs_rtn)])
    assert all(a <= 1.02 * b for a, b in zip(errs, errs_rtn)) and sum(errs) < sum(errs_rtn)
    assert same_as_rtn < man.num_experts


@NEEDS_LLMC
def test_gptq_within_a_memory_limit_offloads_and_stays_under_it(tmp_path, zoo):
    """--max-memory below the whole model but above one layer: weights go to disk, the run finishes, the record
    says so, and the same experts come out as in RAM (calibration is deterministic)."""
    src = zoo("qwen3_moe")
    in_ram = calibrate.calibrate(src, tmp_path / "ram", "gptq", group_size=32, samples=SAMPLES, seq_len=SEQ)
    est = calibrate.estimate_memory(Checkpoint.open(src), "gptq", SAMPLES, SEQ, None)
    limit = est.working_set + est.weights // 4
    out = calibrate.calibrate(src, tmp_path / "off", "gptq", group_size=32, samples=SAMPLES, seq_len=SEQ,
                              max_memory=limit)
    mem = json.loads((out / calibrate.RESULT).read_text())["memory"]
    assert mem["offloaded"] and mem["allowed_bytes"] == limit
    assert mem["predicted_peak_bytes"] <= limit
    name = "model.layers.1.mlp.experts.3.down_proj.weight_packed"
    assert torch.equal(_ct_tensor(in_ram, name), _ct_tensor(out, name))
    shutil.rmtree(tmp_path)


# --- through vLLM with the lvllm plugin --------------------------------------------------------------------------

PROMPT = "The quick brown fox"
MAX_TOKENS = 16


def vllm_worker(jobs_path: str, out_path: str) -> None:
    """Child process (this file as a script): each job's vllm.LLM in turn, float32 (tiny random models tie in bf16);
    greedy tokens for one prompt, the first generated token's full log-distribution, the expert layers' methods.
    Not vllm_harness.worker: that one runs four prompts, this test one prompt at its own length."""
    import gc
    import time
    from pathlib import Path

    from vllm import LLM, SamplingParams

    results = {}
    for job in json.loads(Path(jobs_path).read_text()):
        t0 = time.monotonic()
        extra = {"additional_config": {"lvllm_plan": job["plan"]}} if "plan" in job else {}
        llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=1, seed=0,
                  max_logprobs=-1, gpu_memory_utilization=0.2, **extra)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=vocab),
                           use_tqdm=False)[0]
        first = out.outputs[0].logprobs[0]
        results[job["name"]] = {
            "prompt_ids": list(out.prompt_token_ids),
            "tokens": list(out.outputs[0].token_ids),
            "first_logprobs": [first[i].logprob if i in first else float("-inf") for i in range(vocab)],
            "methods": llm.apply_model(model_info)[0]["methods"],
            "seconds": time.monotonic() - t0,
        }
        del llm
        gc.collect()
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def served(calibrated, tmp_path_factory):
    """Stock vLLM on each source model, and vLLM with the plugin on each calibrated store, in one child process."""
    jobs = []
    for arch in ARCHS:
        src = calibrated(arch, "gptq")[0]
        jobs.append({"name": f"{arch}/stock", "model": str(src)})
        for method in calibrate.METHODS:
            store = calibrated(arch, method)[2]
            jobs.append({"name": f"{arch}/{method}", "model": str(src), "plan": make_plan(src, store.path)})
    return run_jobs(tmp_path_factory.mktemp("vllm"), jobs, script=__file__, timeout=1500,
                    VLLM_ENABLE_V1_MULTIPROCESSING="0")


@NEEDS_LLMC
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("model_type, method", CASES)
def test_calibrated_store_served_by_vllm_with_the_plugin(calibrated, served, model_type, method):
    """vLLM serves the calibrated experts from the store: its first-token distribution matches transformers on the
    same dequantized experts as closely as stock vLLM matches transformers on the BF16 model (vllm_harness's INT4
    factor, with a 1e-5 floor under its 3e-5), and nearer to them than to the BF16 experts (not by a fixed factor:
    vLLM's MLA arithmetic alone puts DeepSeek-V3 ~7e-4 nats from transformers, about as far as INT4 is from BF16)."""
    src, _, store = calibrated(model_type, method)
    stock, lv = served[f"{model_type}/stock"], served[f"{model_type}/{method}"]
    assert lv["methods"] == ["LvllmMoEMethod"] and len(lv["tokens"]) == MAX_TOKENS
    assert lv["prompt_ids"] == stock["prompt_ids"]
    ref_q = reference_logprobs(src, store.path, lv["prompt_ids"])
    ref_bf16 = reference_logprobs(src, None, lv["prompt_ids"])
    kl_q = kl(ref_q, lv["first_logprobs"])  # same weights, vLLM + engine arithmetic
    kl_gap = kl(ref_bf16, stock["first_logprobs"])  # same weights, stock vLLM arithmetic
    kl_int4 = kl(ref_bf16, lv["first_logprobs"])  # the calibrated INT4 experts against BF16 ones
    print(f"{model_type}/{method}: KL(ref int4 || lvllm) {kl_q:.2e}, KL(ref bf16 || stock) {kl_gap:.2e}, "
          f"KL(ref bf16 || lvllm) {kl_int4:.2e}")
    assert kl_q < INT4_REFERENCE_GAP_FACTOR * kl_gap + 1e-5
    assert kl_q < kl_int4


if __name__ == "__main__":
    import sys

    vllm_worker(sys.argv[1], sys.argv[2])
