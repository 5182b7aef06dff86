"""Argument checks shared by the launchers (host side, before any kernel runs).

Wrong shapes, dtypes or host arrays passed to a launcher are programming errors, not user input:
they raise ``TypeError``/``ValueError`` with the argument's name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_recon.cuda._target import is_device_array


def device_f32(name: str, a: Any, shape: tuple[int | None, ...]) -> None:
    """Require a C-contiguous float32 device array whose shape matches ``shape`` (None = any)."""
    if not is_device_array(a):
        raise TypeError(f"{name}: expected a CUDA device array, got {type(a).__name__}; "
                        "copy it with numba_recon.cuda.to_device first")
    if np.dtype(a.dtype) != np.float32:
        raise TypeError(f"{name}: expected float32, got {np.dtype(a.dtype)}")
    if len(a.shape) != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
        want_text = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name}: expected shape {want_text}, got {tuple(a.shape)}")
    if not a.is_c_contiguous():
        raise ValueError(f"{name}: expected a C-contiguous array")


def support_limit(radius_px: float, n: int) -> np.int32:
    """Largest integer ``|r|^2`` inside the support sphere of ``radius_px`` in a box of ``n``.

    Voxel offsets are integers, so ``|r|^2 <= radius_px^2`` is the same test as
    ``|r|^2 <= floor(radius_px^2)``, done exactly in integers on the device. The value is capped at
    the largest ``|r|^2`` in the box so that an infinite radius means "no support mask".
    """
    radius = float(radius_px)
    if math.isnan(radius) or radius < 0:
        raise ValueError(f"radius_px must be >= 0, got {radius_px!r}")
    c = n // 2
    largest = 3 * max(c, n - 1 - c) ** 2
    if math.isinf(radius):
        return np.int32(largest)
    return np.int32(min(largest, math.floor(radius * radius)))


def brick_depth(threads_per_block: int) -> int:
    """Brick depth (z-planes) for the 8 x 8 x depth voxel bricks of the projector kernels."""
    tpb = int(threads_per_block)
    if tpb % 64 != 0 or not 64 <= tpb <= 512:
        raise ValueError(f"threads_per_block must be 64, 128, ..., 512 (a multiple of 64), got {threads_per_block}")
    return tpb // 64
