"""``numba-recon info`` and ``numba-recon convert`` on good files."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.io.mrc import write_volume
from numba_recon.io.star import read_star
from numba_recon.io.thu import read_thu

DATA = Path(__file__).parent / "data"


def _ok(runner, args):
    result = runner.invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_info_star_text(runner):
    out = _ok(runner, ["info", str(DATA / "relion31.star")]).stdout
    expected = {
        "particles": "5",
        "optics groups": "1 (1: 5)",
        "pixel size": "1.5 A (from rlnImagePixelSize)",
        "box size": "16 px",
        "defocus range": "11500.0 - 20000.0 A",
        "half sets": "1: 2, 2: 3",
        "classes": "1: 3, 2: 2",
        "CTF premultiplied": "no",
        "stack files": "2",
    }
    lines = dict(line.split(":", 1) for line in out.splitlines())
    for key, value in expected.items():
        assert lines[key].strip() == value, key
    assert "RELION STAR, version 30001" in lines["file"]


def test_info_star_json(runner):
    s = json.loads(_ok(runner, ["info", str(DATA / "relion5.star"), "--json"]).stdout)
    assert s["format"] == "star" and s["star_version"] == 50001
    assert s["n_particles"] == 3 and s["n_optics_groups"] == 1 and s["box_size"] == 16
    assert s["pixel_size_angstrom"] == 1.5 and s["n_stack_files"] == 2
    assert s["defocus_min_angstrom"] == 11500.0 and s["defocus_max_angstrom"] == 20000.0
    assert s["half_sets"] == {"1": 1, "2": 2, "0": 0} and s["classes"] == {"1": 3}
    assert s["n_ctf_premultiplied"] == 3


def test_info_relion30_and_optics_groups(runner):
    s = json.loads(_ok(runner, ["info", str(DATA / "relion30.star"), "--json"]).stdout)
    assert s["star_version"] == 30000 and s["optics_groups"] == {"1": 2, "2": 1}
    assert s["pixel_size_source"] == "rlnDetectorPixelSize/rlnMagnification"
    assert s["half_sets"]["0"] == 3 and s["classes"] is None
    text = _ok(runner, ["info", str(DATA / "relion30.star")]).stdout
    assert "none in the file (3 particles; split at run time)" in text


def test_info_thu_and_angpix(runner):
    s = json.loads(_ok(runner, ["info", str(DATA / "particles.thu"), "--angpix", "1.06", "--json"]).stdout)
    assert s["format"] == "thu" and s["pixel_size_angstrom"] == 1.06 and s["n_particles"] == 3
    assert s["half_split"] == {"method": "seeded hash of the image names", "seed": 0}
    assert s["classes"] == {"1": 2, "2": 1}
    assert s["defocus_max_angstrom"] == pytest.approx(19600.0)  # 20000 x defocus factor 0.98


def test_info_root_option(runner):
    s = json.loads(_ok(runner, ["info", str(DATA / "rooted" / "particles.star"), "--root", str(DATA),
                                "--json"]).stdout)
    assert s["n_particles"] == 2 and s["n_stack_files"] == 2


def test_info_check_images(runner):
    out = _ok(runner, ["info", str(DATA / "relion31.star"), "--check-images"]).stdout
    assert "images checked:    5, all finite" in out


def test_info_mrc_stack(runner):
    s = json.loads(_ok(runner, ["info", str(DATA / "Particles" / "stack_a.mrcs"), "--json"]).stdout)
    with mrcfile.open(DATA / "Particles" / "stack_a.mrcs") as mrc:
        data = np.asarray(mrc.data, dtype=np.float64)
    assert s["kind"] == "stack" and s["shape"] == [4, 16, 16] and s["voxel_size_angstrom"] == 1.5
    assert s["min"] == data.min() and s["max"] == data.max()
    assert s["mean"] == pytest.approx(data.mean(), abs=1e-12) and s["std"] == pytest.approx(data.std(), rel=1e-12)
    text = _ok(runner, ["info", str(DATA / "Particles" / "stack_a.mrcs")]).stdout
    assert "MRC stack" in text and "4 x 16 x 16" in text


def test_info_mrc_volume(runner, tmp_path, rng):
    volume = rng.standard_normal((10, 10, 10)).astype(np.float32)
    write_volume(tmp_path / "map.mrc", volume, 2.5)
    s = json.loads(_ok(runner, ["info", str(tmp_path / "map.mrc"), "--json"]).stdout)
    assert s["kind"] == "volume" and s["ispg"] == 1 and s["voxel_size_angstrom"] == 2.5
    assert s["std"] == pytest.approx(volume.astype(np.float64).std(), rel=1e-9)
    # a cubic map written with ispg 0 (as cryoSPARC does) is still a volume
    with mrcfile.new(tmp_path / "cs.mrc") as mrc:
        mrc.set_data(volume)
        mrc.set_image_stack()
    assert json.loads(_ok(runner, ["info", str(tmp_path / "cs.mrc"), "--json"]).stdout)["kind"] == "volume"


def test_convert_thu_to_star_and_back(runner, tmp_path):
    star = tmp_path / "particles.star"
    result = _ok(runner, ["convert", str(DATA / "particles.thu"), str(star), "--angpix", "1.5", "--seed", "4"])
    assert "wrote 3 particles" in result.stderr
    a, b = read_thu(DATA / "particles.thu", angpix=1.5, seed=4), read_star(star)
    np.testing.assert_allclose(b.rotations, a.rotations, atol=1e-6)
    np.testing.assert_array_equal(b.half_set, a.half_set)
    np.testing.assert_array_equal(b.shifts_px, a.shifts_px)
    thu = tmp_path / "back.thu"
    _ok(runner, ["convert", str(star), str(thu)])
    c = read_thu(thu, angpix=1.5)
    np.testing.assert_allclose(c.rotations, a.rotations, atol=1e-6)
    np.testing.assert_array_equal(c.stack_paths, a.stack_paths)


def test_convert_star_30_to_31(runner, tmp_path):
    out = tmp_path / "relion31.star"
    _ok(runner, ["convert", str(DATA / "relion30.star"), str(out)])
    text = out.read_text()
    assert "# version 30001" in text and "data_optics" in text and "_rlnOriginXAngst" in text
    a, b = read_star(DATA / "relion30.star"), read_star(out)
    np.testing.assert_array_equal(b.shifts_px, a.shifts_px)
    np.testing.assert_array_equal(b.optics_group, a.optics_group)


def test_convert_refuses_to_overwrite(runner, tmp_path):
    out = tmp_path / "out.star"
    out.write_text("precious\n")
    result = runner.invoke(main, ["convert", str(DATA / "relion31.star"), str(out)])
    assert result.exit_code == 2 and "pass --overwrite" in result.stderr
    assert out.read_text() == "precious\n"
    _ok(runner, ["convert", str(DATA / "relion31.star"), str(out), "--overwrite"])
    assert len(read_star(out)) == 5


def test_convert_unknown_output_type(runner, tmp_path):
    result = runner.invoke(main, ["convert", str(DATA / "relion31.star"), str(tmp_path / "out.csv")])
    assert result.exit_code == 2 and "give an output file ending in .star or .thu" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["info", "convert"])
def test_help_has_an_example(runner, command):
    out = _ok(runner, [command, "--help"]).stdout
    assert "Examples:" in out and f"numba-recon {command} " in out
