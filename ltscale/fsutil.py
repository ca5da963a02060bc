"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

Temp file in the same directory, fsync, ``os.replace``, fsync of the directory. The file gets the
mode the user's umask gives a new file (``mkstemp`` alone would make it 0600).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def chmod_to_umask(path: str | Path) -> Path:
    """Give a file we just wrote the mode a plain ``open()`` would have given it.

    Why: some writers create private files whatever the umask - safetensors' ``save_file`` makes
    them 0600 - so a group that shares a run dir could not read the weights. Symlinks are
    left alone (``chmod`` would change their target).
    """
    path = Path(path)
    if path.is_file() and not path.is_symlink():
        os.chmod(path, _umask_mode())
    return path


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path
