"""`lvllm plan`."""

from __future__ import annotations

from .output import not_implemented


def plan() -> None:
    """Not implemented yet."""
    not_implemented("plan", "issue 5")
