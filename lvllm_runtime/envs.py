"""Every LVLLM_* environment variable, read in one place.

LVLLM_VIRTUAL_NUMA=N  split the online cores into N virtual NUMA nodes (RAM divided evenly) so multi-node logic
                      runs on one-node machines.
LVLLM_DEBUG=1         show tracebacks instead of one-line errors.
LVLLM_CACHE_DIR       where `lvllm demo` and tests keep generated models (default ~/.cache/lvllm).
"""

from __future__ import annotations

import os
from pathlib import Path


def virtual_numa_nodes() -> int | None:
    raw = os.environ.get("LVLLM_VIRTUAL_NUMA", "").strip()
    if not raw:
        return None
    from .errors import BadInput

    try:
        n = int(raw)
    except ValueError:
        raise BadInput(f"LVLLM_VIRTUAL_NUMA={raw!r} is not a number", "set it to a node count such as 2") from None
    if n < 1:
        raise BadInput(f"LVLLM_VIRTUAL_NUMA={n} must be at least 1", "set it to a node count such as 2")
    return n


def debug() -> bool:
    return os.environ.get("LVLLM_DEBUG", "") not in ("", "0")


def cache_dir() -> Path:
    return Path(os.environ.get("LVLLM_CACHE_DIR") or Path.home() / ".cache" / "lvllm")
