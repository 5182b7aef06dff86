"""The phantom, its analytic and Fourier projections, and the data simulator (library and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from numba_recon.ctf import ctf_images
from numba_recon.errors import InputError, OutputError
from numba_recon.geometry import euler_to_matrix, random_rotations
from numba_recon.sim.phantom import (
    Blobs,
    FourierProjector,
    fit_scales,
    fit_to_box,
    project_blobs,
    project_volume_accurate,
    proteasome_blobs,
    random_blob_object,
    render_volume,
)
from numba_recon.sim.simulate import apply_ctf_and_shift, clean_images, draw_plan, simulate_dataset
from numba_recon.symmetry.groups import symmetry_operators

# --- phantom --------------------------------------------------------------------------------


def test_phantom_is_deterministic_and_seeded():
    a, b, c = proteasome_blobs(0), proteasome_blobs(0), proteasome_blobs(1)
    np.testing.assert_array_equal(a.centres_angstrom, b.centres_angstrom)
    np.testing.assert_array_equal(a.sigmas_angstrom, b.sigmas_angstrom)
    assert len(a) == len(c) and not np.allclose(a.centres_angstrom, c.centres_angstrom)


def test_phantom_blob_set_is_exactly_d7_symmetric():
    ph = proteasome_blobs(0)
    key = np.column_stack([ph.centres_angstrom, ph.sigmas_angstrom, ph.amplitudes])
    order = np.lexsort(np.round(key, 6).T)
    for g in symmetry_operators("D7"):
        moved = ph.apply(g)
        k2 = np.column_stack([moved.centres_angstrom, moved.sigmas_angstrom, moved.amplitudes])
        np.testing.assert_allclose(k2[np.lexsort(np.round(k2, 6).T)], key[order], atol=1e-6)
    # and not symmetric under an operator outside D7 (the 2-fold about Y)
    moved = ph.apply(np.diag([-1.0, 1.0, -1.0]))
    d = np.linalg.norm(moved.centres_angstrom[:, None] - ph.centres_angstrom[None], axis=2).min(axis=1)
    assert np.median(d) > 0.5


def test_phantom_size_and_high_resolution_content():
    ph = proteasome_blobs(0)
    c, s = ph.centres_angstrom, ph.sigmas_angstrom
    length = 2 * np.max(np.abs(c[:, 2]) + 2 * s)
    width = 2 * np.max(np.hypot(c[:, 0], c[:, 1]) + 2 * s)
    assert 140 < length < 160 and 100 < width < 120
    assert np.mean(s <= 1.8) > 0.9 and s.min() >= 1.0
    # spherically averaged power at 5 A and 4.2 A relative to 20 A (a sigma >= 4 A phantom gives < 1e-9)
    n, pix = 96, 2.0
    power = np.abs(np.fft.fftn(render_volume(ph, n, pix))) ** 2
    k = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.fft.fftfreq(n) / pix] * 3, indexing="ij")))

    def shell(res):
        return power[np.abs(k - 1 / res) < 0.5 / (n * pix)].mean()

    assert shell(5.0) / shell(20.0) > 1e-4
    assert shell(4.2) / shell(20.0) > 1e-5


def test_fit_to_box_scales_centres_only():
    ph = proteasome_blobs(0)
    assert fit_scales(ph, 128, 2.0) == (1.0, 1.0) and fit_to_box(ph, 128, 2.0) is ph
    small = fit_to_box(ph, 64, 2.0)
    assert small.extent_angstrom() == pytest.approx(0.8 * 32 * 2.0)
    np.testing.assert_array_equal(small.sigmas_angstrom, ph.sigmas_angstrom)
    other = fit_to_box(random_blob_object(0), 64, 2.0)
    assert other.extent_angstrom() <= 0.8 * 64 + 1e-9
    # a box too small for the widths scales everything
    tiny = fit_to_box(ph, 16, 2.0)
    c_scale, s_scale = fit_scales(ph, 16, 2.0)
    assert s_scale == c_scale < 1.0 and tiny.extent_angstrom() == pytest.approx(0.8 * 16)


def test_render_volume_axes_and_centre():
    n, pix = 20, 1.5
    vol = render_volume(Blobs([[3 * pix, -2 * pix, 1 * pix]], [1.2 * pix], [2.0]), n, pix)
    assert vol.shape == (n, n, n) and vol.dtype == np.float32
    c = n // 2
    assert np.unravel_index(vol.argmax(), vol.shape) == (c + 1, c - 2, c + 3)  # [z, y, x]
    assert vol[c + 1, c - 2, c + 3] == pytest.approx(2.0, rel=1e-6)
    assert vol[c + 1, c - 2, c + 4] == pytest.approx(2.0 * np.exp(-0.5 / 1.2**2), rel=1e-6)


@pytest.mark.parametrize("n,pix", [(40, 1.0), (41, 2.0)])
def test_analytic_projection_equals_sum_of_rendered_volume(n, pix):
    rng = np.random.default_rng(3)
    blobs = Blobs(rng.uniform(-5, 5, (20, 3)) * pix, rng.uniform(2, 3, 20) * pix, rng.uniform(0.5, 1, 20))
    along_z = render_volume(blobs, n, pix).sum(axis=0)
    proj = project_blobs(blobs, np.eye(3)[None], n, pix)[0]
    assert np.abs(proj - along_z).max() / np.abs(along_z).max() < 1e-3


@pytest.mark.parametrize("angles,voxel,image", [
    ((90, 0, 0), (5, 0, 0), (0, -5)),
    ((0, 90, 0), (0, 0, 5), (-5, 0)),
    ((0, 90, 0), (0, 5, 0), (0, 5)),
    ((0, 0, 90), (5, 0, 0), (0, -5)),
    ((30, 60, 90), (1, 2, 3), (1.232051, 1.665064)),
])
def test_projected_blob_position_follows_splat_table(angles, voxel, image):
    # conventions.md 1.3: a voxel at offset r lands at image offset ((A r)_x, (A r)_y)
    n, pix = 32, 1.0
    blob = Blobs([voxel], [1.5], [1.0])
    img = project_blobs(blob, euler_to_matrix(*angles)[None], n, pix)[0].astype(np.float64)
    yy, xx = np.mgrid[:n, :n] - n // 2
    centroid = (np.sum(img * xx) / img.sum(), np.sum(img * yy) / img.sum())
    np.testing.assert_allclose(centroid, image, atol=1e-5)
    # the 1D integral along the beam in pixel units: total = amp * (2 pi)^(3/2) * sigma_px^3
    assert img.sum() == pytest.approx((2 * np.pi) ** 1.5 * 1.5**3, rel=1e-5)


@pytest.mark.parametrize("n", [32, 33])
def test_fourier_projector_matches_analytic_projection(n):
    rng = np.random.default_rng(4)
    pix = 1.0
    blobs = Blobs(rng.uniform(-6, 6, (25, 3)), rng.uniform(1.5, 3.0, 25), rng.uniform(0.5, 1, 25))
    rot = random_rotations(6, rng)
    ref = project_blobs(blobs, rot, n, pix).astype(np.float64)
    got = project_volume_accurate(render_volume(blobs, n, pix), rot)
    assert got.shape == (6, n, n) and got.dtype == np.float32
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02
    # without padding the Fourier slice is visibly worse: the oversampling is doing the work
    coarse = FourierProjector(render_volume(blobs, n, pix), oversample=1).project(rot)
    assert np.linalg.norm(coarse - ref) > 3 * np.linalg.norm(got - ref)


# --- forward model ---------------------------------------------------------------------------


def test_origin_sign_moves_particle_opposite():
    # conventions.md 2.3: identity pose, rlnOriginX = +3, rlnOriginY = -2 -> column N//2 - 3, row N//2 + 2
    n = 32
    proj = project_blobs(Blobs([[0.0, 0.0, 0.0]], [0.6], [1.0]), np.eye(3)[None], n, 1.0)
    img = apply_ctf_and_shift(proj, np.array([[3.0, -2.0]]), None, 1.0)[0]
    assert np.unravel_index(img.argmax(), img.shape) == (n // 2 + 2, n // 2 - 3)
    np.testing.assert_allclose(img, np.roll(proj[0], (2, -3), axis=(0, 1)), atol=1e-6)
    # sub-pixel: the centroid moves by -origin
    proj = project_blobs(Blobs([[0.0, 0.0, 0.0]], [2.0], [1.0]), np.eye(3)[None], n, 1.0)
    img = apply_ctf_and_shift(proj, np.array([[0.5, -1.25]]), None, 1.0)[0]
    yy, xx = np.mgrid[:n, :n] - n // 2
    np.testing.assert_allclose([np.sum(img * xx) / img.sum(), np.sum(img * yy) / img.sum()], [-0.5, 1.25],
                               atol=1e-4)


def test_ctf_keeps_protein_white_at_low_frequency():
    # RELION's CTF is +Q0 at k = 0: the image integral is Q0 times the projection integral
    n, pix = 32, 2.0
    proj = project_blobs(Blobs([[0.0, 0.0, 0.0]], [4.0], [1.0]), np.eye(3)[None], n, pix).astype(np.float64)
    params = {"defocus_u_angstrom": [15000.0], "defocus_v_angstrom": [14800.0], "defocus_angle_deg": [30.0],
              "voltage_kv": [300.0], "cs_mm": [2.7], "amplitude_contrast": [0.1]}
    img = apply_ctf_and_shift(proj, np.zeros((1, 2)), params, pix)[0]
    assert img.sum() == pytest.approx(0.1 * proj.sum(), rel=1e-6)
    ft_ratio = np.fft.rfft2(img) / np.fft.rfft2(proj[0])
    ctf = ctf_images(params, n, pix, half=True)[0]
    ok = np.abs(np.fft.rfft2(proj[0])) > 1e-6 * np.abs(np.fft.rfft2(proj[0])).max()
    np.testing.assert_allclose(ft_ratio.real[ok], ctf[ok], atol=1e-6)


def _plan(n=40, junk=0.3, kinds=("noise", "wrong_pose", "other_object"), seed=1):
    return draw_plan(n, rng=np.random.default_rng(seed), defocus_min_um=1.0, defocus_max_um=2.0,
                     astigmatism_angstrom=300.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1,
                     max_shift_px=2.5, junk_fraction=junk, junk_kinds=kinds)


def test_draw_plan_distributions():
    plan = _plan(n=400, junk=0.25)
    assert np.bincount(plan.junk_code).tolist() == [300, 34, 33, 33]
    assert sorted(np.bincount(plan.half_set)[1:].tolist()) == [200, 200]
    assert np.all(np.hypot(*plan.shifts_px.T) <= 2.5)
    du, dv = plan.ctf["defocus_u_angstrom"], plan.ctf["defocus_v_angstrom"]
    assert du.min() >= 1e4 and du.max() <= 2e4
    np.testing.assert_allclose(du - dv, 300.0)
    assert np.all((plan.ctf["defocus_angle_deg"] >= 0) & (plan.ctf["defocus_angle_deg"] < 180))
    wrong = plan.junk_code == 2
    assert np.all(np.abs(plan.true_rotations[wrong] - plan.rotations[wrong]).max(axis=(1, 2)) > 1e-3)
    np.testing.assert_array_equal(plan.true_rotations[~wrong], plan.rotations[~wrong])
    np.testing.assert_allclose(euler_to_matrix(*plan.angles_deg.T), plan.rotations, atol=1e-12)


def test_clean_images_per_junk_kind():
    plan = _plan()
    blobs = fit_to_box(proteasome_blobs(0), 24, 4.0)
    other = fit_to_box(random_blob_object(0), 24, 4.0)
    idx = np.arange(len(plan))
    imgs = clean_images(plan, idx, lambda r: project_blobs(blobs, r, 24, 4.0),
                        lambda r: project_blobs(other, r, 24, 4.0), 24, 4.0)
    assert np.all(imgs[plan.junk_code == 1] == 0)
    good = np.flatnonzero(plan.junk_code == 0)[0]
    expect = apply_ctf_and_shift(project_blobs(blobs, plan.rotations[good:good + 1], 24, 4.0),
                                 plan.shifts_px[good:good + 1], plan.ctf_subset([good]), 4.0)
    np.testing.assert_allclose(imgs[good], expect[0], atol=1e-9)


# --- the data set on disk --------------------------------------------------------------------

SMALL = dict(n_particles=60, box_size=24, pixel_size_angstrom=4.0, snr=0.5, particles_per_stack=25,
             junk_fraction=0.3, max_shift_px=2.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    summary = simulate_dataset(out, seed=7, **SMALL)
    return out, summary


def test_outputs_and_determinism(dataset, tmp_path):
    out, summary = dataset
    stacks = sorted(p.name for p in (out / "Particles").iterdir())
    assert stacks == ["stack_0001.mrcs", "stack_0002.mrcs", "stack_0003.mrcs"]
    assert sorted(p.name for p in out.iterdir()) == ["Particles", "junk.csv", "particles.star", "simulation.json",
                                                     "truth.mrc"]
    again = tmp_path / "again"
    simulate_dataset(again, seed=7, **SMALL)
    for name in stacks:
        assert (out / "Particles" / name).read_bytes()[1024:] == (again / "Particles" / name).read_bytes()[1024:]
    other = tmp_path / "other"
    simulate_dataset(other, seed=8, **SMALL)
    assert (out / "Particles" / stacks[0]).read_bytes()[1024:] != (other / "Particles" / stacks[0]).read_bytes()[1024:]


def _stacks(out: Path) -> np.ndarray:
    import mrcfile

    return np.concatenate([mrcfile.read(p) for p in sorted((out / "Particles").glob("stack_*.mrcs"))])


def test_snr_and_noise_level_from_outputs(dataset):
    out, summary = dataset
    info = json.loads((out / "simulation.json").read_text())
    junk = pd.read_csv(out / "junk.csv")
    images = _stacks(out).astype(np.float64)
    assert images.shape == (60, 24, 24)
    var = images.var(axis=(1, 2))
    noise_only = (junk.junk_kind == "noise").to_numpy()
    assert abs(var[noise_only].mean() - 1.0) < 0.1  # noise std normalised to 1
    measured = var[~noise_only].mean() - 1.0  # images = signal + unit noise
    assert abs(measured - 0.5) < 0.05
    assert abs(info["measured_snr"] - 0.5) < 0.05 and info["requested_snr"] == 0.5
    assert info["seed"] == 7 and info["parameters"]["box_size"] == 24
    assert summary["measured_snr"] == pytest.approx(info["measured_snr"])


def test_junk_table_consistent(dataset):
    out, _ = dataset
    junk = pd.read_csv(out / "junk.csv")
    assert list(junk.columns) == ["row_index", "image_name", "is_junk", "junk_kind", "true_rot", "true_tilt",
                                  "true_psi"]
    assert junk.row_index.tolist() == list(range(60))
    assert junk.is_junk.sum() == 18
    assert junk.junk_kind.value_counts().to_dict() == {"none": 42, "noise": 6, "wrong_pose": 6, "other_object": 6}
    assert (junk.is_junk == (junk.junk_kind != "none")).all()
    assert junk.loc[junk.junk_kind == "noise", ["true_rot", "true_tilt", "true_psi"]].isna().all().all()
    assert junk.image_name.iloc[0] == "000001@Particles/stack_0001.mrcs"
    assert junk.image_name.iloc[25] == "000001@Particles/stack_0002.mrcs"
    info = json.loads((out / "simulation.json").read_text())
    assert info["counts"]["junk"] == {"noise": 6, "wrong_pose": 6, "other_object": 6}


def test_star_reads_back_and_explains_the_images(dataset):
    from numba_recon.io.star import read_star

    out, _ = dataset
    ps = read_star(out / "particles.star")
    junk = pd.read_csv(out / "junk.csv")
    info = json.loads((out / "simulation.json").read_text())
    assert len(ps) == 60 and ps.box_size == 24 and ps.pixel_size_angstrom == pytest.approx(4.0)
    assert sorted(np.bincount(ps.half_set)[1:].tolist()) == [30, 30]
    assert "rlnRandomSubset" in ps.table.columns and not {"true_rot", "is_junk"} & set(ps.table.columns)
    assert list(ps.table.rlnImageName) == list(junk.image_name)
    good = (junk.junk_kind == "none").to_numpy()
    np.testing.assert_allclose(junk.loc[good, "true_rot"], ps.table.rlnAngleRot[good], atol=1e-5)
    # the written poses, shifts and CTFs reproduce the clean part of the good images; wrong poses do not
    blobs = fit_to_box(proteasome_blobs(0), 24, 4.0)
    model = apply_ctf_and_shift(project_blobs(blobs, ps.rotations, 24, 4.0), ps.shifts_px, ps.ctf, 4.0)
    resid = ps.read_images(np.arange(60)) - model / info["noise_sigma"]
    rvar = resid.var(axis=(1, 2))
    assert np.all(np.abs(rvar[good] - 1.0) < 0.25)
    assert rvar[(junk.junk_kind == "wrong_pose").to_numpy()].mean() > 1.3
    # truth.mrc is the rendered phantom in image units
    from numba_recon.io.mrc import read_volume

    truth, voxel = read_volume(out / "truth.mrc")
    assert voxel == pytest.approx(4.0)
    np.testing.assert_allclose(truth, render_volume(blobs, 24, 4.0) / info["noise_sigma"], rtol=1e-5, atol=1e-7)


def test_refuses_non_empty_folder_and_overwrite_replaces(tmp_path):
    out = tmp_path / "sim"
    simulate_dataset(out, **{**SMALL, "n_particles": 30})
    with pytest.raises(OutputError, match="--overwrite"):
        simulate_dataset(out, **SMALL)
    simulate_dataset(out, **{**SMALL, "n_particles": 20}, overwrite=True)
    assert sorted(p.name for p in (out / "Particles").iterdir()) == ["stack_0001.mrcs"]
    assert len(pd.read_csv(out / "junk.csv")) == 20


def test_user_volume(tmp_path):
    from numba_recon.io.mrc import write_volume

    rng = np.random.default_rng(5)
    blobs = Blobs(rng.uniform(-10, 10, (15, 3)), rng.uniform(3.0, 5.0, 15), rng.uniform(0.5, 1.0, 15))
    vol = render_volume(blobs, 24, 2.0)
    write_volume(tmp_path / "map.mrc", vol, 2.0)
    out = tmp_path / "sim"
    s = simulate_dataset(out, n_particles=12, volume_path=tmp_path / "map.mrc", snr=1.0, junk_fraction=0.0)
    assert s["box_size"] == 24 and s["pixel_size_angstrom"] == 2.0 and s["phantom"] == "user_volume"
    info = json.loads((out / "simulation.json").read_text())
    from numba_recon.io.mrc import read_volume

    truth, _ = read_volume(out / "truth.mrc")
    np.testing.assert_allclose(truth, vol / info["noise_sigma"], rtol=1e-5)
    with pytest.raises(InputError, match="--box-size"):
        simulate_dataset(tmp_path / "bad", n_particles=4, volume_path=tmp_path / "map.mrc", box_size=32)


def test_truth_map_reproduces_the_images(dataset, tmp_path):
    # truth.mrc is in image units: simulating from it (Fourier projector) with the same seed needs
    # noise sigma ~1 and gives the same images up to the projector difference
    out, _ = dataset
    again = tmp_path / "from_truth"
    s = simulate_dataset(again, seed=7, volume_path=out / "truth.mrc",
                         **{k: v for k, v in SMALL.items() if k not in ("box_size", "pixel_size_angstrom")})
    assert s["noise_sigma"] == pytest.approx(1.0, abs=0.02)
    diff = _stacks(again).astype(np.float64) - _stacks(out)
    # the pseudo-atoms are narrower than a pixel here, so the voxel-sampled truth aliases; 20 % of
    # the signal level bounds the projector difference at this coarse sampling
    assert diff.std() < 0.2 * np.sqrt(SMALL["snr"])


def test_empty_map_and_file_as_folder_are_refused(tmp_path):
    from numba_recon.io.mrc import write_volume

    write_volume(tmp_path / "zero.mrc", np.zeros((16, 16, 16), np.float32), 3.0)
    with pytest.raises(InputError, match="empty images"):
        simulate_dataset(tmp_path / "out", n_particles=4, volume_path=tmp_path / "zero.mrc")
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        simulate_dataset(tmp_path / "file", n_particles=4, box_size=16)


@pytest.mark.parametrize("kwargs,word", [
    ({"n_particles": 0}, "--n-particles"),
    ({"snr": 0.0}, "--snr"),
    ({"junk_fraction": 1.0}, "--junk-fraction"),
    ({"box_size": 6}, "--box-size"),
    ({"defocus_min_um": 3.0, "defocus_max_um": 2.0}, "--defocus-max"),
    ({"junk_kinds": ["dust"]}, "--junk-kind"),
    ({"seed": -1}, "--seed"),
    ({"astigmatism_angstrom": 20000.0}, "--astigmatism"),
])
def test_bad_values_raise_before_writing(tmp_path, kwargs, word):
    with pytest.raises(InputError, match=word):
        simulate_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


# --- command line ----------------------------------------------------------------------------


def test_cli_runs_and_prints_summary(runner, tmp_path):
    from numba_recon.cli import main

    out = tmp_path / "sim"
    res = runner.invoke(main, ["-q", "simulate", "-o", str(out), "--n-particles", "10", "--box-size", "16",
                               "--angpix", "6", "--junk-fraction", "0.2", "--junk-kind", "noise", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "Simulated 10 particles" in res.output and "2 noise" in res.output
    assert (out / "particles.star").exists() and (out / "Particles" / "stack_0001.mrcs").exists()


@pytest.mark.parametrize("args", [
    ["--n-particles", "0"],
    ["--n-particles", "-5"],
    ["--snr", "0"],
    ["--snr", "-1"],
    ["--junk-fraction", "1"],
    ["--junk-fraction", "-0.1"],
    ["--box-size", "4"],
    ["--defocus-min", "3", "--defocus-max", "2"],
])
def test_cli_bad_values_exit_2_with_one_line(runner, tmp_path, args):
    from numba_recon.cli import main

    out = tmp_path / "sim"
    res = runner.invoke(main, ["simulate", "-o", str(out), *args])
    assert res.exit_code == 2
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("numba-recon: error:") and "Traceback" not in err
    assert not out.exists()
