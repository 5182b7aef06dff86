"""The loss stage: per-particle losses, comparable scores, and robust weights.

The data term of particle i is ``l_i = || H_i P_i x - T_i^{-1} b_i ||^2`` (computed by
:func:`numba_recon.forward.forward_residual`). To compare particles with different noise levels and
CTFs, each loss is turned into a **score**

    s_i = (l_i - ||T_i^{-1} b_i||^2) / (N^2 sigma_i^2)

the change of the loss against a blank model, in units of the particle's own noise energy
(``sigma_i^2`` is the image's variance outside the particle disc). Subtracting ``||b_i||^2`` removes
the noise energy common to every term, which would otherwise swamp the differences; dividing by the
particle's noise makes the score independent of its noise level. For a particle that matches the
map the score is about ``-SNR_i``; for pure noise about ``+SNR_i``; for a wrong pose in between.
Lower is better.

Losses
------
``l2``
    Every particle has weight 1.
``trimmed`` (also ``sorted``)
    Each step ranks the scores of the global minibatch and keeps the best fraction ``q`` (weight 1),
    the rest get weight 0. ``q`` moves linearly from START to END over the epochs after a warm-up
    of plain L2 epochs.
``reweighted``
    Iteratively reweighted least squares: ``w_i ∝ 1 / (l~_i + eps)^p`` with ``l~_i`` the score
    shifted to be positive (``s_i - s_ref``, ``s_ref`` a low quantile of the scores of the previous
    epoch) and ``eps`` a robust scale of the scores; weights are normalised to mean one and
    recomputed each epoch from the scores measured during the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOSSES = ("l2", "trimmed", "reweighted")


def canonical_loss(name: str) -> str:
    """Normalise a loss name (``sorted`` is an alias of ``trimmed``)."""
    key = name.strip().lower()
    if key == "sorted":
        key = "trimmed"
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of l2, trimmed (sorted), reweighted")
    return key


def particle_scores(losses: np.ndarray, data_norm2: np.ndarray, noise_var: np.ndarray, box_size: int) -> np.ndarray:
    """Scores ``(l_i - ||b_i||^2) / (N^2 sigma_i^2)`` (lower is better), ``(b,)`` float64."""
    return (np.asarray(losses, np.float64) - np.asarray(data_norm2, np.float64)) / (
        float(box_size) ** 2 * np.asarray(noise_var, np.float64))


@dataclass(frozen=True)
class RobustSchedule:
    """How the robust loss changes over the epochs.

    Attributes
    ----------
    loss
        ``l2``, ``trimmed`` or ``reweighted``.
    keep_start, keep_end
        Kept fraction of the trimmed loss at the first robust epoch and at the last epoch.
    warmup_epochs
        Epochs of plain L2 before the robust loss starts (the first map is blank).
    power
        ``p`` of the reweighted loss (1/2 ~ L1 on residual norms, 1 ~ inverse-loss weights).
    epochs
        Total number of epochs.
    """

    loss: str = "l2"
    keep_start: float = 0.5
    keep_end: float = 0.8
    warmup_epochs: int = 2
    power: float = 1.0
    epochs: int = 1

    def active(self, epoch: int) -> bool:
        return self.loss != "l2" and epoch >= self.warmup_epochs

    def keep_fraction(self, epoch: int) -> float:
        """Kept fraction ``q`` at ``epoch`` (0-based): linear from start to end over the robust epochs."""
        first = self.warmup_epochs
        last = max(self.epochs - 1, first)
        if last == first:
            return float(self.keep_end)
        t = min(max((epoch - first) / (last - first), 0.0), 1.0)
        return float(self.keep_start + t * (self.keep_end - self.keep_start))


def trimmed_weights(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Weight 1 for the best ``ceil(q * b)`` scores of a global minibatch, 0 for the rest.

    Ties are broken by position so every rank computes the same weights from the same scores.
    """
    scores = np.asarray(scores, np.float64)
    b = scores.size
    keep = int(np.ceil(keep_fraction * b - 1e-9))
    keep = min(max(keep, 1), b) if b else 0
    order = np.argsort(scores, kind="stable")
    w = np.zeros(b, dtype=np.float64)
    w[order[:keep]] = 1.0
    return w


def reweighted_weights(scores: np.ndarray, reference: float, scale: float, power: float) -> np.ndarray:
    """IRLS weights ``1 / (max(s - reference, 0) + scale)^power``, normalised to mean one."""
    shifted = np.maximum(np.asarray(scores, np.float64) - reference, 0.0) + max(scale, 1e-12)
    w = shifted ** (-power)
    return w / w.mean()


def reweight_reference(scores: np.ndarray) -> tuple[float, float]:
    """Reference level and scale of the reweighted loss from the scores of a whole half set.

    The reference is the 10th percentile (a typical well-fitting particle) and the scale the
    median absolute deviation of the better half of the particles around the median of that half:
    the spread of good particles' scores, so that a junk particle far above it is down-weighted
    while good particles keep similar weights.
    """
    s = np.sort(np.asarray(scores, np.float64))
    if s.size == 0:
        return 0.0, 1.0
    reference = float(np.quantile(s, 0.10))
    better = s[: max(1, s.size // 2)]
    scale = float(np.median(np.abs(better - np.median(better)))) * 1.4826
    if not np.isfinite(scale) or scale <= 0:
        scale = float(np.std(s)) or 1.0
    return reference, scale
