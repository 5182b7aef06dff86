"""Fourier-space sampling density of the central slices (CPU): the normal operator's diagonal.

``insert_weights`` grids one real weight per 2-D Fourier sample of each image onto the 3-D DFT
grid at the sample's 3-D frequency ``q = A^T (k_u, k_v, 0)`` with trilinear weights, as RELION's
back-projector grids its CTF^2 weights. Summed over particles, with the weight ``w_i H_i(k)^2
T(k)^2`` (CTF squared times the splat's own transfer function squared), it is the Fourier model of
``sum_i w_i P_i^T H_i^2 P_i`` that the solver's preconditioner inverts.

Images are split over a fixed number of chunks, each accumulating into a private grid that is
summed in a fixed order at the end: no atomics, and bitwise identical results for any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from numba_recon import kernel_geometry as kg
from numba_recon.cpu import _support

#: Private accumulation grids (fixed, so that the summation order never depends on the threads).
CHUNKS = 4


@njit(parallel=True, fastmath=True, cache=True)
def _insert_kernel(rot, weights, chunks, acc):  # pragma: no cover - compiled
    nb, n = weights.shape[0], weights.shape[1]
    for c in prange(chunks):
        grid = acc[c]
        for b in range(c, nb, chunks):
            a00, a01, a02, a10, a11, a12 = kg.image_rows(rot, b)
            for iv in range(n):
                kv = kg.signed_frequency(iv, n)
                for iu in range(n):
                    w = weights[b, iv, iu]
                    if w == 0.0:
                        continue
                    qx, qy, qz = kg.slice_frequency(a00, a01, a02, a10, a11, a12, kg.signed_frequency(iu, n), kv)
                    x0, y0, z0, tx, ty, tz = kg.trilinear_corner(qx, qy, qz)
                    x0, y0, z0, x1, y1, z1 = kg.periodic_cell(x0, y0, z0, n)
                    w000, w001, w010, w011, w100, w101, w110, w111 = kg.trilinear_weights(w, tx, ty, tz, 1.0)
                    grid[z0, y0, x0] += w000
                    grid[z0, y0, x1] += w001
                    grid[z0, y1, x0] += w010
                    grid[z0, y1, x1] += w011
                    grid[z1, y0, x0] += w100
                    grid[z1, y0, x1] += w101
                    grid[z1, y1, x0] += w110
                    grid[z1, y1, x1] += w111


@njit(parallel=True, cache=True)
def _sum_chunks(acc, out):  # pragma: no cover - compiled
    chunks, n = acc.shape[0], acc.shape[1]
    for z in prange(n):
        for y in range(n):
            for x in range(n):
                s = out[z, y, x]
                for c in range(chunks):
                    s += acc[c, z, y, x]
                out[z, y, x] = s


def insert_weights(rotations: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """Accumulate gridded slice weights: ``out[q] += sum_b sum_k weights[b, k] tri(q - A_b^T k)``.

    ``k = (k_u, k_v)`` runs over the ``N x N`` 2-D DFT grid (unshifted ``fft2`` layout, signed
    integer frequencies), ``q`` over the ``N^3`` 3-D DFT grid (unshifted ``fftn`` layout of a
    volume indexed ``[z, y, x]``, frequencies wrapped modulo ``N``), and ``tri`` is the trilinear
    interpolation kernel.

    Parameters
    ----------
    rotations
        ``(b, 3, 3)`` RELION matrices ``A``.
    weights
        ``(b, N, N)`` float32 or float64 real weights per 2-D frequency (e.g. ``w_i H_i^2 T^2``).
    out
        ``(N, N, N)`` float32 or float64, C-contiguous; accumulated into.
    """
    out = _support.check_volume("out", out)
    n = out.shape[0]
    _support.check_array("weights", weights, (None, n, n))
    nb = weights.shape[0]
    rot = _support.as_rotations(rotations, nb, np.dtype(np.float64))
    if nb == 0:
        return
    chunks = min(CHUNKS, nb)
    acc = np.zeros((chunks, n, n, n), dtype=np.float32 if out.dtype == np.float32 else np.float64)
    _insert_kernel(rot, weights, chunks, acc)
    _sum_chunks(acc, out)


def weight_filters(filters2: np.ndarray, plane: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """``out[b] = (filters2[b] * plane) * weights[b]``: the per-sample weights of
    :func:`insert_weights` from squared CTFs, the splat's squared transfer function and one
    weight per particle (float32, in this order on both backends).

    Parameters
    ----------
    filters2
        ``(b, N, N)`` float32 squared CTFs (full ``fft2`` grid).
    plane
        ``(N, N)`` float32, the same for every image.
    weights
        ``(b,)`` float32.
    out
        ``(b, N, N)`` float32, overwritten; may be ``filters2``.
    """
    _support.check_array("filters2", filters2, (None, None, None))
    nb, n = filters2.shape[0], filters2.shape[1]
    _support.check_array("plane", plane, (n, n), filters2.dtype)
    _support.check_array("weights", weights, (nb,), filters2.dtype)
    _support.check_array("out", out, (nb, n, n), filters2.dtype)
    np.multiply(filters2, plane[None], out=out)
    out *= weights[:, None, None]
