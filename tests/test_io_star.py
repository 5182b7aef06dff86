"""RELION STAR reading (3.0, 3.1, 5, optics groups, overrides, paths) and RELION 3.1 writing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import starfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numba_recon.errors import InputError, InputFileError
from numba_recon.geometry import euler_to_matrix
from numba_recon.io.star import read_star, write_star

DATA = Path(__file__).parent / "data"
STACK_A = str(DATA / "Particles" / "stack_a.mrcs")
STACK_B = str(DATA / "Particles" / "stack_b.mrcs")

# conventions.md section 1.3
A_30_60_90 = np.array([[-0.5, 0.8660254, 0.0], [-0.4330127, -0.25, 0.8660254], [0.75, 0.4330127, 0.5]])
A_10_20_30 = np.array([[0.71461, 0.633718, -0.296198], [-0.613092, 0.771281, 0.17101],
                       [0.336824, 0.059391, 0.939693]])


def _optics(box: int | None = 16, pixel_sizes: tuple[float, ...] = (1.5,)) -> str:
    """A data_optics block, one optics group per pixel size (300 kV, Cs 2.7 mm, amplitude contrast
    0.1); ``box=None`` leaves out rlnImageSize."""
    labels = ["rlnOpticsGroup", "rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage", "rlnImagePixelSize"]
    labels += [] if box is None else ["rlnImageSize"]
    rows = [f"{group} 0.1 2.7 300.0 {size}" + ("" if box is None else f" {box}")
            for group, size in enumerate(pixel_sizes, 1)]
    return "\ndata_optics\n\nloop_\n" + "".join(f"_{label}\n" for label in labels) + "".join(r + "\n" for r in rows)


def _particles(labels: list[str], rows: list[str]) -> str:
    return "\ndata_particles\n\nloop_\n" + "".join(f"_{label}\n" for label in labels) + "".join(r + "\n" for r in rows)


def _write(tmp_path: Path, text: str, name: str = "p.star") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASIC = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnOpticsGroup"]


def _basic_rows(names=(f"1@{STACK_A}", f"2@{STACK_A}")) -> list[str]:
    return [f"{n} 30 60 90 15000 1" for n in names]


# ---- reading good files --------------------------------------------------------------------

def test_relion31_file():
    p = read_star(DATA / "relion31.star")
    assert len(p) == 5 and p.box_size == 16 and p.pixel_size_angstrom == 1.5
    assert p.meta["star_version"] == 30001 and p.meta["format"] == "star" and p.meta["n_stacks"] == 2
    # index@stack: 1-based in the file, 0-based here; paths resolved relative to the STAR file
    assert p.stack_paths.tolist() == [STACK_A, STACK_A, STACK_A, STACK_B, STACK_B]
    np.testing.assert_array_equal(p.stack_indices, [0, 1, 3, 2, 0])
    np.testing.assert_allclose(p.rotations[0], A_30_60_90, atol=1e-6)
    np.testing.assert_allclose(p.rotations[1], A_10_20_30, atol=1e-6)
    np.testing.assert_allclose(p.rotations[3], euler_to_matrix(45.0, 90.0, 0.0))  # psi -999 placeholder -> 0
    # RELION origin sign kept: shifts_px = rlnOriginXAngst / rlnImagePixelSize
    np.testing.assert_allclose(p.shifts_px, [[1.0, -2.0], [0.0, 0.5], [-1.5, 3.0], [0.2, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(p.ctf["defocus_u_angstrom"], [15000, 12000, 20000, 18000, 16000])
    np.testing.assert_array_equal(p.ctf["defocus_v_angstrom"], [14800, 11500, 19000, 18000, 15500])
    np.testing.assert_array_equal(p.ctf["defocus_angle_deg"], [30, -12.5, 85, 0, 10])
    assert set(p.ctf["voltage_kv"]) == {300.0} and set(p.ctf["cs_mm"]) == {2.7}
    assert set(p.ctf["amplitude_contrast"]) == {0.1}
    np.testing.assert_array_equal(p.half_set, [1, 2, 1, 2, 2])
    np.testing.assert_array_equal(p.class_number, [1, 1, 2, 2, 1])
    np.testing.assert_array_equal(p.optics_group, [1] * 5)
    assert not p.ctf_premultiplied.any()
    assert p.table["rlnMicrographName"].tolist()[:2] == ["mics/m1.mrc", "mics/m1.mrc"]
    assert "rlnImageSize" in p.table.columns  # optics values merged into every particle
    assert p.optics is not None and p.optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1"]


def test_relion30_file_with_magnification_and_pixel_origins():
    p = read_star(DATA / "relion30.star")
    assert p.meta["star_version"] == 30000 and p.optics is None
    assert p.pixel_size_angstrom == 1.5  # 10000 * 6.0 um / 40000
    assert p.meta["pixel_size_source"] == "rlnDetectorPixelSize/rlnMagnification"
    np.testing.assert_array_equal(p.shifts_px, [[1.0, -2.0], [0.0, 0.5], [-1.5, 3.0]])  # rlnOriginX in px
    # RELION 3.0 -> 3.1 grouping: identical (Q0, Cs, voltage, pixel size) form one optics group
    np.testing.assert_array_equal(p.optics_group, [1, 1, 2])
    np.testing.assert_array_equal(p.ctf["voltage_kv"], [300, 300, 200])
    np.testing.assert_array_equal(p.half_set, [0, 0, 0])
    assert p.class_number is None
    np.testing.assert_array_equal(p.ctf["phase_shift_deg"], 0.0)
    np.testing.assert_array_equal(p.ctf["scale"], 1.0)


def test_relion5_file():
    p = read_star(DATA / "relion5.star")
    assert p.meta["star_version"] == 50001 and len(p) == 3
    assert p.ctf_premultiplied.all()  # rlnCtfDataAreCtfPremultiplied 1 in data_optics
    np.testing.assert_array_equal(p.ctf["bfactor_angstrom2"], [50, 0, 0])
    np.testing.assert_array_equal(p.ctf["scale"], [0.9, 1, 1])
    np.testing.assert_array_equal(p.ctf["phase_shift_deg"], [12, 0, 0])
    np.testing.assert_array_equal(p.half_set, [1, 2, 2])
    np.testing.assert_allclose(p.rotations[0], A_30_60_90, atol=1e-6)
    assert p.stack_paths.tolist() == [STACK_A, STACK_A, STACK_B]
    assert "rlnCtfFigureOfMerit" in p.table.columns


def test_optics_groups_with_particle_level_overrides():
    p = read_star(DATA / "relion31_optics_groups.star")
    np.testing.assert_array_equal(p.optics_group, [1, 1, 2, 2])
    np.testing.assert_array_equal(p.ctf["voltage_kv"], [300, 300, 200, 200])  # from data_optics
    np.testing.assert_array_equal(p.ctf["cs_mm"], [2.7, 2.7, 2.0, 2.0])
    np.testing.assert_array_equal(p.ctf["amplitude_contrast"], [0.1, 0.15, 0.07, 0.08])  # particle values win
    np.testing.assert_array_equal(p.table["rlnBeamTiltX"], [0.1, 0.1, 0.0, 0.0])  # optics-only labels merged


def test_relative_paths_need_the_root_folder():
    star = DATA / "rooted" / "particles.star"
    with pytest.raises(InputFileError, match="stack file Particles/stack_a.mrcs not found") as err:
        read_star(star)
    assert "--root" in str(err.value)
    p = read_star(star, root=DATA)
    assert p.stack_paths.tolist() == [STACK_A, STACK_B]
    np.testing.assert_array_equal(p.stack_indices, [2, 1])
    assert p.meta["root"] == str(DATA)
    with pytest.raises(InputError, match="folder not found"):
        read_star(star, root=DATA / "no_such_folder")


def test_angpix_overrides_the_file_but_origins_use_the_file_pixel_size():
    p = read_star(DATA / "relion31.star", angpix=2.0)
    assert p.pixel_size_angstrom == 2.0 and p.meta["pixel_size_source"] == "--angpix"
    np.testing.assert_allclose(p.shifts_px[0], [1.0, -2.0])  # 1.5 A / 1.5 A of the file
    with pytest.raises(InputError, match="not a positive pixel size"):
        read_star(DATA / "relion31.star", angpix=-1.0)


def test_ctf_defaults(tmp_path):
    path = _write(tmp_path, _optics() + _particles(BASIC, _basic_rows()))
    p = read_star(path)
    np.testing.assert_array_equal(p.ctf["defocus_v_angstrom"], p.ctf["defocus_u_angstrom"])
    for key, default in (("defocus_angle_deg", 0.0), ("phase_shift_deg", 0.0), ("bfactor_angstrom2", 0.0),
                         ("scale", 1.0)):
        np.testing.assert_array_equal(p.ctf[key], default)
    np.testing.assert_array_equal(p.shifts_px, 0.0)  # no origin columns
    assert p.class_number is None and not p.half_set.any()


def test_class_selection():
    p = read_star(DATA / "relion31.star", class_number=2)
    assert len(p) == 2 and set(p.class_number) == {2}
    np.testing.assert_array_equal(p.stack_indices, [3, 2])
    assert p.table["rlnClassNumber"].tolist() == [2, 2]
    with pytest.raises(InputFileError, match=r"no particles of class 7 \(classes present: 1, 2\)"):
        read_star(DATA / "relion31.star", class_number=7)
    with pytest.raises(InputFileError, match="no rlnClassNumber column"):
        read_star(DATA / "relion30.star", class_number=1)


def test_class_selection_skips_checks_of_other_classes(tmp_path):
    labels = BASIC + ["rlnClassNumber"]
    rows = [f"1@{STACK_A} 30 60 90 15000 1 1", f"9@{STACK_A} 30 60 90 15000 1 2"]  # class 2 index is bad
    path = _write(tmp_path, _optics() + _particles(labels, rows))
    assert len(read_star(path, class_number=1)) == 1
    with pytest.raises(InputFileError, match="beyond the end"):
        read_star(path)


def test_different_pixel_sizes_are_refused(tmp_path):
    rows = [f"1@{STACK_A} 30 60 90 15000 1", f"2@{STACK_A} 30 60 90 15000 2"]
    path = _write(tmp_path, _optics(box=None, pixel_sizes=(1.5, 1.06)) + _particles(BASIC, rows))
    with pytest.raises(InputFileError, match=r"different pixel sizes: 1.5 A \(optics group 1\), 1.06 A"):
        read_star(path)
    assert read_star(path, angpix=1.5).pixel_size_angstrom == 1.5


@pytest.mark.parametrize("subsets, message", [
    ((1, 0), "mixes particles with and without a half set"),
    ((1, 3), "rlnRandomSubset is 3, not 1 or 2"),
])
def test_bad_half_sets(tmp_path, subsets, message):
    rows = [f"{k + 1}@{STACK_A} 30 60 90 15000 1 {s}" for k, s in enumerate(subsets)]
    path = _write(tmp_path, _optics() + _particles(BASIC + ["rlnRandomSubset"], rows))
    with pytest.raises(InputFileError, match=message):
        read_star(path)


@pytest.mark.parametrize("column, value, message", [
    ("rlnVoltage", "300000", "rlnVoltage 300000 is not an acceleration voltage in kV"),
    ("rlnAmplitudeContrast", "1.2", r"rlnAmplitudeContrast 1.2 is outside \[0, 1\)"),
    ("rlnImagePixelSize", "0", "pixel size from rlnImagePixelSize is not positive"),
])
def test_implausible_optics_values(tmp_path, column, value, message):
    text = _optics().replace(
        "1 0.1 2.7 300.0 1.5 16",
        {"rlnVoltage": f"1 0.1 2.7 {value} 1.5 16", "rlnAmplitudeContrast": f"1 {value} 2.7 300.0 1.5 16",
         "rlnImagePixelSize": f"1 0.1 2.7 300.0 {value} 16"}[column])
    path = _write(tmp_path, text + _particles(BASIC, _basic_rows()))
    with pytest.raises(InputFileError, match=message):
        read_star(path)


def test_missing_fields_give_the_row(tmp_path):
    rows = _basic_rows() + [f"3@{STACK_A} 30 60"]  # a short row: starfile fills NaN silently
    path = _write(tmp_path, _optics() + _particles(BASIC, rows))
    message = r"missing value\(s\) for rlnAnglePsi, rlnDefocusU, rlnOpticsGroup \(particle row 3\)"
    with pytest.raises(InputFileError, match=message):
        read_star(path)


@pytest.mark.parametrize("text, message", [
    ("", "contains no data blocks"),
    (_optics(), "has data_optics but no data_particles"),
    (_optics() + _particles(BASIC, [f"1@{STACK_A} 30 60 90 15000 1 extra"]), "cannot parse the STAR file"),
    ("\ndata_model_general\n\n_rlnCurrentResolution 4.5\n", "has no particle table"),
    (_optics() + _particles(BASIC, [f"0@{STACK_A} 30 60 90 15000 1"]), "is not index@stack with an index >= 1"),
    (_optics() + _particles(BASIC, ["stack_a.mrcs@1 30 60 90 15000 1"]), "is not index@stack"),
])
def test_structural_problems(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(InputFileError, match=message) as err:
        read_star(path)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        read_star(tmp_path / "nope.star")
    with pytest.raises(InputFileError, match="is a folder"):
        read_star(tmp_path)


def test_bare_image_path_is_a_single_image(tmp_path):
    import mrcfile

    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(np.ones((16, 16), dtype=np.float32))
    path = _write(tmp_path, _optics() + _particles(BASIC, ["one.mrc 30 60 90 15000 1"]))
    p = read_star(path)
    assert p.stack_paths.tolist() == [str(tmp_path / "one.mrc")] and p.stack_indices.tolist() == [0]


def test_permissive_mode_drops_unusable_particles(tmp_path):
    rows = [f"1@{STACK_A} 30 60 90 15000 1", f"2@{STACK_A} abc 60 90 15000 1",
            f"1@{DATA / 'Particles' / 'missing.mrcs'} 30 60 90 15000 1", f"9@{STACK_A} 30 60 90 15000 1",
            f"3@{STACK_B} 30 60 90 15000 1"]
    path = _write(tmp_path, _optics() + _particles(BASIC, rows))
    with pytest.raises(InputFileError, match="particle row 2"):
        read_star(path)
    with pytest.warns(RuntimeWarning, match="skipped 3 of 5 particles"):
        p = read_star(path, permissive=True)
    assert p.stack_paths.tolist() == [STACK_A, STACK_B]
    np.testing.assert_array_equal(p.stack_indices, [0, 2])
    assert len(p.table) == 2


def test_permissive_mode_uses_the_stack_box_when_rlnimagesize_differs(tmp_path):
    path = _write(tmp_path, _optics(box=32) + _particles(BASIC, _basic_rows()))
    with pytest.raises(InputFileError, match="stack box 16 px differs from rlnImageSize 32"):
        read_star(path)
    with pytest.warns(RuntimeWarning, match="using the stack box 16 px"):
        assert read_star(path, permissive=True).box_size == 16


def test_stacks_of_different_box_sizes_are_refused(tmp_path):
    import mrcfile

    with mrcfile.new(tmp_path / "big.mrcs") as mrc:
        mrc.set_data(np.zeros((1, 32, 32), dtype=np.float32))
    rows = [f"1@{STACK_A} 30 60 90 15000 1", "1@big.mrcs 30 60 90 15000 1"]
    path = _write(tmp_path, _optics(box=None) + _particles(BASIC, rows))
    with pytest.raises(InputFileError, match="stacks have different box sizes: 16 px"):
        read_star(path)


@pytest.mark.parametrize("block", ["optics", "particles"])
def test_repeated_label_names_the_column_and_the_block(tmp_path, block):
    """starfile keeps both columns of a repeated label; a lookup would then get a table, not a column."""
    optics = _optics()
    particles = _particles(BASIC, _basic_rows())
    if block == "optics":
        optics = optics.replace("_rlnVoltage\n", "_rlnVoltage\n_rlnVoltage\n").replace(" 300.0 ", " 300.0 300.0 ")
    else:
        particles = _particles(BASIC + ["rlnAngleTilt"], [r + " 60" for r in _basic_rows()])
    path = _write(tmp_path, optics + particles)
    label = "rlnVoltage" if block == "optics" else "rlnAngleTilt"
    with pytest.raises(InputFileError, match=f"column _{label} appears more than once in data_{block}"):
        read_star(path)
    with pytest.raises(InputFileError, match="appears more than once"):
        read_star(path, permissive=True)  # not a row problem: no particle can be read right


def test_repeated_data_blocks_are_refused(tmp_path):
    """Two files joined with cat: starfile keeps the last block of each name, dropping particles."""
    one = _optics() + _particles(BASIC, _basic_rows())
    path = _write(tmp_path, one + one)
    with pytest.raises(InputFileError, match="data block data_optics appears more than once") as err:
        read_star(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    path = _write(tmp_path, _optics() + _particles(BASIC, _basic_rows()) + _particles(BASIC, _basic_rows()))
    with pytest.raises(InputFileError, match="data block data_particles appears more than once"):
        read_star(path)
    # an empty block of the same name just before the table is harmless ...
    path = _write(tmp_path, _optics() + "\ndata_particles\n" + _particles(BASIC, _basic_rows()))
    assert len(read_star(path)) == 2
    # ... but one of another name would lend its name to the next table
    path = _write(tmp_path, "data_particles\n\n" + _optics() + _particles(BASIC, _basic_rows()))
    with pytest.raises(InputFileError, match="data block data_particles is empty and followed by data_optics"):
        read_star(path)


@pytest.mark.parametrize("old, new, message", [
    # the origin in pixels, rlnOriginXAngst / 1e-320 A, overflows to infinity
    ("300.0 1.5 16", "300.0 1e-320 16", r"origin \(inf, -inf\) px is not finite .*\(particle row 1, 2 rows in all\)"),
    ("300.0 1.5 16", "300.0 -1.5 16", r"pixel size from rlnImagePixelSize is not positive \(-1.5 A\)"),
])
def test_pixel_sizes_that_overflow_or_are_not_positive(tmp_path, old, new, message):
    rows = [f"{k}@{STACK_A} 30 60 90 15000 1 2.0 -3.0" for k in (1, 2)]
    text = _optics().replace(old, new) + _particles(BASIC + ["rlnOriginXAngst", "rlnOriginYAngst"], rows)
    path = _write(tmp_path, text)
    with pytest.raises(InputFileError, match=message):
        read_star(path)


def test_detector_pixel_size_that_overflows(tmp_path):
    text = (DATA / "relion30.star").read_text().replace(" 6.0 40000.0", " 1e308 40000.0", 1)
    path = _write(tmp_path, text.replace("Particles/", str(DATA / "Particles") + "/"))
    message = (r"pixel size from rlnDetectorPixelSize/rlnMagnification is not finite \(inf A\) "
               r"\(particle row 1\)")
    with pytest.raises(InputFileError, match=message):
        read_star(path)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 3 particles"):
        p = read_star(path, permissive=True)
    assert len(p) == 2 and p.pixel_size_angstrom == 1.5


@pytest.mark.parametrize("label, value", [("rlnRandomSubset", "1e308"), ("rlnRandomSubset", "4294967297"),
                                          ("rlnClassNumber", "-1e300")])
def test_huge_integers_are_reported_with_their_value(tmp_path, label, value):
    """Not as the wrapped-around result of a cast to int64 (-9223372036854775808)."""
    rows = [f"1@{STACK_A} 30 60 90 15000 1 1", f"2@{STACK_A} 30 60 90 15000 1 {value}"]
    path = _write(tmp_path, _optics() + _particles(BASIC + [label], rows))
    with pytest.raises(InputFileError) as err:
        read_star(path)
    text = str(err.value)
    assert f"{label} {float(value)} is out of range" in text and "particle row 2" in text, text
    assert "9223372036854775808" not in text


# ---- writing -------------------------------------------------------------------------------

def _assert_same_particles(a, b):
    assert len(a) == len(b)
    np.testing.assert_allclose(b.rotations, a.rotations, atol=1e-6, rtol=0)
    for name in ("stack_paths", "stack_indices", "shifts_px", "half_set", "optics_group", "ctf_premultiplied"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
    if a.class_number is None:
        assert b.class_number is None
    else:
        np.testing.assert_array_equal(b.class_number, a.class_number)
    for key in a.ctf:
        np.testing.assert_array_equal(b.ctf[key], a.ctf[key], err_msg=key)
    assert (b.pixel_size_angstrom, b.box_size) == (a.pixel_size_angstrom, a.box_size)


@pytest.mark.parametrize("name", ["relion31.star", "relion30.star", "relion5.star", "relion31_optics_groups.star"])
def test_round_trip_is_exact(tmp_path, name):
    a = read_star(DATA / name)
    out = tmp_path / "sub" / "out.star"
    write_star(a, out)
    b = read_star(out)
    _assert_same_particles(a, b)
    assert b.meta["star_version"] == 30001
    # every input column survives (3.0 pixel origins become RELION 3.1 Angstrom origins)
    lost = set(a.table.columns) - set(b.table.columns)
    assert lost <= {"rlnOriginX", "rlnOriginY"}
    for column in ("rlnMicrographName", "rlnCoordinateX"):
        if column in a.table.columns:
            assert b.table[column].tolist() == a.table[column].tolist()
    # writing what was read back gives the same text
    again = tmp_path / "sub" / "again.star"
    write_star(b, again)
    assert again.read_text() == out.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["again.star", "out.star"]  # no temporary files


def test_written_file_is_relion31(tmp_path):
    p = read_star(DATA / "relion30.star")
    out = tmp_path / "converted.star"
    write_star(p, out)
    text = out.read_text()
    assert text.count("# version 30001") == 2
    assert re.search(r"^data_optics$", text, re.M) and re.search(r"^data_particles$", text, re.M)
    blocks = starfile.read(out, always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert optics["rlnImagePixelSize"].tolist() == [1.5, 1.5] and optics["rlnImageSize"].tolist() == [16, 16]
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0]
    assert "rlnVoltage" not in particles.columns and "rlnOriginX" not in particles.columns
    assert particles["rlnOriginXAngst"].tolist() == [1.5, 0.0, -2.25]  # 1.0, 0.0, -1.5 px * 1.5 A
    # the output folder shares no folder with the stacks below the root: absolute names
    if os.path.commonpath([STACK_A, str(tmp_path)]) == os.path.abspath(os.sep):
        assert particles["rlnImageName"].tolist()[0] == f"000001@{STACK_A}"


def test_image_names_are_relative_to_the_output_folder(tmp_path):
    project = tmp_path / "project"
    (project / "Refine3D").mkdir(parents=True)
    os.symlink(DATA / "Particles", project / "Particles")
    text = (DATA / "relion31.star").read_text()
    (project / "Refine3D" / "run_data.star").write_text(text)
    p = read_star(project / "Refine3D" / "run_data.star", root=project)
    out = project / "Select" / "selected.star"
    write_star(p, out)
    names = starfile.read(out, always_dict=True)["particles"]["rlnImageName"].tolist()
    assert names[:4] == ["000001@../Particles/stack_a.mrcs", "000002@../Particles/stack_a.mrcs",
                         "000004@../Particles/stack_a.mrcs", "000003@../Particles/stack_b.mrcs"]
    _assert_same_particles(p, read_star(out))  # resolved relative to the new file's folder


def test_modified_particles_are_written_from_the_arrays(tmp_path, rng):
    from numba_recon.geometry import random_rotations

    p = read_star(DATA / "relion31.star")
    p.rotations = random_rotations(len(p), rng)
    p.shifts_px = rng.uniform(-5, 5, size=(len(p), 2))
    p.ctf["defocus_u_angstrom"] = p.ctf["defocus_u_angstrom"] + 123.25
    p.half_set = np.array([2, 1, 2, 1, 1], dtype=np.int8)
    out = tmp_path / "modified.star"
    write_star(p, out)
    _assert_same_particles(p, read_star(out))


def test_subset_and_extra_columns(tmp_path):
    p = read_star(DATA / "relion31.star").subset(np.array([4, 0, 2]))
    scores = np.array([0.5, 1.25, -3.0])
    out = tmp_path / "run_data.star"
    write_star(p, out, extra_columns={"rlnParticleFigureOfMerit": scores, "_numbaReconLoss": scores * 2})
    b = read_star(out)
    _assert_same_particles(p, b)
    np.testing.assert_array_equal(b.table["rlnParticleFigureOfMerit"], scores)
    np.testing.assert_array_equal(b.table["numbaReconLoss"], scores * 2)
    with pytest.raises(ValueError, match="extra column"):
        write_star(p, out, extra_columns={"rlnX": np.zeros(5)})


def test_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    p = read_star(DATA / "relion31.star")
    out = tmp_path / "keep.star"
    out.write_text("old content\n")
    import numba_recon.io.star as star

    def broken(*args):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(star, "_format_block", broken)
    with pytest.raises(RuntimeError):
        write_star(p, out)
    assert out.read_text() == "old content\n"
    assert [x.name for x in tmp_path.iterdir()] == ["keep.star"]


# ---- fuzzing -------------------------------------------------------------------------------

_VALID = (DATA / "relion31.star").read_text()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, len(_VALID)), junk=st.text(alphabet=" \t\n#_@\"'abcfinNA019.-e", min_size=1, max_size=12))
def test_corrupted_star_files_raise_input_errors_only(tmp_path, offset, junk):
    path = tmp_path / "fuzz" / "relion31.star"
    path.parent.mkdir(exist_ok=True)
    if not (path.parent / "Particles").exists():
        os.symlink(DATA / "Particles", path.parent / "Particles")
    path.write_text(_VALID[:offset] + junk + _VALID[offset:])
    try:
        p = read_star(path)
    except InputError:
        return
    assert len(p) >= 1 and np.isfinite(p.rotations).all() and np.isfinite(p.shifts_px).all()
    assert all(np.isfinite(v).all() for v in p.ctf.values())
