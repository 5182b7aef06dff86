"""Shared pieces of the commands: error handling, output-folder checks, the parameter types of
their options, shared options and the map readers of the map commands."""

from __future__ import annotations

import errno
import functools
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from numba_recon.config import MAX_SEED
from numba_recon.errors import BackendUnavailableError, InputError, InputFileError, OutputError
from numba_recon.io.files import make_output_folder, refuse_output_folder

if TYPE_CHECKING:
    import numpy as np


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
    refuse_output_folder(out, overwrite)
    make_output_folder(out)
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


# --------------------------------------------------------------------------------------------
# parameter types: each option's rule lives in its type, so a bad value is refused while the
# command line is parsed, with one message naming the option, the value and the valid range
# --------------------------------------------------------------------------------------------

def option_name(param: click.Parameter | None) -> str:
    """The long spelling of an option (``--output`` rather than ``-o``), as ``--help`` lists it."""
    if param is None:
        return "value"
    return max(param.opts, key=len) if param.opts else param.human_readable_name


class OptionValueError(click.BadParameter):
    """A refused option value, shown as ``--option must be ... (got ...)``: the subject first, like
    the project's other one-line errors, where click would write ``Invalid value for '--option'``.

    A :class:`click.UsageError`, so :class:`~numba_recon.cli.LazyGroup` prints it as one line with
    exit status 2.
    """

    def format_message(self) -> str:
        return f"{option_name(self.param)} {self.message}"


def _interval(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{'>' if min_open else '>='} {minimum:g}"
    if maximum is not None:
        return f"{'<' if max_open else '<='} {maximum:g}"
    return ""


class FiniteNumber(click.ParamType):
    """A finite float (or, with ``integer``, an int) within optional bounds.

    NaN and infinity are refused outright: NaN compares False with everything and infinity passes
    ``> 0``, so a range check alone would let both through.

    Parameters
    ----------
    minimum, maximum, min_open, max_open
        The valid range; ``*_open`` excludes that bound.
    integer
        Whole numbers only (``1.5`` and ``1e3`` are refused, as click's ``INT`` does).
    requirement
        What a valid value is, after "must be" (default: built from the bounds).
    out_of_range
        Why a finite value outside the range is wrong, in the user's terms (default: nothing more).
    hint
        How to fix it; ``{option}`` is replaced by the option's name.
    name
        The type's name; ``--help`` shows it upper-cased as the metavar.
    """

    def __init__(self, minimum: float | None = None, maximum: float | None = None, *, min_open: bool = False,
                 max_open: bool = False, integer: bool = False, requirement: str | None = None,
                 out_of_range: str | None = None, hint: str | None = None, name: str | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.min_open, self.max_open = min_open, max_open
        self.integer = integer
        kind = "an integer" if integer else "a finite number"
        self.requirement = requirement or f"{kind} {_interval(minimum, maximum, min_open, max_open)}".strip()
        self.out_of_range = out_of_range
        self.hint = hint
        self.name = name or ("integer" if integer else "float")

    def __repr__(self) -> str:
        return f"FiniteNumber({self.requirement!r})"

    def parse(self, value: Any) -> tuple[float | int | None, str | None]:
        """``(number, None)`` for a valid value, else ``(None, why)``; ``why`` may be ``""``."""
        if isinstance(value, bool):
            return None, "not a number"
        if self.integer:
            if isinstance(value, int):
                number: float | int = value
            else:
                try:
                    number = int(str(value).strip())
                except ValueError:
                    try:
                        float(value)
                    except (TypeError, ValueError):
                        return None, "not a number"
                    return None, "not a whole number"
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                return None, "not a number"
            if not math.isfinite(number):
                return None, "not finite"
        if self.minimum is not None and (number <= self.minimum if self.min_open else number < self.minimum):
            return None, self.out_of_range or ""
        if self.maximum is not None and (number >= self.maximum if self.max_open else number > self.maximum):
            return None, self.out_of_range or ""
        return number, None

    def message(self, value: Any, why: str, option: str) -> str:
        """``must be <requirement> (got <value>[: <why>])[; <hint>]`` (the option is named by the caller)."""
        if why == "not a number":
            shown = repr(value)  # quoted: an empty or blank value stays visible
        else:
            shown = value.strip() if isinstance(value, str) else str(value)
        text = f"must be {self.requirement} (got {shown}{': ' + why if why else ''})"
        return f"{text}; {self.hint.format(option=option)}" if self.hint else text

    def check(self, option: str, value: Any) -> float | int:
        """The same rule outside click (values from Python callers): raise :class:`InputError`."""
        number, why = self.parse(value)
        if why is not None:
            raise InputError(f"{option} {self.message(value, why, option)}")
        return number

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | int:
        number, why = self.parse(value)
        if why is not None:
            raise OptionValueError(self.message(value, why, option_name(param)), ctx=ctx, param=param)
        return number


#: A pixel (voxel) size: finite, > 0, Angstrom.
PIXEL_SIZE = FiniteNumber(0, min_open=True, requirement="a finite number of Angstrom > 0",
                          out_of_range="not a positive pixel size",
                          hint="give the pixel size in Angstrom, e.g. {option} 1.06", name="angstrom")
#: A resolution (a low-pass, a B-factor fit limit): finite, > 0, Angstrom.
RESOLUTION_ANGSTROM = FiniteNumber(0, min_open=True, requirement="a finite positive resolution in Angstrom",
                                   name="angstrom")
POSITIVE_FLOAT = FiniteNumber(0, min_open=True)
NONNEGATIVE_FLOAT = FiniteNumber(0)
FINITE_FLOAT = FiniteNumber()
POSITIVE_INT = FiniteNumber(1, integer=True, requirement="positive, an integer >= 1")
NONNEGATIVE_INT = FiniteNumber(0, integer=True)
#: A share of a set: in (0, 1].
FRACTION = FiniteNumber(0, 1, min_open=True, requirement="a fraction in (0, 1]", name="fraction")
#: An FSC value used as a threshold: strictly between 0 and 1.
FSC_VALUE = FiniteNumber(0, 1, min_open=True, max_open=True)
#: Seeds are stored as signed 64-bit integers (checkpoints, summaries).
SEED = FiniteNumber(0, MAX_SEED, integer=True, requirement=f"an integer from 0 to {MAX_SEED}")


overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
angpix_option = click.option("--angpix", type=PIXEL_SIZE, default=None,
                             help="Pixel size in Angstrom (overrides or supplies the file's value).")


# --------------------------------------------------------------------------------------------
# maps and masks of the map commands (fsc, mask, lowpass, postprocess, locres)
# --------------------------------------------------------------------------------------------

def check_angpix(angpix: float | None) -> None:
    """Refuse an ``--angpix`` that is not a finite positive number (``None`` means: from the header).

    The options are typed :data:`PIXEL_SIZE`; this applies the same rule to Python callers.
    """
    if angpix is not None:
        PIXEL_SIZE.check("--angpix", angpix)


def read_map(path: str, angpix: float | None) -> tuple[np.ndarray, float]:
    """Read a cubic map and its voxel size (``angpix`` overrides the header).

    Raises
    ------
    InputError
        ``angpix`` is not a finite positive number.
    InputFileError
        Unreadable or non-cubic map, or no valid voxel size in the header and no ``--angpix``.
    """
    from numba_recon.io.mrc import read_volume

    check_angpix(angpix)
    volume, header_angpix = read_volume(path)
    if angpix is not None:
        return volume, float(angpix)
    if header_angpix is None or not (math.isfinite(header_angpix) and header_angpix > 0):
        raise InputFileError("the header does not give the voxel size", path, "pass --angpix")
    return volume, float(header_angpix)


def read_map_pair(path1: str, path2: str, angpix: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Read two maps that must share box and voxel size (the header sizes are compared unless
    ``angpix`` is given, which then applies to both)."""
    map1, angpix1 = read_map(path1, angpix)
    map2, angpix2 = read_map(path2, angpix)
    if map1.shape != map2.shape:
        raise InputFileError(f"box {map2.shape[0]} differs from the box {map1.shape[0]} of {path1}", path2,
                             "compare maps of the same reconstruction (same box size)")
    if abs(angpix1 - angpix2) > 1e-3 * angpix1:
        raise InputFileError(f"voxel size {angpix2:g} A differs from {angpix1:g} A of {path1}", path2,
                             "compare maps with the same voxel size, or pass --angpix to override both headers")
    return map1, map2, angpix1


def read_mask(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read a mask that must match ``shape`` and hold values in [0, 1]."""
    from numba_recon.evaluate.fsc import check_mask
    from numba_recon.io.mrc import read_volume

    mask, _ = read_volume(path)
    if mask.shape != tuple(shape):
        raise InputFileError(f"mask box {mask.shape[0]} differs from the map box {shape[0]}", path,
                             "make the mask from a map of the same box (numba-recon mask)")
    try:
        return check_mask(mask, shape)
    except InputError as err:
        raise InputFileError(err.problem, path, err.fix) from None
