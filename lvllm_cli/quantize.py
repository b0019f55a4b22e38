"""`lvllm quantize`."""

from __future__ import annotations

from .output import not_implemented


def quantize() -> None:
    """Not implemented yet."""
    not_implemented("quantize", "issue 4")
