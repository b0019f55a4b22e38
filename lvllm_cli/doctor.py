"""`lvllm doctor`."""

from __future__ import annotations

from .output import not_implemented


def doctor() -> None:
    """Not implemented yet."""
    not_implemented("doctor", "issue 2")
