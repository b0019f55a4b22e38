"""`lvllm demo` as a library call: tiny zoo model -> expert store -> plan -> vLLM server -> one real chat request.

Everything is built under the cache directory (LVLLM_CACHE_DIR) and reused on the next run; the server runs on a
free local port and is always stopped, whatever fails.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Callable

from . import launcher
from .errors import EngineError

QUESTION = "Say hello to the people running lvllm."
# vLLM on the CPU loads a tiny model fastest without torch.compile; the answer needs only a few tokens.
DEMO_VLLM_ARGS = ("--enforce-eager",)
MAX_TOKENS = 24


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: where things are, the answer, and how long each stage took (seconds, wall clock)."""

    model: str
    store: str
    plan_path: str
    url: str
    command: str
    question: str
    answer: str
    completion_tokens: int
    engine_pids: list[int]  # vLLM processes that ran lvllm's CPU engine on the store (empty: plugin inactive)
    timings: dict[str, float]
    plan: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(
    *,
    port: int | None = None,
    on_stage: Callable[[str, str], None] | None = None,
    hold: Callable[[launcher.VllmServer], None] | None = None,
    ready_timeout: float = 900.0,
) -> DemoResult:
    """Run the whole pipeline once. `on_stage(stage, detail)` is called as each of model, quantize, plan,
    vLLM start, request, shutdown begins (and with vLLM's newest log line while it loads). `hold(server)`, when
    given, runs after the answer came back and before shutdown (`lvllm demo --keep` serves until Ctrl-C)."""
    from . import zoo

    stage = on_stage or (lambda name, detail: None)
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 3)
        clock = now

    launcher.require_vllm()
    stage("model", "tiny qwen3_moe (BF16) in the cache directory")
    model = zoo.demo_model()
    lap("model")

    stage("quantize", "expert store (INT4)")
    store = launcher.default_store_dir(model)
    if not launcher.store_complete(store):
        launcher.make_store(model, store, lambda detail: stage("quantize", detail))
    lap("quantize")

    port = port or launcher.free_port()
    setup = launcher.prepare(model, store=store, port=port, user_args=DEMO_VLLM_ARGS, on_stage=stage)
    lap("plan")

    server = launcher.VllmServer(setup.command, setup.log_path)
    try:
        stage("vLLM start", setup.command.display())
        server.start()
        server.wait_ready(ready_timeout, on_progress=lambda line: stage("vLLM start", line))
        engine_pids = server.engine_pids(setup.store)
        lap("vllm_start")

        stage("request", QUESTION)
        answer, tokens = chat(setup.command, QUESTION)
        lap("request")
        if hold is not None:
            hold(server)
            clock = time.monotonic()
    finally:
        stage("shutdown", f"pid {server.pid}")
        server.stop()
        lap("shutdown")

    return DemoResult(
        model=str(model), store=str(setup.store), plan_path=str(setup.plan_path), url=setup.command.url,
        command=setup.command.display(), question=QUESTION, answer=answer, completion_tokens=tokens,
        engine_pids=engine_pids, timings=timings, plan=setup.plan,
    )


def chat(command: launcher.ServeCommand, question: str, timeout: float = 120.0) -> tuple[str, int]:
    """One chat completion over HTTP; returns (answer text, completion tokens). EngineError unless an answer came."""
    body = {
        "model": command.served_model_name,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "min_tokens": 4,  # a random tiny model may emit end-of-text at once; the demo wants visible tokens
        "temperature": 0.0,
    }
    headers = {"Content-Type": "application/json"}
    if command.api_key:
        headers["Authorization"] = f"Bearer {command.api_key}"
    request = urllib.request.Request(
        command.url + "/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            reply = json.load(r)
    except urllib.error.HTTPError as e:
        raise EngineError(f"the chat request failed: HTTP {e.code} {e.read()[:300]!r}", "see the vLLM log") from None
    except (urllib.error.URLError, OSError) as e:
        raise EngineError(f"the chat request failed: {e}", "see the vLLM log") from None
    try:
        answer = reply["choices"][0]["message"]["content"] or ""
        tokens = int(reply["usage"]["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise EngineError(f"the chat reply has no answer: {str(reply)[:300]}", "see the vLLM log") from None
    if tokens < 1:
        raise EngineError("the chat reply has no tokens", "see the vLLM log")
    return answer, tokens
