"""The reduce stage and everything MPI: the communicator, gradient sums, GPU choice, abort on failure.

All collectives go through :class:`Comm`. With one process (no ``mpirun``) it is a serial
stand-in with the same methods, so the engine has one code path.

- Gradients of both half maps are summed with ONE ``Allreduce`` of a ``(2, N, N, N)`` buffer, in
  place. Device arrays are passed to MPI directly only when the MPI is CUDA-aware (probed, or forced
  with ``NUMBA_RECON_CUDA_AWARE_MPI=1``/``0``); otherwise they are staged through a reused host buffer.
- Each rank picks its GPU from its node-local rank (a ``COMM_TYPE_SHARED`` split).
- :func:`install_abort_hook` makes an exception on any rank call ``MPI_Abort``, so one failed rank
  ends the whole job within seconds instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _launched_by_mpi() -> bool:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(var)
        if value is not None and value.isdigit() and int(value) > 1:
            return True
    return "PMIX_RANK" in os.environ or "HYDRA_CONTROL_FD" in os.environ


class Comm:
    """A thin wrapper over an mpi4py communicator (or none, for one process).

    Attributes
    ----------
    rank, size
        This process's rank and the number of processes.
    local_rank, local_size
        Rank and size within this node (``COMM_TYPE_SHARED`` split).
    """

    def __init__(self, mpi_comm: Any = None) -> None:
        self._comm = mpi_comm
        self._host_buffers: dict[tuple, np.ndarray] = {}
        if mpi_comm is None:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
            self.cuda_aware = False
            return
        from mpi4py import MPI

        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()
        self.cuda_aware = cuda_aware_mpi()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def mpi(self) -> Any:
        return self._comm

    def barrier(self) -> None:
        if self._comm is not None:
            self._comm.Barrier()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj if self._comm is None else self._comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list:
        return [obj] if self._comm is None else self._comm.allgather(obj)

    def allreduce_sum_(self, buf: Any) -> Any:
        """Sum ``buf`` over all ranks, in place, and return it.

        ``buf`` is a C-contiguous numpy array or a numba device array. Device arrays go straight to
        MPI when it is CUDA-aware (after a stream synchronisation, which MPI needs), otherwise through
        a host buffer that is allocated once per shape and reused.
        """
        if self._comm is None:
            return buf
        from mpi4py import MPI

        if isinstance(buf, np.ndarray):
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return buf
        # a device array
        from numba_recon.cuda import synchronize

        synchronize()
        if self.cuda_aware:
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return buf
        key = (tuple(buf.shape), str(buf.dtype))
        host = self._host_buffers.get(key)
        if host is None:
            host = _pinned_empty(buf.shape, buf.dtype)
            self._host_buffers[key] = host
        buf.copy_to_host(host)
        self._comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        buf.copy_to_device(host)
        return buf

    def allreduce_scalar(self, value: float) -> float:
        if self._comm is None:
            return float(value)
        from mpi4py import MPI

        return float(self._comm.allreduce(float(value), op=MPI.SUM))

    def abort(self, code: int = 1) -> None:
        if self._comm is not None:
            self._comm.Abort(code)
        raise SystemExit(code)


def _pinned_empty(shape: tuple, dtype: Any) -> np.ndarray:
    try:
        from numba_recon.cuda._target import cuda

        return cuda.pinned_array(shape, dtype=dtype)
    except Exception:  # pinning is an optimisation; plain memory is correct
        return np.empty(shape, dtype=dtype)


_COMM: Comm | None = None


def get_comm() -> Comm:
    """The job's communicator, created once.

    With mpi4py importable, ``MPI.COMM_WORLD`` is used (a singleton of size 1 without a launcher).
    If the process was launched by ``mpirun``/``srun`` but mpi4py cannot load an MPI library, that is
    an error, not a silent serial run.
    """
    global _COMM
    if _COMM is not None:
        return _COMM
    try:
        from mpi4py import MPI
    except Exception as err:  # ImportError, or RuntimeError when no libmpi can be loaded
        if _launched_by_mpi():
            from numba_recon.errors import BackendUnavailableError

            raise BackendUnavailableError(
                f"launched under MPI but mpi4py cannot load an MPI library ({err}); "
                "install it with: pip install 'numba-recon[mpich]' or load the site MPI module") from None
        log.debug("mpi4py unavailable (%s); running as a single process", err)
        _COMM = Comm(None)
        return _COMM
    world = MPI.COMM_WORLD
    _COMM = Comm(world if world.Get_size() > 1 else None)
    if world.Get_size() > 1:
        install_abort_hook(_COMM)
    return _COMM


#: Seconds a failing rank waits, its output flushed, before ``MPI_Abort`` ends the job.
ABORT_GRACE_S = 0.5


def install_abort_hook(comm: Comm) -> None:
    """Make an uncaught exception on any rank abort the whole job (``MPI_Abort``) at once.

    Without it, the failed rank exits while the others wait forever in the next collective.
    Log handlers are flushed first because ``Abort`` skips ``atexit`` and ``finally`` blocks.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # pragma: no cover - exercised in MPI subprocess tests
        try:
            if issubclass(exc_type, SystemExit) and not exc.code:
                return
            previous(exc_type, exc, tb)
        finally:
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
            sys.stdout.flush()
            sys.stderr.flush()
            if comm.mpi is not None:
                # the launcher forwards a rank's output through a pipe; Abort tears the job down at
                # once, and the message that says why could be cut off without a moment to drain it
                time.sleep(ABORT_GRACE_S)
                comm.mpi.Abort(1)

    sys.excepthook = hook


def _libmpi() -> ctypes.CDLL | None:
    """The MPI library loaded in this process, found through /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if "/" in line else ""
                name = os.path.basename(path)
                if name.startswith("libmpi.so") or name.startswith("libmpi_") or name.startswith("libmpich.so"):
                    return ctypes.CDLL(path)
    except OSError:
        return None
    return None


def cuda_aware_mpi() -> bool:
    """Whether MPI can take device buffers.

    ``NUMBA_RECON_CUDA_AWARE_MPI=1`` or ``0`` forces the answer. Otherwise the loaded library is
    asked: MPICH's ``MPIX_GPU_query_support`` or Open MPI's ``MPIX_Query_cuda_support``. Anything
    uncertain means no (host staging is always correct).
    """
    forced = os.environ.get("NUMBA_RECON_CUDA_AWARE_MPI")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes", "on")
    lib = _libmpi()
    if lib is None:
        return False
    try:
        fn = lib.MPIX_GPU_query_support
        flag = ctypes.c_int(0)
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        if fn(0, ctypes.byref(flag)) == 0:  # MPIX_GPU_SUPPORT_CUDA == 0
            return bool(flag.value)
    except AttributeError:
        pass
    try:
        fn = lib.MPIX_Query_cuda_support
        fn.restype = ctypes.c_int
        return bool(fn())
    except AttributeError:
        return False


def select_device(comm: Comm) -> int | None:
    """Bind this rank to a GPU by node-local rank (respecting ``CUDA_VISIBLE_DEVICES``).

    Returns the device index chosen, or None when no GPU is present.
    """
    try:
        from numba_recon.cuda._target import cuda
    except Exception:
        return None
    if not cuda.is_available():
        return None
    n = len(cuda.gpus)
    if n == 0:
        return None
    index = comm.local_rank % n
    cuda.select_device(index)
    if comm.local_size > n:
        log.warning("%d ranks share %d GPU(s) on this node", comm.local_size, n)
    return index


def describe_mpi() -> dict[str, Any]:
    """Vendor, version and CUDA-awareness of the MPI in use, for logs and summary.json."""
    try:
        from mpi4py import MPI

        vendor = MPI.get_vendor()
        return {"vendor": f"{vendor[0]} {'.'.join(map(str, vendor[1]))}",
                "library": MPI.Get_library_version().splitlines()[0].strip(),
                "cuda_aware": cuda_aware_mpi()}
    except Exception as err:
        return {"vendor": None, "error": str(err)}
