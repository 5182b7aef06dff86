"""The objective of a half-set reconstruction, in one place.

For half set ``h`` the map ``x = m * v`` (``m`` a soft-edged sphere, the support prior; ``v`` the
unknowns) minimises

    F_h(v) = sum_i w_i / sigma_i^2 || H_i P_i (m v) - T_i^{-1} b_i ||^2
             + sum_k (1 / tau_h^2(|k|) + rho_h) |X(k)|^2,        X = DFT(m v) (unitary)

- the **data term**: ``P_i`` the voxel-driven projection, ``H_i`` the CTF filter, ``T_i^{-1} b_i``
  the re-centred image; ``sigma_i^2`` the image's own noise variance (measured outside the
  particle) makes it the Gaussian log-likelihood; ``w_i`` is the robust weight (1 for ``l2``,
  :mod:`numba_recon.loss` otherwise);
- the **learned prior**: a Gaussian prior on every Fourier coefficient with the per-shell signal
  power ``tau^2``, estimated from the gold-standard FSC of the two half maps as RELION does
  (``SSNR = FSC / (1 - FSC)``, ``1 / tau^2 = <K>_shell / SSNR`` with ``<K>_shell`` the shell's
  mean CTF^2-weighted sampling density). Each half uses only the FSC curve of the two halves,
  never the other half's map;
- the optional fixed ridge ``rho_h = lambda^2 <K_h>`` (``--reg-lambda``, relative to the mean
  sampling density so that the same value means the same thing for every data set);
- the **support prior** ``m``: 1 inside the particle radius, a raised-cosine edge of
  :data:`SOFT_EDGE_PX` pixels (RELION's ``--particle_diameter`` and ``width_mask_edge``), 0 beyond;
  both halves share it.

The **normal operator** ``A_h = sum_i w_i / sigma_i^2 P_i^T H_i^2 P_i`` is modelled in Fourier space
as the diagonal ``K_h(q)``: the CTF^2-weighted sampling density of the central slices, times the
splat's own transfer function squared, gridded by :func:`numba_recon.cpu.insert_weights`. The
preconditioner is ``m (K_h + 1/tau_h^2 + rho_h)^{-1} m`` applied with FFTs; its first application
to the back-projected data is the one-pass direct reconstruction (RELION's ``sum CTF X / (sum CTF^2
+ 1/tau^2)``), and conjugate gradients refine it (:mod:`numba_recon.step`).

All quantities of one CG iteration are in terms of the **residual** ``r = -(1/2) dF/dv``:
:meth:`Objective.residual` turns the back-projected data residual of a pass into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from numba_recon.threads import fft_workers

#: Raised-cosine edge of the support sphere, pixels (RELION's default ``--width_mask_edge``).
SOFT_EDGE_PX = 5.0
#: FSC values are clipped to this range before turning them into SSNRs (RELION clips at 0.001).
FSC_FLOOR = 1e-3
FSC_CEIL = 0.999
#: Per-shell SSNR the prior assumes before the first FSC: 1/tau^2 = <K>_shell / START_SSNR.
START_SSNR = 1000.0


def splat_transfer2(box_size: int) -> np.ndarray:
    """Squared transfer function of the bilinear splat on the ``N x N`` 2-D DFT grid, ``(N, N)`` float64.

    A bilinear splat convolves each projected voxel with a triangle (``sinc^2`` per axis); the
    sampling at integer pixels aliases some of it back, so the effective power transfer lies
    between ``sinc^3`` and ``sinc^4`` per axis. ``sinc^3.5`` matches the measured normal operator
    within a few per cent at every resolution (``tests/test_objective.py``).
    """
    f = np.fft.fftfreq(box_size)
    t = np.abs(np.sinc(f)) ** 3.5
    return t[:, None] * t[None, :]


def soft_sphere(box_size: int, radius_px: float, edge_px: float = SOFT_EDGE_PX) -> np.ndarray:
    """``(N, N, N)`` float64 mask: 1 within ``radius_px`` of the centre ``N // 2``, a raised cosine
    down to 0 at ``radius_px + edge_px``, 0 beyond."""
    c = box_size // 2
    z, y, x = np.ogrid[:box_size, :box_size, :box_size]
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2)
    if edge_px <= 0:
        return (r <= radius_px).astype(np.float64)
    t = np.clip((radius_px + edge_px - r) / edge_px, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def shell_index(box_size: int) -> np.ndarray:
    """Integer shell ``round(|k| N)`` of every coefficient of ``rfftn`` of an ``N^3`` volume,
    ``(N, N, N // 2 + 1)``, capped at ``N // 2`` (the corners share the Nyquist shell)."""
    fz = np.fft.fftfreq(box_size)[:, None, None]
    fy = np.fft.fftfreq(box_size)[None, :, None]
    fx = np.fft.rfftfreq(box_size)[None, None, :]
    k = np.sqrt(fz * fz + fy * fy + fx * fx) * box_size
    return np.minimum(np.rint(k).astype(np.int64), box_size // 2)


def full_to_half(kernel: np.ndarray) -> np.ndarray:
    """The ``rfftn`` half ``[..., :N // 2 + 1]`` of a kernel on the full ``N^3`` DFT grid, made
    Hermitian-even (``(K(q) + K(-q)) / 2``) so it multiplies real volumes' spectra consistently."""
    n = kernel.shape[-1]
    mirrored = np.roll(kernel[..., ::-1, ::-1, ::-1], 1, axis=(-3, -2, -1))
    even = 0.5 * (kernel + mirrored)
    return np.ascontiguousarray(even[..., : n // 2 + 1], dtype=np.float64)


@dataclass
class Objective:
    """The objective of both half sets (see the module docstring).

    Attributes
    ----------
    box_size
        ``N``.
    mask
        ``(N, N, N)`` float64 support prior ``m``.
    kernels
        ``(2, N, N, N // 2 + 1)`` float32 or float64 normal-operator model ``K_h`` (``rfftn``
        layout, in the units of the unitary DFT).
    inv_tau2
        ``(2, N // 2 + 1)`` float64 per-shell ``1 / tau_h^2`` (0: no learned prior yet).
    ridge
        ``(2,)`` float64 fixed ridge ``rho_h``.
    """

    box_size: int
    mask: np.ndarray
    kernels: np.ndarray
    inv_tau2: np.ndarray
    ridge: np.ndarray

    @classmethod
    def create(cls, box_size: int, mask: np.ndarray, kernels: np.ndarray, reg_lambda: float = 0.0) -> "Objective":
        """An objective with the ridge ``lambda^2 <K_h>`` and a starting prior of SSNR
        :data:`START_SSNR` in every shell (weak, but it keeps unsampled frequencies finite until the
        first FSC is known)."""
        n_shells = box_size // 2 + 1
        ridge = np.array([reg_lambda**2 * float(np.mean(kernels[h])) for h in (0, 1)])
        obj = cls(box_size, np.asarray(mask, np.float64), np.asarray(kernels), np.zeros((2, n_shells)), ridge)
        for h in (0, 1):
            obj.inv_tau2[h] = obj.shell_mean_kernel(h) / START_SSNR
            obj.inv_tau2[h][0] = 0.0
        return obj

    # ------------------------------------------------------------------ Fourier helpers
    def _fft(self, v: np.ndarray) -> np.ndarray:
        return scipy.fft.rfftn(v, norm="ortho", workers=fft_workers())

    def _ifft(self, spectrum: np.ndarray) -> np.ndarray:
        return scipy.fft.irfftn(spectrum, s=(self.box_size,) * 3, axes=(0, 1, 2), norm="ortho", workers=fft_workers())

    def _shells(self) -> np.ndarray:
        if getattr(self, "_shell_cache", None) is None:
            self._shell_cache = shell_index(self.box_size)
        return self._shell_cache

    def prior_diagonal(self, h: int) -> np.ndarray:
        """``1 / tau_h^2(|k|) + rho_h`` on the ``rfftn`` grid, ``(N, N, N // 2 + 1)``."""
        return self.inv_tau2[h][self._shells()] + self.ridge[h]

    # ------------------------------------------------------------------ the objective's pieces
    def prior_term(self, v: np.ndarray, h: int) -> np.ndarray:
        """``(1/2) d/dv`` of the prior: ``m F^-1 [(1/tau^2 + rho) F (m v)]``, ``(N, N, N)`` float64."""
        return self.mask * self._ifft(self.prior_diagonal(h) * self._fft(self.mask * v))

    def prior_value(self, v: np.ndarray, h: int) -> float:
        """The prior ``sum_k (1/tau^2 + rho) |X(k)|^2`` of ``x = m v`` (Hermitian pairs counted twice)."""
        spec = np.abs(self._fft(self.mask * v)) ** 2
        n = self.box_size
        weight = np.full(spec.shape[-1], 2.0)
        weight[0] = 1.0
        if n % 2 == 0:
            weight[-1] = 1.0
        return float(np.sum(self.prior_diagonal(h) * spec * weight))

    def residual(self, backprojected: np.ndarray, v: np.ndarray, h: int) -> np.ndarray:
        """``r = -(1/2) dF/dv`` from a pass's data part.

        ``backprojected`` is ``sum_i w_i/sigma_i^2 P_i^T H_i (T_i^{-1} b_i - H_i P_i x)`` at
        ``x = m v`` (what :func:`weighted_backproject` accumulates from the residual images, with
        the sign and factor 2 removed), ``(N, N, N)``.
        """
        return self.mask * backprojected - self.prior_term(v, h)

    def precondition(self, r: np.ndarray, h: int) -> np.ndarray:
        """``m (K_h + 1/tau_h^2 + rho_h)^{-1} m r``: the preconditioner, symmetric positive
        (semi-)definite; ``(N, N, N)`` float64."""
        denom = self.kernels[h] + self.prior_diagonal(h)
        denom = np.where(denom > 0, denom, np.inf)  # unobserved and unregularised: no update
        return self.mask * self._ifft(self._fft(self.mask * r) / denom)

    def direct_map(self, backprojected_data: np.ndarray, h: int) -> np.ndarray:
        """The one-pass reconstruction ``m M^-1 m b`` from ``b = sum_i w_i/sigma_i^2 P_i^T H_i
        T_i^{-1} b_i``, as a map ``x`` (``(N, N, N)`` float64)."""
        return self.mask * self.precondition(self.mask * backprojected_data, h)

    # ------------------------------------------------------------------ the learned prior
    def shell_mean_kernel(self, h: int) -> np.ndarray:
        """``<K_h>`` per shell, ``(N // 2 + 1,)`` float64."""
        shells = self._shells()
        n_shells = self.box_size // 2 + 1
        counts = np.bincount(shells.ravel(), minlength=n_shells).astype(np.float64)
        sums = np.bincount(shells.ravel(), weights=self.kernels[h].ravel(), minlength=n_shells)
        return sums / np.maximum(counts, 1.0)

    def update_prior(self, fsc_curve: np.ndarray) -> None:
        """Learn ``1 / tau_h^2 = <K_h>_shell (1 - FSC) / FSC`` from the half maps' FSC curve.

        The DC shell is left unregularised (its FSC is not defined from one coefficient).
        """
        n_shells = self.box_size // 2 + 1
        curve = np.asarray(fsc_curve, np.float64)[:n_shells]
        if curve.size < n_shells:
            curve = np.concatenate([curve, np.full(n_shells - curve.size, curve[-1] if curve.size else 0.0)])
        curve = np.where(np.isfinite(curve), curve, FSC_FLOOR)
        curve = np.clip(curve, FSC_FLOOR, FSC_CEIL)
        for h in (0, 1):
            inv = self.shell_mean_kernel(h) * (1.0 - curve) / curve
            inv[0] = 0.0
            self.inv_tau2[h] = inv

    def tau2(self, h: int) -> np.ndarray:
        """``tau_h^2`` per shell (``inf`` where no prior acts), for ``run_model.star``."""
        with np.errstate(divide="ignore"):
            return np.where(self.inv_tau2[h] > 0, 1.0 / np.maximum(self.inv_tau2[h], 1e-300), np.inf)


def fourier_completeness(kernel: np.ndarray, inv_tau2: np.ndarray, box_size: int) -> np.ndarray:
    """Per shell, the fraction of coefficients whose sampling density exceeds the prior's
    ``1/tau^2`` (RELION's ``rlnFourierCompleteness``: data dominate the prior), ``(N // 2 + 1,)``."""
    shells = shell_index(box_size)
    n_shells = box_size // 2 + 1
    good = (kernel > inv_tau2[shells]).astype(np.float64)
    counts = np.bincount(shells.ravel(), minlength=n_shells).astype(np.float64)
    return np.bincount(shells.ravel(), weights=good.ravel(), minlength=n_shells) / np.maximum(counts, 1.0)


def estimate_particle_radius(volume: np.ndarray, max_radius_px: float) -> float:
    """A generous particle radius (pixels) from the radial profile of a low-resolution map.

    The map is band-limited to a quarter of Nyquist (finer detail is mostly noise in a first map),
    its deviation from the solvent level is averaged over spherical shells, and the radius is
    where that profile falls to 5 % of its range above the solvent level, plus a margin of 2 pixels
    or 5 %, whichever is larger (the support's soft edge adds :data:`SOFT_EDGE_PX` beyond it).
    Returns a value in ``[N/8, max_radius_px]``.
    """
    n = volume.shape[0]
    spec = np.fft.rfftn(volume)
    shells = shell_index(n)
    spec[shells > max(2, n // 8)] = 0.0
    smooth = np.fft.irfftn(spec, s=volume.shape, axes=(0, 1, 2))
    c = n // 2
    z, y, x = np.ogrid[:n, :n, :n]
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2)
    rbin = np.rint(r).astype(np.int64)
    inside = rbin <= int(max_radius_px)
    solvent_shell = (r > 0.8 * max_radius_px) & inside
    solvent = float(np.median(smooth[solvent_shell])) if solvent_shell.any() else 0.0
    dev = (smooth - solvent) ** 2
    n_bins = int(max_radius_px) + 1
    prof = np.bincount(rbin[inside], weights=dev[inside], minlength=n_bins)[:n_bins]
    cnt = np.bincount(rbin[inside], minlength=n_bins)[:n_bins]
    prof = np.sqrt(prof / np.maximum(cnt, 1))
    floor = float(np.median(prof[int(0.8 * max_radius_px):])) if n_bins > 4 else 0.0
    top = float(prof.max())
    if not math.isfinite(top) or top <= floor:
        return float(max_radius_px)
    above = np.flatnonzero(prof > floor + 0.05 * (top - floor))
    edge = float(above.max()) if above.size else float(max_radius_px)
    radius = edge + max(2.0, 0.05 * edge)
    return float(min(max(radius, n / 8.0), max_radius_px))
