"""MRC images, stacks and maps (via ``mrcfile``), strict by default.

Arrays are indexed ``[n, y, x]`` (stacks) and ``[z, y, x]`` (maps), x being the column, as
``mrcfile`` returns them. Only the requested images of a stack are read, so data sets far larger
than memory work. Every problem a user can cause (missing, truncated or corrupt
file, NaN pixels, wrong shape) raises :class:`~numba_recon.errors.InputFileError` naming the file.

Writers produce files that ``mrcfile.validate`` accepts and that RELION and ChimeraX read with the
right voxel size: float32 (mode 2), ``mx = nx`` (the voxel size is ``cella / mx``), origin 0,
``ispg = 1`` for maps and ``0`` for stacks, a ``numba-recon <version>`` label, and header
statistics filled in.
"""

from __future__ import annotations

import os
import stat
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import mrcfile
import numpy as np
from mrcfile import utils as mrc_utils

from numba_recon.checks import finite_above
from numba_recon.errors import InputFileError
from numba_recon.io.atomic import atomic_output

__all__ = [
    "MAX_OPEN_STACKS",
    "StackReader",
    "default_max_open",
    "factorize_paths",
    "mrc_header",
    "non_regular_kind",
    "read_volume",
    "stack_shape",
    "write_stack",
    "write_volume",
]

_HEADER_BYTES = 1024
# bounds of the default number of stacks a StackReader keeps open
_MIN_OPEN = 64
_MAX_OPEN = 16384


def default_max_open() -> int:
    """Stacks a :class:`StackReader` keeps open by default: a quarter of the soft ``RLIMIT_NOFILE``.

    Large data sets have thousands of stacks; every stack beyond the cache is reopened for each
    minibatch that touches it. A quarter of the per-process limit leaves room for the other files
    of the run (MPI, HDF5, logs). At least 64 (also where the limit cannot be read), at most 16384.
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return _MIN_OPEN
    if soft == resource.RLIM_INFINITY or soft < 0:
        return _MAX_OPEN
    return int(min(_MAX_OPEN, max(_MIN_OPEN, soft // 4)))


#: Stacks kept open at once by :class:`StackReader` by default (see :func:`default_max_open`).
MAX_OPEN_STACKS = default_max_open()
_REEXTRACT = "re-copy the file or re-extract the particles"


@dataclass(frozen=True)
class MrcHeader:
    """What numba-recon needs from an MRC header, checked against the file size.

    Attributes
    ----------
    nx, ny, nz
        Columns, rows and sections (images of a stack, z of a map).
    dtype
        Data type of the stored values (byte order as stored).
    ispg
        Space group: 0 for image stacks, 1 for single maps (not trusted to tell them apart).
    voxel_size_angstrom
        ``(x, y, z)`` voxel size from ``cella / (mx, my, mz)``; 0 where the header has none (or
        one that is not a positive finite number, e.g. ``mx = 0``).
    data_offset
        Byte offset of the first data value: the 1024-byte header plus the extended header.
    """

    nx: int
    ny: int
    nz: int
    dtype: np.dtype
    ispg: int
    voxel_size_angstrom: tuple[float, float, float]
    data_offset: int = _HEADER_BYTES


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def non_regular_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is not a regular file: ``"folder"``, ``"named pipe"``,
    ``"character device"``, ``"block device"``, ``"socket"`` or ``"special file"``; None for a
    regular file (or a link to one) and for a path that cannot be looked up.

    Readers check this before opening: opening a named pipe blocks until something writes to it,
    and a device such as ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, no permission, NUL in the name: the caller's open reports it
        return None
    if stat.S_ISREG(mode):
        return None
    for is_kind, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
                          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if is_kind(mode):
            return kind
    return "special file"


def mrc_header(path: str | os.PathLike) -> MrcHeader:
    """Read and check an MRC header without touching the data.

    Raises
    ------
    InputFileError
        The file is missing, is not a regular file (a folder, named pipe or device), is not an MRC
        file, has an unsupported data mode (complex or packed), or is shorter than its header
        declares (truncated copy).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputFileError("file not found", p, "check the path")
    if os.path.isdir(p):
        raise InputFileError("is a folder, not an MRC file", p, "give the path of an .mrc or .mrcs file")
    kind = non_regular_kind(p)
    if kind is not None:
        raise InputFileError(f"is a {kind}, not a regular file", p, "give the path of an .mrc or .mrcs file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # strict mode raises on real problems; hide cosmetic warnings
            with mrcfile.open(p, mode="r", header_only=True, permissive=False) as mrc:
                header = mrc.header.copy()
                with np.errstate(divide="ignore", invalid="ignore"):  # mx = 0: handled by _voxel
                    voxel = mrc.voxel_size
    except (ValueError, OSError, EOFError) as err:
        raise InputFileError(f"not a readable MRC file ({_first_line(err)})", p,
                             f"check that it is a complete MRC file; {_REEXTRACT}") from None
    try:
        dtype = mrc_utils.data_dtype_from_header(header)
    except ValueError:
        raise InputFileError(f"unsupported MRC data mode {int(header.mode)}", p,
                             "convert it to mode 2 (float32) or mode 12 (float16)") from None
    if dtype.kind == "c":
        raise InputFileError(f"complex MRC data (mode {int(header.mode)}) cannot be used", p,
                             "give real-space images or maps")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise InputFileError(f"header declares an empty data block ({nz} x {ny} x {nx})", p, _REEXTRACT)
    expected = _HEADER_BYTES + int(header.nsymbt) + nx * ny * nz * dtype.itemsize
    actual = os.path.getsize(p)
    if actual < expected:
        raise InputFileError(
            f"file is truncated: its header declares {nz} x {ny} x {nx} values of {dtype.name} "
            f"({expected} bytes) but the file has {actual} bytes", p, _REEXTRACT)
    return MrcHeader(nx=nx, ny=ny, nz=nz, dtype=dtype, ispg=int(header.ispg),
                     voxel_size_angstrom=(_voxel(voxel.x), _voxel(voxel.y), _voxel(voxel.z)),
                     data_offset=_HEADER_BYTES + int(header.nsymbt))


def _voxel(value: object) -> float:
    """A voxel size from ``cella / m``, or 0 ("not set") when it is not a positive finite number.

    ``m = 0`` (a corrupt or hand-made header) gives infinity or NaN, a negative ``cella`` a
    negative size; callers treat 0 as missing and ask for the pixel size instead.
    """
    v = float(value)
    return v if finite_above(v) else 0.0


def factorize_paths(paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and distinct values of an ``(n,)`` array of paths, by hashing.

    Avoids ``np.unique(paths.astype(str))``, whose fixed-width copy of a million long paths
    takes gigabytes.

    Returns
    -------
    codes
        ``(n,)`` int64 index into ``uniques``.
    uniques
        Distinct paths (object array of str) in order of first appearance.
    """
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(np.asarray(paths, dtype=object).reshape(-1), dtype=object), sort=False)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def stack_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """Shape ``(n_images, ny, nx)`` of an image stack from its header alone.

    A single 2D image counts as a stack of one. The file size is checked against the header.

    Raises
    ------
    InputFileError
        Missing, corrupt or truncated file (see :func:`mrc_header`).
    """
    h = mrc_header(path)
    return h.nz, h.ny, h.nx


#: Read images with ``os.preadv`` (True) or by indexing a memory map of the stack (False, and where
#: the platform has no ``preadv``). Reading through the map leaves every touched page mapped into the
#: process until the kernel reclaims it; with large page-cache folios one image read maps up to a
#: few MB, so the resident set grows with the data read, not with the batch.
READ_WITH_PREAD = hasattr(os, "preadv")


@dataclass(frozen=True, slots=True)
class _StackLayout:
    """Where the images of a validated stack are: enough to read them without parsing the header."""

    offset: int  # first data byte (after the extended header)
    shape: tuple[int, int, int]  # (n_images, ny, nx)
    dtype: np.dtype  # as stored, byte order included
    identity: tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns) of the validated file


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _OpenStack:
    """An open stack: its file descriptor, its layout, and a memory map made only when needed."""

    __slots__ = ("fd", "layout", "_map", "_data")

    def __init__(self, fd: int, layout: _StackLayout) -> None:
        self.fd = fd
        self.layout = layout
        self._map = None
        self._data: np.ndarray | None = None

    def mapped(self) -> np.ndarray:
        """The ``(n, ny, nx)`` images as a read-only memory map (for ``READ_WITH_PREAD = False``)."""
        if self._data is None:
            import mmap

            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            self._data = np.ndarray(self.layout.shape, dtype=self.layout.dtype, buffer=self._map,
                                    offset=self.layout.offset)
        return self._data

    def close(self) -> None:
        self._data = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere; the map goes with it
                pass
            self._map = None
        os.close(self.fd)


def _pread_images(fd: int, path: str, layout: _StackLayout, wanted: np.ndarray) -> np.ndarray:
    """Images ``wanted`` (sorted, 0-based) of a stack with ``layout``, read with ``preadv``.

    Consecutive indices are read in one call. Returns ``(len(wanted), ny, nx)`` in the file's dtype.

    Raises
    ------
    InputFileError
        The file is shorter than its header says (it changed after it was opened).
    """
    _, ny, nx = layout.shape
    buf = np.empty((wanted.size, ny, nx), dtype=layout.dtype)
    image_bytes = ny * nx * layout.dtype.itemsize
    breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
    for run in np.split(np.arange(wanted.size), breaks):
        first, count = int(wanted[run[0]]), run.size
        view = memoryview(buf[run[0]:run[0] + count]).cast("B")
        start = layout.offset + first * image_bytes
        got = os.preadv(fd, [view], start)
        while 0 < got < len(view):  # a short read is legal; continue where it stopped
            more = os.preadv(fd, [view[got:]], start + got)
            if more == 0:
                break
            got += more
        if got != len(view):
            raise InputFileError(f"image {first + 1} could not be read (file shorter than its header says)",
                                 path, _REEXTRACT)
    return buf


class StackReader:
    """Reads particle images from many MRC stacks, only the images asked for.

    The first time a stack is used its header is validated (:func:`mrc_header`: missing, corrupt,
    truncated or unsupported files raise) and its layout (data offset, shape, dtype and byte
    order) is kept for the life of the reader, a few hundred bytes per stack. Open stacks are kept
    in a least-recently-used cache of at most ``max_open`` file descriptors (data sets can have
    thousands of stacks); reopening an evicted stack is one ``os.open`` plus an ``fstat`` that
    checks the file is still the one validated (same inode, size and modification time; otherwise
    it is validated again). Reads are grouped by stack and sorted by index so each stack is read
    sequentially. The bytes are read with ``os.preadv`` into a buffer of the batch's size (see
    :data:`READ_WITH_PREAD`), so the process's resident memory does not grow with the amount of
    data read (file pages read through a map stay counted in its RSS, which batch systems may
    enforce).

    Parameters
    ----------
    max_open
        Maximum number of stacks kept open; default :func:`default_max_open` (a quarter of the
        open-file limit, at least 64).

    Examples
    --------
    >>> with StackReader() as reader:                                   # doctest: +SKIP
    ...     images = reader.read(particles.stack_paths[:8], particles.stack_indices[:8], 128)
    """

    def __init__(self, max_open: int | None = None) -> None:
        if max_open is None:
            max_open = default_max_open()
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.max_open = int(max_open)
        self._open: OrderedDict[str, _OpenStack] = OrderedDict()
        self._layouts: dict[str, _StackLayout] = {}

    def __enter__(self) -> "StackReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}  # open files do not travel; reopened (and revalidated) on demand

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])

    @property
    def n_open(self) -> int:
        """Number of stacks currently open."""
        return len(self._open)

    def close(self) -> None:
        """Close every open stack (their validated layouts are kept)."""
        while self._open:
            _, stack = self._open.popitem(last=False)
            stack.close()

    def _stack(self, path: str) -> _OpenStack:
        """The open stack at ``path``, opening (and on first use validating) it if needed."""
        entry = self._open.get(path)
        if entry is not None:
            self._open.move_to_end(path)
            return entry
        try:
            # O_NONBLOCK: a named pipe must not wait here for a writer (mrc_header below refuses it);
            # regular files ignore the flag
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as err:
            mrc_header(path)  # missing file or folder: the usual message
            raise InputFileError(f"cannot open the file ({err.strerror})", path,
                                 "check the path and permissions") from None
        try:
            identity = _identity(os.fstat(fd))
            layout = self._layouts.get(path)
            if layout is None or layout.identity != identity:
                layout = self._validate(path, identity)
                self._layouts[path] = layout
        except BaseException:
            os.close(fd)
            raise
        entry = self._open[path] = _OpenStack(fd, layout)
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return entry

    @staticmethod
    def _validate(path: str, identity: tuple[int, int, int, int]) -> _StackLayout:
        h = mrc_header(path)  # missing / corrupt / truncated -> InputFileError naming the file
        if 401 <= h.ispg <= 630:  # MRC volume stack: (n, z, y, x)
            raise InputFileError(f"is a stack of 3D volumes (space group {h.ispg}), not of 2D images", path,
                                 "give an .mrcs stack of 2D images")
        return _StackLayout(offset=h.data_offset, shape=(h.nz, h.ny, h.nx), dtype=h.dtype, identity=identity)

    def read(self, stack_paths: np.ndarray, indices: np.ndarray, box_size: int,
             out: np.ndarray | None = None) -> np.ndarray:
        """Read images ``indices[i]`` (0-based) of stacks ``stack_paths[i]``.

        Parameters
        ----------
        stack_paths
            ``(b,)`` object array of stack file paths (str).
        indices
            ``(b,)`` int64, 0-based image index in each stack.
        box_size
            Expected image side ``N``; every stack must hold ``N x N`` images.
        out
            Optional ``(b, N, N)`` float32 C-contiguous array to fill (avoids an allocation).

        Returns
        -------
        numpy.ndarray
            ``(b, N, N)`` float32 in native byte order, in the order of the inputs. float16,
            int16, int8 and byte-swapped data are converted.

        Raises
        ------
        InputFileError
            Missing/corrupt/truncated stack, index outside the stack, wrong image size, or an
            image with NaN or infinite pixels (the message names the file and the 1-based index).
        """
        paths = np.asarray(stack_paths, dtype=object).reshape(-1)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if paths.shape != idx.shape:
            raise ValueError(f"stack_paths {paths.shape} and indices {idx.shape} differ in length")
        n, N = len(idx), int(box_size)
        if out is None:
            out = np.empty((n, N, N), dtype=np.float32)
        elif out.shape != (n, N, N) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(n, N, N)}")
        if n == 0:
            return out
        group, unique_paths = factorize_paths(paths)
        for g, path in enumerate(unique_paths):
            path = str(path)
            rows = np.flatnonzero(group == g)
            rows = rows[np.argsort(idx[rows], kind="stable")]  # sequential reads within a stack
            stack = self._stack(path)
            n_images, ny, nx = stack.layout.shape
            if (ny, nx) != (N, N):
                raise InputFileError(f"images are {ny} x {nx} pixels, expected {N} x {N}", path,
                                     "use stacks with one box size matching rlnImageSize")
            wanted = idx[rows]
            if wanted[0] < 0 or wanted[-1] >= n_images:
                bad = wanted[-1] if wanted[-1] >= n_images else wanted[0]
                raise InputFileError(f"image {bad + 1} requested but the stack holds {n_images} images", path,
                                     "check the index@stack entries of the particle file")
            if READ_WITH_PREAD:
                out[rows] = _pread_images(stack.fd, path, stack.layout, wanted)  # converts type and byte order
            else:
                out[rows] = stack.mapped()[wanted]  # fancy index on the map reads only these images
            finite = np.isfinite(out[rows]).all(axis=(1, 2))
            if not finite.all():
                first = int(wanted[np.flatnonzero(~finite)[0]])
                raise InputFileError(f"image {first + 1} contains NaN or infinite pixels", path,
                                     "re-extract the particles or remove this particle from the particle file")
        return out


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map.

    Any 3D file with ``nz == ny == nx`` is treated as a volume whatever its space group says
    (cryoSPARC writes maps with ``ispg = 0``).

    Returns
    -------
    volume
        ``(N, N, N)`` float32, C-contiguous, native byte order, indexed ``[z, y, x]``.
    voxel_size_angstrom
        From the header (``cella.x / mx``); 0.0 when the header does not set it for every axis
        (callers then need the voxel size from elsewhere).

    Raises
    ------
    InputFileError
        Missing, corrupt or truncated file; not 3D or not cubic; anisotropic voxels; NaN or
        infinite voxels.
    """
    p = os.fspath(path)
    h = mrc_header(p)
    if not (h.nz == h.ny == h.nx) or h.nz < 2:
        raise InputFileError(f"is not a cubic 3D map (shape {h.nz} x {h.ny} x {h.nx})", p,
                             "give a 3D map with equal sides (pad or crop it to a cube)")
    vx, vy, vz = h.voxel_size_angstrom
    if min(vx, vy, vz) <= 0:  # one axis without a voxel size: the header does not give it
        vx = 0.0
    elif abs(vy - vx) > 1e-3 * vx or abs(vz - vx) > 1e-3 * vx:
        raise InputFileError(f"voxels are not cubic ({vx:g} x {vy:g} x {vz:g} A)", p,
                             "resample the map to cubic voxels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(p, mode="r", permissive=False) as mrc:
                volume = np.array(mrc.data, dtype=np.float32, order="C")
    except (ValueError, OSError) as err:
        raise InputFileError(f"cannot read the MRC data ({_first_line(err)})", p, _REEXTRACT) from None
    n_bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
    if n_bad:
        raise InputFileError(f"map contains {n_bad} NaN or infinite voxels", p, "regenerate the map")
    return volume, float(vx)


def _label() -> str:
    from numba_recon import __version__

    return f"numba-recon {__version__}  {time.strftime('%Y-%m-%d %H:%M:%S')}"[:80]


def _write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size_angstrom: float, *, stack: bool,
               overwrite: bool, labels: list[str] | None = None) -> None:
    voxel = float(voxel_size_angstrom)
    if not np.isfinite(voxel) or voxel <= 0:
        raise ValueError(f"voxel size must be a positive number of Angstrom, got {voxel_size_angstrom!r}")
    with atomic_output(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if stack:
                mrc.set_image_stack()  # ispg 0, mz 1: RELION and ChimeraX read it as n images
            else:
                mrc.set_volume()  # ispg 1, mz = nz
            mrc.voxel_size = voxel  # cella = voxel * (mx, my, mz) with mx = nx, my = ny
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
            mrc.header.label[:] = b""
            mrc.header.nlabl = 0
            for label in labels or [_label()]:
                mrc.add_label(label)
            mrc.update_header_stats()


def write_volume(path: str | os.PathLike, volume: np.ndarray, voxel_size_angstrom: float, *,
                 overwrite: bool = False) -> None:
    """Write a 3D map as float32 MRC (``ispg = 1``), atomically.

    Parameters
    ----------
    path
        Output file (``.mrc``).
    volume
        ``(nz, ny, nx)`` array indexed ``[z, y, x]``; converted to float32.
    voxel_size_angstrom
        Voxel size stored in the header (``cella = voxel * n``).
    overwrite
        Replace an existing file; without it an existing file raises :class:`OutputError`.

    The header labels name the numba-recon version, the map (the file name without ``.mrc``) and
    the date, then the command line (:func:`numba_recon.provenance.mrc_labels`).
    """
    from numba_recon.provenance import mrc_labels

    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D (nz, ny, nx), got shape {vol.shape}")
    _write_mrc(path, vol, voxel_size_angstrom, stack=False, overwrite=overwrite,
               labels=mrc_labels(_final_stem(path)))


def _final_stem(path: str | os.PathLike) -> str:
    """The file name without extension, also when ``path`` is the hidden temporary name of an
    :func:`~numba_recon.io.atomic.atomic_output` (``.NAME.1a2b3c4d.tmp``, possibly nested)."""
    import re

    name = os.path.basename(os.fspath(path))
    while True:
        m = re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", name)
        if m is None:
            break
        name = m.group(1)
    for suffix in (".mrcs", ".mrc", ".map"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size_angstrom: float, *,
                overwrite: bool = False) -> None:
    """Write images as a float32 MRC stack (``ispg = 0``, ``mz = 1``), atomically.

    Parameters
    ----------
    path
        Output file (``.mrcs``).
    images
        ``(n, N, M)`` array indexed ``[image, y, x]``, or one ``(N, M)`` image.
    pixel_size_angstrom
        Pixel size stored in the header.
    overwrite
        Replace an existing file; without it an existing file raises :class:`OutputError`.
    """
    imgs = np.asarray(images)
    if imgs.ndim == 2:
        imgs = imgs[np.newaxis]
    if imgs.ndim != 3:
        raise ValueError(f"images must be (n, N, M), got shape {imgs.shape}")
    _write_mrc(path, imgs, pixel_size_angstrom, stack=True, overwrite=overwrite)
