"""File-system primitives below the output manifest: flushing a folder to the disk, and the
temporary-name-then-rename write the manifest uses for its own file (every other file goes
through :mod:`numba_recon.io.atomic`, which records it in the manifest)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to the disk; silently a no-op where the file
    system does not allow it."""
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


def replace_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, flush it, and rename it into place.

    Raises the ``OSError`` of a failed write after removing the temporary file; ``path`` is then
    left as it was.
    """
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
