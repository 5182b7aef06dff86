"""The one place that chooses between the CPU and CUDA kernels.

:func:`get_backend` returns a :class:`Backend`, a named tuple of the kernel-contract functions of
``docs/architecture.md`` taken from :mod:`numba_recon.cpu` or :mod:`numba_recon.cuda`:

- ``"cpu"``: the Numba CPU kernels; always available.
- ``"cuda"``: the numba-cuda kernels, imported only when asked for. Raises
  :class:`~numba_recon.errors.BackendUnavailableError` naming what is missing (numba-cuda not
  installed, no CUDA driver, no visible GPU). With ``NUMBA_ENABLE_CUDASIM=1`` set before numba is
  imported, this is Numba's CUDA simulator (how the CUDA code is tested without a GPU).
- ``"auto"``: ``"cuda"`` when a real GPU is usable, else ``"cpu"``; the choice and its reason are
  logged at INFO. The simulator is never picked automatically: it is thousands of times slower
  than the CPU kernels.

Nothing falls back silently: an explicit ``"cuda"`` that cannot run is an error, not the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Any, Callable, NamedTuple

from numba_recon.errors import BackendUnavailableError

log = logging.getLogger(__name__)

#: Names :func:`get_backend` accepts.
CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")

_INSTALL_HINT = "install it with pip install 'numba-recon[cuda]' (CUDA 13 driver) or 'numba-recon[cu12]'"


class Backend(NamedTuple):
    """The kernel contract of one backend (see ``docs/architecture.md`` and ``docs/backends.md``).

    Arrays passed to the kernels must come from this backend's :attr:`to_device` or
    :attr:`zeros` (host numpy arrays for ``"cpu"``, device arrays for ``"cuda"``).
    """

    name: str
    project: Callable[..., None]
    backproject: Callable[..., None]
    fourier_filter: Callable[..., None]
    forward_residual: Callable[..., None]
    weighted_backproject: Callable[..., None]
    insert_weights: Callable[..., None]
    weight_filters: Callable[..., None]
    scale_gradient: Callable[..., None]
    adam_update: Callable[..., None]
    prepare_particles: Callable[..., None]
    to_device: Callable[..., Any]
    to_host: Callable[[Any], Any]
    zeros: Callable[..., Any]
    fill: Callable[[Any, float], None]
    copy_into: Callable[[Any, Any], Any]
    synchronize: Callable[[], None]


_CONTRACT = Backend._fields[1:]


def _from_module(name: str, module: Any) -> Backend:
    missing = [f for f in _CONTRACT if not callable(getattr(module, f, None))]
    if missing:
        raise BackendUnavailableError(
            f"the {name} backend is incomplete: {module.__name__} does not define {', '.join(missing)}")
    return Backend(name, *(getattr(module, f) for f in _CONTRACT))


def _simulator() -> bool:
    """Whether numba runs CUDA code in its simulator (numba's own flag, read when numba loaded)."""
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def _load_cpu() -> Backend:
    import numba_recon.cpu

    return _from_module("cpu", numba_recon.cpu)


def _no_gpu_reason() -> str:
    """Why numba-cuda sees no usable device: the driver's own error if it has one."""
    try:
        from numba_recon.cuda._target import cuda

        err = cuda.cuda_error()
    except Exception as exc:  # noqa: BLE001 - describing a failure must not fail
        err = f"{type(exc).__name__}: {exc}"
    if err:
        text = " ".join(str(err).split())
        return f"the CUDA driver could not be initialised ({text}); check the NVIDIA driver with nvidia-smi"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"no CUDA GPU is visible{where}; check nvidia-smi"


def _cuda_module() -> tuple[Any, str | None]:
    """``(numba_recon.cuda or None, why it cannot run or None)``."""
    if not _simulator() and importlib.util.find_spec("numba_cuda") is None:
        return None, f"numba-cuda is not installed; {_INSTALL_HINT}"
    try:
        module = importlib.import_module("numba_recon.cuda")
    except ImportError as err:
        return None, f"importing numba_recon.cuda failed ({err}); {_INSTALL_HINT}"
    is_available = getattr(module, "is_available", None)
    if not callable(is_available):
        return None, "numba_recon.cuda is incomplete (it does not define is_available)"
    if not is_available():
        return None, _no_gpu_reason()
    return module, None


def _load_cuda() -> Backend:
    module, problem = _cuda_module()
    if problem is not None:
        raise BackendUnavailableError(f"CUDA backend unavailable: {problem}, or use --backend cpu")
    return _from_module("cuda", module)


def get_backend(name: str = "auto") -> Backend:
    """The kernels of backend ``name``: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Parameters
    ----------
    name
        Backend name, case-insensitive. ``"auto"`` picks ``"cuda"`` when a real GPU is usable and
        ``"cpu"`` otherwise, and logs its choice at INFO.

    Returns
    -------
    Backend
        The named tuple of contract functions; ``Backend.name`` is the backend actually chosen.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the choices).
    BackendUnavailableError
        When ``"cuda"`` is asked for and cannot run; the message says what is missing.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    if key == "cpu":
        return _load_cpu()
    if key == "cuda":
        return _load_cuda()
    if _simulator():
        log.debug("backend auto: cpu (NUMBA_ENABLE_CUDASIM=1 is set; the CUDA simulator runs only with --backend cuda)")
        return _load_cpu()
    module, problem = _cuda_module()
    if problem is not None:
        log.debug("backend auto: cpu (no usable CUDA GPU: %s)", problem)
        return _load_cpu()
    backend = _from_module("cuda", module)
    log.info("backend auto: cuda (%s)", _gpu_name())
    return backend


def _gpu_name() -> str:
    try:
        from numba_recon.cuda._target import cuda

        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - only used in a log line
        return "GPU"


def available_backends() -> list[str]:
    """Backends :func:`get_backend` can return here: ``"cpu"``, then ``"cuda"`` if its kernels run.

    With ``NUMBA_ENABLE_CUDASIM=1``, ``"cuda"`` is the simulator and is listed.
    """
    names = ["cpu"]
    if _cuda_module()[1] is None:
        names.append("cuda")
    return names
