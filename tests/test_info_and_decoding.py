"""``numba-recon info`` on special files and on files it must not call ready; STAR text decoding
(non-UTF-8 bytes) and image indices too large for any stack."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.errors import InputFileError
from numba_recon.io.mrc import StackReader, mrc_header, write_stack
from numba_recon.io.star import read_star, write_star
from numba_recon.particles import MIN_BOX_PX

DATA = Path(__file__).parent / "data"
STACK_A = DATA / "Particles" / "stack_a.mrcs"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")


@pytest.fixture
def run_cli(cli):
    """The CLI in a child process: a read that blocks fails the test by its timeout, not by a hang."""
    code = "import sys\nfrom numba_recon.cli import main\nmain(sys.argv[1:])\n"
    return lambda *args: cli(args, code=code, timeout=60, simulator=True)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numba-recon: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _star(tmp_path: Path, rows: list[str], *, box: int = 16, subset: bool = True, name: str = "p.star") -> Path:
    """A RELION 3.1 particle file; each row is ``index@stack`` [half set]."""
    labels = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnOpticsGroup"]
    labels += ["rlnRandomSubset"] if subset else []
    text = ("\ndata_optics\n\nloop_\n_rlnOpticsGroup\n_rlnAmplitudeContrast\n_rlnSphericalAberration\n"
            f"_rlnVoltage\n_rlnImagePixelSize\n_rlnImageSize\n1 0.1 2.7 300.0 1.5 {box}\n"
            "\ndata_particles\n\nloop_\n" + "".join(f"_{label}\n" for label in labels))
    for row in rows:
        image, *half = row.split()
        text += f"{image} 30 60 90 15000 1 {' '.join(half)}\n"
    path = tmp_path / name
    path.write_text(text)
    return path


def _stack(tmp_path: Path, images: np.ndarray, name: str = "s.mrcs") -> Path:
    path = tmp_path / name
    with warnings.catch_warnings():  # header statistics of NaN / infinite test images
        warnings.simplefilter("ignore", RuntimeWarning)
        write_stack(path, images, 1.5)
    return path


# ---- A.1: only regular files are opened ------------------------------------------------------

@needs_fifo
@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["particles.star", "particles.thu", "map.mrc", "stack.mrcs", "pipe"])
def test_info_refuses_a_named_pipe(tmp_path, name, run_cli):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    res = run_cli("info", str(fifo), "--angpix", "1.5")
    assert res.returncode == 2 and res.stdout == ""
    line = _one_error_line(res.stderr)
    assert f"{fifo}: is a named pipe, not a regular file; give the path of a .star" in line


@pytest.mark.timeout(90)
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
@pytest.mark.parametrize("link", [None, "zero.mrcs", "zero.star"])
def test_info_refuses_a_device(tmp_path, link, run_cli):
    """/dev/zero never ends; a link to it with a known suffix must not be read either."""
    path = Path("/dev/zero")
    if link is not None:
        path = tmp_path / link
        path.symlink_to("/dev/zero")
    res = run_cli("info", str(path))
    assert res.returncode == 2
    assert "is a character device, not a regular file" in _one_error_line(res.stderr)


@needs_fifo
@pytest.mark.timeout(90)
@pytest.mark.parametrize("check", [[], ["--check-pixels"]])
def test_info_refuses_a_named_pipe_as_a_stack(tmp_path, check, run_cli):
    os.mkfifo(tmp_path / "pipe.mrcs")
    star = _star(tmp_path, [f"1@{STACK_A} 1", "1@pipe.mrcs 2"])
    res = run_cli("info", str(star), *check)
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert str(star) in line and f"at {tmp_path / 'pipe.mrcs'} is a named pipe, not a regular file" in line
    assert "point the image names at MRC stack files" in line


@needs_fifo
@pytest.mark.timeout(90)
def test_readers_refuse_a_named_pipe_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.mrcs"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match="is a named pipe, not a regular file"):
        mrc_header(fifo)
    with StackReader() as reader, pytest.raises(InputFileError, match="is a named pipe, not a regular file"):
        reader.read(np.array([str(fifo)], dtype=object), np.array([0]), 16)
    star = tmp_path / "pipe.star"
    os.mkfifo(star)
    with pytest.raises(InputFileError, match="is a named pipe, not a regular file"):
        read_star(star)


# ---- A.2: problems that block a reconstruction, and what "ready" means ------------------------

@pytest.mark.parametrize("box", sorted({1, 2, 3, MIN_BOX_PX - 1}))
def test_info_refuses_boxes_too_small_to_reconstruct(tmp_path, rng, box, run_cli):
    _stack(tmp_path, rng.standard_normal((4, box, box)).astype(np.float32))
    star = _star(tmp_path, ["1@s.mrcs 1", "2@s.mrcs 2", "3@s.mrcs 1", "4@s.mrcs 2"], box=box)
    res = run_cli("info", str(star))
    assert res.returncode == 2 and res.stdout == ""
    line = _one_error_line(res.stderr)
    assert f"{star}: box size {box} px is too small for a reconstruction (at least {MIN_BOX_PX} px)" in line
    assert f"re-extract the particles with a box of at least {MIN_BOX_PX} px" in line and "ready" not in line


@pytest.mark.parametrize("half", ["1", "2"])
def test_info_refuses_one_sided_half_sets(runner, tmp_path, half):
    star = _star(tmp_path, [f"{i}@{STACK_A} {half}" for i in (1, 2, 3, 4)])
    result = runner.invoke(main, ["info", str(star), "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    line = _one_error_line(result.stderr)
    other = "2" if half == "1" else "1"
    assert f"all 4 particles are in half set {half} (rlnRandomSubset {half}) and half set {other} is empty" in line
    assert "remove the column for a seeded random split" in line and "ready" not in line


def test_info_accepts_a_split_at_run_time(runner, tmp_path):
    """Without rlnRandomSubset the halves are drawn at run time: not a one-sided file."""
    star = _star(tmp_path, [f"{i}@{STACK_A}" for i in (1, 2, 3, 4)], subset=False)
    s = json.loads(runner.invoke(main, ["info", str(star), "--json"]).stdout)
    assert s["half_sets"] == {"1": 0, "2": 0, "0": 4} and s["ready_for_reconstruction"] is True


def test_info_counts_nan_inf_and_constant_images(runner, tmp_path, rng):
    images = rng.standard_normal((6, 16, 16)).astype(np.float32)
    images[1, 3, 4] = np.nan
    images[4, 0, 0] = -np.inf
    images[2] = 0.25
    _stack(tmp_path, images)
    # image 2 is used twice: it counts once per particle
    star = _star(tmp_path, ["1@s.mrcs 1", "2@s.mrcs 2", "3@s.mrcs 1", "5@s.mrcs 2", "6@s.mrcs 1", "2@s.mrcs 2"])
    result = runner.invoke(main, ["info", str(star), "--check-pixels"])
    assert result.exit_code == 2 and result.stdout == ""
    line = _one_error_line(result.stderr)
    stack = tmp_path / "s.mrcs"
    assert (f"{star}: image 2 contains NaN or infinite pixels (stack {stack}, particle 2, "
            "3 of 6 particle images in all)") in line
    assert f"image 3 is constant, every pixel 0.25 (stack {stack}, particle 3, 1 of 6 particle images in all)" in line
    assert line.endswith("; re-extract the particles, or remove those rows from the particle file "
                         "(constant images are not particle images)")
    # without the pixel check the file is summarised, and the verdict says the pixels were not read
    out = runner.invoke(main, ["info", str(star)])
    assert out.exit_code == 0
    assert "pixels not checked (add --check-pixels)" in out.stdout


def test_info_pixel_check_reads_in_bounded_chunks(runner, tmp_path, rng, monkeypatch):
    import numba_recon.cli.info as info

    images = rng.standard_normal((9, 16, 16)).astype(np.float32)
    images[7, 5, 5] = np.inf
    _stack(tmp_path, images)
    star = _star(tmp_path, [f"{i}@s.mrcs {1 + i % 2}" for i in (9, 1, 2, 3, 5, 6, 8)])
    sizes = []
    original = info._read_images_raw

    def spy(path, wanted):
        for chunk, block in original(path, wanted):
            sizes.append(block.shape[0])
            yield chunk, block

    monkeypatch.setattr(info, "_CHECK_CHUNK_VALUES", 3 * 16 * 16)
    monkeypatch.setattr(info, "_read_images_raw", spy)
    result = runner.invoke(main, ["info", str(star), "--check-pixels"])
    assert max(sizes) == 3 and sum(sizes) == 7
    assert "image 8 contains NaN or infinite pixels" in _one_error_line(result.stderr)
    assert "particle 7, 1 of 7 particle images in all" in result.stderr


def test_info_ready_wording(runner):
    unchecked = runner.invoke(main, ["info", str(DATA / "relion31.star")])
    assert unchecked.exit_code == 0
    assert unchecked.stdout.splitlines()[-1] == ("reconstruction:    ready as far as the metadata and stack "
                                                 "headers go; pixels not checked (add --check-pixels)")
    checked = runner.invoke(main, ["info", str(DATA / "relion31.star"), "--check-pixels"])
    assert checked.stdout.splitlines()[-1] == ("reconstruction:    ready (metadata, stack headers and the pixels "
                                               "of every image checked)")
    s = json.loads(runner.invoke(main, ["info", str(DATA / "relion31.star"), "--json", "--check-pixels"]).stdout)
    assert s["pixels_checked"] is True and s["ready_for_reconstruction"] is True and s["not_ready_because"] == []
    assert (s["images_checked"], s["images_nonfinite"], s["images_constant"]) == (5, 0, 0)
    help_text = " ".join(runner.invoke(main, ["info", "--help"]).stdout.split())
    assert "--check-pixels" in help_text and "Off by default because it reads all the" in help_text


def test_info_does_not_call_too_few_particles_ready(runner, tmp_path):
    s = json.loads(runner.invoke(main, ["info", str(DATA / "relion5.star"), "--json"]).stdout)
    assert s["ready_for_reconstruction"] is False
    assert s["not_ready_because"] == ["only 3 particles (a reconstruction needs at least 4, 2 per half set)"]
    star = _star(tmp_path, [f"1@{STACK_A} 1", f"2@{STACK_A} 2", f"3@{STACK_A} 1", f"1@{STACK_A} 2"])
    text = runner.invoke(main, ["info", str(star)]).stdout
    assert "not ready: 1 particle row(s) repeat the image of an earlier row" in text and " ready (" not in text


# ---- B: STAR text that is not UTF-8 ------------------------------------------------------------

def _latin1_star(tmp_path: Path) -> tuple[Path, bytes]:
    (tmp_path / "Particles").symlink_to(DATA / "Particles")
    name = b"mics/caf\xe9_\xfc.mrc"  # Latin-1 bytes: not valid UTF-8
    raw = (DATA / "relion31.star").read_bytes().replace(b"mics/m1.mrc", name, 1)
    path = tmp_path / "latin1.star"
    path.write_bytes(raw)
    return path, name


def test_star_with_a_latin1_byte_reads_and_round_trips_its_bytes(tmp_path):
    path, name = _latin1_star(tmp_path)
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    p = read_star(path)
    assert len(p) == 5 and p.meta["text_encoding"] == "latin-1"
    assert p.table["rlnMicrographName"].tolist()[:3] == ["mics/caf\xe9_\xfc.mrc", "mics/m1.mrc", "mics/m2.mrc"]
    out = tmp_path / "out" / "written.star"
    write_star(p, out)
    written = out.read_bytes()
    assert written.count(name) == 1 and b"\xc3" not in written  # the same bytes, not re-encoded as UTF-8
    q = read_star(out)
    assert q.table["rlnMicrographName"].tolist() == p.table["rlnMicrographName"].tolist()
    np.testing.assert_array_equal(q.stack_paths, p.stack_paths)
    again = tmp_path / "out" / "again.star"
    write_star(q, again)
    assert again.read_bytes() == written


def test_latin1_stack_name_finds_the_stack_on_disk(tmp_path):
    """RELION names extracted stacks after their micrographs: the bytes must reach the file system."""
    stack_name = b"caf\xe9.mrcs"
    (tmp_path / os.fsdecode(stack_name)).write_bytes(STACK_A.read_bytes())
    star = _star(tmp_path, [f"1@{STACK_A} 1", "3@placeholder.mrcs 2"])
    star.write_bytes(star.read_bytes().replace(b"placeholder.mrcs", stack_name))
    p = read_star(star)
    assert os.fsencode(p.stack_paths[1]) == os.fsencode(tmp_path) + b"/" + stack_name
    with mrcfile.open(STACK_A) as mrc:
        np.testing.assert_array_equal(p.read_images([1])[0], mrc.data[2])
    out = tmp_path / "out.star"
    write_star(p, out)
    assert b"000003@caf\xe9.mrcs" in out.read_bytes()
    np.testing.assert_array_equal(read_star(out).stack_paths, p.stack_paths)


def test_utf8_star_stays_utf8(tmp_path):
    (tmp_path / "Particles").symlink_to(DATA / "Particles")
    path = tmp_path / "utf8.star"
    path.write_bytes((DATA / "relion31.star").read_bytes().replace(b"mics/m1.mrc", "mics/café.mrc".encode(), 1))
    p = read_star(path)
    assert p.meta["text_encoding"] == "utf-8" and p.table["rlnMicrographName"][0] == "mics/café.mrc"
    write_star(p, tmp_path / "out.star")
    assert "mics/café.mrc".encode() in (tmp_path / "out.star").read_bytes()


def test_info_reads_a_latin1_star(runner, tmp_path):
    path, _ = _latin1_star(tmp_path)
    result = runner.invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_particles"] == 5


# ---- C: image indices beyond any stack -------------------------------------------------------

@pytest.mark.parametrize("index", ["100000000000000000000", "9223372036854775808", "2147483648"])
def test_huge_image_index_is_reported_as_written(runner, tmp_path, index):
    star = _star(tmp_path, [f"1@{STACK_A} 1", f"{index}@{STACK_A} 2"])
    with pytest.raises(InputFileError) as err:
        read_star(star)
    text = str(err.value)
    assert f"image index {index} in rlnImageName '{index}@{STACK_A}' is not a valid image index" in text
    assert "particle row 2" in text and "-9223372036854775808" not in text
    result = runner.invoke(main, ["info", str(star)])
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert f"image index {index} " in line and "check the index@stack entries (indices are 1-based)" in line


def test_largest_index_an_mrc_stack_can_hold_is_checked_against_the_stack(tmp_path):
    star = _star(tmp_path, [f"1@{STACK_A} 1", f"2147483647@{STACK_A} 2"])
    with pytest.raises(InputFileError, match="image index 2147483647 is beyond the end of stack"):
        read_star(star)


@pytest.mark.slow
def test_latin1_stack_name_runs_and_converts_both_ways(tmp_path, runner):
    """A stack whose name is not UTF-8: ``run`` reconstructs from it, ``convert`` writes it to a
    ``.thu`` file and back with the same bytes, and the ``.thu`` file runs too."""
    from numba_recon.sim.simulate import simulate_dataset

    sim = tmp_path / "sim"
    simulate_dataset(sim, n_particles=48, box_size=16, pixel_size_angstrom=4.0, snr=0.5, seed=3,
                     particles_per_stack=48)
    name = b"caf\xe9.mrcs"
    os.rename(sim / "Particles" / "stack_0001.mrcs", os.fsencode(sim / "Particles") + b"/" + name)
    star = sim / "particles.star"
    star.write_bytes(star.read_bytes().replace(b"stack_0001.mrcs", name))
    thu, back = tmp_path / "p.thu", tmp_path / "back.star"
    for args in (["run", str(star), "-o", str(tmp_path / "r1"), "--backend", "cpu", "--epochs", "1"],
                 ["convert", str(star), str(thu)],
                 ["convert", str(thu), str(back), "--angpix", "4"],
                 ["run", str(thu), "--angpix", "4", "-o", str(tmp_path / "r2"), "--backend", "cpu", "--epochs", "1"]):
        res = runner.invoke(main, ["-q", *args])
        assert res.exit_code == 0, (args, res.output)
    assert b"Particles/" + name in thu.read_bytes() and b"Particles/" + name in back.read_bytes()
    assert name in (tmp_path / "r1" / "run_data.star").read_bytes()
    np.testing.assert_array_equal(read_star(back).stack_paths, read_star(star).stack_paths)
