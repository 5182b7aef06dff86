"""`numba-recon project`: projections of the simulator's truth at the STAR poses reproduce the
simulated images up to noise; bad inputs give one line and exit status 2.

About 3 s on 2 cores (40 particles, box 32).
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest

from numba_recon.cli import main
from numba_recon.io.mrc import read_volume, write_volume

SNR = 1.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """40 particles (box 32, 4 A/px, SNR 1), 10 of them pure-noise junk; the images as read by the
    reconstruction's reader."""
    from numba_recon.read import read_particles
    from numba_recon.sim.simulate import simulate_dataset

    d = tmp_path_factory.mktemp("project") / "data"
    simulate_dataset(d, n_particles=40, box_size=32, pixel_size_angstrom=4.0, snr=SNR, seed=5, max_shift_px=3.0,
                     junk_fraction=0.25, junk_kinds=("noise",), particles_per_stack=40)
    particles = read_particles(d / "particles.star")
    images = particles.read_images(np.arange(len(particles)))
    junk = pd.read_csv(d / "junk.csv")["is_junk"].to_numpy().astype(bool)
    return d, images, junk


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of images, ``(n,)``."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return np.sum(a * b, axis=1) / np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))


def _project(runner, sim, out, *extra):
    d, _, _ = sim
    res = runner.invoke(main, ["project", str(d / "truth.mrc"), "--star", str(d / "particles.star"), "-o", str(out),
                               *extra])
    assert res.exit_code == 0, res.output
    return mrcfile.read(out)


def test_projections_of_the_truth_match_the_images(sim, runner, tmp_path):
    _, images, junk = sim
    model = _project(runner, sim, tmp_path / "model.mrcs")
    assert model.shape == images.shape and model.dtype == np.float32
    with mrcfile.open(tmp_path / "model.mrcs") as mrc:
        assert mrc.voxel_size.x == pytest.approx(4.0)
    c = _corr(model, images)
    good = c[~junk]
    # the image is model + unit noise at SNR 1: the ideal correlation is sqrt(SNR / (1 + SNR)) = 0.71;
    # the voxel-splat projection of the sampled truth loses a little to interpolation
    ideal = np.sqrt(SNR / (1 + SNR))
    assert 0.85 * ideal < good.mean() <= ideal + 0.02
    assert good.min() > 0.5
    # chance level: pure-noise junk and images paired with the wrong particle
    assert np.abs(c[junk]).max() < 0.15
    wrong = _corr(model[~junk], np.roll(images[~junk], 1, axis=0))
    assert np.abs(wrong).mean() < 0.5 * good.mean()


def test_ctf_and_shift_conventions_matter(sim, runner, tmp_path):
    # leaving out the CTF or the origin shifts makes the match clearly worse, so both are applied
    # with the simulator's (RELION's) conventions, not merely present
    _, images, junk = sim
    full = _corr(_project(runner, sim, tmp_path / "a.mrcs"), images)[~junk].mean()
    no_ctf = _corr(_project(runner, sim, tmp_path / "b.mrcs", "--no-ctf"), images)[~junk].mean()
    no_shift = _corr(_project(runner, sim, tmp_path / "c.mrcs", "--no-shift"), images)[~junk].mean()
    assert no_ctf < full - 0.1 and no_shift < full - 0.1, (full, no_ctf, no_shift)


def test_first_n(sim, runner, tmp_path):
    model = _project(runner, sim, tmp_path / "first.mrcs", "--first", "5")
    full = _project(runner, sim, tmp_path / "all.mrcs")
    assert model.shape[0] == 5
    np.testing.assert_allclose(model, full[:5], rtol=0, atol=1e-6 * np.abs(full).max())


@pytest.fixture(scope="module")
def bad_maps(sim, tmp_path_factory):
    d, _, _ = sim
    truth, angpix = read_volume(d / "truth.mrc")
    out = tmp_path_factory.mktemp("bad")
    write_volume(out / "box24.mrc", truth[4:28, 4:28, 4:28], angpix)
    write_volume(out / "angpix.mrc", truth, 5.0)
    (out / "garbage.mrc").write_bytes(b"not an MRC file at all")
    return out


@pytest.mark.parametrize("map_name,star_name,fragments", [
    ("box24.mrc", None, ["box24.mrc", "map box 24 differs from the particle box 32"]),
    ("angpix.mrc", None, ["angpix.mrc", "voxel size", "5.0000", "4.0000"]),
    ("missing.mrc", None, ["missing.mrc"]),
    ("garbage.mrc", None, ["garbage.mrc"]),
    (None, "missing.star", ["missing.star"]),
])
def test_bad_inputs_one_line_exit_2(sim, bad_maps, runner, tmp_path, map_name, star_name, fragments,
                                    assert_one_line_error):
    d, _, _ = sim
    map_path = d / "truth.mrc" if map_name is None else bad_maps / map_name
    star = d / "particles.star" if star_name is None else tmp_path / star_name
    out = tmp_path / "model.mrcs"
    res = runner.invoke(main, ["project", str(map_path), "--star", str(star), "-o", str(out)])
    assert_one_line_error(res, *fragments)
    assert not out.exists()


def test_existing_output_needs_overwrite(sim, runner, tmp_path, assert_one_line_error):
    d, _, _ = sim
    out = tmp_path / "model.mrcs"
    out.write_bytes(b"keep")
    args = ["project", str(d / "truth.mrc"), "--star", str(d / "particles.star"), "-o", str(out), "--first", "2"]
    assert_one_line_error(runner.invoke(main, args), "model.mrcs", "--overwrite")
    assert out.read_bytes() == b"keep"
    res = runner.invoke(main, args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert mrcfile.read(out).shape == (2, 32, 32)


def test_bad_first(sim, runner, tmp_path, assert_one_line_error):
    d, _, _ = sim
    res = runner.invoke(main, ["project", str(d / "truth.mrc"), "--star", str(d / "particles.star"),
                               "-o", str(tmp_path / "m.mrcs"), "--first", "0"])
    assert_one_line_error(res, "--first")
