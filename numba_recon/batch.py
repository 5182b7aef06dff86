"""The batch stage: gold-standard halves, cross-validation hold-out, minibatches, rank shards, and
the per-particle data prepared once for the operator.

Minibatches come from one permutation per (seed, epoch, half), identical on every rank; rank ``r``
of ``s`` takes rows ``r::s`` of each global minibatch. The mathematics therefore does not depend on
the number of ranks, only the order of floating-point sums does.

For each particle the loader computes, once (then caches while memory allows):

- ``data = H T^{-1} b``: the image moved by ``+origin`` (Fourier phase ramp) and filtered by its CTF
  ``H = C`` (or ``C^2`` for CTF-premultiplied images, whose model is ``C^2 P x``);
- ``filters2 = H^2`` on the full FFT grid, what the forward step applies to the projection;
- ``data_norm2 = ||T^{-1} b||^2`` and ``noise_var``, the image's own noise variance measured
  outside the particle disc, used to make per-particle losses comparable.

Before any of that, each image's background mean (the pixels outside the particle disc, RELION's
background ring) is subtracted. Unnormalised images (raw counts, an offset of many noise sigma) add
the same constant to every image of both half sets; its back-projection, cut by the support, is
identical in the two half maps at every frequency and fakes a Nyquist FSC.
:func:`survey_backgrounds` measures means, spreads and peaks once per run so that the engine can
say what was subtracted and refuse images that cannot be reconstructed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft

from numba_recon.ctf import ctf_images
from numba_recon.io.names import HOLDOUT_SALT, image_keys, keyed_half_sets, order_by_key
from numba_recon.particles import ParticleSet

log = logging.getLogger(__name__)


def particle_keys(particles: ParticleSet, seed: int, salt: int) -> np.ndarray:
    """A seeded pseudo-random key per particle from its image name (``index@stack``), ``(n,)`` uint64.

    Keys depend on the image, not on its row: the same particles in another row order or another
    file format get the same keys, hence the same half sets, hold-out and results.
    """
    return image_keys(particles.stack_paths, particles.stack_indices, seed, salt)


def assign_halves(particles: ParticleSet, seed: int) -> tuple[np.ndarray, bool]:
    """Gold-standard half labels (1 or 2) for every particle.

    Uses ``rlnRandomSubset`` when every particle has one; otherwise a seeded random split into two
    halves of equal size (``ceil(n/2)`` in half 1), drawn from the image names (never even/odd
    order, never row order; :func:`numba_recon.io.names.keyed_half_sets`, as the ``.thu`` reader).
    Returns ``(labels (n,) int8, from_input)``.
    """
    given = np.asarray(particles.half_set)
    if given.size and np.all((given == 1) | (given == 2)):
        return given.astype(np.int8), True
    return keyed_half_sets(particles.stack_paths, particles.stack_indices, seed), False


def assign_cross_validation(halves: np.ndarray, fraction: float, seed: int,
                            particles: ParticleSet | None = None) -> np.ndarray:
    """Held-out flags: a seeded ``fraction`` of each half, at least one particle when fraction > 0.

    With ``particles`` the choice is drawn from the image names (independent of row order).
    """
    cv = np.zeros(halves.shape, dtype=bool)
    if fraction <= 0:
        return cv
    keys = particle_keys(particles, seed, HOLDOUT_SALT) if particles is not None else None
    for h in (1, 2):
        idx = np.flatnonzero(halves == h)
        k = int(round(fraction * idx.size))
        if idx.size > 1:
            k = min(max(k, 1), idx.size - 1)
        else:
            k = 0
        if keys is not None:
            chosen = order_by_key(idx, keys)[:k]
        else:
            chosen = np.random.default_rng([seed, 7002, h]).choice(idx, size=k, replace=False)
        cv[chosen] = True
    return cv


def epoch_batches(index: np.ndarray, batch_size: int, seed: int, epoch: int, half: int) -> list[np.ndarray]:
    """Global minibatches of one half for one epoch: a seeded permutation of ``index`` cut into
    chunks of ``batch_size`` (the last chunk may be shorter)."""
    perm = np.asarray(index)[np.random.default_rng([seed, epoch, half]).permutation(len(index))]
    return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]


def shard(batch: np.ndarray, rank: int, size: int) -> np.ndarray:
    """The rows of a global minibatch that rank ``rank`` of ``size`` processes."""
    return batch[rank::size]


def shift_phase(box_size: int, shifts_px: np.ndarray) -> np.ndarray:
    """Fourier phase ramps that move image content by ``+shift``: ``exp(-2 pi i k.s / N)``.

    ``shifts_px (b, 2)`` as ``(x, y)``; returns ``(b, N, N//2+1)`` complex64 in ``rfft2`` layout.
    """
    n = box_size
    ky = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    s = np.asarray(shifts_px, dtype=np.float64)
    # the ramp is separable: two small exponentials per image and an outer product
    ramp_x = np.exp(-2j * np.pi / n * kx[None, :] * s[:, 0, None])
    ramp_y = np.exp(-2j * np.pi / n * ky[None, :] * s[:, 1, None])
    return (ramp_y[:, :, None] * ramp_x[:, None, :]).astype(np.complex64)


def rfft_half(full: np.ndarray) -> np.ndarray:
    """The ``rfft2`` layout ``(b, N, N//2 + 1)`` of filters given on the full ``fft2`` grid ``(b, N, N)``.

    Columns ``0 .. N//2`` are shared, except the Nyquist column of an even box: ``rfftfreq`` puts
    it at ``+1/2`` and ``fftfreq`` at ``-1/2``, and ``H(+1/2, k_y) = H(-1/2, -k_y)`` for the CTF
    (even in ``k``), so that column is read from the mirrored rows. Only its corner
    ``(+1/2, -1/2)`` has no mirror on the full grid; the caller sets it. Evaluating the CTF once on
    the full grid halves the cost of preparing a particle.
    """
    n = full.shape[-1]
    half = np.array(full[..., : n // 2 + 1])
    if n % 2 == 0:
        mirror = (-np.arange(n)) % n
        half[..., :, n // 2] = full[..., mirror, n // 2]
    return half


def background_mask(box_size: int, radius_fraction: float = 0.85) -> np.ndarray:
    """Pixels outside a centred disc of ``radius_fraction * N/2``: where noise is measured."""
    c = box_size // 2
    y, x = np.mgrid[:box_size, :box_size]
    return (x - c) ** 2 + (y - c) ** 2 > (radius_fraction * box_size / 2) ** 2


def background_means(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of each image over the background pixels ``mask (N, N)``: ``images (b, N, N)`` -> ``(b,)`` float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        return images[:, mask].mean(axis=1, dtype=np.float64)


@dataclass
class BackgroundStats:
    """Per-image background statistics of the rows surveyed, each ``(k,)`` float64.

    Attributes
    ----------
    mean
        Mean of the pixels outside the particle disc (what is subtracted).
    std
        Their standard deviation (the image's noise sigma).
    peak
        Largest absolute pixel value; not finite where any pixel is not.
    blank_loss
        ``||b - mean||^2 / (N^2 std^2)``: the noise-normalised loss of a blank map, the scale every
        per-particle loss of the run is compared with.
    """

    mean: np.ndarray
    std: np.ndarray
    peak: np.ndarray
    blank_loss: np.ndarray

    @staticmethod
    def concatenate(parts: "list[BackgroundStats]") -> "BackgroundStats":
        keys = ("mean", "std", "peak", "blank_loss")
        return BackgroundStats(*(np.concatenate([getattr(p, k) for p in parts]) for k in keys))


def survey_backgrounds(particles: ParticleSet, index: np.ndarray, batch_size: int = 256) -> BackgroundStats:
    """Background mean, spread and peak of the images at rows ``index``, read batch by batch
    (memory bounded by ``batch_size`` images)."""
    mask = background_mask(particles.box_size)
    parts = []
    index = np.asarray(index, dtype=np.int64)
    for start in range(0, index.size, batch_size):
        images = particles.read_images(index[start:start + batch_size])
        flat = images.reshape(images.shape[0], -1)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            bg = images[:, mask].astype(np.float64)
            mean, std = bg.mean(axis=1), bg.std(axis=1)
            peak = np.abs(flat).max(axis=1).astype(np.float64)
            peak[~np.isfinite(flat).all(axis=1)] = np.inf
            power = np.einsum("bi,bi->b", flat - mean[:, None], flat - mean[:, None], dtype=np.float64)
            blank = power / (flat.shape[1] * std**2)
        parts.append(BackgroundStats(mean, std, peak, blank))
    if not parts:
        return BackgroundStats(*(np.zeros(0) for _ in range(4)))
    return BackgroundStats.concatenate(parts)


#: Background variances at or below this are no noise (constant images); peaks above PEAK_LIMIT
#: overflow float32 sums of squares and are refused as not normalised.
NOISELESS_STD = 1e-6
PEAK_LIMIT = 1e15
#: A median background offset of this many noise sigma means the images were not normalised.
OFFSET_SIGMA_WARN = 3.0
#: Background spreads differing by more than this factor (2nd to 98th percentile) are worth a warning.
SPREAD_RATIO_WARN = 10.0


def check_backgrounds(stats: BackgroundStats, source: Any, report: bool = True) -> dict[str, float]:
    """Refuse images that cannot be reconstructed, log what the background subtraction does, and warn
    about unnormalised or inconsistent images. ``stats`` covers every particle (all ranks); with
    ``report`` False (MPI ranks other than 0) nothing is logged.

    Returns the summary written to the log: ``median_offset_sigma``, ``spread_ratio``, and
    ``blank_loss`` (the mean noise-normalised loss of a blank map).

    Raises
    ------
    InputFileError
        Images with pixels that are not finite or beyond :data:`PEAK_LIMIT`, or without noise
        outside the particle (constant images: identical in both half sets, they fake a resolution).
    """
    from numba_recon.errors import InputFileError

    huge = int(np.sum(~(stats.peak <= PEAK_LIMIT)))
    if huge:
        raise InputFileError(f"the particle images do not give a usable reconstruction ({huge} image(s) with pixel "
                             "values beyond 1e15 or not finite)", source,
                             "normalise the images (zero mean, unit noise outside the particle, as relion_preprocess "
                             "does) and check them with numba-recon info")
    noiseless = int(np.sum(stats.std <= NOISELESS_STD * np.maximum(1.0, stats.peak)))
    if noiseless:
        raise InputFileError(f"{noiseless} particle image(s) have no noise outside the particle (a constant "
                             "background): they are not particle images, and identical images in both half "
                             "sets would fake a resolution", source,
                             "check the stacks (numba-recon info) and remove those rows")
    offset = np.abs(stats.mean) / stats.std
    median_offset = float(np.median(offset))
    lo, hi = np.percentile(stats.std, [2, 98])
    ratio = float(hi / lo)
    if not report:
        pass
    elif median_offset >= OFFSET_SIGMA_WARN:
        log.warning("the particle images are not normalised: their backgrounds sit %.1f noise sigma from zero "
                    "(median over %d images; raw counts?); each image's background mean, outside the particle "
                    "disc, is subtracted before reconstruction (relion_preprocess --norm would do it for good)",
                    median_offset, offset.size)
    else:
        log.info("background mean (outside the particle disc) subtracted from each image: median offset %.2f "
                 "noise sigma", median_offset)
    if report and ratio > SPREAD_RATIO_WARN:
        log.warning("the images' background noise differs by a factor of %.0f (2nd to 98th percentile of the "
                    "per-image sigma, %.3g to %.3g): images from different sources or not normalised; each image "
                    "is weighted by its own noise, but check the stacks (numba-recon info)", ratio, lo, hi)
    return {"median_offset_sigma": median_offset, "spread_ratio": ratio,
            "blank_loss": float(np.mean(stats.blank_loss))}


@dataclass
class PreparedData:
    """Per-particle arrays for the operator, host side.

    Attributes
    ----------
    data
        ``(b, N, N)`` float32, ``H T^{-1} b``.
    filters2
        ``(b, N, N)`` float32, ``H^2`` on the full FFT grid.
    data_norm2
        ``(b,)`` float32, ``||T^{-1} b||^2``.
    noise_var
        ``(b,)`` float32, per-image noise variance outside the particle disc.
    rotations
        ``(b, 3, 3)`` float32.
    """

    data: np.ndarray
    filters2: np.ndarray
    data_norm2: np.ndarray
    noise_var: np.ndarray
    rotations: np.ndarray


class BatchLoader:
    """Reads and prepares particles for the operator, caching prepared rows up to ``cache_bytes``.

    Parameters
    ----------
    particles
        The particle set.
    cache_bytes
        Memory budget for prepared rows (``2 N^2`` floats each). Beyond it rows are prepared again
        at every use, so peak memory is bounded by the batch size, not by the data set.
    """

    def __init__(self, particles: ParticleSet, cache_bytes: int = 1 << 30) -> None:
        self.particles = particles
        self.n = len(particles)
        self.box = particles.box_size
        per_row = 2 * self.box * self.box * 4 + 16
        self.cache_rows = min(self.n, max(0, int(cache_bytes // per_row)))
        self._cache: dict[str, np.ndarray] | None = None
        self._cached = np.zeros(self.n, dtype=bool)
        self._bg = background_mask(self.box)

    def _allocate_cache(self) -> None:
        if self._cache is None and self.cache_rows >= self.n:
            n, box = self.n, self.box
            self._cache = {
                "data": np.empty((n, box, box), np.float32),
                "filters2": np.empty((n, box, box), np.float32),
                "data_norm2": np.empty(n, np.float32),
                "noise_var": np.empty(n, np.float32),
            }

    def prepare(self, index: np.ndarray) -> PreparedData:
        """Prepared arrays for the particles at positions ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        self._allocate_cache()
        if self._cache is not None:
            missing = index[~self._cached[index]]
            if missing.size:
                fresh = self._compute(np.unique(missing))
                for key in self._cache:
                    self._cache[key][np.unique(missing)] = getattr(fresh, key)
                self._cached[np.unique(missing)] = True
            c = self._cache
            return PreparedData(c["data"][index], c["filters2"][index], c["data_norm2"][index],
                                c["noise_var"][index], self._rotations(index))
        return self._compute(index)

    def _rotations(self, index: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.particles.rotations[index], dtype=np.float32)

    def _compute(self, index: np.ndarray) -> PreparedData:
        p = self.particles
        box = self.box
        images = p.read_images(index).astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):  # overflowing images are refused by the survey
            images = images - background_means(images, self._bg)[:, None, None].astype(np.float32)
        ctf_full = ctf_images({k: v[index] for k, v in p.ctf.items()}, box, p.pixel_size_angstrom, half=False)
        ctf_half = rfft_half(ctf_full)
        if box % 2 == 0:  # (+1/2, -1/2) is the one half-grid frequency the full grid lacks
            corner = {k: v[index] for k, v in p.ctf.items()}
            ctf_half[:, box // 2, box // 2] = ctf_images(corner, 2, p.pixel_size_angstrom, half=True)[:, 1, 1]
        premult = p.ctf_premultiplied[index]
        h_half = np.where(premult[:, None, None], ctf_half * ctf_half, ctf_half)
        h_full = np.where(premult[:, None, None], ctf_full * ctf_full, ctf_full)
        spectrum = scipy.fft.rfft2(images, workers=-1) * shift_phase(box, p.shifts_px[index])
        shifted = scipy.fft.irfft2(spectrum, s=(box, box), workers=-1)
        data = scipy.fft.irfft2(spectrum * h_half, s=(box, box), workers=-1).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflowing images are refused by the caller
            norm2 = np.einsum("bij,bij->b", shifted, shifted, dtype=np.float64).astype(np.float32)
        bg = images[:, self._bg]
        with np.errstate(over="ignore", invalid="ignore"):
            noise_var = bg.var(axis=1, dtype=np.float64).astype(np.float32)
        noise_var = np.maximum(noise_var, np.float32(1e-12))
        return PreparedData(data=np.ascontiguousarray(data), filters2=np.ascontiguousarray(h_full * h_full, np.float32),
                            data_norm2=norm2, noise_var=noise_var, rotations=self._rotations(index))

    def describe(self) -> dict[str, Any]:
        return {"particles": self.n, "box": self.box, "cached": self._cache is not None}
