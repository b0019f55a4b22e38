"""`lvllm demo`."""

from __future__ import annotations

from .output import not_implemented


def demo() -> None:
    """Not implemented yet."""
    not_implemented("demo", "issue 7")
