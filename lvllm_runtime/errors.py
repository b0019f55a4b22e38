"""Exception types that carry the fix: the CLI turns each into one line and an exit code."""

from __future__ import annotations

import json
import re
import sys


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


# The plugin's errors happen inside vLLM's processes, where they end up in vLLM's log between its own tracebacks.
# The plugin logs each one as a line with this marker (`plugin_error_line`); `lvllm serve` finds it there
# (`find_plugin_error`) and reports it as its one line instead of "vLLM exited with code 1".
PLUGIN_ERROR_MARKER = "lvllm-error: "
_TRACEBACK_LINE = re.compile(r"lvllm_runtime\.errors\.(\w+): (.+)$")  # the last line of a traceback through vLLM


def plugin_error_line(e: LvllmError) -> str:
    """The marker line for `e`: the marker, then its type, message and fix as JSON."""
    return PLUGIN_ERROR_MARKER + json.dumps({"type": type(e).__name__, "message": e.message, "fix": e.fix})


def find_plugin_error(log: str) -> LvllmError | None:
    """The plugin's last error in a vLLM log: its marker line, else the last traceback line of an lvllm error
    (message and fix as its str() joined them); None when there is neither."""
    found: LvllmError | None = None
    for line in log.splitlines():
        if PLUGIN_ERROR_MARKER in line:
            try:
                d = json.loads(line[line.index(PLUGIN_ERROR_MARKER) + len(PLUGIN_ERROR_MARKER):])
                found = _error_type(d["type"])(str(d["message"]), d.get("fix"))
                continue
            except (ValueError, KeyError, TypeError):
                pass
        m = _TRACEBACK_LINE.search(line)
        if m and not (found and found.message in m.group(2)):  # the traceback repeats what the marker said
            found = _error_type(m.group(1))(m.group(2).strip())
    return found


def _error_type(name: str) -> type[LvllmError]:
    cls = getattr(sys.modules[__name__], name, None)
    return cls if isinstance(cls, type) and issubclass(cls, LvllmError) else LvllmError
