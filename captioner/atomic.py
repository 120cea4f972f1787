"""Replacing a file atomically: write a temporary file next to it, then rename it over the target.

A process killed at any point leaves the previous file or the new one, never a torn one; the torn temporary
(`.NAME.XXXX<suffix>`) is left for the caller's clean-up to find. Checkpoints ask for `durable=True` (data and
rename fsynced: they must survive a power cut); a pack of image copies, which can be made again, does not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _default_file_mode() -> int:
    """What open() gives a new file under this process's umask (read once, at import, by setting it and
    putting it back). mkstemp makes its file private (0600); the finished file gets the usual mode instead."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _default_file_mode()


def write_atomically(path: Path, write: Callable[[BinaryIO], object], *, durable: bool = False,
                     temp_suffix: str = ".tmp") -> None:
    """Call write(handle) on a temporary file in `path`'s folder, then rename it over `path`. Raises OSError
    (the caller names its own error) and leaves `path` as it was when anything fails."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=temp_suffix, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        tmp = None
        if durable:
            _fsync_folder(path.parent)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def copy_atomically(source: Path, destination: Path) -> None:
    """Copy `source` over `destination` whole or not at all, durably. Raises OSError."""
    with open(source, "rb") as handle:
        write_atomically(Path(destination), lambda out: shutil.copyfileobj(handle, out), durable=True)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
