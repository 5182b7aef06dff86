"""Geometry shared by the compiled kernels: the CPU and CUDA twins, the phantom and the symmetry code.

Conventions (those of ``docs/architecture.md``, "The kernel contract"):

- a volume is ``(N, N, N)`` indexed ``[z, y, x]``; its centre is ``c = N // 2`` (voxels);
- voxel ``(k, i, j)`` has the offset ``r = (j - c, i - c, k - c)`` (voxels);
- a RELION matrix ``A`` ``(3, 3)`` puts that voxel at the image position
  ``(u, v) = ((A r)_x + c, (A r)_y + c)`` (pixels; u = column, v = row), so only its first two rows
  matter to a projection;
- the 2-D DFT sample ``(k_u, k_v)`` (signed integer frequencies, cycles per box) of an image is
  the 3-D frequency ``q = A^T (k_u, k_v, 0)`` (central slice).

Every helper is a small function registered with ``numba.extending.register_jitable``:

- ``@numba.njit`` kernels call it as it is; numba compiles it with the caller's flags (fastmath
  included) and LLVM inlines it (the one helper marked ``inline="always"`` is inlined in numba's
  IR instead: inlined by LLVM, it leaves its kernel slower);
- CUDA kernels call ``cuda.jit(device=True, inline=True)(helper)``, made in the calling module
  by :func:`numba_recon.cuda._target.inline_device_functions` (numba-cuda compiles a called
  overload for the current GPU, so a kernel calling the helper directly would not compile to PTX
  on a machine without one; an inlined device function needs no GPU). Under the CUDA simulator
  the kernels call the Python functions;
- for that reason no helper calls another.

Each helper fixes an operation order and keeps its caller's precision (float32 stays float32,
float64 stays float64): the twins' results are reproducible bit for bit and the hot CUDA kernels
stay free of float64 arithmetic. The only float constants are float32 ones in the float32-only
(CUDA) helpers; a caller that needs ``1`` in its own precision passes it (``one``).

Numba's on-disk cache (``cache=True``) keys a kernel on its own source file only: after editing
this module, delete the ``__pycache__`` folders of the calling packages.
"""

from __future__ import annotations

import math

import numpy as np
from numba.extending import register_jitable

#: Edge of a CUDA voxel brick in x and y (voxels); its depth in z is ``threads_per_block // 64``.
BRICK = 8

_F0 = np.float32(0.0)
_HALF = np.float32(0.5)
#: Half the brick's x/y extent between its first and last voxel centre (voxels).
_BRICK_HALF_XY = np.float32(0.5 * (BRICK - 1))


# --- rotations and image positions -----------------------------------------------------------


@register_jitable
def image_rows(rot: np.ndarray, b: int) -> tuple[float, float, float, float, float, float]:
    """The first two rows of ``rot[b]`` (``rot (B, 3, 3)``): ``(a00, a01, a02, a10, a11, a12)``."""
    return rot[b, 0, 0], rot[b, 0, 1], rot[b, 0, 2], rot[b, 1, 0], rot[b, 1, 1], rot[b, 1, 2]


@register_jitable
def stage_rows(rot: np.ndarray, b: int, rows: np.ndarray,
               t: int) -> tuple[float, float, float, float, float, float]:
    """Copy the first two rows of ``rot[b]`` to ``rows[t, 0:6]`` and return them (the CUDA twins
    stage them in shared memory for :func:`staged_corner`)."""
    a00, a01, a02 = rot[b, 0, 0], rot[b, 0, 1], rot[b, 0, 2]
    a10, a11, a12 = rot[b, 1, 0], rot[b, 1, 1], rot[b, 1, 2]
    rows[t, 0], rows[t, 1], rows[t, 2], rows[t, 3], rows[t, 4], rows[t, 5] = a00, a01, a02, a10, a11, a12
    return a00, a01, a02, a10, a11, a12


@register_jitable
def image_position(a00: float, a01: float, a02: float, a10: float, a11: float, a12: float,
                   x: float, y: float, z: float, c: float) -> tuple[float, float]:
    """Image position ``(u, v) = ((A r)_x + c, (A r)_y + c)`` of the offset ``r = (x, y, z)`` (pixels)."""
    return a00 * x + a01 * y + a02 * z + c, a10 * x + a11 * y + a12 * z + c


@register_jitable
def padded_frame(n: int, pad: int) -> tuple[int, int, np.uintp, np.uintp, np.uintp]:
    """An ``n x n`` image inside a zero border of ``pad`` pixels (the CPU twins' images).

    Returns ``(c, w, right, below, below_right)``: the box centre ``c = n // 2``, the padded width
    ``w = n + 2 pad``, and the unsigned flat offsets from a pixel to the other three corners of its
    bilinear cell.
    """
    w = n + 2 * pad
    return n // 2, w, np.uintp(1), np.uintp(w), np.uintp(w + 1)


@register_jitable
def row_start(a01: float, a02: float, a11: float, a12: float, dy: float, dz: float,
              origin: float) -> tuple[float, float]:
    """Image position of the ``dx = 0`` voxel of the row ``(dy, dz)``, shifted by ``origin``.

    Along the row the position moves by ``(a00, a10)`` per voxel (:func:`row_corner`); the CPU
    twins both walk rows this way, so the projector and its adjoint see the same positions.
    """
    return a01 * dy + a02 * dz + origin, a11 * dy + a12 * dz + origin


@register_jitable
def row_corner(row_u: float, row_v: float, a00: float, a10: float, dx: float,
               width: np.uintp) -> tuple[np.uintp, float, float]:
    """Bilinear corner of voxel ``dx`` of a row in a zero-padded image ``width`` pixels wide.

    Returns the flat index of the top-left corner pixel and the fractions ``(fu, fv)`` in
    ``[0, 1)``. The padding keeps ``u, v >= 0``, so truncation to an unsigned index is ``floor``.
    """
    u = row_u + a00 * dx
    v = row_v + a10 * dx
    return np.uintp(v) * width + np.uintp(u), u - np.floor(u), v - np.floor(v)


@register_jitable
def staged_corner(rows: np.ndarray, g: int, x: np.float32, y: np.float32, z: np.float32,
                  c: np.float32) -> tuple[np.int32, np.int32, np.float32, np.float32]:
    """Bilinear corner of the offset ``(x, y, z)`` in image ``g``, whose matrix's first two rows are
    staged as ``rows[g, 0:6]`` (the CUDA twins' shared memory; float32 throughout).

    The position is :func:`image_position`'s (a helper calls no other); returns its floor as int32
    ``(x0, y0)`` and the float32 fractions ``(fx, fy)`` in ``[0, 1)``.
    """
    u = rows[g, 0] * x + rows[g, 1] * y + rows[g, 2] * z + c
    v = rows[g, 3] * x + rows[g, 4] * y + rows[g, 5] * z + c
    x0 = np.int32(math.floor(u))
    y0 = np.int32(math.floor(v))
    return x0, y0, u - np.float32(x0), v - np.float32(y0)


# --- bilinear weights ------------------------------------------------------------------------


@register_jitable
def bilinear_weights(val: float, fx: float, fy: float) -> tuple[float, float, float, float]:
    """``val`` split over the corners ``(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)``.

    ``fx, fy`` are the fractions in ``[0, 1)``; the four weights sum to ``val`` up to rounding.
    """
    low = val * fy
    high = val - low
    right = high * fx
    low_right = low * fx
    return high - right, right, low - low_right, low_right


@register_jitable
def lerp(a: float, b: float, t: float) -> float:
    """``a + t (b - a)``: linear interpolation from ``a`` (``t = 0``) to ``b`` (``t = 1``)."""
    return a + t * (b - a)


# --- the support sphere and CUDA voxel bricks ------------------------------------------------


@register_jitable
def brick_grid(n: int, depth: int) -> tuple[int, int]:
    """``(nbx, n_bricks)``: bricks per x/y edge and in all, for a box ``n`` and bricks ``depth`` deep."""
    nbx = (n + BRICK - 1) // BRICK
    return nbx, nbx * nbx * ((n + depth - 1) // depth)


@register_jitable
def brick_layout(n: int, threads_per_block: int) -> tuple[int, np.float32, int, int, int, np.float32]:
    """The bricks of a box ``n`` for blocks of ``threads_per_block`` threads, one voxel each:
    ``(c, cf, depth, nbx, n_bricks, half_z)`` with the box centre ``c`` (and as float32, ``cf``),
    the brick depth, the bricks per x/y edge and in all, and ``half_z = (depth - 1) / 2`` (float32)."""
    c = n // 2
    depth = threads_per_block // (BRICK * BRICK)
    nbx = (n + BRICK - 1) // BRICK
    return c, np.float32(c), depth, nbx, nbx * nbx * ((n + depth - 1) // depth), _HALF * np.float32(depth - 1)


@register_jitable
def brick_centre(brick: int, nbx: int, depth: int, c: int,
                 half_z: np.float32) -> tuple[int, int, int, np.float32, np.float32, np.float32]:
    """Grid position ``(bx, by, bz)`` of brick number ``brick`` (x fastest, then y, then z) and its
    centre ``(ccx, ccy, ccz)`` as a float32 offset from the box centre ``c`` (voxels)."""
    bz = brick // (nbx * nbx)
    rem = brick - bz * (nbx * nbx)
    by = rem // nbx
    bx = rem - by * nbx
    return (bx, by, bz, np.float32(bx * BRICK - c) + _BRICK_HALF_XY, np.float32(by * BRICK - c) + _BRICK_HALF_XY,
            np.float32(bz * depth - c) + half_z)


@register_jitable
def brick_outside(ccx: np.float32, ccy: np.float32, ccz: np.float32, half_z: np.float32, r2_max: int) -> bool:
    """No voxel centre of the brick centred at ``(ccx, ccy, ccz)`` is in the support sphere.

    The distance from the box centre to the brick's box of voxel centres, squared, against
    ``r2_max`` (float32).
    """
    dx = max(abs(ccx) - _BRICK_HALF_XY, _F0)
    dy = max(abs(ccy) - _BRICK_HALF_XY, _F0)
    dz = max(abs(ccz) - half_z, _F0)
    return dx * dx + dy * dy + dz * dz > np.float32(r2_max)


@register_jitable
def brick_voxel(bx: int, by: int, bz: int, depth: int, tid: int, n: int, c: int,
                r2_max: int) -> tuple[int, int, int, np.float32, np.float32, np.float32, bool]:
    """The voxel of thread ``tid`` (x fastest, then y, then z) in brick ``(bx, by, bz)``.

    Returns its indices ``(j, i, k)`` (the last bricks reach beyond the box), its offset from the
    centre as float32 ``(rx, ry, rz)``, and whether it lies in the box with ``|r|^2 <= r2_max``.
    """
    j = bx * BRICK + tid % BRICK
    i = by * BRICK + (tid // BRICK) % BRICK
    k = bz * depth + tid // (BRICK * BRICK)
    rx = j - c
    ry = i - c
    rz = k - c
    inside = j < n and i < n and k < n and rx * rx + ry * ry + rz * rz <= r2_max
    return j, i, k, np.float32(rx), np.float32(ry), np.float32(rz), inside


# --- Fourier slices and trilinear interpolation ----------------------------------------------


@register_jitable
def signed_frequency(i: int, n: int) -> int:
    """Signed frequency of index ``i`` of an unshifted length-``n`` DFT axis (``i >= (n + 1) // 2`` is negative)."""
    return i - n if i >= (n + 1) // 2 else i


@register_jitable
def slice_frequency(a00: float, a01: float, a02: float, a10: float, a11: float, a12: float,
                    ku: float, kv: float) -> tuple[float, float, float]:
    """The 3-D frequency ``q = A^T (ku, kv, 0)`` of the 2-D frequency ``(ku, kv)``: ``(qx, qy, qz)``."""
    return a00 * ku + a10 * kv, a01 * ku + a11 * kv, a02 * ku + a12 * kv


@register_jitable
def trilinear_corner(x: float, y: float, z: float) -> tuple[int, int, int, float, float, float]:
    """Lower grid corner of a point and its fractions: ``(x0, y0, z0, fx, fy, fz)``, ``f`` in ``[0, 1)``.

    ``math.floor`` (CUDA kernels have no ``np.floor``) is float32 for float32 points on the GPU and
    an integer for float64 points on the CPU; either way ``x - floor(x)`` is the number
    ``np.floor`` would give.
    """
    fx = math.floor(x)
    fy = math.floor(y)
    fz = math.floor(z)
    return int(fx), int(fy), int(fz), x - fx, y - fy, z - fz


# Inlined in numba's IR: left to LLVM to inline, the CPU insert kernel around it ran about 20 %
# slower (its Python-semantics modulos were not simplified in place).
@register_jitable(inline="always")
def periodic_cell(x0: int, y0: int, z0: int, n: int) -> tuple[int, int, int, int, int, int]:
    """The corners of the grid cell at ``(x0, y0, z0)`` on a periodic grid of ``n`` per axis (a DFT
    grid): ``(x0, y0, z0, x1, y1, z1)``, each in ``[0, n)``."""
    x0 %= n
    y0 %= n
    z0 %= n
    return x0, y0, z0, (x0 + 1) % n, (y0 + 1) % n, (z0 + 1) % n


@register_jitable
def trilinear_weights(w: float, tx: float, ty: float, tz: float,
                      one: float) -> tuple[float, float, float, float, float, float, float, float]:
    """``w`` split over the 8 corners of a grid cell, ``(z, y, x)`` order: ``(z0 y0 x0, z0 y0 x1, ...,
    z1 y1 x1)``; ``t`` are the fractions, ``one`` is 1 in the caller's precision."""
    wz0 = w * (one - tz)
    wz1 = w * tz
    return (wz0 * (one - ty) * (one - tx), wz0 * (one - ty) * tx, wz0 * ty * (one - tx), wz0 * ty * tx,
            wz1 * (one - ty) * (one - tx), wz1 * (one - ty) * tx, wz1 * ty * (one - tx), wz1 * ty * tx)


# --- loop bounds -----------------------------------------------------------------------------


@register_jitable
def clipped_span(p: float, reach: float, lo: int, hi: int) -> tuple[int, int]:
    """The integers within ``reach`` of ``p`` (``ceil(p - reach)`` to ``floor(p + reach)``), clipped
    to ``[lo, hi]``; empty when the first exceeds the second."""
    return max(lo, int(np.ceil(p - reach))), min(hi, int(np.floor(p + reach)))
