"""Honest resolution: data and options that used to report a resolution the maps do not have now
give the truthful number, or stop with one line and exit status 2 before any map is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mrcfile
import pandas as pd
import numpy as np
import pytest

from numba_recon.cli import main

BOX = 32
ANGPIX = 3.0
NYQUIST = 2 * ANGPIX


@pytest.fixture(scope="module")
def data(sim_box32) -> Path:
    """The shared data set (box 32, 3 A/px, SNR 0.05), read only: the tests that change it copy it."""
    return sim_box32


def _run_logged(runner, star: Path, out: Path, *extra: str) -> tuple[dict, str]:
    """A run at the default verbosity: the summary and what it printed (log lines included)."""
    res = runner.invoke(main, ["run", str(star), "-o", str(out), "--backend", "cpu", *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "summary.json").read_text()), res.output


def _vs_truth(out: Path, data: Path) -> float:
    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.io.mrc import read_volume

    truth, _ = read_volume(data / "truth.mrc")
    average, _ = read_volume(out / "run_class001.mrc")
    return resolution_at(fsc(average, truth), BOX, ANGPIX, 0.5)


def _copy_with_stacks(data: Path, dest: Path, change) -> Path:
    """A copy of the data set whose stacks are rewritten by ``change(images (n, N, N) float32, k) ->
    array`` (any dtype mrcfile writes)."""
    shutil.copytree(data, dest)
    for k, stack in enumerate(sorted((dest / "Particles").glob("*.mrcs"))):
        with mrcfile.open(stack) as m:
            images = np.array(m.data, dtype=np.float32)
            voxel = m.voxel_size.copy()
        # mrcfile's header statistics overflow on the huge pixels some cases write on purpose
        with mrcfile.new(stack, overwrite=True) as m, np.errstate(over="ignore", invalid="ignore"):
            m.set_data(change(images, k))
            m.voxel_size = voxel
    return dest / "particles.star"


@pytest.fixture(scope="module")
def clean_run(data, tmp_path_factory, run_summary):
    out = tmp_path_factory.mktemp("runs") / "clean"
    return out, run_summary(data / "particles.star", out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["offset_float32", "raw_counts_uint16"])
def test_unnormalised_backgrounds_report_the_true_resolution(data, tmp_path, runner, clean_run, kind):
    """Images offset by many noise sigma (before: Nyquist reported, the map right only at ~100 A) give
    the clean data's maps and resolution, and the log says what was subtracted."""
    rng = np.random.default_rng(3)

    def change(images, k):
        sigma = images.std()
        offset = (6 + 6 * rng.random((images.shape[0], 1, 1))) * sigma
        if kind == "offset_float32":
            return (images + offset).astype(np.float32)
        # raw counts: about 1000 counts of background, 40 counts of noise, stored as mode 6
        return np.clip(np.rint(1000 + 40 / sigma * (images + offset)), 0, 65535).astype(np.uint16)

    star = _copy_with_stacks(data, tmp_path / "data", change)
    if kind == "raw_counts_uint16":
        with mrcfile.open(next((tmp_path / "data" / "Particles").glob("*.mrcs"))) as m:
            assert m.header.mode == 6
    out = tmp_path / "run"
    summary, text = _run_logged(runner, star, out)
    assert "the particle images are not normalised" in text
    reported = summary["resolution_angstrom"]
    assert reported > NYQUIST
    clean_out, clean_summary = clean_run
    assert reported == pytest.approx(clean_summary["resolution_angstrom"], rel=0.1)
    # the reported number is what the maps have: FSC 0.143 of the halves ~ FSC 0.5 against the truth
    assert _vs_truth(out, data) == pytest.approx(_vs_truth(clean_out, data), rel=0.1)
    assert reported >= 0.75 * _vs_truth(out, data)


@pytest.mark.slow
def test_normalised_images_are_only_logged(data, tmp_path, runner):
    _, text = _run_logged(runner, data / "particles.star", tmp_path / "again", "--epochs", "1")
    assert "background mean (outside the particle disc) subtracted" in text
    assert "not normalised" not in text and "background noise differs" not in text


@pytest.mark.slow
def test_wildly_varying_noise_is_warned_about(data, tmp_path, runner):
    star = _copy_with_stacks(data, tmp_path / "data", lambda images, k: images * np.float32(40.0 ** (k % 2)))
    _, text = _run_logged(runner, star, tmp_path / "run", "--epochs", "1")
    import re

    factor = re.search(r"background noise differs by a factor of (\d+)", text)
    assert factor and 30 <= int(factor.group(1)) <= 60, text


@pytest.mark.slow
def test_background_statistics_match_a_direct_computation(data):
    from numba_recon.batch import background_mask, survey_backgrounds
    from numba_recon.read import read_particles

    particles = read_particles(data / "particles.star")
    rows = np.arange(0, 1200, 37)
    stats = survey_backgrounds(particles, rows, batch_size=7)
    images = particles.read_images(rows).astype(np.float64)
    bg = images[:, background_mask(BOX)]
    np.testing.assert_allclose(stats.mean, bg.mean(axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.std, bg.std(axis=1), rtol=1e-10)
    centred = images - bg.mean(axis=1)[:, None, None]
    np.testing.assert_allclose(stats.blank_loss, (centred**2).sum(axis=(1, 2)) / (BOX**2 * bg.var(axis=1)), rtol=1e-9)


@pytest.mark.slow
def test_a_noise_start_map_does_not_inflate_the_resolution(data, tmp_path, run_summary):
    """--initial-map shares the start map between the halves: a white-noise start map (before:
    Nyquist on data worth ~9 A) is low-passed at --initial-lowpass and cannot beat the runs without
    a start map."""
    from numba_recon.io.mrc import write_volume

    noise = tmp_path / "noise.mrc"
    write_volume(noise, np.random.default_rng(1).normal(size=(BOX,) * 3).astype(np.float32) * 0.5, ANGPIX)
    common = ("--optimizer", "adam", "--epochs", "12")
    plain = [run_summary(data / "particles.star", tmp_path / f"plain{s}", *common, "--seed", str(s))
             ["resolution_angstrom"] for s in (0, 1)]
    started = run_summary(data / "particles.star", tmp_path / "started", *common, "--initial-map", str(noise))
    assert started["resolution_angstrom"] >= 0.95 * min(plain)
    # without the filter (a low-pass at Nyquist) the shared noise is what the FSC measured
    unfiltered = run_summary(data / "particles.star", tmp_path / "unfiltered", *common, "--initial-map", str(noise),
                             "--initial-lowpass", str(NYQUIST))
    assert unfiltered["resolution_angstrom"] < 0.9 * min(plain)


@pytest.mark.slow
def test_adam_from_a_strong_noise_start_map_reports_what_the_map_has(data, tmp_path, run_summary):
    """A white-noise start map at 3 times the map's standard deviation, 5 adam epochs. With one
    Adam second moment per voxel the divisor came from the shared start map's misfit and carried it
    to every frequency (12 A reported, 19 A against the truth); with one per half the step is linear
    in the gradient and the halves share only the low-passed start."""
    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.io.mrc import read_volume, write_volume

    truth, _ = read_volume(data / "truth.mrc")
    noise = tmp_path / "noise.mrc"
    scale = 3 * float(truth.std())
    write_volume(noise, np.random.default_rng(3).normal(size=(BOX,) * 3).astype(np.float32) * scale, ANGPIX)
    out = tmp_path / "started"
    reported = run_summary(data / "particles.star", out, "--optimizer", "adam", "--epochs", "5", "--initial-map",
                           str(noise))["resolution_angstrom"]
    average, _ = read_volume(out / "run_class001.mrc")
    curve = np.array(fsc(average, truth))
    curve[:int(round(BOX * ANGPIX / 60.0)) + 2] = 1.0  # the shells the 60 A low-pass leaves shared
    true_res = resolution_at(curve, BOX, ANGPIX, 0.5)
    assert reported >= 0.8 * true_res, (reported, true_res)


@pytest.mark.slow
def test_a_fine_initial_lowpass_is_warned_about(data, tmp_path, runner):
    from numba_recon.io.mrc import write_volume

    start = tmp_path / "start.mrc"
    write_volume(start, np.zeros((BOX,) * 3, np.float32), ANGPIX)
    _, text = _run_logged(runner, data / "particles.star", tmp_path / "r", "--optimizer", "adam", "--epochs", "1",
                          "--initial-map", str(start), "--initial-lowpass", "10")
    assert "low-passed at 10.0 A" in text
    assert "keeps detail finer than 20 A" in text


@pytest.mark.slow
@pytest.mark.parametrize("lr", ["1e30", "300"])
def test_a_diverging_adam_run_stops_with_one_line(data, tmp_path, runner, lr):
    """--lr 1e30 used to end with exit 0 and maps of 1e29."""
    out = tmp_path / "r"
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out), "--backend", "cpu",
                               "--optimizer", "adam", "--epochs", "3", "--lr", lr])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "diverged in epoch 1" in lines[0] and "lower --lr" in lines[0]
    assert not (out / "run_class001.mrc").exists() and not list(out.glob("checkpoints/*.h5"))


@pytest.mark.parametrize("kind, fragment", [
    ("huge", "do not give a usable reconstruction"),
    ("constant", "have no noise outside the particle"),
    ("nan", "contains NaN or infinite pixels"),
])
def test_degenerate_images_stop_adam_too(tmp_path, runner, kind, fragment):
    from numba_recon.sim.simulate import simulate_dataset

    path = tmp_path / "sim"
    simulate_dataset(path, n_particles=64, box_size=16, pixel_size_angstrom=4.0, snr=0.5, seed=2,
                     particles_per_stack=64)
    for stack in (path / "Particles").glob("*.mrcs"):
        with mrcfile.open(stack, "r+") as m:
            if kind == "huge":
                m.data[...] = m.data * np.float32(1e30)
            elif kind == "constant":
                m.data[...] = np.float32(3.0)
            else:
                m.data[5, 3, 3] = np.nan
    out = tmp_path / "out"
    res = runner.invoke(main, ["-q", "run", str(path / "particles.star"), "-o", str(out), "--backend", "cpu",
                               "--optimizer", "adam"])
    assert res.exit_code == 2, res.output
    assert fragment in res.output.strip().splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("box", [1, 2, 3, 6])
def test_tiny_boxes_are_refused_before_any_work(tmp_path, runner, box):
    from numba_recon.sim.simulate import simulate_dataset

    path = tmp_path / "sim"
    simulate_dataset(path, n_particles=16, box_size=16, pixel_size_angstrom=4.0, snr=0.5, seed=2,
                     particles_per_stack=16, max_shift_px=0.0)
    stack = next((path / "Particles").glob("*.mrcs"))
    with mrcfile.open(stack) as m:
        small = np.ascontiguousarray(m.data[:, :box, :box])
    with mrcfile.new(stack, overwrite=True) as m:
        m.set_data(small)
        m.voxel_size = 4.0
    import starfile

    star = starfile.read(path / "particles.star", always_dict=True)
    star["optics"]["rlnImageSize"] = box
    starfile.write(star, path / "particles.star", overwrite=True)
    out = tmp_path / "out"
    res = runner.invoke(main, ["-q", "run", str(path / "particles.star"), "-o", str(out), "--backend", "cpu"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert f"{box} x {box} px" in line and "at least 8 px" in line and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--seed", "-1"], "--seed must be an integer from 0 to"),
    (["--seed", str(2**63)], "--seed must be an integer from 0 to"),
    (["--radius", "0.001", "--optimizer", "adam"], "--radius 0.001 px is too small"),
    (["--initial-lowpass", "0"], "--initial-lowpass must be a finite positive"),
])
def test_bad_values_are_refused_before_any_work(data, tmp_path, runner, args, fragment):
    out = tmp_path / "out"
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out), "--backend", "cpu", *args])
    assert res.exit_code == 2, res.output
    assert fragment in res.output and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize("code, problem, fix", [
    (30, "read-only file system", "remount it read-write"),  # EROFS
    (13, "permission denied", "make the folder writable"),  # EACCES
    (28, "no space left on device", "free space"),  # ENOSPC
])
def test_write_failures_name_their_cause_and_its_fix(code, problem, fix):
    """A read-only file system used to be told to "free space"."""
    import errno
    import os

    from numba_recon.io.atomic import write_error

    assert getattr(errno, {30: "EROFS", 13: "EACCES", 28: "ENOSPC"}[code]) == code
    # as the OS raises it, and as HDF5 reports it through h5py (the errno only in the text)
    for err in (OSError(code, os.strerror(code), "ckpt.h5"),
                OSError(f"Unable to synchronously create file (unable to open file: name = 'ckpt.h5', errno = {code}, "
                        f"error message = '{os.strerror(code)}', flags = 13, o_flags = 242)")):
        text = str(write_error(Path("out/checkpoints/ckpt_e0001.h5"), err))
        assert problem in text and fix in text, text
        if code != 28:
            assert "free space" not in text


def test_a_read_only_folder_is_not_told_to_free_space():
    import errno

    import click

    from numba_recon.cli._common import handle_errors

    @click.command()
    @handle_errors
    def command():
        raise OSError(errno.EROFS, "Read-only file system", "out/history.csv")

    from click.testing import CliRunner

    res = CliRunner().invoke(command, [])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith("numba-recon: error: out/history.csv: read-only file system") and "free space" not in line


@pytest.mark.slow
@pytest.mark.parametrize("epoch, fragment", [
    (2, "interrupted after 2 complete epoch(s) of 4; the newest checkpoint is epoch 2: continue with  "
        "numba-recon run --resume "),
    (0, "before the first checkpoint"),
])
def test_ctrl_c_says_how_far_the_run_got_and_how_to_continue(data, tmp_path, epoch, fragment, cli):
    """Ctrl-C used to print only "Aborted!"."""
    out = tmp_path / "run"
    res = cli(["-q", "run", str(data / "particles.star"), "-o", str(out), "--backend", "cpu", "--optimizer", "adam",
               "--epochs", "4"], env={"NUMBA_RECON_FAULT": f"int:epoch={epoch}"}, timeout=600, simulator=True)
    assert res.returncode == 130, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in res.stderr, res.stderr
    if epoch:
        # the command it names continues the run
        resume = lines[0].split("continue with  ", 1)[1].split()
        assert resume[:3] == ["numba-recon", "run", "--resume"]
        done = cli(["-q", *resume[1:], "--backend", "cpu"], timeout=600, simulator=True)
        assert done.returncode == 0, done.stderr
        assert (out / "NUMBA_RECON_JOB_EXIT_SUCCESS").exists()


@pytest.mark.slow
def test_copied_stacks_are_refused_or_dropped(data, tmp_path, runner, clean_run):
    """A stack copied under another name, its rows repeated with the copies in the opposite half
    sets: the names differ, so only the pixels tell (before: Nyquist reported for a 7.4 A map)."""
    import starfile

    dest = tmp_path / "data"
    shutil.copytree(data, dest)
    star = starfile.read(dest / "particles.star", always_dict=True)
    table = star["particles"]
    for stack in sorted((dest / "Particles").glob("stack_*.mrcs")):
        shutil.copyfile(stack, stack.with_name(stack.name.replace("stack_", "copy_")))
    copies = table.copy()
    copies["rlnImageName"] = copies["rlnImageName"].str.replace("stack_", "copy_")
    if "rlnRandomSubset" in copies:
        copies["rlnRandomSubset"] = 3 - copies["rlnRandomSubset"]
    star["particles"] = pd.concat([table, copies], ignore_index=True)
    starfile.write(star, dest / "dup.star", overwrite=True)
    out = tmp_path / "refused"
    res = runner.invoke(main, ["-q", "run", str(dest / "dup.star"), "-o", str(out), "--backend", "cpu"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert "1200 particle image(s) are pixel-for-pixel copies" in line and "row 1201 (000001@copy_0001.mrcs)" in line
    assert not out.exists()
    summary, text = _run_logged(runner, dest / "dup.star", tmp_path / "dropped", "--drop-duplicates")
    assert "dropped 1200 particle row(s) whose image copies an earlier row's" in text
    assert summary["resolution_angstrom"] == pytest.approx(clean_run[1]["resolution_angstrom"], rel=0.05)


@pytest.mark.slow
def test_info_check_pixels_agrees_with_run(data, tmp_path, runner):
    """``info --check-pixels`` said "ready" for pixels of 1e30 and for copied stacks, which ``run``
    refuses."""
    huge = _copy_with_stacks(data, tmp_path / "huge", lambda images, k: images * np.float32(1e30))
    res = runner.invoke(main, ["info", str(huge), "--check-pixels"])
    assert res.exit_code == 2 and "pixel values beyond 1e15" in res.output, res.output
    import starfile

    dest = tmp_path / "copied"
    shutil.copytree(data, dest)
    shutil.copyfile(dest / "Particles" / "stack_0001.mrcs", dest / "Particles" / "copy_0001.mrcs")
    star = starfile.read(dest / "particles.star", always_dict=True)
    extra = star["particles"].iloc[:3].copy()
    extra["rlnImageName"] = extra["rlnImageName"].str.replace("stack_", "copy_")
    star["particles"] = pd.concat([star["particles"], extra], ignore_index=True)
    starfile.write(star, dest / "particles.star", overwrite=True)
    res = runner.invoke(main, ["info", str(dest / "particles.star"), "--check-pixels"])
    assert res.exit_code == 0, res.output
    assert "not ready" in res.output and "3 particle image(s) are pixel-for-pixel copies" in res.output
    assert "particle 1201 copies particle 1" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["run", "{dir}", "-o", "{tmp}/o"], "is a directory"),
    (["run", "{star}", "--root", "{star}", "-o", "{tmp}/o"], "--root"),
    (["run", "{star}", "-o", "{tmp}/o", "--no-such-option"], "No such option '--no-such-option'"),
    (["fsc", "{dir}", "{dir}"], "is a directory"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_click_usage_errors_are_one_line(data, tmp_path, args, fragment):
    """A folder given as the particle file used to print click's usage block."""
    from click.testing import CliRunner

    folder = tmp_path / "folder.star"
    folder.mkdir()
    subst = {"dir": str(folder), "tmp": str(tmp_path), "star": str(data / "particles.star")}
    res = CliRunner().invoke(main, [a.format(**subst) for a in args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numba-recon: error: ") and fragment in lines[0], res.output
    assert "--help" in lines[0] and "Usage:" not in res.output
