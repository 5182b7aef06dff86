"""MRC input and output: stack headers, image reads of only the requested images, maps, conformant writers."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from numba_recon.errors import InputFileError, OutputError
from numba_recon.io.mrc import StackReader, mrc_header, read_volume, stack_shape, write_stack, write_volume

DATA = Path(__file__).parent / "data"
STACK_A = DATA / "Particles" / "stack_a.mrcs"
STACK_B = DATA / "Particles" / "stack_b.mrcs"


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _new_stack(path: Path, data: np.ndarray) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
    return path


def _mrcfile_data(path: Path) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as mrc:
        return np.array(mrc.data)


def test_committed_fixtures_match_their_generator(tmp_path):
    make_fixtures = _load_make_fixtures()
    for generated in make_fixtures.main(tmp_path):
        committed = DATA / generated.relative_to(tmp_path)
        assert committed.read_bytes() == generated.read_bytes(), f"{committed} differs: rerun make_fixtures.py"


def test_stack_shape_reads_the_header():
    assert stack_shape(STACK_A) == (4, 16, 16)
    assert stack_shape(STACK_B) == (3, 16, 16)
    assert stack_shape(DATA / "bad" / "nonsquare.mrcs") == (2, 12, 16)


def test_single_2d_image_counts_as_a_stack_of_one(tmp_path):
    path = tmp_path / "single.mrc"
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    with mrcfile.new(path) as mrc:
        mrc.set_data(image)
    assert stack_shape(path) == (1, 8, 8)
    out = StackReader().read(np.array([str(path)], dtype=object), np.array([0]), 8)
    np.testing.assert_array_equal(out[0], image)


def test_truncated_stack_names_the_file_and_both_sizes():
    path = DATA / "bad" / "truncated.mrcs"
    with pytest.raises(InputFileError) as err:
        stack_shape(path)
    text = str(err.value)
    assert text.startswith(f"{path}: file is truncated")
    assert "5120 bytes" in text and "5020 bytes" in text


def test_every_cut_of_a_stack_is_rejected(tmp_path):
    raw = STACK_A.read_bytes()
    cut = tmp_path / "cut.mrcs"
    for size in (0, 100, 1023, 1024, 1500, len(raw) - 1):
        cut.write_bytes(raw[:size])
        with pytest.raises(InputFileError, match="cut.mrcs"):
            stack_shape(cut)
        with pytest.raises(InputFileError, match="cut.mrcs"):
            StackReader().read(np.array([str(cut)], dtype=object), np.array([0]), 16)


def test_not_an_mrc_file_and_missing_file(tmp_path):
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"this is not an MRC file" * 100)
    with pytest.raises(InputFileError, match="not a readable MRC file"):
        stack_shape(junk)
    with pytest.raises(InputFileError, match="file not found"):
        stack_shape(tmp_path / "nope.mrcs")


def test_read_returns_requested_images_in_input_order():
    a, b = _mrcfile_data(STACK_A), _mrcfile_data(STACK_B)
    paths = np.array([str(STACK_B), str(STACK_A), str(STACK_A), str(STACK_B), str(STACK_A)], dtype=object)
    indices = np.array([2, 3, 0, 0, 3], dtype=np.int64)
    out = StackReader().read(paths, indices, 16)
    assert out.shape == (5, 16, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = np.stack([b[2], a[3], a[0], b[0], a[3]])
    np.testing.assert_array_equal(out, expected)


def test_read_fills_a_given_output_buffer():
    buf = np.full((2, 16, 16), -7.0, dtype=np.float32)
    out = StackReader().read(np.array([str(STACK_A)] * 2, dtype=object), np.array([1, 2]), 16, out=buf)
    assert out is buf
    np.testing.assert_array_equal(buf, _mrcfile_data(STACK_A)[[1, 2]])
    with pytest.raises(ValueError, match="C-contiguous float32"):
        StackReader().read(np.array([str(STACK_A)], dtype=object), np.array([0]), 16,
                           out=np.empty((1, 16, 16), dtype=np.float64))


@pytest.mark.parametrize("dtype", [np.float16, np.int16, np.int8, np.dtype(">f4")], ids=str)
def test_other_data_types_become_native_float32(tmp_path, dtype):
    rng = np.random.default_rng(0)
    values = rng.integers(-100, 100, size=(3, 8, 8)).astype(dtype)
    path = _new_stack(tmp_path / "typed.mrcs", values)
    out = StackReader().read(np.array([str(path)] * 3, dtype=object), np.array([2, 0, 1]), 8)
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values[[2, 0, 1]].astype(np.float32))


def test_nan_pixels_name_the_file_and_the_1_based_image():
    reader = StackReader()
    nan_stack = DATA / "bad" / "nan.mrcs"
    reader.read(np.array([str(nan_stack)] * 2, dtype=object), np.array([0, 2]), 16)  # images 1 and 3 are fine
    with pytest.raises(InputFileError) as err:
        reader.read(np.array([str(nan_stack)] * 3, dtype=object), np.array([2, 1, 0]), 16)
    assert str(nan_stack) in str(err.value) and "image 2 contains NaN" in str(err.value)


def test_infinite_pixels_are_rejected(tmp_path):
    data = np.zeros((2, 8, 8), dtype=np.float32)
    data[1, 0, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about the inf we put there
        path = _new_stack(tmp_path / "inf.mrcs", data)
    with pytest.raises(InputFileError, match="image 2 contains NaN or infinite"):
        StackReader().read(np.array([str(path)], dtype=object), np.array([1]), 8)


def test_index_out_of_range_and_wrong_box():
    reader = StackReader()
    with pytest.raises(InputFileError, match="image 5 requested but the stack holds 4 images"):
        reader.read(np.array([str(STACK_A)], dtype=object), np.array([4]), 16)
    with pytest.raises(InputFileError, match="expected 32 x 32"):
        reader.read(np.array([str(STACK_A)], dtype=object), np.array([0]), 32)


def test_reader_keeps_a_bounded_lru_of_open_stacks(tmp_path):
    paths = [_new_stack(tmp_path / f"s{k}.mrcs", np.full((2, 8, 8), k, dtype=np.float32)) for k in range(5)]
    reader = StackReader(max_open=2)
    for k, p in enumerate(paths):
        out = reader.read(np.array([str(p)], dtype=object), np.array([1]), 8)
        assert out[0, 0, 0] == k
        assert reader.n_open == min(k + 1, 2)
    # the two most recently used stay open; an evicted stack is reopened transparently
    assert list(reader._open) == [str(paths[3]), str(paths[4])]
    out = reader.read(np.array([str(paths[0]), str(paths[4])], dtype=object), np.array([0, 0]), 8)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 4])
    reader.close()
    assert reader.n_open == 0


@pytest.mark.parametrize("pread", [True, False], ids=["preadv", "memory-map"])
def test_reads_touch_only_the_requested_images(tmp_path, monkeypatch, pread):
    # a 1 GiB stack that exists only as a sparse file: loading it whole would be slow and huge
    import numba_recon.io.mrc as mrc_module

    monkeypatch.setattr(mrc_module, "READ_WITH_PREAD", pread)
    n, box = 4096, 256
    path = tmp_path / "huge.mrcs"
    _new_stack(path, np.zeros((1, box, box), dtype=np.float32))
    with mrcfile.open(path, mode="r+") as mrc:
        header = mrc.header.copy()
    header.nz = n
    header.mz = 1
    with open(path, "r+b") as f:
        f.write(header.tobytes())
        f.truncate(1024 + n * box * box * 4)
        f.seek(1024 + (n - 1) * box * box * 4)
        f.write(np.full((box, box), 3.0, np.float32).tobytes())  # the last image, to tell it apart
    assert stack_shape(path) == (n, box, box)
    with StackReader() as reader:
        out = reader.read(np.array([str(path)] * 2, dtype=object), np.array([n - 1, 7]), box)
    assert out.shape == (2, box, box)
    assert (out[0] == 3.0).all() and not out[1].any()


def test_extended_header_and_big_endian_layout_are_kept(tmp_path, rng):
    """The data offset (after an extended header) and the byte order come from the validated header."""
    images = rng.standard_normal((3, 8, 8)).astype(">f4")
    path = tmp_path / "ext.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_extended_header(np.zeros(40, dtype=np.uint8))
        mrc.set_data(images)
        mrc.set_image_stack()
    assert mrc_header(path).data_offset == 1024 + 40
    reader = StackReader(max_open=1)
    for _ in range(2):  # first open, then a reopen from the kept layout
        out = reader.read(np.array([str(path)], dtype=object), np.array([2]), 8)
        np.testing.assert_array_equal(out[0], images[2].astype(np.float32))
        reader.read(np.array([str(STACK_A)], dtype=object), np.array([0]), 16)  # evicts ext.mrcs


def test_reopening_an_evicted_stack_does_not_validate_it_again(tmp_path, monkeypatch):
    import numba_recon.io.mrc as mrc_module

    paths = [_new_stack(tmp_path / f"s{k}.mrcs", np.full((2, 8, 8), k, dtype=np.float32)) for k in range(3)]
    calls: list[str] = []
    real = mrc_module.mrc_header
    monkeypatch.setattr(mrc_module, "mrc_header", lambda p: calls.append(os.fspath(p)) or real(p))
    reader = StackReader(max_open=1)
    for _ in range(3):
        for k, p in enumerate(paths):
            assert reader.read(np.array([str(p)], dtype=object), np.array([1]), 8)[0, 0, 0] == k
            assert reader.n_open == 1
    assert sorted(calls) == sorted(str(p) for p in paths)  # one validation per stack, 9 opens
    # a stack rewritten since it was validated (another size) is validated again
    _new_stack(paths[0], np.full((3, 8, 8), 7, dtype=np.float32))
    assert reader.read(np.array([str(paths[0])], dtype=object), np.array([2]), 8)[0, 0, 0] == 7
    assert calls.count(str(paths[0])) == 2
    # ... and refused if it became unreadable
    reader.read(np.array([str(paths[1])], dtype=object), np.array([0]), 8)
    paths[0].write_bytes(paths[0].read_bytes()[:1500])
    with pytest.raises(InputFileError, match="truncated"):
        reader.read(np.array([str(paths[0])], dtype=object), np.array([0]), 8)
    assert reader.n_open == 1  # the failed open left no file descriptor behind
    reader.close()


def test_default_open_stacks_is_a_quarter_of_the_file_limit(monkeypatch):
    import resource

    from numba_recon.io.mrc import default_max_open

    for soft, expected in [(1024, 256), (20000, 5000), (100, 64), (10**7, 16384),
                           (resource.RLIM_INFINITY, 16384)]:
        monkeypatch.setattr(resource, "getrlimit", lambda which, soft=soft: (soft, resource.RLIM_INFINITY))
        assert default_max_open() == expected, soft
        assert StackReader().max_open == expected
    monkeypatch.undo()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        assert StackReader().max_open >= 64 and StackReader().max_open <= max(64, soft // 4)


def test_volume_stack_is_not_an_image_stack(tmp_path):
    path = _new_stack(tmp_path / "vstack.mrcs", np.zeros((4, 8, 8), dtype=np.float32))
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        mrc.header.ispg = 401
        mrc.header.mz = 2
    with pytest.raises(InputFileError, match="stack of 3D volumes"):
        StackReader().read(np.array([str(path)], dtype=object), np.array([0]), 8)


@pytest.mark.parametrize("field", ["mx", "my", "mz"])
def test_zero_sampling_gives_an_unknown_voxel_size(tmp_path, field):
    path = tmp_path / "zero_m.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 4, 4), dtype=np.float32))
        mrc.voxel_size = 1.5
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        setattr(mrc.header, field, 0)
    voxel = mrc_header(path).voxel_size_angstrom
    assert voxel == tuple(0.0 if axis == field[1] else 1.5 for axis in "xyz")
    volume, voxel_size = read_volume(path)
    assert volume.shape == (4, 4, 4) and voxel_size == 0.0  # unknown on one axis: unknown


def test_negative_cell_gives_an_unknown_voxel_size(tmp_path):
    path = tmp_path / "negative.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 4, 4), dtype=np.float32))
        mrc.voxel_size = 1.5
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        mrc.header.cella.x = -6.0
    assert mrc_header(path).voxel_size_angstrom == (0.0, 1.5, 1.5)


def test_particle_set_read_images_uses_the_reader():
    from numba_recon.io.star import read_star

    particles = read_star(DATA / "relion31.star")
    images = particles.read_images(np.array([3, 0]))
    np.testing.assert_array_equal(images[0], _mrcfile_data(STACK_B)[2])  # 000003@stack_b
    np.testing.assert_array_equal(images[1], _mrcfile_data(STACK_A)[0])


# ---- maps ----------------------------------------------------------------------------------

def test_write_volume_is_valid_and_reads_back(tmp_path, rng):
    volume = rng.standard_normal((12, 12, 12)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_volume(path, volume, 1.25)
    assert mrcfile.validate(str(path), print_file=open(os.devnull, "w")) is True
    with mrcfile.open(path) as mrc:
        h = mrc.header
        assert int(h.ispg) == 1 and (int(h.mx), int(h.my), int(h.mz)) == (12, 12, 12)
        assert (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3)
        assert tuple(float(v) for v in (h.origin.x, h.origin.y, h.origin.z)) == (0.0, 0.0, 0.0)
        assert float(h.cella.x) / int(h.mx) == pytest.approx(1.25)  # ChimeraX's step rule
        assert int(h.mode) == 2
        assert mrc.get_labels()[0].startswith("numba-recon ")
        assert float(h.dmax) == pytest.approx(volume.max()) and float(h.dmin) == pytest.approx(volume.min())
    back, voxel = read_volume(path)
    np.testing.assert_array_equal(back, volume)
    assert voxel == pytest.approx(1.25)


def test_write_stack_is_valid_stack(tmp_path, rng):
    images = rng.standard_normal((5, 10, 10))
    path = tmp_path / "stack.mrcs"
    write_stack(path, images, 2.0)
    assert mrcfile.validate(str(path), print_file=open(os.devnull, "w")) is True
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.ispg) == 0 and int(mrc.header.mz) == 1 and mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(2.0)
    assert stack_shape(path) == (5, 10, 10)
    out = StackReader().read(np.array([str(path)] * 5, dtype=object), np.arange(5), 10)
    np.testing.assert_allclose(out, images.astype(np.float32))


def test_writers_refuse_to_overwrite_and_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "map.mrc"
    write_volume(path, np.ones((4, 4, 4)), 1.0)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="pass --overwrite"):
        write_volume(path, np.zeros((4, 4, 4)), 1.0)
    with pytest.raises(OutputError, match="pass --overwrite"):
        write_stack(path, np.zeros((2, 4, 4)), 1.0)
    assert path.read_bytes() == before

    # a failure in the middle of writing leaves the old file and no temporary file behind
    def broken_stats(self):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(mrcfile.mrcobject.MrcObject, "update_header_stats", broken_stats)
    with pytest.raises(RuntimeError, match="disk went away"):
        write_volume(path, np.zeros((4, 4, 4)), 1.0, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.mrc"]
    monkeypatch.undo()
    write_volume(path, np.zeros((4, 4, 4)), 1.0, overwrite=True)
    assert read_volume(path)[0].max() == 0.0


def test_cubic_map_with_ispg_0_is_a_volume(tmp_path):
    # cryoSPARC writes maps as ispg 0
    path = _new_stack(tmp_path / "cryosparc_map.mrc", np.ones((6, 6, 6), dtype=np.float32))
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.ispg) == 0
    volume, _ = read_volume(path)
    assert volume.shape == (6, 6, 6)


def test_read_volume_rejects_bad_maps(tmp_path):
    with pytest.raises(InputFileError, match="not a cubic 3D map"):
        read_volume(STACK_A)  # 4 x 16 x 16
    bad = tmp_path / "nan_map.mrc"
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[1, 2, 3] = np.nan
    with pytest.warns(RuntimeWarning):
        with mrcfile.new(bad) as mrc:
            mrc.set_data(data)
    with pytest.raises(InputFileError, match="1 NaN or infinite voxels"):
        read_volume(bad)
    aniso = tmp_path / "aniso.mrc"
    with mrcfile.new(aniso) as mrc:
        mrc.set_data(np.zeros((4, 4, 4), dtype=np.float32))
        mrc.voxel_size = (1.0, 1.0, 2.0)
    with pytest.raises(InputFileError, match="voxels are not cubic"):
        read_volume(aniso)


def test_header_reports_space_group_and_dtype():
    h = mrc_header(STACK_A)
    assert (h.nz, h.ny, h.nx, h.ispg) == (4, 16, 16, 0)
    assert h.dtype == np.float32 and h.voxel_size_angstrom == (1.5, 1.5, 1.5)


def test_reader_pickles_without_its_open_files():
    import pickle

    reader = StackReader(max_open=3)
    reader.read(np.array([str(STACK_A)], dtype=object), np.array([0]), 16)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.max_open == 3 and clone.n_open == 0
    np.testing.assert_array_equal(clone.read(np.array([str(STACK_A)], dtype=object), np.array([1]), 16)[0],
                                  _mrcfile_data(STACK_A)[1])


def test_package_exports_the_readers_lazily():
    import numba_recon.io as io

    assert io.read_star.__module__ == "numba_recon.io.star" and io.StackReader is StackReader
    with pytest.raises(AttributeError):
        io.no_such_reader  # noqa: B018
