"""Shared fixtures: zoo checkpoints are built once per session into a temp dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """zoo(model_type="qwen3_moe", variant="bf16", seed=0, **overrides) -> checkpoint directory, built once per
    session (lvllm_runtime.zoo.build is a no-op on a complete build)."""
    from lvllm_runtime import zoo as zoo_module

    root = tmp_path_factory.mktemp("zoo")

    def get(model_type: str = "qwen3_moe", variant: str = "bf16", seed: int = 0, **overrides: Any) -> Path:
        tag = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8] if overrides else "base"
        return zoo_module.build(model_type, root / f"{model_type}-{variant}-s{seed}-{tag}", variant, seed, **overrides)

    return get


@pytest.fixture(scope="module")
def one_torch_thread():
    """The thread budget (engine.py): torch's OpenMP threads spinning on the engine's pinned cores slow both ~50x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
