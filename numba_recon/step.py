"""The optimiser step: Adam (Kingma & Ba 2015, Algorithm 1) on the half maps.

The state is plain arrays so it can be checkpointed and restored bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numba_recon.contract import adam_apply, adam_coefficients, mean_square  # noqa: F401


#: Adam's constants (Kingma & Ba's defaults), used by every backend's step.
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


@dataclass
class AdamState:
    """Adam moments for ``k`` parameter arrays stacked on axis 0.

    Attributes
    ----------
    m
        First moment estimate, ``(k, N, N, N)`` float32.
    v
        Second moment estimate, ``(k,)`` float32: one per half map (see :func:`adam_apply`).
    t
        Number of steps taken.
    """

    m: np.ndarray
    v: np.ndarray
    t: int = 0

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> "AdamState":
        """Moments for maps of ``shape`` ``(k, ...)``: ``m`` of that shape, ``v`` of shape ``(k,)``."""
        return cls(np.zeros(shape, np.float32), np.zeros(shape[:1], np.float32), 0)


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
    adam_apply(params, grad, state.m, state.v, state.t, lr, beta1, beta2, eps)



# ------------------------------------------------------------------------------------------------
# Preconditioned conjugate gradients over full passes (the default solver)
# ------------------------------------------------------------------------------------------------

@dataclass
class CGState:
    """Conjugate-gradient state of both half sets (``x = m v``, see :mod:`numba_recon.objective`).

    Attributes
    ----------
    v
        ``(2, N, N, N)`` float32 unknowns.
    r
        ``(2, N, N, N)`` float32 residual ``-(1/2) dF/dv`` at ``v``.
    p
        ``(2, N, N, N)`` float32 search direction; each pass evaluates the trial point ``v + p``.
    rz
        ``(2,)`` float64 ``<r, M^-1 r>`` of the current direction (for the next ``beta``).
    exact
        Whether ``r`` belongs to the objective the next pass evaluates (same weights, prior and
        preconditioner): then the pass gives ``A p`` exactly and the step is an exact line search;
        otherwise the trial point is taken as it is and the directions restart.
    """

    v: np.ndarray
    r: np.ndarray
    p: np.ndarray
    rz: np.ndarray
    exact: bool = True

    @classmethod
    def start(cls, r0: np.ndarray) -> "CGState":
        """From ``v = 0`` with residual ``r0`` (the masked back-projected data); call
        :func:`cg_direction` with ``restart=True`` for each half before the first pass."""
        return cls(np.zeros(r0.shape, np.float32), r0.astype(np.float32), np.zeros(r0.shape, np.float32),
                   np.zeros(2), True)

    def trial(self, h: int) -> np.ndarray:
        """The point the next pass evaluates, ``v + p``, float32."""
        return self.v[h] + self.p[h]


def cg_step(state: CGState, h: int, r_trial: np.ndarray) -> float:
    """Move half ``h`` after a pass evaluated the residual ``r_trial`` at ``v + p``.

    The objective is quadratic, so ``r(v) - r(v + p) = A p`` exactly (same weights and prior):
    the step length ``alpha = <r, z> / <p, A p>`` minimises it along ``p`` with no further pass,
    and the new residual is ``r - alpha A p``. When the objective changed between the two
    residuals (``state.exact`` False: robust weights or the preconditioner moved), or the
    curvature is not positive, the trial point itself is taken (``alpha = 1``), with its exact
    residual. Returns ``alpha``.
    """
    r = state.r[h].astype(np.float64)
    p = state.p[h].astype(np.float64)
    alpha = 1.0
    if state.exact:
        q = r - r_trial
        curvature = float(np.vdot(p, q))
        if curvature > 0 and np.isfinite(curvature):
            alpha = float(state.rz[h]) / curvature
    if alpha == 1.0 or not np.isfinite(alpha):
        alpha = 1.0
        state.v[h] += state.p[h]
        state.r[h] = r_trial
    else:
        state.v[h] = state.v[h] + alpha * p
        state.r[h] = r - alpha * (r - r_trial)
    return alpha


def cg_direction(state: CGState, h: int, z: np.ndarray, restart: bool) -> float:
    """New search direction ``p = z + beta p`` from the preconditioned residual ``z = M^-1 r``
    (Fletcher-Reeves ``beta = <r, z> / <r, z>_old``; 0 on a restart). Returns ``beta``."""
    rz_new = float(np.vdot(state.r[h].astype(np.float64), z))
    beta = 0.0 if restart or state.rz[h] <= 0 else rz_new / float(state.rz[h])
    state.p[h] = (z + beta * state.p[h]).astype(np.float32)
    state.rz[h] = rz_new
    return beta
