"""Local resolution (``numba-recon locres``, :mod:`numba_recon.evaluate.locres`).

The accuracy test uses half maps whose resolution is known by construction: a sphere of Gaussian
pseudo-atoms whose left half (x < N/2) is low-passed to 8 A and right half to 16 A, plus
independent white noise in each half map. Below its cut-off each region has signal and noise, so
the FSC there is S/(S+N) (about 0.6); above it only the independent noise is left and the FSC is 0:
the true FSC crosses 0.143 at the cut-off.

Criterion: the windowed FSCs are computed in a sub-box of ``M`` voxels, whose shell ``i`` lies at
``M angpix / i`` Angstrom; a resolution ``r`` corresponds to the (fractional) shell
``k(r) = M angpix / r``. The median of the local-resolution map over each region must satisfy
``|k(median) - k(true)| <= 1``: within one Fourier shell of the window box (here ``M = 40``,
``angpix = 2``: one shell is 0.8 A wide at 8 A and 3.2 A wide at 16 A). The regions exclude the
5 voxels (10 A) on either side of the seam, where windows straddle both halves; a window's FSC is
dominated by the better-resolved half it contains. Observed over seeds 1-6: 0.4-0.6 shells
optimistic on the left, -0.2 to +0.4 on the right (the window's own Fourier width spreads the
signal slightly beyond the cut-off).
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.evaluate.filters import lowpass
from numba_recon.evaluate.locres import (LOCRES_FILES, local_resolution, sampling_points, subbox_size,
                                         window_profile)
from numba_recon.evaluate.mask import spherical_mask
from numba_recon.io.mrc import read_volume, write_volume
from numba_recon.sim.phantom import Blobs, render_volume

BOX = 96
ANGPIX = 2.0
LEFT_ANGSTROM = 8.0
RIGHT_ANGSTROM = 16.0
SEAM_MARGIN_PX = 5


def two_resolution_half_maps(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half maps ``(BOX,)*3`` at 8 A for x < BOX/2 and 16 A for x >= BOX/2, and their mask.

    Pseudo-atoms (sigma 1 A, one per 60 A^3) fill a sphere of radius 0.42 of the box. The 16 A half
    is scaled by 0.35 (about sqrt(1/8): its band holds 1/8 of the Fourier coefficients of the 8 A
    band), so both regions have a similar signal-to-noise ratio per coefficient below their cut-off.
    The noise is white with 2x the standard deviation of the signal inside the mask.
    """
    rng = np.random.default_rng(seed)
    radius = 0.42 * BOX * ANGPIX
    count = int(4.0 / 3.0 * np.pi * radius ** 3 / 60.0)
    centres = rng.normal(size=(count, 3))
    centres *= (radius * rng.random(count) ** (1 / 3) / np.linalg.norm(centres, axis=1))[:, None]
    atoms = render_volume(Blobs(centres, np.ones(count), rng.uniform(0.5, 1.5, count)), BOX, ANGPIX)
    x = np.arange(BOX)[None, None, :]
    signal = np.where(x < BOX // 2, lowpass(atoms, LEFT_ANGSTROM, ANGPIX),
                      0.35 * lowpass(atoms, RIGHT_ANGSTROM, ANGPIX))
    mask = spherical_mask(BOX, 0.4 * BOX, 3)
    sd = float(signal[mask > 0].std())
    half1 = signal + 2.0 * sd * rng.standard_normal(signal.shape)
    half2 = signal + 2.0 * sd * rng.standard_normal(signal.shape)
    return half1.astype(np.float32), half2.astype(np.float32), mask


@pytest.fixture(scope="module")
def simulated():
    return two_resolution_half_maps()


@pytest.fixture(scope="module")
def maps(tmp_path_factory, simulated):
    """The simulated maps as MRC files, plus bad inputs."""
    d = tmp_path_factory.mktemp("locres_maps")
    half1, half2, mask = simulated
    write_volume(d / "half1.mrc", half1, ANGPIX)
    write_volume(d / "half2.mrc", half2, ANGPIX)
    write_volume(d / "mask.mrc", mask, ANGPIX)
    write_volume(d / "small.mrc", half2[:80, :80, :80], ANGPIX)
    write_volume(d / "other_angpix.mrc", half2, 2.5)
    write_volume(d / "empty_mask.mrc", np.zeros_like(mask), ANGPIX)
    write_volume(d / "faint_mask.mrc", 0.4 * mask, ANGPIX)  # nothing above 0.5
    write_volume(d / "small_mask.mrc", mask[:80, :80, :80], ANGPIX)
    return d


def run(runner, *args):
    return runner.invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def test_window_profile_is_relions_raised_cosine():
    r0, e = 6.0, 4.0
    values = window_profile(np.array([0.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]), r0, e)
    expected = [1.0, 1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5, 0.5 + 0.5 * np.cos(3 * np.pi / 4), 0.0, 0.0]
    assert values == pytest.approx(expected, abs=1e-12)
    assert window_profile(np.array([5.0, 5.5]), 5.0, 0.0).tolist() == [1.0, 0.0]  # hard edge


def test_subbox_is_even_fft_friendly_and_holds_the_window():
    for support in (5, 17, 41, 77, 101):
        m = subbox_size(support)
        assert m >= support and m % 2 == 0
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        assert rest == 1, m


def test_sampling_grid_is_centred_and_inside_the_mask():
    n = 32
    mask = np.zeros((n, n, n), np.float32)
    mask[4:28, 4:28, 4:28] = 1.0
    mask[16, 16, 16] = 0.6
    pts = sampling_points(mask, 5)
    assert [16, 16, 16] in pts.tolist()  # the box centre N//2 is a grid point
    assert np.all((pts - 16) % 5 == 0)
    assert np.all(mask[pts[:, 2], pts[:, 1], pts[:, 0]] > 0.5)
    assert len(pts) == 5 ** 3  # 6, 11, 16, 21, 26 along each axis


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------

def test_recovers_8_and_16_angstrom_halves_within_one_shell(simulated):
    half1, half2, mask = simulated
    result = local_resolution(half1, half2, ANGPIX, mask)  # RELION's defaults: 50 A window, 25 A edge
    assert result.subbox_size == 40 and not result.warnings
    m_angstrom = result.subbox_size * ANGPIX
    x = np.arange(BOX)[None, None, :]
    regions = {LEFT_ANGSTROM: x < BOX // 2 - SEAM_MARGIN_PX, RIGHT_ANGSTROM: x >= BOX // 2 + SEAM_MARGIN_PX}
    medians = {}
    for true_res, region in regions.items():
        values = result.locres[result.inside & region]
        medians[true_res] = float(np.median(values))
        shell_error = m_angstrom / medians[true_res] - m_angstrom / true_res
        assert abs(shell_error) <= 1.0, (true_res, medians[true_res], shell_error)
    assert medians[RIGHT_ANGSTROM] > 1.5 * medians[LEFT_ANGSTROM]
    # the map is 0 outside the mask and a valid resolution (Nyquist .. sub-box size) wherever it is > 0
    assert np.all(result.locres[mask == 0] == 0)
    inside = result.locres[mask > 0]
    assert inside.min() >= 2 * ANGPIX - 1e-4 and inside.max() <= m_angstrom + 1e-4
    # the sampling points carry sub-box shell resolutions
    assert np.allclose(result.point_resolution_angstrom, m_angstrom / np.maximum(result.point_shell, 1))


def test_identical_half_maps_give_nyquist(simulated):
    half1, _, mask = simulated
    result = local_resolution(half1, half1, ANGPIX, mask, sampling_angstrom=40.0)
    assert np.all(result.point_shell == result.subbox_size // 2)
    assert np.allclose(result.locres[result.inside], 2 * ANGPIX)


def test_library_refuses_bad_geometry(simulated):
    from numba_recon.errors import InputError

    half1, half2, mask = simulated
    with pytest.raises(InputError, match="larger than the box"):
        local_resolution(half1, half2, ANGPIX, mask, window_angstrom=BOX * ANGPIX + 1)
    with pytest.raises(InputError, match="under 4 voxels"):
        local_resolution(half1, half2, ANGPIX, mask, window_angstrom=3 * ANGPIX)
    with pytest.raises(InputError, match="between 0 and the window"):
        local_resolution(half1, half2, ANGPIX, mask, window_angstrom=30, edge_angstrom=40)
    with pytest.raises(InputError, match="no voxel above 0.5"):
        local_resolution(half1, half2, ANGPIX, np.zeros_like(mask))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def test_help_has_examples(runner):
    result = run(runner, "locres", "--help")
    assert result.exit_code == 0 and "Example" in result.stdout, result.output


@pytest.mark.slow
def test_locres_command_end_to_end(runner, maps, tmp_path, assert_one_line_error):
    out = tmp_path / "locres"
    result = run(runner, "locres", maps / "half1.mrc", maps / "half2.mrc", "--mask", maps / "mask.mrc", "-o", out,
                 "--sampling-angstrom", 20)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(LOCRES_FILES)
    assert "median" in result.stdout and f"wrote {out / 'locres.mrc'}" in result.stdout

    with mrcfile.open(out / "locres.mrc") as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(ANGPIX)
    locmap, _ = read_volume(out / "locres.mrc")
    assert locmap.shape == (BOX,) * 3

    summary = json.loads((out / "locres_summary.json").read_text())
    for key in ("median_angstrom", "percentile_5_angstrom", "percentile_95_angstrom", "min_angstrom",
                "max_angstrom", "window_diameter_angstrom", "window_edge_angstrom", "sampling_angstrom",
                "fsc_threshold", "subbox_size", "n_sampling_points", "mask", "command"):
        assert key in summary, key
    assert summary["window_diameter_angstrom"] == 50.0 and summary["window_edge_angstrom"] == 25.0
    assert summary["sampling_angstrom"] == 20.0 and summary["sampling_px"] == 10
    assert summary["fsc_threshold"] == 0.143 and summary["mask"] == str(maps / "mask.mrc")
    assert summary["command"].startswith("numba-recon locres ")
    assert summary["percentile_5_angstrom"] <= summary["median_angstrom"] <= summary["percentile_95_angstrom"]
    inside = locmap[read_volume(maps / "mask.mrc")[0] > 0.5]
    assert summary["median_angstrom"] == pytest.approx(float(np.median(inside)), rel=1e-5)

    rows = (out / "locres.csv").read_text().splitlines()
    assert rows[0] == "x,y,z,resolution_angstrom"
    assert len(rows) - 1 == summary["n_sampling_points"] > 0
    x, y, z, res = rows[1].split(",")
    assert (int(x) - BOX // 2) % 10 == 0 and float(res) > 0
    for png in ("locres_histogram.png", "locres_sliced.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # outputs exist: refused without --overwrite (nothing touched), replaced with it
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(runner, "locres", maps / "half1.mrc", maps / "half2.mrc", "--mask", maps / "mask.mrc", "-o", out)
    assert_one_line_error(again, "exist", "--overwrite", ignore_case=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    again = run(runner, "locres", maps / "half1.mrc", maps / "half2.mrc", "--mask", maps / "mask.mrc", "-o", out,
                "--overwrite", "--fsc-threshold", 0.5, "--randomize-at-angstrom", 0)
    assert again.exit_code == 0, again.output
    summary = json.loads((out / "locres_summary.json").read_text())
    assert summary["fsc_threshold"] == 0.5 and summary["randomize_at_angstrom"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted(LOCRES_FILES)  # no temporary files left


@pytest.mark.parametrize("args, fragments", [
    (["{d}/half1.mrc", "{d}/small.mrc", "--mask", "{d}/mask.mrc"], ["small.mrc", "box 80 differs"]),
    (["{d}/half1.mrc", "{d}/other_angpix.mrc", "--mask", "{d}/mask.mrc"], ["other_angpix.mrc", "voxel size"]),
    (["{d}/half1.mrc", "{d}/half2.mrc"], ["--mask is required"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/missing.mrc"], ["missing.mrc", "not found"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/empty_mask.mrc"], ["no voxel above 0.5"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/faint_mask.mrc"], ["no voxel above 0.5"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/small_mask.mrc"], ["small_mask.mrc", "mask box"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/mask.mrc", "--window-angstrom", "nan"], ["--window-angstrom"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/mask.mrc", "--window-angstrom", "500"], ["larger than the box"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/mask.mrc", "--sampling-angstrom", "0"], ["--sampling-angstrom"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/mask.mrc", "--fsc-threshold", "1.5"], ["--fsc-threshold"]),
    (["{d}/half1.mrc", "{d}/half2.mrc", "--mask", "{d}/mask.mrc", "--randomize-at-angstrom", "-1"],
     ["--randomize-at-angstrom"]),
])
def test_bad_input_is_one_line_and_writes_nothing(runner, maps, tmp_path, args, fragments, assert_one_line_error):
    out = tmp_path / "out"
    result = run(runner, "locres", *[a.format(d=maps) for a in args], "-o", out)
    assert_one_line_error(result, *fragments, ignore_case=True)
    assert not out.exists() or not any(out.iterdir())
