"""Memory helpers of the CPU backend: the "device" is host memory.

They mirror :mod:`numba_recon.cuda`'s helpers so that code written against the kernel contract
runs unchanged on either backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_device(a: Any, dtype: Any = np.float32) -> np.ndarray:
    """Return ``a`` as a C-contiguous, native-endian array of ``dtype`` (``None`` keeps ``a``'s type).

    No copy is made when ``a`` already qualifies, so the result may share memory with ``a``.
    """
    out = np.ascontiguousarray(a, dtype=None if dtype is None else np.dtype(dtype))
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    return out


def to_host(a: Any) -> np.ndarray:
    """A new host array with the contents of ``a`` (a copy, as a device-to-host transfer would be)."""
    return np.array(a, copy=True)


def zeros(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """A new zero-filled array of ``shape`` (float32 by default)."""
    return np.zeros(shape, dtype=np.dtype(dtype))


def synchronize() -> None:
    """Nothing to wait for: CPU kernels return when their work is done."""
