"""Back-projection on the GPU, the exact adjoint of :func:`numba_recon.cuda.project`, as a gather.

Thread mapping
--------------
The same ``8 x 8 x depth`` voxel bricks as the projector; one thread per voxel. Each thread
samples every image of the batch bilinearly at its voxel's projected position (the transposed
splat: same corners, same weights, corners outside the image contribute nothing), accumulates in
a register and does one read-modify-write of its output voxel. Every voxel has exactly one
owner, so there are no atomics and the result does not depend on thread scheduling.

The first two rows of each rotation, and the per-image factor (1, or ``2 w_b`` for the
gradient), are staged in shared memory ``GROUP`` images at a time; consecutive threads hold
neighbouring x voxels, so a warp reads a compact image patch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numba_recon import kernel_geometry as kg
from numba_recon.contract import support_limit
from numba_recon.cuda._checks import brick_depth, device_f32
from numba_recon.cuda._target import cuda, inline_device_functions
from numba_recon.cuda.memory import scratch

#: Images whose rotations are staged in shared memory at a time.
GROUP = 128
#: Default block size: 8 x 8 x 4 bricks.
DEFAULT_THREADS_PER_BLOCK = 256
#: Upper bound of the grid; larger volumes are covered by the grid-stride loop.
MAX_BLOCKS = 65535

_F0 = np.float32(0.0)
# the shared geometry (numba_recon.kernel_geometry) as the kernel calls it
(_brick_layout, _brick_centre, _brick_outside, _brick_voxel, _stage_rows, _staged_corner,
 _lerp) = inline_device_functions(
    kg.brick_layout, kg.brick_centre, kg.brick_outside, kg.brick_voxel, kg.stage_rows,
    kg.staged_corner, kg.lerp)


def _sample_row(images, p, x_in0, x_in1, fx):
    """``images[p]`` to ``images[p + 1]`` (flat batch) interpolated at ``fx``; a pixel whose flag
    (``x_in0``, ``x_in1``) says it lies outside the image reads as 0. ``p >= 0``, so the index can be
    unsigned."""
    left = _F0
    right = _F0
    if x_in0:
        left = images[np.uint64(p)]
    if x_in1:
        right = images[np.uint64(p + 1)]
    return _lerp(left, right, fx)


(_sample_row,) = inline_device_functions(_sample_row)


@cuda.jit(fastmath=True, cache=True)
def _backproject_kernel(images, rotations, weights, use_weights, factor, r2_max, out):
    """``out += sum_b s_b P_b^T images[b]`` with ``s_b = factor * (weights[b] if use_weights else 1)``.

    ``images (b * N * N,)`` (the batch, flattened: one unsigned flat index per corner is cheaper
    than three signed ones), ``rotations (b, 3, 3)``, ``weights (b,)`` (or any length when
    ``use_weights`` is 0), ``use_weights`` int32, ``factor`` float32, ``r2_max`` int32,
    ``out (N, N, N)``. Launch with ``blockDim.x`` a multiple of 64 (at most 512).
    """
    rot = cuda.shared.array((GROUP, 7), np.float32)

    n = out.shape[0]
    nb = rotations.shape[0]
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    c, cf, depth, nbx, n_bricks, half_z = _brick_layout(n, tpb)
    n1 = n - 1
    nn = n * n

    for brick in range(cuda.blockIdx.x, n_bricks, cuda.gridDim.x):
        bx, by, bz, ccx, ccy, ccz = _brick_centre(brick, nbx, depth, c, half_z)
        if _brick_outside(ccx, ccy, ccz, half_z, r2_max):
            continue  # the whole brick is outside the support: same decision for every thread

        j, i, k, rxf, ryf, rzf, active = _brick_voxel(bx, by, bz, depth, tid, n, c, r2_max)
        acc = _F0

        for g0 in range(0, nb, GROUP):
            cnt = np.int32(min(GROUP, nb - g0))
            cuda.syncthreads()  # the previous group's rotations are no longer read
            for t in range(tid, cnt, tpb):
                b = g0 + t
                _stage_rows(rotations, b, rot, t)
                if use_weights != 0:
                    rot[t, 6] = factor * weights[b]
                else:
                    rot[t, 6] = factor
            cuda.syncthreads()

            if active:
                for g in range(cnt):
                    x0, y0, fx, fy = _staged_corner(rot, g, rxf, ryf, rzf, cf)
                    base = (g0 + g) * nn
                    x_in0 = x0 >= 0 and x0 < n
                    x_in1 = x0 >= -1 and x0 < n1
                    # Corners outside the image read as 0. Flat indices are formed only for rows
                    # inside the image, so they are non-negative.
                    row = _F0
                    if y0 >= 0 and y0 < n:
                        row = _sample_row(images, base + y0 * n + x0, x_in0, x_in1, fx)
                    s = row - fy * row
                    if y0 >= -1 and y0 < n1:
                        s += fy * _sample_row(images, base + (y0 + 1) * n + x0, x_in0, x_in1, fx)
                    acc += rot[g, 6] * s

        if active:
            out[k, i, j] += acc


def _launch(images: Any, rotations: Any, weights: Any, use_weights: int, factor: float,
            radius_px: float, out: Any, threads_per_block: int) -> None:
    n = out.shape[0]
    nb = rotations.shape[0]
    depth = brick_depth(threads_per_block)
    r2_max = np.int32(support_limit(radius_px, n))
    if nb == 0 or n == 0:
        return
    _, n_bricks = kg.brick_grid(n, depth)
    _backproject_kernel[min(n_bricks, MAX_BLOCKS), threads_per_block](
        images.reshape(images.size), rotations, weights, np.int32(use_weights), np.float32(factor), r2_max, out)


def backproject(images: Any, rotations: Any, radius_px: float, out: Any, *,
                threads_per_block: int = DEFAULT_THREADS_PER_BLOCK) -> None:
    """The exact adjoint of :func:`~numba_recon.cuda.project`: ``out += sum_b P_b^T images[b]``.

    Voxels outside the support radius receive nothing. Asynchronous.

    Parameters
    ----------
    images
        ``(b, N, N)`` float32 device array.
    rotations
        ``(b, 3, 3)`` float32 device array of RELION matrices ``A``.
    radius_px
        Support radius in pixels (``inf`` for the whole box).
    out
        ``(N, N, N)`` float32 device array, caller-zeroed; the back-projection is added to it.
    threads_per_block
        Block size, a multiple of 64 up to 512 (bricks of ``8 x 8 x threads_per_block/64``).
    """
    device_f32("out", out, (None, None, None))
    n = out.shape[0]
    device_f32("out", out, (n, n, n))
    device_f32("rotations", rotations, (None, 3, 3))
    device_f32("images", images, (rotations.shape[0], n, n))
    unused = scratch("backproject.no_weights", (1,))
    _launch(images, rotations, unused, 0, 1.0, radius_px, out, threads_per_block)


def weighted_backproject(residuals: Any, rotations: Any, weights: Any, radius_px: float, grad_out: Any, *,
                         threads_per_block: int = DEFAULT_THREADS_PER_BLOCK) -> None:
    """Gradient accumulation ``grad_out += sum_b 2 weights[b] P_b^T residuals[b]`` (asynchronous).

    The weights are folded into the gather, so the cost is that of :func:`backproject`.

    Parameters
    ----------
    residuals
        ``(b, N, N)`` float32 device array (``residual_out`` of ``forward_residual``).
    rotations
        ``(b, 3, 3)`` float32 device array of RELION matrices ``A``.
    weights
        ``(b,)`` float32 device array of per-particle weights.
    radius_px
        Support radius in pixels (``inf`` for the whole box).
    grad_out
        ``(N, N, N)`` float32 device array; the gradient is added to it.
    threads_per_block
        Block size, a multiple of 64 up to 512.
    """
    device_f32("grad_out", grad_out, (None, None, None))
    n = grad_out.shape[0]
    device_f32("grad_out", grad_out, (n, n, n))
    device_f32("rotations", rotations, (None, 3, 3))
    nb = rotations.shape[0]
    device_f32("residuals", residuals, (nb, n, n))
    device_f32("weights", weights, (nb,))
    _launch(residuals, rotations, weights, 1, 2.0, radius_px, grad_out, threads_per_block)
