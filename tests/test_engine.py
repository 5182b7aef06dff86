"""End-to-end reconstructions: outputs, quality against the truth, checkpoints and resume, MPI."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from numba_recon.config import RunConfig
from numba_recon.errors import InputError


def _simulate(path: Path, n: int = 600, box: int = 24, angpix: float = 4.0, seed: int = 1, **kw) -> Path:
    from numba_recon.sim.simulate import simulate_dataset

    args = dict(n_particles=n, box_size=box, pixel_size_angstrom=angpix, snr=0.5, defocus_min_um=1.0,
                defocus_max_um=2.5, astigmatism_angstrom=200.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1,
                max_shift_px=2.0, junk_fraction=0.0, junk_kinds=("noise",), volume_path=None, seed=seed,
                particles_per_stack=250, overwrite=True)
    args.update(kw)
    simulate_dataset(path, **args)
    return path / "particles.star"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("sim"))


def test_run_writes_relion_outputs(small_set, tmp_path, runner):
    from numba_recon.cli import main

    out = tmp_path / "recon"
    res = runner.invoke(main, ["-q", "run", str(small_set), "-o", str(out), "--epochs", "4", "--backend", "cpu",
                               "--batch-size", "64", "--no-early-stop"])
    assert res.exit_code == 0, res.output
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_class001.mrc",
                 "run_model.star", "run_data.star", "history.csv", "summary.json", "report.html", "fsc.csv",
                 "half_sets.csv", "plots/fsc.png", "plots/loss.png", "plots/slices.png", "plots/projections.png",
                 "checkpoints/latest.json", "NUMBA_RECON_JOB_EXIT_SUCCESS"):
        assert (out / name).is_file(), name
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_class001.mrc"):
        assert mrcfile.validate(str(out / name))
        with mrcfile.open(out / name) as m:
            assert m.voxel_size.x == pytest.approx(4.0)
            assert m.data.shape == (24, 24, 24)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["ranks"] == 1 and summary["backend"] == "cpu"
    history = (out / "history.csv").read_text().strip().splitlines()
    assert history[0].startswith("# numba-recon ") and history[1].startswith("# command: ")
    assert len([line for line in history if not line.startswith("#")]) == 5
    assert "Resolution (half maps, FSC 0.143)" in res.output
    # the half maps agree at low resolution: FSC > 0.5 at a quarter of Nyquist
    import starfile

    model = starfile.read(out / "run_model.star", always_dict=True)
    fsc = model["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    assert fsc[24 // 8] > 0.5
    # run_data.star round-trips through the project's reader (its image names are relative to the
    # input's folder, as in the input); the scores are in run_data_scores.csv
    from numba_recon.io.star import read_particle_scores, read_star

    data = read_star(out / "run_data.star", root=small_set.parent)
    assert len(data) == 600
    assert np.isfinite(read_particle_scores(out / "run_data.star", data.table)["score"].to_numpy()).all()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Resolution" in html


def test_refuses_existing_output_without_overwrite(small_set, tmp_path, runner):
    from numba_recon.cli import main

    out = tmp_path / "recon"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = runner.invoke(main, ["run", str(small_set), "-o", str(out), "--epochs", "1"])
    assert res.exit_code == 2
    assert "--overwrite" in res.output
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--keep-fraction", "1.5"], "--keep-fraction"),
    (["--keep-fraction", "0:0.5"], "--keep-fraction"),
    (["--sym", "X9"], "symmetry"),
    (["--lr", "0"], "--lr"),
])
def test_bad_options_one_line_exit_2(small_set, tmp_path, runner, args, fragment):
    from numba_recon.cli import main

    res = runner.invoke(main, ["run", str(small_set), "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert fragment.lower() in res.output.lower()
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_output_folder_is_a_file(small_set, tmp_path, runner):
    from numba_recon.cli import main

    target = tmp_path / "afile"
    target.write_text("x")
    res = runner.invoke(main, ["run", str(small_set), "-o", str(target)])
    assert res.exit_code == 2 and "existing file" in res.output


def test_config_validation():
    with pytest.raises(InputError):
        RunConfig(particles="a.star", out_dir="o", cv_fraction=0.7)
    assert RunConfig(particles="a.star", out_dir="o", loss="sorted").loss == "trimmed"


def _maps(out: Path) -> np.ndarray:
    return np.stack([mrcfile.read(out / f"run_half{h}_class001_unfil.mrc") for h in (1, 2)])


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(small_set, tmp_path, cli):
    common = [str(small_set), "--epochs", "4", "--backend", "cpu", "--batch-size", "100", "--seed", "5",
              "--no-early-stop"]
    ref = tmp_path / "ref"
    res = cli(["-q", "run", *common, "-o", str(ref)])
    assert res.returncode == 0, res.stderr
    out = tmp_path / "killed"
    # SIGKILL at the start of the third epoch
    res = cli(["-q", "run", *common, "-o", str(out)], env={"NUMBA_RECON_FAULT": "kill:epoch=2"})
    assert res.returncode == -signal.SIGKILL
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["epoch"] == 2
    assert not (out / "run_class001.mrc").exists()
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(_maps(out), _maps(ref))
    # the "#" lines name the version and the command, which differ between the two runs
    hist_ref = [line for line in (ref / "history.csv").read_text().splitlines() if not line.startswith("#")]
    hist = [line for line in (out / "history.csv").read_text().splitlines() if not line.startswith("#")]
    assert len(hist) == len(hist_ref) == 5


@pytest.mark.slow
def test_adam_resumes_a_checkpoint_with_a_second_moment_per_voxel(small_set, tmp_path, cli):
    """Checkpoints of earlier versions hold Adam's second moment per voxel; its mean over the map is
    the one number per half the step keeps now, so such a run resumes where it stopped."""
    from numba_recon.checkpoint import load_latest, save_checkpoint

    common = [str(small_set), "--optimizer", "adam", "--epochs", "3", "--backend", "cpu", "--batch-size", "100",
              "--seed", "5"]
    ref = tmp_path / "ref"
    assert cli(["-q", "run", *common, "-o", str(ref)]).returncode == 0
    out = tmp_path / "killed"
    assert cli(["-q", "run", *common, "-o", str(out)], env={"NUMBA_RECON_FAULT": "kill:epoch=2"}).returncode == \
        -signal.SIGKILL
    ckpt = load_latest(out)
    assert ckpt.adam_v.shape == (2,) and (ckpt.adam_v > 0).all()
    ckpt.adam_v = np.broadcast_to(ckpt.adam_v[:, None, None, None], ckpt.adam_m.shape).astype(np.float32)
    save_checkpoint(out, ckpt)
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(_maps(out), _maps(ref))


@pytest.mark.slow
def test_kill_during_checkpoint_keeps_previous(small_set, tmp_path, cli):
    out = tmp_path / "ck"
    res = cli(["-q", "run", str(small_set), "-o", str(out), "--epochs", "1", "--backend", "cpu",
               "--batch-size", "200"])
    assert res.returncode == 0, res.stderr
    res = cli(["-q", "run", "--resume", str(out), "--epochs", "2"], env={"NUMBA_RECON_FAULT": "kill_during_checkpoint"})
    assert res.returncode == -signal.SIGKILL
    from numba_recon.checkpoint import load_latest

    ckpt = load_latest(out)
    assert ckpt is not None and ckpt.epoch == 1  # the interrupted epoch-2 checkpoint never replaced it
    res = cli(["-q", "run", "--resume", str(out), "--epochs", "2"])
    assert res.returncode == 0, res.stderr
    assert load_latest(out).epoch == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, runner):
    from numba_recon.cli import main

    (tmp_path / "empty").mkdir()
    res = runner.invoke(main, ["run", "--resume", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "checkpoint" in res.output


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec: install the mpich extra")
def test_one_and_two_ranks_give_the_same_maps(small_set, tmp_path, cli):
    common = ["-q", "run", str(small_set), "--epochs", "2", "--backend", "cpu", "--batch-size", "100"]
    res1 = cli([*common, "-o", str(tmp_path / "r1")])
    assert res1.returncode == 0, res1.stderr
    res2 = cli([*common, "-o", str(tmp_path / "r2")], mpi=2)
    assert res2.returncode == 0, res2.stderr
    a, b = _maps(tmp_path / "r1"), _maps(tmp_path / "r2")
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel < 1e-5, rel
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["ranks"] == 2


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec: install the mpich extra")
def test_a_failing_rank_aborts_the_job(small_set, tmp_path, cli):
    """The other rank does not wait for the dead one: the job ends (the timeout catches a hang)."""
    res = cli(["-q", "run", str(small_set), "-o", str(tmp_path / "r"), "--epochs", "3", "--backend", "cpu"],
              env={"NUMBA_RECON_FAULT": "kill:epoch=1:rank=1"}, mpi=2)
    assert res.returncode != 0
    assert not (tmp_path / "r" / "run_class001.mrc").exists()


@pytest.mark.slow
def test_cuda_backend_in_the_simulator(tmp_path, runner):
    """The whole engine on the CUDA backend (Numba's CUDA simulator) at a tiny box: the solver's
    first pass (back-projection and gridded sampling density) and one CG pass."""
    from numba_recon.cli import main

    star = _simulate(tmp_path / "tiny", n=16, box=10, angpix=6.0)
    out = tmp_path / "recon"
    res = runner.invoke(main, ["-q", "run", str(star), "-o", str(out), "--epochs", "2", "--backend", "cuda",
                               "--batch-size", "8", "--cv-fraction", "0"])
    assert res.exit_code == 0, res.output
    assert np.isfinite(_maps(out)).all() and np.abs(_maps(out)).max() > 0
    assert json.loads((out / "summary.json").read_text())["solver"]["passes"] == 2
