"""What a run folder records of itself and how the command line fits clusters: note.txt, run.log,
command.txt across resumes, the kept checkpoints, the final lines, --threads, -q/-v anywhere."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from numba_recon.cli import hoist_verbosity, main

COMMON = ["--backend", "cpu", "--optimizer", "adam", "--batch-size", "64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from numba_recon.sim.simulate import simulate_dataset

    path = tmp_path_factory.mktemp("records") / "data"
    simulate_dataset(path, n_particles=200, box_size=16, pixel_size_angstrom=4.0, snr=0.5, seed=4,
                     particles_per_stack=100)
    return path


@pytest.mark.slow
def test_note_log_and_command_across_resume_and_overwrite(data, tmp_path, cli):
    run = functools.partial(cli, env={"NUMBA_NUM_THREADS": "2"}, timeout=600, simulator=True)
    out = tmp_path / "run"
    first = ["run", str(data / "particles.star"), "-o", str(out), *COMMON, "--epochs", "2", "-q"]
    assert run(first).returncode == 0
    res = run(["run", "--resume", str(out), "--epochs", "3", "--backend", "cpu"])
    assert res.returncode == 0, res.stderr
    note = (out / "note.txt").read_text()
    assert note.count(" ++++ ") == 2 and "--resume" in note.splitlines()[3]
    # command.txt keeps the command that started the run
    assert (out / "command.txt").read_text().strip().endswith("--epochs 2 -q")
    log = (out / "run.log").read_text()
    # the file has the INFO lines that -q hid on the terminal, and both sessions
    assert "epoch 1/2" in log and "epoch 3/3" in log and log.count("==== ") == 2
    assert "epoch 1/2" not in run(first[:-1] + ["--overwrite", "-q"]).stderr
    # --overwrite appends: the folder's history stays
    assert (out / "note.txt").read_text().count(" ++++ ") == 3
    assert (out / "run.log").read_text().count("==== ") == 3


@pytest.mark.slow
def test_only_the_newest_checkpoint_is_kept_after_success(data, tmp_path, runner):
    out = tmp_path / "run"
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out), *COMMON, "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "checkpoints").glob("*.h5")) == ["ckpt_e0003.h5"]
    out2 = tmp_path / "run2"
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out2), *COMMON, "--epochs", "3",
                               "--keep-checkpoints", "2"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out2 / "checkpoints").glob("*.h5")) == ["ckpt_e0002.h5", "ckpt_e0003.h5"]
    # the kept checkpoint resumes
    res = runner.invoke(main, ["-q", "run", "--resume", str(out), "--epochs", "4", "--backend", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(tmp_path / "r3"), *COMMON,
                               "--keep-checkpoints", "0"])
    assert res.exit_code == 2 and "--keep-checkpoints must be positive" in res.output


def test_final_lines_give_the_masked_resolution_with_a_mask(data, tmp_path, runner):
    from numba_recon.evaluate.mask import auto_threshold, create_mask
    from numba_recon.io.mrc import read_volume, write_volume

    truth, _ = read_volume(data / "truth.mrc")
    mask = tmp_path / "mask.mrc"
    write_volume(mask, create_mask(truth, auto_threshold(truth), extend_px=1, soft_edge_px=3), 4.0)
    out = tmp_path / "run"
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out), *COMMON, "--epochs", "2",
                               "--mask", str(mask)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    line = next(x for x in res.output.splitlines() if x.startswith("Resolution (masked"))
    assert f"{summary['postprocess']['resolution_angstrom']:.2f} A" in line and str(mask) in line


def test_epoch_lines_carry_an_eta(data, tmp_path, runner):
    res = runner.invoke(main, ["run", str(data / "particles.star"), "-o", str(tmp_path / "r"), *COMMON, "--epochs",
                               "3"])
    assert res.exit_code == 0, res.output
    lines = [x for x in res.output.splitlines() if " epoch " in x]
    assert len(lines) == 3 and all(" ETA " in x for x in lines) and lines[-1].endswith("ETA done")


def test_verbosity_flags_work_after_the_subcommand():
    assert hoist_verbosity(["run", "a.star", "-o", "x", "-q"]) == ["-q", "run", "a.star", "-o", "x"]
    assert hoist_verbosity(["run", "-vv", "a.star"]) == ["-vv", "run", "a.star"]
    assert hoist_verbosity(["run", "a.star", "--", "-q"]) == ["run", "a.star", "--", "-q"]
    assert hoist_verbosity(["info", "a.star"]) == ["info", "a.star"]


def test_threads_default_to_the_cores_over_the_ranks_on_the_node(monkeypatch):
    import numba

    from numba_recon import threads

    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads.default_threads(1) == 8 and threads.default_threads(4) == 2 and threads.default_threads(16) == 1
    before = numba.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and numba.get_num_threads() == 1 and threads.fft_workers() == 1
    finally:
        threads.set_threads(before)


def test_threads_option_and_its_bad_values(data, tmp_path, runner):
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(tmp_path / "r"), *COMMON,
                               "--epochs", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(tmp_path / "r2"), *COMMON,
                               "--threads", "0"])
    assert res.exit_code == 2 and "--threads must be positive" in res.output


def test_only_rank_zero_logs_under_mpi(monkeypatch):
    import logging

    from numba_recon.cli import configure_logging, launch_rank

    monkeypatch.setenv("PMI_RANK", "1")
    assert launch_rank() == 1
    configure_logging(0)
    assert logging.getLogger().level == logging.ERROR
    monkeypatch.setenv("PMI_RANK", "0")
    configure_logging(0)
    assert logging.getLogger().level == logging.INFO


def test_output_option_and_backend_auto_everywhere(data, tmp_path, runner):
    res = runner.invoke(main, ["-q", "simulate", "--output", str(tmp_path / "sim"), "--n-particles", "8",
                               "--box-size", "16"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["-q", "project", str(data / "truth.mrc"), "--star", str(data / "particles.star"),
                               "-o", str(tmp_path / "p.mrcs"), "--first", "2"])
    assert res.exit_code == 0, res.output
    from numba_recon.cli.project import project

    backend = next(p for p in project.params if p.name == "backend")
    assert backend.default == "auto"


def test_truth_option_of_run(data, tmp_path, runner):
    """--truth adds the map-vs-truth FSC; a truth that does not fit stops the run before any work."""
    out = tmp_path / "r"
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(out), *COMMON, "--epochs", "1",
                               "--truth", str(data / "truth.mrc")])
    assert res.exit_code == 0, res.output
    truth = json.loads((out / "summary.json").read_text())["truth"]
    assert Path(truth["map"]) == (data / "truth.mrc").resolve() and truth["resolution_angstrom"] > 0
    assert (out / "fsc_truth.csv").is_file()
    from numba_recon.io.mrc import write_volume

    import numpy as np

    wrong = tmp_path / "wrong.mrc"
    write_volume(wrong, np.zeros((8, 8, 8), np.float32), 4.0)
    res = runner.invoke(main, ["-q", "run", str(data / "particles.star"), "-o", str(tmp_path / "r2"), *COMMON,
                               "--truth", str(wrong)])
    assert res.exit_code == 2 and "differs from the map's 16" in res.output
    assert not (tmp_path / "r2").exists()
