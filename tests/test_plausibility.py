"""Plausibility of particle metadata: implausible physics is warned about once per column (naming
the column and the plausible range), impossible physics is refused with one line and exit status 2,
and good files, fixtures and simulated data sets read without a warning."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from numba_recon.cli import main
from numba_recon.errors import InputFileError
from numba_recon.plausibility import check_plausibility
from numba_recon.read import read_particles

DATA = Path(__file__).parent / "data"
GOOD_STAR = ["relion30.star", "relion31.star", "relion31_optics_groups.star", "relion5.star"]
LOGGER = "numba_recon.plausibility"


# ---- helpers: edited copies of the fixtures ------------------------------------------------------

@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder holding the fixtures' stacks, so edited copies of the fixtures resolve their images."""
    shutil.copytree(DATA / "Particles", tmp_path / "Particles")
    return tmp_path


def edit_star(src: Path, dst: Path, label: str, value: str | None = None, rows: list[int] | None = None,
              values: list[str] | None = None) -> Path:
    """Copy STAR file ``src`` to ``dst`` with column ``label`` set to ``value`` in the given 0-based
    data rows of its loop (all rows when None), or to ``values`` row by row."""
    lines = src.read_text().splitlines()
    labels: list[str] = []
    row = 0
    in_loop = False
    index = None
    for i, line in enumerate(lines):
        token = line.strip()
        if token.startswith("data_"):
            labels, row, in_loop, index = [], 0, False, None
        elif token == "loop_":
            in_loop = True
        elif in_loop and token.startswith("_"):
            labels.append(token.split()[0][1:])
            index = labels.index(label) if label in labels else None
        elif in_loop and token and not token.startswith("#") and index is not None:
            fields = line.split()
            if rows is None or row in rows:
                fields[index] = values[row] if values is not None else str(value)
            lines[i] = " ".join(fields)
            row += 1
    dst.write_text("\n".join(lines) + "\n")
    return dst


def edit_thu(src: Path, dst: Path, column: int, value: str, rows: list[int] | None = None) -> Path:
    """Copy ``.thu`` file ``src`` to ``dst`` with 0-based ``column`` set to ``value`` in the given particle lines."""
    out = []
    row = 0
    for line in src.read_text().splitlines():
        if "#" in line or not line.strip():
            out.append(line)
            continue
        fields = line.split()
        if rows is None or row in rows:
            fields[column] = value
        out.append(" ".join(fields))
        row += 1
    dst.write_text("\n".join(out) + "\n")
    return dst


def plausibility_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def read_warned(caplog, path: Path, **kwargs) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        particles = read_particles(path, **kwargs)
    found = plausibility_warnings(caplog)
    assert particles.meta["plausibility_warnings"] == found
    return found


def one_warning(found: list[str], label: str, *words: str) -> str:
    """The one warning naming ``label``; it contains every word of ``words``."""
    named = [w for w in found if f": {label}:" in w or w.startswith(f"{label}:")]
    assert len(named) == 1, found
    for word in words:
        assert word in named[0], (word, named[0])
    return named[0]


def assert_one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("numba-recon: error: ")
    for word in words:
        assert word in line, (word, line)
    return line


# ---- good data: no warning -----------------------------------------------------------------------

@pytest.mark.parametrize("name", GOOD_STAR)
def test_star_fixtures_read_without_warnings(caplog, name):
    assert read_warned(caplog, DATA / name) == []


def test_rooted_and_thu_fixtures_read_without_warnings(caplog):
    assert read_warned(caplog, DATA / "rooted" / "particles.star", root=DATA) == []
    assert read_warned(caplog, DATA / "particles.thu", angpix=1.5) == []
    assert read_warned(caplog, DATA / "particles.thu", angpix=1.5, class_number=1) == []


@pytest.mark.parametrize("params", [
    {},  # the simulator's defaults
    # what `numba-recon demo` simulates
    dict(box_size=32, pixel_size_angstrom=2.0, defocus_min_um=1.0, defocus_max_um=2.5, astigmatism_angstrom=200.0,
         voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, max_shift_px=3.0, junk_fraction=0.0),
    # junk and the largest shift the simulator allows (a quarter of the box)
    dict(box_size=24, pixel_size_angstrom=4.0, junk_fraction=0.3, max_shift_px=6.0),
], ids=["defaults", "demo", "junk-max-shift"])
def test_simulated_data_read_without_warnings(caplog, tmp_path, params):
    from numba_recon.sim.simulate import simulate_dataset

    params = {"box_size": 24, **params}
    simulate_dataset(tmp_path / "sim", n_particles=40, particles_per_stack=16, seed=3, **params)
    star = tmp_path / "sim" / "particles.star"
    assert read_warned(caplog, star) == []
    converted = tmp_path / "sim" / "particles.thu"
    from numba_recon.io.thu import write_thu

    particles = read_particles(star)
    write_thu(particles, converted)
    assert read_warned(caplog, converted, angpix=particles.pixel_size_angstrom) == []


def test_info_on_good_file_prints_no_warning(runner):
    result = runner.invoke(main, ["info", str(DATA / "relion31.star")])
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.stderr


# ---- pixel size ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pixel_size, words", [
    ("0.000001", ["1e-06 A", "16-px box would be 1.6e-05 A wide"]),
    ("1000000", ["1e+06 A", "1.6e+07 A wide"]),
])
def test_implausible_pixel_size_in_star_warns(caplog, workdir, pixel_size, words):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnImagePixelSize", pixel_size)
    # origins in Angstrom are divided by the pixel size: zero them so only the pixel size is judged
    edit_star(star, star, "rlnOriginXAngst", "0")
    edit_star(star, star, "rlnOriginYAngst", "0")
    found = read_warned(caplog, star)
    assert len(found) == 1
    one_warning(found, "rlnImagePixelSize", "plausible range 0.1 to 20 A", *words)


@pytest.mark.parametrize("angpix", [1e-6, 1e6])
def test_implausible_angpix_warns_for_star_and_thu(caplog, angpix):
    for path, kwargs in ((DATA / "relion31.star", {}), (DATA / "particles.thu", {})):
        found = read_warned(caplog, path, angpix=angpix, **kwargs)
        assert len(found) == 1
        one_warning(found, "--angpix", f"pixel size {angpix:g} A", "plausible range 0.1 to 20 A")


def test_derived_pixel_size_names_detector_and_magnification(caplog, workdir):
    star = edit_star(DATA / "relion30.star", workdir / "p.star", "rlnMagnification", "4")  # 15000 A/px
    found = read_warned(caplog, star)
    one_warning(found, "rlnDetectorPixelSize/rlnMagnification", "15000 A", "0.1 to 20 A", "micrometres")


def test_tiny_pixel_size_with_angstrom_origins_is_refused_naming_both(runner, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnImagePixelSize", "0.000001")
    result = runner.invoke(main, ["info", str(star)])
    assert_one_line_error(result, "p.star", "rlnOriginXAngst", "2 box sizes (32 px)",
                          "the pixel size they are divided by, 1e-06 A, itself outside the plausible range 0.1 to 20 A")


# ---- defocus -------------------------------------------------------------------------------------

def test_negative_defocus_warns_once_with_count_and_range(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnDefocusU",
                     values=["-15000", "-12000", "20000", "18000", "16000"])
    found = read_warned(caplog, star)
    assert len(found) == 1
    one_warning(found, "rlnDefocusU", "2 of 5 particles", "plausible range 0 to 100000 A",
                "found -15000 to -12000 A", "underfocus", "overfocus")


def test_huge_defocus_warns(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnDefocusV", "1e9")
    found = read_warned(caplog, star)
    one_warning(found, "rlnDefocusV", "5 of 5 particles", "0 to 100000 A", "found 1e+09 A")


def test_defocus_in_micrometres_warns(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnDefocusU", "1.5")
    edit_star(star, star, "rlnDefocusV", "1.4")
    found = read_warned(caplog, star)
    assert len(found) == 2
    one_warning(found, "rlnDefocusU", "micrometres", "0 to 100000 A")


def test_thu_defocus_names_thunder_columns(caplog, workdir):
    thu = edit_thu(DATA / "particles.thu", workdir / "p.thu", 1, "-15000", rows=[0])
    found = read_warned(caplog, thu, angpix=1.5)
    one_warning(found, "DEFOCUS_U x DEFOCUS_FACTOR (columns 1, 24)", "1 of 3 particles", "0 to 100000 A")


def test_missing_defocus_v_is_not_reported_twice(caplog, tmp_path):
    star = tmp_path / "p.star"
    star.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnAmplitudeContrast\n_rlnSphericalAberration\n_rlnVoltage\n"
        "_rlnImagePixelSize\n1 0.1 2.7 300 1.5\n\ndata_particles\nloop_\n_rlnImageName\n_rlnAngleRot\n"
        "_rlnAngleTilt\n_rlnAnglePsi\n_rlnDefocusU\n_rlnOpticsGroup\n"
        f"1@{DATA / 'Particles' / 'stack_a.mrcs'} 0 0 0 -20000 1\n")
    found = read_warned(caplog, star)
    assert len(found) == 1
    one_warning(found, "rlnDefocusU", "1 of 1 particles")


# ---- voltage, Cs, amplitude contrast --------------------------------------------------------------

def test_millivolt_voltage_warns(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnVoltage", "0.001")
    found = read_warned(caplog, star)
    assert len(found) == 1
    one_warning(found, "rlnVoltage", "5 of 5 particles", "plausible range 60 to 1000 kV", "found 0.001 kV")


def test_huge_cs_warns(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnSphericalAberration", "1e12")
    found = read_warned(caplog, star)
    assert len(found) == 1
    one_warning(found, "rlnSphericalAberration", "plausible range 0 to 10 mm", "found 1e+12 mm")


def test_cs_in_angstrom_in_a_star_file_is_recognised(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnSphericalAberration", "27000000")
    one_warning(read_warned(caplog, star), "rlnSphericalAberration", "look like Angstrom", "0 to 10 mm")


def test_negative_cs_warns_about_correctors(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnSphericalAberration", "-2.7")
    one_warning(read_warned(caplog, star), "rlnSphericalAberration", "negative-Cs", "0 to 10 mm")


def test_high_amplitude_contrast_warns(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnAmplitudeContrast", "0.8")
    one_warning(read_warned(caplog, star), "rlnAmplitudeContrast", "plausible range 0 to 0.5", "found 0.8")


@pytest.mark.parametrize("command", ["info", "convert"])
def test_amplitude_contrast_above_one_is_refused(runner, workdir, command):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnAmplitudeContrast", "1.5")
    args = [command, str(star)] + ([str(workdir / "out.thu")] if command == "convert" else [])
    assert_one_line_error(runner.invoke(main, args), "rlnAmplitudeContrast", "1.5", "[0, 1)")
    assert not (workdir / "out.thu").exists()
    thu = edit_thu(DATA / "particles.thu", workdir / "p.thu", 5, "1.5")
    assert_one_line_error(runner.invoke(main, ["info", str(thu), "--angpix", "1.5"]), "amplitude contrast 1.5",
                          "[0, 1)")


# ---- THUNDER unit slips --------------------------------------------------------------------------

def test_thu_voltage_in_kv_warns(caplog, workdir):
    thu = edit_thu(DATA / "particles.thu", workdir / "p.thu", 0, "300")
    found = read_warned(caplog, thu, angpix=1.5)
    assert len(found) == 1
    one_warning(found, "VOLTAGE (column 0)", "3 of 3 particles", "look like kV", "in volts",
                "plausible range 60000 to 1e+06 V (60 to 1000 kV)", "found 300 V")


def test_thu_cs_in_mm_warns(caplog, workdir):
    thu = edit_thu(DATA / "particles.thu", workdir / "p.thu", 4, "2.7")
    found = read_warned(caplog, thu, angpix=1.5)
    assert len(found) == 1
    one_warning(found, "CS (column 4)", "3 of 3 particles", "look like mm", "in Angstrom",
                "0 to 1e+08 A (0 to 10 mm)")


def test_thu_zero_cs_is_plausible(caplog, workdir):
    thu = edit_thu(DATA / "particles.thu", workdir / "p.thu", 4, "0")
    assert read_warned(caplog, thu, angpix=1.5) == []


def test_thu_warnings_through_the_cli(runner, workdir):
    thu = edit_thu(DATA / "particles.thu", workdir / "p.thu", 0, "300")
    result = runner.invoke(main, ["info", str(thu), "--angpix", "1.5"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warned) == 1 and "VOLTAGE (column 0)" in warned[0] and "look like kV" in warned[0]


# ---- origins -------------------------------------------------------------------------------------

def test_origin_beyond_half_the_box_warns(caplog, workdir):
    # box 16 px at 1.5 A/px: 15 A is 10 px, beyond the half-width of 8 px
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnOriginYAngst", "15", rows=[0, 2])
    found = read_warned(caplog, star)
    assert len(found) == 1
    one_warning(found, "rlnOriginYAngst", "2 of 5 particles", "within +-8 px", "found 15 A, 10 px",
                "outside its image")


def test_origin_1000_boxes_away_is_refused(runner, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnOriginXAngst", str(1000 * 16 * 1.5),
                     rows=[1])
    line = assert_one_line_error(runner.invoke(main, ["info", str(star)]), "p.star", "rlnOriginXAngst",
                                 "1 of 5 particles", "2 box sizes (32 px)", "16000 px",
                                 "000002@Particles/stack_a.mrcs", "within +-8 px")
    assert "itself outside" not in line  # the pixel size is fine


def test_origin_far_away_is_refused_by_run_before_any_output(runner, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnOriginXAngst", str(1000 * 16 * 1.5),
                     rows=[1])
    out = workdir / "out"
    result = runner.invoke(main, ["-q", "run", str(star), "-o", str(out), "--backend", "cpu"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("numba-recon: error: ")
    assert "rlnOriginXAngst" in result.stderr and "2 box sizes" in result.stderr
    assert not out.exists()


def test_thu_translation_far_away_is_refused(runner, workdir):
    thu = edit_thu(DATA / "particles.thu", workdir / "p.thu", 21, "-16000", rows=[2])
    assert_one_line_error(runner.invoke(main, ["info", str(thu), "--angpix", "1.5"]), "TRANSLATION_Y (column 21)",
                          "1 of 3 particles", "found -16000 px", "000004@Particles/stack_a.mrcs")


def test_relion30_origin_in_pixels_warns(caplog, workdir):
    star = edit_star(DATA / "relion30.star", workdir / "p.star", "rlnOriginX", "-12", rows=[0])
    one_warning(read_warned(caplog, star), "rlnOriginX", "1 of 3 particles", "found -12 px", "within +-8 px")


def test_permissive_read_drops_impossible_particles(workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnOriginXAngst", str(1000 * 16 * 1.5),
                     rows=[1])
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 5 particles.*rlnOriginXAngst"):
        particles = read_particles(star, permissive=True)
    assert len(particles) == 4
    assert "000002@Particles/stack_a.mrcs" not in particles.table["rlnImageName"].tolist()


# ---- one warning per column, several columns -----------------------------------------------------

def test_one_warning_per_column(caplog, workdir):
    star = edit_star(DATA / "relion31.star", workdir / "p.star", "rlnDefocusU",
                     values=["-1", "-2", "-3", "1e9", "16000"])
    edit_star(star, star, "rlnVoltage", "0.001")
    edit_star(star, star, "rlnSphericalAberration", "1e12")
    found = read_warned(caplog, star)
    assert len(found) == 3
    one_warning(found, "rlnDefocusU", "4 of 5 particles", "found -3 to 1e+09 A", "overfocus", "10 um")
    one_warning(found, "rlnVoltage")
    one_warning(found, "rlnSphericalAberration")
    assert all(w.startswith(str(star) + ": ") for w in found)


# ---- the check on its own (values the readers already refuse) ------------------------------------

def _good_set():
    return read_particles(DATA / "relion31.star")


@pytest.mark.parametrize("key, value, words", [
    ("amplitude_contrast", 1.5, ["rlnAmplitudeContrast", "[0, 1)", "found 1.5"]),
    ("amplitude_contrast", -0.1, ["rlnAmplitudeContrast", "[0, 1)"]),
    ("voltage_kv", 0.0, ["rlnVoltage", "not positive", "60 to 1000 kV"]),
    ("voltage_kv", -300.0, ["rlnVoltage", "not positive"]),
    ("cs_mm", np.inf, ["rlnSphericalAberration", "not a finite number"]),
    ("defocus_u_angstrom", np.nan, ["rlnDefocusU", "not a finite number"]),
])
def test_check_refuses_impossible_ctf_values(key, value, words):
    particles = _good_set()
    particles.ctf[key] = particles.ctf[key].copy()
    particles.ctf[key][2] = value
    with pytest.raises(InputFileError) as err:
        check_plausibility(particles, "x.star")
    for word in words:
        assert word in str(err.value)
    assert str(err.value).startswith("x.star: ")


@pytest.mark.parametrize("pixel_size", [0.0, -1.5, np.nan])
def test_check_refuses_impossible_pixel_size(pixel_size):
    particles = _good_set()
    particles.pixel_size_angstrom = pixel_size
    with pytest.raises(InputFileError, match="rlnImagePixelSize: pixel size .* is not a positive length"):
        check_plausibility(particles, "x.star")


def test_check_without_path_and_on_an_empty_set():
    particles = _good_set()
    particles.ctf["voltage_kv"] = np.full(len(particles), 0.3)
    found = check_plausibility(particles, None)
    assert len(found) == 1 and found[0].startswith("rlnVoltage: ")
    assert check_plausibility(particles.subset(np.zeros(len(particles), dtype=bool)), "x.star") == []


finite = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.fixed_dictionaries({
    "defocus_u_angstrom": finite, "voltage_kv": finite, "cs_mm": finite, "amplitude_contrast": finite,
}), shift=finite, pixel_size=finite, thu=st.booleans())
@pytest.mark.slow
@example(values=dict.fromkeys(("defocus_u_angstrom", "voltage_kv", "cs_mm", "amplitude_contrast"), 0.0),
         shift=6.741349255733686e307, pixel_size=1.0, thu=False)  # Angstrom / px underflowed
@example(values={"defocus_u_angstrom": 1e4, "voltage_kv": 1e306, "cs_mm": 1e305, "amplitude_contrast": 0.1},
         shift=0.0, pixel_size=1e308, thu=True)  # kV -> V and mm -> A overflow
def test_check_fuzz_only_warns_or_refuses(values, shift, pixel_size, thu):
    """Any values: a list of one-line warnings, or an InputFileError; never another exception, nor a
    numpy floating-point warning (the values are scaled to the file's units for the messages)."""
    particles = read_particles(DATA / "particles.thu", angpix=1.5) if thu else _good_set()
    for key, value in values.items():
        particles.ctf[key] = np.full(len(particles), value)
    particles.shifts_px = particles.shifts_px.copy()
    particles.shifts_px[0, 0] = shift
    particles.pixel_size_angstrom = pixel_size
    with np.errstate(all="raise"):
        try:
            found = check_plausibility(particles, "x.star")
        except InputFileError as err:
            assert "\n" not in str(err)
            return
    assert all(isinstance(w, str) and "\n" not in w for w in found)
    assert len(found) == len({re.match(r"x\.star: ([^:]+):", w).group(1) for w in found})


def test_zero_defocus_warns(tmp_path, caplog):
    """A defocus column of zeros (a missing value) used to read without a word, and the run then
    reported half maps that agree with each other but not with the particle."""
    import logging

    from numba_recon.read import read_particles
    from numba_recon.sim.simulate import simulate_dataset

    sim = tmp_path / "sim"
    simulate_dataset(sim, n_particles=16, box_size=16, pixel_size_angstrom=4.0, snr=0.5, seed=2, particles_per_stack=16)
    import starfile

    star = starfile.read(sim / "particles.star", always_dict=True)
    star["particles"]["rlnDefocusU"] = 0.0
    star["particles"]["rlnDefocusV"] = 0.0
    starfile.write(star, sim / "zero.star", overwrite=True)
    with caplog.at_level(logging.WARNING):
        read_particles(sim / "zero.star")
    assert "rlnDefocusU: 16 of 16 particles have a defocus of exactly 0 A" in caplog.text
