"""Voxel-driven forward projection on the GPU: ``out[b] += P_b volume``.

Thread mapping
--------------
The volume is cut into bricks of ``8 x 8 x depth`` voxels (``depth = threads_per_block // 64``);
a block owns one brick at a time (grid-stride loop over bricks) and each thread one voxel of it.
A thread reads its voxel once and splats it into every image of the batch.

Privatisation
-------------
A brick of at most 8 x 8 x 8 voxels projects, whatever the rotation, inside a 15 x 15 pixel
window around the projection of its centre (half-diagonal ``3.5 * sqrt(3) < 6.07`` pixels plus the
bilinear corner). The block therefore splats ``GROUP`` images at a time into ``GROUP`` shared
``16 x 16`` tiles with shared-memory atomics, then flushes each non-zero tile pixel to the image
with one global ``atomic.add``: about 10-20x fewer global atomics than splatting directly. A
corner that would fall outside its tile (only possible for a non-orthonormal matrix) goes straight
to global memory, so the result is correct for any matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_recon.cuda._checks import brick_depth, device_f32, support_limit
from numba_recon.cuda._target import cuda

#: Images splatted per shared-memory pass (tiles of GROUP x TILE x TILE float32 = 16 KiB).
GROUP = 16
#: Edge of a shared tile in pixels; holds the footprint of an 8 x 8 x 8 brick.
TILE = 16
#: Length of the flat shared array holding the GROUP tiles.
TILES_FLAT = GROUP * TILE * TILE
#: The tile starts this many pixels before the floor of the projected brick centre.
TILE_MARGIN = 7
#: Default block size: 8 x 8 x 8 bricks.
DEFAULT_THREADS_PER_BLOCK = 512
#: Upper bound of the grid; larger volumes are covered by the grid-stride loop.
MAX_BLOCKS = 65535

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_BRICK_HALF_XY = np.float32(3.5)


@cuda.jit(device=True, inline=True, fastmath=True)
def _splat_global(out, b, x0, y0, fx, fy, val):
    """Bilinear splat of ``val`` at ``(x0 + fx, y0 + fy)`` straight into ``out[b]``, dropping
    corners outside the image."""
    n = out.shape[1]
    gx = _F1 - fx
    gy = _F1 - fy
    if y0 >= 0 and y0 < n:
        if x0 >= 0 and x0 < n:
            cuda.atomic.add(out, (b, y0, x0), gx * gy * val)
        if x0 >= -1 and x0 < n - 1:
            cuda.atomic.add(out, (b, y0, x0 + 1), fx * gy * val)
    if y0 >= -1 and y0 < n - 1:
        if x0 >= 0 and x0 < n:
            cuda.atomic.add(out, (b, y0 + 1, x0), gx * fy * val)
        if x0 >= -1 and x0 < n - 1:
            cuda.atomic.add(out, (b, y0 + 1, x0 + 1), fx * fy * val)


@cuda.jit(fastmath=True, cache=True)
def _project_kernel(volume, rotations, r2_max, out):
    """``out[b] += P_b volume`` for all ``b``; see the module docstring for the mapping.

    ``volume (N, N, N)``, ``rotations (b, 3, 3)``, ``r2_max`` int32 (largest ``|r|^2`` inside
    the support), ``out (b, N, N)``. Launch with ``blockDim.x`` a multiple of 64 (at most 512).
    """
    # flat tiles: tile g, row ty, column tx at (g * TILE + ty) * TILE + tx
    tile = cuda.shared.array(TILES_FLAT, np.float32)
    rot = cuda.shared.array((GROUP, 6), np.float32)
    origin = cuda.shared.array((GROUP, 2), np.int32)

    n = volume.shape[0]
    nb = rotations.shape[0]
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    depth = tpb // 64
    c = n // 2
    cf = np.float32(c)
    nbx = (n + 7) // 8
    nbz = (n + depth - 1) // depth
    n_bricks = nbx * nbx * nbz
    half_z = _HALF * np.float32(depth - 1)
    lx = tid % 8
    ly = (tid // 8) % 8
    lz = tid // 64

    # Tiles start zeroed and every flush re-zeroes what it reads. The first staging barrier
    # below orders these stores before any splat.
    for t in range(tid, TILES_FLAT, tpb):
        tile[t] = _F0

    for brick in range(cuda.blockIdx.x, n_bricks, cuda.gridDim.x):
        bz = brick // (nbx * nbx)
        rem = brick - bz * (nbx * nbx)
        by = rem // nbx
        bx = rem - by * nbx
        # brick centre, as an offset from the box centre (voxels)
        ccx = np.float32(bx * 8 - c) + _BRICK_HALF_XY
        ccy = np.float32(by * 8 - c) + _BRICK_HALF_XY
        ccz = np.float32(bz * depth - c) + half_z
        # Skip bricks wholly outside the support sphere (the same decision for the whole block).
        dx = max(abs(ccx) - _BRICK_HALF_XY, _F0)
        dy = max(abs(ccy) - _BRICK_HALF_XY, _F0)
        dz = max(abs(ccz) - half_z, _F0)
        if dx * dx + dy * dy + dz * dz > np.float32(r2_max):
            continue

        j = bx * 8 + lx
        i = by * 8 + ly
        k = bz * depth + lz
        rx = j - c
        ry = i - c
        rz = k - c
        val = _F0
        if j < n and i < n and k < n and rx * rx + ry * ry + rz * rz <= r2_max:
            val = volume[k, i, j]
        rxf = np.float32(rx)
        ryf = np.float32(ry)
        rzf = np.float32(rz)

        for g0 in range(0, nb, GROUP):
            cnt = np.int32(min(GROUP, nb - g0))
            if tid < cnt:
                b = g0 + tid
                a00 = rotations[b, 0, 0]
                a01 = rotations[b, 0, 1]
                a02 = rotations[b, 0, 2]
                a10 = rotations[b, 1, 0]
                a11 = rotations[b, 1, 1]
                a12 = rotations[b, 1, 2]
                rot[tid, 0] = a00
                rot[tid, 1] = a01
                rot[tid, 2] = a02
                rot[tid, 3] = a10
                rot[tid, 4] = a11
                rot[tid, 5] = a12
                uc = a00 * ccx + a01 * ccy + a02 * ccz + cf
                vc = a10 * ccx + a11 * ccy + a12 * ccz + cf
                origin[tid, 0] = np.int32(math.floor(uc)) - TILE_MARGIN
                origin[tid, 1] = np.int32(math.floor(vc)) - TILE_MARGIN
            cuda.syncthreads()

            if val != _F0:
                for g in range(cnt):
                    u = rot[g, 0] * rxf + rot[g, 1] * ryf + rot[g, 2] * rzf + cf
                    v = rot[g, 3] * rxf + rot[g, 4] * ryf + rot[g, 5] * rzf + cf
                    x0 = np.int32(math.floor(u))
                    y0 = np.int32(math.floor(v))
                    fx = u - np.float32(x0)
                    fy = v - np.float32(y0)
                    tx = x0 - origin[g, 0]
                    ty = y0 - origin[g, 1]
                    if tx >= 0 and tx < TILE - 1 and ty >= 0 and ty < TILE - 1:
                        top = val - val * fy      # val * (1 - fy)
                        bottom = val * fy
                        t = np.uint32((g * TILE + ty) * TILE + tx)
                        cuda.atomic.add(tile, t, top - top * fx)
                        cuda.atomic.add(tile, t + np.uint32(1), top * fx)
                        cuda.atomic.add(tile, t + np.uint32(TILE), bottom - bottom * fx)
                        cuda.atomic.add(tile, t + np.uint32(TILE + 1), bottom * fx)
                    else:
                        _splat_global(out, g0 + g, x0, y0, fx, fy, val)
            cuda.syncthreads()

            # Flush: one global atomic per touched tile pixel inside the image; re-zero the tile.
            for t in range(tid, cnt * (TILE * TILE), tpb):
                w = tile[t]
                if w != _F0:
                    tile[t] = _F0
                    g = t // (TILE * TILE)
                    p = t - g * (TILE * TILE)
                    ty = p // TILE
                    x = origin[g, 0] + (p - ty * TILE)
                    y = origin[g, 1] + ty
                    if x >= 0 and x < n and y >= 0 and y < n:
                        cuda.atomic.add(out, (g0 + g, y, x), w)
            cuda.syncthreads()


def project(volume: Any, rotations: Any, radius_px: float, out: Any, *,
            threads_per_block: int = DEFAULT_THREADS_PER_BLOCK) -> None:
    """Voxel-driven projection with bilinear splatting, accumulated into ``out`` (asynchronous).

    For each voxel ``(k, i, j)`` with offset ``r = (j - c, i - c, k - c)``, ``c = N // 2`` and
    ``|r|^2 <= radius_px^2``, the voxel value is splatted with bilinear weights at image position
    ``(u, v) = ((A r)_x + c, (A r)_y + c)`` (u = column, v = row) of ``out[b]``; corners outside the
    image are dropped.

    Parameters
    ----------
    volume
        ``(N, N, N)`` float32 device array, indexed ``[z, y, x]``.
    rotations
        ``(b, 3, 3)`` float32 device array of RELION matrices ``A``.
    radius_px
        Support radius in pixels (``inf`` for the whole box).
    out
        ``(b, N, N)`` float32 device array, caller-zeroed; the projections are added to it.
    threads_per_block
        Block size, a multiple of 64 up to 512 (bricks of ``8 x 8 x threads_per_block/64``).
    """
    device_f32("volume", volume, (None, None, None))
    n = volume.shape[0]
    device_f32("volume", volume, (n, n, n))
    device_f32("rotations", rotations, (None, 3, 3))
    nb = rotations.shape[0]
    device_f32("out", out, (nb, n, n))
    depth = brick_depth(threads_per_block)
    r2_max = support_limit(radius_px, n)
    if nb == 0 or n == 0:
        return
    nbx = -(-n // 8)
    n_bricks = nbx * nbx * -(-n // depth)
    _project_kernel[min(n_bricks, MAX_BLOCKS), threads_per_block](volume, rotations, r2_max, out)
