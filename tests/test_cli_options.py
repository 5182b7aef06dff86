"""Hostile command-line options: every command answers bad values with one clear line and exit 2.

Covered for ``run``, ``simulate``, ``mask``, ``postprocess``, ``fsc``, ``select``, ``convert`` and
``project``: zero and negative sizes, fractions outside (0, 1], unknown symmetry groups, NaN and
infinite numbers, output folders that are files, lie under a file or cannot be written, and sizes
larger than the data (a batch larger than the data set must simply work). After a refused command
nothing has been written. Budget: about 15 s on 2 cores (two tiny reconstructions; everything else
fails before any work).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from numba_recon.cli import main

ERROR_PREFIX = "numba-recon: error: "


# --------------------------------------------------------------------------------------------
# inputs: a tiny simulated data set, half maps, a run_data.star with scores
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from numba_recon.io.mrc import read_volume, write_volume
    from numba_recon.io.star import read_star, write_star
    from numba_recon.sim.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("inputs")
    simulate_dataset(root / "sim", n_particles=40, box_size=16, pixel_size_angstrom=4.0, snr=1.0, seed=3,
                     particles_per_stack=20, max_shift_px=1.0, overwrite=True)
    truth, _ = read_volume(root / "sim" / "truth.mrc")
    rng = np.random.default_rng(0)
    scale = float(np.abs(truth).max())
    for h in (1, 2):
        write_volume(root / f"half{h}.mrc", truth + 0.05 * scale * rng.standard_normal(truth.shape), 4.0)
    particles = read_star(root / "sim" / "particles.star")
    write_star(particles, root / "run_data.star",
               extra_columns={"rlnNumbaReconScore": rng.standard_normal(len(particles))})
    (root / "afile").write_text("a file where a folder is expected\n")
    return {"star": root / "sim" / "particles.star", "half1": root / "half1.mrc", "half2": root / "half2.mrc",
            "map": root / "sim" / "truth.mrc", "run_data": root / "run_data.star", "afile": root / "afile",
            "root": root}


def _args(template: list[str], inputs: dict[str, Path], out: Path) -> list[str]:
    """Fill ``{star}``, ``{half1}``... and ``{out}`` placeholders."""
    names = {k: str(v) for k, v in inputs.items()}
    names["out"] = str(out)
    return [a.format(**names) for a in template]


def assert_clear_error(result, *fragments: str) -> str:
    """Exit status 2, no traceback, no usage block, and exactly one ``numba-recon: error:`` line
    that contains every fragment (case-insensitive). Returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert "Usage:" not in result.stderr, f"click usage error instead of the project's one line:\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def _written(out: Path) -> list[Path]:
    """Files under ``out`` (or ``out`` itself if it is a file)."""
    if out.is_file():
        return [out]
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else []


def assert_refused(runner, inputs: dict[str, Path], tmp_path: Path, command: str, extra: list[str], fragment: str,
                   base: list[str] | None = None) -> None:
    """``command`` with ``base`` (default: its minimal valid arguments, ``BASE[command]``) and then
    ``extra`` gives one clear error line naming ``fragment``, and writes nothing."""
    out = tmp_path / OUT_NAME[command]
    args = _args(BASE[command] if base is None else base, inputs, out)
    result = runner.invoke(main, [*args, *extra])
    assert_clear_error(result, fragment)
    assert _written(out) == []


def _without(command: str, option: str) -> list[str]:
    """``BASE[command]`` from ``option`` on left out (an option the test gives itself)."""
    return BASE[command][: BASE[command].index(option)]


# command -> minimal valid arguments (``{out}`` is where it writes)
BASE = {
    "run": ["run", "{star}", "-o", "{out}", "--epochs", "1", "--backend", "cpu"],
    "simulate": ["simulate", "-o", "{out}", "--n-particles", "8", "--box-size", "16"],
    "mask": ["mask", "{map}", "-o", "{out}", "--threshold", "auto"],
    "postprocess": ["postprocess", "{half1}", "{half2}", "-o", "{out}"],
    "fsc": ["fsc", "{half1}", "{half2}", "-o", "{out}"],
    "select": ["select", "{run_data}", "-o", "{out}", "--keep-fraction", "0.5"],
    "convert": ["convert", "{star}", "{out}"],
    "project": ["project", "{map}", "--star", "{star}", "-o", "{out}"],
}
# what each command's output is called (a folder or a file)
OUT_NAME = {"run": "out", "simulate": "out", "mask": "mask.mrc", "postprocess": "out", "fsc": "fsc.csv",
            "select": "clean.star", "convert": "converted.thu", "project": "model.mrcs"}


def test_base_arguments_are_valid(runner, inputs, tmp_path):
    """The minimal arguments used below work, so each refusal below is caused by the bad value alone."""
    for command in ("simulate", "mask", "postprocess", "fsc", "select", "convert", "project"):
        out = tmp_path / command / OUT_NAME[command]
        result = runner.invoke(main, ["-q", *_args(BASE[command], inputs, out)])
        assert result.exit_code == 0, (command, result.output, result.exception)
        assert _written(out), command


# --------------------------------------------------------------------------------------------
# zero and negative sizes
# --------------------------------------------------------------------------------------------

SIZES = [
    ("run", ["--epochs", "0"], "--epochs"),
    ("run", ["--epochs", "-2"], "--epochs"),
    ("run", ["--batch-size", "0"], "--batch-size"),
    ("run", ["--batch-size", "-64"], "--batch-size"),
    ("run", ["--checkpoint-every", "0"], "--checkpoint-every"),
    ("run", ["--radius", "0"], "--radius"),
    ("run", ["--radius", "-4"], "--radius"),
    ("run", ["--cache-mb", "-1"], "--cache-mb"),
    ("run", ["--angpix", "0"], "--angpix"),
    ("run", ["--angpix", "-1.5"], "--angpix"),
    ("run", ["--cv-fraction", "-0.1"], "--cv-fraction"),
    ("run", ["--robust-warmup", "-1"], "--robust-warmup"),
    ("run", ["--reweight-power", "0"], "--reweight-power"),
    ("simulate", ["--n-particles", "0"], "--n-particles"),
    ("simulate", ["--n-particles", "-5"], "--n-particles"),
    ("simulate", ["--box-size", "0"], "--box-size"),
    ("simulate", ["--box-size", "-16"], "--box-size"),
    ("simulate", ["--box-size", "4"], "--box-size"),
    ("simulate", ["--particles-per-stack", "0"], "--particles-per-stack"),
    ("simulate", ["--angpix", "0"], "--angpix"),
    ("simulate", ["--angpix", "-2"], "--angpix"),
    ("simulate", ["--snr", "0"], "--snr"),
    ("simulate", ["--max-shift", "-1"], "--max-shift"),
    ("mask", ["--soft-edge", "-1"], "--soft-edge"),
    ("mask", ["--lowpass", "0"], "--lowpass"),
    ("mask", ["--lowpass", "-5"], "--lowpass"),
    ("mask", ["--angpix", "0"], "--angpix"),
    ("mask", ["--angpix", "-1"], "--angpix"),
    ("postprocess", ["--lowpass", "0"], "--lowpass"),
    ("postprocess", ["--lowpass", "-4"], "--lowpass"),
    ("postprocess", ["--angpix", "0"], "--angpix"),
    ("postprocess", ["--autob-lowres", "0"], "--autob-lowres"),
    ("postprocess", ["--autob-highres", "-1"], "--autob-highres"),
    ("fsc", ["--angpix", "0"], "--angpix"),
    ("fsc", ["--angpix", "-1"], "--angpix"),
    ("select", ["--angpix", "0"], "--angpix"),
    ("convert", ["--angpix", "0"], "--angpix"),
    ("convert", ["--angpix", "-1"], "--angpix"),
    ("project", ["--first", "0"], "--first"),
    ("project", ["--first", "-3"], "--first"),
    ("project", ["--angpix", "0"], "--angpix"),
    ("project", ["--angpix", "-4"], "--angpix"),
]


@pytest.mark.parametrize("command, extra, fragment", SIZES,
                         ids=[f"{c}{''.join(e)}" for c, e, _ in SIZES])
def test_zero_and_negative_sizes(runner, inputs, tmp_path, command, extra, fragment):
    assert_refused(runner, inputs, tmp_path, command, extra, fragment)


# --------------------------------------------------------------------------------------------
# fractions, symmetry, non-finite numbers
# --------------------------------------------------------------------------------------------

KEEP = [
    ("run", "0"), ("run", "-0.2"), ("run", "1.5"), ("run", "0.5:1.2"), ("run", "0:0.5"), ("run", "nan"),
    ("run", "0.2:0.3:0.4"), ("run", "half"),
    ("select", "0"), ("select", "-0.1"), ("select", "1.01"), ("select", "nan"), ("select", "inf"),
]


@pytest.mark.parametrize("command, value", KEEP, ids=[f"{c}:{v}" for c, v in KEEP])
def test_keep_fraction_outside_zero_one(runner, inputs, tmp_path, command, value):
    if command == "select":
        base = _without("select", "--keep-fraction")
    else:
        base = [*BASE[command], "--loss", "trimmed"]
    assert_refused(runner, inputs, tmp_path, command, ["--keep-fraction", value], "--keep-fraction", base)


def test_keep_fraction_one_keeps_everything(runner, inputs, tmp_path):
    """The closed end of (0, 1] is allowed: keep every particle."""
    out = tmp_path / "all.star"
    args = _args(BASE["select"], inputs, out)
    args[args.index("--keep-fraction") + 1] = "1"
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "kept 40 of 40" in result.output


@pytest.mark.parametrize("group", ["X9", "C0", "D0", "I5", "C-3", "", "C1.5", "O2", "T3", "C 7"])
def test_unknown_symmetry(runner, inputs, tmp_path, group):
    assert_refused(runner, inputs, tmp_path, "run", ["--sym", group], "symmetry")


def test_symmetry_names_are_case_insensitive():
    from numba_recon.symmetry.groups import symmetry_operators

    for a, b in (("c7", "C7"), ("d7", "D7"), ("i", "I"), ("o", "O")):
        np.testing.assert_array_equal(symmetry_operators(a), symmetry_operators(b))


NON_FINITE = [
    ("run", ["--lr", "inf"], "--lr"),
    ("run", ["--lr", "nan"], "--lr"),
    ("run", ["--reg-lambda", "nan"], "--reg-lambda"),
    ("run", ["--reg-lambda", "inf"], "--reg-lambda"),
    ("run", ["--radius", "nan"], "--radius"),
    ("run", ["--cache-mb", "nan"], "--cache-mb"),
    ("run", ["--reweight-power", "nan"], "--reweight-power"),
    ("run", ["--cv-fraction", "nan"], "--cv-fraction"),
    ("run", ["--angpix", "nan"], "--angpix"),
    ("simulate", ["--snr", "inf"], "--snr"),
    ("simulate", ["--max-shift", "nan"], "--max-shift"),
    ("simulate", ["--junk-fraction", "nan"], "--junk-fraction"),
    ("mask", ["--extend", "nan"], "--extend"),
    ("mask", ["--soft-edge", "nan"], "--soft-edge"),
    ("mask", ["--soft-edge", "inf"], "--soft-edge"),
    ("mask", ["--threshold", "inf"], "--threshold"),
    ("postprocess", ["--bfactor", "nan"], "--bfactor"),
    ("postprocess", ["--lowpass", "inf"], "--lowpass"),
    ("postprocess", ["--autob-highres", "nan"], "--autob-highres"),
    ("postprocess", ["--autob-lowres", "inf"], "--autob-lowres"),
    ("fsc", ["--angpix", "inf"], "--angpix"),
    ("fsc", ["--angpix", "nan"], "--angpix"),
    ("project", ["--angpix", "inf"], "--angpix"),
]


@pytest.mark.parametrize("command, extra, fragment", NON_FINITE,
                         ids=[f"{c}{''.join(e)}" for c, e, _ in NON_FINITE])
def test_non_finite_numbers_are_refused(runner, inputs, tmp_path, command, extra, fragment):
    """NaN and infinity slip through checks written as ``value <= 0``; they must be refused up front
    (not crash later, nor produce NaN maps)."""
    base = BASE[command]
    if command == "select":
        base = _without("select", "--keep-fraction")
    if command == "mask" and extra[0] == "--threshold":
        base = _without("mask", "--threshold")
    assert_refused(runner, inputs, tmp_path, command, extra, fragment, base)


def test_sharpening_that_overflows_is_refused_or_finite(runner, inputs, tmp_path):
    """A B-factor of -1e9 overflows exp(-B s^2 / 4): refuse it, or write finite maps; never NaN maps."""
    out = tmp_path / "post"
    result = runner.invoke(main, [*_args(BASE["postprocess"], inputs, out), "--bfactor", "-1e9"])
    if result.exit_code == 2:
        assert_clear_error(result, "--bfactor")
        return
    assert result.exit_code == 0, result.output
    for path in out.glob("*.mrc"):
        assert np.isfinite(mrcfile.read(path)).all(), path.name


# --------------------------------------------------------------------------------------------
# output folders that are files, lie under a file, or cannot be written
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", list(BASE))
def test_output_under_a_file(runner, inputs, command):
    """``-o afile/...``: the folder that should hold the output is a file."""
    out = inputs["afile"] / OUT_NAME[command]
    result = runner.invoke(main, _args(BASE[command], inputs, out))
    assert_clear_error(result, "afile")
    assert inputs["afile"].read_text() == "a file where a folder is expected\n"


@pytest.mark.parametrize("command", ["run", "simulate", "postprocess"])
def test_output_folder_is_a_file(runner, inputs, command):
    """The commands that write a folder refuse an existing file as ``-o`` in the project's one line."""
    result = runner.invoke(main, _args(BASE[command], inputs, inputs["afile"]))
    assert_clear_error(result, "afile", "file")
    assert inputs["afile"].read_text() == "a file where a folder is expected\n"


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write to.

    As a normal user, ``chmod 555`` does it. Root ignores permission bits, so there a read-only
    tmpfs is mounted instead; without the right to mount (a container without CAP_SYS_ADMIN) the
    test is skipped, as no honest unwritable folder can be made.
    """
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = shutil.which("mount")
    done = mount is not None and subprocess.run(
        [mount, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not done:
        pytest.skip("running as root (permission bits do not apply) and cannot mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


# "the folder itself" applies only to commands whose output is a folder
_NOT_WRITABLE_CASES = [(c, True) for c in BASE] + [(c, False) for c in BASE if OUT_NAME[c] == "out"]


@pytest.mark.parametrize("command, inside", _NOT_WRITABLE_CASES,
                         ids=[f"{c}-{'new-path-inside' if i else 'the-folder-itself'}" for c, i in _NOT_WRITABLE_CASES])
def test_output_not_writable(runner, inputs, unwritable_dir, command, inside):
    out = unwritable_dir / OUT_NAME[command] if inside else unwritable_dir
    result = runner.invoke(main, _args(BASE[command], inputs, out))
    assert_clear_error(result, "writ" if not inside else str(unwritable_dir.name))
    assert list(unwritable_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------
# sizes larger than the data: must work
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_batch_larger_than_the_data_set(runner, inputs, tmp_path):
    """A batch larger than the data set is one full batch per step: same maps as a batch of exactly
    the data set's size, one optimiser step per epoch."""
    import json

    maps = []
    for batch in ("100000", "40"):
        out = tmp_path / f"b{batch}"
        result = runner.invoke(main, ["-q", "run", str(inputs["star"]), "-o", str(out), "--epochs", "2",
                                      "--backend", "cpu", "--batch-size", batch, "--seed", "1", "--optimizer", "adam"])
        assert result.exit_code == 0, (result.output, result.exception)
        assert json.loads((out / "summary.json").read_text())["steps"] == 2
        maps.append(np.stack([mrcfile.read(out / f"run_half{h}_class001_unfil.mrc") for h in (1, 2)]))
    assert np.isfinite(maps[0]).all() and np.abs(maps[0]).max() > 0
    np.testing.assert_array_equal(maps[0], maps[1])


def test_first_larger_than_the_data_set_projects_everything(runner, inputs, tmp_path):
    out = tmp_path / "model.mrcs"
    result = runner.invoke(main, [*_args(BASE["project"], inputs, out), "--first", "1000000", "--no-ctf"])
    assert result.exit_code == 0, result.output
    with mrcfile.open(out) as mrc:
        assert mrc.data.shape == (40, 16, 16)


def test_more_images_per_stack_than_particles(runner, tmp_path):
    out = tmp_path / "sim"
    result = runner.invoke(main, ["-q", "simulate", "-o", str(out), "--n-particles", "5", "--box-size", "16",
                                  "--particles-per-stack", "1000"])
    assert result.exit_code == 0, result.output
    stacks = list((out / "Particles").glob("*.mrcs"))
    assert len(stacks) == 1
    with mrcfile.open(stacks[0]) as mrc:
        assert mrc.data.shape[0] == 5


def test_help_without_importlib_util_preloaded():
    """``numba-recon --help`` lists the commands even in an interpreter where nothing imported
    ``importlib.util`` before the CLI (a plain, non-editable install)."""
    import subprocess
    import sys

    code = ("import sys, importlib\n"
            "sys.modules.pop('importlib.util', None)\n"
            "if hasattr(importlib, 'util'): delattr(importlib, 'util')\n"
            "from numba_recon.cli import main\n"
            "main(['--help'], standalone_mode=False)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "reconstruct" in res.stdout.lower() and "demo" in res.stdout
