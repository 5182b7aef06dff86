"""File-system primitives below the output manifest: flushing a folder to the disk, the
temporary-name-then-rename write the manifest uses for its own file (every other file goes
through :mod:`numba_recon.io.atomic`, which records it in the manifest), and the checks of a
command's output folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from numba_recon.errors import OutputError


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


def refuse_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output folder path that is an existing file, or a non-empty folder unless
    ``overwrite``; raises :class:`~numba_recon.errors.OutputError`."""
    if out.exists() and not out.is_dir():
        raise OutputError("output folder is an existing file", out, "choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError("output folder exists and is not empty", out,
                          "pass --overwrite to replace its results, or choose another -o")


def make_output_folder(out: Path) -> None:
    """Create the output folder ``out`` (and its parents) if needed and check that it is writable;
    raises :class:`~numba_recon.errors.OutputError` when it cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder ({err.strerror})", out,
                          "choose a writable location") from None
    if not os.access(out, os.W_OK):
        raise OutputError("output folder is not writable", out, "choose a writable location")
