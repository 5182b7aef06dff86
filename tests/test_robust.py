"""Robust losses: weights, schedules, rank independence, junk detection, STAR outputs, `select`."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from numba_recon.loss import (
    RobustSchedule,
    canonical_loss,
    particle_scores,
    final_particle_weights,
    good_population,
    reweighted_weights,
    robust_weights,
    threshold_weights,
    trimmed_weights,
)


def test_loss_names():
    assert canonical_loss("sorted") == "trimmed"
    assert canonical_loss("L2") == "l2"
    with pytest.raises(ValueError):
        canonical_loss("huber")


def test_trimmed_keeps_the_best_fraction():
    scores = np.array([0.3, -0.2, 0.1, -0.5, 0.9, 0.0])
    w = trimmed_weights(scores, 0.5)
    assert w.tolist() == [0, 1, 0, 1, 0, 1]
    assert trimmed_weights(scores, 1.0).sum() == 6
    assert trimmed_weights(scores, 0.01).sum() == 1  # never empty
    # ties broken by position, identically everywhere
    assert trimmed_weights(np.zeros(4), 0.5).tolist() == [1, 1, 0, 0]


def test_keep_fraction_schedule():
    s = RobustSchedule(loss="trimmed", keep_start=0.5, keep_end=0.8, warmup_epochs=2, epochs=8)
    assert not s.active(0) and not s.active(1) and s.active(2)
    assert s.keep_fraction(2) == pytest.approx(0.5)
    assert s.keep_fraction(7) == pytest.approx(0.8)
    assert s.keep_fraction(5) == pytest.approx(0.5 + 0.3 * 3 / 5)
    assert not RobustSchedule(loss="l2").active(10)


@pytest.mark.parametrize("junk_fraction", [0.0, 0.2, 0.5])
def test_good_population_is_robust_to_junk(junk_fraction):
    rng = np.random.default_rng(1)
    n = 4000
    n_junk = int(junk_fraction * n)
    scores = np.concatenate([rng.normal(-0.1, 0.01, n - n_junk), rng.normal(0.1, 0.01, n_junk)])
    centre, spread = good_population(scores)
    assert abs(centre - (-0.1)) < 0.015
    assert 0.007 < spread < 0.02
    kept = threshold_weights(scores, centre + 3 * spread)
    assert kept[: n - n_junk].mean() > 0.99  # good particles are kept
    if n_junk:
        assert kept[n - n_junk:].mean() == 0.0  # junk is dropped


def test_reweighted_weights_downweight_outliers():
    rng = np.random.default_rng(0)
    good = rng.normal(-0.1, 0.01, 500)
    junk = rng.normal(0.1, 0.01, 500)
    scores = np.concatenate([good, junk])
    centre, spread = good_population(scores)
    w1 = reweighted_weights(scores, centre, spread, power=1.0)
    assert w1.mean() == pytest.approx(1.0)
    assert np.median(w1[:500]) > 5 * np.median(w1[500:])
    # on good particles alone the weights stay close to uniform (little loss of efficiency)
    wc = reweighted_weights(good, *good_population(good), power=1.0)
    assert wc.sum() ** 2 / (wc.size * (wc**2).sum()) > 0.95
    w_half = reweighted_weights(scores, centre, spread, power=0.5)
    # a smaller power is gentler
    assert np.median(w_half[:500]) / np.median(w_half[500:]) < np.median(w1[:500]) / np.median(w1[500:])


def test_robust_weights_follow_the_schedule():
    rng = np.random.default_rng(2)
    scores = rng.normal(0, 1, 100)
    auto = RobustSchedule(loss="trimmed", warmup_epochs=1, epochs=5)
    assert auto.automatic
    w, q = robust_weights(scores, auto, 0, None)
    assert q == 1.0 and w.sum() == 100  # warm-up: plain L2
    fixed = RobustSchedule(loss="trimmed", keep_start=0.5, keep_end=0.5, warmup_epochs=1, epochs=5)
    w, q = robust_weights(scores, fixed, 2, None)
    assert w.sum() == 50 and q == 0.5
    halves = np.array([1, 2] * 50)
    weights, kept = final_particle_weights(scores, halves, fixed)
    assert kept[halves == 1].sum() == 25 and kept[halves == 2].sum() == 25


def test_scores_are_normalised_by_model_energy():
    rng = np.random.default_rng(4)
    model = rng.standard_normal((3, 16, 16))
    noise = rng.standard_normal((3, 16, 16))
    scale = np.array([0.2, 1.0, 5.0])[:, None, None]  # different CTF / signal levels
    images = [scale * model + 0.1 * noise, 0.1 * noise, scale * model[:, ::-1, :] + 0.1 * noise]
    scores = []
    for b in images:
        m = scale * model
        loss = ((m - b) ** 2).sum(axis=(1, 2))
        scores.append(particle_scores(loss, (b**2).sum(axis=(1, 2)), (m**2).sum(axis=(1, 2))))
    good, pure_noise, wrong = scores
    np.testing.assert_allclose(good, -1.0, atol=0.1)       # a fit scores -1 whatever its scale
    np.testing.assert_allclose(pure_noise, 1.0, atol=0.1)  # noise scores +1
    assert np.all(wrong > -0.5)
    assert particle_scores(np.array([5.0]), np.array([5.0]), np.array([0.0]))[0] == 0.0


def _simulate(path: Path, junk_fraction: float, kind: str, n: int = 500, snr: float = 0.5) -> Path:
    from numba_recon.sim.simulate import simulate_dataset

    simulate_dataset(path, n_particles=n, box_size=24, pixel_size_angstrom=4.0, snr=snr, junk_fraction=junk_fraction,
                     junk_kinds=[kind], max_shift_px=1.0, seed=3, particles_per_stack=250, overwrite=True)
    return path / "particles.star"


def _auc(scores, is_junk):
    from scipy.stats import rankdata

    r = rankdata(scores)
    n1, n0 = is_junk.sum(), (~is_junk).sum()
    return (r[is_junk].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("junk"), 0.4, "noise")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["trimmed", "reweighted"])
def test_robust_runs_separate_junk_and_write_star(noisy_set, tmp_path, runner, loss):
    from numba_recon.cli import main
    from numba_recon.io.star import read_particle_scores, read_star

    out = tmp_path / loss
    res = runner.invoke(main, ["-q", "run", str(noisy_set), "-o", str(out), "--epochs", "5", "--backend", "cpu",
                               "--loss", loss, "--robust-warmup", "2", "--batch-size", "100"])
    assert res.exit_code == 0, res.output
    # image names as in the input: relative to the input's folder
    data = read_star(out / "run_data.star", root=noisy_set.parent)
    assert len(data) == 500
    assert not [c for c in data.table.columns if c.startswith("rlnNumbaRecon")]  # RELION labels only
    found = read_particle_scores(out / "run_data.star", data.table)
    for col in ("loss", "score", "weight", "kept", "half_set", "cross_validation"):
        assert col in found.columns
    np.testing.assert_array_equal(found["half_set"].to_numpy(), data.half_set)  # written as rlnRandomSubset
    # every input column survives
    original = read_star(noisy_set)
    assert set(original.table.columns) <= set(data.table.columns)
    junk = np.genfromtxt(noisy_set.parent / "junk.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    is_junk = np.asarray(junk["is_junk"], bool)
    auc = _auc(found["score"].to_numpy(np.float64), is_junk)
    assert auc >= 0.95, auc
    kept = found["kept"].to_numpy().astype(bool)
    assert kept[~is_junk].mean() > kept[is_junk].mean() + 0.4
    assert (out / "plots" / "scores.png").is_file()
    # select a cleaned STAR file and read it back
    clean = tmp_path / f"clean_{loss}.star"
    res = runner.invoke(main, ["select", str(out / "run_data.star"), "--keep-fraction", "0.6", "-o", str(clean)])
    assert res.exit_code == 0, res.output
    sel = read_star(clean, root=noisy_set.parent)  # the names of run_data.star, unchanged
    assert len(sel) == 300
    assert set(sel.table["rlnImageName"]) <= set(data.table["rlnImageName"])
    names = set(sel.table["rlnImageName"])
    rows = [i for i, name in enumerate(data.table["rlnImageName"]) if name in names]
    assert len(rows) == 300
    assert is_junk[rows].mean() < 0.15


def test_select_bad_input(tmp_path, runner, noisy_set):
    from numba_recon.cli import main

    res = runner.invoke(main, ["select", str(noisy_set), "--keep-fraction", "0.5", "-o", str(tmp_path / "x.star")])
    assert res.exit_code == 2 and "rlnNumbaReconScore" in res.output
    res = runner.invoke(main, ["select", str(noisy_set), "--keep-fraction", "1.5", "-o", str(tmp_path / "x.star")])
    assert res.exit_code == 2
    assert not (tmp_path / "x.star").exists()


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec: install the mpich extra")
@pytest.mark.parametrize("loss", ["trimmed", "reweighted"])
def test_robust_losses_do_not_depend_on_rank_count(noisy_set, tmp_path, loss, cli):
    common = ["-q", "run", str(noisy_set), "--epochs", "3", "--backend", "cpu", "--batch-size", "100", "--loss", loss,
              "--robust-warmup", "1"]
    r1 = cli([*common, "-o", str(tmp_path / "r1")])
    assert r1.returncode == 0, r1.stderr
    r2 = cli([*common, "-o", str(tmp_path / "r2")], mpi=2)
    assert r2.returncode == 0, r2.stderr
    for h in (1, 2):
        a = mrcfile.read(tmp_path / "r1" / f"run_half{h}_class001_unfil.mrc")
        b = mrcfile.read(tmp_path / "r2" / f"run_half{h}_class001_unfil.mrc")
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-5
    import pandas as pd

    k1 = pd.read_csv(tmp_path / "r1" / "run_data_scores.csv", comment="#")["kept"].to_numpy()
    k2 = pd.read_csv(tmp_path / "r2" / "run_data_scores.csv", comment="#")["kept"].to_numpy()
    assert (k1 == k2).mean() > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("loss,keep", [("trimmed", ["--keep-fraction", "0.5:0.5"]), ("reweighted", [])])
def test_robust_losses_on_the_cuda_backend_in_the_simulator(tmp_path, runner, loss, keep):
    from numba_recon.cli import main

    from numba_recon.sim.simulate import simulate_dataset

    simulate_dataset(tmp_path / "tiny10", n_particles=16, box_size=10, pixel_size_angstrom=6.0, snr=1.0,
                     junk_fraction=0.5, junk_kinds=["noise"], max_shift_px=1.0, seed=3, overwrite=True)
    star = tmp_path / "tiny10" / "particles.star"
    out = tmp_path / "recon"
    res = runner.invoke(main, ["-q", "run", str(star), "-o", str(out), "--epochs", "2", "--backend", "cuda",
                               "--batch-size", "8", "--cv-fraction", "0", "--loss", loss, "--robust-warmup", "1",
                               *keep])
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(out / "run_data_scores.csv", comment="#")
    weights = table["weight"].to_numpy()
    assert np.isfinite(table["score"].to_numpy()).all()
    if loss == "trimmed":
        assert 0 < table["kept"].to_numpy().sum() < 16
    else:
        assert weights.min() < weights.max()  # the weights differ between particles
