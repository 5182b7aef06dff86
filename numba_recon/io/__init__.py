"""File formats: RELION STAR (``star.py``), THUNDER ``.thu`` (``thu.py``) and MRC (``mrc.py``).

The public readers and writers are re-exported here and imported on first use, so
``import numba_recon.io`` stays cheap. Every writer goes through :func:`atomic_output`: the file is
written under a hidden temporary name in the destination folder and moved onto the final name
only when complete, so an interrupted run never leaves a half-written file under the final name.
Each write is reported to the output manifest (:mod:`numba_recon.manifest`), which is what lets
``--overwrite`` remove exactly the files numba-recon wrote.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

from numba_recon import manifest
from numba_recon.errors import OutputError

__all__ = [
    "StackReader",
    "atomic_output",
    "read_star",
    "read_thu",
    "read_volume",
    "stack_shape",
    "write_stack",
    "write_star",
    "write_thu",
    "write_volume",
]

# public name -> submodule that defines it (imported lazily by __getattr__)
_LAZY = {
    "read_star": "star",
    "write_star": "star",
    "read_thu": "thu",
    "write_thu": "thu",
    "StackReader": "mrc",
    "stack_shape": "mrc",
    "read_volume": "mrc",
    "write_volume": "mrc",
    "write_stack": "mrc",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path next to ``path``, then move it into place.

    Parameters
    ----------
    path
        The final file name. Its folder is created if needed.
    overwrite
        If False, an existing ``path`` raises :class:`OutputError` before anything is written.

    Yields
    ------
    pathlib.Path
        A hidden temporary file name in the same folder (same file system, so the final
        ``os.replace`` is atomic). The caller writes it completely; if the ``with`` body raises,
        the temporary file is removed and ``path`` is left untouched.

    Raises
    ------
    OutputError
        ``path`` exists and ``overwrite`` is False, is a folder, or cannot be written.
    OSError
        ``ENOSPC`` (disk full) is re-raised unchanged so the command line can report it.
    """
    final = Path(path)
    if final.is_dir():
        raise OutputError("output path is a folder", final, "give a file name")
    if final.exists() and not overwrite:
        raise OutputError("output file exists", final, "pass --overwrite to replace it")
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create folder ({err.strerror})", folder, "choose a writable location") from None
    tmp = folder / f".{final.name}.{secrets.token_hex(4)}.tmp"
    # the output manifest (numba_recon.manifest) lists the temporary file while it is written and the
    # final file, with the temporary file's size and time (a rename keeps both), before the rename
    manifest.note_temporary(tmp)
    token = None
    try:
        yield tmp
        token = manifest.record_write(final, source=tmp)
        os.replace(tmp, final)
    except BaseException as err:
        manifest.undo(token)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            if err.errno == errno.ENOSPC:
                # name the final file, not the temporary one, in the "disk full" message
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(final)) from None
            raise OutputError(f"cannot write file ({err.strerror or err})", final,
                              "choose a writable location") from None
        raise
    finally:
        manifest.discard_temporary(tmp)
