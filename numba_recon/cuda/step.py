"""The optimiser step on the device: gradient scaling, the ridge prior and Adam, element-wise.

Same names and signatures as :mod:`numba_recon.cpu.step`. The maps, gradients and Adam moments
stay on the device for the whole run; these launchers read and write them in place, one
grid-stride launch per half map with its per-half constants passed as float32 scalars (no small
host arrays, which numba would copy to the device and back around each launch). Everything is
float32, in the order of :func:`numba_recon.contract.adam_apply`; the result differs from the CPU's
only where the GPU contracts a multiply and an add into one fused operation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_recon.cuda._checks import device_f32
from numba_recon.cuda._target import cuda, is_device_array
from numba_recon.cuda.elementwise import block_sum
from numba_recon.cuda.memory import fill
from numba_recon.contract import adam_coefficients

_THREADS = 256
_PER_THREAD = 4  # elements per thread of the grid-stride loops
_MAX_BLOCKS = 4096


@cuda.jit(cache=True)
def _scale_gradient_kernel(g, p, scale, ridge):
    """``g = scale * g + ridge * p`` over one half map (1-D views); ``scale == 0`` gives ``g = 0``."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    zero = np.float32(0.0)
    for i in range(start, g.shape[0], stride):
        if scale == zero:
            g[i] = zero
        else:
            g[i] = g[i] * scale + ridge * p[i]


#: Threads per block of the sum-of-squares kernel (a power of two).
_SQ_THREADS = 128


@cuda.jit(cache=True)
def _decay_kernel(v, h, beta2):
    """``v[h] *= beta2`` (one thread): the second moment's decay before this step's squares."""
    if cuda.grid(1) == 0:
        v[h] = v[h] * beta2


@cuda.jit(cache=True)
def _scale_square_kernel(g, p, apply_scale, scale, ridge, v, h, coef):
    """Add ``coef * sum(g**2)`` of one half map (1-D views) to ``v[h]``.

    With ``apply_scale`` the gradient is first ``scale * g + ridge * p`` (zero when
    ``scale == 0``) and written back to ``g``. Squares are summed in float64 per block, then one
    float32 atomic add per block.
    """
    partial = cuda.shared.array(_SQ_THREADS, np.float64)
    tid = cuda.threadIdx.x
    zero = np.float32(0.0)
    acc = np.float64(0.0)
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        gi = g[i]
        if apply_scale != 0:
            if scale == zero:
                gi = zero
            else:
                gi = gi * scale + ridge * p[i]
            g[i] = gi
        acc += np.float64(gi) * np.float64(gi)
    partial[tid] = acc
    cuda.syncthreads()
    block_sum(partial, tid, _SQ_THREADS)
    if tid == 0:
        cuda.atomic.add(v, h, np.float32(partial[0] * coef))


@cuda.jit(cache=True)
def _adam_kernel(p, g, m, v, h, beta1, one_minus_beta1, step_size, eps_hat):
    """One Adam step of one half map (1-D views), all in float32.

    ``m = beta1 m + (1 - beta1) g`` and ``p -= step_size * m / (sqrt(v[h]) + eps_hat)``, where
    ``v[h]`` is the half's second moment (already updated) and ``step_size`` and ``eps_hat``
    carry the bias corrections (:func:`numba_recon.contract.adam_coefficients`).
    """
    denom = np.float32(math.sqrt(v[h])) + eps_hat
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        mi = m[i] * beta1
        mi = mi + one_minus_beta1 * g[i]
        m[i] = mi
        p[i] = p[i] - step_size * mi / denom


def _blocks(size: int) -> int:
    return max(1, min(_MAX_BLOCKS, math.ceil(size / (_THREADS * _PER_THREAD))))


def _flat(a: Any) -> Any:
    return a.reshape(a.size) if a.ndim != 1 else a


def _check_stack(name: str, a: Any, shape: tuple[int, ...] | None = None) -> None:
    if not is_device_array(a) or len(a.shape) < 1:
        raise TypeError(f"{name}: expected a CUDA device array with a leading axis, got {type(a).__name__}")
    device_f32(name, a, tuple(shape) if shape is not None else (None,) * len(a.shape))


def _per_half(name: str, values: Any, k: int) -> np.ndarray:
    out = np.asarray(values, dtype=np.float32)
    if out.shape != (k,):
        raise ValueError(f"{name}: expected shape ({k},), got {out.shape}")
    return out


def scale_gradient(grad: Any, params: Any, scale: Any, ridge: Any) -> None:
    """``grad[h] = scale[h] * grad[h] + ridge[h] * params[h]`` in place (asynchronous).

    A half with ``scale[h] == 0`` (no particles in this step) gets a zero gradient, ridge term
    included.

    Parameters
    ----------
    grad, params
        ``(k, N, N, N)`` float32 device arrays: the summed minibatch gradients and the current maps.
    scale, ridge
        ``(k,)`` host values: the gradient scale ``n_h / sum w`` and the prior's ``2 n_h lambda^2``
        (rounded to float32).
    """
    _check_stack("grad", grad)
    _check_stack("params", params, tuple(grad.shape))
    k = grad.shape[0]
    scale = _per_half("scale", scale, k)
    ridge = _per_half("ridge", ridge, k)
    for h in range(k):
        g = _flat(grad[h])
        if g.shape[0]:
            _scale_gradient_kernel[_blocks(g.shape[0]), _THREADS](g, _flat(params[h]), scale[h], ridge[h])


def adam_update(params: Any, grad: Any, m: Any, v: Any, lr: Any, beta1: float, beta2: float, eps: float, t: int,
                scale: Any = None, ridge: Any = None) -> None:
    """One Adam step of ``params`` in place, on the device (asynchronous).

    Three launches per half: the second moment's decay, the (scaled) gradient's sum of squares
    into it, and the step (see :func:`numba_recon.contract.adam_apply` for why the second moment is
    one number per half).

    Parameters
    ----------
    params, grad, m
        ``(k, N, N, N)`` float32 device arrays: maps, gradients, first moments (``m`` is updated
        in place; ``grad`` holds the gradient the step used on return).
    v
        ``(k,)`` float32 device array, the second moment of each half, updated in place.
    lr
        Step size, a scalar or one per leading index ``(k,)``, in the units of ``params``.
    beta1, beta2, eps
        Adam's constants; ``eps`` is in the units of ``grad``.
    t
        The number of this step, counted from 1 (bias corrections ``1 - beta^t``).
    scale, ridge
        ``(k,)`` host values or None: when given, the gradient is first scaled as by
        :func:`scale_gradient` (in the same kernel); None when the caller has done that already.
    """
    _check_stack("params", params)
    shape = tuple(params.shape)
    for name, a in (("grad", grad), ("m", m)):
        _check_stack(name, a, shape)
    _check_stack("v", v, shape[:1])
    if (scale is None) != (ridge is None):
        raise ValueError("scale and ridge: give both or neither")
    k = shape[0]
    apply_scale = np.int32(scale is not None)
    scale = _per_half("scale", scale if scale is not None else np.ones(k), k)
    ridge = _per_half("ridge", ridge if ridge is not None else np.zeros(k), k)
    step_size, eps_hat = adam_coefficients(int(t), lr, beta1, beta2, eps)
    step_size = np.broadcast_to(step_size, (k,))
    b1, b2 = np.float32(beta1), np.float32(beta2)
    # the numpy step multiplies by the Python float 1 - beta1, which becomes float32 there
    omb1 = np.float32(1.0 - beta1)
    for h in range(k):
        p = _flat(params[h])
        if p.shape[0] == 0:
            continue
        g = _flat(grad[h])
        coef = np.float64(np.float32(1.0 - beta2)) / p.shape[0]
        _decay_kernel[1, 1](v, np.int32(h), b2)
        _scale_square_kernel[_blocks(p.shape[0]), _SQ_THREADS](g, p, apply_scale, scale[h], ridge[h], v,
                                                               np.int32(h), coef)
        _adam_kernel[_blocks(p.shape[0]), _THREADS](p, g, _flat(m[h]), v, np.int32(h), b1, omb1,
                                                    np.float32(step_size[h]), np.float32(eps_hat))


def copy_into(dst: Any, src: Any) -> Any:
    """Copy the host array ``src`` into the existing device array ``dst`` (same shape; converted
    to ``dst``'s type); returns ``dst``. No device memory is allocated."""
    host = np.ascontiguousarray(src, dtype=np.dtype(dst.dtype))
    if host.shape != tuple(dst.shape):
        raise ValueError(f"copy_into: expected shape {tuple(dst.shape)}, got {host.shape}")
    if host.size:
        dst.copy_to_device(host)
    return dst


__all__ = ["adam_update", "copy_into", "fill", "scale_gradient"]
