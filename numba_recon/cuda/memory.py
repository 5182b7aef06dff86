"""Device memory helpers of the CUDA backend: transfers, zeroed arrays, scratch buffers.

The kernel contract's memory helpers (``to_device``, ``to_host``, ``zeros``, ``synchronize``)
plus :func:`scratch`, a per-process cache of named work buffers so that the launchers do not
allocate device memory on every minibatch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_recon.cuda._target import cuda, is_device_array
from numba_recon.cuda.elementwise import _fill_kernel

_FILL_THREADS = 256
_FILL_PER_THREAD = 8  # elements per thread of the grid-stride fill
_FILL_MAX_BLOCKS = 4096

# name -> flat device buffer; grows, never shrinks, until release_scratch()
_SCRATCH: dict[tuple[str, Any], Any] = {}


def to_device(a: np.ndarray, dtype: Any = np.float32) -> Any:
    """Copy a host array to the device as a C-contiguous, native-endian array.

    Parameters
    ----------
    a
        Host array of any shape; a device array is returned unchanged.
    dtype
        Element type on the device (float32 by default, as the kernels expect); ``None`` keeps
        ``a``'s type.

    Returns
    -------
    numba device array
        Same shape as ``a``.
    """
    if is_device_array(a):
        return a
    host = np.ascontiguousarray(a, dtype=None if dtype is None else np.dtype(dtype))
    if not host.dtype.isnative:
        host = host.astype(host.dtype.newbyteorder("="))
    return cuda.to_device(host)


def to_host(a: Any) -> np.ndarray:
    """Copy a device array to a new host numpy array (host arrays are returned as numpy arrays)."""
    if is_device_array(a):
        return a.copy_to_host()
    return np.asarray(a)


def fill(a: Any, value: float) -> None:
    """Set every element of the C-contiguous device array ``a`` to ``value`` (asynchronous)."""
    flat = a.reshape(a.size) if a.ndim != 1 else a
    if flat.shape[0] == 0:
        return
    blocks = min(_FILL_MAX_BLOCKS, math.ceil(flat.shape[0] / (_FILL_THREADS * _FILL_PER_THREAD)))
    _fill_kernel[blocks, _FILL_THREADS](flat, flat.dtype.type(value))


def zeros(shape: int | tuple[int, ...], dtype: Any = np.float32) -> Any:
    """A new zero-filled device array of ``shape`` (float32 by default)."""
    out = cuda.device_array(shape, dtype=np.dtype(dtype))
    fill(out, 0)
    return out


def synchronize() -> None:
    """Wait until all work queued on the default stream has finished."""
    cuda.default_stream().synchronize()


def _device_key() -> Any:
    try:
        return cuda.get_current_device().id
    except Exception:  # noqa: BLE001 - the simulator's device has no id
        return None


def scratch(name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
    """A cached, uninitialised device work array of ``shape`` for the caller named ``name``.

    The buffer behind ``name`` is reused across calls and grown when a larger shape is asked for,
    so two live arrays must use two names. Contents are undefined on return.
    """
    dt = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    key = (name, dt.str, _device_key())
    buf = _SCRATCH.get(key)
    if buf is None or buf.shape[0] < size:
        buf = cuda.device_array(max(size, 1), dtype=dt)
        _SCRATCH[key] = buf
    return buf[:size].reshape(shape)


def release_scratch() -> None:
    """Drop the cached work buffers (their device memory is freed once unreferenced)."""
    _SCRATCH.clear()
