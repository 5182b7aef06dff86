"""The streaming data path: a partial cache of prepared particles and the background reader that
prepares the next batches while the current one computes.

Whatever is cached and whatever is read ahead, every prepared row and every map must be bitwise what
the synchronous, uncached path gives; an exception in the reader must reach the caller; the reader
must end (no thread left behind) and hold no more than the cache plus its queue.
"""

from __future__ import annotations

import gc
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from numba_recon.batch import IDLE_EXIT_S, POLL_S, BatchLoader, PreparedData, batch_chunks
from numba_recon.cli import main
from numba_recon.errors import InputFileError

BOX = 20
N_PARTICLES = 240
KEYS = ("data", "filters2", "data_norm2", "noise_var", "rotations")


@pytest.fixture(scope="module")
def data(simulate) -> Path:
    return simulate(n_particles=N_PARTICLES, box_size=BOX, pixel_size_angstrom=4.0, snr=0.3, max_shift_px=2.0, seed=5,
                    particles_per_stack=80)


@pytest.fixture(scope="module")
def particles(data):
    from numba_recon.read import read_particles

    return read_particles(data / "particles.star")


def _row_bytes() -> int:
    return 2 * BOX * BOX * 4 + 16


def _same(a: PreparedData, b: PreparedData) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
               for k in KEYS)


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "numba-recon-reader" and t.is_alive()]


def _no_reader_left() -> bool:
    """Whether every reader thread ends (an idle one after IDLE_EXIT_S, one whose loader is gone
    after POLL_S); the 30 s beyond those only catch a reader that never ends."""
    gc.collect()
    deadline = time.monotonic() + IDLE_EXIT_S + 2 * POLL_S + 30.0
    while _reader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _reader_threads()


@pytest.fixture(autouse=True)
def _no_reader_from_earlier_tests():
    """Readers of earlier tests in this process (an in-process run's idle reader ends within
    IDLE_EXIT_S) must not be counted as this test's."""
    assert _no_reader_left()
    yield


def _passes(n: int, batch: int) -> list[list[np.ndarray]]:
    """Three passes as the engine makes them: in order, in order again, and a shuffled order with a
    batch that repeats a row (cached and uncached rows mixed within a batch)."""
    index = np.arange(n)
    shuffled = np.random.default_rng(3).permutation(n)
    odd = np.concatenate([shuffled[:7], shuffled[:3]])
    return [batch_chunks(index, batch), batch_chunks(index, batch), batch_chunks(shuffled, batch) + [odd]]


# ---------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("prefetch", [0, 2])
def test_partial_cache_prepares_bitwise_the_same_rows(particles, prefetch):
    reference = BatchLoader(particles, cache_bytes=0, prefetch=0)
    loaders = {"none": BatchLoader(particles, cache_bytes=0, prefetch=prefetch),
               "partial": BatchLoader(particles, cache_bytes=int(0.3 * N_PARTICLES) * _row_bytes(), prefetch=prefetch),
               "full": BatchLoader(particles, cache_bytes=N_PARTICLES * _row_bytes(), prefetch=prefetch)}
    assert loaders["partial"].cache_rows == int(0.3 * N_PARTICLES)
    assert loaders["full"].cache_rows == N_PARTICLES
    for batches in _passes(N_PARTICLES, 32):
        expected = [reference.prepare(b) for b in batches]
        for name, loader in loaders.items():
            with loader.schedule(batches):
                for b, want in zip(batches, expected):
                    assert _same(loader.prepare(b), want), name
    for name, loader in loaders.items():
        assert loader.cached_rows == loader.cache_rows, name
        if prefetch:
            assert loader.stats["prefetched"] == sum(len(p) for p in _passes(N_PARTICLES, 32))
        loader.cancel()
    partial = loaders["partial"]
    # a fixed set: the first rows prepared (the first pass, in order), never replaced
    assert np.array_equal(np.flatnonzero(partial._slot >= 0), np.arange(partial.cache_rows))
    assert partial._cache["data"].shape == (partial.cache_rows, BOX, BOX)
    assert loaders["none"]._cache is None
    assert not _reader_threads()


def test_preparing_in_chunks_changes_no_bit(particles, monkeypatch):
    """Rows are prepared a few at a time (cache-sized temporaries); the arrays are those of one
    whole-batch computation and of one row at a time."""
    import numba_recon.batch as batch

    loader = BatchLoader(particles, cache_bytes=0, prefetch=0)
    index = np.random.default_rng(1).permutation(N_PARTICLES)[:50]
    results = []
    for chunk_bytes in (1 << 40, 8 * BOX * BOX, 7 * 8 * BOX * BOX, batch.PREP_CHUNK_BYTES):
        monkeypatch.setattr(batch, "PREP_CHUNK_BYTES", chunk_bytes)
        results.append(loader._compute(index))
    for other in results[1:]:
        assert _same(results[0], other)
    assert all(getattr(results[0], k).flags.c_contiguous for k in KEYS)


def _run(runner, star: Path, out: Path, *extra: str) -> None:
    res = runner.invoke(main, ["-q", "run", str(star), "-o", str(out), "--backend", "cpu", "--batch-size", "32",
                               "--overwrite", *extra])
    assert res.exit_code == 0, res.output


def _maps(out: Path) -> list[np.ndarray]:
    import mrcfile

    return [mrcfile.read(out / name) for name in
            ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc")]


@pytest.mark.slow
@pytest.mark.parametrize("solver", [["--epochs", "3", "--no-early-stop"], ["--optimizer", "adam", "--epochs", "2"]],
                         ids=["cg", "adam"])
def test_partial_cache_gives_the_same_maps(data, tmp_path, runner, solver):
    star = data / "particles.star"
    # 0 MB (stream everything), a third of the prepared rows, and everything
    caches = {"none": "0", "partial": f"{N_PARTICLES * _row_bytes() / 3 / 2**20:.6f}", "full": "2048"}
    maps = {}
    for name, mb in caches.items():
        _run(runner, star, tmp_path / name, *solver, "--cache-mb", mb)
        maps[name] = _maps(tmp_path / name)
    for name in ("partial", "full"):
        for a, b in zip(maps["none"], maps[name]):
            assert np.array_equal(a, b), name
    assert _no_reader_left()


# ---------------------------------------------------------------------------------------- read-ahead
def test_prefetch_order_mismatch_falls_back(particles):
    reference = BatchLoader(particles, cache_bytes=0, prefetch=0)
    loader = BatchLoader(particles, cache_bytes=0, prefetch=2)
    a, b, c, d, e = batch_chunks(np.arange(160), 32)
    stranger = np.arange(200, 230)
    ahead = loader.schedule([a, b, c])
    # not announced: prepared here, the schedule untouched
    assert _same(loader.prepare(stranger), reference.prepare(stranger))
    assert loader.stats == {**loader.stats, "synchronous": 1, "prefetched": 0}
    # the consumer skips a and b: c is still the reader's, a (dropped) is prepared here
    assert _same(loader.prepare(c), reference.prepare(c))
    assert loader.stats["prefetched"] == 1
    assert _same(loader.prepare(a), reference.prepare(a))
    assert loader.stats["synchronous"] == 2
    # announcing what continues the pending batches keeps the same reader; anything else replaces it
    again = loader.schedule([d])
    assert again is ahead and ahead.pending() == 1
    assert loader.schedule([d, e]) is ahead and ahead.pending() == 2
    assert _same(loader.prepare(d), reference.prepare(d))
    other = loader.schedule([a, b])
    assert other is not ahead and not ahead.thread.is_alive()
    # the same batch announced twice in a row is prepared twice, in order
    loader.schedule([a, b, a])
    for batch in (a, b, a):
        assert _same(loader.prepare(batch), reference.prepare(batch))
    assert loader.stats["prefetched"] == 5
    loader.cancel()
    assert not loader.reading and not _reader_threads()


def test_prefetched_arrays_follow_the_callers_error_state(particles):
    loader = BatchLoader(particles, cache_bytes=0, prefetch=1)
    batches = batch_chunks(np.arange(64), 32)
    with np.errstate(all="ignore"):
        loader.schedule(batches)
    assert loader._read_ahead._batches[0][1]["invalid"] == "ignore"
    for batch in batches:
        loader.prepare(batch)
    loader.cancel()


def test_reader_exception_surfaces_in_the_caller(particles, monkeypatch):
    compute = BatchLoader._compute
    where: list[str] = []

    def failing(self, index, reader=None):
        if 100 in index:
            where.append(threading.current_thread().name)
            raise InputFileError("image 21 requested but the stack holds 20 images", "stack_002.mrcs", "check it")
        return compute(self, index, reader)

    monkeypatch.setattr(BatchLoader, "_compute", failing)
    loader = BatchLoader(particles, cache_bytes=0, prefetch=2)
    batches = batch_chunks(np.arange(192), 32)  # the 4th batch holds row 100
    loader.schedule(batches)
    for batch in batches[:3]:
        loader.prepare(batch)
    with pytest.raises(InputFileError, match="image 21 requested but the stack holds 20 images") as err:
        loader.prepare(batches[3])
    assert "stack_002.mrcs" in str(err.value)
    assert where == ["numba-recon-reader"]
    assert not loader.reading and not _reader_threads()
    # the loader still works, synchronously
    monkeypatch.setattr(BatchLoader, "_compute", compute)
    loader.prepare(batches[3])


def test_a_stack_truncated_after_the_start_stops_the_reader(data, tmp_path):
    from numba_recon.read import read_particles

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    particles = read_particles(copy / "particles.star")
    loader = BatchLoader(particles, cache_bytes=0, prefetch=2)
    batches = batch_chunks(np.arange(N_PARTICLES), 40)
    loader.prepare(batches[0])  # the run has started: the stacks were read
    victim = Path(particles.stack_paths[-1])
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    loader.schedule(batches[1:])
    with pytest.raises(InputFileError) as err:
        for batch in batches[1:]:
            loader.prepare(batch)
    assert victim.name in str(err.value)
    assert not _reader_threads()


def test_a_failing_run_leaves_no_reader_behind(data, tmp_path, runner, monkeypatch):
    compute = BatchLoader._compute
    calls = {"n": 0}

    def failing(self, index, reader=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise InputFileError("the stack went away", "stack_003.mrcs", "put it back")
        return compute(self, index, reader)

    monkeypatch.setattr(BatchLoader, "_compute", failing)
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(tmp_path / "run"), "--backend",
                               "cpu", "--batch-size", "32", "--cache-mb", "0"])
    assert res.exit_code != 0
    assert "the stack went away" in res.output
    assert not _reader_threads()  # stopped by the pass that saw the exception, not by the idle timeout


def test_interrupt_stops_the_reader(particles):
    loader = BatchLoader(particles, cache_bytes=0, prefetch=2)
    batches = batch_chunks(np.arange(N_PARTICLES), 16)
    with pytest.raises(KeyboardInterrupt):
        with loader.schedule(batches):
            loader.prepare(batches[0])
            raise KeyboardInterrupt
    assert not _reader_threads()


def test_the_reader_ends_with_its_loader(particles):
    loader = BatchLoader(particles, cache_bytes=0, prefetch=2)
    batches = batch_chunks(np.arange(N_PARTICLES), 16)
    loader.schedule(batches)
    loader.prepare(batches[0])
    thread = loader._read_ahead.thread
    del loader
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.slow
def test_memory_is_bounded_by_the_cache_and_the_queue(particles):
    depth, size = 2, 16
    cache_rows = N_PARTICLES // 10
    loader = BatchLoader(particles, cache_bytes=cache_rows * _row_bytes(), prefetch=depth)
    batches = [b for _ in range(3) for b in batch_chunks(np.arange(N_PARTICLES), size)]
    ahead = loader.schedule(batches)
    most = 0
    for batch in batches:
        prep = loader.prepare(batch)
        time.sleep(0.01)  # a slow consumer: the reader fills its queue
        # type(), not isinstance(): the heap may hold weak proxies whose referents are gone, and
        # isinstance() asks them for __class__ (ReferenceError)
        alive = sum(type(o) is PreparedData for o in gc.get_objects())
        # the caller's batch, at most ``depth`` ahead (finished or being prepared), and one batch
        # being assembled from its freshly prepared rows
        most = max(most, alive)
        assert alive <= 1 + depth + 1
        del prep
    assert most >= 2  # the reader did run ahead
    assert ahead.peak_ahead_rows <= depth * size
    assert loader.cached_rows == cache_rows
    assert all(a.shape[0] == cache_rows for a in loader._cache.values())
    loader.cancel()
