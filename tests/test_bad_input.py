"""Each kind of bad input gives one line on stderr (file, problem, fix), exit status 2, nothing written.

One tiny file per failure lives in tests/data/bad/; each is run through ``numba-recon info`` and,
for particle files, ``numba-recon convert`` (which must not create its output).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from numba_recon.cli import main

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"

# (file, extra info arguments, file named in the message, words of the problem, words of the fix)
CASES = [
    ("missing_column.star", [], "missing_column.star", "missing required column(s) rlnAngleTilt, rlnDefocusU",
     "add the missing columns"),
    ("empty_table.star", [], "empty_table.star", "particle table data_particles is empty", "at least one particle"),
    ("non_numeric.star", [], "non_numeric.star", "column rlnAngleRot is not numeric: value 'abc' (particle row 2)",
     "replace the non-numeric values"),
    ("unknown_optics_group.star", [], "unknown_optics_group.star",
     "optics group 3 is not in data_optics (which has 1) (particle row 2)", "add the optics group"),
    ("index_beyond_stack.star", [], "index_beyond_stack.star",
     "image index 9 is beyond the end of stack", "indices are 1-based"),
    ("missing_stack.star", [], "missing_stack.star", "stack file ../Particles/missing.mrcs not found",
     "pass --root"),
    ("truncated.mrcs", [], "truncated.mrcs", "file is truncated", "re-copy the file"),
    ("truncated_stack.star", [], "truncated.mrcs", "file is truncated", "re-copy the file"),
    ("nonsquare.star", [], "nonsquare.star", "has non-square images (12 x 16 pixels)", "square box"),
    ("box_mismatch.star", [], "box_mismatch.star", "stack box 16 px differs from rlnImageSize 32",
     "correct rlnImageSize"),
    ("nan.mrcs", [], "nan.mrcs", "image 2 contains NaN or infinite values", "regenerate the file"),
    ("nan_pixels.star", ["--check-images"], "nan.mrcs", "image 2 contains NaN or infinite pixels",
     "re-extract the particles"),
    ("no_pixel_size.star", [], "no_pixel_size.star", "has no pixel size", "pass --angpix"),
    ("malformed.thu", ["--angpix", "1.5"], "malformed.thu", "line 2 has 26 columns, expected 27",
     "fix or remove that line"),
]


def _assert_one_line_error(result, named: str, problem: str, fix: str) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("numba-recon: error: ")
    assert named in line and problem in line and fix in line, line
    assert line.index(problem) < line.index(fix)  # "<file>: <problem>; <fix>"
    return line


@pytest.mark.parametrize("name, args, named, problem, fix", CASES, ids=[c[0] for c in CASES])
def test_info_reports_one_line(runner, name, args, named, problem, fix):
    result = runner.invoke(main, ["info", str(BAD / name), *args])
    line = _assert_one_line_error(result, named, problem, fix)
    assert str(BAD / named) in line or str(BAD / name) in line


CONVERTIBLE = [c for c in CASES if c[0].endswith((".star", ".thu")) and "--check-images" not in c[1]]


@pytest.mark.parametrize("name, args, named, problem, fix", CONVERTIBLE, ids=[c[0] for c in CONVERTIBLE])
@pytest.mark.parametrize("suffix", [".star", ".thu"])
def test_convert_writes_nothing(runner, tmp_path, name, args, named, problem, fix, suffix):
    out = tmp_path / "out" / f"converted{suffix}"
    result = runner.invoke(main, ["convert", str(BAD / name), str(out), *args])
    _assert_one_line_error(result, named, problem, fix)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize("args, named, problem, fix", [
    (["info", "{tmp}/missing.star"], "missing.star", "file not found", "check the path"),
    (["info", "{tmp}/missing.mrc"], "missing.mrc", "file not found", "check the path"),
    (["info", str(DATA / "make_fixtures.py")], "make_fixtures.py", "unknown file type '.py'", "give a .star"),
    (["info", str(DATA / "particles.thu")], "particles.thu", ".thu files do not store the pixel size",
     "pass --angpix"),
    (["info", str(DATA / "relion31.star"), "--angpix", "-2"], "--angpix", "not a positive pixel size",
     "give the pixel size in Angstrom"),
    (["info", str(DATA / "rooted" / "particles.star"), "--root", "{tmp}/nowhere"], "--root", "folder not found",
     "give the folder"),
    (["convert", str(DATA / "Particles" / "stack_a.mrcs"), "{tmp}/x.star"], "stack_a.mrcs",
     "unknown particle file type '.mrcs'", "give a RELION .star"),
])
def test_other_user_errors(runner, tmp_path, args, named, problem, fix):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(main, args)
    _assert_one_line_error(result, named, problem, fix)
    assert not (tmp_path / "x.star").exists()
