"""Element-wise and per-particle reduction kernels.

``_fill_kernel`` backs :func:`numba_recon.cuda.zeros`; ``_residual_loss_kernel`` is the last
stage of :func:`numba_recon.cuda.forward_residual`: one block per particle turns the filtered
projection into the residual in place and reduces the particle's loss.
"""

from __future__ import annotations

import numpy as np

from numba_recon.cuda._target import cuda

#: Threads per block of the per-particle reduction (a power of two, at most 1024).
REDUCE_THREADS = 128


@cuda.jit(device=True, inline=True)
def block_sum(a, tid, threads):
    """Tree-sum ``a[:threads]`` (shared memory) into ``a[0]``; every thread of the block calls it."""
    width = threads // 2
    while width > 0:
        if tid < width:
            a[tid] += a[tid + width]
        cuda.syncthreads()
        width //= 2


@cuda.jit(device=True, inline=True)
def block_sum2(a, b, tid, threads):
    """:func:`block_sum` of two shared arrays at once (one barrier per level for both)."""
    width = threads // 2
    while width > 0:
        if tid < width:
            a[tid] += a[tid + width]
            b[tid] += b[tid + width]
        cuda.syncthreads()
        width //= 2


@cuda.jit(cache=True)
def _fill_kernel(flat, value):
    """``flat[:] = value`` over a 1-D array, grid-stride."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for p in range(start, flat.shape[0], stride):
        flat[p] = value


@cuda.jit(cache=True)
def _residual_loss_kernel(q, s_res, data, data_norm2, loss_out, energy_out):
    """Residual, loss and model energy of one particle per block.

    On entry ``s_res[b]`` holds ``s = H^2 q``; on exit ``s - data[b]``. ``loss_out[b]`` is set to
    ``<q, s> - 2 <q, data[b]> + data_norm2[b]``, summed in float64 because the three terms nearly
    cancel once the map fits the data; ``energy_out[b]`` to ``<q, s>``.
    """
    partial = cuda.shared.array(REDUCE_THREADS, np.float64)
    partial_e = cuda.shared.array(REDUCE_THREADS, np.float64)
    tid = cuda.threadIdx.x
    n_pix = q.shape[1] * q.shape[2]
    n = q.shape[2]
    for b in range(cuda.blockIdx.x, q.shape[0], cuda.gridDim.x):
        acc = np.float64(0.0)
        acc_e = np.float64(0.0)
        for p in range(tid, n_pix, REDUCE_THREADS):
            y = p // n
            x = p - y * n
            s = s_res[b, y, x]
            d = data[b, y, x]
            qv = q[b, y, x]
            s_res[b, y, x] = s - d
            acc += np.float64(qv) * (np.float64(s) - 2.0 * np.float64(d))
            acc_e += np.float64(qv) * np.float64(s)
        partial[tid] = acc
        partial_e[tid] = acc_e
        cuda.syncthreads()
        block_sum2(partial, partial_e, tid, REDUCE_THREADS)
        if tid == 0:
            loss_out[b] = partial[0] + np.float64(data_norm2[b])
            energy_out[b] = partial_e[0]
        cuda.syncthreads()
