"""The fsc, mask, postprocess and lowpass commands: outputs, and one clear line with exit status 2
for bad input."""

import mrcfile
import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.io.mrc import read_volume, write_volume


@pytest.fixture(scope="module")
def maps(tmp_path_factory, blobs):
    """Half maps (box 48, 1.2 A/px), the truth, a mask, and a few bad files."""
    d = tmp_path_factory.mktemp("maps")
    gen = np.random.default_rng(21)
    truth = blobs(48, 40, 1.2, 10, gen)
    half1 = truth + 0.2 * gen.standard_normal(truth.shape).astype(np.float32)
    half2 = truth + 0.2 * gen.standard_normal(truth.shape).astype(np.float32)
    idx = np.arange(48) - 24
    r = np.sqrt(idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2)
    mask = np.clip((18 - r) / 4, 0, 1).astype(np.float32)
    write_volume(d / "half1.mrc", half1, 1.2)
    write_volume(d / "half2.mrc", half2, 1.2)
    write_volume(d / "truth.mrc", truth, 1.2)
    write_volume(d / "mask.mrc", mask, 1.2)
    write_volume(d / "small.mrc", half2[:40, :40, :40], 1.2)
    write_volume(d / "other_angpix.mrc", half2, 1.5)
    write_volume(d / "bad_mask.mrc", 2.0 * mask - 0.5, 1.2)
    write_volume(d / "small_mask.mrc", mask[:40, :40, :40], 1.2)
    with mrcfile.new(d / "no_angpix.mrc") as mrc:  # voxel size 0 in the header
        mrc.set_data(half2)
    return d


def run(runner, *args):
    return runner.invoke(main, [str(a) for a in args])


def test_help_texts_have_examples(runner):
    for command in ("fsc", "mask", "postprocess", "lowpass"):
        result = run(runner, command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout, result.output


def test_fsc_command(runner, maps, tmp_path, assert_one_line_error):
    result = run(runner, "fsc", maps / "half1.mrc", maps / "half2.mrc", "-o", tmp_path / "fsc.csv",
                 "--plot", tmp_path / "fsc.png")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FSC 0.143") and lines[1].startswith("FSC 0.5")
    from numba_recon.evaluate.fsc import fsc, resolution_at

    h1, _ = read_volume(maps / "half1.mrc")
    h2, _ = read_volume(maps / "half2.mrc")
    curve = fsc(h1, h2)
    assert f"{resolution_at(curve, 48, 1.2):.2f} A" in lines[0]
    assert f"{resolution_at(curve, 48, 1.2, 0.5):.2f} A" in lines[1]
    lines = (tmp_path / "fsc.csv").read_text().splitlines()
    assert lines[0].startswith("# numba-recon ") and lines[1].startswith("# command: ")  # provenance
    rows = [line for line in lines if not line.startswith("#")]
    assert rows[0] == "spectral_index,resolution_inv_angstrom,resolution_angstrom,fsc" and len(rows) == 26
    assert (tmp_path / "fsc.png").read_bytes()[:4] == b"\x89PNG"
    # existing outputs are kept without --overwrite
    before = (tmp_path / "fsc.csv").read_bytes()
    assert_one_line_error(run(runner, "fsc", maps / "half1.mrc", maps / "half2.mrc", "-o", tmp_path / "fsc.csv"),
                          "exists", "--overwrite")
    assert (tmp_path / "fsc.csv").read_bytes() == before
    again = run(runner, "fsc", maps / "half1.mrc", maps / "half2.mrc", "-o", tmp_path / "fsc.csv", "--overwrite",
                "--mask", maps / "mask.mrc")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "fsc.csv").read_bytes() != before  # masked FSC differs


def test_fsc_bad_inputs(runner, maps, assert_one_line_error):
    h1 = maps / "half1.mrc"
    assert_one_line_error(run(runner, "fsc", h1, maps / "small.mrc"), "small.mrc", "box 40")
    assert_one_line_error(run(runner, "fsc", h1, maps / "other_angpix.mrc"), "other_angpix.mrc", "voxel size")
    assert run(runner, "fsc", h1, maps / "other_angpix.mrc", "--angpix", 1.3).exit_code == 0  # --angpix overrides
    assert_one_line_error(run(runner, "fsc", h1, maps / "missing.mrc"), "missing.mrc", "not found")
    assert_one_line_error(run(runner, "fsc", h1, maps / "no_angpix.mrc"), "no_angpix.mrc", "--angpix")
    assert_one_line_error(run(runner, "fsc", h1, maps / "half2.mrc", "--mask", maps / "small_mask.mrc"),
                          "small_mask.mrc", "box")
    assert_one_line_error(run(runner, "fsc", h1, maps / "half2.mrc", "--mask", maps / "bad_mask.mrc"),
                          "bad_mask.mrc", "[0, 1]")


def test_mask_command(runner, maps, tmp_path, assert_one_line_error):
    out = tmp_path / "auto.mrc"
    result = run(runner, "mask", maps / "truth.mrc", "-o", out, "--threshold", "auto", "--extend", 2,
                 "--soft-edge", 4, "--lowpass", 10)
    assert result.exit_code == 0, result.output
    assert "threshold" in result.stdout and "auto" in result.stdout
    m, angpix = read_volume(out)
    assert angpix == pytest.approx(1.2)
    assert m.min() >= 0 and m.max() == 1 and 0 < np.mean(m > 0.5) < 0.5
    assert m[24, 24, 24] == 1 and m[0, 0, 0] == 0
    result = run(runner, "mask", maps / "truth.mrc", "-o", tmp_path / "fixed.mrc", "--threshold", 0.1,
                 "--extend", 0, "--soft-edge", 0)
    assert result.exit_code == 0, result.output
    fixed, _ = read_volume(tmp_path / "fixed.mrc")
    truth, _ = read_volume(maps / "truth.mrc")
    np.testing.assert_array_equal(fixed, (truth >= 0.1).astype(np.float32))
    assert_one_line_error(run(runner, "mask", maps / "truth.mrc", "-o", tmp_path / "x.mrc", "--threshold", 1e6),
                          "no voxel reaches")
    assert_one_line_error(run(runner, "mask", maps / "truth.mrc", "-o", tmp_path / "x.mrc", "--threshold", "half"),
                          "'half'")
    assert_one_line_error(run(runner, "mask", maps / "truth.mrc", "-o", out, "--threshold", 0.1), "exists")
    assert not (tmp_path / "x.mrc").exists()


def test_lowpass_command(runner, maps, tmp_path, assert_one_line_error):
    out = tmp_path / "lp.mrc"
    result = run(runner, "lowpass", maps / "truth.mrc", "--resolution", 8, "-o", out)
    assert result.exit_code == 0, result.output
    lp, angpix = read_volume(out)
    assert angpix == pytest.approx(1.2)
    f = np.abs(np.fft.rfftn(lp.astype(np.float64)))
    k = np.fft.fftfreq(48, 1 / 48)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(25)[None, None, :] ** 2
    ires = round(48 * 1.2 / 8)  # 7: edge from shell 6 to shell 8
    assert f[r2 > (ires + 1) ** 2].max() < 1e-6 * f.max()
    assert_one_line_error(run(runner, "lowpass", maps / "truth.mrc", "--resolution", 8, "-o", out), "exists")
    assert_one_line_error(run(runner, "lowpass", maps / "no_angpix.mrc", "--resolution", 8, "-o", tmp_path / "y.mrc"),
                          "--angpix")
    assert_one_line_error(run(runner, "lowpass", maps / "truth.mrc", "--resolution", -2, "-o", tmp_path / "y.mrc"),
                          "--resolution")
    assert not (tmp_path / "y.mrc").exists()


def test_postprocess_command(runner, maps, tmp_path, assert_one_line_error):
    out = tmp_path / "post"
    result = run(runner, "postprocess", maps / "half1.mrc", maps / "half2.mrc", "--mask", maps / "mask.mrc",
                 "-o", out)
    assert result.exit_code == 0, result.output
    assert "resolution:" in result.stdout and "B-factor:" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "postprocess_fsc.csv",
         "postprocess_fsc.png", "postprocess_guinier.png"])
    star = (out / "postprocess.star").read_text()
    assert "_rlnMaskName" in star and "mask.mrc" in star and "_rlnRandomiseFrom" in star
    # without a mask: unmasked FSC only, no masked map; a given B-factor and low-pass
    plain = tmp_path / "plain"
    result = run(runner, "postprocess", maps / "half1.mrc", maps / "half2.mrc", "-o", plain, "--bfactor", -50,
                 "--lowpass", 6)
    assert result.exit_code == 0, result.output
    assert "unmasked FSC" in result.stdout and "-50.0 A^2 (given)" in result.stdout
    assert not (plain / "postprocess_masked.mrc").exists() and (plain / "postprocess.mrc").exists()
    assert "_rlnMaskName" not in (plain / "postprocess.star").read_text()
    # existing outputs are not overwritten
    before = (out / "postprocess.star").read_bytes()
    assert_one_line_error(run(runner, "postprocess", maps / "half1.mrc", maps / "half2.mrc", "--mask",
                              maps / "mask.mrc", "-o", out), "exist", "--overwrite")
    assert (out / "postprocess.star").read_bytes() == before


@pytest.mark.parametrize("args,fragments", [
    (["half1.mrc", "small.mrc"], ["small.mrc", "box"]),
    (["half1.mrc", "other_angpix.mrc"], ["other_angpix.mrc", "voxel size"]),
    (["half1.mrc", "half2.mrc", "--mask", "small_mask.mrc"], ["small_mask.mrc", "box"]),
    (["half1.mrc", "half2.mrc", "--mask", "bad_mask.mrc"], ["bad_mask.mrc", "outside [0, 1]"]),
    (["half1.mrc", "missing.mrc"], ["missing.mrc", "not found"]),
    (["half1.mrc", "half1.mrc", "--mask", "mask.mrc"], ["never drops below 0.8"]),
])
def test_postprocess_bad_inputs(runner, maps, tmp_path, args, fragments, assert_one_line_error):
    out = tmp_path / "bad"
    resolved = [maps / a if a.endswith(".mrc") else a for a in args]
    assert_one_line_error(run(runner, "postprocess", *resolved, "-o", out), *fragments)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
