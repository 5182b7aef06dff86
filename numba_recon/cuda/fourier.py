"""Fourier filtering of image batches on the GPU, with the 2-D DFT done as matrix products.

``fourier_filter`` computes ``out[b] = real(ifft2(filters[b] * fft2(images[b])))`` entirely in
numba-cuda kernels, so the simulator can test it end to end and no FFT library is needed.

The 2-D DFT of an ``N x N`` image is ``F = W X W`` with ``W_jk = exp(-2 pi i jk / N)`` (symmetric),
and the inverse is ``W* G W* / N^2``. Writing ``W = C - iS`` (``C``, ``S`` the cosine and sine
tables) and stacking a complex matrix as its real part over its imaginary part, each
multiplication by ``W`` or ``W*`` from the left is one real matrix product with a fixed matrix
``P``. One batched kernel computes ``P @ Y_b`` and stores every ``N x N`` half of the result
transposed; since ``W`` is symmetric, two such stages make a full 2-D transform:

====  =====================  ==================  ======================================
step  fixed matrix ``P``      input ``Y_b``        stored result
====  =====================  ==================  ======================================
1     ``[C; -S]`` (2N x N)     image ``X``          ``(W X)^T``
2     ``[[C, S], [-S, C]]``    step 1               ``F = W X W``, times the filter ``H``
3     ``[[C, -S], [S, C]]``    step 2               ``(W* G)^T`` with ``G = H F``
4     ``[C, -S]`` (N x 2N)     step 3               ``real(W* G W*) / N^2``, the output
====  =====================  ==================  ======================================

That is 12 real ``N^3`` products per image (50 MFLOP at N = 128), done by a shared-memory tiled
kernel: 8 x 8 threads compute a 32 x 32 output tile, each thread a 4 x 4 register block, with
16-deep K tiles in shared memory (4 KiB per block). Any ``N`` works; partial tiles are padded
with zeros.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_recon.cuda._checks import device_f32
from numba_recon.cuda._target import cuda
from numba_recon.cuda.memory import scratch, to_device

#: Output tile edge (rows of ``P`` and columns of ``Y``) of one block.
TILE = 32
#: Depth of the shared-memory K tile.
TILE_K = 16
#: Threads per block along each axis; each thread owns a 4 x 4 block of outputs.
THREADS = 8
#: Outputs per thread along each axis (``TILE == THREADS * REG``).
REG = 4
#: Largest gridDim.z; larger batches are covered by a grid-stride loop over images.
MAX_BATCH_BLOCKS = 65535

_F0 = np.float32(0.0)

# n -> the four transposed stage matrices on the device, per device
_MATRICES: dict[tuple[int, Any], tuple[Any, Any, Any, Any]] = {}


@cuda.jit(fastmath=True, cache=True)
def _dft_stage_kernel(pt, y, filt, use_filter, scale, out):
    """One DFT stage: ``out[b]`` = per-half transpose of ``scale * (P @ y[b])`` (times ``filt``).

    ``pt (K, M)`` holds ``P`` transposed, ``y (b, K, N)``, ``out (b, M, N)`` with ``M, K`` in
    ``{N, 2N}``. Element ``(i, j)`` of ``P @ y[b]`` with ``i = h N + l`` is stored at
    ``out[b, h N + j, l]``, multiplied by ``filt[b, j, l]`` when ``use_filter`` is non-zero.
    Launch with blocks of ``(THREADS, THREADS)`` and a grid of
    ``(ceil(M / TILE), ceil(N / TILE), min(b, MAX_BATCH_BLOCKS))``.
    """
    ps = cuda.shared.array((TILE_K, TILE), np.float32)
    ys = cuda.shared.array((TILE_K, TILE), np.float32)
    acc = cuda.local.array((REG, REG), np.float32)

    k_dim = pt.shape[0]
    m_dim = pt.shape[1]
    n = y.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = tx + THREADS * ty
    i0 = cuda.blockIdx.x * TILE
    j0 = cuda.blockIdx.y * TILE

    for bb in range(cuda.blockIdx.z, y.shape[0], cuda.gridDim.z):
        for a in range(REG):
            for e in range(REG):
                acc[a, e] = _F0
        for k0 in range(0, k_dim, TILE_K):
            # Load the K tile: consecutive threads read consecutive addresses of pt and y.
            for t in range(tid, TILE_K * TILE, THREADS * THREADS):
                kk = t // TILE
                cc = t - kk * TILE
                kg = k0 + kk
                pv = _F0
                yv = _F0
                if kg < k_dim:
                    if i0 + cc < m_dim:
                        pv = pt[kg, i0 + cc]
                    if j0 + cc < n:
                        yv = y[bb, kg, j0 + cc]
                ps[kk, cc] = pv
                ys[kk, cc] = yv
            cuda.syncthreads()
            for kk in range(TILE_K):
                p0 = ps[kk, tx]
                p1 = ps[kk, tx + THREADS]
                p2 = ps[kk, tx + 2 * THREADS]
                p3 = ps[kk, tx + 3 * THREADS]
                for e in range(REG):
                    yv = ys[kk, ty + e * THREADS]
                    acc[0, e] += p0 * yv
                    acc[1, e] += p1 * yv
                    acc[2, e] += p2 * yv
                    acc[3, e] += p3 * yv
            cuda.syncthreads()
        # Store transposed per half; consecutive tx write consecutive addresses.
        for a in range(REG):
            i = i0 + tx + a * THREADS
            if i < m_dim:
                h = i // n
                col = i - h * n
                for e in range(REG):
                    j = j0 + ty + e * THREADS
                    if j < n:
                        val = scale * acc[a, e]
                        if use_filter != 0:
                            val *= filt[bb, j, col]
                        out[bb, h * n + j, col] = val


def dft_stage_matrices(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four stage matrices ``P`` of the table in the module docstring, transposed.

    Parameters
    ----------
    n
        Image edge ``N``.

    Returns
    -------
    tuple of numpy.ndarray
        ``P1^T (N, 2N)``, ``P2^T (2N, 2N)``, ``P3^T (2N, 2N)``, ``P4^T (2N, N)``, float32, built
        in float64 from exact ``jk mod N`` angles.
    """
    jk = np.outer(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)) % n
    angle = 2.0 * np.pi * jk / n
    c = np.cos(angle)
    s = np.sin(angle)
    p1 = np.vstack([c, -s])                      # (W X) stacked as [re; im]
    p2 = np.block([[c, s], [-s, c]])             # W = C - iS acting on [re; im]
    p3 = np.block([[c, -s], [s, c]])             # W* = C + iS acting on [re; im]
    p4 = np.hstack([c, -s])                      # real part of W* acting on [re; im]
    return tuple(np.ascontiguousarray(p.T, dtype=np.float32) for p in (p1, p2, p3, p4))


def _device_matrices(n: int) -> tuple[Any, Any, Any, Any]:
    try:
        dev = cuda.get_current_device().id
    except Exception:  # noqa: BLE001 - the simulator's device has no id
        dev = None
    key = (n, dev)
    if key not in _MATRICES:
        _MATRICES[key] = tuple(to_device(p) for p in dft_stage_matrices(n))
    return _MATRICES[key]


def _stage(pt: Any, y: Any, filt: Any, use_filter: int, scale: float, out: Any) -> None:
    m_dim = pt.shape[1]
    n = y.shape[2]
    grid = (math.ceil(m_dim / TILE), math.ceil(n / TILE), min(y.shape[0], MAX_BATCH_BLOCKS))
    _dft_stage_kernel[grid, (THREADS, THREADS)](pt, y, filt, np.int32(use_filter), np.float32(scale), out)


def fourier_filter(images: Any, filters: Any, out: Any) -> None:
    """``out[b] = real(ifft2(filters[b] * fft2(images[b])))`` (overwrites ``out``; asynchronous).

    Parameters
    ----------
    images
        ``(b, N, N)`` float32 device array.
    filters
        ``(b, N, N)`` float32 device array, real, in numpy's unshifted ``fft2`` layout (zero
        frequency at ``[0, 0]``).
    out
        ``(b, N, N)`` float32 device array; it may be ``images`` itself (filtering in place).
    """
    device_f32("images", images, (None, None, None))
    nb, n = images.shape[0], images.shape[1]
    device_f32("images", images, (nb, n, n))
    device_f32("filters", filters, (nb, n, n))
    device_f32("out", out, (nb, n, n))
    if nb == 0 or n == 0:
        return
    pt1, pt2, pt3, pt4 = _device_matrices(n)
    half_a = scratch("fourier_filter.a", (nb, 2 * n, n))
    half_b = scratch("fourier_filter.b", (nb, 2 * n, n))
    _stage(pt1, images, filters, 0, 1.0, half_a)       # (W X)^T
    _stage(pt2, half_a, filters, 1, 1.0, half_b)       # G = H (W X W)
    _stage(pt3, half_b, filters, 0, 1.0, half_a)       # (W* G)^T
    _stage(pt4, half_a, filters, 0, 1.0 / (n * n), out)  # real(W* G W*) / N^2
