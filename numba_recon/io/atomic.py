"""The one way numba-recon writes a file: under a hidden temporary name in the destination folder,
moved onto the final name only when complete.

An interrupted command therefore never leaves a half-written file under a final name, and every
write is reported to the output manifest (:mod:`numba_recon.manifest`), which is what lets
``--overwrite`` remove exactly the files numba-recon wrote. ``durable=True`` (checkpoints and what
``--resume`` reads) also flushes the file and its folder to the disk before returning.

- :func:`atomic_output`: a context manager yielding the temporary path (any writer: MRC, STAR,
  HDF5, figures);
- :func:`atomic_write_text`, :func:`atomic_write_bytes`: whole small files;
- :func:`write_marker`: an empty marker file (``NUMBA_RECON_JOB_EXIT_SUCCESS``);
- :func:`write_error`: the one message for a failed write (disk full, quota, read-only...).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

from numba_recon import manifest
from numba_recon.errors import OutputError
from numba_recon.io.files import fsync_dir

_SPACE_FIX = ("free space or raise the limit, then continue with --resume (files already written are complete and "
              "intact)")
_WRITABLE_FIX = ("make the folder writable again (remount it read-write), then continue with --resume (files already "
                 "written are complete and intact)")
#: (problem, (text needles, errno needle), fix): the first match names the failure and its fix.
_WRITE_ERRORS = (
    ("no space left on device", ("no space left", "errno = 28"), _SPACE_FIX),
    ("disk quota exceeded", ("quota", "errno = 122"), _SPACE_FIX),
    ("file too large for the file-size limit", ("file too large", "errno = 27"), _SPACE_FIX),
    ("read-only file system", ("read-only file system", "errno = 30"), _WRITABLE_FIX),
    ("permission denied", ("permission denied", "errno = 13"), _WRITABLE_FIX),
    ("input/output error", ("input/output error", "errno = 5"),
     "check the disk (the kernel log names the device), then continue with --resume"),
)


def write_error(path: str | os.PathLike, err: BaseException) -> OutputError:
    """One clear :class:`OutputError` for a failed write of ``path`` (disk full, quota, file-size
    limit, read-only, I/O error), whatever layer raised it (the OS, or HDF5 through h5py)."""
    text = f"{getattr(err, 'strerror', None) or ''} {err}".lower()
    code = getattr(err, "errno", None)
    for problem, needles, fix in _WRITE_ERRORS:
        if any(n in text for n in needles) or (code is not None and f"errno = {code}" == needles[1]):
            break
    else:
        problem = f"cannot write ({getattr(err, 'strerror', None) or err})"
        fix = "check the output folder, then continue with --resume (files already written are complete and intact)"
    return OutputError(problem, Path(path), fix)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = True, durable: bool = False) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path next to ``path``, then move it into place.

    Parameters
    ----------
    path
        The final file name. Its folder is created if needed.
    overwrite
        If False, an existing ``path`` raises :class:`OutputError` before anything is written.
    durable
        Flush the finished file to the disk before the rename, and the folder after it.

    Yields
    ------
    pathlib.Path
        A hidden temporary file name in the same folder (same file system, so the final
        ``os.replace`` is atomic). The caller writes it completely; if the ``with`` body raises,
        the temporary file is removed and ``path`` is left untouched.

    Raises
    ------
    OutputError
        ``path`` exists and ``overwrite`` is False, is a folder, or cannot be written (with
        ``durable``, every failed write, named by :func:`write_error` with its cause and fix).
    OSError
        Without ``durable``, ``ENOSPC`` (disk full) is re-raised unchanged, naming ``path``, so
        the command line can report it.
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
    # the output manifest lists the temporary file while it is written and the final file, with the
    # temporary file's size and time (a rename keeps both), before the rename
    manifest.note_temporary(tmp)
    token = None
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        token = manifest.record_write(final, source=tmp)
        os.replace(tmp, final)
    except BaseException as err:
        manifest.undo(token)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            if durable:  # checkpoints and run records: the cause, and how to continue with --resume
                raise write_error(final, err) from None
            if err.errno == errno.ENOSPC:
                # name the final file, not the temporary one, in the "disk full" message
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(final)) from None
            raise OutputError(f"cannot write file ({err.strerror or err})", final,
                              "choose a writable location") from None
        raise
    finally:
        manifest.discard_temporary(tmp)
    if durable:
        fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_output`; returns ``path``."""
    with atomic_output(path, overwrite=overwrite, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True,
                       durable: bool = False) -> Path:
    """Write ``data`` to ``path`` with :func:`atomic_output`; returns ``path``."""
    with atomic_output(path, overwrite=overwrite, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_marker(path: str | os.PathLike) -> Path:
    """Write an empty marker file (replacing whatever has the name) and record it."""
    with atomic_output(path) as tmp:
        tmp.touch()
    return Path(path)


__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_text", "write_error", "write_marker"]
