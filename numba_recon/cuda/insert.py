"""Fourier-space sampling density of the central slices on the GPU (twin of
:mod:`numba_recon.cpu.insert`).

One thread per 2-D Fourier sample of one image: it computes the sample's 3-D frequency
``q = A^T (k_u, k_v, 0)`` and adds its weight to the eight surrounding grid points with trilinear
weights, with global float32 atomics (the grid is the full ``N^3`` DFT grid; distinct samples rarely
meet on one grid point, so the atomics seldom contend). Summation order is therefore not fixed on
the GPU: results agree with the CPU twin to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_recon.cuda._checks import device_f32
from numba_recon.cuda._target import cuda

THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65535


@cuda.jit(fastmath=True, cache=True)
def _insert_kernel(rotations, weights, out):
    """``out[q] += sum_b sum_k weights[b, k] tri(q - A_b^T k)``; ``rotations (b, 3, 3)``,
    ``weights (b, N, N)``, ``out (N, N, N)``, all float32; grid-stride over ``b * N * N``."""
    nb = weights.shape[0]
    n = weights.shape[1]
    nn = n * n
    total = nb * nn
    half = (n + 1) // 2
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for t in range(start, total, stride):
        b = t // nn
        rest = t - b * nn
        iv = rest // n
        iu = rest - iv * n
        w = weights[b, iv, iu]
        if w == 0.0:
            continue
        kv = np.float32(iv - n if iv >= half else iv)
        ku = np.float32(iu - n if iu >= half else iu)
        qx = rotations[b, 0, 0] * ku + rotations[b, 1, 0] * kv
        qy = rotations[b, 0, 1] * ku + rotations[b, 1, 1] * kv
        qz = rotations[b, 0, 2] * ku + rotations[b, 1, 2] * kv
        fx = math.floor(qx)
        fy = math.floor(qy)
        fz = math.floor(qz)
        tx = qx - fx
        ty = qy - fy
        tz = qz - fz
        x0 = int(fx) % n
        y0 = int(fy) % n
        z0 = int(fz) % n
        x1 = (x0 + 1) % n
        y1 = (y0 + 1) % n
        z1 = (z0 + 1) % n
        one = np.float32(1.0)
        wz0 = w * (one - tz)
        wz1 = w * tz
        cuda.atomic.add(out, (z0, y0, x0), wz0 * (one - ty) * (one - tx))
        cuda.atomic.add(out, (z0, y0, x1), wz0 * (one - ty) * tx)
        cuda.atomic.add(out, (z0, y1, x0), wz0 * ty * (one - tx))
        cuda.atomic.add(out, (z0, y1, x1), wz0 * ty * tx)
        cuda.atomic.add(out, (z1, y0, x0), wz1 * (one - ty) * (one - tx))
        cuda.atomic.add(out, (z1, y0, x1), wz1 * (one - ty) * tx)
        cuda.atomic.add(out, (z1, y1, x0), wz1 * ty * (one - tx))
        cuda.atomic.add(out, (z1, y1, x1), wz1 * ty * tx)


def insert_weights(rotations: Any, weights: Any, out: Any) -> None:
    """Accumulate gridded slice weights into ``out`` (see :func:`numba_recon.cpu.insert_weights`).

    Parameters
    ----------
    rotations
        ``(b, 3, 3)`` float32 device array of RELION matrices ``A``.
    weights
        ``(b, N, N)`` float32 device array, unshifted ``fft2`` layout.
    out
        ``(N, N, N)`` float32 device array, unshifted ``fftn`` layout; accumulated into.
    """
    device_f32("out", out, (None, None, None))
    n = out.shape[0]
    device_f32("weights", weights, (None, n, n))
    nb = weights.shape[0]
    device_f32("rotations", rotations, (nb, 3, 3))
    total = nb * n * n
    if total == 0:
        return
    blocks = min(MAX_BLOCKS, (total + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)
    _insert_kernel[blocks, THREADS_PER_BLOCK](rotations, weights, out)


@cuda.jit(cache=True)
def _weight_filters_kernel(filters2, plane, weights, out):
    """``out[b, i, j] = (filters2[b, i, j] * plane[i, j]) * weights[b]``, grid-stride over ``b * N * N``."""
    nb = filters2.shape[0]
    n = filters2.shape[1]
    nn = n * n
    for t in range(cuda.grid(1), nb * nn, cuda.gridsize(1)):
        b = t // nn
        rest = t - b * nn
        i = rest // n
        j = rest - i * n
        out[b, i, j] = (filters2[b, i, j] * plane[i, j]) * weights[b]


def weight_filters(filters2: Any, plane: Any, weights: Any, out: Any) -> None:
    """``out[b] = (filters2[b] * plane) * weights[b]`` on the device (asynchronous): the inputs of
    :func:`insert_weights` for particles prepared on the device. Shapes as the CPU twin's
    (:func:`numba_recon.cpu.insert.weight_filters`): ``filters2``, ``out`` ``(b, N, N)``, ``plane``
    ``(N, N)``, ``weights`` ``(b,)``, float32 device arrays; ``out`` may be ``filters2``."""
    device_f32("filters2", filters2, (None, None, None))
    nb, n = filters2.shape[0], filters2.shape[1]
    device_f32("plane", plane, (n, n))
    device_f32("weights", weights, (nb,))
    device_f32("out", out, (nb, n, n))
    total = nb * n * n
    if total == 0:
        return
    blocks = min(MAX_BLOCKS, math.ceil(total / THREADS_PER_BLOCK))
    _weight_filters_kernel[blocks, THREADS_PER_BLOCK](filters2, plane, weights, out)
