"""Voxel-driven real-space projection ``P x`` with bilinear splatting (CPU).

Work is split into ``(image, half-volume)`` tasks run by ``prange``: each task splats the voxels of
one half of the support sphere (``z < N // 2`` or ``z >= N // 2``) into its own private image, and
a second loop adds the two halves into ``out``. No two threads ever write the same pixel, so no
atomics are needed, and the summation order is fixed by the code alone: results are bitwise
identical for any thread count. Two tasks per image also keep both cores busy for a single image.
"""

from __future__ import annotations

import numpy as np
from numba import njit, parallel_chunksize, prange

from numba_recon import kernel_geometry as kg
from numba_recon.cpu import _support

# Private accumulation images per task, chosen by the voxel's x index: consecutive voxels of a
# row usually hit the same pixels, and accumulating them into one image makes every
# read-modify-write wait for the previous one. Four interleaved images break that chain.
_SLOTS = 4
# z-halves per image (see the module docstring).
_PARTS = 2


@njit(parallel=True, fastmath=True, cache=True)
def _project_kernel(volume, rot, x_lo, x_hi, pad, out):  # pragma: no cover - compiled
    n = volume.shape[0]
    nb = rot.shape[0]
    c, w, one, uw, uw1 = kg.padded_frame(n, pad)
    plane = w * w
    uplane = np.uintp(plane)
    real = volume.dtype.type
    partial = np.empty((nb, _PARTS, n, n), dtype=volume.dtype)
    for task in prange(nb * _PARTS):
        b = task // _PARTS
        part = task % _PARTS
        z_start = 0 if part == 0 else c
        z_stop = c if part == 0 else n
        img = np.zeros(_SLOTS * plane, dtype=volume.dtype)
        # per-row splat targets and weights: computing them in a loop of their own lets it
        # vectorise; only the read-modify-writes stay scalar
        target = np.empty(n, dtype=np.uintp)
        w00 = np.empty(n, dtype=volume.dtype)
        w01 = np.empty(n, dtype=volume.dtype)
        w10 = np.empty(n, dtype=volume.dtype)
        w11 = np.empty(n, dtype=volume.dtype)
        a00, a01, a02, a10, a11, a12 = kg.image_rows(rot, b)
        # padded image coordinate of the box centre
        origin = real(c + pad)
        for k in range(z_start, z_stop):
            dz = real(k - c)
            for i in range(n):
                row_u, row_v = kg.row_start(a01, a02, a11, a12, real(i - c), dz, origin)
                for x in range(x_lo[k, i], x_hi[k, i] + 1):
                    ux = np.uintp(x)
                    idx, fu, fv = kg.row_corner(row_u, row_v, a00, a10, real(x - c), uw)
                    target[ux] = idx + np.uintp(x & (_SLOTS - 1)) * uplane
                    w00[ux], w01[ux], w10[ux], w11[ux] = kg.bilinear_weights(volume[k, i, ux], fu, fv)
                for x in range(x_lo[k, i], x_hi[k, i] + 1):
                    ux = np.uintp(x)
                    idx = target[ux]
                    img[idx] += w00[ux]
                    img[idx + one] += w01[ux]
                    img[idx + uw] += w10[ux]
                    img[idx + uw1] += w11[ux]
        # sum the slots and crop the padding (corners that fell outside the image are dropped)
        for y in range(n):
            for x in range(n):
                j = (y + pad) * w + x + pad
                acc = img[j]
                for s in range(1, _SLOTS):
                    acc += img[s * plane + j]
                partial[b, part, y, x] = acc
    for b in prange(nb):
        for y in range(n):
            for x in range(n):
                out[b, y, x] += partial[b, 0, y, x] + partial[b, 1, y, x]


def project(volume: np.ndarray, rotations: np.ndarray, radius_px: float, out: np.ndarray) -> None:
    """Accumulate real-space projections of ``volume`` into ``out`` (``out += P volume``).

    For each voxel ``(k, i, j)`` with offset ``r = (j - c, i - c, k - c)``, ``c = N // 2`` and
    ``|r|^2 <= radius_px^2``, the voxel value is splatted with bilinear weights at image position
    ``(u, v) = ((A r)_x + c, (A r)_y + c)`` (u = column, v = row); corners outside the image are
    dropped.

    Parameters
    ----------
    volume
        ``(N, N, N)`` float32 or float64, C-contiguous, indexed ``[z, y, x]``.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A`` (map to image frame); any float type, converted to the
        volume's.
    radius_px
        Support radius in pixels (``inf`` for the whole box).
    out
        ``(b, N, N)`` of the volume's dtype, C-contiguous; accumulated into.
    """
    volume = _support.check_volume("volume", volume)
    n = volume.shape[0]
    nb = rotations.shape[0] if isinstance(rotations, np.ndarray) and rotations.ndim == 3 else -1
    _support.check_array("out", out, (nb if nb >= 0 else None, n, n), volume.dtype)
    rot = _support.as_rotations(rotations, out.shape[0], volume.dtype)
    if out.shape[0] == 0:
        return
    limit = _support.support_limit(radius_px, n)
    x_lo, x_hi = _support.row_ranges(n, limit)
    # hand out one task at a time (dynamic scheduling); this never changes the results
    with parallel_chunksize(1):
        _project_kernel(volume, rot, x_lo, x_hi, _support.image_padding(n, limit), out)
