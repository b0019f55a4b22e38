"""`lvllm serve`: the assembled vLLM command, bad inputs, process-group shutdown, and one real server over HTTP."""

from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import pytest

from lvllm_cli.app import main
from lvllm_runtime import launcher, planner, recipes, topology
from lvllm_runtime.errors import BadInput
from lvllm_runtime.plan import save_plan
from lvllm_runtime.store import ExpertStore

RECIPE = "Qwen3-Coder-30B-A3B-Instruct"  # a qwen3_moe recipe, so it applies to the zoo's qwen3_moe


@pytest.fixture(scope="module")
def model_and_store(zoo, tmp_path_factory) -> tuple[Path, Path]:
    model = zoo("qwen3_moe", "bf16")
    store = tmp_path_factory.mktemp("serve") / "store"
    launcher.make_store(model, store)
    return model, store


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LVLLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def invoke(capsys, monkeypatch) -> Callable[..., Run]:
    """Run `lvllm serve ARGS` in-process through the real entry point (library errors -> one line + exit code)."""

    def run(*args: str) -> Run:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["lvllm", "serve", *args])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return Run(e.value.code or 0, out.out, out.err)

    return run


def value_of(argv: list[str], flag: str) -> list[str]:
    """Every value that follows `flag` in argv (asserts the flag appears exactly once)."""
    hits = [i for i, a in enumerate(argv) if a == flag]
    assert len(hits) == 1, (flag, argv)
    out = []
    for a in argv[hits[0] + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


def test_dry_run_recipe_plan_and_user_overrides(model_and_store, cache, tmp_path, invoke):
    model, store = model_and_store
    plan = planner.make_plan(model, topology.probe(), planner.PlanOptions(store=str(store), max_model_len=1024,
                                                                         max_num_seqs=3))
    plan_file = tmp_path / "plan.json"
    save_plan(plan, plan_file)

    r = invoke(str(model), "--recipe", RECIPE, "--plan", str(plan_file), "--port", "8123", "--dry-run", "--",
               "--max-num-seqs", "2", "--api-key=sekret-1", "--additional-config", '{"x": 1}', "--api-key", "sekret-2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # only the command, copy-pasteable
    argv = shlex.split(lines[0])
    assert argv[1:3] == ["-m", launcher.VLLM_SERVER_MODULE] and Path(argv[0]).exists()
    assert value_of(argv, "--model") == [str(model.resolve())]
    assert value_of(argv, "--max-num-seqs") == ["2"]  # the user's value wins over the plan's 3
    assert value_of(argv, "--max-model-len") == ["1024"]  # from the plan
    assert value_of(argv, "--kv-cache-memory-bytes") == [str(plan["vllm"]["kv_cache_memory_bytes"])]
    assert value_of(argv, "--tool-call-parser") == ["qwen3_coder"]  # from the recipe
    assert value_of(argv, "--served-model-name") == ["qwen3-coder-30b-a3b-instruct"]
    assert value_of(argv, "--host") == ["127.0.0.1"] and value_of(argv, "--port") == ["8123"]
    assert value_of(argv, "--api-key") == [launcher.MASK]  # the later --api-key replaced the first
    extra = json.loads(value_of(argv, "--additional-config")[0])
    assert extra == {"lvllm_plan": str(plan_file.resolve()), "x": 1}
    assert "sekret" not in r.output
    conflicts = [line for line in r.stderr.splitlines() if "conflict" in line]
    assert any("--max-num-seqs" in c and "(plan)" in c and "2 (yours)" in c for c in conflicts), r.stderr
    assert not list(cache.rglob("vllm-*.log"))  # nothing was started


def test_dry_run_makes_a_plan_within_the_model_context(model_and_store, cache, invoke):
    model, store = model_and_store
    r = invoke(str(model), "--store", str(store), "--dry-run")
    assert r.exit_code == 0, r.output
    argv = shlex.split(r.stdout.strip())
    plan_path = Path(json.loads(value_of(argv, "--additional-config")[0])["lvllm_plan"])
    plan = json.loads(plan_path.read_text())
    config = json.loads((model / "config.json").read_text())
    assert plan["store"]["path"] == str(store.resolve())
    assert int(value_of(argv, "--max-model-len")[0]) == plan["vllm"]["max_model_len"] <= config["max_position_embeddings"]
    assert "conflict" not in r.stderr and "warning" not in r.stderr

    r = invoke(str(model), "--store", str(store), "--host", "0.0.0.0", "--dry-run")
    assert r.exit_code == 0 and "listens on 0.0.0.0 without an API key" in r.stderr
    assert value_of(shlex.split(r.stdout.strip()), "--host") == ["0.0.0.0"]


@pytest.mark.skipif(launcher.has_gpu(), reason="needs a machine without a GPU")
def test_plan_needing_a_gpu_on_a_cpu_machine(model_and_store, cache, tmp_path, invoke):
    model, store = model_and_store
    plan = planner.make_plan(model, topology.probe(), planner.PlanOptions(store=str(store)))
    plan["hardware"]["gpus"] = ["NVIDIA H100 80GB HBM3"]
    save_plan(plan, tmp_path / "gpu-plan.json")
    r = invoke(str(model), "--plan", str(tmp_path / "gpu-plan.json"), "--dry-run")
    assert r.exit_code == 1 and "places weights on 1 GPU(s) and this machine has none" in r.stderr, r.output


def test_plan_of_another_model(model_and_store, zoo, cache, tmp_path, invoke):
    model, store = model_and_store
    other = zoo("qwen3_moe", "bf16", num_hidden_layers=3)
    save_plan(planner.make_plan(other, topology.probe()), tmp_path / "other.json")
    r = invoke(str(model), "--store", str(store), "--plan", str(tmp_path / "other.json"), "--dry-run")
    assert r.exit_code == 1 and "was made for another model" in r.stderr, r.output


def test_plan_made_before_the_store(model_and_store, cache, tmp_path, invoke):
    model, store = model_and_store
    early = planner.make_plan(model, topology.probe(), planner.PlanOptions(expert_format="int4", numa_nodes=1))
    assert early["store"]["path"] == ""
    save_plan(early, tmp_path / "early.json")
    r = invoke(str(model), "--store", str(store), "--plan", str(tmp_path / "early.json"), "--dry-run")
    assert r.exit_code == 0, r.output
    used = Path(json.loads(value_of(shlex.split(r.stdout), "--additional-config")[0])["lvllm_plan"])
    assert used != tmp_path / "early.json" and json.loads(used.read_text())["store"]["path"] == str(store.resolve())

    bf16 = planner.make_plan(model, topology.probe(), planner.PlanOptions(expert_format="bf16", numa_nodes=1))
    save_plan(bf16, tmp_path / "bf16.json")
    r = invoke(str(model), "--store", str(store), "--plan", str(tmp_path / "bf16.json"), "--dry-run")
    assert r.exit_code == 1 and "expects a bf16 store" in r.stderr, r.output


def test_unknown_recipe_suggests_closest(model_and_store, cache, invoke):
    model, store = model_and_store
    r = invoke(str(model), "--store", str(store), "--recipe", "qwen3-coder-30b", "--dry-run")
    assert r.exit_code == 1
    assert "no recipe named" in r.stderr and RECIPE in r.stderr


def test_recipe_for_another_architecture(model_and_store, cache, invoke):
    model, store = model_and_store
    other = next(n for n, rec in recipes.load_recipes().items() if rec.data["architecture"]["model_type"] != "qwen3_moe")
    r = invoke(str(model), "--store", str(store), "--recipe", other, "--dry-run")
    assert r.exit_code == 1 and "pick a recipe for this architecture" in r.stderr


def test_missing_store_names_the_quantize_command(model_and_store, cache, tmp_path, invoke):
    model, _ = model_and_store
    missing = tmp_path / "no-store"
    r = invoke(str(model), "--store", str(missing), "--dry-run")
    assert r.exit_code == 1
    assert f"lvllm quantize {model} {missing}" in " ".join(r.stderr.split()), r.stderr
    r = invoke(str(model), "--dry-run")  # no --store: the default place, and the exact command for it
    want = launcher.quantize_command(model.resolve(), launcher.default_store_dir(model.resolve()))
    assert r.exit_code == 1 and want in " ".join(r.stderr.split()), r.stderr


def test_quantize_makes_the_missing_store_first(model_and_store, cache, tmp_path, invoke):
    model, _ = model_and_store
    new = tmp_path / "new-store"
    r = invoke(str(model), "--store", str(new), "--quantize", "--dry-run")
    assert r.exit_code == 0, r.output
    assert ExpertStore.open(new).manifest.config_sha256 == launcher.config_sha(model)
    plan = json.loads(Path(json.loads(value_of(shlex.split(r.stdout), "--additional-config")[0])["lvllm_plan"]).read_text())
    assert plan["store"]["path"] == str(new.resolve())

    manifest = json.loads((new / "lvllm.json").read_text())  # as an interrupted quantize leaves it
    (new / "lvllm.json").write_text(json.dumps({**manifest, "complete": False}))
    r = invoke(str(model), "--store", str(new), "--dry-run")
    assert r.exit_code == 1 and "incomplete" in r.stderr
    r = invoke(str(model), "--store", str(new), "--quantize", "--dry-run")
    assert r.exit_code == 0, r.output
    assert ExpertStore.open(new).manifest.complete


def test_store_of_another_model(model_and_store, zoo, cache, invoke):
    _, store = model_and_store
    other = zoo("qwen3_moe", "bf16", num_hidden_layers=3)
    r = invoke(str(other), "--store", str(store), "--dry-run")
    assert r.exit_code == 1 and "made from another model" in r.stderr, r.output


def one_error_line(r: Run) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    return errors[0]


def test_damaged_store_is_refused_before_vllm(model_and_store, cache, tmp_path, invoke):
    model, store = model_and_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    files = len(ExpertStore.open(copy).manifest.files)
    r = invoke(str(model), "--store", str(copy), "--dry-run")
    assert r.exit_code == 0 and re.search(rf"sha256 of {files} files \(.+\) checked in [0-9.]+ s", r.stderr), r.output
    layer = copy / "layers" / "L001.n0.safetensors"
    data = bytearray(layer.read_bytes())
    data[-300:-100] = bytes(b ^ 0xFF for b in data[-300:-100])  # 200 bytes flipped, size unchanged
    layer.write_bytes(bytes(data))
    r = invoke(str(model), "--store", str(copy), "--dry-run")  # verified before and unchanged since: sizes only
    assert r.exit_code == 0 and f"sizes of {files} files checked" in r.stderr, r.output
    r = invoke(str(model), "--store", str(copy), "--dry-run", "--verify-store")
    assert "L001.n0.safetensors does not match its sha256" in one_error_line(r) and "--resume" in r.stderr
    launcher.verified_stamp(copy).unlink()  # never verified: the first start checks the sha256 without being asked
    assert "does not match its sha256" in one_error_line(invoke(str(model), "--store", str(copy), "--dry-run"))
    layer.write_bytes(bytes(data[:-1000]))  # truncated: found by the size check on every start
    assert "L001.n0.safetensors is " in one_error_line(invoke(str(model), "--store", str(copy), "--dry-run"))
    assert not list(cache.rglob("vllm-*.log"))


PLUGIN_FAILS = """
import sys
from lvllm_runtime.errors import StoreError, plugin_error_line
e = StoreError("the BF16 store's per-node intermediate size 48 is not a multiple of 32", "quantize with --numa-nodes 1")
if {marker}:
    print("(EngineCore pid=7) ERROR lvllm " + plugin_error_line(e), flush=True)
print("Traceback (most recent call last):\\n  File 'x.py', line 1, in <module>")
print("lvllm_runtime.errors.StoreError: " + str(e))
print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
sys.exit(1)
"""


@pytest.mark.parametrize("marker", [True, False])
def test_plugin_error_inside_vllm_is_the_one_line(model_and_store, cache, tmp_path, monkeypatch, invoke, marker):
    model, store = model_and_store
    shim = fake_vllm(tmp_path / "shim", PLUGIN_FAILS.format(marker=marker))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shim), *sys.path]))
    r = invoke(str(model), "--store", str(store), "--port", str(launcher.free_port()))
    line = one_error_line(r)
    assert "per-node intermediate size 48 is not a multiple of 32" in line and "exited with code" not in line
    assert ("quantize with --numa-nodes 1; vLLM's log:" in line) == marker
    assert "RuntimeError" not in r.stderr  # vLLM's unwinding stays in the log


def test_port_in_use_stops_before_vllm(model_and_store, cache, invoke):
    model, store = model_and_store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = invoke(str(model), "--store", str(store), "--port", str(port))
    assert r.exit_code == 1
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr, r.output
    assert not list(cache.rglob("vllm-*.log"))


def test_vllm_not_installed_names_the_extra(model_and_store, cache, monkeypatch, invoke):
    model, store = model_and_store
    real = launcher.importlib.util.find_spec
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    r = invoke(str(model), "--store", str(store))
    assert r.exit_code == 1
    extra = "gpu" if launcher.has_gpu() else "cpu"
    assert f"pip install 'lvllm[{extra}]'" in r.stderr, r.output


def test_bad_vllm_argument():
    with pytest.raises(BadInput, match="unexpected vLLM argument"):
        launcher.build_command("/m", user_args=["stray"])
    with pytest.raises(BadInput, match="not a JSON object"):
        launcher.build_command("/m", user_args=["--additional-config", "[1]"])


def test_parse_keeps_spelling_negation_and_negative_numbers():
    opts, rest = launcher.parse_vllm_args(["--max_model_len", "8", "--no-enforce-eager", "--seed", "-1",
                                           "--served-model-name", "a", "b", "--enforce-eager"])
    assert opts == {"--max-model-len": ("--max-model-len", "8"), "--seed": ("--seed", "-1"),
                    "--served-model-name": ("--served-model-name", "a", "b"), "--enforce-eager": ("--enforce-eager",)}
    assert rest == []
    assert launcher.mask_secrets(["x", "--api-key", "k1", "k2", "--port", "1", "--api-key=k3"]) == [
        "x", "--api-key", launcher.MASK, launcher.MASK, "--port", "1", f"--api-key={launcher.MASK}"]


def test_plugin_stays_allowed():
    cmd = launcher.build_command("/m", plan_path="/p.json", environ={"VLLM_PLUGINS": "other"})
    assert cmd.env == {"VLLM_PLUGINS": "other,lvllm"}
    assert cmd.display().startswith("VLLM_PLUGINS=other,lvllm ")
    assert launcher.build_command("/m", plan_path="/p.json", environ={}).env == {}
    assert launcher.build_command("/m", plan_path="/p.json", environ={"VLLM_PLUGINS": "lvllm, x"}).env == {}


def test_api_key_for_lvllms_own_requests(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert launcher.build_command("/m").api_key is None
    monkeypatch.setenv("VLLM_API_KEY", "from-env")  # vLLM reads it too, so readiness polling must send it
    assert launcher.build_command("/m").api_key == "from-env"
    assert launcher.build_command("/m", user_args=["--api-key", "k1", "k2"]).api_key == "k1"


def fake_server(tmp_path: Path, code: str) -> launcher.VllmServer:
    cmd = launcher.ServeCommand(argv=(sys.executable, "-c", code), env={}, host="127.0.0.1",
                                port=launcher.free_port(), served_model_name="x")
    return launcher.VllmServer(cmd, tmp_path / "log.txt")


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path):
    # A parent and two grandchildren, all ignoring SIGTERM, one of which leaves the process group.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "body = 'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'\n"
        "subprocess.Popen([sys.executable, '-c', body])\n"
        "subprocess.Popen([sys.executable, '-c', body], start_new_session=True)\n"
        "print('started', flush=True); time.sleep(600)\n"
    )
    server = fake_server(tmp_path, code)
    server.start()
    deadline = time.monotonic() + 30
    while len(psutil.Process(server.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    assert len(family) == 3
    t0 = time.monotonic()
    server.stop(timeout=1.0)
    assert time.monotonic() - t0 < 10
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive


def test_vllm_exiting_early_reports_its_log_tail(tmp_path):
    server = fake_server(tmp_path, "import sys; print('boom: no such model', flush=True); sys.exit(3)")
    server.start()
    with pytest.raises(launcher.VllmFailed) as e:
        server.wait_ready(timeout=60, poll=0.1)
    assert "exited with code 3" in e.value.message and "boom: no such model" in e.value.log_tail
    server.stop()


def err_text(f) -> str:
    f.seek(0)
    return f.read()


def fake_vllm(root: Path, server_code: str) -> Path:
    """A stand-in `vllm.entrypoints.openai.api_server` module on a PYTHONPATH directory, for testing lvllm's own
    process handling in seconds (real vLLM is started by the HTTP test and the demo test)."""
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(server_code)
    return root


FAKE_SERVER = """
import http.server, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn server: lvllm must escalate to SIGKILL
subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
port = int(sys.argv[sys.argv.index("--port") + 1])
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(b'{"data": []}')
print("fake server up", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Models).serve_forever()
"""


def test_vllm_failing_to_start_gives_one_line_and_its_log(model_and_store, cache, tmp_path, monkeypatch, invoke):
    model, store = model_and_store
    shim = fake_vllm(tmp_path / "shim", "import sys\nprint('ValueError: the model needs 9 GiB, 1 GiB free')\nsys.exit(1)\n")
    monkeypatch.setenv("PYTHONPATH", str(shim))
    r = invoke(str(model), "--store", str(store), "--port", str(launcher.free_port()))
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "vLLM exited with code 1 before it was ready" in errors[0]
    assert "ValueError: the model needs 9 GiB, 1 GiB free" in r.stderr  # the log tail


def test_sigterm_stops_the_server_and_every_child(model_and_store, tmp_path):
    model, store = model_and_store
    shim = fake_vllm(tmp_path / "shim", FAKE_SERVER)
    env = {**os.environ, "LVLLM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(shim)}
    lvllm = shutil.which("lvllm", path=str(Path(sys.executable).parent)) or "lvllm"
    proc = subprocess.Popen([lvllm, "serve", str(model), "--store", str(store), "--port", str(launcher.free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        read_url(proc, timeout=120)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) == 2  # the server and its child, both ignoring SIGTERM
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        gone, alive = psutil.wait_procs(family, timeout=5)
        assert not alive
        assert "plugin is inactive" in proc.stderr.read()  # the stand-in runs no lvllm engine, and serve says so
    finally:
        if proc.poll() is None:
            proc.kill()


def read_url(proc: subprocess.Popen, timeout: float) -> str:
    """The URL line `lvllm serve` prints on stdout once vLLM answers."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if sel.select(timeout=1.0):
            line = proc.stdout.readline()
            if line.startswith("http"):
                return line.split()[0]
    raise AssertionError(f"lvllm serve printed no URL (exit code {proc.poll()})")


@pytest.mark.vllm
@pytest.mark.slow
def test_serve_real_http_then_sigint_leaves_no_process(model_and_store, tmp_path):
    httpx = pytest.importorskip("httpx")
    model, store = model_and_store
    port = launcher.free_port()
    env = {**os.environ, "LVLLM_CACHE_DIR": str(tmp_path / "cache")}
    lvllm = shutil.which("lvllm", path=str(Path(sys.executable).parent)) or "lvllm"
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(
        [lvllm, "serve", str(model), "--store", str(store), "--port", str(port), "--",
         "--enforce-eager", "--max-model-len", "512"],
        stdout=subprocess.PIPE, stderr=err, text=True, env=env,
    )
    try:
        url = read_url(proc, timeout=900)
        assert url == f"http://127.0.0.1:{port}/v1"
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # the API server and vLLM's engine core at least
        with httpx.Client(base_url=url, timeout=120) as client:
            models = client.get("/models").json()
            name = models["data"][0]["id"]
            assert name == model.name

            chat = client.post("/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 8, "min_tokens": 2, "temperature": 0})
            assert chat.status_code == 200, chat.text
            body = chat.json()
            assert body["choices"][0]["message"]["role"] == "assistant"
            assert body["usage"]["completion_tokens"] >= 2

            chunks, done = [], False
            with client.stream("POST", "/completions", json={
                    "model": name, "prompt": "the quick brown", "max_tokens": 6, "min_tokens": 6, "stream": True,
                    "temperature": 0}) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                for line in stream.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunks.append(json.loads(line[6:])["choices"][0]["text"])
            assert done and len(chunks) >= 2  # several server-sent events, then [DONE]

            def ask(i: int) -> int:
                r = client.post("/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": f"question number {i}"}],
                    "max_tokens": 6, "min_tokens": 1})
                assert r.status_code == 200, r.text
                return r.json()["usage"]["completion_tokens"]

            with ThreadPoolExecutor(8) as pool:
                answered = list(pool.map(ask, range(8)))
            assert len(answered) == 8 and all(n >= 1 for n in answered)

        log = next((tmp_path / "cache").rglob(f"vllm-{port}.log")).read_text(errors="replace")
        assert "lvllm_plan" in log  # the plan reached vLLM's config
        assert "engine load" in err_text(err) and "lvllm engine on store in pid" in err_text(err)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(err_text(err)[-3000:])
