"""Shared pieces of the commands: error handling, output-folder checks, shared options."""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from numba_recon.errors import BackendUnavailableError, InputError, OutputError


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with ``code`` (2 = bad input).

    Under MPI with several ranks the whole job is aborted with that code, so the other ranks do not
    wait forever for the one that failed.
    """
    click.echo(f"numba-recon: error: {message}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            world = mpi.COMM_WORLD
            if world.Get_size() > 1:
                world.Abort(code)
        except Exception:
            pass
    raise SystemExit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's input errors into one stderr line and exit status 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (InputError, BackendUnavailableError) as err:
            fail(str(err), getattr(err, "exit_code", 2))
        except MemoryError:
            fail("out of memory; use a smaller --batch-size or fewer particles per rank", 1)
        except OSError as err:
            space = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                     errno.EFBIG: "file too large for the file-size limit"}
            writable = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                        errno.EPERM: "operation not permitted"}
            if err.errno in space:
                fail(f"{err.filename or 'output'}: {space[err.errno]}; free space or raise the limit and "
                     "rerun (files already written are complete and intact)", 2)
            if err.errno in writable:
                fail(f"{err.filename or 'output'}: {writable[err.errno]}; make the folder writable (remount it "
                     "read-write) or choose another location, and rerun (files already written are complete and "
                     "intact)", 2)
            raise

    return wrapper


def prepare_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Create an output folder; refuse a non-empty existing one unless ``overwrite``.

    Raises :class:`OutputError` when the path is a file, not writable, or exists without
    ``--overwrite``.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError("output folder is an existing file", out, "choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError("output folder exists and is not empty", out,
                          "pass --overwrite to replace its results, or choose another -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder ({err.strerror})", out,
                          "choose a writable location") from None
    if not os.access(out, os.W_OK):
        raise OutputError("output folder is not writable", out, "choose a writable location")
    return out


def check_output_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to overwrite an existing output file without ``--overwrite``; make its folder."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputError("output file exists", p, "pass --overwrite to replace it")
    if p.is_dir():
        raise OutputError("output path is a folder", p, "give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create folder ({err.strerror})", p.parent, "choose a writable location") from None
    return p


overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
angpix_option = click.option("--angpix", type=float, default=None,
                             help="Pixel size in Angstrom (overrides or supplies the file's value).")
