"""The default solver end to end: direct reconstruction, stopping on the held-out loss, the same
maps whatever the row order or the file format, and quality against the truth and against adam."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from numba_recon.cli import main

BOX = 32
ANGPIX = 3.0


@pytest.fixture(scope="module")
def data(sim_box32, tmp_path_factory) -> Path:
    """A copy of the shared data set (box 32, 3 A/px, SNR 0.05): tests write STAR files beside its
    ``Particles/``."""
    import shutil

    path = tmp_path_factory.mktemp("solver") / "data"
    shutil.copytree(sim_box32, path)
    return path


def _maps(out: Path) -> np.ndarray:
    from numba_recon.io.mrc import read_volume

    return np.stack([read_volume(out / f"run_half{h}_class001_unfil.mrc")[0] for h in (1, 2)])


def _vs_truth(out: Path, data: Path) -> float:
    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.io.mrc import read_volume

    truth, _ = read_volume(data / "truth.mrc")
    maps = _maps(out)
    return resolution_at(fsc(maps.mean(axis=0), truth), BOX, ANGPIX, 0.5)


def _history(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "history.csv") as fh:  # the version and command lines start with "#"
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


@pytest.fixture(scope="module")
def default_run(data, tmp_path_factory, run_summary):
    out = tmp_path_factory.mktemp("runs") / "default"
    return out, run_summary(data / "particles.star", out)


@pytest.mark.slow
def test_one_epoch_is_the_direct_reconstruction(data, tmp_path, default_run, run_summary):
    out = tmp_path / "direct"
    summary = run_summary(data / "particles.star", out, "--epochs", "1")
    assert summary["solver"]["passes"] == 1 and summary["solver"]["best_pass"] == 1
    assert len(_history(out)) == 1
    # the one-pass map is already close to the converged one
    assert _vs_truth(out, data) <= _vs_truth(default_run[0], data) * 1.1
    assert _vs_truth(out, data) < 4 * ANGPIX


@pytest.mark.slow
def test_final_maps_have_the_lowest_held_out_loss(default_run):
    out, summary = default_run
    rows = _history(out)
    cv = [float(r["cv_loss"]) for r in rows]
    best = summary["solver"]["best_pass"]
    assert cv[best - 1] == min(cv)
    assert summary["solver"]["stop_reason"]
    # the maps written are the best pass's: their held-out loss is recomputed from the files
    from numba_recon.checkpoint import load_latest

    ckpt = load_latest(out)
    np.testing.assert_array_equal(_maps(out), (ckpt.arrays.get("cg_best_volumes", ckpt.volumes)))


@pytest.mark.slow
def test_cg_is_at_least_as_good_as_adam(data, tmp_path, default_run, run_summary):
    out = tmp_path / "adam"
    run_summary(data / "particles.star", out, "--optimizer", "adam", "--epochs", "10")
    assert _vs_truth(default_run[0], data) <= _vs_truth(out, data)


@pytest.mark.slow
def test_particle_diameter_given_or_estimated(data, tmp_path, default_run, run_summary):
    solver = default_run[1]["solver"]
    assert solver["particle_diameter_source"] == "estimated"
    # the phantom lies within ~0.35 of the box (radius); the estimate is generous but inside the box
    assert 0.5 * BOX * ANGPIX < solver["particle_diameter_angstrom"] <= (BOX - 2) * ANGPIX
    summary = run_summary(data / "particles.star", tmp_path / "given", "--particle-diameter", "60", "--epochs", "1")
    assert summary["solver"]["particle_diameter_source"] == "given"
    assert summary["solver"]["particle_diameter_angstrom"] == pytest.approx(60.0)
    assert summary["solver"]["support_radius_px"] == pytest.approx(60 / 2 / ANGPIX + 5)


def _rewrite_rows(star: Path, out: Path, order: np.ndarray, drop_subsets: bool) -> None:
    """The same STAR file with its particle rows in ``order`` (text kept exactly), optionally
    without the rlnRandomSubset column."""
    lines = star.read_text().splitlines()
    start = lines.index("data_particles")
    labels = [i for i in range(start, len(lines)) if lines[i].startswith("_rln")]
    rows = [i for i in range(labels[-1] + 1, len(lines)) if lines[i].strip()]
    names = [lines[i].split()[0] for i in labels]
    drop = names.index("_rlnRandomSubset") if drop_subsets else None
    header = [lines[i] for i in range(labels[0])]
    label_lines = [f"{name} #{k + 1}" for k, name in enumerate(n for j, n in enumerate(names) if j != drop)]
    body = []
    for i in np.asarray(rows)[order]:
        fields = lines[i].split()
        if drop is not None:
            del fields[drop]
        body.append(" ".join(fields))
    out.write_text("\n".join(header + label_lines + body) + "\n")


@pytest.mark.slow
def test_row_order_and_format_do_not_change_the_maps(data, tmp_path, runner, run_summary):
    """Without rlnRandomSubset the halves and the hold-out come from the image names: the same
    particles in reversed and shuffled row order, and as a .thu file, give the same maps to float
    summation order."""
    n = 1200
    plain = data / "plain.star"  # beside Particles/, which the image paths are relative to
    _rewrite_rows(data / "particles.star", plain, np.arange(n), drop_subsets=True)
    shuffled = data / "shuffled.star"
    _rewrite_rows(data / "particles.star", shuffled, np.random.default_rng(3).permutation(n), drop_subsets=True)
    thu = data / "plain.thu"
    res = runner.invoke(main, ["convert", str(plain), str(thu)])
    assert res.exit_code == 0, res.output
    common = ["--epochs", "3", "--no-early-stop"]
    ref = _maps((run_summary(plain, tmp_path / "a", *common), tmp_path / "a")[1])
    for star, extra in ((shuffled, []), (thu, ["--angpix", str(ANGPIX)])):
        out = tmp_path / star.stem
        run_summary(star, out, *common, *extra)
        rel = np.abs(_maps(out) - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, (star.name, rel)


@pytest.mark.slow
def test_robust_losses_run_their_passes(tmp_path, run_summary):
    """A robust loss is active for at least two passes before the run may stop, and drops junk."""
    from numba_recon.sim.simulate import simulate_dataset

    path = tmp_path / "junk"
    simulate_dataset(path, n_particles=800, box_size=24, pixel_size_angstrom=4.0, snr=0.2, max_shift_px=2.0,
                     junk_fraction=0.4, junk_kinds=("noise",), seed=5, particles_per_stack=400)
    out = tmp_path / "trimmed"
    summary = run_summary(path / "particles.star", out, "--loss", "trimmed")
    rows = _history(out)
    assert len(rows) >= 4
    kept = [float(r["kept_fraction"]) for r in rows]
    assert kept[0] == 1.0 and kept[1] == 1.0 and kept[-1] < 0.75
    assert summary["solver"]["best_pass"] >= 3


@pytest.mark.slow
def test_adam_with_the_preconditioner_converges_faster(data, tmp_path, run_summary):
    """The solver's Fourier preconditioner is available to adam: with it, 3 epochs of adam give a map
    at least as close to the truth as without it."""
    plain = tmp_path / "adam"
    pre = tmp_path / "adam-pre"
    run_summary(data / "particles.star", plain, "--optimizer", "adam", "--epochs", "3")
    summary = run_summary(data / "particles.star", pre, "--optimizer", "adam", "--epochs", "3", "--precondition")
    assert summary["timings_s"]["preconditioner_s"] > 0
    assert _vs_truth(pre, data) <= _vs_truth(plain, data)


@pytest.mark.slow
def test_initial_map_is_not_used_by_cg_and_says_so(data, tmp_path, caplog):
    """A start map cannot couple the halves in the default solver: it is ignored, with a warning."""
    import logging

    from numba_recon.config import RunConfig
    from numba_recon.recon.engine import run

    noise = tmp_path / "noise.mrc"
    from numba_recon.io.mrc import write_volume

    write_volume(noise, np.random.default_rng(0).standard_normal((BOX,) * 3).astype(np.float32), ANGPIX)
    maps = []
    for name, initial in (("plain", None), ("start", str(noise))):
        cfg = RunConfig(particles=str(data / "particles.star"), out_dir=str(tmp_path / name), epochs=1,
                        backend="cpu", initial_map=initial)
        with caplog.at_level(logging.WARNING):
            run(cfg, progress=False)
        maps.append(_maps(tmp_path / name))
    assert "--initial-map is not used by the cg solver" in caplog.text
    np.testing.assert_array_equal(maps[0], maps[1])


def _with_repeated_rows(star: Path, out: Path, rows: list[tuple[int, str | None]]) -> None:
    """Copy a STAR file and append copies of particle rows ``(row, new rlnRandomSubset or None)``."""
    lines = star.read_text().splitlines()
    start = lines.index("data_particles")
    labels = [i for i in range(start, len(lines)) if lines[i].startswith("_rln")]
    names = [lines[i].split()[0] for i in labels]
    body = [i for i in range(labels[-1] + 1, len(lines)) if lines[i].strip()]
    col = names.index("_rlnRandomSubset")
    extra = []
    for row, half in rows:
        fields = lines[body[row]].split()
        if half is not None:
            fields[col] = half
        extra.append(" ".join(fields))
    out.write_text("\n".join(lines + extra) + "\n")


@pytest.mark.slow
def test_repeated_images_are_refused_or_dropped(data, tmp_path, runner, run_summary):
    """The same image twice, even with rlnRandomSubset putting the copies in opposite halves, is
    refused with one line (exit 2); --drop-duplicates keeps the first row of each image."""
    import starfile

    star = data / "repeated.star"
    halves = starfile.read(data / "particles.star")["particles"]["rlnRandomSubset"].to_numpy()
    other = "2" if halves[0] == 1 else "1"
    _with_repeated_rows(data / "particles.star", star, [(0, other), (5, None)])
    res = runner.invoke(main, ["-q", "run", str(star), "-o", str(tmp_path / "refused"), "--backend", "cpu",
                               "--epochs", "1"])
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert "repeat the image of an earlier row" in line and "--drop-duplicates" in line and "repeated.star" in line
    assert not (tmp_path / "refused" / "run_class001.mrc").exists()
    summary = run_summary(star, tmp_path / "dropped", "--epochs", "1", "--drop-duplicates")
    assert summary["particles"] == 1200


@pytest.mark.slow
def test_an_input_among_the_outputs_is_refused(data, tmp_path, runner):
    """Reconstructing from a previous run's run_data.star into that same folder would overwrite the
    input: refused with one line (exit 2), even with --overwrite, and the file is untouched."""
    import shutil

    out = tmp_path / "again"
    out.mkdir()
    star = out / "run_data.star"
    shutil.copy(data / "particles.star", star)
    before = star.read_bytes()
    res = runner.invoke(main, ["-q", "run", str(star), "-o", str(out), "--root", str(data), "--backend", "cpu",
                               "--epochs", "1", "--overwrite"])
    assert res.exit_code == 2, res.output
    assert "where this run writes its own output" in res.output.strip().splitlines()[-1]
    assert star.read_bytes() == before
    # a mask inside the run's checkpoints/ folder (cleared by --overwrite) is refused the same way
    (out / "checkpoints").mkdir()
    mask = out / "checkpoints" / "mask.mrc"
    mask.write_bytes(b"not read")
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out), "--backend", "cpu",
                               "--mask", str(mask), "--overwrite"])
    assert res.exit_code == 2 and mask.exists()


@pytest.mark.parametrize("kind, fragment", [
    ("huge", "do not give a usable reconstruction"),
    ("constant", "have no noise outside the particle"),
])
def test_degenerate_images_stop_with_one_line(tmp_path, runner, kind, fragment):
    """Pixels of 1e30 (zero maps before) and constant images (Nyquist 'resolution' before) end the
    run with one line and exit status 2, and no maps."""
    import mrcfile

    from numba_recon.sim.simulate import simulate_dataset

    path = tmp_path / "sim"
    simulate_dataset(path, n_particles=64, box_size=16, pixel_size_angstrom=4.0, snr=0.5, seed=2,
                     particles_per_stack=64)
    for stack in (path / "Particles").glob("*.mrcs"):
        with mrcfile.open(stack, "r+") as m:
            m.data[...] = m.data * np.float32(1e30) if kind == "huge" else np.float32(3.0)
    out = tmp_path / "out"
    res = runner.invoke(main, ["-q", "run", str(path / "particles.star"), "-o", str(out), "--backend", "cpu"])
    assert res.exit_code == 2, res.output
    assert fragment in res.output.strip().splitlines()[-1]
    assert not (out / "run_class001.mrc").exists()


@pytest.mark.slow
def test_a_support_too_small_is_refused(data, tmp_path, runner):
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(tmp_path / "r"), "--backend",
                               "cpu", "--radius", "0.001"])
    assert res.exit_code == 2 and "--radius 0.001 px is too small" in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_particle_set_and_changed_options(data, tmp_path, runner, run_summary):
    """A resume cannot mix halves: a reordered or shortened STAR file is refused with one line, as
    are options that would change the run (naming them); safe options are accepted. A refused resume
    leaves the finished run's files and success marker alone. Paths are stored absolute, so a resume
    from another working directory works."""
    import os

    star = data / "resume.star"
    _rewrite_rows(data / "particles.star", star, np.arange(1200), drop_subsets=False)
    out = tmp_path / "run"
    run_summary(star, out, "--epochs", "2", "--no-early-stop")
    marker = out / "NUMBA_RECON_JOB_EXIT_SUCCESS"
    assert marker.exists()
    maps = _maps(out)
    # options that change the run are refused by name
    res = runner.invoke(main, ["run", "--resume", str(out), "--sym", "C2", "--lr", "0.5", "--epochs", "3"])
    assert res.exit_code == 2 and "--sym" in res.output and "--lr" in res.output and "would change it" in res.output
    assert marker.exists()
    # the particle file changed under the run: reordered rows
    _rewrite_rows(data / "particles.star", star, np.arange(1200)[::-1], drop_subsets=False)
    res = runner.invoke(main, ["run", "--resume", str(out), "--epochs", "3"])
    assert res.exit_code == 2 and "particle set differs" in res.output
    # ... and removed rows
    _rewrite_rows(data / "particles.star", star, np.arange(1100), drop_subsets=False)
    res = runner.invoke(main, ["run", "--resume", str(out), "--epochs", "3"])
    assert res.exit_code == 2 and "1100 rows now, 1200 then" in res.output
    assert marker.exists()
    np.testing.assert_array_equal(_maps(out), maps)
    # the original file again, from another working directory, with safe options: it goes on
    _rewrite_rows(data / "particles.star", star, np.arange(1200), drop_subsets=False)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        res = runner.invoke(main, ["-q", "run", "--resume", "run", "--epochs", "3", "--cache-mb", "100"])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["solver"]["passes"] == 3


@pytest.mark.slow
def test_invalid_input_leaves_no_output_folder(data, tmp_path, runner):
    """A particle file that fails its checks is refused before the -o folder exists, so the rerun
    after the fix is not blocked by an empty folder."""
    star = data / "repeated_again.star"
    _with_repeated_rows(data / "particles.star", star, [(3, None)])
    out = tmp_path / "never"
    res = runner.invoke(main, ["-q", "run", str(star), "-o", str(out), "--backend", "cpu"])
    assert res.exit_code == 2
    assert not out.exists()
