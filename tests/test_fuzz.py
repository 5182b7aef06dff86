"""Fuzzing of the STAR, .thu and MRC readers with hypothesis.

Valid files are mutated (truncation, bit flips, swapped, duplicated and missing columns, huge,
negative, NaN and infinite numbers, unicode, empty and duplicated blocks, CRLF line endings...) and
read back. Every case must end in a successful read that yields usable numbers, or in the
project's own :class:`~numba_recon.errors.InputError`: never another exception type, and never a
hang (each read runs under a hard time limit).

The harness (``make_corpus``, the ``*_mutations`` strategies and the ``check_*`` functions) is
shared with ``benchmarks/fuzz_long.py``, which runs the same properties for much longer.
Budget: the whole file runs in well under 60 s on 2 cores (``derandomize=True`` keeps CI
reproducible; the long run draws fresh cases).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Callable, Iterator

import mrcfile
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from numba_recon.errors import InputError

DATA = Path(__file__).parent / "data"

#: Seed files of the text formats, copied next to their stacks by :func:`make_corpus`.
STAR_SEEDS = ("relion31.star", "relion30.star", "relion5.star", "relion31_optics_groups.star")
THU_SEED = "particles.thu"
#: MRC seeds written by :func:`make_corpus`: stacks of each supported mode, big-endian, and a map.
MRC_SEEDS = ("stack_f32", "stack_i16", "stack_f16", "stack_be", "volume")
#: Hard per-read limit (seconds): a read that takes longer is reported as a hang.
HANG_LIMIT_S = 10.0

# tokens that readers commonly mishandle
SPECIAL_TOKENS = (
    "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e308", "-1e308", "1e400", "-1e400", "1e-320", "-0",
    "0", "-1", "-999", "99999999999999999999999", "-9223372036854775809", "4294967296", "0x10", "1_000",
    "1,5", "True", "None", "null", "", "''", '""', "\u0661\u0662", "\u00e9", "\u6570", "\U0001f52c", "\x00",
    "\t", "#", "_rlnAngleRot", "data_", "data_particles", "loop_", "@", "1@", "0@Particles/stack_a.mrcs",
    "-1@Particles/stack_a.mrcs", "99@Particles/stack_a.mrcs", "1@/", "1@../../etc/passwd",
)


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------

def _write_mrc(path: Path, data: np.ndarray, *, stack: bool, voxel: float = 1.5) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if stack:
            mrc.set_image_stack()
        else:
            mrc.set_volume()
        mrc.voxel_size = voxel


def make_corpus(folder: Path) -> dict[str, Path]:
    """Copy the seed files into ``folder`` (next to their ``Particles/`` stacks) and write MRC seeds.

    Returns
    -------
    dict
        Name -> path of every seed: the STAR seeds, the ``.thu`` seed, and MRC seeds ``stack_f32``,
        ``stack_i16``, ``stack_f16``, ``stack_be`` (big-endian) and ``volume``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "Particles").is_dir():
        shutil.copytree(DATA / "Particles", folder / "Particles")
    seeds = {}
    for name in (*STAR_SEEDS, THU_SEED):
        shutil.copy(DATA / name, folder / name)
        seeds[name] = folder / name
    rng = np.random.default_rng(7)
    mrc_dir = folder / "mrc"
    mrc_dir.mkdir(exist_ok=True)
    images = rng.standard_normal((4, 8, 8)).astype(np.float32)
    _write_mrc(mrc_dir / "stack_f32.mrcs", images, stack=True)
    _write_mrc(mrc_dir / "stack_i16.mrcs", (images * 100).astype(np.int16), stack=True)
    _write_mrc(mrc_dir / "stack_f16.mrcs", images.astype(np.float16), stack=True)
    _write_mrc(mrc_dir / "stack_be.mrcs", images.astype(">f4"), stack=True)
    _write_mrc(mrc_dir / "volume.mrc", rng.standard_normal((8, 8, 8)).astype(np.float32), stack=False)
    for name in ("stack_f32", "stack_i16", "stack_f16", "stack_be"):
        seeds[name] = mrc_dir / f"{name}.mrcs"
    seeds["volume"] = mrc_dir / "volume.mrc"
    return seeds


# --------------------------------------------------------------------------------------------
# mutations of text files (STAR and .thu)
# --------------------------------------------------------------------------------------------

_fraction = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, exclude_max=True)
_numbers = st.one_of(
    st.sampled_from(SPECIAL_TOKENS),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.text(max_size=6),
)
_finite_numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["1e308", "-1e308", "1e-320", "-0", "0", "-1", "1", "2", "3", "-999"]),
)
_text_op = st.one_of(
    st.tuples(st.just("number"), _fraction, _finite_numbers),  # twice: well-formed files read more often
    st.tuples(st.just("number"), _fraction, _finite_numbers),
    st.tuples(st.just("truncate"), _fraction),
    st.tuples(st.just("flip"), _fraction, st.integers(0, 7)),
    st.tuples(st.just("insert"), _fraction, _numbers),
    st.tuples(st.just("token"), _fraction, _numbers),
    st.tuples(st.just("swap_lines"), _fraction, _fraction),
    st.tuples(st.just("duplicate_line"), _fraction, _fraction),
    st.tuples(st.just("delete_line"), _fraction),
    st.tuples(st.just("swap_columns"), _fraction, _fraction),
    st.tuples(st.just("duplicate_column"), _fraction, _numbers),
    st.tuples(st.just("drop_column"), _fraction, st.booleans()),
    st.tuples(st.just("empty_block"), _fraction, st.sampled_from(["particles", "optics", "", "model_general"])),
    st.tuples(st.just("duplicate_block"), _fraction),
    st.tuples(st.just("drop_block"), _fraction),
    st.tuples(st.just("crlf")),
    st.tuples(st.just("bom")),
)
#: A list of 1 to 3 mutations of a text file (hypothesis shrinks failing lists to the culprit).
text_mutations = st.lists(_text_op, min_size=1, max_size=3)
#: 1 to 3 numbers of a text file replaced by other finite numbers.
number_mutations = st.lists(st.tuples(st.just("number"), _fraction, _finite_numbers), min_size=1, max_size=3)


def _pick(seq_len: int, fraction: float) -> int:
    return min(int(fraction * seq_len), seq_len - 1)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _is_data_row(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith(("_", "data_", "loop_", "#"))


def _header_runs(lines: list[str]) -> list[list[int]]:
    """Line numbers of each loop's ``_label`` lines (one list per loop)."""
    runs: list[list[int]] = []
    current: list[int] = []
    for k, line in enumerate(lines):
        if line.strip().startswith("_"):
            current.append(k)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _rows_after(lines: list[str], start: int) -> list[int]:
    """Data rows of the loop whose header ends at line ``start``."""
    rows = []
    for k in range(start + 1, len(lines)):
        s = lines[k].strip()
        if s.startswith(("data_", "loop_", "_")):
            break
        if _is_data_row(lines[k]):
            rows.append(k)
    return rows


def _column_op(lines: list[str], op: tuple, whitespace_table: bool) -> list[str]:
    """Swap, duplicate or drop a column of a STAR loop (labels) or of a whitespace table (.thu).

    STAR: ``swap_columns`` swaps two labels (the values now mean something else);
    ``duplicate_column`` repeats a label and its values (with ``op[2]`` as the repeated value);
    ``drop_column`` removes a label and, if ``op[2]`` is True, its values (else the rows keep one
    value too many). ``.thu``: the same on the tokens of every particle line.
    """
    lines = list(lines)
    if whitespace_table:
        labels: list[int] = []
        rows = [k for k, line in enumerate(lines) if line.strip() and "#" not in line]
        n_cols = max((len(lines[k].split()) for k in rows), default=0)
    else:
        runs = _header_runs(lines)
        if not runs:
            return lines
        labels = runs[_pick(len(runs), op[1])]
        rows = _rows_after(lines, labels[-1])
        n_cols = len(labels)
    if n_cols == 0:
        return lines
    c1 = _pick(n_cols, (op[1] * 7919) % 1.0)
    kind = op[0]
    value = str(op[2]).split()[0] if kind == "duplicate_column" and str(op[2]).split() else None
    if labels:
        names = [lines[k].split()[0] for k in labels]
        if kind == "swap_columns":
            c2 = _pick(n_cols, op[2])
            names[c1], names[c2] = names[c2], names[c1]
        elif kind == "duplicate_column":
            names.insert(c1 + 1, names[c1])
        else:
            names.pop(c1)
        lines[labels[0]:labels[-1] + 1] = [f"{name} #{i}" for i, name in enumerate(names, start=1)]
        rows = [k + len(names) - len(labels) for k in rows]
        if kind == "swap_columns" or (kind == "drop_column" and not op[2]):
            return lines
    for k in rows:
        tokens = lines[k].split()
        if c1 >= len(tokens):
            continue
        if kind == "swap_columns":
            c2 = _pick(n_cols, op[2])
            if c2 < len(tokens):
                tokens[c1], tokens[c2] = tokens[c2], tokens[c1]
        elif kind == "duplicate_column":
            tokens.insert(c1 + 1, value if value is not None else tokens[c1])
        else:
            tokens.pop(c1)
        lines[k] = " ".join(tokens)
    return lines


def mutate_text(data: bytes, ops: list[tuple], *, whitespace_table: bool = False) -> bytes:
    """Apply ``ops`` (drawn from :data:`text_mutations`) to the bytes of a text file."""
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            data = data[: int(op[1] * len(data))]
        elif kind == "flip" and data:
            i = _pick(len(data), op[1])
            data = data[:i] + bytes([data[i] ^ (1 << op[2])]) + data[i + 1:]
        elif kind == "insert":
            i = int(op[1] * (len(data) + 1))
            data = data[:i] + str(op[2]).encode("utf-8", "surrogatepass") + data[i:]
        elif kind == "bom":
            data = b"\xef\xbb\xbf" + data
        elif kind == "crlf":
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        else:
            text = data.decode("utf-8", errors="surrogateescape")
            lines = text.split("\n")
            if kind in ("token", "number"):
                parts = re.split(r"(\s+)", text)  # tokens at even positions, whitespace kept
                if kind == "number":  # a finite number in place of a number: a value, not a syntax error
                    filled = [k for k in range(0, len(parts), 2) if _is_number(parts[k])]
                else:
                    filled = [k for k in range(0, len(parts), 2) if parts[k]]
                if filled:
                    parts[filled[_pick(len(filled), op[1])]] = str(op[2])
                text = "".join(parts)
            elif kind in ("swap_lines", "duplicate_line", "delete_line") and len(lines) > 1:
                i = _pick(len(lines), op[1])
                if kind == "swap_lines":
                    j = _pick(len(lines), op[2])
                    lines[i], lines[j] = lines[j], lines[i]
                elif kind == "duplicate_line":
                    lines.insert(_pick(len(lines), op[2]), lines[i])
                else:
                    del lines[i]
                text = "\n".join(lines)
            elif kind in ("swap_columns", "duplicate_column", "drop_column"):
                text = "\n".join(_column_op(lines, op, whitespace_table))
            elif kind in ("empty_block", "duplicate_block", "drop_block"):
                starts = [k for k, line in enumerate(lines) if line.startswith("data_")] or [0]
                b = _pick(len(starts), op[1])
                end = starts[b + 1] if b + 1 < len(starts) else len(lines)
                if kind == "empty_block":
                    lines[starts[b]:starts[b]] = [f"data_{op[2]}", ""]
                elif kind == "duplicate_block":
                    lines[end:end] = lines[starts[b]:end]
                else:
                    del lines[starts[b]:end]
                text = "\n".join(lines)
            data = text.encode("utf-8", errors="surrogateescape")
    return data


# --------------------------------------------------------------------------------------------
# mutations of MRC files
# --------------------------------------------------------------------------------------------

# 4-byte header words worth aiming at: nx ny nz mode nxstart.. mx my mz cella mapc.. ispg nsymbt
# exttyp nversion origin map machst rms nlabl
_HEADER_WORDS = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 64, 68, 72, 88, 92, 104, 108, 196, 200,
                 204, 208, 212, 216, 220)
_int32 = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 4, 6, 12, 101, 8, 16, 2**31 - 1, -(2**31), 65536, 1 << 24]),
                   st.integers(min_value=-(2**31), max_value=2**31 - 1))
_mrc_op = st.one_of(
    st.tuples(st.just("truncate"), _fraction),
    st.tuples(st.just("header_word"), st.sampled_from(_HEADER_WORDS), _int32),
    st.tuples(st.just("header_float"), st.sampled_from(_HEADER_WORDS),
              st.floats(allow_nan=True, allow_infinity=True, width=32)),
    st.tuples(st.just("flip_header"), st.integers(0, 1023), st.integers(0, 7)),
    st.tuples(st.just("flip"), _fraction, st.integers(0, 7)),
    st.tuples(st.just("data_value"), _fraction,
              st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, -0.0])),
    st.tuples(st.just("append"), st.integers(1, 4096)),
)
#: A list of 1 to 3 mutations of an MRC file.
mrc_mutations = st.lists(_mrc_op, min_size=1, max_size=3)


def mutate_mrc(data: bytes, ops: list[tuple]) -> bytes:
    """Apply ``ops`` (drawn from :data:`mrc_mutations`) to the bytes of an MRC file."""
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            b = b[: int(op[1] * len(b))]
        elif kind == "header_word" and len(b) >= op[1] + 4:
            b[op[1]:op[1] + 4] = int(op[2]).to_bytes(4, "little", signed=True)
        elif kind == "header_float" and len(b) >= op[1] + 4:
            b[op[1]:op[1] + 4] = np.float32(op[2]).tobytes()
        elif kind == "flip_header" and len(b) > op[1]:
            b[op[1]] ^= 1 << op[2]
        elif kind == "flip" and b:
            i = _pick(len(b), op[1])
            b[i] ^= 1 << op[2]
        elif kind == "data_value" and len(b) >= 1024 + 4:
            i = 1024 + 4 * _pick((len(b) - 1024) // 4, op[1])
            b[i:i + 4] = np.float32(op[2]).tobytes()  # float32 seeds; garbage for other modes, which is fine
        elif kind == "append":
            b += bytes(op[1])
    return bytes(b)


# --------------------------------------------------------------------------------------------
# the properties
# --------------------------------------------------------------------------------------------

class ReaderHang(AssertionError):
    """A read exceeded :data:`HANG_LIMIT_S`."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ReaderHang` in the main thread if the body runs longer than ``seconds``."""

    def on_alarm(signum, frame):
        raise ReaderHang(f"reader still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _quietly(read: Callable[[], object]) -> object:
    """Run a read with warnings (permissive mode, mrcfile) and their log lines silenced."""
    logger = logging.getLogger("numba_recon")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), time_limit(HANG_LIMIT_S):
            warnings.simplefilter("ignore")
            return read()
    finally:
        logger.setLevel(level)


def outcome(read: Callable[[], object]) -> tuple[str, object]:
    """``("ok", value)`` or ``("input_error", err)``; any other exception propagates (a bug)."""
    try:
        return "ok", _quietly(read)
    except InputError as err:
        assert str(err).strip(), "an InputError must carry a message"
        return "input_error", err


def _check_particle_set(particles) -> None:
    """A successful read must give usable numbers, not NaN smuggled past the validation."""
    n = len(particles)
    assert n > 0
    assert particles.box_size > 0 and math.isfinite(particles.pixel_size_angstrom)
    assert particles.pixel_size_angstrom > 0
    assert particles.rotations.shape == (n, 3, 3) and np.isfinite(particles.rotations).all()
    np.testing.assert_allclose(particles.rotations @ particles.rotations.transpose(0, 2, 1),
                               np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-6)
    assert np.isfinite(particles.shifts_px).all()
    for key, values in particles.ctf.items():
        assert values.shape == (n,) and np.isfinite(values).all(), key
    assert set(np.unique(particles.half_set)) <= {0, 1, 2}
    assert (particles.stack_indices >= 0).all()


def check_star(path: Path, content: bytes, permissive: bool) -> str:
    """Write ``content`` to ``path`` and read it as a STAR file; return the outcome's name."""
    from numba_recon.io.star import read_star

    path.write_bytes(content)
    kind, value = outcome(lambda: read_star(path, permissive=permissive))
    if kind == "ok":
        _check_particle_set(value)
        images = _quietly(lambda: value.read_images(np.arange(len(value))))
        assert images.shape == (len(value), value.box_size, value.box_size)
    return kind


def check_thu(path: Path, content: bytes, permissive: bool) -> str:
    """Write ``content`` to ``path`` and read it as a ``.thu`` file (pixel size 1.5 A)."""
    from numba_recon.io.thu import read_thu

    path.write_bytes(content)
    kind, value = outcome(lambda: read_thu(path, angpix=1.5, permissive=permissive))
    if kind == "ok":
        _check_particle_set(value)
    return kind


def check_mrc(path: Path, content: bytes) -> str:
    """Write ``content`` to ``path`` and read it every way the project does; return the outcome."""
    from numba_recon.io.mrc import StackReader, mrc_header, read_volume, stack_shape

    path.write_bytes(content)
    kind, header = outcome(lambda: mrc_header(path))
    if kind != "ok":
        # every other entry point must refuse the file the same way
        for read in (lambda: stack_shape(path), lambda: read_volume(path),
                     lambda: StackReader().read(np.array([str(path)], dtype=object), np.array([0]), 8)):
            assert outcome(read)[0] == "input_error"
        return kind
    n, ny, nx = _quietly(lambda: stack_shape(path))
    assert (n, ny, nx) == (header.nz, header.ny, header.nx) and min(n, ny, nx) >= 1

    def read_ends() -> np.ndarray:
        with StackReader() as reader:
            return reader.read(np.array([str(path)] * 2, dtype=object), np.array([0, n - 1]), nx)

    kinds = []
    if nx * ny <= 1 << 16:  # a mutated header may declare huge images in a huge (appended) file: skip those
        k, images = outcome(read_ends)
        kinds.append(k)
        if k == "ok":
            assert images.dtype == np.float32 and images.shape == (2, nx, nx) and np.isfinite(images).all()
    if nx * ny * n <= 1 << 20:
        k, result = outcome(lambda: read_volume(path))
        kinds.append(k)
        if k == "ok":
            volume, voxel = result
            assert volume.dtype == np.float32 and volume.ndim == 3 and np.isfinite(volume).all()
            assert len(set(volume.shape)) == 1 and math.isfinite(voxel)
    return "ok" if "ok" in kinds else "input_error"


def check_star_with_stack(folder: Path, stack_content: bytes, star_seed: bytes) -> str:
    """A valid STAR file whose stack ``Particles/stack_a.mrcs`` is replaced by ``stack_content``."""
    from numba_recon.io.star import read_star

    case = folder / "with_stack"
    (case / "Particles").mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "Particles" / "stack_b.mrcs", case / "Particles" / "stack_b.mrcs")
    (case / "Particles" / "stack_a.mrcs").write_bytes(stack_content)
    (case / "p.star").write_bytes(star_seed)
    kind, value = outcome(lambda: read_star(case / "p.star"))
    if kind == "ok":
        _check_particle_set(value)
        kind, images = outcome(lambda: value.read_images(np.arange(len(value))))
        if kind == "ok":
            assert np.isfinite(images).all()
    return kind


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("fuzz"))


def _ci(max_examples: int):
    # no hypothesis deadline: on a loaded 2-core machine one example's wall time says little (a 3 s
    # deadline failed a whole run at 6.8 s); hangs are caught by the hard per-read HANG_LIMIT_S alarm
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def test_seeds_read_cleanly(corpus):
    """The unmutated seeds are valid: the fuzz starts from files the readers accept."""
    for name in STAR_SEEDS:
        assert check_star(corpus[name].with_name("seed.star"), corpus[name].read_bytes(), False) == "ok", name
    assert check_thu(corpus[THU_SEED].with_name("seed.thu"), corpus[THU_SEED].read_bytes(), False) == "ok"
    for name in MRC_SEEDS:
        assert check_mrc(corpus[name].with_name("seed.mrc"), corpus[name].read_bytes()) == "ok", name


@pytest.mark.slow
@_ci(1000)
@given(seed=st.sampled_from(STAR_SEEDS), ops=text_mutations, permissive=st.booleans())
def test_star_reader_fuzz(corpus, seed, ops, permissive):
    content = mutate_text(corpus[seed].read_bytes(), ops)
    event(check_star(corpus[seed].with_name("fuzz.star"), content, permissive))


@pytest.mark.slow
@_ci(300)
@given(seed=st.sampled_from(STAR_SEEDS), ops=number_mutations)
def test_star_extreme_numbers_fuzz(corpus, seed, ops):
    """Only numbers replaced by other finite numbers (huge, tiny, negative, integers for floats):
    the file stays well formed, so most cases read, and what reads must be finite and usable."""
    content = mutate_text(corpus[seed].read_bytes(), ops)
    event(check_star(corpus[seed].with_name("numbers.star"), content, False))


@_ci(600)
@given(ops=text_mutations, permissive=st.booleans())
def test_thu_reader_fuzz(corpus, ops, permissive):
    content = mutate_text(corpus[THU_SEED].read_bytes(), ops, whitespace_table=True)
    event(check_thu(corpus[THU_SEED].with_name("fuzz.thu"), content, permissive))


@pytest.mark.slow
@_ci(1000)
@given(seed=st.sampled_from(MRC_SEEDS), ops=mrc_mutations)
def test_mrc_reader_fuzz(corpus, seed, ops):
    content = mutate_mrc(corpus[seed].read_bytes(), ops)
    event(check_mrc(corpus[seed].with_name("fuzz.mrcs"), content))


@pytest.mark.slow
@_ci(300)
@given(ops=mrc_mutations)
def test_star_with_mutated_stack_fuzz(corpus, ops):
    stack = mutate_mrc((corpus["relion31.star"].parent / "Particles" / "stack_a.mrcs").read_bytes(), ops)
    event(check_star_with_stack(corpus["relion31.star"].parent, stack, corpus["relion31.star"].read_bytes()))


# -- explicit cases: one per mutation family, so a regression names its cause -----------------

@pytest.mark.parametrize("ops, expected", [
    ([("crlf",)], "ok"),
    ([("bom",)], "ok"),
    ([("empty_block", 0.99, "particles")], "ok"),  # an empty data_particles before the real one
    ([("token", 0.99, "1e308")], "rlnRandomSubset"),  # a huge number where 1 or 2 belongs
    ([("drop_column", 0.99, False)], "cannot parse"),  # a label removed, its values left
], ids=["crlf", "bom", "empty-block-first", "huge-half-set", "label-without-values"])
def test_star_mutation_families(corpus, ops, expected):
    """One case per mutation family with its known outcome, so a regression names its cause."""
    from numba_recon.io.star import read_star

    path = corpus["relion31.star"].with_name("case.star")
    path.write_bytes(mutate_text(corpus["relion31.star"].read_bytes(), ops))
    kind, value = outcome(lambda: read_star(path))
    if expected == "ok":
        assert kind == "ok" and len(value) == 5, value
    else:
        assert kind == "input_error" and expected in str(value), value


def test_concatenated_star_files_do_not_lose_particles(corpus):
    """``cat a.star b.star`` gives two data_optics and two data_particles blocks. Reading only one
    of them would silently drop particles: read all of them, or refuse the file."""
    from numba_recon.io.star import read_star

    path = corpus["relion31.star"].with_name("concatenated.star")
    path.write_bytes(corpus["relion31.star"].read_bytes() + corpus["relion31_optics_groups.star"].read_bytes())
    kind, value = outcome(lambda: read_star(path))
    if kind == "ok":
        assert len(value) == 5 + 4, f"read {len(value)} of the 9 particles of the two files"
    else:
        assert "data_particles" in str(value) or "block" in str(value), value


def test_star_crlf_line_endings_read_like_lf(corpus):
    """Windows line endings change nothing: same particles, same numbers."""
    from numba_recon.io.star import read_star

    lf = read_star(corpus["relion31.star"])
    path = corpus["relion31.star"].with_name("crlf.star")
    path.write_bytes(mutate_text(corpus["relion31.star"].read_bytes(), [("crlf",)]))
    crlf = read_star(path)
    np.testing.assert_array_equal(crlf.rotations, lf.rotations)
    np.testing.assert_array_equal(crlf.ctf["defocus_u_angstrom"], lf.ctf["defocus_u_angstrom"])
    assert list(crlf.stack_paths) == list(lf.stack_paths)


@pytest.mark.parametrize("block", ["particles", "optics"])
def test_star_duplicated_column_is_an_input_error(corpus, block):
    """A loop that names one label twice (a hand-edited or merged file) is bad input, not a crash.

    ``starfile`` keeps both columns; a column lookup then returns a table instead of a column.
    """
    text = corpus["relion31.star"].read_text()
    lines = text.split("\n")
    start = lines.index(f"data_{block}")
    runs = [r for r in _header_runs(lines) if r[0] > start]
    label_line = runs[0][2]
    label = lines[label_line].split()[0]
    lines.insert(label_line + 1, f"{label} #99")
    for k in _rows_after(lines, runs[0][-1] + 1):
        tokens = lines[k].split()
        tokens.insert(3, tokens[2])
        lines[k] = " ".join(tokens)
    path = corpus["relion31.star"].with_name("dupcol.star")
    path.write_text("\n".join(lines))
    from numba_recon.io.star import read_star

    kind, err = outcome(lambda: read_star(path))
    assert kind == "input_error"
    assert label.lstrip("_") in str(err)


@pytest.mark.parametrize("seed, old, new", [
    # rlnImagePixelSize 1e-320: the origin in pixels, rlnOriginXAngst / pixel size, overflows to inf
    ("relion31.star", "300.000000     1.500000", "300.000000     1e-320"),
    # rlnDetectorPixelSize 1e308: the pixel size 10000 * DetectorPixelSize / Magnification overflows to inf
    ("relion30.star", " 6.0 40000.0", " 1e308 40000.0"),
], ids=["origin-overflow", "pixel-size-overflow"])
def test_star_values_that_overflow_when_derived(corpus, seed, old, new):
    """Finite numbers in the file whose derived values are infinite: refuse them, or read finite values."""
    text = corpus[seed].read_text()
    assert old in text
    path = corpus[seed].with_name("overflow.star")
    check_star(path, text.replace(old, new, 1).encode(), False)


@pytest.mark.parametrize("column, value", [(3, "1e307"), (6, "-1e307"), (24, "1e300")],
                         ids=["defocus-angle-radians", "phase-shift-radians", "defocus-factor"])
def test_thu_values_that_overflow_when_converted(corpus, column, value):
    """.thu angles are radians and defocus is scaled by a factor: a finite value can convert to
    infinity (degrees, defocus U * factor); refuse it, or read finite values."""
    lines = corpus[THU_SEED].read_text().split("\n")
    k = next(i for i, line in enumerate(lines) if line.strip() and "#" not in line)
    tokens = lines[k].split()
    tokens[column] = value
    if column == 24:
        tokens[1] = "1e300"  # DEFOCUS_U * DEFOCUS_FACTOR = 1e600
    lines[k] = " ".join(tokens)
    check_thu(corpus[THU_SEED].with_name("overflow.thu"), "\n".join(lines).encode(), False)


@pytest.mark.parametrize("word", [28, 32, 36], ids=["mx", "my", "mz"])
def test_mrc_zero_sampling_does_not_give_an_infinite_voxel_size(corpus, word):
    """The voxel size is cella / (mx, my, mz); a header with m = 0 (corrupt or hand-made) has no voxel
    size, which the readers report as 0 ("not set"), not as infinity."""
    from numba_recon.io.mrc import mrc_header, read_volume

    path = corpus["volume"].with_name("zero_m.mrc")
    path.write_bytes(mutate_mrc(corpus["volume"].read_bytes(), [("header_word", word, 0)]))
    kind, header = outcome(lambda: mrc_header(path))
    if kind == "ok":
        assert all(math.isfinite(v) for v in header.voxel_size_angstrom), header.voxel_size_angstrom
        kind, result = outcome(lambda: read_volume(path))
        if kind == "ok":
            assert math.isfinite(result[1]), result[1]


def test_truncated_mrc_at_every_cut_is_an_input_error(corpus):
    """Every strict prefix of a stack is refused (C7 recipe: truncate at each cut point)."""
    from numba_recon.io.mrc import stack_shape

    content = corpus["stack_f32"].read_bytes()
    path = corpus["stack_f32"].with_name("cut.mrcs")
    for cut in range(0, len(content), 7):
        path.write_bytes(content[:cut])
        assert outcome(lambda: stack_shape(path))[0] == "input_error", cut


def test_time_limit_catches_a_hang():
    """The hang guard itself works (a guard that never fires would hide hangs)."""
    import time

    with pytest.raises(ReaderHang):
        with time_limit(0.2):
            time.sleep(5)
