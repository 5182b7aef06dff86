"""The optimiser step of the CPU backend, and the buffer helpers the engine reuses every step.

Same names and signatures as :mod:`numba_recon.cuda.step`. The arithmetic is
:func:`numba_recon.contract.adam_apply`'s numpy code, operation for operation, so that an adam run on
the CPU gives the same maps bit for bit whether its step is taken here or through
:func:`numba_recon.step.adam_step` (resumed runs and runs on several ranks are compared bitwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numba_recon.contract import adam_apply


def _check_stack(name: str, a: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name}: expected float32, got {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    if a.ndim < 1 or not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array with a leading axis")
    return a


def _per_half(name: str, values: Any, k: int) -> np.ndarray:
    out = np.asarray(values, dtype=np.float32)
    if out.shape != (k,):
        raise ValueError(f"{name}: expected shape ({k},), got {out.shape}")
    return out


def scale_gradient(grad: np.ndarray, params: np.ndarray, scale: Any, ridge: Any) -> None:
    """``grad[h] = scale[h] * grad[h] + ridge[h] * params[h]`` in place, for each leading index ``h``.

    A half with ``scale[h] == 0`` (no particles in this step) gets a zero gradient, ridge term
    included.

    Parameters
    ----------
    grad, params
        ``(k, N, N, N)`` float32: the summed minibatch gradients and the current maps.
    scale, ridge
        ``(k,)``: the gradient scale ``n_h / sum w`` and the prior's ``2 n_h lambda^2``, rounded to
        float32 (as the step applies them).
    """
    _check_stack("grad", grad)
    _check_stack("params", params, grad.shape)
    k = grad.shape[0]
    scale = _per_half("scale", scale, k)
    ridge = _per_half("ridge", ridge, k)
    for h in range(k):
        if scale[h] != 0:
            grad[h] *= scale[h]
            grad[h] += ridge[h] * params[h]
        else:
            grad[h] = 0.0


def adam_update(params: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, lr: Any, beta1: float,
                beta2: float, eps: float, t: int, scale: Any = None, ridge: Any = None) -> None:
    """One Adam step of ``params`` in place (Kingma & Ba 2015, Algorithm 1).

    Parameters
    ----------
    params, grad, m
        ``(k, N, N, N)`` float32: maps, gradients, first moments (``m`` is updated in place;
        ``grad`` holds the gradient the step used on return).
    v
        ``(k,)`` float32, the second moment of each half (the running mean of ``grad**2`` over the
        map; see :func:`numba_recon.contract.adam_apply`), updated in place.
    lr
        Step size, a scalar or one per leading index ``(k,)``, in the units of ``params``.
    beta1, beta2, eps
        Adam's constants; ``eps`` is in the units of ``grad``.
    t
        The number of this step, counted from 1 (bias corrections ``1 - beta^t``).
    scale, ridge
        ``(k,)`` or None: when given, the gradient is first scaled as by :func:`scale_gradient`;
        None when the caller has done that already (the host-side symmetry or preconditioner path).
    """
    _check_stack("params", params)
    for name, a in (("grad", grad), ("m", m)):
        _check_stack(name, a, params.shape)
    _check_stack("v", v, params.shape[:1])
    if (scale is None) != (ridge is None):
        raise ValueError("scale and ridge: give both or neither")
    if scale is not None:
        scale_gradient(grad, params, scale, ridge)
    adam_apply(params, grad, m, v, int(t), lr, beta1, beta2, eps)


def fill(a: np.ndarray, value: float) -> None:
    """Set every element of ``a`` to ``value`` (the device twin zeroes buffers with a kernel)."""
    a[...] = value


def copy_into(dst: np.ndarray, src: Any) -> np.ndarray:
    """Copy the host array ``src`` into the existing array ``dst`` (same shape; converted to
    ``dst``'s type); returns ``dst``. Reusing ``dst`` is what saves the device its allocations."""
    src = np.asarray(src)
    if src.shape != dst.shape:
        raise ValueError(f"copy_into: expected shape {dst.shape}, got {src.shape}")
    dst[...] = src
    return dst
