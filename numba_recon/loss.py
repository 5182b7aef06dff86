"""The loss stage: per-particle losses, comparable scores, and robust weights.

The data term of particle i is ``l_i = || H_i P_i x - T_i^{-1} b_i ||^2`` (computed by
:func:`numba_recon.forward.forward_residual`). To compare particles with different noise levels and
CTFs, each loss is turned into a **score**

    s_i = (l_i - ||T_i^{-1} b_i||^2) / e_i,      e_i = ||H_i P_i x||^2

the change of the loss against a blank model, in units of the loss the model image itself
explains (its energy ``e_i``, which is the expected loss change under the particle's CTF).
Subtracting ``||b_i||^2`` removes the noise energy common to every term, which would otherwise swamp
the differences; dividing by ``e_i`` removes the dependence on the CTF (defocus, envelope) and on the
signal level. Expanding, ``s_i = 1 - 2 <H P x, T^{-1} b> / e_i``: about -1 for a particle that
matches the map, whatever its defocus or noise level; about +1 for pure noise; ``1 - 2c`` for a wrong
pose whose view correlates ``c`` with the right one. Lower is better.

The good particles' scores are located robustly from the lower part of the score distribution
(:func:`good_population`: centre ``mu`` and spread ``sigma`` from the 5th and 25th percentiles,
which good particles dominate as long as they are at least half of the set).

Losses
------
``l2``
    Every particle has weight 1.
``trimmed`` (also ``sorted``)
    Each step ranks the scores of the global minibatch and keeps the best fraction ``q`` (weight 1),
    the rest get weight 0. With ``--keep-fraction START:END``, ``q`` moves linearly from START to
    END over the epochs after a warm-up of plain L2 epochs. With ``--keep-fraction auto`` (the
    default) the kept particles are those scoring below ``mu + 3 sigma`` of the previous epoch: on a
    clean set that keeps 99.9 % of the particles, on a contaminated one it drops the junk.
``reweighted``
    Iteratively reweighted least squares: ``w_i ∝ 1 / (l~_i + eps)^p`` with ``l~_i = max(s_i - mu, 0)``
    the excess of the score over a typical good particle's, ``eps = 3 sigma``, and ``p`` settable
    (``p = 1`` is the inverse-loss weight, ``p = 1/2`` an L1-like weight on the residual norms).
    ``mu`` and ``sigma`` come from the previous epoch's scores; the weights are normalised to mean one
    within each global minibatch, and the reference is updated every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The names live in the run configuration (which must not import this module); re-exported here,
# where the losses are.
from numba_recon.config import LOSS_ALIASES, LOSS_NAMES, LOSSES, canonical_loss  # noqa: F401


def particle_scores(losses: np.ndarray, data_norm2: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Scores ``(l_i - ||b_i||^2) / e_i`` (lower is better; -1 for a perfect fit), ``(b,)`` float64.

    ``energy`` is ``e_i = ||H_i P_i x||^2`` from :func:`~numba_recon.forward.forward_residual`. A
    blank model (``e_i = 0``) gives score 0.
    """
    e = np.asarray(energy, np.float64)
    diff = np.asarray(losses, np.float64) - np.asarray(data_norm2, np.float64)
    out = np.zeros_like(diff)
    ok = e > 0
    out[ok] = diff[ok] / e[ok]
    return out


@dataclass(frozen=True)
class RobustSchedule:
    """How the robust loss changes over the epochs.

    Attributes
    ----------
    loss
        ``l2``, ``trimmed`` or ``reweighted``.
    keep_start, keep_end
        Kept fraction of the trimmed loss at the first robust epoch and at the last epoch; None for
        the automatic threshold.
    warmup_epochs
        Epochs of plain L2 before the robust loss starts (the first map is blank).
    power
        ``p`` of the reweighted loss (1/2 ~ L1 on residual norms, 1 ~ inverse-loss weights).
    epochs
        Total number of epochs.
    """

    loss: str = "l2"
    keep_start: float | None = None
    keep_end: float | None = None
    warmup_epochs: int = 2
    power: float = 1.0
    epochs: int = 1

    def active(self, epoch: int) -> bool:
        return self.loss != "l2" and epoch >= self.warmup_epochs

    @property
    def automatic(self) -> bool:
        return self.keep_start is None or self.keep_end is None

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


def reweighted_weights(scores: np.ndarray, centre: float, spread: float, power: float) -> np.ndarray:
    """IRLS weights ``1 / (max(s - centre, 0) + 3 spread)^power``, normalised to mean one."""
    excess = np.maximum(np.asarray(scores, np.float64) - centre, 0.0)
    w = (excess + 3.0 * max(spread, 1e-12)) ** (-power)
    return w / w.mean()


def threshold_weights(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Weight 1 for scores at or below ``threshold``, 0 above (at least one particle is kept)."""
    s = np.asarray(scores, np.float64)
    w = (s <= threshold).astype(np.float64)
    if s.size and not w.any():
        w[np.argmin(s)] = 1.0
    return w


def good_population(scores: np.ndarray) -> tuple[float, float]:
    """Robust centre and spread of the good particles' scores.

    For a normal population the 5th and 25th percentiles lie 1.645 and 0.674 standard deviations
    below the mean; junk sits above the good particles, so these low percentiles belong to good
    particles whenever they are at least half of the set (with more junk the estimates widen
    conservatively rather than break).
    """
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if s.size < 4:
        return (float(np.median(s)) if s.size else 0.0), 1.0
    q05, q25 = np.quantile(s, [0.05, 0.25])
    spread = (q25 - q05) / (1.6449 - 0.6745)
    if not np.isfinite(spread) or spread <= 0:
        spread = float(np.std(s)) or 1.0
    centre = q25 + 0.6745 * spread
    return float(centre), float(spread)


def robust_weights(scores: np.ndarray, schedule: RobustSchedule, epoch: int,
                   population: tuple[float, float] | None) -> tuple[np.ndarray, float]:
    """Weights of a global minibatch (identical on every rank) and the fraction kept.

    ``population`` is :func:`good_population` of the previous epoch's scores of this half set
    (needed by the automatic trimmed loss and the reweighted loss).
    """
    scores = np.asarray(scores, np.float64)
    if not schedule.active(epoch) or scores.size == 0:
        return np.ones(scores.size), 1.0
    if schedule.loss == "trimmed":
        if schedule.automatic:
            centre, spread = population if population is not None else good_population(scores)
            w = threshold_weights(scores, centre + 3.0 * spread)
        else:
            w = trimmed_weights(scores, schedule.keep_fraction(epoch))
        return w, float(w.mean())
    centre, spread = population if population is not None else good_population(scores)
    w = reweighted_weights(scores, centre, spread, schedule.power)
    return w, float(np.mean(w >= 0.5))


def final_particle_weights(scores: np.ndarray, halves: np.ndarray, schedule: RobustSchedule
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Per-particle weight and kept flag under the last epoch's robust settings, from the final
    scores, ranked within each half set. Particles without a score get weight 0."""
    n = scores.size
    weights = np.ones(n)
    kept = np.ones(n, dtype=bool)
    if schedule.loss == "l2":
        return weights, kept
    last = max(schedule.epochs - 1, schedule.warmup_epochs)
    for h in (1, 2):
        idx = np.flatnonzero(halves == h)
        if idx.size == 0:
            continue
        s = scores[idx]
        ok = np.isfinite(s)
        w = np.zeros(idx.size)
        if ok.any():
            w[ok], _ = robust_weights(s[ok], schedule, last, good_population(s[ok]))
        weights[idx] = w
        kept[idx] = w > 0 if schedule.loss == "trimmed" else w >= 0.5
    return weights, kept


def pass_reference(previous_scores: np.ndarray, schedule: RobustSchedule, epoch: int) -> dict[str, float] | None:
    """What the full-pass solver weighs a half set's particles against in pass ``epoch``: the good
    population (centre, spread) of the previous pass's scores of that half, and the score
    threshold of the trimmed loss (``centre + 3 spread``, or the kept-fraction quantile with
    ``--keep-fraction``). None before the robust loss starts or without previous scores.

    Computed from the scores of the whole half set (gathered over ranks), so every rank weighs
    its particles identically and the map does not depend on the number of ranks.
    """
    if not schedule.active(epoch):
        return None
    s = np.asarray(previous_scores, np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    centre, spread = good_population(s)
    if schedule.loss == "trimmed" and not schedule.automatic:
        threshold = float(np.quantile(s, min(max(schedule.keep_fraction(epoch), 0.0), 1.0)))
    else:
        threshold = centre + 3.0 * spread
    return {"centre": centre, "spread": spread, "threshold": threshold}


def pass_weights(scores: np.ndarray, schedule: RobustSchedule, reference: dict[str, float] | None) -> np.ndarray:
    """Robust weights of particles in a full pass from their current scores, ``(b,)`` float64.

    ``trimmed``: 1 at or below the reference threshold, 0 above. ``reweighted``:
    ``(3 sigma / (max(s - mu, 0) + 3 sigma))^p``, 1 for a typical good particle, so the data term
    keeps its likelihood scale against the prior. Plain 1 without a reference.
    """
    s = np.asarray(scores, np.float64)
    if reference is None or schedule.loss == "l2":
        return np.ones(s.size)
    if schedule.loss == "trimmed":
        return (s <= reference["threshold"]).astype(np.float64)
    eps = 3.0 * max(reference["spread"], 1e-12)
    excess = np.maximum(s - reference["centre"], 0.0)
    return (eps / (excess + eps)) ** schedule.power
