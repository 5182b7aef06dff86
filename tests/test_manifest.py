"""The output manifest: ``--overwrite`` removes exactly what numba-recon wrote, never a file of the user.

Small runs (300 particles, box 24, two passes) through the command line: in-process with click's
runner, or as a ``python -m numba_recon`` subprocess where the run is SIGKILLed
(``NUMBA_RECON_FAULT=kill:epoch=E``). Budget: about 40 s on 2 cores.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.manifest import MANIFEST_NAME

COMMON = ["--epochs", "2", "--backend", "cpu", "--batch-size", "32", "--seed", "5", "--no-early-stop"]
ANGPIX = 4.0  # pixel size of the shared data set (sim_box24)


def _files(out: Path) -> set[str]:
    """Every file (and link) under ``out``, relative, with ``/`` separators."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()}


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


def _assert_manifest_covers(out: Path, user: set[str] = frozenset()) -> dict:
    """The manifest lists every file of ours in ``out`` with its current size and time, and nothing else."""
    data = _manifest(out)
    assert data["command"] == "run"
    from numba_recon.manifest import JOURNALS

    ours = _files(out) - set(user) - {MANIFEST_NAME, *JOURNALS}
    assert set(data["files"]) == ours
    for rel, entry in data["files"].items():
        st = (out / rel).stat()
        assert (entry["size"], entry["mtime_ns"]) == (st.st_size, st.st_mtime_ns), rel
    return data


@pytest.fixture(scope="module")
def star(sim_box24) -> str:
    """A small simulated data set (box 24, 4 A/px)."""
    return str(sim_box24 / "particles.star")


@pytest.fixture(scope="module")
def mask(sim_box24, tmp_path_factory) -> Path:
    """A soft mask made from the data set's truth."""
    from numba_recon.evaluate.mask import auto_threshold, create_mask
    from numba_recon.io.mrc import read_volume, write_volume

    truth, _ = read_volume(sim_box24 / "truth.mrc")
    mask = create_mask(truth, auto_threshold(truth), extend_px=2, soft_edge_px=4, lowpass_angstrom=15,
                       pixel_size_angstrom=ANGPIX)
    path = tmp_path_factory.mktemp("manifest") / "mask.mrc"
    write_volume(path, mask, ANGPIX)
    return path


def _run(runner, star: str, out: Path, *extra: str, quiet: bool = False):
    res = runner.invoke(main, [*(["-q"] if quiet else []), "run", star, "-o", str(out), *COMMON, *extra])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


# --------------------------------------------------------------------------------------------
# run --overwrite
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_overwrite_keeps_user_files_and_folders_in_checkpoints(star, tmp_path, runner):
    """A file and a sub-folder the user put into checkpoints/ survive ``run --overwrite`` (it used to
    delete every file there and stop with IsADirectoryError on a folder); the warning names them;
    the previous run's checkpoints are gone and the new run's manifest covers exactly its files."""
    out = tmp_path / "run"
    _run(runner, star, out, quiet=True)
    notes = out / "checkpoints" / "notes.txt"
    notes.write_text("my notes")
    (out / "checkpoints" / "mine").mkdir()
    (out / "checkpoints" / "mine" / "inner.h5").write_bytes(b"precious")
    (out / "checkpoints" / "ckpt_e0099.h5").write_bytes(b"a file of mine named like a checkpoint")
    before = _files(out)
    res = _run(runner, star, out, "--overwrite", "--epochs", "3")
    assert notes.read_text() == "my notes"
    assert (out / "checkpoints" / "mine" / "inner.h5").read_bytes() == b"precious"
    assert (out / "checkpoints" / "ckpt_e0099.h5").read_bytes() == b"a file of mine named like a checkpoint"
    assert "checkpoints/notes.txt" in res.stderr and "checkpoints/mine/" in res.stderr
    assert "checkpoints/ckpt_e0099.h5" in res.stderr
    user = {"checkpoints/notes.txt", "checkpoints/mine/inner.h5", "checkpoints/ckpt_e0099.h5"}
    # pruning kept the newest of *our* checkpoints (--keep-checkpoints 1 after success) and left the
    # user's look-alike alone
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt_e*.h5")) == ["ckpt_e0003.h5", "ckpt_e0099.h5"]
    assert "checkpoints/ckpt_e0002.h5" in before
    listed = _assert_manifest_covers(out, user)
    assert {"checkpoints/ckpt_e0003.h5", "checkpoints/latest.json", "run_class001.mrc",
            "NUMBA_RECON_JOB_EXIT_SUCCESS"} <= set(listed["files"])
    assert [s["mode"] for s in listed["sessions"]] == ["overwrite"]
    from numba_recon import manifest

    assert manifest.active_for(out / "later.txt") is None  # recording ends with the command


@pytest.mark.slow
def test_overwrite_without_mask_leaves_no_stale_postprocess_or_scores(star, mask, tmp_path, runner):
    """A run with --mask and a robust loss (postprocess/, plots/scores.png) followed by
    ``run --overwrite`` without them: none of the old run's post-processing or score files stay
    beside the new maps; only a file the user edited since is kept, and named."""
    out = tmp_path / "run"
    _run(runner, star, out, "--mask", str(mask), "--loss", "trimmed", quiet=True)
    assert (out / "postprocess" / "postprocess.mrc").is_file() and (out / "plots" / "scores.png").is_file()
    assert "postprocess" in _assert_manifest_covers(out)["folders"]
    edited = out / "postprocess" / "postprocess.star"
    edited.write_text(edited.read_text() + "# my comment\n")
    res = _run(runner, star, out, "--overwrite")
    assert sorted(p.name for p in (out / "postprocess").iterdir()) == ["postprocess.star"]
    assert edited.read_text().endswith("# my comment\n")
    assert "postprocess/postprocess.star" in res.stderr
    # the score plot is drawn for every loss: the new one is the new run's (listed with its own size and time)
    assert "postprocess" not in json.loads((out / "summary.json").read_text())
    _assert_manifest_covers(out, {"postprocess/postprocess.star"})
    # without anything of the user's left in it, the folder the old run created goes too
    edited.unlink()
    _run(runner, star, out, "--overwrite", quiet=True)
    assert not (out / "postprocess").exists()
    _assert_manifest_covers(out)


@pytest.mark.slow
def test_overwrite_of_a_folder_without_manifest_removes_nothing_else(star, tmp_path, runner):
    """An older run folder (no manifest) or a user folder: a file of another with the name of an
    output is refused (it used to be replaced), before anything is written; once it is moved away,
    everything else stays and is named in the warning."""
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    (out / "postprocess").mkdir()
    (out / "run_class001.mrc").write_bytes(b"old map")
    (out / "postprocess" / "postprocess.mrc").write_bytes(b"old post-processing")
    (out / "checkpoints" / "ckpt_e0005.h5").write_bytes(b"old checkpoint")
    (out / "readme.txt").write_text("about this folder")
    (out / "NUMBA_RECON_JOB_EXIT_SUCCESS").touch()
    before = {rel: (out / rel).read_bytes() for rel in _files(out)}
    res = runner.invoke(main, ["-q", "run", star, "-o", str(out), *COMMON, "--overwrite"])
    assert res.exit_code == 2 and "run_class001.mrc" in res.output.strip().splitlines()[-1], res.output
    assert {rel: (out / rel).read_bytes() for rel in _files(out)} == before
    (out / "run_class001.mrc").rename(tmp_path / "my_map.mrc")
    res = _run(runner, star, out, "--overwrite")
    assert (out / "postprocess" / "postprocess.mrc").read_bytes() == b"old post-processing"
    assert (out / "checkpoints" / "ckpt_e0005.h5").read_bytes() == b"old checkpoint"
    assert (out / "readme.txt").read_text() == "about this folder"
    for name in ("postprocess/postprocess.mrc", "checkpoints/ckpt_e0005.h5", "readme.txt"):
        assert name in res.stderr, name
    _assert_manifest_covers(out, {"postprocess/postprocess.mrc", "checkpoints/ckpt_e0005.h5", "readme.txt"})


@pytest.mark.slow
def test_overwrite_refuses_to_replace_a_changed_output(star, tmp_path, runner):
    """A map of ours that the user changed since (e.g. sharpened in place) is theirs now: refused."""
    out = tmp_path / "run"
    _run(runner, star, out, quiet=True)
    edited = out / "run_class001.mrc"
    edited.write_bytes(edited.read_bytes() + b"\0")
    res = runner.invoke(main, ["-q", "run", star, "-o", str(out), *COMMON, "--overwrite"])
    assert res.exit_code == 2 and "run_class001.mrc" in res.output, res.output
    assert edited.read_bytes().endswith(b"\0")


# --------------------------------------------------------------------------------------------
# killed runs and resume
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_run_then_overwrite_removes_exactly_its_files(star, tmp_path, cli):
    """A run SIGKILLed after its first pass leaves a manifest covering every file it wrote
    (checkpoints included); ``--overwrite`` then removes exactly those, and the user's files stay."""
    out = tmp_path / "run"
    res = cli(["-q", "run", star, "-o", str(out), *COMMON], env={"NUMBA_RECON_FAULT": "kill:epoch=1"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    killed = _assert_manifest_covers(out)
    assert "checkpoints/ckpt_e0001.h5" in killed["files"] and "half_sets.csv" in killed["files"]
    user = {"checkpoints/mine.txt", "plots/mine.png", "notes.txt"}
    for rel in user:
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_text(rel)
    # the next run is killed before its first pass, so what is left shows what --overwrite removed
    res = cli(["-q", "run", star, "-o", str(out), *COMMON, "--overwrite"], env={"NUMBA_RECON_FAULT": "kill:epoch=0"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    second = _assert_manifest_covers(out, user)
    assert _files(out) == user | set(second["files"]) | {MANIFEST_NAME, "note.txt", "run.log"}
    assert not set(killed["files"]) - set(second["files"]) & _files(out)
    assert not (out / "checkpoints" / "ckpt_e0001.h5").exists()
    for rel in user:
        assert (out / rel).read_text() == rel


@pytest.mark.slow
def test_resume_continues_the_manifest(star, tmp_path, cli):
    """Killed after pass 1, resumed to the end: one manifest, two sessions, listing every file the
    run wrote with its final size and time, and not the checkpoints pruning removed."""
    out = tmp_path / "run"
    epochs = ["--epochs", "4", *COMMON[2:]]
    res = cli(["-q", "run", star, "-o", str(out), *epochs], env={"NUMBA_RECON_FAULT": "kill:epoch=2"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert "checkpoints/ckpt_e0002.h5" in _assert_manifest_covers(out)["files"]
    (out / "checkpoints" / "keep.txt").write_text("mine")
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 0, res.stderr
    final = _assert_manifest_covers(out, {"checkpoints/keep.txt"})
    assert [s["mode"] for s in final["sessions"]] == ["new", "resume"]
    # after success the newest checkpoint is kept (--keep-checkpoints 1)
    assert sorted(r for r in final["files"] if r.startswith("checkpoints/ckpt")) == ["checkpoints/ckpt_e0004.h5"]
    assert {"half_sets.csv", "history.csv", "run_class001.mrc", "report.html", "plots/fsc.png",
            "NUMBA_RECON_JOB_EXIT_SUCCESS"} <= set(final["files"])
    assert final["temporary"] == []
    assert (out / "checkpoints" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# checkpoint pruning
# --------------------------------------------------------------------------------------------

def test_pruning_deletes_only_our_checkpoints(tmp_path):
    from numba_recon.checkpoint import Checkpoint, save_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    theirs = folder / "ckpt_e0000.h5"
    theirs.write_bytes(b"not ours")
    vol = np.zeros((2, 4, 4, 4), np.float32)
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, Checkpoint(epoch=epoch, step=epoch, volumes=vol, adam_m=vol, adam_v=vol,
                                             adam_t=0))
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt_e0000.h5", "ckpt_e0002.h5", "ckpt_e0003.h5",
                                                        "latest.json"]
    assert theirs.read_bytes() == b"not ours"


# --------------------------------------------------------------------------------------------
# simulate --overwrite
# --------------------------------------------------------------------------------------------

def test_simulate_overwrite_keeps_user_and_user_replaced_stacks(tmp_path, runner):
    """``simulate --overwrite`` removes the earlier data set's stacks it wrote, not a stack the user
    added (Particles/stack_9999.mrcs) nor one the user replaced; the warning names both."""
    out = tmp_path / "sim"
    args = ["simulate", "-o", str(out), "--box-size", "16", "--particles-per-stack", "10"]
    res = runner.invoke(main, ["-q", *args, "--n-particles", "30"])
    assert res.exit_code == 0, res.output
    (out / "Particles" / "stack_9999.mrcs").write_bytes(b"my stack")
    (out / "Particles" / "stack_0003.mrcs").write_bytes(b"my replacement")
    res = runner.invoke(main, [*args, "--n-particles", "15", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "Particles").iterdir()) == [
        "stack_0001.mrcs", "stack_0002.mrcs", "stack_0003.mrcs", "stack_9999.mrcs"]
    assert (out / "Particles" / "stack_9999.mrcs").read_bytes() == b"my stack"
    assert (out / "Particles" / "stack_0003.mrcs").read_bytes() == b"my replacement"
    assert "Particles/stack_9999.mrcs" in res.stderr and "Particles/stack_0003.mrcs" in res.stderr
    again = json.loads((out / "simulation.json").read_text())["manifest"]["files"]
    assert set(again) == {"Particles/stack_0001.mrcs", "Particles/stack_0002.mrcs", "particles.star", "truth.mrc",
                          "junk.csv"}
    for rel, entry in again.items():
        st = (out / rel).stat()
        assert (entry["size"], entry["mtime_ns"]) == (st.st_size, st.st_mtime_ns), rel
    # nothing hidden is left behind (no staging folder)
    assert sorted(p.name for p in out.iterdir()) == ["Particles", "junk.csv", "particles.star", "simulation.json",
                                                     "truth.mrc"]


def test_simulate_leftover_staging_of_a_killed_run_is_removed(tmp_path):
    """A simulate killed while writing leaves its staging folder with its own manifest; the next
    ``--overwrite`` removes the files that manifest proves ours, and keeps a file of the user's."""
    from numba_recon import manifest
    from numba_recon.io.mrc import write_stack
    from numba_recon.sim.simulate import simulate_dataset

    out = tmp_path / "sim"
    simulate_dataset(out, n_particles=10, box_size=16)
    staging = out / ".simulate-partial-0badc0de"
    m = manifest.activate(manifest.Manifest(staging, "simulate-staging"))
    staging.mkdir()
    m.begin_recording("new")
    try:
        write_stack(staging / "Particles" / "stack_0001.mrcs", np.zeros((2, 16, 16), np.float32), 2.0)
    finally:
        manifest.deactivate(m)
    assert "Particles/stack_0001.mrcs" in json.loads((staging / MANIFEST_NAME).read_text())["files"]
    other = out / ".simulate-partial-12345678"
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    simulate_dataset(out, n_particles=10, box_size=16, overwrite=True)
    assert not staging.exists()
    assert (other / "mine.txt").read_text() == "mine"


@pytest.mark.slow
def test_report_command_keeps_the_manifest_complete(star, tmp_path, runner):
    """``numba-recon report OUT`` redraws plots and the page: the manifest lists the new files, so a
    later ``--overwrite`` still knows them as the run's own."""
    out = tmp_path / "run"
    _run(runner, star, out, quiet=True)
    page = out / "report.html"
    old = page.stat().st_mtime_ns
    import time

    time.sleep(0.02)
    res = runner.invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert page.stat().st_mtime_ns != old
    _assert_manifest_covers(out)
