"""`lvllm demo` end to end on a fresh cache directory: model, store, plan, real vLLM server, one chat answer."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from lvllm_runtime.store import ExpertStore


def processes_with_cache(cache: Path) -> list[psutil.Process]:
    """Processes that inherited LVLLM_CACHE_DIR=cache: every child of the demo, renamed ones (VLLM::Worker) too."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("LVLLM_CACHE_DIR") == str(cache) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_answers_and_leaves_nothing_running(tmp_path):
    cache = tmp_path / "cache"
    lvllm = shutil.which("lvllm", path=str(Path(sys.executable).parent)) or "lvllm"
    r = subprocess.run([lvllm, "demo", "--json"], capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "LVLLM_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)

    assert result["completion_tokens"] >= 1 and isinstance(result["answer"], str)
    assert result["engine_pids"]  # a vLLM process ran lvllm's engine on the store, not vLLM's own MoE
    assert set(result["timings"]) == {"model", "quantize", "plan", "vllm_start", "request", "shutdown"}
    assert all(t >= 0 for t in result["timings"].values())
    assert Path(result["model"]).is_relative_to(cache) and Path(result["store"]).is_relative_to(cache)
    assert ExpertStore.open(result["store"]).manifest.complete
    plan = json.loads(Path(result["plan_path"]).read_text())
    assert plan == result["plan"] and plan["store"]["path"] == result["store"]
    assert result["url"].startswith("http://127.0.0.1:")
    argv = shlex.split(result["command"])
    assert json.loads(argv[argv.index("--additional-config") + 1])["lvllm_plan"] == result["plan_path"]
    assert not processes_with_cache(cache)  # vLLM's server, engine core and workers are all gone
