"""``--prepare-on``: particles prepared on the device (the backend's ``prepare_particles``) or on
the host (the loader's numpy). The loader's raw mode, the engine's device path on the CPU backend
(the CPU twin is the host arithmetic, so the maps must be bitwise those of the host path), the
option's checks, and the choice ``auto`` makes."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from click.testing import CliRunner

from numba_recon.batch import BatchLoader, PreparedData, RawData
from numba_recon.cli import main
from numba_recon.config import RunConfig
from numba_recon.cpu.prepare import CTF_COLUMNS
from numba_recon.errors import InputError

BOX = 16
N_PARTICLES = 160


@pytest.fixture(scope="module")
def data(simulate) -> Path:
    return simulate(n_particles=N_PARTICLES, box_size=BOX, pixel_size_angstrom=4.0, snr=0.3, max_shift_px=2.0, seed=9,
                    particles_per_stack=60)


@pytest.fixture(scope="module")
def particles(data):
    from numba_recon.read import read_particles

    return read_particles(data / "particles.star")


# ------------------------------------------------------------------------------------------
# the loader's raw mode


def test_raw_loader_gives_the_images_and_their_parameters(particles):
    index = np.array([5, 0, 77, 5, 150])
    raw = BatchLoader(particles, cache_bytes=0, prefetch=0, raw=True).prepare(index)
    assert isinstance(raw, RawData)
    np.testing.assert_array_equal(raw.images, particles.read_images(index).astype(np.float32))
    assert raw.images.dtype == np.float32 and raw.images.flags.c_contiguous
    for k, name in enumerate(CTF_COLUMNS):
        np.testing.assert_array_equal(raw.ctf_params[:, k], np.asarray(particles.ctf[name], np.float64)[index])
    np.testing.assert_array_equal(raw.shifts_px, particles.shifts_px[index])
    np.testing.assert_array_equal(raw.premultiplied, particles.ctf_premultiplied[index])
    np.testing.assert_array_equal(raw.rotations, particles.rotations[index].astype(np.float32))
    host = BatchLoader(particles, cache_bytes=0, prefetch=0).prepare(index)
    assert isinstance(host, PreparedData)


@pytest.mark.parametrize("cached_fraction", [0.0, 0.3, 1.0])
def test_raw_cache_and_read_ahead_give_the_same_rows(particles, cached_fraction):
    """A raw row takes N^2 float32 (half a prepared row); partial caches and the background reader
    change nothing in what a batch holds."""
    row_bytes = BOX * BOX * 4
    loader = BatchLoader(particles, cache_bytes=int(cached_fraction * N_PARTICLES) * row_bytes, prefetch=2, raw=True)
    assert loader.row_bytes == row_bytes
    assert loader.cache_rows == int(cached_fraction * N_PARTICLES)
    reference = BatchLoader(particles, cache_bytes=0, prefetch=0, raw=True)
    batches = [np.arange(k, min(k + 32, N_PARTICLES)) for k in range(0, N_PARTICLES, 32)]
    batches.append(np.array([3, 3, 150, 7]))  # a repeated row, cached and uncached rows mixed
    for _ in range(2):
        with loader.schedule(batches):
            for part in batches:
                got, want = loader.prepare(part), reference.prepare(part)
                for key in ("images", "ctf_params", "shifts_px", "premultiplied", "rotations"):
                    np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
    assert loader.describe()["prepared_on"] == "device"
    loader.cancel()


# ------------------------------------------------------------------------------------------
# the engine: the device path on the CPU backend is the host path, bit for bit


def _maps(out: Path) -> list[np.ndarray]:
    return [mrcfile.read(out / f"run_half{h}_class001_unfil.mrc") for h in (1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--optimizer", "cg", "--epochs", "3", "--loss", "trimmed"],
    ["--optimizer", "adam", "--epochs", "3", "--loss", "reweighted", "--batch-size", "40"],
], ids=["cg-trimmed", "adam-reweighted"])
def test_device_preparation_on_the_cpu_gives_the_host_maps_bitwise(data, tmp_path, args):
    runner = CliRunner()
    outs = {}
    for where in ("host", "device"):
        outs[where] = tmp_path / where
        res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(outs[where]), "--backend",
                                   "cpu", "--prepare-on", where, "--seed", "3", *args])
        assert res.exit_code == 0, res.output
    for a, b in zip(_maps(outs["host"]), _maps(outs["device"])):
        np.testing.assert_array_equal(a, b)
    scores = [(o / "run_data_scores.csv").read_text() for o in outs.values()]
    assert scores[0] == scores[1]  # the norms and noise variances behind the scores are the same too
    summary = json.loads((outs["device"] / "summary.json").read_text())
    assert summary["resolution_angstrom"] == json.loads((outs["host"] / "summary.json").read_text())[
        "resolution_angstrom"]


def test_auto_prepares_on_the_host_for_the_cpu_backend(data, tmp_path):
    from numba_recon.recon.engine import Reconstruction

    job = Reconstruction(RunConfig(particles=str(data / "particles.star"), out_dir=str(tmp_path / "o"),
                                   backend="cpu"), progress=False)
    assert job.prepare_on_device is False and job.loader.raw is False
    job = Reconstruction(RunConfig(particles=str(data / "particles.star"), out_dir=str(tmp_path / "o"),
                                   backend="cpu", prepare_on="device"), progress=False)
    assert job.prepare_on_device is True and job.loader.raw is True


def test_a_bad_choice_is_one_line(data, tmp_path):
    res = CliRunner().invoke(main, ["run", str(data / "particles.star"), "-o", str(tmp_path / "o"), "--prepare-on",
                                    "gpu"])
    assert res.exit_code == 2 and "--prepare-on" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    with pytest.raises(InputError, match="--prepare-on"):
        RunConfig(particles="a.star", out_dir="o", prepare_on="gpu")


@pytest.mark.slow
def test_resume_may_change_where_particles_are_prepared(data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r"
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out), "--backend", "cpu",
                               "--epochs", "1", "--prepare-on", "host"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["-q", "run", "--resume", str(out), "--epochs", "2", "--prepare-on", "device"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["config"]["prepare_on"] == "device"


def test_weight_filters_is_the_host_expression(backend):
    be = backend
    rng = np.random.default_rng(4)
    filters2 = rng.uniform(0, 1, (5, 7, 7)).astype(np.float32)
    plane = rng.uniform(0, 1, (7, 7)).astype(np.float32)
    w = rng.uniform(0.5, 2, 5).astype(np.float32)
    out = be.zeros((5, 7, 7))
    be.weight_filters(be.to_device(filters2), be.to_device(plane), be.to_device(w), out)
    np.testing.assert_array_equal(be.to_host(out), filters2 * plane[None] * w[:, None, None])
    inplace = be.to_device(filters2.copy())
    be.weight_filters(inplace, be.to_device(plane), be.to_device(w), inplace)  # out may be filters2
    np.testing.assert_array_equal(be.to_host(inplace), filters2 * plane[None] * w[:, None, None])
    with pytest.raises(ValueError, match="weights"):
        be.weight_filters(be.to_device(filters2), be.to_device(plane), be.to_device(w[:4]), out)
