"""The single import site of the CUDA target.

Every other module of :mod:`numba_recon.cuda` does ``from numba_recon.cuda._target import cuda``,
so moving to another CUDA target (for example ``numba_cuda_mlir``) is a change of the one import
line below. With ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, ``cuda`` is Numba's CUDA
simulator: the kernels then run on the CPU, one OS thread per CUDA thread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from numba import cuda

#: True when ``cuda`` is Numba's CUDA simulator. Read from the module itself: numba picks the
#: simulator when ``numba.cuda`` is first imported, from the configuration it loaded then.
SIMULATOR: bool = hasattr(cuda, "FakeCUDAKernel")

#: The simulator runs one OS thread per CUDA thread, and its ``syncthreads`` is a barrier of them
#: all: with Python's default 5 ms GIL switch interval every barrier waits for a round of switches.
SIMULATOR_SWITCH_INTERVAL_S = 5e-4


def _allocate_shared_arrays_once_per_block() -> None:
    """Make the simulator's ``cuda.shared.array`` give every thread of a block the same array.

    The simulator keys a block's shared arrays by the calling source line and creates one on the
    first call from that line, without a lock: two threads that both look before either stores
    each get their own array, so what one thread writes another never sees (reads of never-written
    memory; a kernel then fails or, worse, computes from garbage). The replacement does the
    look-up and the store under one lock, with the caller's frame as the key (what the simulator
    derives, far slower, from a whole stack trace).
    """
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    if getattr(original, "locked", False):
        return
    lock = threading.Lock()

    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> Any:
        if alignment is not None or shape == 0:  # refused, or the dynamic shared memory: unchanged
            return original(self, shape, dtype, alignment)
        dtype = kernelapi.numpy_support.as_dtype(dtype) if isinstance(dtype, kernelapi.types.Type) else dtype
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    array.locked = True  # type: ignore[attr-defined]
    kernelapi.FakeCUDAShared.array = array


if SIMULATOR:
    sys.setswitchinterval(min(sys.getswitchinterval(), SIMULATOR_SWITCH_INTERVAL_S))
    _allocate_shared_arrays_once_per_block()


def inline_device_functions(*functions: Callable[..., Any]) -> tuple[Any, ...]:
    """``functions`` as kernels call them: ``cuda.jit(device=True, inline=True)`` device functions on
    a GPU (they compile to PTX without one, unlike a called ``register_jitable`` overload), the
    Python functions themselves in the simulator (where a device-function call costs microseconds).
    Assign the results to module globals: kernels resolve the functions they call by global name."""
    if SIMULATOR:
        return functions
    jit = cuda.jit(device=True, inline=True)
    return tuple(jit(f) for f in functions)


def is_available() -> bool:
    """True when a CUDA device (or the simulator) can run the kernels.

    Never raises: a missing driver or library reads as "not available".
    """
    try:
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - any driver failure means "not available"
        return False


def is_device_array(a: Any) -> bool:
    """True for a device array of the current target (simulator arrays included)."""
    if SIMULATOR:
        return hasattr(a, "copy_to_host") and hasattr(a, "_ary")
    return cuda.is_cuda_array(a)


def _version_string(version: Any) -> str | None:
    if version is None:
        return None
    if isinstance(version, tuple):
        return ".".join(str(v) for v in version)
    return str(version)


def describe() -> dict[str, Any]:
    """Facts about the CUDA target, for logs and reports.

    Returns
    -------
    dict
        ``available``, ``simulator``, ``implementation`` (``"NVIDIA"`` for numba-cuda),
        ``numba_cuda_version``; when a device is present also ``name``, ``compute_capability``
        (``"9.0"``), ``multiprocessors``, ``total_memory_bytes``, ``driver_version`` and
        ``runtime_version`` where the target reports them. ``error`` says why nothing more is
        known when the device cannot be queried.
    """
    info: dict[str, Any] = {
        "available": is_available(),
        "simulator": SIMULATOR,
        "implementation": getattr(cuda, "implementation", None),
        "numba_cuda_version": None,
    }
    try:
        import numba_cuda

        info["numba_cuda_version"] = numba_cuda.__version__
    except ImportError:
        pass
    if not info["available"]:
        return info
    try:
        dev = cuda.get_current_device()
        cc = tuple(dev.compute_capability)
        info["compute_capability"] = f"{cc[0]}.{cc[1]}"
        name = getattr(dev, "name", "SIMULATOR" if SIMULATOR else None)
        info["name"] = name.decode() if isinstance(name, bytes) else name
        if not SIMULATOR:
            info["multiprocessors"] = int(dev.MULTIPROCESSOR_COUNT)
            info["total_memory_bytes"] = int(cuda.current_context().get_memory_info().total)
            info["driver_version"] = _version_string(cuda.cudadrv.driver.driver.get_version())
            info["runtime_version"] = _version_string(cuda.runtime.get_version())
    except Exception as err:  # noqa: BLE001 - describing must not fail
        info["error"] = f"{type(err).__name__}: {err}"
    return info
