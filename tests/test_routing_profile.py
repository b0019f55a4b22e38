"""Routing capture and the hybrid runtime's metrics (issue 22): the skewed zoo model, the counts HybridMoE keeps
(real tokens only, every path), the profile file `lvllm plan --routing-profile` reads, the expected hit rate the
planner prints, `lvllm serve --record-routing` bad inputs, and one real `lvllm serve` run that records, plans, serves
again and compares the measured hit rate with the plan's, reading vLLM's own /metrics endpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from lvllm_runtime import hybrid_runtime as hr
from lvllm_runtime import launcher, metrics, zoo
from lvllm_runtime.errors import BadInput
from lvllm_runtime.plan import RuntimePlan, save_plan
from lvllm_runtime.quantize import QuantizeOptions, quantize
from lvllm_runtime.routing_profile import FORMAT, hot_share, hottest, read_profile
from lvllm_runtime.store import ExpertStore
from test_hybrid_runtime import _RuntimeExperts  # transformers' experts module replaced by a HybridMoE
from vllm_harness import make_plan

HW = Path(__file__).parent / "fixtures" / "hardware"
HOT = 2  # experts per layer the skewed model favours, and the plan keeps hot
TEXT = 48


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> tuple[Path, Path]:
    """The skewed qwen3_moe checkpoint and its INT4 store (one node slice)."""
    root = tmp_path_factory.mktemp("skewed")
    model = zoo.build_skewed("qwen3_moe", root / "model", hot=HOT)
    store = root / "store"
    quantize(model, store, QuantizeOptions(weight_format="int4", numa_nodes=1, workers=1))
    return model, store


def _router_picks(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """transformers' own routing of `ids`: {layer: picks per expert}, from each router's logits."""
    counts = {}
    hooks = []
    for L, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate

        def hook(mod, args, L=L):
            x = args[0].reshape(-1, args[0].shape[-1])
            top = torch.softmax(x @ mod.weight.T, dim=-1).topk(2, dim=-1).indices
            counts[L] = torch.bincount(top.reshape(-1), minlength=mod.weight.shape[0])

        hooks.append(gate.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return counts


def test_skewed_zoo_model_routes_most_picks_to_its_experts(skewed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(skewed[0], dtype=torch.float32).eval()
    tok = zoo.train_tokenizer()
    lines = [line for line in (Path(zoo.__file__).with_name("zoo_text.txt")).read_text().splitlines() if line.strip()]
    ids = torch.tensor([tok.encode(line).ids[:24] for line in lines[-12:] if len(tok.encode(line).ids) >= 24])
    picks = _router_picks(model, ids)  # text the calibration (the first lines) did not see
    for L, c in picks.items():
        favoured = zoo.skewed_experts(L, 8, HOT)
        assert hottest(c.tolist(), HOT) == favoured
        assert float(c[favoured].sum() / c.sum()) > 0.7, (L, c.tolist())  # uniform routing would give 0.25
    plain = _router_picks(AutoModelForCausalLM.from_pretrained(
        zoo.build("qwen3_moe", skewed[0].parent / "plain"), dtype=torch.float32).eval(), ids)
    assert all(float(c.max() / c.sum()) < 0.35 for c in plain.values())  # the plain zoo does not skew


def test_runtime_counts_every_pick_and_writes_the_profile(skewed, tmp_path, one_torch_thread):
    from prometheus_client import REGISTRY
    from transformers import AutoModelForCausalLM

    model_dir, store = skewed
    hot = {L: zoo.skewed_experts(L, 8, HOT) for L in (0, 1)}
    hot[1] = [0, 1]  # layer 1 keeps two cold-ish experts hot: the hit rate must follow the hot sets, not the skew
    plan = RuntimePlan.from_dict(make_plan(model_dir, store, hot=hot))
    rt = hr.HybridRuntime(plan, ExpertStore.open(store), hr.Placement(torch.device("cpu"), top_k=2,
                                                                        dtype=torch.float32), model_dir)
    record = tmp_path / "profile.json"
    obs = metrics.observe(rt, str(record), every_s=3600)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(7, zoo.VOCAB, (1, TEXT), generator=torch.Generator().manual_seed(3))
    for L in (0, 1):
        moe = rt.load_layer(L)
        moe.observer = obs
        obs.attach(L)
        model.model.layers[L].mlp.experts = _RuntimeExperts(moe)
    before = {k: REGISTRY.get_sample_value(k) or 0.0 for k in ("lvllm_routed_picks_total", "lvllm_hot_picks_total")}
    engine_steps = REGISTRY.get_sample_value("lvllm_engine_step_seconds_count", {"rank": "0"}) or 0.0
    cold_seen = REGISTRY.get_sample_value("lvllm_engine_cold_experts_sum", {"rank": "0"}) or 0.0
    want = _router_picks(model, ids)  # one forward through the runtime's layers, routing read off the routers
    with torch.no_grad():
        # a padded batch: only its real rows count; a warm-up run (observe=False) counts nothing
        h = torch.randn(4, 128)
        w, top = torch.full((4, 2), 0.5), torch.tensor([[5, 6]] * 4, dtype=torch.int32)
        for L in (0, 1):
            rt.layers[L].forward(h, w, top, padding=torch.tensor([False, True, True, True]))
        for L in (0, 1):
            rt.layers[L].forward(h, w, top, observe=False)
    obs.close()
    prof = read_profile(record, 8)
    for L in (0, 1):
        expect = want[L].clone()
        expect[5] += 1
        expect[6] += 1
        assert prof[L] == expect.tolist()
    raw = json.loads(record.read_text())
    assert raw["format"] == FORMAT and raw["tokens"] == TEXT + 1 and raw["top_k"] == 2
    picks = sum(sum(c) for c in prof.values())
    assert picks == 2 * 2 * (TEXT + 1)
    hot_picks = sum(prof[L][e] for L in (0, 1) for e in hot[L])
    assert REGISTRY.get_sample_value("lvllm_routed_picks_total") - before["lvllm_routed_picks_total"] == picks
    assert REGISTRY.get_sample_value("lvllm_hot_picks_total") - before["lvllm_hot_picks_total"] == hot_picks
    assert REGISTRY.get_sample_value("lvllm_hot_hit_rate") == pytest.approx(hot_picks / picks)
    assert hot_share(prof, hot) == pytest.approx(hot_picks / picks)
    assert REGISTRY.get_sample_value("lvllm_tokens_total", {"path": "engine"}) >= TEXT + 1
    # two observed steps ran the engine (the text, the padded batch); the unobserved one is not in the histogram
    assert REGISTRY.get_sample_value("lvllm_engine_step_seconds_count", {"rank": "0"}) - engine_steps == 2
    # distinct experts the engine computed: the text's picked cold experts per layer, then 5 and 6 in both layers
    text_cold = sum(int(((want[L] > 0) & torch.tensor([e not in hot[L] for e in range(8)])).sum()) for L in (0, 1))
    assert REGISTRY.get_sample_value("lvllm_engine_cold_experts_sum", {"rank": "0"}) - cold_seen == text_cold + 4
    rt.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replays need a GPU")
def test_cuda_graph_replays_count_their_real_tokens(skewed, tmp_path):
    """The counting kernels are captured with the step: each replay adds its real tokens' picks (padding rows not),
    and the pinned host copy the flush thread reads is refreshed by the replay itself."""
    from lvllm_runtime.cuda_graph_step import capture

    model_dir, store = skewed
    hot = {L: zoo.skewed_experts(L, 8, HOT) for L in (0, 1)}
    plan = RuntimePlan.from_dict(make_plan(model_dir, store, hot=hot))
    rt = hr.HybridRuntime(plan, ExpertStore.open(store), hr.Placement(torch.device("cuda"), top_k=2,
                                                                        decode_sizes=(4,)), model_dir)
    obs = metrics.observe(rt, None, every_s=3600)
    for L in (0, 1):
        rt.load_layer(L).observer = obs
        obs.attach(L)
    assert rt.layers[0].path(4) == "decode_step"
    x = torch.zeros(4, 128, dtype=torch.bfloat16, device="cuda")
    w = torch.full((4, 2), 0.5, device="cuda")
    ids = torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    padding = torch.zeros(4, dtype=torch.bool, device="cuda")
    graph, _ = capture(lambda: [rt.layers[L].forward(x, w, ids, padding=padding) for L in (0, 1)][-1])
    torch.cuda.synchronize()
    counts = obs.counts
    base_picks, base_tokens = counts.picks.cpu().clone(), counts.snapshot()[1]["decode_step"]
    gen = torch.Generator().manual_seed(4)
    want, tokens = torch.zeros(8, dtype=torch.int64), 0
    for _ in range(6):
        top = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(4)]).int()
        mask = torch.rand(4, generator=gen) < 0.6
        ids.copy_(top)
        padding.copy_(~mask)
        x.copy_(torch.randn(4, 128, generator=gen).bfloat16())
        graph.replay()
        want += torch.bincount(top[mask].reshape(-1).long(), minlength=8)
        tokens += int(mask.sum())
    torch.cuda.synchronize()
    picks, paths = counts.snapshot()  # the pinned copy, refreshed by the last replay
    for i, L in enumerate(counts.layers):
        assert torch.equal(torch.tensor(picks[L]) - base_picks[i], want)
    assert paths["decode_step"] - base_tokens == tokens
    rt.close()


def test_profile_file_bad_inputs(tmp_path):
    cases = {
        "missing.json": None,
        "garbage.json": "{not json",
        "other.json": json.dumps({"format": "something-else", "layers": {}}),
        "shape.json": json.dumps({"0": [1, 2, 3]}),
        "negative.json": json.dumps({"layers": {"0": [-1] * 8}}),
        "list.json": json.dumps([1, 2]),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(BadInput) as e:
            read_profile(path, 8)
        assert "\n" not in str(e.value) and e.value.fix, name
    (tmp_path / "bare.json").write_text(json.dumps({"3": list(range(8))}))
    assert read_profile(tmp_path / "bare.json", 8) == {3: [float(x) for x in range(8)]}


def _lvllm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lvllm", path=str(Path(sys.executable).parent)) or "lvllm"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_plan_puts_the_profiles_hottest_experts_on_the_gpu_and_prints_the_hit_rate(skewed, tmp_path):
    model_dir, _ = skewed
    prof = {"format": FORMAT, "version": 1, "num_experts": 8, "top_k": 2,
            "layers": {"0": [5, 90, 1, 1, 1, 80, 1, 1], "1": [1, 1, 1, 70, 1, 1, 1, 1]}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    p = _lvllm("plan", str(model_dir), "--hardware", str(HW / "h100-box.json"), "--hot-experts", "2",
               "--routing-profile", str(path), "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["runtime"]["hot_experts"] == {"0": [1, 5], "1": [0, 3]}  # layer 1's tie goes to the lower id
    expect = (170 / 180 + 71 / 77) / 2
    assert plan["forecast"]["hot_fraction"] == pytest.approx(expect)
    text = _lvllm("plan", str(model_dir), "--hardware", str(HW / "h100-box.json"), "--hot-experts", "2",
                  "--routing-profile", str(path), env={"COLUMNS": "200"})
    assert text.returncode == 0, text.stderr
    assert f"expected hot-expert hit rate {expect:.0%} of routed picks (from routing profile {path}" in text.stdout
    uniform = _lvllm("plan", str(model_dir), "--hardware", str(HW / "h100-box.json"), "--hot-experts", "2",
                     env={"COLUMNS": "200"})
    assert "expected hot-expert hit rate 25% of routed picks (from uniform routing" in uniform.stdout
    bad = _lvllm("plan", str(model_dir), "--hardware", str(HW / "h100-box.json"), "--routing-profile",
                 str(tmp_path / "none.json"))
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error")]
    assert bad.returncode != 0 and len(errors) == 1 and "routing profile" in errors[0]


def test_record_routing_bad_inputs_stop_before_vllm(skewed, tmp_path):
    model_dir, store = skewed
    env = {"LVLLM_CACHE_DIR": str(tmp_path / "cache")}
    for target, words in ((tmp_path, "is a directory"), (tmp_path / "no" / "such" / "p.json", "not a writable")):
        r = _lvllm("serve", str(model_dir), "--store", str(store), "--record-routing", str(target), "--dry-run",
                   env=env)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
        assert r.returncode != 0 and len(errors) == 1 and words in errors[0], r.stderr
    r = _lvllm("serve", str(model_dir), "--store", str(store), "--record-routing", str(tmp_path / "p.json"),
               "--record-every", "0", "--dry-run", env=env)
    assert r.returncode != 0 and "--record-every 0.0 is not a positive" in r.stderr
    r = _lvllm("serve", str(model_dir), "--store", str(store), "--record-routing", str(tmp_path / "p.json"),
               "--record-every", "2", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert '"lvllm_record_routing": "' + str(tmp_path / "p.json") in r.stdout and '"lvllm_record_every_s": 2.0' in r.stdout
    assert not (tmp_path / "p.json").exists()


PROMPTS_RECORD = ["Tell me a story about a cat.", "Why is the sea salty?", "List three prime numbers.",
                  "What does a compiler do?", "Name a planet with rings.", "How do bees make honey?",
                  "Describe a rainy morning.", "Translate hello into French."]
PROMPTS_SERVE = ["Where do rivers begin?", "Count from one to five.", "What is a mixture of experts?",
                 "Give me a recipe for bread.", "Who wrote the first program?", "Why do leaves fall?",
                 "Explain gravity to a child.", "What colour is the night sky?"]


def _vllm_version() -> tuple[int, int]:
    from importlib import metadata

    from lvllm_runtime.vllm_versions import installed_distribution

    major, minor = metadata.version(installed_distribution()).split(".")[:2]
    return int(major), int(minor)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read().decode()


def _complete(url: str, name: str, prompt: str) -> int:
    """One greedy completion of exactly 8 tokens; returns the tokens the model ran (prompt + completion - 1: the
    last sampled token is never fed back)."""
    body = json.dumps({"model": name, "prompt": prompt, "max_tokens": 8, "min_tokens": 8, "ignore_eos": True,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        usage = json.loads(r.read())["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"] - 1


def _sample(text: str, name: str) -> float | None:
    """The value of the unlabelled series `name` in a Prometheus text page."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def _until(what, timeout: float = 60.0):
    """Poll what() until it returns a true value (the flush runs every second); that value, or the last one."""
    deadline = time.monotonic() + timeout
    value = what()
    while not value and time.monotonic() < deadline:
        time.sleep(0.5)
        value = what()
    return value


def _metrics_page(url: str, picks: int) -> str:
    """vLLM's /metrics page once lvllm_routed_picks_total has reached `picks` (or after a minute)."""
    page = lambda: _get(url.removesuffix("/v1") + "/metrics")  # noqa: E731
    return _until(lambda: (lambda t: t if (_sample(t, "lvllm_routed_picks_total") or 0) >= picks else "")(page())) \
        or page()


class _Server:
    """`lvllm serve ARGS` in a child process (its own URL line on stdout), stopped with Ctrl-C."""

    def __init__(self, args: list[str], env: dict, log: Path):
        exe = shutil.which("lvllm", path=str(Path(sys.executable).parent)) or "lvllm"
        self.err = open(log, "w+")
        self.proc = subprocess.Popen([exe, "serve", *args], stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=env)

    def __enter__(self) -> str:
        from test_serve import read_url

        try:
            return read_url(self.proc, timeout=900)
        except AssertionError:
            self.err.seek(0)
            raise AssertionError(self.err.read()[-3000:]) from None

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.vllm
@pytest.mark.slow
def test_recorded_profile_plans_the_hot_experts_and_serving_meets_the_predicted_hit_rate(skewed, tmp_path):
    """Serve the skewed model recording its routing with nothing hot, plan with the profile, serve again with the
    plan's hot experts and read vLLM's /metrics: the hit rate is the plan's within 10 points. On a GPU host both plans
    are this machine's and vLLM runs its CUDA graphs (replays count their real tokens); on the CPU the hot experts come
    from a plan for the fixtures' GPU box and HybridMoE runs them with torch's CPU kernels (the code of the GPU)."""
    model_dir, store = skewed
    gpu = launcher.has_gpu()
    env = {**os.environ, "LVLLM_CACHE_DIR": str(tmp_path / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    record = tmp_path / "routing.json"
    # CUDA graphs pad batches; vLLM's runner marks the padding rows from 0.32 on (0.25 does not: eager there)
    graphs = gpu and _vllm_version() >= (0, 32)
    vllm_args = ["--", "--max-model-len", "512", *([] if graphs else ["--enforce-eager"])]
    port = launcher.free_port()
    common = [str(model_dir), "--store", str(store), "--port", str(port)]
    first = []
    if gpu:  # the plan serve would make keeps every expert of the tiny model on the GPU
        made = _lvllm("plan", str(model_dir), "--store", str(store), "--hot-experts", "0", "--max-model-len", "512",
                      "--out", str(tmp_path / "plan-cold.json"), env=env)
        assert made.returncode == 0, made.stderr
        first = ["--plan", str(tmp_path / "plan-cold.json")]
    with _Server([*common, *first, "--record-routing", str(record), "--record-every", "1", *vllm_args], env,
                 tmp_path / "serve1.txt") as url:
        ran = sum(_complete(url, model_dir.name, p) for p in PROMPTS_RECORD)
        tokens = lambda: json.loads(record.read_text())["tokens"] if record.is_file() else 0  # noqa: E731
        assert _until(lambda: tokens() >= ran) and tokens() == ran  # every real token once; no warm-up or padding
        page = _metrics_page(url, 4 * ran)
        assert _sample(page, "lvllm_routed_picks_total") == 4 * ran  # 2 MoE layers x top-2
        paths = {m.group(1): float(m.group(2)) for m in re.finditer(r'^lvllm_tokens_total\{path="(\w+)"\} (\S+)$',
                                                                     page, re.M)}
        assert sum(paths.values()) == ran, paths
        if not gpu:  # every step is a blocking engine call; on a GPU replayed graphs run the engine without Python
            assert paths == {"engine": ran}
            assert _sample(page, 'lvllm_engine_step_seconds_count{rank="0"}') >= len(PROMPTS_RECORD) * 8
            assert _sample(page, 'lvllm_engine_cold_experts_count{rank="0"}') >= len(PROMPTS_RECORD) * 8
            assert _sample(page, "lvllm_gpu_prefill_bytes_total") in (None, 0.0)  # nothing streams on the CPU
        assert _sample(page, "lvllm_hot_hit_rate") == 0.0  # nothing is hot in the first plan
        assert "vllm:prompt_tokens_total" in page  # vLLM's own series still there from its multiprocess directory
    profile = read_profile(record, 8)
    assert {L: hottest(c, HOT) for L, c in profile.items()} == {L: zoo.skewed_experts(L, 8, HOT) for L in (0, 1)}

    target = ["--store", str(store), "--max-model-len", "512"] if gpu else ["--hardware", str(HW / "h100-box.json")]
    planned = _lvllm("plan", str(model_dir), *target, "--hot-experts", str(HOT), "--routing-profile", str(record),
                     "--json", env=env)
    assert planned.returncode == 0, planned.stderr
    hot_plan = json.loads(planned.stdout)
    hot = hot_plan["runtime"]["hot_experts"]
    assert hot == {str(L): zoo.skewed_experts(L, 8, HOT) for L in (0, 1)}
    predicted = hot_plan["forecast"]["hot_fraction"]
    assert predicted > 0.6  # uniform routing would predict 2/8
    if not gpu:  # the plan serve made for this CPU, with the hot experts of the GPU box's
        hot_plan = json.loads(next((tmp_path / "cache").rglob("plan.json")).read_text())
        hot_plan["runtime"]["hot_experts"] = hot
    save_plan(hot_plan, tmp_path / "plan-hot.json")
    with _Server([*common, "--plan", str(tmp_path / "plan-hot.json"), *vllm_args], env,
                 tmp_path / "serve2.txt") as url:
        ran = sum(_complete(url, model_dir.name, p) for p in PROMPTS_SERVE)
        page = _metrics_page(url, 4 * ran)
    assert _sample(page, "lvllm_routed_picks_total") == 4 * ran
    measured = _sample(page, "lvllm_hot_picks_total") / _sample(page, "lvllm_routed_picks_total")
    print(f"hit rate: plan {predicted:.3f}, served {measured:.3f}")
    assert abs(measured - predicted) <= 0.10
    assert _sample(page, "lvllm_hot_hit_rate") == pytest.approx(measured)
