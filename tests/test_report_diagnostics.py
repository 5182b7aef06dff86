"""The report's diagnostics: viewing directions, per-particle scores for every loss, the map against
a known truth, slices through the centre of mass, one font and legend style for every figure, and
the ChimeraX script run.cxc.

About 15 s on 2 cores: one simulated set (box 24, 600 particles) and one C1 L2 run of 2 passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.io.mrc import read_volume, write_volume

BOX = 24
ANGPIX = 4.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """600 D7-phantom particles (box 24, 4 A/px, SNR 0.1) with truth.mrc beside particles.star."""
    from numba_recon.sim.simulate import simulate_dataset

    d = tmp_path_factory.mktemp("diagnostics")
    simulate_dataset(d / "data", n_particles=600, box_size=BOX, pixel_size_angstrom=ANGPIX, snr=0.1, seed=3,
                     max_shift_px=1.0, particles_per_stack=300)
    return d


@pytest.fixture(scope="module")
def l2_run(data) -> Path:
    from click.testing import CliRunner

    out = data / "run"
    res = CliRunner().invoke(main, ["-q", "run", str(data / "data" / "particles.star"), "-o", str(out), "--epochs", "2",
                                    "--backend", "cpu", "--loss", "l2"])
    assert res.exit_code == 0, res.output
    return out


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Every loss gets its score histogram, every run its viewing directions
# ---------------------------------------------------------------------------------------------

def test_l2_run_has_scores_and_viewing_directions(l2_run):
    for name in ("fsc.png", "loss.png", "slices.png", "projections.png", "directions.png", "scores.png"):
        assert (l2_run / "plots" / name).is_file(), name
    page = (l2_run / "report.html").read_text()
    for anchor in ("directions", "scores"):
        assert f'id="{anchor}"' in page, anchor
    assert "The L2 loss weighs every particle the same" in page
    assert page.count("<img") == 6


def test_viewing_directions_are_the_third_row_of_relion_matrices():
    from numba_recon.geometry import euler_to_matrix
    from numba_recon.report.plots import directions_from_angles, directions_from_vectors

    rng = np.random.default_rng(0)
    rot, tilt, psi = rng.uniform(-180, 180, 500), rng.uniform(0, 180, 500), rng.uniform(-180, 180, 500)
    lon, lat = directions_from_angles(rot, tilt)
    lon_m, lat_m = directions_from_vectors(euler_to_matrix(rot, tilt, psi)[:, 2, :])
    np.testing.assert_allclose(lat, lat_m, atol=1e-9)
    # longitudes agree on the circle (both wrap to [-pi, pi])
    np.testing.assert_allclose(np.cos(lon - lon_m), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.rad2deg(lat), 90.0 - tilt, atol=1e-9)
    # a tilt outside [0, 180] is the same direction as its mirror (rot + 180, -tilt)
    lon2, lat2 = directions_from_angles(np.array([30.0]), np.array([-40.0]))
    lon3, lat3 = directions_from_angles(np.array([210.0]), np.array([40.0]))
    np.testing.assert_allclose([lon2[0], lat2[0]], [lon3[0], lat3[0]], atol=1e-9)


def test_direction_histogram_bins_have_equal_area():
    from numba_recon.report.plots import direction_histogram, directions_from_vectors

    rng = np.random.default_rng(1)
    lon, lat = directions_from_vectors(rng.normal(size=(200_000, 3)))
    lon_edges, lat_edges, counts = direction_histogram(lon, lat)
    assert counts.sum() == 200_000 and counts.shape == (lat_edges.size - 1, lon_edges.size - 1)
    # uniform views give a flat map: Poisson scatter only (a rot/tilt grid would starve the poles)
    assert counts.std() / counts.mean() < 0.2
    assert counts.min() > 0.4 * counts.mean()
    # top views only: most of the sphere is empty
    lon, lat = directions_from_vectors(rng.normal(size=(5000, 3)) * [0.1, 0.1, 1] + [0, 0, 3])
    _, _, counts = direction_histogram(lon, lat)
    assert np.mean(counts == 0) > 0.8


# ---------------------------------------------------------------------------------------------
# The map against the truth
# ---------------------------------------------------------------------------------------------

def test_run_compares_the_map_with_the_simulated_truth(l2_run, data):
    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.evaluate.truth import read_fsc_table

    summary = json.loads((l2_run / "summary.json").read_text())
    truth = summary["truth"]
    assert Path(truth["map"]) == data / "data" / "truth.mrc" and truth["threshold"] == 0.5
    curve = read_fsc_table(l2_run / "fsc_truth.csv")
    h1, _ = read_volume(l2_run / "run_half1_class001_unfil.mrc")
    h2, _ = read_volume(l2_run / "run_half2_class001_unfil.mrc")
    t, _ = read_volume(data / "data" / "truth.mrc")
    np.testing.assert_allclose(curve, fsc(0.5 * (h1.astype(np.float64) + h2), t), atol=2e-6)
    assert truth["resolution_angstrom"] == pytest.approx(resolution_at(curve, BOX, ANGPIX, 0.5))
    assert 2 * ANGPIX <= truth["resolution_angstrom"] < BOX * ANGPIX
    page = (l2_run / "report.html").read_text()
    assert "Resolution vs truth (FSC 0.5)" in page and f"{truth['resolution_angstrom']:.2f} \u00c5" in page
    # written through the run's write path: its output manifest lists them
    listed = json.loads((l2_run / ".numba_recon_manifest.json").read_text())["files"]
    for name in ("fsc_truth.csv", "run.cxc", "plots/directions.png", "plots/scores.png"):
        assert name in listed, name


@pytest.mark.slow
def test_report_truth_option(l2_run, data, runner, tmp_path):
    copy = _copy_run(l2_run, tmp_path / "copy")
    summary = json.loads((copy / "summary.json").read_text())
    del summary["truth"]
    summary["config"]["particles"] = str(tmp_path / "moved" / "particles.star")  # no truth.mrc to find
    (copy / "summary.json").write_text(json.dumps(summary))
    (copy / "fsc_truth.csv").unlink()
    res = runner.invoke(main, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    assert "vs truth" not in (copy / "report.html").read_text() and not (copy / "fsc_truth.csv").exists()
    res = runner.invoke(main, ["report", str(copy), "--truth", str(data / "data" / "truth.mrc")])
    assert res.exit_code == 0, res.output
    assert (copy / "fsc_truth.csv").is_file()
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["truth"]["resolution_angstrom"] == pytest.approx(
        json.loads((l2_run / "summary.json").read_text())["truth"]["resolution_angstrom"])
    assert "Resolution vs truth (FSC 0.5)" in (copy / "report.html").read_text()


def test_report_truth_option_refuses_a_map_that_does_not_fit(l2_run, runner, tmp_path, assert_one_line_error):
    copy = _copy_run(l2_run, tmp_path / "copy")
    write_volume(tmp_path / "small.mrc", np.zeros((20, 20, 20), np.float32), ANGPIX)
    write_volume(tmp_path / "coarse.mrc", np.zeros((BOX,) * 3, np.float32), 2 * ANGPIX)
    assert_one_line_error(runner.invoke(main, ["report", str(copy), "--truth", str(tmp_path / "small.mrc")]),
                          "small.mrc", "box 20 x 20 x 20 differs from the map's 24")
    assert_one_line_error(runner.invoke(main, ["report", str(copy), "--truth", str(tmp_path / "coarse.mrc")]),
                          "voxel size 8.0000")
    assert_one_line_error(runner.invoke(main, ["report", str(copy), "--truth", str(tmp_path / "nope.mrc")]),
                          "truth map not found")


def test_find_truth_passes_over_the_truth_of_another_data_set(tmp_path):
    from numba_recon.evaluate.truth import find_truth

    (tmp_path / "a").mkdir()
    write_volume(tmp_path / "a" / "truth.mrc", np.zeros((20, 20, 20), np.float32), ANGPIX)
    assert find_truth(tmp_path / "a" / "particles.star", BOX, ANGPIX) is None
    assert find_truth(tmp_path / "a" / "particles.star", 20, ANGPIX) == tmp_path / "a" / "truth.mrc"
    assert find_truth(tmp_path / "b" / "particles.star", BOX, ANGPIX) is None
    assert find_truth(None, BOX, ANGPIX) is None


# ---------------------------------------------------------------------------------------------
# Slices through the centre of mass
# ---------------------------------------------------------------------------------------------

def _grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")


def test_slices_go_through_the_centre_of_mass():
    from numba_recon.report.plots import centre_of_mass, slice_positions

    n = 32
    z, y, x = _grid(n)
    rng = np.random.default_rng(2)
    blob = np.exp(-((z - 21) ** 2 + (y - 13) ** 2 + (x - 18) ** 2) / 8.0) + 0.01 * rng.normal(size=(n,) * 3)
    np.testing.assert_allclose(centre_of_mass(blob), [21, 13, 18], atol=0.3)
    assert slice_positions(blob) == [(21, "centre of mass"), (13, "centre of mass"), (18, "centre of mass")]


def test_slices_of_a_hollow_particle_cut_its_wall():
    from numba_recon.report.plots import slice_positions

    # two rings stacked along z (a barrel of the proteasome kind): the box centre, the centre of
    # mass, falls in the empty middle between and inside the rings
    n, c, radius, gap = 32, 16, 9.0, 5
    z, y, x = _grid(n)
    rho = np.sqrt((y - c) ** 2 + (x - c) ** 2)
    rings = sum(np.exp(-((rho - radius) ** 2 + (z - c - dz) ** 2) / 3.0) for dz in (-gap, gap))
    assert rings[c, c, c] < 1e-3 * rings.max()
    (kz, wz), (ky, wy), (kx, wx) = slice_positions(rings)
    assert wz == wy == wx == "densest plane"
    assert abs(kz - c) == gap  # XY: through a ring, not between them
    assert abs(ky - c) >= radius - 3 and abs(kx - c) >= radius - 3  # XZ, YZ: through the wall


# ---------------------------------------------------------------------------------------------
# One font and legend style for every figure
# ---------------------------------------------------------------------------------------------

def _figures(monkeypatch, tmp_path) -> dict[str, object]:
    """Draw every report figure on synthetic input and keep the figures instead of saving them."""
    from numba_recon.report import plots

    kept: dict[str, object] = {}

    def keep(fig, path):
        kept[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    n = 32
    z, y, x = _grid(n)
    r = np.sqrt((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2)
    volume = np.exp(-((r - 9) ** 2) / 2.0) + 0.01 * np.random.default_rng(3).normal(size=(n,) * 3)
    shells = np.arange(n // 2 + 1)
    curve = 1 / (1 + np.exp((shells - 10.0) / 1.5))
    history = [{"epoch": e, "train_loss": 1 - 0.01 * e, "cv_loss": 1.001 - 0.01 * e, "resolution_angstrom": 9 - e,
                "resolution_05_angstrom": 11 - e} for e in range(1, 6)]
    rng = np.random.default_rng(4)
    scores = np.concatenate([rng.normal(-1, 0.1, 900), rng.normal(0.5, 0.2, 100)])
    lon, lat = plots.directions_from_vectors(rng.normal(size=(3000, 3)))
    plots.draw_figures(tmp_path, box=n, angpix=2.0, fsc_curve=curve, resolution=6.4,
                       truth_curve=np.clip(curve + 0.1, -1, 1), truth_resolution=6.1, history=history, volume=volume,
                       directions=(lon, lat), symmetry="D7", scores=scores, kept=scores < 0, loss="trimmed")
    plots.plot_scores(scores, None, tmp_path / "scores_l2.png", "l2")
    return kept


def _drawn_texts(fig, monkeypatch) -> list:
    """The texts a draw of ``fig`` actually renders (tick labels outside the view are not drawn)."""
    from matplotlib.text import Text

    drawn = []
    original = Text.draw

    def record(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return original(self, renderer)

    with monkeypatch.context() as m:
        m.setattr(Text, "draw", record)
        fig.canvas.draw()
    return drawn


def test_figures_use_fixed_font_sizes_and_keep_legends_clear(monkeypatch, tmp_path):
    from numba_recon.report import plots

    figures = _figures(monkeypatch, tmp_path)
    assert set(figures) == {"fsc.png", "loss.png", "slices.png", "projections.png", "directions.png", "scores.png",
                            "scores_l2.png"}
    sizes = {plots.FONT_TITLE, plots.FONT_LABEL, plots.FONT_TICK, plots.FONT_LEGEND, plots.FONT_NOTE,
             plots.FONT_TITLE + 1}
    for name, fig in figures.items():
        texts = _drawn_texts(fig, monkeypatch)
        renderer = fig.canvas.get_renderer()
        frame = fig.bbox
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        assert legends or name == "projections.png" or name == "directions.png", name
        for t in texts:
            assert t.get_fontsize() in sizes, (name, t.get_text(), t.get_fontsize())
            box = t.get_window_extent(renderer)
            # nothing cut off at the figure's edge
            assert (box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y0 >= frame.y0 - 1
                    and box.y1 <= frame.y1 + 1), (name, t.get_text())
        for legend in legends:
            own = {id(t) for t in legend.get_texts()}
            lbox = legend.get_window_extent(renderer)
            for t in texts:
                if id(t) not in own:
                    assert not lbox.overlaps(t.get_window_extent(renderer)), (name, t.get_text())
        # titles and axis labels do not run into each other (long panel titles did)
        named = {*(ax.title for ax in fig.axes), *(ax.xaxis.label for ax in fig.axes),
                 *(ax.yaxis.label for ax in fig.axes), getattr(fig, "_suptitle", None)}
        labels = [t for t in texts if t in named]
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                assert not a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer)), \
                    (name, a.get_text(), b.get_text())


# ---------------------------------------------------------------------------------------------
# run.cxc
# ---------------------------------------------------------------------------------------------

def _commands(path: Path) -> list[list[str]]:
    from numba_recon.report.chimerax import VERBS, parse_script

    text = path.read_text()
    assert text.endswith("\n") and "\t" not in text
    commands = parse_script(text)
    for line in text.splitlines():
        # each line is a comment or a command, one per line
        assert not line.strip() or line.startswith("#") or line.split()[0] in VERBS, line
    return commands


def test_run_cxc_opens_the_map_at_a_plausible_level(l2_run, data):
    from numba_recon.evaluate.mask import auto_threshold

    commands = _commands(l2_run / "run.cxc")
    assert commands[0] == ["open", "run_class001.mrc"]
    volume_cmd = next(c for c in commands if c[0] == "volume")
    assert volume_cmd[:3] == ["volume", "#1", "level"] and volume_cmd[4:] == ["style", "surface"]
    assert ["view"] in commands
    assert not any(c[0] == "color" for c in commands)  # no local-resolution map in the folder
    level = float(volume_cmd[3])
    volume, _ = read_volume(l2_run / "run_class001.mrc")
    assert volume.min() < level < volume.max()
    # the surface encloses about the particle: within a factor of 3 of the truth's volume at its
    # own threshold, and well inside the sphere inscribed in the box
    truth, _ = read_volume(data / "data" / "truth.mrc")
    enclosed = int(np.count_nonzero(volume > level))
    expected = int(np.count_nonzero(truth > auto_threshold(truth)))
    assert expected / 3 < enclosed < 3 * expected, (enclosed, expected)
    assert enclosed < 0.5 * (4 / 3) * np.pi * (BOX / 2) ** 3
    # the page says how to open it
    assert "chimerax run.cxc" in (l2_run / "report.html").read_text()


@pytest.mark.slow
def test_run_cxc_colours_the_surface_by_local_resolution(l2_run, runner, tmp_path):
    copy = _copy_run(l2_run, tmp_path / "copy")
    (copy / "locres").mkdir()
    z, y, x = _grid(BOX)
    r = np.sqrt((z - BOX // 2) ** 2 + (y - BOX // 2) ** 2 + (x - BOX // 2) ** 2)
    locres = np.where(r < 9, 8.0 + 0.5 * r, 0.0).astype(np.float32)  # better resolved in the middle
    write_volume(copy / "locres" / "locres.mrc", locres, ANGPIX)
    res = runner.invoke(main, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    commands = _commands(copy / "run.cxc")
    assert ["open", "locres/locres.mrc"] in commands and ["volume", "#2", "hide"] in commands
    colour = next(c for c in commands if c[0] == "color")
    assert colour[:5] == ["color", "sample", "#1", "map", "#2"] and colour[5] == "palette"
    stops = [stop.split(",") for stop in colour[6].split(":")]
    values = [float(v) for v, _ in stops]
    assert [c for _, c in stops] == ["blue", "cyan", "lime", "yellow", "red"]
    assert values == sorted(values) and 8.0 <= values[0] < values[-1] <= 12.5
    # the surface is coloured after both maps are open, the view set last
    names = [" ".join(c[:2]) for c in commands]
    assert names.index("color sample") > names.index("volume #2") and commands[-2:] == [["view"], ["lighting", "soft"]]
    # a local-resolution map of another box is not used
    write_volume(copy / "locres" / "locres.mrc", locres[:20, :20, :20], ANGPIX, overwrite=True)
    res = runner.invoke(main, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    assert not any(c[0] == "color" for c in _commands(copy / "run.cxc"))


def test_suggested_level_on_clean_and_noisy_maps():
    from numba_recon.report.chimerax import enclosed_volume_angstrom3, suggested_level

    n = 32
    z, y, x = _grid(n)
    r = np.sqrt((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2)
    ball = 1.0 / (1.0 + np.exp((r - 8.0) / 0.7))  # a soft ball of radius 8 voxels, no noise
    level = suggested_level(ball)
    enclosed = enclosed_volume_angstrom3(ball, level, 1.0)
    # noise-free: the peak-fraction floor (20 % of the peak) keeps the surface just outside the
    # ball's half-height edge (radius 9 instead of 8, 1.4 times the volume), not on its halo
    assert 0.9 < enclosed / (4 / 3 * np.pi * 8 ** 3) < 1.6
    noisy = ball + 0.05 * np.random.default_rng(5).normal(size=ball.shape)
    level = suggested_level(noisy)
    assert noisy.min() < level < noisy.max()
    # no specks of solvent noise above the level outside the ball
    assert np.count_nonzero((noisy > level) & (r > 10)) < 5
