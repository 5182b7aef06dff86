"""Back-projection ``P^T y``, the exact adjoint of :func:`numba_recon.cpu.project` (CPU).

The adjoint of a bilinear splat is a bilinear gather: every support voxel reads the four pixels
its splat would have written, with the same weights, and sums them over the batch. ``prange``
runs over z-planes of voxels, so each voxel is owned by one thread: no atomics, and the sum over
the batch happens in a fixed order (bitwise identical results for any thread count). Images are
read from zero-padded copies, which drops out-of-image corners exactly as the projector does and
leaves the inner loop free of bounds tests, so it compiles to vector gathers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, parallel_chunksize, prange

from numba_recon import kernel_geometry as kg
from numba_recon.cpu import _support


@njit(parallel=True, fastmath=True, cache=True)
def _pad_scaled(images, scale, pad):  # pragma: no cover - compiled
    """``(b, W * W)`` copies of ``scale[b] * images[b]`` in a zero border of ``pad`` pixels."""
    nb, n = images.shape[0], images.shape[1]
    w = n + 2 * pad
    padded = np.zeros((nb, w * w), dtype=images.dtype)
    for b in prange(nb):
        s = scale[b]
        for y in range(n):
            row = (y + pad) * w + pad
            for x in range(n):
                padded[b, row + x] = s * images[b, y, x]
    return padded


@njit(parallel=True, fastmath=True, cache=True)
def _backproject_kernel(padded, rot, x_lo, x_hi, pad, out):  # pragma: no cover - compiled
    n = out.shape[0]
    nb = rot.shape[0]
    c, _, one, uw, uw1 = kg.padded_frame(n, pad)
    real = out.dtype.type
    origin = real(c + pad)
    for k in prange(n):
        dz = real(k - c)
        # image-major order inside a plane: one image (a few tens of KiB) stays in cache while
        # the plane's rows gather from it
        for b in range(nb):
            a00, a01, a02, a10, a11, a12 = kg.image_rows(rot, b)
            for i in range(n):
                # the projector's row walk, so both directions see the same positions and weights
                row_u, row_v = kg.row_start(a01, a02, a11, a12, real(i - c), dz, origin)
                for x in range(x_lo[k, i], x_hi[k, i] + 1):
                    idx, fu, fv = kg.row_corner(row_u, row_v, a00, a10, real(x - c), uw)
                    top = kg.lerp(padded[b, idx], padded[b, idx + one], fu)
                    bottom = kg.lerp(padded[b, idx + uw], padded[b, idx + uw1], fu)
                    out[k, i, np.uintp(x)] += kg.lerp(top, bottom, fv)


def _backproject_scaled(images: np.ndarray, rotations: np.ndarray, scale: np.ndarray, radius_px: float,
                        out: np.ndarray) -> None:
    """``out += sum_b scale[b] P_b^T images[b]`` after checking the arguments."""
    out = _support.check_volume("out", out)
    n = out.shape[0]
    _support.check_array("images", images, (None, n, n), out.dtype)
    nb = images.shape[0]
    rot = _support.as_rotations(rotations, nb, out.dtype)
    if nb == 0:
        return
    limit = _support.support_limit(radius_px, n)
    pad = _support.image_padding(n, limit)
    padded = _pad_scaled(images, scale.astype(out.dtype), pad)
    x_lo, x_hi = _support.row_ranges(n, limit)
    # z-planes differ in cost (the sphere is thin near its poles): hand them out one at a time
    with parallel_chunksize(1):
        _backproject_kernel(padded, rot, x_lo, x_hi, pad, out)


def backproject(images: np.ndarray, rotations: np.ndarray, radius_px: float, out: np.ndarray) -> None:
    """Accumulate back-projections: ``out += sum_b P_b^T images[b]``.

    The exact adjoint of :func:`numba_recon.cpu.project` for the same ``rotations`` and
    ``radius_px``; voxels outside the support sphere receive nothing.

    Parameters
    ----------
    images
        ``(b, N, N)`` float32 or float64, C-contiguous.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A``; any float type, converted to the images'.
    radius_px
        Support radius in pixels (``inf`` for the whole box).
    out
        ``(N, N, N)`` of the images' dtype, C-contiguous; accumulated into.
    """
    nb = images.shape[0] if isinstance(images, np.ndarray) and images.ndim == 3 else 0
    _backproject_scaled(images, rotations, np.ones(nb), radius_px, out)


def weighted_backproject(residuals: np.ndarray, rotations: np.ndarray, weights: np.ndarray, radius_px: float,
                         grad_out: np.ndarray) -> None:
    """Accumulate the data-term gradient: ``grad_out += sum_b 2 weights[b] P_b^T residuals[b]``.

    Parameters
    ----------
    residuals
        ``(b, N, N)`` float32 or float64, C-contiguous: ``H^T (H P x - T^{-1} b)`` from
        :func:`numba_recon.cpu.forward_residual`.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A``.
    weights
        ``(b,)`` per-particle weights (any float type).
    radius_px
        Support radius in pixels.
    grad_out
        ``(N, N, N)`` of the residuals' dtype, C-contiguous; accumulated into.
    """
    w = np.asarray(weights, dtype=np.float64)
    nb = residuals.shape[0] if isinstance(residuals, np.ndarray) and residuals.ndim == 3 else -1
    if w.shape != (nb,):
        raise ValueError(f"weights: expected shape ({nb},), got {w.shape}")
    _backproject_scaled(residuals, rotations, 2.0 * w, radius_px, grad_out)
