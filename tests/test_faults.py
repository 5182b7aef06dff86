"""Faults: SIGKILL at random points, kills during checkpoint writes, damaged checkpoints, a killed MPI
rank, a full disk, a file-size limit; and the resident memory of reading a large stack. After each
fault the run folder holds only complete files under their final names, and resuming gives maps
bitwise identical to an uninterrupted run (CPU backend, one thread, same number of ranks).

Every run is a real ``python -m numba_recon`` subprocess on a small simulated data set (300
particles, box 24). Budget: about 60 s on 2 cores; the MPI tests need ``mpiexec`` (mpich extra), the
disk-full tests need root and ``mount`` (a tmpfs with a size limit), and are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import h5py
import mrcfile
import numpy as np
import pytest

from numba_recon.checkpoint import load_checkpoint
from numba_recon.errors import InputFileError

EPOCHS = 10
COMMON = ["--epochs", str(EPOCHS), "--backend", "cpu", "--batch-size", "32", "--seed", "5", "--no-early-stop"]
HALF_MAPS = ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc")
ERROR_PREFIX = "numba-recon: error: "
# history.csv columns that must repeat exactly (the others are timings)
HISTORY_EXACT = ("epoch", "train_loss", "cv_loss", "resolution_angstrom", "resolution_05_angstrom", "kept_fraction")


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll ``condition`` every 2 ms until it holds; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before the kill point:\n"
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.002)


def _latest_epoch(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoints" / "latest.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _error_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _is_temporary(name: str) -> bool:
    """Names the writers use before renaming a finished file into place."""
    return name.endswith((".tmp", ".tmp.png"))


def assert_outputs_complete(out: Path) -> list[str]:
    """Every file under its final name in a run folder is complete and readable; returns their names."""
    import starfile

    names = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.name
        if _is_temporary(name) or name == "filler":
            continue
        names.append(str(path.relative_to(out)))
        if name.endswith(".mrc"):
            with mrcfile.open(path, permissive=False) as mrc:
                assert mrc.data is not None and np.isfinite(mrc.data).all(), name
        elif name.endswith(".h5"):
            load_checkpoint(path)  # CRCs and the `complete` attribute
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".csv"):
            text = path.read_text()
            assert text.endswith("\n"), name
            widths = {line.count(",") for line in _table_lines(text)}  # "#" lines: version and command
            assert len(widths) == 1, name
        elif name.endswith(".star"):
            assert path.read_text().endswith("\n"), name
            assert starfile.read(path, always_dict=True), name
        elif name.endswith(".png"):
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), name
        elif name.endswith(".html"):
            assert path.read_text().rstrip().endswith("</html>"), name
        elif name.endswith(".txt"):
            assert path.read_text().endswith("\n"), name
    return names


def _maps(out: Path) -> np.ndarray:
    return np.stack([mrcfile.read(out / name) for name in HALF_MAPS])


def _table_lines(text: str) -> list[str]:
    """The lines of a CSV output without its "#" lines (version and command line, which name the
    output folder and so differ between runs)."""
    return [line for line in text.splitlines() if not line.startswith("#")]


def _history(out: Path) -> list[tuple[str, ...]]:
    lines = _table_lines((out / "history.csv").read_text())
    header = lines[0].split(",")
    keep = [header.index(c) for c in HISTORY_EXACT]
    return [tuple(row.split(",")[k] for k in keep) for row in lines[1:]]


def assert_same_result(out: Path, ref: Path) -> None:
    """Bitwise-identical maps, identical per-particle scores, half split and history."""
    import pandas as pd
    import starfile

    np.testing.assert_array_equal(_maps(out), _maps(ref))
    np.testing.assert_array_equal(mrcfile.read(out / "run_class001.mrc"), mrcfile.read(ref / "run_class001.mrc"))
    a = starfile.read(out / "run_data.star", always_dict=True)["particles"]
    b = starfile.read(ref / "run_data.star", always_dict=True)["particles"]
    np.testing.assert_array_equal(a["rlnRandomSubset"].to_numpy(), b["rlnRandomSubset"].to_numpy())
    a = pd.read_csv(out / "run_data_scores.csv", comment="#")
    b = pd.read_csv(ref / "run_data_scores.csv", comment="#")
    for column in ("score", "loss", "half_set"):
        np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(), err_msg=column)
    assert _table_lines((out / "half_sets.csv").read_text()) == _table_lines((ref / "half_sets.csv").read_text())
    assert _history(out) == _history(ref)
    assert (out / "NUMBA_RECON_JOB_EXIT_SUCCESS").is_file()


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def star(sim_box24) -> Path:
    return sim_box24 / "particles.star"


@pytest.fixture(scope="module")
def reference(star, tmp_path_factory, cli) -> dict:
    """An uninterrupted run: the result every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("faults_ref") / "ref"
    t0 = time.perf_counter()
    res = cli(["-q", "run", str(star), "-o", str(out), *COMMON])
    assert res.returncode == 0, res.stderr
    seconds = [float(r.split(",")[6]) for r in _table_lines((out / "history.csv").read_text())[1:]]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": out, "wall_s": time.perf_counter() - t0, "epoch_s": float(np.median(seconds)), "bytes": size}


@pytest.fixture(scope="module")
def interrupted(star, reference, tmp_path_factory, cli) -> Path:
    """A run SIGKILLed at the start of its 7th epoch: checkpoints of epochs 5 and 6 on disk."""
    out = tmp_path_factory.mktemp("faults_int") / "run"
    res = cli(["-q", "run", str(star), "-o", str(out), *COMMON], env={"NUMBA_RECON_FAULT": "kill:epoch=6"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert _latest_epoch(out) == 6
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt_*.h5")) == ["ckpt_e0005.h5", "ckpt_e0006.h5"]
    return out


def _copy(template: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(template, out)
    return out


# --------------------------------------------------------------------------------------------
# SIGKILL at random points of a single-process run
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_point_then_resume_is_bitwise_identical(star, reference, tmp_path, seed, cli):
    """Kill after a random number of epochs plus a random fraction of the next epochs (mid-epoch,
    during a checkpoint or history write, wherever it falls), resume, and compare."""
    rng = np.random.default_rng([2024, seed])
    after_epoch = int(rng.integers(1, EPOCHS - 2))
    delay = float(rng.uniform(0.0, 2.0 * reference["epoch_s"]))
    out = tmp_path / "run"
    proc = cli.start(["-q", "run", str(star), "-o", str(out), *COMMON])
    _wait_for(lambda: _latest_epoch(out) >= after_epoch, proc)
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    point = f"killed {delay * 1e3:.1f} ms after checkpoint {after_epoch}; latest then {_latest_epoch(out)}"
    assert_outputs_complete(out)
    assert not (out / "run_class001.mrc").exists(), point
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 0, (point, res.stderr)
    assert_same_result(out, reference["out"])


@pytest.mark.slow
def test_sigkill_while_writing_the_final_outputs(star, reference, tmp_path, cli):
    """A kill after the first map is written, while plots, STAR files and the report are being
    written: what is there is complete, and --resume writes the rest (the same results)."""
    out = tmp_path / "run"
    proc = cli.start(["-q", "run", str(star), "-o", str(out), *COMMON])
    _wait_for(lambda: (out / HALF_MAPS[0]).exists(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    written = assert_outputs_complete(out)
    assert "report.html" not in written and not (out / "NUMBA_RECON_JOB_EXIT_SUCCESS").exists()
    assert _latest_epoch(out) == EPOCHS
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 0, res.stderr
    assert_same_result(out, reference["out"])
    assert {"report.html", "run_model.star", "plots/fsc.png"} <= set(assert_outputs_complete(out))


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint(star, reference, tmp_path, cli):
    """Nothing to resume: --resume says so in one line; a new run with --overwrite starts clean."""
    out = tmp_path / "run"
    res = cli(["-q", "run", str(star), "-o", str(out), *COMMON], env={"NUMBA_RECON_FAULT": "kill:epoch=0"})
    assert res.returncode == -signal.SIGKILL
    assert not list(out.glob("checkpoints/*.h5"))
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 2
    assert "no usable checkpoint" in _error_line(res)
    res = cli(["-q", "run", str(star), "-o", str(out), *COMMON, "--overwrite"])
    assert res.returncode == 0, res.stderr
    assert_same_result(out, reference["out"])


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_after_a_resume(interrupted, reference, tmp_path, cli):
    """Resume a killed run, then die again while writing the next checkpoint (half its data,
    before the rename): the half-written file stays a temporary file that cannot be loaded, the
    newest previous checkpoint survives (the older one made room for the new file, so a full disk
    never holds more than two checkpoints), and a second resume still gives the uninterrupted
    result."""
    out = _copy(interrupted, tmp_path)
    res = cli(["-q", "run", "--resume", str(out)], env={"NUMBA_RECON_FAULT": "kill_during_checkpoint"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    folder = out / "checkpoints"
    assert _latest_epoch(out) == 6
    assert not (folder / "ckpt_e0007.h5").exists()
    with pytest.raises(InputFileError, match="incomplete"):
        load_checkpoint(folder / "ckpt_e0007.h5.tmp")
    assert load_checkpoint(folder / "ckpt_e0006.h5").epoch == 6
    assert not (folder / "ckpt_e0005.h5").exists()
    assert_outputs_complete(out)
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 0, res.stderr
    assert_same_result(out, reference["out"])


# --------------------------------------------------------------------------------------------
# damaged checkpoints, through the command line
# --------------------------------------------------------------------------------------------

def _assert_resumes_to_the_reference(cli, out: Path, reference: dict, *said: str) -> None:
    """``run --resume OUT`` succeeds, its log says every phrase of ``said``, and the result is the
    uninterrupted reference run's."""
    res = cli(["run", "--resume", str(out)])
    assert res.returncode == 0, res.stderr
    for phrase in said:
        assert phrase in res.stderr, (phrase, res.stderr)
    assert_same_result(out, reference["out"])


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous(interrupted, reference, tmp_path, cli):
    out = _copy(interrupted, tmp_path)
    newest = out / "checkpoints" / "ckpt_e0006.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    _assert_resumes_to_the_reference(cli, out, reference, "skipping damaged checkpoint", "ckpt_e0006.h5",
                                     "resuming from epoch 5")


@pytest.mark.slow
def test_silent_corruption_is_caught_by_the_checksums(interrupted, reference, tmp_path, cli):
    """One voxel of the solver's residual changed inside an otherwise valid HDF5 file: only the CRC
    can tell. Without it the run would continue from a wrong state and silently differ."""
    out = _copy(interrupted, tmp_path)
    newest = out / "checkpoints" / "ckpt_e0006.h5"
    with h5py.File(newest, "r+") as h5:
        v = h5["arrays/cg_r"][...]
        v[0, 12, 12, 12] *= 4.0
        h5["arrays/cg_r"][...] = v
    _assert_resumes_to_the_reference(cli, out, reference, "checksum mismatch", "cg_r", "resuming from epoch 5")


@pytest.mark.slow
def test_damaged_latest_json_scans_for_the_newest_checkpoint(interrupted, reference, tmp_path, cli):
    out = _copy(interrupted, tmp_path)
    (out / "checkpoints" / "latest.json").write_text('{"checkpoint": "ckpt_e00')
    _assert_resumes_to_the_reference(cli, out, reference, "latest.json is missing or damaged",
                                     "resuming from epoch 6")


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_clear_error(interrupted, tmp_path, cli):
    out = _copy(interrupted, tmp_path)
    for path in (out / "checkpoints").glob("ckpt_*.h5"):
        path.write_bytes(b"\0" * 4096)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = cli(["-q", "run", "--resume", str(out)])
    assert res.returncode == 2
    line = _error_line(res)
    assert str(out) in line and "no usable checkpoint" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------------
# one MPI rank killed
# --------------------------------------------------------------------------------------------

MPI_COMMON = ["--epochs", "5", "--backend", "cpu", "--batch-size", "32", "--seed", "5", "--no-early-stop"]


@pytest.fixture(scope="module")
def mpi_reference(star, tmp_path_factory, cli) -> Path:
    out = tmp_path_factory.mktemp("faults_mpi_ref") / "ref"
    res = cli(["-q", "run", str(star), "-o", str(out), *MPI_COMMON], mpi=2)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec: install the mpich extra")
@pytest.mark.parametrize("rank", [0, 1])
def test_killed_rank_ends_the_job_and_resume_matches(star, mpi_reference, tmp_path, rank, cli):
    """SIGKILL of rank 0 (the writer) or rank 1 at the start of epoch 3 ends the whole 2-rank job
    with a non-zero status (the other rank does not wait for it; a job still running 120 s later
    counts as a hang); the same job resumed on 2 ranks equals an uninterrupted 2-rank run bitwise."""
    out = tmp_path / "run"
    proc = cli.start(["-q", "run", str(star), "-o", str(out), *MPI_COMMON],
                     env={"NUMBA_RECON_FAULT": f"kill:epoch=3:rank={rank}"}, mpi=2)
    _wait_for(lambda: _latest_epoch(out) >= 3, proc)
    seen = time.monotonic()
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the job was still running 120 s after a rank was killed")
    print(f"rank {rank} killed: the job ended {time.monotonic() - seen:.2f} s after the epoch-3 checkpoint, "
          f"status {proc.returncode}")
    assert proc.returncode != 0
    assert not (out / "run_class001.mrc").exists()
    assert _latest_epoch(out) == 3
    assert_outputs_complete(out)
    res = cli(["-q", "run", "--resume", str(out)], mpi=2)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(_maps(out), _maps(mpi_reference))
    assert _history(out) == _history(mpi_reference)


# --------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs (root only); yields ``fill(free_bytes)``, which leaves that much free."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("needs root to mount a size-limited tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run([mount, "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")

    def fill(free_bytes: int) -> Path:
        filler = disk / "filler"
        st = os.statvfs(disk)
        available = st.f_bavail * st.f_frsize + (filler.stat().st_size if filler.exists() else 0)
        size = max(0, available - int(free_bytes))
        with open(filler, "wb") as f:
            f.write(b"\0" * size)
        return filler

    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("fraction, phase",
                         [(0.1, "first-checkpoint"), (0.45, "later-checkpoint"), (0.85, "outputs")],
                         ids=["first-checkpoint", "later-checkpoint", "outputs"])
def test_disk_full_ends_cleanly_and_resumes(star, reference, small_disk, fraction, phase, cli):
    """With free space for ``fraction`` of a run's outputs, the run stops with one line (exit 2);
    every file under its final name is complete; the epochs already recorded are intact; after
    space is freed the run resumes (or, without a checkpoint, restarts) to the identical result."""
    disk, fill = small_disk
    filler = fill(int(fraction * reference["bytes"]))
    out = disk / "run"
    res = cli(["-q", "run", str(star), "-o", str(out), *COMMON])
    assert res.returncode == 2, res.stderr
    assert "no space left on device" in _error_line(res)
    assert not (out / "NUMBA_RECON_JOB_EXIT_SUCCESS").exists()
    written = assert_outputs_complete(out)
    latest = _latest_epoch(out)
    hit = "first-checkpoint" if latest == 0 else "outputs" if latest == EPOCHS else "later-checkpoint"
    assert hit == phase, (latest, written)
    ref = reference["out"]
    if "half_sets.csv" in written:
        assert _table_lines((out / "half_sets.csv").read_text()) == _table_lines((ref / "half_sets.csv").read_text())
    if "history.csv" in written:
        rows = _history(out)
        assert rows == _history(ref)[: len(rows)]
    filler.unlink()
    for temporary in [p for p in out.rglob("*") if p.is_file() and _is_temporary(p.name)]:
        temporary.unlink()  # what a user frees first; see test_disk_full_leaves_no_temporary_files
    if latest:
        res = cli(["-q", "run", "--resume", str(out)])
    else:
        res = cli(["-q", "run", str(star), "-o", str(out), *COMMON, "--overwrite"])
    assert res.returncode == 0, res.stderr
    assert_same_result(out, ref)


@pytest.mark.slow
def test_disk_full_leaves_no_temporary_files_and_names_the_file(star, reference, small_disk, cli):
    """A failed write removes its temporary file (a half-written checkpoint the size of three maps
    would keep the disk full) and the message names the file that could not be written."""
    disk, fill = small_disk
    fill(int(0.1 * reference["bytes"]))
    out = disk / "run"
    res = cli(["-q", "run", str(star), "-o", str(out), *COMMON])
    assert res.returncode == 2, res.stderr
    line = _error_line(res)
    assert str(out) in line, line
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and _is_temporary(p.name)]
    assert leftovers == []


_LIMITED_RUN = """
import resource, signal, sys
from numba_recon.reduce import get_comm
get_comm()  # MPI first: its shared-memory set-up creates files larger than the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from numba_recon.cli import main
main(sys.argv[2:], prog_name="numba-recon")
"""


@pytest.mark.slow
def test_file_size_limit_during_a_checkpoint_is_one_clear_error(star, reference, tmp_path, cli):
    """A write refused for a reason other than ENOSPC (here EFBIG from a file-size limit; on clusters
    EDQUOT, a full quota) must also end in one line, exit 2, previous outputs intact."""
    out = tmp_path / "run"
    limit = 200_000  # above every text output, below one checkpoint (three maps of 24^3 x 2 halves)
    res = cli([str(limit), "-q", "run", str(star), "-o", str(out), *COMMON], code=_LIMITED_RUN)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _error_line(res)
    assert "checkpoint" in line or "ckpt_e0001.h5" in line, line
    assert_outputs_complete(out)


# --------------------------------------------------------------------------------------------
# resident memory while reading a large stack
# --------------------------------------------------------------------------------------------

def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_a_large_stack_keeps_resident_memory_bounded(tmp_path):
    """An epoch's worth of random minibatches from a 256 MiB stack leaves no file pages mapped into
    the process: memory is bounded by the batch, not by the data read (a memory-mapped read would
    leave up to the whole file counted in RSS, which batch systems may enforce)."""
    from numba_recon.io.mrc import StackReader, write_stack

    n, box = 16384, 64
    path = tmp_path / "large.mrcs"
    write_stack(path, np.zeros((1, box, box), np.float32), 2.0)
    with mrcfile.open(path, mode="r+") as mrc:
        header = mrc.header.copy()
    header.nz = n
    header.mz = 1
    with open(path, "r+b") as f:  # a sparse file: cheap to make, read like any other
        f.write(header.tobytes())
        f.truncate(1024 + n * box * box * 4)
    paths = np.array([str(path)] * 256, dtype=object)
    reader = StackReader()
    reader.read(paths, np.arange(256), box)  # warm-up: imports and first allocations
    before = _rss_file_mib()
    order = np.random.default_rng(0).permutation(n)
    for start in range(0, n, 256):
        images = reader.read(paths, order[start:start + 256], box)
    assert images.shape == (256, box, box) and not images.any()
    grown = _rss_file_mib() - before
    reader.close()
    assert grown < 16, f"{grown:.0f} MiB of the {n * box * box * 4 / 2**20:.0f} MiB stack stayed mapped"
