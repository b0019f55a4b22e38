"""Exception types that carry the fix: the CLI turns each into one line and an exit code."""

from __future__ import annotations


class LvllmError(Exception):
    """A user-facing failure: `message` says what is wrong, `fix` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


class BadInput(LvllmError):
    """A file, flag or directory the user gave cannot be used as it is."""


class UnsupportedArchitecture(BadInput):
    """The checkpoint's model_type is not in `arch.py`."""


class CorruptCheckpoint(BadInput):
    """A safetensors file or index that cannot be read as promised."""


class StoreError(LvllmError):
    """The expert store is missing, incomplete, or belongs to another model."""


class DoesNotFit(LvllmError):
    """Not enough RAM, VRAM or disk for what was asked."""


class EngineError(LvllmError):
    """The CPU engine cannot run this request on this machine."""


class VllmUnsupported(LvllmError):
    """vLLM is missing, or its version is outside the range the plugin knows."""
