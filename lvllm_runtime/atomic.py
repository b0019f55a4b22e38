"""Write files so that a crash never leaves one that looks complete: temp name, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import BadInput, DoesNotFit, LvllmError


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The name a file is written under before it is renamed into place (ignored by every reader)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_failure(path: Path, e: OSError) -> LvllmError:
    """The one-line error for an OSError met while writing `path` (full disk, read-only or unwritable place)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DoesNotFit(f"the disk under {path.parent} is full (writing {path.name})", "free some space and run again")
    return BadInput(f"cannot write {path}: {e.strerror or e}", "choose a writable location")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it to `path`, on failure remove it. An OSError
    of the file system (read-only, full, no permission) becomes `write_failure`'s one-line error."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a read-only file system refuses even the unlink of a file never made
            tmp.unlink()
        if isinstance(e, OSError):
            raise write_failure(path, e) from None
        raise


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Atomically write `value` as indented JSON."""
    with atomic_open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=False)
        f.write("\n")
