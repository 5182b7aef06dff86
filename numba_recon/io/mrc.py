"""MRC images, stacks and maps (via ``mrcfile``), strict by default.

Arrays are indexed ``[n, y, x]`` (stacks) and ``[z, y, x]`` (maps), x being the column, as
``mrcfile`` returns them. Stacks are memory-mapped and only the requested images are read, so data
sets far larger than memory work. Every problem a user can cause (missing, truncated or corrupt
file, NaN pixels, wrong shape) raises :class:`~numba_recon.errors.InputFileError` naming the file.

Writers produce files that ``mrcfile.validate`` accepts and that RELION and ChimeraX read with the
right voxel size: float32 (mode 2), ``mx = nx`` (the voxel size is ``cella / mx``), origin 0,
``ispg = 1`` for maps and ``0`` for stacks, a ``numba-recon <version>`` label, and header
statistics filled in.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import mrcfile
import numpy as np
from mrcfile import utils as mrc_utils

from numba_recon.errors import InputFileError
from numba_recon.io import atomic_output

__all__ = [
    "MAX_OPEN_STACKS",
    "StackReader",
    "factorize_paths",
    "mrc_header",
    "read_volume",
    "stack_shape",
    "write_stack",
    "write_volume",
]

#: Stacks kept open (memory-mapped) at once by :class:`StackReader`, well below ``ulimit -n``.
MAX_OPEN_STACKS = 64

_HEADER_BYTES = 1024
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
        ``(x, y, z)`` voxel size from ``cella / (mx, my, mz)``; 0 where the header has none.
    """

    nx: int
    ny: int
    nz: int
    dtype: np.dtype
    ispg: int
    voxel_size_angstrom: tuple[float, float, float]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def mrc_header(path: str | os.PathLike) -> MrcHeader:
    """Read and check an MRC header without touching the data.

    Raises
    ------
    InputFileError
        The file is missing, is not an MRC file, has an unsupported data mode (complex or
        packed), or is shorter than its header declares (truncated copy).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputFileError("file not found", p, "check the path")
    if os.path.isdir(p):
        raise InputFileError("is a folder, not an MRC file", p, "give the path of an .mrc or .mrcs file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # strict mode raises on real problems; hide cosmetic warnings
            with mrcfile.open(p, mode="r", header_only=True, permissive=False) as mrc:
                header = mrc.header.copy()
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
                     voxel_size_angstrom=(float(voxel.x), float(voxel.y), float(voxel.z)))


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


class StackReader:
    """Reads particle images from many MRC stacks through memory maps.

    Stacks are opened lazily with ``mrcfile.mmap(path, mode="r", permissive=False)`` and kept in
    a least-recently-used cache of at most ``max_open`` files (data sets can have thousands of
    stacks). Reads are grouped by stack and sorted by index so each stack is read sequentially;
    only the requested images are touched.

    Parameters
    ----------
    max_open
        Maximum number of stacks kept open.

    Examples
    --------
    >>> with StackReader() as reader:                                   # doctest: +SKIP
    ...     images = reader.read(particles.stack_paths[:8], particles.stack_indices[:8], 128)
    """

    def __init__(self, max_open: int = MAX_OPEN_STACKS) -> None:
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.max_open = int(max_open)
        self._open: OrderedDict[str, tuple[Any, np.ndarray]] = OrderedDict()

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
        return {"max_open": self.max_open}  # open memory maps do not travel; reopened on demand

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])

    @property
    def n_open(self) -> int:
        """Number of stacks currently open."""
        return len(self._open)

    def close(self) -> None:
        """Close every open stack."""
        while self._open:
            _, (mrc, _) = self._open.popitem(last=False)
            mrc.close()

    def _stack(self, path: str) -> np.ndarray:
        """The memory-mapped ``(n, ny, nx)`` data of one stack, opening it if needed."""
        entry = self._open.get(path)
        if entry is not None:
            self._open.move_to_end(path)
            return entry[1]
        mrc_header(path)  # missing / corrupt / truncated -> InputFileError naming the file
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mrc = mrcfile.mmap(path, mode="r", permissive=False)
        except (ValueError, OSError) as err:
            raise InputFileError(f"cannot memory-map the MRC file ({_first_line(err)})", path,
                                 f"check that it is a complete MRC file; {_REEXTRACT}") from None
        data = mrc.data
        if data is None or data.ndim not in (2, 3):
            mrc.close()
            raise InputFileError("is not a 2D image or an image stack", path, "give an .mrcs stack of 2D images")
        if data.ndim == 2:
            data = data[np.newaxis]
        self._open[path] = (mrc, data)
        while len(self._open) > self.max_open:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return data

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
            rows = np.flatnonzero(group == g)
            rows = rows[np.argsort(idx[rows], kind="stable")]  # sequential reads within a stack
            data = self._stack(str(path))
            n_images, ny, nx = data.shape
            if (ny, nx) != (N, N):
                raise InputFileError(f"images are {ny} x {nx} pixels, expected {N} x {N}", path,
                                     "use stacks with one box size matching rlnImageSize")
            wanted = idx[rows]
            if wanted[0] < 0 or wanted[-1] >= n_images:
                bad = wanted[-1] if wanted[-1] >= n_images else wanted[0]
                raise InputFileError(f"image {bad + 1} requested but the stack holds {n_images} images", path,
                                     "check the index@stack entries of the particle file")
            out[rows] = data[wanted]  # fancy index on the memmap reads only these images
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
        From the header (``cella.x / mx``); 0.0 when the header does not set it.

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
    if vx > 0 and (abs(vy - vx) > 1e-3 * vx or abs(vz - vx) > 1e-3 * vx):
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
               overwrite: bool) -> None:
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
            mrc.add_label(_label())
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
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D (nz, ny, nx), got shape {vol.shape}")
    _write_mrc(path, vol, voxel_size_angstrom, stack=False, overwrite=overwrite)


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
