"""Point-group symmetry in reconstructions: the exact projection onto symmetric maps, and D7 runs on
simulated D7 data (finer resolution than C1, invariant maps, independent half maps).

About 30 s on 2 cores: one simulated set (box 32), a C1 run and two D7 runs of 3 epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.io.mrc import read_volume
from numba_recon.symmetry.subspace import SymmetricSubspace, project_to_group, symmetric_subspace
from numba_recon.symmetry.groups import interpolation_invariance_errors, symmetrize_volume, symmetry_operators

BOX = 32
ANGPIX = 3.0


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# The projection itself
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def d7_space() -> SymmetricSubspace:
    return symmetric_subspace(BOX, "D7")


@pytest.mark.slow
def test_projection_is_idempotent_and_exactly_invariant(d7_space, rng):
    x = rng.standard_normal((BOX,) * 3).astype(np.float32)
    y = d7_space.project(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert d7_space.last.relative_residual <= 1e-7
    # projecting again changes nothing (an orthogonal projection; solver tolerance 1e-7)
    assert _rel(d7_space.project(y), y) < 1e-5
    # invariant under each of the 14 operators, measured with the map's own symmetric interpolant
    errors = d7_space.invariance_errors(y)
    assert errors.shape == (14,) and errors.max() < 1e-5
    # the same measurement fails for a map that is not symmetric: every operator sees its distance
    assert d7_space.invariance_errors(x).min() > 0.5
    # an orthogonal projection of white noise keeps about 1/G of its power (here less: the basis
    # is smooth at the voxel scale), and the residual is orthogonal to the projection
    kept = float(np.sum(y.astype(np.float64) ** 2) / np.sum(x.astype(np.float64) ** 2))
    assert 0.01 < kept < 1.0 / 14
    assert abs(float(np.vdot(y.astype(np.float64), x - y))) < 1e-4 * float(np.vdot(x, x))


def test_basis_functions_are_invariant_off_the_grid(d7_space, rng):
    # the interpolant is exactly invariant everywhere in space, not only at voxel centres
    a = rng.standard_normal(d7_space.n_functions)
    pts = rng.uniform(-12, 12, size=(500, 3))
    ref = d7_space.evaluate(a, pts)
    for g in symmetry_operators("D7"):
        np.testing.assert_allclose(d7_space.evaluate(a, pts @ g.T), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    # and it interpolates the map it came from
    grid = d7_space.synthesize(a)
    c = BOX // 2
    vox = np.array([[3, -5, 7], [0, 0, 0], [-9, 2, 4]])
    np.testing.assert_allclose(d7_space.evaluate(a, vox), grid[vox[:, 2] + c, vox[:, 1] + c, vox[:, 0] + c],
                               rtol=1e-12, atol=1e-12)


def test_projection_keeps_a_symmetric_object(d7_space):
    # the D7 phantom, sampled on the grid, is almost unchanged (as much as by trilinear averaging)
    from numba_recon.evaluate.filters import lowpass
    from numba_recon.sim.phantom import fit_to_box, proteasome_blobs, render_volume

    truth = render_volume(fit_to_box(proteasome_blobs(0), BOX, ANGPIX), BOX, ANGPIX)
    truth = lowpass(truth, 3.0 * ANGPIX, ANGPIX)
    ops = symmetry_operators("D7")
    err_projection = _rel(d7_space.project(truth), truth)
    err_trilinear = _rel(symmetrize_volume(truth, ops), truth)
    assert err_projection < 0.1
    assert err_projection < 1.5 * err_trilinear
    # trilinear averaging is not a projection: a second pass moves the map again
    once = symmetrize_volume(truth, ops)
    assert _rel(symmetrize_volume(once, ops), once) > 1e-2


@pytest.mark.parametrize("group", ["C4", "T", "I"])
def test_other_groups(group, rng):
    n = 20
    y = project_to_group(rng.standard_normal((n, n, n)).astype(np.float32), group)
    space = symmetric_subspace(n, group)
    assert space.invariance_errors(y).max() < 1e-5
    assert len(space.invariance_errors(y)) == len(symmetry_operators(group))


def test_c1_projection_is_the_identity(rng):
    x = rng.standard_normal((16, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(project_to_group(x, "C1"), x)


# ---------------------------------------------------------------------------------------------
# Reconstructions
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def d7_data(tmp_path_factory) -> Path:
    """1500 particles of the D7 phantom, box 32, 3 A/px, SNR 0.005 (symmetry matters at this noise)."""
    from numba_recon.sim.simulate import simulate_dataset

    path = tmp_path_factory.mktemp("d7") / "data"
    simulate_dataset(path, n_particles=1500, box_size=BOX, pixel_size_angstrom=ANGPIX, snr=0.005, max_shift_px=2.0,
                     seed=3, particles_per_stack=750)
    return path


def _run(runner, star: Path, out: Path, sym: str, optimizer: str = "cg") -> dict:
    res = runner.invoke(main, ["-q", "run", str(star), "-o", str(out), "--epochs", "3", "--batch-size", "187",
                               "--backend", "cpu", "--sym", sym, "--optimizer", optimizer, "--no-early-stop"])
    assert res.exit_code == 0, res.output
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(d7_data, tmp_path_factory):
    from click.testing import CliRunner

    runner = CliRunner()
    base = tmp_path_factory.mktemp("runs")
    runs = {sym: (base / sym, _run(runner, d7_data / "particles.star", base / sym, sym)) for sym in ("C1", "D7")}
    runs["D7-adam"] = (base / "D7-adam", _run(runner, d7_data / "particles.star", base / "D7-adam", "D7", "adam"))
    return runs


@pytest.mark.slow
def test_d7_reaches_a_finer_resolution_than_c1(runs, d7_data):
    from numba_recon.evaluate.fsc import fsc, resolution_at

    res = {sym: summary["resolution_angstrom"] for sym, (_, summary) in runs.items() if sym in ("C1", "D7")}
    # same particles, same epochs: 14 copies of every view average the noise down
    assert res["D7"] < 0.85 * res["C1"], res
    assert res["D7"] > 2 * ANGPIX  # not simply Nyquist: the comparison is meaningful
    # and the gain is real, not only self-consistency of the half maps: compare with the truth
    truth, _ = read_volume(d7_data / "truth.mrc")
    vs_truth = {}
    for sym, (out, _) in runs.items():
        if sym not in ("C1", "D7"):
            continue
        h1, _ = read_volume(out / "run_half1_class001_unfil.mrc")
        h2, _ = read_volume(out / "run_half2_class001_unfil.mrc")
        vs_truth[sym] = resolution_at(fsc(0.5 * (h1 + h2), truth), BOX, ANGPIX, 0.5)
    assert vs_truth["D7"] < vs_truth["C1"], vs_truth
    sym_info = runs["D7"][1]["symmetry"]
    assert sym_info["group"] == "D7" and sym_info["operators"] == 14


@pytest.mark.slow
def test_adam_d7_maps_are_exactly_invariant_under_the_14_operators(runs):
    out, _ = runs["D7-adam"]
    space = symmetric_subspace(BOX, "D7")
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_class001.mrc"):
        vol, _ = read_volume(out / name)
        errors = space.invariance_errors(vol)
        assert errors.max() < 1e-5, (name, errors)
    # the C1 reconstruction of the same particles is not symmetric by this measure
    c1, _ = read_volume(runs["C1"][0] / "run_class001.mrc")
    assert space.invariance_errors(c1).min() > 0.1


@pytest.mark.slow
def test_cg_d7_maps_are_group_averages(runs):
    """The default solver writes group averages: they change under the 14 operators no more than the
    exact phantom sampled on the grid does (trilinear resampling), and far less than the C1 map."""
    from numba_recon.sim.phantom import fit_to_box, proteasome_blobs, render_volume

    ops = symmetry_operators("D7")
    phantom = render_volume(fit_to_box(proteasome_blobs(0), BOX, ANGPIX), BOX, ANGPIX)
    limit = interpolation_invariance_errors(phantom, ops).max()
    out, summary = runs["D7"]
    assert summary["symmetry"]["final_maps"] == "group average"
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_class001.mrc"):
        vol, _ = read_volume(out / name)
        assert interpolation_invariance_errors(vol, ops).max() < limit, name
    c1, _ = read_volume(runs["C1"][0] / "run_class001.mrc")
    assert interpolation_invariance_errors(c1, ops).max() > 1.5 * limit


@pytest.mark.slow
def test_exact_projection_of_regularised_maps_would_inflate_the_fsc(runs):
    """Why the default solver does not project its maps exactly: the projection copies
    low-resolution signal into high-resolution shells identically in both halves."""
    from numba_recon.evaluate.fsc import fsc

    out, _ = runs["D7"]
    h1, _ = read_volume(out / "run_half1_class001_unfil.mrc")
    h2, _ = read_volume(out / "run_half2_class001_unfil.mrc")
    space = symmetric_subspace(BOX, "D7")
    top = slice(BOX // 2 - 3, BOX // 2 + 1)
    assert fsc(space.project(h1), space.project(h2))[top].mean() > fsc(h1, h2)[top].mean() + 0.05


@pytest.mark.slow
def test_iterates_stay_close_to_the_point_group(runs):
    # the checkpointed half maps (before the final projection) were constrained during the run, not
    # only at the end; measured at low resolution, where the noise does not dominate
    from numba_recon.checkpoint import load_latest
    from numba_recon.evaluate.filters import lowpass

    space = symmetric_subspace(BOX, "D7")
    dist = {}
    for sym in ("C1", "D7"):
        ckpt = load_latest(runs[sym][0])
        low = [lowpass(v, 4 * ANGPIX, ANGPIX).astype(np.float64) for v in ckpt.volumes]
        dist[sym] = [_rel(space.project(v), v) for v in low]
    assert max(dist["D7"]) < 0.5 * min(dist["C1"]), dist


def _scramble_half2(star: Path, out: Path) -> None:
    """Copy a STAR file, giving every half-2 particle the image of another half-2 particle; every
    other character of the file stays the same (a rewrite through a table would round numbers)."""
    lines = star.read_text().splitlines()
    start = lines.index("data_particles")
    labels = [i for i in range(start, len(lines)) if lines[i].startswith("_rln")]
    names = [lines[i].split()[0] for i in labels]
    col_image, col_half = names.index("_rlnImageName"), names.index("_rlnRandomSubset")
    rows = [i for i in range(labels[-1] + 1, len(lines)) if lines[i].strip()]
    half2 = [i for i in rows if lines[i].split()[col_half] == "2"]
    images = [lines[i].split()[col_image] for i in half2]
    for i, image in zip(half2, images[1:] + images[:1]):
        fields = lines[i].split()
        fields[col_image] = image
        lines[i] = " ".join(fields)
    out.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_half_maps_stay_independent(runs, d7_data, tmp_path, runner):
    # wrong images for every particle of half set 2
    star = d7_data / "half2_scrambled.star"
    _scramble_half2(d7_data / "particles.star", star)
    # adam: half map 1 must not change by a single bit
    out = tmp_path / "scrambled-adam"
    _run(runner, star, out, "D7", "adam")
    ref = runs["D7-adam"][0]
    a, _ = read_volume(ref / "run_half1_class001_unfil.mrc")
    b, _ = read_volume(out / "run_half1_class001_unfil.mrc")
    np.testing.assert_array_equal(a, b)
    a2, _ = read_volume(ref / "run_half2_class001_unfil.mrc")
    b2, _ = read_volume(out / "run_half2_class001_unfil.mrc")
    assert _rel(b2, a2) > 0.1
    # cg: the halves share only the FSC curve (the learned prior) and the support, so a junk half 2
    # leaves half 1 nearly as it was, and the resolution collapses instead of being inflated
    out = tmp_path / "scrambled-cg"
    summary = _run(runner, star, out, "D7")
    a, _ = read_volume(runs["D7"][0] / "run_half1_class001_unfil.mrc")
    b, _ = read_volume(out / "run_half1_class001_unfil.mrc")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8
    assert summary["resolution_angstrom"] > 2 * runs["D7"][1]["resolution_angstrom"]
