"""The bad inputs and faults of issue 21 through the real `lvllm` command in a subprocess: exactly one `error:` line
and no traceback, the exit code, and what is left on disk (no store marked complete, no `*.partial-*` temp file, no
lock). The plan side (hardware JSON, --hot-experts -1, --store of another model, --max-model-len above the model's
positions) is in test_plan_bad_inputs.py. Nothing here starts vLLM but the last test: every check runs before it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lvllm_cli.serve import STATE_STYLE
from lvllm_runtime import launcher, planner, topology
from lvllm_runtime import quantize as quantize_mod
from lvllm_runtime.checkpoint import Checkpoint
from lvllm_runtime.plan import save_plan
from lvllm_runtime.store import LOCK, MANIFEST, StoreLock, format_bytes, write_manifest, read_manifest

LVLLM = str(Path(sys.executable).with_name("lvllm"))
# What `lvllm serve` prints on a non-terminal beside an error: its stage lines and the vLLM command it starts.
SERVE_LINES = (*(mark for mark, _ in STATE_STYLE.values()), "vLLM command:")


def lvllm(*args: str | Path, cache: Path | None = None, env: dict | None = None, timeout: float = 300,
          prefix: tuple[str, ...] = (LVLLM,)) -> subprocess.CompletedProcess:
    """Run `lvllm ARGS` (or `prefix ARGS`) as a user would; LVLLM_CACHE_DIR under the test's own directory."""
    environ = {k: v for k, v in os.environ.items() if k not in ("LVLLM_VIRTUAL_NUMA", "LVLLM_DEBUG")}
    if cache is not None:
        environ["LVLLM_CACHE_DIR"] = str(cache)
    environ.update(env or {})
    return subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, env=environ, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The one `error:` line of a failed command: nothing else on stderr but `lvllm serve`'s progress lines."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    others = [line for line in lines if not line.startswith(("error:", *SERVE_LINES))]
    assert p.returncode == code and len(errors) == 1 and not others, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


def debris(store: Path) -> list[str]:
    """What a writer leaves behind that is no part of a store: temp files and the lock."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if ".partial-" in p.name or p.name == LOCK)


def manifest_of(store: Path) -> dict:
    return json.loads((store / MANIFEST).read_text())


def wait_for(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def files_listed(store: Path, n: int):
    def check() -> bool:
        try:
            return len(manifest_of(store)["files"]) >= n
        except (OSError, ValueError):
            return False
    return check


@pytest.fixture(scope="module")
def served(zoo, tmp_path_factory) -> tuple[Path, Path]:
    """(the zoo's qwen3_moe, a finished store of it made by `lvllm quantize`)."""
    model, store = zoo("qwen3_moe", "bf16"), tmp_path_factory.mktemp("bad-inputs") / "store"
    assert lvllm("quantize", model, store).returncode == 0
    return model, store


# --- private mounts: a read-only or a small file system (root ignores chmod, so a mount is the honest test) -------


def _private_mount_works(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    (tmp / "probe").mkdir()
    p = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro,size=1m lvllm-probe {tmp / 'probe'}"],
                       capture_output=True)
    return p.returncode == 0


@pytest.fixture
def mounted(tmp_path):
    """mounted(options, *lvllm_args, at=dir) -> (CompletedProcess, what the file system held when lvllm exited): runs
    lvllm with a tmpfs of `options` mounted at `at` in a mount namespace of its own (gone when it exits)."""
    if not _private_mount_works(tmp_path):
        pytest.skip("a private tmpfs mount needs `unshare -m` and CAP_SYS_ADMIN; chmod does not stop root")

    def run(options: str, *args: str | Path, at: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
        at.mkdir(parents=True, exist_ok=True)
        listing = tmp_path / "listing.txt"
        script = 'mount -t tmpfs -o "$1" lvllm-test "$2" || exit 99; m=$2; l=$3; shift 3; ' \
                 '"$@"; rc=$?; (cd "$m" && find . -mindepth 1) > "$l"; exit $rc'
        p = lvllm(*args, prefix=("unshare", "-m", "sh", "-c", script, "sh", options, str(at), str(listing), LVLLM))
        assert p.returncode != 99, p.stderr
        return p, listing.read_text().split()

    return run


# --- lvllm quantize ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.5, 2], ids=["config-64-tensors-128", "config-256-tensors-128"])
def test_config_expert_size_unlike_the_tensors(zoo, tmp_path, factor):
    """Cause 1: found when the checkpoint is opened, before anything is written (it kept 64 of 128 rows and marked
    the store complete, or crashed mid-write)."""
    src = shutil.copytree(zoo("qwen3_moe", "bf16"), tmp_path / "model")
    config = json.loads((src / "config.json").read_text())
    config["moe_intermediate_size"] = int(config["moe_intermediate_size"] * factor)
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "store"
    one_error_line(lvllm("quantize", src, out), 1, "has shape", "config.json implies",
                   f"expert intermediate size {config['moe_intermediate_size']}")
    assert not out.exists()


def test_a_file_as_the_output_dir(zoo, tmp_path):
    out = tmp_path / "store"
    out.write_text("mine")
    one_error_line(lvllm("quantize", zoo("qwen3_moe", "bf16"), out), 1, "is a file, not a directory")
    assert out.read_text() == "mine"


def test_read_only_output(zoo, tmp_path, mounted):
    """Cause 4: the atomic writer's cleanup met EROFS and showed an OSError traceback."""
    ro = tmp_path / "ro"
    p, left = mounted("ro,size=1g", "quantize", zoo("qwen3_moe", "bf16"), ro / "store", at=ro)
    one_error_line(p, 1, "Read-only file system", "choose a writable")
    assert left == []
    p, left = mounted("ro,size=1g", "plan", "--recipe", "Qwen3-Coder-30B-A3B-Instruct", "--hardware",
                      Path(__file__).parent / "fixtures" / "hardware" / "h100-box.json", "--out", ro / "plan.json", at=ro)
    one_error_line(p, 1, "Read-only file system", "choose a writable")
    assert left == []


def test_disk_check_names_the_margin(zoo, tmp_path, mounted):
    """The check said "0.00 GB needed / 0.00 GB free" for a small store and hid its margin."""
    small = tmp_path / "small"
    p, left = mounted("size=16m", "quantize", zoo("qwen3_moe", "bf16"), small / "store", at=small)
    line = one_error_line(p, 1, "not enough disk space", f"plus a {format_bytes(quantize_mod.DISK_MARGIN)} margin")
    assert re.search(r"needs [0-9.]+ kB more .* 1[0-9.]+ MB free", line) and "0.00 GB" not in line, line
    assert left == []


def test_int4_group_128_over_two_nodes(zoo, tmp_path):
    """Cause 11: the per-node intermediate 64 is below the 128-group: stored as 64-groups (each scale twice)."""
    out = tmp_path / "store"
    p = lvllm("quantize", zoo("qwen3_moe", "int4", group_size=128), out, "--numa-nodes", "2", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert (summary["group_size"], summary["numa_nodes"], summary["verify"]["passed"]) == (64, 2, True)
    assert manifest_of(out)["quantized_group_size"] == 128 and manifest_of(out)["complete"] and not debris(out)


def test_ctrl_c_exits_130_naming_resume(zoo, tmp_path):
    """Ctrl-C exited 130 saying nothing. Now: one line with the command that finishes the store, which works."""
    src, out = zoo("qwen3_moe", "bf16"), tmp_path / "store"
    proc = subprocess.Popen([LVLLM, "quantize", str(src), str(out), "--workers", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, quantize_mod.TEST_DELAY_ENV: "0.3"})
    wait_for(files_listed(out, 1), proc)  # layer 0 finished, layer 1 converting
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 130,
                          "interrupted", "unfinished", "--resume")
    assert not manifest_of(out)["complete"] and not debris(out)
    command = shlex.split(line.split("finish it: ", 1)[1])
    assert command[:2] == ["lvllm", "quantize"] and command[-1] == "--resume"
    p = lvllm(*command[1:])
    assert p.returncode == 0 and manifest_of(out)["complete"] and not debris(out), p.stderr


def test_ctrl_c_of_serve_while_it_quantizes_exits_130(zoo, tmp_path):
    """`lvllm serve --quantize` stopped while it made the store printed "stopping vLLM ..." and exited 0 although
    vLLM never started. Now: one line, 130, and the same command finishes the store."""
    src, out = zoo("qwen3_moe", "bf16"), tmp_path / "store"
    args = [LVLLM, "serve", str(src), "--store", str(out), "--quantize", "--dry-run"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, quantize_mod.TEST_DELAY_ENV: "0.3"})
    wait_for(files_listed(out, 1), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    one_error_line(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), 130,
                   "interrupted before vLLM started", "same command")
    assert not manifest_of(out)["complete"] and not debris(out) and "stopping vLLM" not in stderr
    p = lvllm(*args[1:])
    assert p.returncode == 0 and manifest_of(out)["complete"] and not debris(out), p.stderr


def test_second_writer_is_refused_naming_the_pid(zoo, tmp_path):
    """Cause 8: a second `--resume` while the first ran crashed the first and left a temp file in the finished
    store. Now the second is refused with the first's pid, and the first finishes untouched."""
    src, out = zoo("qwen3_moe", "bf16"), tmp_path / "store"
    first = subprocess.Popen([LVLLM, "quantize", str(src), str(out), "--workers", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, quantize_mod.TEST_DELAY_ENV: "0.1"})
    try:
        wait_for(lambda: (out / MANIFEST).is_file(), first)
        first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second needs to start
        one_error_line(lvllm("quantize", src, out, "--resume"), 1, "being written by another lvllm quantize",
                       f"(pid {first.pid})", "--resume")
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert manifest_of(out)["complete"] and not debris(out)


KILL_IN_MANIFEST_WRITE = """
import os, signal, sys
from lvllm_cli.app import main
real, writes = os.replace, []
def replace(src, dst):
    if str(dst).endswith("lvllm.json"):
        writes.append(dst)
        if len(writes) == 2:  # the manifest that lists layer 0: its temp file is written, the rename never comes
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
sys.argv = ["lvllm", *sys.argv[1:]]
main()
"""


def test_kill_in_the_manifest_write_then_resume(zoo, tmp_path):
    """Cause 7: kill -9 between the manifest's temp file and its rename; `--resume` removes every stale temp file
    (this run's, and one an earlier killed run left) and the store equals one made in a single run."""
    src, out = zoo("qwen3_moe", "bf16"), tmp_path / "store"
    args = ("quantize", src, out, "--workers", "1")
    p = lvllm(*args, prefix=(sys.executable, "-c", KILL_IN_MANIFEST_WRITE), env={quantize_mod.TEST_DELAY_ENV: "0.05"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert f".{MANIFEST}.partial-" in " ".join(debris(out)) and not manifest_of(out)["complete"]
    (out / "layers" / ".L001.n0.safetensors.partial-999999").write_bytes(b"\0" * 1000)
    p = lvllm(*args, "--resume")
    assert p.returncode == 0, p.stderr
    assert manifest_of(out)["complete"] and not debris(out)
    clean = tmp_path / "clean"
    assert lvllm("quantize", src, clean, "--workers", "1").returncode == 0
    names = sorted(str(f.relative_to(clean)) for f in clean.rglob("*") if f.is_file())
    assert names == sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert all((clean / n).read_bytes() == (out / n).read_bytes() for n in names)


# --- lvllm serve: the store and the plan checked before vLLM starts ----------------------------------------------


def test_truncated_layer_file(served, tmp_path):
    """Cause 9: vLLM found it, and the user saw "vLLM exited with code 1"."""
    model, store = served
    copy = shutil.copytree(store, tmp_path / "store")
    layer = copy / "layers" / "L001.n0.safetensors"
    size = layer.stat().st_size
    layer.write_bytes(layer.read_bytes()[:-1000])
    one_error_line(lvllm("serve", model, "--store", copy, "--dry-run", cache=tmp_path / "cache"), 1,
                   f"L001.n0.safetensors is {size - 1000} bytes, the manifest says {size}", "--resume")
    assert not list((tmp_path / "cache").rglob("vllm-*.log"))


def test_bf16_store_the_engine_cannot_run(zoo, tmp_path):
    """Cause 9: a BF16 store whose per-node intermediate (96 / 2 = 48) is not a multiple of 32, as an lvllm before
    b3ba5f2 wrote it (quantize refuses to now): refused by serve before vLLM, which refused it inside."""
    model = zoo("qwen3_moe", "bf16", moe_intermediate_size=96)
    store = tmp_path / "store"
    ckpt = Checkpoint.open(model)
    options = quantize_mod.QuantizeOptions(weight_format="bf16", numa_nodes=1, workers=1)
    target = replace(quantize_mod._target_manifest(ckpt, options), numa_nodes=2)
    with StoreLock(store):
        quantize_mod._quantize_locked(time.monotonic(), ckpt, target, store, options, None)
    assert read_manifest(store).node_intermediate_size == 48
    one_error_line(lvllm("serve", model, "--store", store, "--dry-run", cache=tmp_path / "cache"), 1,
                   "48 per node", "multiples of 32", "--numa-nodes 1")


def test_flipped_bytes_caught_by_sha256(served, tmp_path):
    """Cause 10: 200 flipped bytes (size unchanged) were served. The sha256 is checked on the first start, with
    --verify-store, and after the manifest changed; a start in between checks sizes only (and says so)."""
    model, store = served
    copy, cache = shutil.copytree(store, tmp_path / "store"), tmp_path / "cache"
    files = len(read_manifest(copy).files)
    p = lvllm("serve", model, "--store", copy, "--dry-run", cache=cache)
    assert p.returncode == 0 and f"sha256 of {files} files" in p.stderr, p.stderr
    layer = copy / "layers" / "L001.n0.safetensors"
    data = bytearray(layer.read_bytes())
    data[-300:-100] = bytes(b ^ 0xFF for b in data[-300:-100])
    layer.write_bytes(bytes(data))
    p = lvllm("serve", model, "--store", copy, "--dry-run", cache=cache)
    assert p.returncode == 0 and f"sizes of {files} files checked" in p.stderr, p.stderr
    damaged = ("L001.n0.safetensors does not match its sha256", "--resume")
    one_error_line(lvllm("serve", model, "--store", copy, "--dry-run", "--verify-store", cache=cache), 1, *damaged)
    write_manifest(copy, read_manifest(copy))  # rewritten, as a --resume does: newer than the last verification
    one_error_line(lvllm("serve", model, "--store", copy, "--dry-run", cache=cache), 1, *damaged)


@pytest.mark.parametrize("content,words", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2, 3]", "JSON list, not an object"),
], ids=["binary", "list"])
def test_bad_plan_file(served, tmp_path, content, words):
    """Cause 5: UnicodeDecodeError and AttributeError tracebacks."""
    model, store = served
    plan = tmp_path / "plan.json"
    plan.write_bytes(content)
    one_error_line(lvllm("serve", model, "--store", store, "--plan", plan, "--dry-run", cache=tmp_path / "cache"), 1,
                   words, "lvllm plan")


def test_plan_beyond_the_models_positions(served, tmp_path):
    """Cause 2, from a plan file (an older lvllm's, or edited): vLLM refused it with its traceback."""
    model, store = served
    plan = planner.make_plan(model, topology.probe(), planner.PlanOptions(store=str(store), max_model_len=2048))
    plan["vllm"]["max_model_len"] = 8192
    save_plan(plan, tmp_path / "plan.json")
    one_error_line(lvllm("serve", model, "--store", store, "--plan", tmp_path / "plan.json", "--dry-run",
                         cache=tmp_path / "cache"), 1,
                   "max_model_len 8192", "max_position_embeddings 4096", "--max-model-len 4096")


@pytest.mark.vllm
@pytest.mark.slow
def test_store_the_plugin_refuses_is_the_one_line(zoo, tmp_path):
    """Cause 9: when vLLM dies of the plugin's error during load, that error is the line, not "vLLM exited with
    code 1". The plan was made for the whole store, which was then re-made for layer 1 only (`--layers 1-1`): it
    passes every check before vLLM, and the plugin refuses layer 0."""
    model, store, cache = zoo("qwen3_moe", "bf16"), tmp_path / "store", tmp_path / "cache"
    assert lvllm("quantize", model, store).returncode == 0
    plan = tmp_path / "plan.json"
    assert lvllm("plan", model, "--store", store, "--max-model-len", "512", "--out", plan).returncode == 0
    shutil.rmtree(store)
    assert lvllm("quantize", model, store, "--layers", "1-1").returncode == 0
    p = lvllm("serve", model, "--plan", plan, "--port", launcher.free_port(), "--", "--enforce-eager", cache=cache,
              timeout=900)
    line = one_error_line(p, 1, f"expert store {store} has no experts for vLLM layer", "layers.0.",
                          "lvllm quantize", "vLLM's log:")
    assert "exited with code" not in line, p.stderr
