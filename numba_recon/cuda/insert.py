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

from numba_recon import kernel_geometry as kg
from numba_recon.cuda._checks import device_f32
from numba_recon.cuda._target import cuda, inline_device_functions

THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65535

_F1 = np.float32(1.0)

# the shared geometry (numba_recon.kernel_geometry) as the kernel calls it
(_image_rows, _signed_frequency, _slice_frequency, _trilinear_corner, _periodic_cell,
 _trilinear_weights) = inline_device_functions(
    kg.image_rows, kg.signed_frequency, kg.slice_frequency, kg.trilinear_corner, kg.periodic_cell,
    kg.trilinear_weights)


@cuda.jit(fastmath=True, cache=True)
def _insert_kernel(rotations, weights, out):
    """``out[q] += sum_b sum_k weights[b, k] tri(q - A_b^T k)``; ``rotations (b, 3, 3)``,
    ``weights (b, N, N)``, ``out (N, N, N)``, all float32; grid-stride over ``b * N * N``."""
    nb = weights.shape[0]
    n = weights.shape[1]
    nn = n * n
    total = nb * nn
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
        a00, a01, a02, a10, a11, a12 = _image_rows(rotations, b)
        qx, qy, qz = _slice_frequency(a00, a01, a02, a10, a11, a12, np.float32(_signed_frequency(iu, n)),
                                      np.float32(_signed_frequency(iv, n)))
        x0, y0, z0, tx, ty, tz = _trilinear_corner(qx, qy, qz)
        x0, y0, z0, x1, y1, z1 = _periodic_cell(x0, y0, z0, n)
        w000, w001, w010, w011, w100, w101, w110, w111 = _trilinear_weights(w, tx, ty, tz, _F1)
        cuda.atomic.add(out, (z0, y0, x0), w000)
        cuda.atomic.add(out, (z0, y0, x1), w001)
        cuda.atomic.add(out, (z0, y1, x0), w010)
        cuda.atomic.add(out, (z0, y1, x1), w011)
        cuda.atomic.add(out, (z1, y0, x0), w100)
        cuda.atomic.add(out, (z1, y0, x1), w101)
        cuda.atomic.add(out, (z1, y1, x0), w110)
        cuda.atomic.add(out, (z1, y1, x1), w111)


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
