"""THUNDER .thu reading and writing, against the conventions.md section 5.3/5.4/11 vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from numba_recon.errors import InputError, InputFileError, OutputError
from numba_recon.geometry import euler_to_matrix, matrix_to_quaternion, quaternion_to_rotation
from numba_recon.io.star import read_star, write_star
from numba_recon.io.thu import THU_COLUMNS, random_half_sets, read_thu, write_thu
from numba_recon.read import read_particles

DATA = Path(__file__).parent / "data"
THU = DATA / "particles.thu"
STACK_A = str(DATA / "Particles" / "stack_a.mrcs")

# conventions.md section 5.4: RELION (rot, tilt, psi) -> THUNDER quaternion (w, x, y, z)
QUATERNIONS = {
    (30.0, 60.0, 90.0): (0.433013, 0.25, 0.433013, 0.75),
    (10.0, 20.0, 30.0): (0.925417, 0.030154, 0.17101, 0.336824),
    (-100.0, 135.0, -45.0): (0.115075, 0.4266, 0.819491, -0.364972),
}


def _columns(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip() and "#" not in line]


@pytest.mark.parametrize("angles", list(QUATERNIONS), ids=str)
def test_quaternion_vectors_of_the_conventions(angles):
    A = euler_to_matrix(*angles)
    q = matrix_to_quaternion(A)
    expected = np.array(QUATERNIONS[angles])
    assert min(np.abs(q - expected).max(), np.abs(q + expected).max()) < 1e-6  # q and -q: same rotation
    np.testing.assert_allclose(quaternion_to_rotation(q).T, A, atol=1e-12)  # R(q)^T == A


def test_read_thu_converts_units_and_signs():
    p = read_thu(THU, angpix=1.5)
    cols = np.array([[float(v) if k not in (7, 8) else np.nan for k, v in enumerate(row)] for row in _columns(THU)])
    assert len(p) == 3 and p.box_size == 16 and p.pixel_size_angstrom == 1.5
    # poses: A = R(q)^T reproduces the RELION angles the quaternions were made from
    for R, angles in zip(p.rotations, QUATERNIONS):
        np.testing.assert_allclose(R, euler_to_matrix(*angles), atol=2e-9)  # file has 9 decimals
        np.testing.assert_allclose(R.T, quaternion_to_rotation(cols[list(QUATERNIONS).index(angles), 13:17]),
                                   atol=1e-12)
    np.testing.assert_array_equal(p.shifts_px[:, 0], -cols[:, 20])  # rlnOriginX = -TRANSLATION_X
    np.testing.assert_array_equal(p.shifts_px[:, 1], -cols[:, 21])
    np.testing.assert_array_equal(p.class_number, cols[:, 12].astype(int) + 1)  # 0-based CLASS_ID + 1
    np.testing.assert_array_equal(p.ctf["voltage_kv"], cols[:, 0] / 1000)  # V -> kV
    np.testing.assert_array_equal(p.ctf["cs_mm"], cols[:, 4] / 1e7)  # A -> mm
    np.testing.assert_allclose(p.ctf["defocus_angle_deg"], [30.0, -12.5, 85.0], atol=1e-7)  # rad -> deg
    np.testing.assert_allclose(p.ctf["phase_shift_deg"], [0.0, 0.0, 90.0], atol=1e-7)
    np.testing.assert_array_equal(p.ctf["amplitude_contrast"], [0.1, 0.1, 0.07])
    # defocus U and V multiplied by DEFOCUS_FACTOR (1.0, 1.02, 0.98)
    np.testing.assert_allclose(p.ctf["defocus_u_angstrom"], [15000.0, 12240.0, 19600.0], rtol=1e-15)
    np.testing.assert_allclose(p.ctf["defocus_v_angstrom"], [14800.0, 11730.0, 18620.0], rtol=1e-15)
    np.testing.assert_array_equal(p.stack_indices, [0, 1, 3])
    assert p.stack_paths.tolist() == [STACK_A] * 3
    assert p.table["rlnGroupNumber"].tolist() == [1, 1, 2]
    assert p.table["thuScore"].tolist() == [0.85, 0.7, 0.6] and p.table["thuK3"].tolist() == [31.0, 10.0, 5.0]
    assert p.meta["half_split"] == {"method": "seeded hash of the image names", "seed": 0}
    assert sorted(p.half_set.tolist()) == [1, 1, 2]


def test_seeded_half_split():
    a = random_half_sets(101, 7)
    np.testing.assert_array_equal(a, random_half_sets(101, 7))
    assert (a == 1).sum() == 51 and (a == 2).sum() == 50
    assert not np.array_equal(a, random_half_sets(101, 8))
    # not the first/second half or even/odd order
    assert 0 < (a[:50] == 1).sum() < 50 and 0 < (a[::2] == 1).sum() < 51
    p, q = read_thu(THU, angpix=1.5, seed=3), read_thu(THU, angpix=1.5, seed=3)
    np.testing.assert_array_equal(p.half_set, q.half_set)
    np.testing.assert_array_equal(p.table["rlnRandomSubset"], p.half_set)


def test_pixel_size_is_required():
    with pytest.raises(InputFileError, match="do not store the pixel size; pass --angpix"):
        read_thu(THU, angpix=None)
    with pytest.raises(InputFileError, match="pass --angpix"):
        read_particles(THU)
    with pytest.raises(InputError, match="not a positive pixel size"):
        read_thu(THU, angpix=0.0)


def test_malformed_line_names_the_line_number():
    with pytest.raises(InputFileError) as err:
        read_thu(DATA / "bad" / "malformed.thu", angpix=1.5)
    assert str(err.value).startswith(str(DATA / "bad" / "malformed.thu"))
    assert "line 2 has 26 columns, expected 27" in str(err.value)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 3 particles"):
        p = read_thu(DATA / "bad" / "malformed.thu", angpix=1.5, permissive=True)
    assert len(p) == 2


def _thu_with(tmp_path: Path, column: int, value: str, line: int = 1) -> Path:
    lines = THU.read_text().splitlines()
    data_lines = [k for k, t in enumerate(lines) if t.strip() and "#" not in t]
    tokens = lines[data_lines[line]].split()
    tokens[column] = value
    lines[data_lines[line]] = " ".join(tokens)
    path = tmp_path / "edited.thu"  # stack paths made absolute so the file works from tmp_path
    path.write_text("\n".join(lines).replace("Particles/", str(DATA / "Particles") + "/") + "\n")
    return path


@pytest.mark.parametrize("column, value, message", [
    (4, "abc", r"column 4 \(CS\) is not a finite number: 'abc' \(line 29\)"),
    (12, "1.5", r"column 12 \(CLASS_ID\) must be an integer"),
    (13, "0", None),  # one zero component is fine; a zero quaternion is not (next case)
    (0, "-300000", "voltage -300000 V is not positive"),
    (5, "1.5", r"amplitude contrast 1.5 is outside \[0, 1\)"),
    (7, "000009@Particles/stack_a.mrcs", "image index 9 is beyond the end"),
])
def test_bad_values(tmp_path, column, value, message):
    path = _thu_with(tmp_path, column, value)
    if message is None:
        assert len(read_thu(path, angpix=1.5)) == 3
        return
    with pytest.raises(InputFileError, match=message):
        read_thu(path, angpix=1.5)


@pytest.mark.parametrize("column, value, message", [
    (3, "1e307", r"DEFOCUS_THETA in degrees is not finite \(inf deg\) \(line 29\)"),
    (6, "-1e307", r"PHASE_SHIFT in degrees is not finite \(-inf deg\) \(line 29\)"),
    (24, "1e300", r"DEFOCUS_U x DEFOCUS_FACTOR is not finite \(inf A\) \(line 29\)"),
    (20, "1.7e308", r"TRANSLATION_X x pixel size is not finite \(-inf A\) \(line 29\)"),
], ids=["defocus-angle", "phase-shift", "defocus-factor", "translation"])
def test_values_that_overflow_when_converted(tmp_path, column, value, message):
    path = _thu_with(tmp_path, column, value)
    if column == 24:  # DEFOCUS_U 1e300 x DEFOCUS_FACTOR 1e300
        text = path.read_text().splitlines()
        idx = [k for k, t in enumerate(text) if t.strip() and "#" not in t][1]
        tokens = text[idx].split()
        tokens[1] = "1e300"
        text[idx] = " ".join(tokens)
        path.write_text("\n".join(text) + "\n")
    with pytest.raises(InputFileError, match=message):
        read_thu(path, angpix=1.5)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 3 particles"):
        p = read_thu(path, angpix=1.5, permissive=True)
    assert len(p) == 2 and all(np.isfinite(v).all() for v in p.ctf.values())
    assert np.isfinite(p.table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()).all()


def test_huge_quaternion_gives_the_right_rotation(tmp_path):
    """Quaternions are normalised after scaling: (1e200, 1e200, 0, 0) is a 90 degree turn about x."""
    path = _thu_with(tmp_path, 13, "1e200")
    text = path.read_text().splitlines()
    idx = [k for k, t in enumerate(text) if t.strip() and "#" not in t][1]
    tokens = text[idx].split()
    tokens[13:17] = ["1e200", "1e200", "0", "0"]
    text[idx] = " ".join(tokens)
    path.write_text("\n".join(text) + "\n")
    p = read_thu(path, angpix=1.5)
    np.testing.assert_allclose(p.rotations[1].T, quaternion_to_rotation(np.array([1.0, 1.0, 0.0, 0.0])),
                               atol=1e-12)


def test_zero_quaternion_is_refused(tmp_path):
    path = _thu_with(tmp_path, 13, "0")
    for c in (14, 15, 16):
        text = path.read_text().splitlines()
        idx = [k for k, t in enumerate(text) if t.strip() and "#" not in t][1]
        tokens = text[idx].split()
        tokens[c] = "0"
        text[idx] = " ".join(tokens)
        path.write_text("\n".join(text) + "\n")
    with pytest.raises(InputFileError, match=r"quaternion is zero \(no pose\) \(line 29\)"):
        read_thu(path, angpix=1.5)


def test_comments_and_blank_lines_are_skipped(tmp_path):
    text = THU.read_text()
    lines = text.splitlines()
    lines.insert(28, "   ")
    lines.insert(29, f"{lines[28]}  # a particle commented out mid-line")
    path = tmp_path / "commented.thu"
    path.write_text("\n".join(lines).replace("Particles/", str(DATA / "Particles") + "/") + "\n")
    assert len(read_thu(path, angpix=1.5)) == 3


def test_write_thu_format(tmp_path):
    p = read_star(DATA / "relion31.star")
    out = tmp_path / "out.thu"
    write_thu(p, out)
    lines = out.read_text().splitlines()
    assert lines[0] == "#0:VOLTAGE\tFLOAT\t18.9f" and lines[7] == "#7:PARTICLE_PATH\tSTRING\ts"
    assert lines[12] == "#12:CLASS_ID\tINT\t6d" and lines[26] == "#26:SCORE\tFLOAT\t18.9f"
    assert [line.split(":")[1].split("\t")[0] for line in lines[:27]] == list(THU_COLUMNS)
    rows = _columns(out)
    assert len(rows) == 5 and all(len(r) == 27 for r in rows)
    first = rows[0]
    assert float(first[0]) == 300000.0 and float(first[4]) == 27000000.0  # V and Angstrom
    assert float(first[3]) == pytest.approx(np.deg2rad(30.0))
    index, stack = first[7].split("@", 1)
    # written relative to the .thu file's folder when they share one below /, else absolute
    assert index == "000001" and (out.parent / stack).resolve() == Path(STACK_A).resolve()
    assert first[8] == "mics/m1.mrc"
    assert (first[11], first[12]) == ("1", "0")  # default group 1, class 1 -> CLASS_ID 0
    q = np.array([float(v) for v in first[13:17]])
    np.testing.assert_allclose(q, QUATERNIONS[(30.0, 60.0, 90.0)], atol=1e-6)
    assert (float(first[20]), float(first[21])) == (-1.0, 2.0)  # translation = -origin
    assert float(first[24]) == 1.0  # defocus factor already applied


def _assert_same_particles(b, a) -> None:
    """What a round trip through the other format keeps: poses (1e-6), shifts and CTF (1e-12), the
    images' stacks and indices, and the classes."""
    np.testing.assert_allclose(b.rotations, a.rotations, atol=1e-6)
    np.testing.assert_allclose(b.shifts_px, a.shifts_px, atol=1e-12)
    for key in a.ctf:
        np.testing.assert_allclose(b.ctf[key], a.ctf[key], rtol=1e-12, atol=1e-12, err_msg=key)
    np.testing.assert_array_equal(b.stack_paths, a.stack_paths)
    np.testing.assert_array_equal(b.stack_indices, a.stack_indices)
    np.testing.assert_array_equal(b.class_number, a.class_number)


def test_thu_star_thu_round_trip(tmp_path):
    a = read_thu(THU, angpix=1.5)
    write_star(a, tmp_path / "mid.star")
    mid = read_star(tmp_path / "mid.star")
    np.testing.assert_array_equal(mid.half_set, a.half_set)  # the split travels as rlnRandomSubset
    write_thu(mid, tmp_path / "back.thu")
    b = read_thu(tmp_path / "back.thu", angpix=1.5)
    _assert_same_particles(b, a)
    for label in ("thuK1", "thuK2", "thuK3", "thuStdTranslationX", "thuScore", "rlnGroupNumber"):
        assert b.table[label].tolist() == a.table[label].tolist(), label
    assert b.table["rlnMicrographName"].tolist() == a.table["rlnMicrographName"].tolist()


def test_star_thu_star_round_trip(tmp_path):
    a = read_star(DATA / "relion31.star")
    write_thu(a, tmp_path / "mid.thu")
    mid = read_thu(tmp_path / "mid.thu", angpix=a.pixel_size_angstrom)
    write_star(mid, tmp_path / "back.star")
    b = read_star(tmp_path / "back.star")
    _assert_same_particles(b, a)
    assert b.table["rlnCoordinateX"].tolist() == a.table["rlnCoordinateX"].tolist()


def test_class_selection_splits_the_selected_class():
    p = read_particles(THU, angpix=1.5, class_number=1)
    assert len(p) == 2 and set(p.class_number) == {1}
    assert sorted(p.half_set.tolist()) == [1, 2]
    with pytest.raises(InputFileError, match="no particles of class 5"):
        read_particles(THU, angpix=1.5, class_number=5)


def test_hash_in_a_path_cannot_be_written(tmp_path):
    p = read_thu(THU, angpix=1.5)
    p.table.loc[0, "rlnMicrographName"] = "mics/m#1.mrc"
    with pytest.raises(OutputError, match="lines containing '#'"):
        write_thu(p, tmp_path / "x.thu")
    assert not (tmp_path / "x.thu").exists()
