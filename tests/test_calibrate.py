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
from lvllm_runtime.errors import BadInput, DoesNotFit
from lvllm_runtime.quantize import QuantizeOptions, quantize
from lvllm_runtime.store import ExpertStore

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


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, zoo):
    """(model_type, method) -> (source dir, calibrated dir, store), each made once."""
    made = {}

    def get(model_type: str, method: str):
        if (model_type, method) not in made:
            root = tmp_path_factory.mktemp(f"{model_type}-{method}")
            src = zoo(model_type)
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


CASES = [
    pytest.param("qwen3_moe", "gptq"),
    pytest.param("deepseek_v3", "gptq"),
    pytest.param("mixtral", "gptq"),
    pytest.param("qwen3_moe", "awq", marks=pytest.mark.slow),
]


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

    source = Checkpoint.open(src)
    same_as_rtn = 0
    for e in range(man.num_experts):
        w = source.read_expert(man.moe_layers[0], e)["down"]
        stored = store.expert(man.moe_layers[0], e)[1]
        assert ((stored - w).norm() / w.norm()) < 0.2
        rtn = dequantize_int4(*quantize_int4(w.bfloat16(), man.group_size), man.group_size)
        same_as_rtn += torch.equal(rtn, stored)
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
