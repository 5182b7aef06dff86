"""Argument checks shared by the launchers (host side, before any kernel runs).

Wrong shapes, dtypes or host arrays passed to a launcher are programming errors, not user input:
they raise ``TypeError``/``ValueError`` with the argument's name.
"""

from __future__ import annotations

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


def brick_depth(threads_per_block: int) -> int:
    """Brick depth (z-planes) for the 8 x 8 x depth voxel bricks of the projector kernels."""
    tpb = int(threads_per_block)
    if tpb % 64 != 0 or not 64 <= tpb <= 512:
        raise ValueError(f"threads_per_block must be 64, 128, ..., 512 (a multiple of 64), got {threads_per_block}")
    return tpb // 64
