"""The optimiser step: Adam (Kingma & Ba 2015, Algorithm 1) on the half maps.

The state is plain arrays so it can be checkpointed and restored bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AdamState:
    """Adam moments for ``k`` parameter arrays stacked on axis 0.

    Attributes
    ----------
    m, v
        First and second moment estimates, ``(k, N, N, N)`` float32.
    t
        Number of steps taken.
    """

    m: np.ndarray
    v: np.ndarray
    t: int = 0

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> "AdamState":
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32), 0)


def adam_step(params: np.ndarray, grad: np.ndarray, state: AdamState, lr: float | np.ndarray,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam update of ``params`` in place.

    Parameters
    ----------
    params, grad
        ``(k, ...)`` float32 arrays (the two half maps and their gradients).
    state
        Moments, updated in place; ``state.t`` is incremented.
    lr
        Step size, a scalar or one per leading index (shape ``(k,)``), in the units of ``params``.
    eps
        Added to ``sqrt(v_hat)``; given in the units of ``grad``.
    """
    state.t += 1
    t = state.t
    state.m *= beta1
    state.m += (1.0 - beta1) * grad
    state.v *= beta2
    state.v += (1.0 - beta2) * (grad * grad)
    bias1 = 1.0 - beta1**t
    bias2 = 1.0 - beta2**t
    lr_arr = np.asarray(lr, dtype=np.float64)
    step_size = (lr_arr * np.sqrt(bias2) / bias1).astype(np.float32)
    if step_size.ndim:
        step_size = step_size.reshape((-1,) + (1,) * (params.ndim - 1))
    denom = np.sqrt(state.v)
    denom += np.float32(eps * np.sqrt(bias2))
    params -= step_size * state.m / denom

