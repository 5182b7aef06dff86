"""The host side of the kernel contract, shared by both backends.

Both twins (:mod:`numba_recon.cpu`, :mod:`numba_recon.cuda`) import these rules instead of keeping
their own copies: the support sphere's integer test, Adam's arithmetic (the CPU step runs it as it
is, the CUDA kernels in the same order), and the arguments and CTF parameter layout of
``prepare_particles``.
"""

from __future__ import annotations

from numba_recon.checks import finite_above
from numba_recon.particles import CTF_KEYS
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


# ------------------------------------------------------------------------------------------------
# The support sphere


def support_limit(radius_px: float, n: int) -> int:
    """Largest integer ``|r|^2`` of a voxel in the support sphere of ``radius_px`` (box ``n``).

    Voxel offsets are integers, so ``|r|^2 <= radius_px^2`` is the integer test
    ``|r|^2 <= floor(radius_px^2)``; the value is capped at the largest ``|r|^2`` in the box so
    that an infinite radius means "the whole box".
    """
    radius = float(radius_px)
    if math.isnan(radius) or radius < 0:
        raise ValueError(f"radius_px must be >= 0, got {radius_px!r}")
    c = n // 2
    largest = 3 * max(c, n - 1 - c) ** 2
    if math.isinf(radius):
        return largest
    return min(largest, math.floor(radius * radius))


# ------------------------------------------------------------------------------------------------
# Adam


def adam_coefficients(t: int, lr: float | np.ndarray, beta1: float = 0.9, beta2: float = 0.999,
                      eps: float = 1e-8) -> tuple[np.ndarray, np.float32]:
    """The bias-corrected step size and epsilon of Adam step ``t`` (counted from 1).

    Returns
    -------
    step_size
        ``lr sqrt(1 - beta2^t) / (1 - beta1^t)`` as float32, a 0-d array or one per leading index
        ``(k,)`` like ``lr``.
    eps_hat
        ``eps sqrt(1 - beta2^t)``, float32: ``step_size m / (sqrt(v) + eps_hat)`` is Algorithm 1's
        ``lr m_hat / (sqrt(v_hat) + eps)`` without dividing the moments.
    """
    bias1 = 1.0 - beta1**t
    bias2 = 1.0 - beta2**t
    lr_arr = np.asarray(lr, dtype=np.float64)
    step_size = (lr_arr * np.sqrt(bias2) / bias1).astype(np.float32)
    return step_size, np.float32(eps * np.sqrt(bias2))


def mean_square(grad: np.ndarray) -> np.ndarray:
    """``(k,)`` float32: the mean of ``grad[h]**2`` over each half, summed in float64."""
    out = np.empty(grad.shape[0], np.float32)
    for h in range(grad.shape[0]):
        g = grad[h].reshape(-1).astype(np.float64)
        out[h] = np.float32(np.dot(g, g) / max(1, g.size))
    return out


def adam_apply(params: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, t: int,
               lr: float | np.ndarray, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """Adam step number ``t`` (counted from 1) of ``params`` in place, with the moments ``m``, ``v``.

    The second moment is one number per half map, the running mean over the map of ``grad**2``,
    not one per voxel: the step ``lr m_hat / (sqrt(v_hat) + eps)`` is then linear in the gradient.
    A per-voxel divisor is a nonlinear map that is the same in both halves wherever the gradient
    is (as in the first steps from a shared start map): it carries shared low-resolution content
    to every frequency and inflates the gold-standard FSC. On simulated data the map-wide moment
    also reaches a better map in fewer epochs.

    The arithmetic of :func:`adam_step` (which calls it), in float32 and in this order; the CPU
    backend's ``adam_update`` calls it too, so the maps do not depend on which of the two took the
    step, and the CUDA kernels follow the same order.

    Parameters
    ----------
    params, grad, m
        ``(k, ...)`` float32 arrays; ``params`` and ``m`` are updated in place.
    v
        ``(k,)`` float32, the second moment of each half, updated in place.
    t
        The step number (the bias corrections use ``beta^t``).
    lr, beta1, beta2, eps
        As for :func:`adam_step`.
    """
    if v.shape != grad.shape[:1]:
        raise ValueError(f"v: expected one second moment per half, shape {grad.shape[:1]}, got {v.shape}")
    m *= beta1
    m += (1.0 - beta1) * grad
    v *= np.float32(beta2)
    v += np.float32(1.0 - beta2) * mean_square(grad)
    step_size, eps_hat = adam_coefficients(t, lr, beta1, beta2, eps)
    step_size = np.broadcast_to(step_size, v.shape).astype(np.float32)
    denom = np.sqrt(v) + eps_hat
    for h in range(params.shape[0]):
        params[h] -= step_size[h] * m[h] / denom[h]


# ------------------------------------------------------------------------------------------------
# prepare_particles

#: Column order of the ``(b, 9)`` float64 CTF parameter array: the keys of ``ParticleSet.ctf``.
CTF_COLUMNS: tuple[str, ...] = CTF_KEYS


def ctf_parameters(ctf: Mapping[str, Any], index: np.ndarray | None = None) -> np.ndarray:
    """The ``(b, 9)`` float64 CTF parameter array (columns :data:`CTF_COLUMNS`) of a ``ParticleSet.ctf``
    mapping of ``(n,)`` arrays, for the rows ``index (b,)`` (all rows when None).

    Raises ``ValueError`` when a column is missing or the columns differ in length.
    """
    missing = [k for k in CTF_COLUMNS if k not in ctf]
    if missing:
        raise ValueError(f"ctf: lacks {', '.join(missing)}")
    columns = [np.asarray(ctf[k], dtype=np.float64).reshape(-1) for k in CTF_COLUMNS]
    if len({c.size for c in columns}) != 1:
        raise ValueError(f"ctf: columns of different lengths {[c.size for c in columns]}")
    if index is not None:
        columns = [c[index] for c in columns]
    return np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.float64)


def _check(name: str, a: Any, shape: tuple[int | None, ...], dtypes: tuple[Any, ...], host: bool = True) -> None:
    if host and not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if np.dtype(a.dtype) not in [np.dtype(d) for d in dtypes]:
        want = " or ".join(str(np.dtype(d)) for d in dtypes)
        raise TypeError(f"{name}: expected {want}, got {np.dtype(a.dtype)}")
    if len(a.shape) != len(shape) or any(w is not None and g != w for g, w in zip(a.shape, shape)):
        extents = ", ".join("*" if w is None else str(w) for w in shape)
        want_text = f"({extents},)" if len(shape) == 1 else f"({extents})"
        raise ValueError(f"{name}: expected shape {want_text}, got {tuple(a.shape)}")
    contiguous = a.flags.c_contiguous if host else a.is_c_contiguous()
    if not contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")


def check_prepare_arguments(images: Any, ctf_params: Any, shifts_px: Any, premultiplied: Any,
                            pixel_size_angstrom: float, background_mask: Any, data_out: Any, filters2_out: Any,
                            data_norm2_out: Any, noise_var_out: Any, host: bool = True) -> tuple[int, int]:
    """Check the arguments of ``prepare_particles`` (either backend; ``host`` False: device arrays,
    whose type the caller has checked). Returns ``(b, N)``.

    Raises ``TypeError`` for a wrong array type or dtype and ``ValueError`` for a wrong shape,
    layout or pixel size, naming the argument.
    """
    if len(getattr(images, "shape", ())) != 3:
        _check("images", images, (None, None, None), (np.float32,), host)
    nb, n = int(images.shape[0]), int(images.shape[1])
    _check("images", images, (nb, n, n), (np.float32,), host)
    _check("ctf_params", ctf_params, (nb, len(CTF_COLUMNS)), (np.float64,), host)
    _check("shifts_px", shifts_px, (nb, 2), (np.float64,), host)
    _check("premultiplied", premultiplied, (nb,), (np.bool_, np.uint8), host)
    _check("background_mask", background_mask, (n, n), (np.bool_, np.uint8), host)
    _check("data_out", data_out, (nb, n, n), (np.float32,), host)
    _check("filters2_out", filters2_out, (nb, n, n), (np.float32,), host)
    _check("data_norm2_out", data_norm2_out, (nb,), (np.float32,), host)
    _check("noise_var_out", noise_var_out, (nb,), (np.float32,), host)
    pixel = float(pixel_size_angstrom)
    if not finite_above(pixel):
        raise ValueError(f"pixel_size_angstrom must be finite and > 0, got {pixel_size_angstrom!r}")
    return nb, n
