"""Host-side helpers of the CPU kernels: argument checks, the support sphere, image padding.

The kernels index a zero-padded copy of each image so that their inner loops need no bounds
tests: a bilinear corner that falls outside the ``N x N`` image lands in the padding, where the
projector drops it (the padding is cropped away) and the back-projector reads zero. That is the
"corners outside the image are dropped" rule of the contract, applied identically in both
directions, so the pair stays an exact adjoint.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from numba_recon.contract import support_limit  # noqa: F401  (the kernels call _support.support_limit)

#: Element types the CPU kernels are compiled for.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Largest allowed deviation of A A^T from the identity. Poses come from Euler angles or
# quaternions in float64 and are rounded to float32 at most, far inside this bound; anything
# beyond it is not a rotation and could push splat positions outside the padded image.
_ORTHONORMAL_TOL = 1e-3


def check_array(name: str, a: object, shape: tuple[int | None, ...], dtype: np.dtype | None = None) -> np.ndarray:
    """Require a C-contiguous float32/float64 numpy array of ``shape`` (None = any extent).

    Wrong arguments are programming errors: ``TypeError`` for the type, ``ValueError`` for the
    shape or layout, naming the argument.
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype} like the other arrays, got {a.dtype}")
    if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
        want_text = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name}: expected shape {want_text}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (use to_device)")
    if not a.dtype.isnative:
        raise ValueError(f"{name}: expected native byte order (use to_device)")
    return a


def check_volume(name: str, volume: object) -> np.ndarray:
    """A cubic ``(N, N, N)`` float array."""
    v = check_array(name, volume, (None, None, None))
    if not v.shape[0] == v.shape[1] == v.shape[2] or v.shape[0] < 1:
        raise ValueError(f"{name}: expected a cubic (N, N, N) volume, got {v.shape}")
    return v


def as_rotations(rotations: object, batch: int, dtype: np.dtype) -> np.ndarray:
    """Check ``rotations (b, 3, 3)`` and return them as a C-contiguous array of ``dtype``.

    Raises ``ValueError`` for non-finite entries or matrices that are not rotations (the splat
    positions of a stretched matrix could leave the padded image).
    """
    if not isinstance(rotations, np.ndarray):
        raise TypeError(f"rotations: expected a numpy array, got {type(rotations).__name__}")
    if rotations.shape != (batch, 3, 3):
        raise ValueError(f"rotations: expected shape ({batch}, 3, 3), got {rotations.shape}")
    r64 = np.asarray(rotations, dtype=np.float64)
    if batch:
        if not np.all(np.isfinite(r64)):
            raise ValueError("rotations: contain NaN or infinite values")
        dev = np.abs(r64 @ np.swapaxes(r64, 1, 2) - np.eye(3)).max()
        if dev > _ORTHONORMAL_TOL:
            raise ValueError(f"rotations: not rotation matrices (max |A A^T - I| = {dev:.3g})")
    return np.ascontiguousarray(rotations, dtype=dtype)


@functools.lru_cache(maxsize=32)
def row_ranges(n: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last x index of each ``(z, y)`` voxel row inside the support sphere.

    Parameters
    ----------
    n
        Box size ``N``.
    limit
        :func:`support_limit`: voxels with ``|r|^2 <= limit`` take part.

    Returns
    -------
    x_lo, x_hi
        ``(N, N)`` int32 arrays indexed ``[z, y]``; a row takes part for ``x_lo <= x <= x_hi``
        and is empty when ``x_hi < x_lo``. Read-only (shared between calls).
    """
    c = n // 2
    d = np.arange(n, dtype=np.int64) - c
    rest = limit - d[:, None] ** 2 - d[None, :] ** 2  # room left for dx^2 in row [z, y]
    m = np.zeros_like(rest)
    inside = rest >= 0
    m[inside] = [math.isqrt(int(v)) for v in rest[inside]]
    x_lo = np.where(inside, np.maximum(-m, -c) + c, 1).astype(np.int32)
    x_hi = np.where(inside, np.minimum(m, n - 1 - c) + c, 0).astype(np.int32)
    x_lo.flags.writeable = False
    x_hi.flags.writeable = False
    return x_lo, x_hi


def image_padding(n: int, limit: int) -> int:
    """Zero border (pixels) around each image that every bilinear corner of a support voxel fits in.

    A support voxel has ``|r| <= sqrt(limit)`` and lands at ``c + (A r)_{x,y}`` with
    ``|(A r)_x| <= |r| * (1 + 1e-3)`` for the rotations :func:`as_rotations` accepts. The padded
    coordinate must stay ``>= 0`` (so truncation is ``floor``) and its upper corner ``<= N +
    2 pad - 1``; one more pixel absorbs coordinate rounding.
    """
    c = n // 2
    reach = math.sqrt(limit) * (1.0 + _ORTHONORMAL_TOL)
    return max(0, math.ceil(reach - c), math.ceil(c + reach + 2 - n)) + 1
