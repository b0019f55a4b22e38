"""`lvllm serve`."""

from __future__ import annotations

from .output import not_implemented


def serve() -> None:
    """Not implemented yet."""
    not_implemented("serve", "issue 7")
