"""Durable file writes: a temporary of the writer's own, fsync-ed, renamed, and the folder fsync-ed."""

from __future__ import annotations

import contextlib
import os
import tempfile

TEMPORARY = ".tmp"
"""Suffix of the temporary files of atomic writes (a kill can leave them behind; a run removes them)."""

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically: a temporary file of its own (two writers never
    share one, and it gets the mode ``open`` would give) is written and fsync-ed, renamed over
    ``path``, and the folder is fsync-ed so that the rename survives a crash."""
    folder, name = os.path.split(os.fspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f"{name}.", suffix=TEMPORARY)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_folder(folder or ".")


def new_file_mode() -> int:
    """The mode ``open`` gives a new file under the process's umask (``mkstemp`` gives 0600)."""
    return 0o666 & ~_UMASK


def fsync_folder(path: str) -> None:
    """Makes a rename in ``path`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
