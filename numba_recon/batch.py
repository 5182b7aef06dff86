"""The batch stage: gold-standard halves, cross-validation hold-out, minibatches, rank shards, and
the per-particle data prepared once for the operator.

Minibatches come from one permutation per (seed, epoch, half), identical on every rank; rank ``r``
of ``s`` takes rows ``r::s`` of each global minibatch. The mathematics therefore does not depend on
the number of ranks, only the order of floating-point sums does.

For each particle the loader computes (and keeps, for as many particles as ``--cache-mb`` holds; the
others are prepared again at every use, by a background reader one or two batches ahead of the
operator: :class:`BatchLoader`):

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

import contextlib
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# the per-image preparation is the CPU backend's prepare_particles; its helpers are re-exported here
from numba_recon.cpu.prepare import background_means, rfft_half, shift_phase  # noqa: F401
from numba_recon.contract import ctf_parameters
from numba_recon.cpu.prepare import prepare_particles
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


def batch_chunks(index: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``index (k,)`` cut into consecutive chunks of ``batch_size`` (the last may be shorter): the
    batches, in order, of a pass that prepares ``index[start:start + batch_size]`` in turn (what
    :meth:`BatchLoader.schedule` is told)."""
    index = np.asarray(index, dtype=np.int64)
    return [index[start:start + batch_size] for start in range(0, index.size, max(1, int(batch_size)))]


def background_mask(box_size: int, radius_fraction: float = 0.85) -> np.ndarray:
    """Pixels outside a centred disc of ``radius_fraction * N/2``: where noise is measured."""
    c = box_size // 2
    y, x = np.mgrid[:box_size, :box_size]
    return (x - c) ** 2 + (y - c) ** 2 > (radius_fraction * box_size / 2) ** 2


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
    digest
        ``(k,)`` uint64, a hash of the image's pixels: two rows with the same digest hold copies of
        one image (real images differ in their noise).
    """

    mean: np.ndarray
    std: np.ndarray
    peak: np.ndarray
    blank_loss: np.ndarray
    digest: np.ndarray

    KEYS = ("mean", "std", "peak", "blank_loss", "digest")

    @staticmethod
    def concatenate(parts: "list[BackgroundStats]") -> "BackgroundStats":
        return BackgroundStats(*(np.concatenate([getattr(p, k) for p in parts]) for k in BackgroundStats.KEYS))

    def take(self, index: np.ndarray) -> "BackgroundStats":
        """The statistics of the rows at positions ``index``."""
        return BackgroundStats(*(getattr(self, k)[index] for k in BackgroundStats.KEYS))


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
        digest = np.array([int.from_bytes(hashlib.blake2b(np.ascontiguousarray(image).tobytes(),
                                                          digest_size=8).digest(), "little") for image in images],
                          dtype=np.uint64)
        parts.append(BackgroundStats(mean, std, peak, blank, digest))
    if not parts:
        return BackgroundStats(*(np.zeros(0) for _ in range(4)), np.zeros(0, np.uint64))
    return BackgroundStats.concatenate(parts)


def copied_images(digest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose pixels equal an earlier row's (by ``digest (n,)``), and for each the earlier row:
    ``(copies (k,), originals (k,))`` int64, 0-based."""
    _, first, inverse = np.unique(digest, return_index=True, return_inverse=True)
    original = first[inverse]
    copies = np.flatnonzero(original != np.arange(digest.size))
    return copies, original[copies]


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


@dataclass
class RawData:
    """Per-particle inputs of the preparation done on the device (the backend's
    ``prepare_particles``), host side: what :class:`BatchLoader` gives with ``raw=True``.

    Attributes
    ----------
    images
        ``(b, N, N)`` float32, the pixels as read.
    ctf_params
        ``(b, 9)`` float64 in the column order of :data:`numba_recon.contract.CTF_COLUMNS`.
    shifts_px
        ``(b, 2)`` float64, ``(x, y)``.
    premultiplied
        ``(b,)`` bool, images already multiplied by their CTF.
    rotations
        ``(b, 3, 3)`` float32.
    """

    images: np.ndarray
    ctf_params: np.ndarray
    shifts_px: np.ndarray
    premultiplied: np.ndarray
    rotations: np.ndarray


#: Batches the background reader prepares ahead of the consumer, the one it is computing included:
#: two is double buffering (one waits while the next is prepared), and memory holds the cache plus
#: this many batches.
PREFETCH_DEPTH = 2
#: Particles are prepared in chunks whose float64 ``(N, N)`` temporaries (the CTF) take about this
#: many bytes: arrays that stay in the CPU cache make the elementwise steps about twice as fast as
#: whole-batch arrays of tens of MB (32 particles at box 128), and a row comes out bitwise the same.
PREP_CHUNK_BYTES = 4 << 20
#: How often an idle or waiting thread looks again at a condition nobody signals (the loader freed
#: without :meth:`BatchLoader.cancel`, a reader that ended): seconds.
POLL_S = 0.25
#: A reader with nothing announced and nothing waiting for the consumer ends after this long idle
#: (seconds); the next :meth:`BatchLoader.schedule` starts another. No thread outlives a run.
IDLE_EXIT_S = 2.0
#: How long stopping the reader waits for the batch it is computing: seconds. A reader stuck in a
#: read (a hung file system) is a daemon thread and does not keep the process alive.
JOIN_TIMEOUT_S = 30.0


def _same_batch(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two index arrays name the same rows in the same order."""
    return a.shape == b.shape and bool(np.array_equal(a, b))


class ReadAhead:
    """The background reader of a :class:`BatchLoader`: a daemon thread that prepares announced
    batches, in order, at most ``depth`` of them ahead of the consumer.

    Made by :meth:`BatchLoader.schedule`; the consumer takes results with :meth:`take` (through
    :meth:`BatchLoader.prepare`). Used as a context manager it stops the reader when the block
    ends with an exception (a normal end leaves what was announced beyond the block pending).

    The thread prepares with its own :class:`~numba_recon.io.mrc.StackReader` (a reader keeps open
    files in an LRU that is not thread-safe) and holds only a weak reference to the loader: a loader
    that is freed ends its reader within :data:`POLL_S`, and a reader left with nothing to prepare or
    hand over ends after :data:`IDLE_EXIT_S`. An exception raised while preparing a batch ends the
    thread and is raised again, the same object, by the :meth:`take` of that batch.
    """

    def __init__(self, loader: "BatchLoader", depth: int) -> None:
        self.depth = max(1, int(depth))
        self._loader = weakref.ref(loader)
        self._cond = threading.Condition()
        #: the announced batches from position ``_base`` on (those before were taken: dropped, so
        #: a long run does not accumulate index arrays), each with the caller's numpy error state
        self._batches: list[tuple[np.ndarray, dict[str, str]]] = []
        self._base = 0
        #: finished batches the consumer has not taken: position -> (prepared, exception)
        self._results: dict[int, tuple[PreparedData | RawData | None, BaseException | None]] = {}
        self._consumed = 0  # batches before this position were taken or skipped
        self._produced = 0  # batches before this position were started by the reader
        self._stopped = False
        self._alive = True
        #: the most prepared rows held ahead of the consumer at once (finished or being prepared)
        self.peak_ahead_rows = 0
        self._thread = threading.Thread(target=self._run, name="numba-recon-reader", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- consumer side
    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.stop()

    @property
    def active(self) -> bool:
        """Whether the reader thread is running (it may be idle, waiting for batches)."""
        return self._thread.is_alive() and not self._stopped

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def pending(self) -> int:
        """Announced batches the consumer has not taken yet."""
        with self._cond:
            return self._end - self._consumed

    @property
    def _end(self) -> int:
        """The position after the last announced batch."""
        return self._base + len(self._batches)

    def _batch(self, k: int) -> np.ndarray:
        return self._batches[k - self._base][0]

    def extend(self, batches: Sequence[np.ndarray], errstate: dict[str, str]) -> bool:
        """Append ``batches`` if they continue this schedule: the batches still pending must be their
        first ones (announcing again what is pending does not repeat it). Returns False, changing
        nothing, otherwise or when the reader has ended."""
        with self._cond:
            if self._stopped or not self._alive:
                return False
            pending = [b for b, _ in self._batches[self._consumed - self._base:]]
            if len(pending) > len(batches) or not all(_same_batch(a, b) for a, b in zip(pending, batches)):
                return False
            self._batches.extend((b, errstate) for b in batches[len(pending):])
            self._cond.notify_all()
            return True

    def take(self, index: np.ndarray) -> PreparedData | RawData | None:
        """The prepared batch ``index`` if it was announced (waiting for the reader if needed), or
        None: the caller prepares it itself. Announced batches before it are dropped (the consumer
        skipped them). Raises the reader's exception for the batch that raised it."""
        with self._cond:
            j = next((k for k in range(self._consumed, self._end) if _same_batch(self._batch(k), index)), None)
            if j is None:
                return None
            for k in range(self._consumed, j):
                self._results.pop(k, None)
            self._consumed = j  # lets the reader start batch j if it has not
            self._cond.notify_all()
            while j not in self._results and self._alive and not self._stopped:
                self._cond.wait(POLL_S)
            result = self._results.pop(j, None)
            self._consumed = j + 1
            del self._batches[:self._consumed - self._base]
            self._base = self._consumed
            self._cond.notify_all()
        if result is None:  # the reader ended before this batch
            return None
        prepared, error = result
        if error is not None:
            self.stop()
            raise error
        return prepared

    def stop(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """End the reader and drop what it prepared; waits for the batch it is computing."""
        with self._cond:
            self._stopped = True
            self._results.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -------------------------------------------------------------- reader thread
    def _run(self) -> None:
        from numba_recon.io.mrc import StackReader

        reader = StackReader()
        try:
            while True:
                with self._cond:
                    self._produced = max(self._produced, self._consumed)
                    idle_since = time.monotonic()
                    while not self._stopped and (self._produced >= self._end
                                                 or self._produced - self._consumed >= self.depth):
                        if self._loader() is None:
                            return
                        if self._results or self._produced < self._end:
                            idle_since = time.monotonic()
                        elif time.monotonic() - idle_since > IDLE_EXIT_S:
                            self._stopped = True  # under the lock: extend() now starts a new reader
                            return
                        self._cond.wait(POLL_S)
                        self._produced = max(self._produced, self._consumed)
                    if self._stopped:
                        return
                    i = self._produced
                    self._produced += 1
                    index, errstate = self._batches[i - self._base]
                    ahead = index.size + sum(self._batch(k).size for k in self._results)
                    self.peak_ahead_rows = max(self.peak_ahead_rows, ahead)
                loader = self._loader()
                if loader is None:
                    return
                try:
                    with np.errstate(**errstate):
                        result: tuple[PreparedData | RawData | None, BaseException | None] = (
                            loader._assemble(index, reader), None)
                except BaseException as err:  # noqa: BLE001 - handed to the consumer, who raises it
                    result = (None, err)
                del loader
                with self._cond:
                    if i >= self._consumed and not self._stopped:  # else skipped or cancelled meanwhile
                        self._results[i] = result
                    self._cond.notify_all()
                if result[1] is not None:
                    return
        finally:
            reader.close()
            with self._cond:
                self._alive = False
                self._cond.notify_all()


class BatchLoader:
    """Reads and prepares particles for the operator: a cache of prepared rows up to ``cache_bytes``
    and a background reader for the rest.

    **Cache.** A prepared row takes ``2 N^2`` float32 plus 16 bytes. The first ``cache_rows`` distinct
    rows the loader prepares, in the order it prepares them, are kept for the whole run and never
    replaced; every other row is prepared again at each use. The engine's passes visit their
    particles in the same order every time (the cg solver: training rows of half 1, then half 2,
    then the held-out rows), so the same rows hit the cache in every pass, which is all a fixed set
    can do; an evicting cache would, for passes that each read every row once in the same order,
    hit nothing. With ``cache_rows >= n`` the whole data set is prepared once. Which rows are kept
    never changes a result: a row is prepared by the same arithmetic whichever batch it is in.

    **Streaming.** :meth:`schedule` announces the batches the next :meth:`prepare` calls will ask
    for; a daemon thread (:class:`ReadAhead`) prepares them in that order, at most ``prefetch``
    batches ahead (image reads, FFTs and most numpy work release the GIL, so it overlaps the
    operator). :meth:`prepare` returns the read-ahead result when it is asked for an announced
    batch and prepares anything else itself, so a caller that does not follow its announcement
    gets the same arrays, only without the overlap. Memory: the cache plus ``prefetch`` batches.

    Usage (``batches`` a list of index arrays, in the order they will be prepared)::

        with loader.schedule(batches):          # an exception in the block stops the reader
            for part in batches:
                prep = loader.prepare(part)     # the prefetched arrays, bitwise what prepare computes

    ``schedule`` while an earlier schedule has batches pending continues it if those are the first
    of the new list, and otherwise replaces it; :meth:`cancel` stops the reader. An exception raised
    while preparing a batch in the background (an :class:`~numba_recon.errors.InputFileError` for a
    damaged stack) is raised by the ``prepare`` call of that batch, the same exception object.

    Parameters
    ----------
    particles
        The particle set.
    cache_bytes
        Memory budget for prepared rows. Beyond it rows are prepared again at every use, so peak
        memory is bounded by the cache and a few batches, not by the data set.
    prefetch
        Batches prepared ahead by the background reader (0: no reader, :meth:`schedule` does nothing;
        default :data:`PREFETCH_DEPTH`, read when the loader is made).
    raw
        Give :class:`RawData` (the images as read and their parameters) instead of
        :class:`PreparedData`, for a backend that prepares particles on the device: the reader then
        only reads, and the cache keeps images (``N^2`` float32 a row, half a prepared row).
    """

    #: the per-row arrays of :class:`PreparedData` that are prepared (and cached); rotations are read
    _KEYS = ("data", "filters2", "data_norm2", "noise_var")
    #: the per-row arrays of :class:`RawData` that are read (and cached); the parameters are looked up
    _RAW_KEYS = ("images",)

    def __init__(self, particles: ParticleSet, cache_bytes: int = 1 << 30, prefetch: int | None = None,
                 raw: bool = False) -> None:
        self.particles = particles
        self.n = len(particles)
        self.box = particles.box_size
        self.raw = bool(raw)
        self._keys = self._RAW_KEYS if self.raw else self._KEYS
        self.row_bytes = self.box * self.box * 4 if self.raw else 2 * self.box * self.box * 4 + 16
        self.cache_rows = min(self.n, max(0, int(cache_bytes // self.row_bytes)))
        self.prefetch = max(0, int(PREFETCH_DEPTH if prefetch is None else prefetch))
        self._cache: dict[str, np.ndarray] | None = None
        #: cache slot of each row, -1 where it is not cached; a slot is written before it is published
        self._slot = np.full(self.n, -1, dtype=np.int64)
        self._used = 0
        self._lock = threading.Lock()  # slots and counters: the reader thread prepares too
        self._read_ahead: ReadAhead | None = None
        self._bg = background_mask(self.box)
        #: ``prefetched`` / ``synchronous``: batches served by the reader / prepared by the caller;
        #: ``computed_rows``: rows prepared from their images; ``cache_hits``: rows served by the cache
        self.stats = {"prefetched": 0, "synchronous": 0, "computed_rows": 0, "cache_hits": 0}

    # -------------------------------------------------------------- streaming
    def schedule(self, batches: Sequence[np.ndarray]) -> "ReadAhead | contextlib.nullcontext[None]":
        """Announce the index arrays ``(b,)`` of the coming :meth:`prepare` calls, in order, and
        start preparing them in the background. Returns a context manager: the reader, which a block
        ending with an exception stops, or a no-op one with ``prefetch`` 0 or nothing announced."""
        batches = [np.asarray(b, dtype=np.int64) for b in batches]
        if self.prefetch == 0:
            return contextlib.nullcontext()
        errstate = np.geterr()  # the caller's; numpy keeps it per thread
        current = self._read_ahead
        if current is not None and current.extend(batches, errstate):
            return current
        self.cancel()
        if not batches:
            return contextlib.nullcontext()
        self._read_ahead = ReadAhead(self, self.prefetch)
        self._read_ahead.extend(batches, errstate)
        return self._read_ahead

    def cancel(self) -> None:
        """Stop the background reader (if any) and drop the batches it prepared."""
        current, self._read_ahead = self._read_ahead, None
        if current is not None:
            current.stop()

    close = cancel

    @property
    def reading(self) -> bool:
        """Whether a background reader thread is running."""
        return self._read_ahead is not None and self._read_ahead.active

    @property
    def background_mask(self) -> np.ndarray:
        """``(N, N)`` bool: the pixels where the background (mean, noise) is measured."""
        return self._bg

    @property
    def cached_rows(self) -> int:
        """Rows in the cache now (at most :attr:`cache_rows`)."""
        return self._used

    def prepare(self, index: np.ndarray) -> PreparedData | RawData:
        """Prepared arrays for the particles at positions ``index (b,)`` (in that order): the
        read-ahead result when ``index`` was announced by :meth:`schedule`, else prepared here
        (:class:`RawData` for a ``raw`` loader)."""
        index = np.asarray(index, dtype=np.int64)
        current = self._read_ahead
        if current is not None:
            prepared = current.take(index)
            if prepared is not None:
                self.stats["prefetched"] += 1
                return prepared
        self.stats["synchronous"] += 1
        return self._assemble(index)

    # -------------------------------------------------------------- cache
    def _assemble(self, index: np.ndarray, reader: Any = None) -> PreparedData:
        """Cached rows copied, the others prepared from their images (and cached while there is
        room); ``reader`` the stack reader of the calling thread (None: the particle set's)."""
        if self.cache_rows == 0:
            fresh = self._compute(index, reader)
            with self._lock:
                self.stats["computed_rows"] += index.size
            return fresh
        with self._lock:
            slots = self._slot[index]
        hit = slots >= 0
        if hit.all():
            with self._lock:
                self.stats["cache_hits"] += index.size
            return self._gather(index, slots)
        missing = index[~hit]
        _, first, inverse = np.unique(missing, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # distinct rows in the order they are asked for
        rows = missing[first[order]]
        fresh = self._compute(rows, reader)
        self._admit(rows, fresh)
        with self._lock:
            self.stats["computed_rows"] += rows.size
            self.stats["cache_hits"] += int(hit.sum())
        if not hit.any() and rows.size == index.size:
            return fresh  # every row new and distinct: rows == index
        where = np.empty(rows.size, dtype=np.int64)
        where[order] = np.arange(rows.size)
        pick = where[inverse]  # position in ``rows`` of each missing entry of ``index``
        arrays = {}
        for key in self._keys:
            computed = getattr(fresh, key)
            arrays[key] = target = np.empty((index.size,) + computed.shape[1:], computed.dtype)
            target[~hit] = computed[pick]
            if hit.any():  # a slot >= 0 means the cache exists and the row is written
                target[hit] = self._cache[key][slots[hit]]
        return self._wrap(arrays, index)

    def _gather(self, index: np.ndarray, slots: np.ndarray) -> PreparedData | RawData:
        c = self._cache
        assert c is not None
        return self._wrap({key: c[key][slots] for key in self._keys}, index)

    def _wrap(self, arrays: dict[str, np.ndarray], index: np.ndarray) -> PreparedData | RawData:
        """The per-row ``arrays`` of the rows ``index``, with what is looked up rather than kept."""
        if not self.raw:
            return PreparedData(**arrays, rotations=self._rotations(index))
        p = self.particles
        return RawData(images=arrays["images"], ctf_params=ctf_parameters(p.ctf, index),
                       shifts_px=np.ascontiguousarray(p.shifts_px[index], dtype=np.float64),
                       premultiplied=np.ascontiguousarray(p.ctf_premultiplied[index], dtype=bool),
                       rotations=self._rotations(index))

    def _admit(self, rows: np.ndarray, fresh: PreparedData) -> None:
        """Keep the first of ``rows`` (prepared as ``fresh``) that are not cached, while there is room."""
        with self._lock:
            room = self.cache_rows - self._used
            if room <= 0:
                return
            new = np.flatnonzero(self._slot[rows] < 0)[:room]  # the other thread may have kept some
            if not new.size:
                return
            if self._cache is None:
                k = self.cache_rows
                self._cache = {key: np.empty((k,) + getattr(fresh, key).shape[1:], getattr(fresh, key).dtype)
                               for key in self._keys}
            slots = np.arange(self._used, self._used + new.size)
            for key, array in self._cache.items():
                array[slots] = getattr(fresh, key)[new]
            self._slot[rows[new]] = slots  # published after the rows are written
            self._used += new.size

    def _rotations(self, index: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.particles.rotations[index], dtype=np.float32)

    def _compute(self, index: np.ndarray, reader: Any = None) -> PreparedData | RawData:
        """Prepare the rows ``index (b,)`` from their images, read in one go and prepared
        :data:`PREP_CHUNK_BYTES` at a time (a ``raw`` loader only reads them)."""
        box = self.box
        b = index.size
        images = self.particles.read_images(index, reader).astype(np.float32, copy=False)
        if self.raw:
            return self._wrap({"images": np.ascontiguousarray(images)}, index)
        data = np.empty((b, box, box), np.float32)
        filters2 = np.empty((b, box, box), np.float32)
        norm2 = np.empty(b, np.float32)
        noise_var = np.empty(b, np.float32)
        step = max(1, PREP_CHUNK_BYTES // (8 * box * box))
        for start in range(0, b, step):
            rows = slice(start, start + step)
            self._prepare_rows(index[rows], images[rows], data[rows], filters2[rows], norm2[rows], noise_var[rows])
        noise_var = np.maximum(noise_var, np.float32(1e-12))
        return PreparedData(data=data, filters2=filters2, data_norm2=norm2, noise_var=noise_var,
                            rotations=self._rotations(index))

    def _prepare_rows(self, index: np.ndarray, images: np.ndarray, data: np.ndarray, filters2: np.ndarray,
                      norm2: np.ndarray, noise_var: np.ndarray) -> None:
        """Fill ``data``, ``filters2 (c, N, N)``, ``norm2`` and ``noise_var (c,)`` for the rows ``index (c,)``
        from their images ``(c, N, N)`` float32. Every step is per image, so a row comes out the same
        in any chunk."""
        p = self.particles
        prepare_particles(np.ascontiguousarray(images, dtype=np.float32), ctf_parameters(p.ctf, index),
                          np.ascontiguousarray(p.shifts_px[index], dtype=np.float64),
                          np.ascontiguousarray(p.ctf_premultiplied[index], dtype=bool), p.pixel_size_angstrom,
                          self._bg, data, filters2, norm2, noise_var)

    def describe(self) -> dict[str, Any]:
        return {"particles": self.n, "box": self.box, "prepared_on": "device" if self.raw else "host",
                "cached": self.cache_rows >= self.n,
                "cache_rows": self.cache_rows, "cached_rows": self._used, "prefetch": self.prefetch}
