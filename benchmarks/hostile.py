"""Hostile-user harness: bad files, bad options and output and resume hazards, each run as a real
``python -m numba_recon`` subprocess, with its outcome classified.

Every case gets its own folder with a copy of a small simulated data set (box 16, 120 particles;
the resolution-integrity cases use box 32, 1000 particles at SNR 0.05, enough signal for an
inflated resolution to show), damages it or sets up a hazard, runs one command under a wall-clock
limit (``run`` with ``--backend cpu``, ``NUMBA_NUM_THREADS=2``) and classifies what happened:

- ``ok``: exit 0, no WARNING line;
- ``warning``: exit 0 with a ``WARNING`` log line;
- ``refused``: exit 2 with exactly one ``numba-recon: error:`` line on stderr and no traceback;
- ``traceback``: a ``Traceback``, any other exit status, or exit 2 without exactly one error line;
- ``hang``: the wall-clock limit was reached (the process group is killed);
- ``setup-error``: the harness itself could not build the case (a harness bug, not a finding).

Two checks are made on every case:

- files lost: every regular file the user made (the data set, and user files planted in the
  output folder and its ``checkpoints/``, ``plots/``, ``postprocess/``, ``Particles/``) is hashed
  before and after the command; any change or deletion is a file lost. Files written by an earlier
  numba-recon command of the same case (a run to be resumed) are the tool's own and may change,
  except where a case protects them (a failed ``--resume`` must leave the finished run intact);
- inflated resolution: when a run exits 0 and writes ``summary.json``, the FSC of the written
  average map against ``truth.mrc`` gives a truth-based resolution (FSC 0.5); the reported
  resolution is inflated when it is better than 0.8 times that, or when it is Nyquist while the
  truth-based resolution is not. Shell 0 (the mean) is not judged, nor, with ``--initial-map``, the
  shells below the start map's low-pass, which both halves share by design. A run that warned
  about its CTF or pixel-size values and whose maps then disagree with the truth is counted as
  "wrong CTF or pixel size (warned)": both half maps carry the same model error, which no
  gold-standard FSC can see.

Each child process also gets an address-space limit (``--mem-limit-gb``), so that a reader fed
``/dev/zero`` fails instead of taking the machine's memory.

    python benchmarks/hostile.py --out /tmp/hostile.jsonl --markdown
    python benchmarks/hostile.py --filter resume/ --jobs 2 --keep /tmp/hostile-cases   # reproduce
    python benchmarks/hostile.py --list
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from _common import work_folder

# ----------------------------------------------------------------------------------------------
# data sets

#: Small data set most cases copy: fast runs, three stacks of 40.
BASE = dict(n_particles=120, box_size=16, pixel_size_angstrom=3.0, snr=0.1, seed=1, particles_per_stack=40)
#: Resolution-integrity data set: enough signal that an inflated resolution is detectable
#: (as in tests/test_integrity.py).
INTEG = dict(n_particles=1000, box_size=32, pixel_size_angstrom=3.0, snr=0.05, max_shift_px=2.0, seed=11,
             particles_per_stack=500)
DATASETS = {"base": BASE, "integ": INTEG}

FAMILIES = {
    "star": "corrupted STAR files",
    "mrc": "MRC stack damage",
    "duplicates": "duplicated particles",
    "physics": "implausible physics",
    "options": "hostile options",
    "output": "output hazards",
    "resume": "resume hazards",
    "info": "`info` on the bad files",
}

ERROR_PREFIX = "numba-recon: error:"


def build_datasets(root: Path) -> dict[str, Path]:
    from numba_recon.sim.simulate import simulate_dataset

    paths = {}
    for kind, params in DATASETS.items():
        paths[kind] = root / f"dataset-{kind}"
        simulate_dataset(paths[kind], **params)
    return paths


# ----------------------------------------------------------------------------------------------
# file surgery


class Star:
    """A STAR file as blocks of labels and rows: enough for the simulator's files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.blocks: list[dict] = []
        block = None
        for line in self.path.read_text().splitlines():
            s = line.strip()
            if s.startswith("data_"):
                block = {"name": s[5:], "labels": [], "rows": []}
                self.blocks.append(block)
            elif not s or s.startswith("#") or s == "loop_":
                continue
            elif s.startswith("_"):
                block["labels"].append(s.split()[0][1:])
            else:
                block["rows"].append(s.split())

    def block(self, name: str = "particles") -> dict:
        return next(b for b in self.blocks if b["name"] == name)

    @property
    def rows(self) -> list[list[str]]:
        return self.block()["rows"]

    @rows.setter
    def rows(self, rows: list[list[str]]) -> None:
        self.block()["rows"] = rows

    def col(self, label: str, block: str = "particles") -> int:
        return self.block(block)["labels"].index(label)

    def set(self, label: str, value, rows=None, block: str = "particles") -> "Star":
        """Set column ``label`` to ``value`` (a string, or ``f(old) -> str``) in ``rows`` (default all)."""
        b = self.block(block)
        j = b["labels"].index(label)
        for i, row in enumerate(b["rows"]):
            if rows is None or i in rows:
                row[j] = value(row[j]) if callable(value) else str(value)
        return self

    def get(self, label: str, block: str = "particles") -> list[str]:
        j = self.col(label, block)
        return [row[j] for row in self.block(block)["rows"]]

    def drop(self, label: str, block: str = "particles") -> "Star":
        b = self.block(block)
        j = b["labels"].index(label)
        del b["labels"][j]
        for row in b["rows"]:
            del row[j]
        return self

    def text(self) -> str:
        parts = []
        for b in self.blocks:
            parts.append(f"\n# version 30001\n\ndata_{b['name']}\n\nloop_\n")
            parts.extend(f"_{label} #{k + 1}\n" for k, label in enumerate(b["labels"]))
            parts.extend(" ".join(row) + "\n" for row in b["rows"])
            parts.append("\n")
        return "".join(parts)

    def save(self, path: Path | None = None) -> Path:
        path = Path(path or self.path)
        path.write_text(self.text())
        return path


def stacks(data: Path) -> list[Path]:
    return sorted((data / "Particles").glob("*.mrcs"))


def rewrite_stack(path: Path, change: Callable[[np.ndarray], np.ndarray], voxel: float | None = None) -> None:
    """Replace the images of a stack by ``change(images float32 (n, N, N))`` (any dtype mrcfile writes)."""
    import mrcfile

    with mrcfile.open(path, permissive=True) as m:
        images = np.array(m.data, dtype=np.float32)
        old_voxel = float(m.voxel_size.x)
    data = change(images)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = old_voxel if voxel is None else voxel


def rewrite_stacks(data: Path, change, voxel: float | None = None) -> None:
    for stack in stacks(data):
        rewrite_stack(stack, change, voxel)


def patch_int32(path: Path, byte_offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(byte_offset)
        f.write(int(value).to_bytes(4, "little", signed=True))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def to_big_endian(path: Path) -> None:
    """Rewrite a little-endian float32 MRC file as big-endian (header words, machine stamp, data)."""
    raw = bytearray(path.read_bytes())
    nsymbt = int.from_bytes(raw[92:96], "little")
    words = np.frombuffer(bytes(raw[:208]), dtype="<u4").byteswap()  # words 1-52 (numbers)
    raw[:208] = words.tobytes()
    raw[212:216] = b"\x11\x11\x00\x00"
    raw[216:224] = np.frombuffer(bytes(raw[216:224]), "<u4").byteswap().tobytes()  # rms, nlabl
    start = 1024 + nsymbt
    raw[start:] = np.frombuffer(bytes(raw[start:]), "<f4").astype(">f4").tobytes()
    path.write_bytes(bytes(raw))


def write_map(path: Path, volume: np.ndarray, voxel: float) -> Path:
    import mrcfile

    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(volume, np.float32))
        m.voxel_size = voxel
    return path


def crop_box(data: Path, k: int) -> Path:
    """Crop every image to its central ``k x k`` pixels and say so in the optics table."""
    def change(images):
        n = images.shape[-1]
        a = n // 2 - k // 2
        return np.ascontiguousarray(images[:, a:a + k, a:a + k])

    rewrite_stacks(data, change)
    return Star(data / "particles.star").set("rlnImageSize", str(k), block="optics").save()


# ----------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    name: str
    family: str
    build: Callable[["Ctx"], None]
    slow: bool = False  # start early (integrity data, possible hangs)


CASES: list[Case] = []


def case(name: str, family: str, build: Callable[["Ctx"], None], slow: bool = False) -> None:
    if any(c.name == name for c in CASES):
        raise ValueError(f"duplicate case name {name}")
    CASES.append(Case(name, family, build, slow))


class SetupError(RuntimeError):
    pass


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NUMBA_NUM_THREADS"] = "2"
    env["MPLBACKEND"] = "Agg"
    env.pop("NUMBA_RECON_FAULT", None)
    return env


def spawn(argv: list[str], cwd: Path, timeout: float, mem_limit_gb: float) -> tuple[int | None, str, str, float]:
    """Run ``python -m numba_recon argv``; exit status (None on timeout), stdout, stderr, seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "numba_recon", *argv], cwd=cwd, env=child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    if mem_limit_gb > 0:
        limit = int(mem_limit_gb * (1 << 30))
        try:
            resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
        except (OSError, ValueError):
            pass
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        rc = None
    return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.perf_counter() - t0


def regular_files(root: Path) -> set[Path]:
    """Regular files under ``root`` (links, FIFOs and devices are not followed or hashed)."""
    found = set()
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = Path(dirpath) / name
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    found.add(p)
            except OSError:
                pass
    return found


def file_hash(path: Path) -> str | None:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


class Ctx:
    """What a case's build function sees: its folder, the data sets, and where to put the command."""

    def __init__(self, case_dir: Path, datasets: dict[str, Path], timeout: float, mem_limit_gb: float):
        self.dir = case_dir
        self.datasets = datasets
        self.timeout = timeout
        self.mem_limit_gb = mem_limit_gb
        self.argv: list[str] | None = None
        self.cwd = case_dir
        self.out: Path | None = None
        self.truth: Path | None = None
        self.tool_files: set[Path] = set()
        self.protected: set[Path] = set()
        self.protected_if_failed: set[Path] = set()

    # data and paths
    def data(self, kind: str = "base", name: str = "data") -> Path:
        dest = self.dir / name
        shutil.copytree(self.datasets[kind], dest)
        if self.truth is None:
            self.truth = dest / "truth.mrc"
        return dest

    def rel(self, p) -> str:
        if isinstance(p, str):
            return p
        try:
            return os.path.relpath(p, self.cwd)
        except ValueError:
            return str(p)

    # commands
    def run(self, particles, *extra: str, out: str | Path = "out", epochs: int | None = 2) -> None:
        self.out = self.dir / out
        argv = ["run"]
        if particles is not None:
            argv.append(self.rel(particles))
        argv += ["-o", self.rel(self.out), "--backend", "cpu"]
        if epochs is not None:
            argv += ["--epochs", str(epochs)]
        self.argv = argv + [str(e) for e in extra]

    def resume(self, out: Path, *extra: str, epochs: int | None = 4) -> None:
        self.out = out
        argv = ["run", "--resume", self.rel(out), "--backend", "cpu"]
        if epochs is not None:
            argv += ["--epochs", str(epochs)]
        self.argv = argv + [str(e) for e in extra]

    def info(self, particles, *extra: str) -> None:
        self.argv = ["info", self.rel(particles), *extra]

    def command(self, *argv) -> None:
        self.argv = [self.rel(a) if isinstance(a, Path) else str(a) for a in argv]

    def prerun(self, *argv, cwd: Path | None = None) -> None:
        """Run a numba-recon command as part of the setup; the files it creates are the tool's own."""
        cwd = cwd or self.dir
        args = [os.path.relpath(a, cwd) if isinstance(a, Path) else str(a) for a in argv]
        before = regular_files(self.dir)
        rc, _out, err, _s = spawn(args, cwd, self.timeout, self.mem_limit_gb)
        if rc != 0:
            tail = err.strip().splitlines()[-1:] or ["(no output)"]
            raise SetupError(f"setup command {shlex.join(args)} ended with {rc}: {tail[0]}")
        self.tool_files |= regular_files(self.dir) - before

    def protect(self, *paths: Path) -> None:
        self.protected |= {Path(p) for p in paths}

    def protect_if_failed(self, *paths: Path) -> None:
        self.protected_if_failed |= {Path(p) for p in paths}


# ---- corrupted STAR files --------------------------------------------------------------------
# Each builder damages a fresh copy of the base data set and returns the particle file to use.

def _star(ctx: Ctx) -> tuple[Path, Star]:
    d = ctx.data()
    return d / "particles.star", Star(d / "particles.star")


def _edit(fn: Callable[[Star], object]) -> Callable[[Ctx], Path]:
    def build(ctx):
        path, s = _star(ctx)
        fn(s)
        return s.save(path)
    return build


def _bytes(fn: Callable[[bytes], bytes]) -> Callable[[Ctx], Path]:
    def build(ctx):
        path, _ = _star(ctx)
        path.write_bytes(fn(path.read_bytes()))
        return path
    return build


def _star_truncated_after_labels(ctx):
    path, s = _star(ctx)
    s.rows = []
    return s.save(path)


def _star_latin1_stack_name(ctx):
    path, _ = _star(ctx)
    particles = os.fsencode(path.parent / "Particles")
    os.rename(particles + b"/stack_0001.mrcs", particles + b"/st\xe9ck_0001.mrcs")
    path.write_bytes(path.read_bytes().replace(b"Particles/stack_0001.mrcs", b"Particles/st\xe9ck_0001.mrcs"))
    return path


def _star_directory(ctx):
    path, _ = _star(ctx)
    path.unlink()
    path.mkdir()
    return path


def _star_fifo(ctx):
    path, _ = _star(ctx)
    path.unlink()
    os.mkfifo(path)
    return path


def _star_dev_zero_link(ctx):
    path, _ = _star(ctx)
    path.unlink()
    path.symlink_to("/dev/zero")
    return path


def _star_dev_zero(ctx):
    ctx.data()
    return "/dev/zero"


def _star_garbage(ctx):
    path, _ = _star(ctx)
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    return path


def _star_mrcs_as_particles(ctx):
    d = ctx.data()
    return stacks(d)[0]


def _star_missing_stack(ctx):
    path, _ = _star(ctx)
    (path.parent / "Particles" / "stack_0002.mrcs").unlink()
    return path


def _replace_row_token(label: str, value: str, row: int = 4, block: str = "particles"):
    return _edit(lambda s: s.set(label, value, rows={row}, block=block))


def _short_row(s: Star):
    del s.rows[4][-1]


def _optics_group_missing(s: Star):
    s.set("rlnOpticsGroup", "7", rows={4})


STAR_CASES: dict[str, Callable[[Ctx], Path]] = {
    "truncated_half": _bytes(lambda b: b[: len(b) // 2]),
    "truncated_after_labels": _star_truncated_after_labels,
    "truncated_in_optics": _bytes(lambda b: b[: b.index(b"_rlnImagePixelSize") + 10]),
    "missing_rlnImageName": _edit(lambda s: s.drop("rlnImageName")),
    "missing_rlnAngleRot": _edit(lambda s: s.drop("rlnAngleRot")),
    "missing_rlnAngleTilt": _edit(lambda s: s.drop("rlnAngleTilt")),
    "missing_rlnDefocusU": _edit(lambda s: s.drop("rlnDefocusU")),
    "missing_rlnOriginXAngst": _edit(lambda s: s.drop("rlnOriginXAngst")),
    "missing_rlnRandomSubset": _edit(lambda s: s.drop("rlnRandomSubset")),
    "missing_rlnImagePixelSize": _edit(lambda s: s.drop("rlnImagePixelSize", block="optics")),
    "missing_rlnVoltage": _edit(lambda s: s.drop("rlnVoltage", block="optics")),
    "missing_rlnImageSize": _edit(lambda s: s.drop("rlnImageSize", block="optics")),
    "missing_optics_block": _edit(lambda s: s.blocks.remove(s.block("optics"))),
    "bad_number_defocus_abc": _replace_row_token("rlnDefocusU", "abc"),
    "bad_number_angle_comma": _replace_row_token("rlnAngleRot", "12,5"),
    "bad_number_subset_x": _replace_row_token("rlnRandomSubset", "x"),
    "nan_tilt": _replace_row_token("rlnAngleTilt", "nan"),
    "nan_defocus": _replace_row_token("rlnDefocusU", "NaN"),
    "nan_pixel_size": _replace_row_token("rlnImagePixelSize", "nan", row=0, block="optics"),
    "1e400_defocus": _replace_row_token("rlnDefocusU", "1e400"),
    "1e400_psi": _replace_row_token("rlnAnglePsi", "1e400"),
    "1e400_pixel_size": _replace_row_token("rlnImagePixelSize", "1e400", row=0, block="optics"),
    "huge_index": _replace_row_token("rlnImageName", "100000000000000000000@Particles/stack_0001.mrcs"),
    "index_zero": _replace_row_token("rlnImageName", "0@Particles/stack_0001.mrcs"),
    "index_past_stack_end": _replace_row_token("rlnImageName", "999@Particles/stack_0001.mrcs"),
    "missing_stack_file": _star_missing_stack,
    "latin1_micrograph_name": _bytes(lambda b: b.replace(b"Micrographs/simulated_0001.mrc",
                                                         b"Micrographs/caf\xe9_0001.mrc", 1)),
    "latin1_stack_name": _star_latin1_stack_name,
    "latin1_comment": _bytes(lambda b: b"# r\xe9colte du 3 mai\n" + b),
    "crlf": _bytes(lambda b: b.replace(b"\n", b"\r\n")),
    "bom": _bytes(lambda b: b"\xef\xbb\xbf" + b),
    "utf16": _bytes(lambda b: b.decode("ascii").encode("utf-16")),
    "empty_file": _bytes(lambda b: b""),
    "comments_only": _bytes(lambda b: b"# version 30001\n# nothing here\n"),
    "directory_instead_of_file": _star_directory,
    "fifo": _star_fifo,
    "dev_zero": _star_dev_zero,
    "dev_zero_symlink": _star_dev_zero_link,
    "binary_garbage": _star_garbage,
    "mrcs_as_particles": _star_mrcs_as_particles,
    "row_short_one_column": _edit(_short_row),
    "three_particles": _edit(lambda s: setattr(s, "rows", s.rows[:3])),
    "all_in_half_1": _edit(lambda s: s.set("rlnRandomSubset", "1")),
    "subset_3": _edit(lambda s: s.set("rlnRandomSubset", "3", rows=set(range(0, 120, 2)))),
    "optics_group_undefined": _edit(_optics_group_missing),
    "image_size_mismatch": _replace_row_token("rlnImageSize", "24", row=0, block="optics"),
}

# ---- MRC stack damage ------------------------------------------------------------------------


def _mrc(fn: Callable[[Path], object], stack_index: int = 1) -> Callable[[Ctx], Path]:
    """Damage one stack (the second of three) of a fresh base copy."""
    def build(ctx):
        d = ctx.data()
        fn(stacks(d)[stack_index])
        return d / "particles.star"
    return build


def _images(change: Callable[[np.ndarray], np.ndarray], all_stacks: bool = False, **kw):
    def damage(path):
        targets = stacks(path.parent.parent) if all_stacks else [path]
        for p in targets:
            rewrite_stack(p, change, **kw)
    return _mrc(damage)


def _set_pixels(index, value):
    def change(images):
        images[index] = value
        return images
    return change


def _replace_stack(kind: str):
    def damage(path: Path):
        path.unlink()
        if kind == "directory":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev_zero":
            path.symlink_to("/dev/zero")
        elif kind == "garbage":
            path.write_bytes(np.random.default_rng(6).integers(0, 256, 20000, dtype=np.uint8).tobytes())
        elif kind == "empty":
            path.write_bytes(b"")
    return _mrc(damage)


def _boxes(k: int):
    def build(ctx):
        return crop_box(ctx.data(), k)
    return build


def _integ_stacks(change):
    def build(ctx):
        d = ctx.data("integ")
        rng = np.random.default_rng(3)
        for stack in stacks(d):
            rewrite_stack(stack, lambda im: change(im, rng))
        return d / "particles.star"
    return build


def _raw_counts(images, rng):
    sigma = images.std()
    offset = (6 + 6 * rng.random((images.shape[0], 1, 1))) * sigma
    return np.clip(np.rint(1000 + 40 / sigma * (images + offset)), 0, 65535).astype(np.uint16)


def _float_offset(images, rng):
    return (images + 1000.0 + 50 * rng.random((images.shape[0], 1, 1))).astype(np.float32)


def _pad_to(k):
    def change(images):
        n = images.shape[-1]
        a = (k - n) // 2
        out = np.zeros((images.shape[0], k, k), np.float32)
        out[:, a:a + n, a:a + n] = images
        return out
    return change


MRC_CASES: dict[str, tuple[Callable[[Ctx], Path], bool]] = {
    # name: (builder, uses the integrity data set)
    "truncated_half": (_mrc(lambda p: truncate(p, p.stat().st_size // 2)), False),
    "truncated_to_header": (_mrc(lambda p: truncate(p, 1024)), False),
    "truncated_to_100_bytes": (_mrc(lambda p: truncate(p, 100)), False),
    "empty_stack": (_replace_stack("empty"), False),
    "bad_mode_99": (_mrc(lambda p: patch_int32(p, 12, 99)), False),
    "mode_4_complex": (_mrc(lambda p: patch_int32(p, 12, 4)), False),
    "nz_larger_than_data": (_mrc(lambda p: patch_int32(p, 8, 1000)), False),
    "extended_header_past_end": (_mrc(lambda p: patch_int32(p, 92, 10**9)), False),
    "nan_pixel": (_images(_set_pixels((3, 5, 5), np.nan)), False),
    "nan_image": (_images(_set_pixels(3, np.nan)), False),
    "inf_pixel": (_images(_set_pixels((3, 5, 5), np.inf)), False),
    "1e30_pixels_one_image": (_images(lambda im: np.concatenate([im[:3], im[3:4] * 1e30, im[4:]])), False),
    "1e30_pixels_all": (_images(lambda im: im * np.float32(1e30), all_stacks=True), False),
    "3e38_pixel": (_images(_set_pixels((3, 5, 5), 3e38)), False),
    "constant_image": (_images(_set_pixels(3, 0.5)), False),
    "all_images_zero": (_images(lambda im: np.zeros_like(im), all_stacks=True), False),
    "box_1": (_boxes(1), False),
    "box_2": (_boxes(2), False),
    "box_3": (_boxes(3), False),
    "box_6": (_boxes(6), False),
    "rectangular_images": (_images(lambda im: np.ascontiguousarray(im[:, :15, :]), all_stacks=True), False),
    "one_stack_box_20": (_images(_pad_to(20)), False),
    "int8_mode_0": (_images(lambda im: np.clip(np.rint(im * 20), -128, 127).astype(np.int8), all_stacks=True), False),
    "float16_mode_12": (_images(lambda im: im.astype(np.float16), all_stacks=True), False),
    "big_endian": (_mrc(to_big_endian), False),
    "header_voxel_1A_star_3A": (_images(lambda im: im, all_stacks=True, voxel=1.0), False),
    "stack_is_directory": (_replace_stack("directory"), False),
    "stack_is_fifo": (_replace_stack("fifo"), False),
    "stack_is_dev_zero": (_replace_stack("dev_zero"), False),
    "stack_garbage": (_replace_stack("garbage"), False),
    "raw_counts_uint16_offset_1000": (_integ_stacks(_raw_counts), True),
    "float32_offset_1000": (_integ_stacks(_float_offset), True),
}

# ---- duplicated particles --------------------------------------------------------------------


def _duplicated(kind: str = "base", opposite: bool = False, spelling: str = "same", no_subset: bool = False):
    """Every row twice. ``spelling``: ``same`` (identical index@stack), ``respelled`` (``1@./P/s``
    against ``000001@P/s``), ``copied_stack`` (a byte copy of each stack under another name),
    ``symlinked_stack`` (a link to each stack)."""
    def build(ctx):
        d = ctx.data(kind)
        s = Star(d / "particles.star")
        j = s.col("rlnImageName")
        h = s.col("rlnRandomSubset")
        copies = [list(r) for r in s.rows]
        for r in copies:
            index, stack = r[j].split("@")
            if spelling == "respelled":
                r[j] = f"{int(index)}@./{stack}"
            elif spelling in ("copied_stack", "symlinked_stack"):
                r[j] = f"{index}@{stack.replace('stack_', 'copy_')}"
            if opposite:
                r[h] = "2" if r[h] == "1" else "1"
        for stack in stacks(d):
            copy = stack.with_name(stack.name.replace("stack_", "copy_"))
            if spelling == "copied_stack":
                shutil.copyfile(stack, copy)
            elif spelling == "symlinked_stack":
                copy.symlink_to(stack.name)
        s.rows = s.rows + copies
        if no_subset:
            s.drop("rlnRandomSubset")
        return s.save()
    return build


def _one_row_duplicated(ctx):
    d = ctx.data()
    s = Star(d / "particles.star")
    h = s.col("rlnRandomSubset")
    row = list(s.rows[4])
    row[h] = "2" if row[h] == "1" else "1"
    s.rows.append(row)
    return s.save()


def _concatenated(ctx):
    d = ctx.data()
    path = d / "particles.star"
    path.write_text(path.read_text() * 2)
    return path


DUP_CASES: dict[str, tuple[Callable[[Ctx], Path], tuple[str, ...], bool]] = {
    # name: (builder, extra run options, uses the integrity data set)
    "all_rows_twice_same_half": (_duplicated(), (), False),
    "one_row_twice_opposite_halves": (_one_row_duplicated, (), False),
    "concatenated_star_files": (_concatenated, (), False),
    "all_rows_twice_no_subset_column": (_duplicated(no_subset=True), (), False),
    "all_rows_twice_same_half_drop": (_duplicated(), ("--drop-duplicates",), False),
    "opposite_halves": (_duplicated("integ", opposite=True), (), True),
    "opposite_halves_drop": (_duplicated("integ", opposite=True), ("--drop-duplicates",), True),
    "respelled_opposite_halves": (_duplicated("integ", opposite=True, spelling="respelled"), (), True),
    "respelled_opposite_halves_drop": (_duplicated("integ", opposite=True, spelling="respelled"),
                                       ("--drop-duplicates",), True),
    "symlinked_stack_opposite_halves": (_duplicated("integ", opposite=True, spelling="symlinked_stack"), (),
                                        True),
    "copied_stack_opposite_halves": (_duplicated("integ", opposite=True, spelling="copied_stack"), (), True),
}
DUP_INFO = ("all_rows_twice_same_half", "respelled_opposite_halves", "copied_stack_opposite_halves")

# ---- implausible physics ---------------------------------------------------------------------


def _optics(label: str, value: str):
    return _edit(lambda s: s.set(label, value, block="optics"))


def _defocus(fn, rows=None):
    return _edit(lambda s: (s.set("rlnDefocusU", fn, rows=rows), s.set("rlnDefocusV", fn, rows=rows)))


def _origins(value: str, rows=None):
    return _edit(lambda s: (s.set("rlnOriginXAngst", value, rows=rows), s.set("rlnOriginYAngst", value, rows=rows)))


def _two_optics_groups(s: Star):
    optics = s.block("optics")
    second = list(optics["rows"][0])
    second[s.col("rlnOpticsGroup", "optics")] = "2"
    second[s.col("rlnOpticsGroupName", "optics")] = "opticsGroup2"
    second[s.col("rlnImagePixelSize", "optics")] = "1.5"
    optics["rows"].append(second)
    s.set("rlnOpticsGroup", "2", rows=set(range(60, 120)))


PHYSICS_CASES: dict[str, Callable[[Ctx], Path]] = {
    "pixel_size_1e-6": _optics("rlnImagePixelSize", "1e-6"),
    "pixel_size_1e6": _optics("rlnImagePixelSize", "1e6"),
    "pixel_size_zero": _optics("rlnImagePixelSize", "0"),
    "pixel_size_negative": _optics("rlnImagePixelSize", "-3.0"),
    "defocus_negative": _defocus(lambda v: str(-float(v))),
    "defocus_negative_one_row": _defocus(lambda v: str(-float(v)), rows={4}),
    "defocus_1e9": _defocus(lambda v: "1e9"),
    "defocus_zero": _defocus(lambda v: "0"),
    "voltage_0.001kV": _optics("rlnVoltage", "0.001"),
    "voltage_zero": _optics("rlnVoltage", "0"),
    "voltage_1e6kV": _optics("rlnVoltage", "1e6"),
    "cs_1e12": _optics("rlnSphericalAberration", "1e12"),
    "amplitude_contrast_1.5": _optics("rlnAmplitudeContrast", "1.5"),
    "amplitude_contrast_negative": _optics("rlnAmplitudeContrast", "-0.2"),
    "origins_1e4A_all": _origins("10000"),
    "origins_1e4A_one_row": _origins("10000", rows={4}),
    "origins_1e30A": _origins("1e30"),
    "angles_1e6_degrees": _edit(lambda s: s.set("rlnAngleRot", lambda v: str(float(v) + 1e6))),
    "two_optics_groups_pixel_1.5_vs_3": _edit(_two_optics_groups),
}
PHYSICS_CLI = {"cli_angpix_1e-6": ("--angpix", "1e-6"), "cli_angpix_1.5_vs_star_3": ("--angpix", "1.5")}

# ---- options ---------------------------------------------------------------------------------


def _opt(*extra, epochs: int | None = 2, kind: str = "base"):
    def build(ctx):
        d = ctx.data(kind)
        ctx.run(d / "particles.star", *extra, epochs=epochs)
    return build


def _noise_map(box: int, voxel: float, scale: float = 1.0, value=None):
    def make(ctx) -> Path:
        vol = np.random.default_rng(9).normal(0, scale, (box, box, box))
        if value is not None:
            vol[box // 2, box // 2, box // 2] = value
        return write_map(ctx.dir / "start.mrc", vol, voxel)
    return make


def _initial_map(kind: str, box: int, *extra, epochs=2, noise_scale=None, value=None):
    def build(ctx):
        d = ctx.data(kind)
        scale = noise_scale
        if scale is None:
            from numba_recon.io.mrc import read_volume

            scale = float(read_volume(d / "truth.mrc")[0].std()) * 3
        start = _noise_map(box, 3.0, scale, value)(ctx)
        ctx.run(d / "particles.star", "--optimizer", "adam", "--initial-map", ctx.rel(start), *extra, epochs=epochs)
    return build


def _initial_map_is_stack(ctx):
    d = ctx.data()
    ctx.run(d / "particles.star", "--optimizer", "adam", "--initial-map", ctx.rel(stacks(d)[0]))


def _mask(kind: str):
    def build(ctx):
        d = ctx.data()
        box = 24 if kind == "wrong_box" else 16
        vol = np.zeros((box,) * 3) if kind == "all_zero" else np.ones((box,) * 3)
        if kind == "nan":
            vol[3, 3, 3] = np.nan
        mask = write_map(ctx.dir / "mask.mrc", vol, 3.0)
        ctx.run(d / "particles.star", "--mask", ctx.rel(mask))
    return build


def _root(kind: str):
    def build(ctx):
        d = ctx.data()
        if kind == "file":
            (ctx.dir / "afile").write_text("x")
        ctx.run(d / "particles.star", "--root", "afile" if kind == "file" else "no_such_folder")
    return build


def _backend_cuda(ctx):
    _opt()(ctx)
    ctx.argv[ctx.argv.index("--backend") + 1] = "cuda"


#: name -> builder; the cases that reconstruct for real are in SLOW_OPTION_CASES
OPTION_CASES: dict[str, Callable[[Ctx], None]] = {
    "seed_-1": _opt("--seed", "-1"),
    "seed_2^63": _opt("--seed", str(2**63)),
    "seed_2^64": _opt("--seed", str(2**64)),
    "sym_C10001": _opt("--sym", "C10001"),
    "sym_C10000000": _opt("--sym", "C10000000"),
    "sym_D5000": _opt("--sym", "D5000"),
    "sym_empty": _opt("--sym", ""),
    "radius_0.001": _opt("--radius", "0.001"),
    "radius_1e9": _opt("--radius", "1e9"),
    "radius_-1": _opt("--radius", "-1"),
    "lr_1e30_adam": _opt("--optimizer", "adam", "--lr", "1e30"),
    "lr_1e-30_adam": _opt("--optimizer", "adam", "--lr", "1e-30"),
    "lr_nan_adam": _opt("--optimizer", "adam", "--lr", "nan"),
    "epochs_0": _opt("--epochs", "0", epochs=None),
    "epochs_-1": _opt("--epochs", "-1", epochs=None),
    "batch_size_0": _opt("--batch-size", "0"),
    "batch_size_1_adam": _opt("--optimizer", "adam", "--batch-size", "1"),
    "keep_fraction_1.5": _opt("--loss", "trimmed", "--keep-fraction", "1.5"),
    "keep_fraction_0.5:1.5": _opt("--loss", "trimmed", "--keep-fraction", "0.5:1.5"),
    "cv_fraction_0": _opt("--cv-fraction", "0"),
    "cv_fraction_1": _opt("--cv-fraction", "1"),
    "cv_fraction_0.99": _opt("--cv-fraction", "0.99"),
    "particle_diameter_0.001": _opt("--particle-diameter", "0.001"),
    "particle_diameter_1e9": _opt("--particle-diameter", "1e9"),
    "reg_lambda_-1": _opt("--reg-lambda", "-1"),
    "reg_lambda_1e30": _opt("--reg-lambda", "1e30"),
    "cache_mb_1e-9": _opt("--cache-mb", "1e-9"),
    "checkpoint_every_0": _opt("--checkpoint-every", "0"),
    "class_99": _opt("--class", "99"),
    "reweight_power_nan": _opt("--loss", "reweighted", "--reweight-power", "nan"),
    "robust_warmup_-1": _opt("--loss", "trimmed", "--robust-warmup", "-1"),
    "root_missing": _root("missing"),
    "root_is_file": _root("file"),
    "mask_wrong_box": _mask("wrong_box"),
    "mask_all_zero": _mask("all_zero"),
    "mask_nan": _mask("nan"),
    "initial_map_wrong_box": _initial_map("base", 24),
    "initial_map_nan": _initial_map("base", 16, value=np.nan),
    "initial_map_is_stack": _initial_map_is_stack,
    "initial_map_white_noise_adam": _initial_map("integ", 32, epochs=None),
    "initial_map_white_noise_adam_5_epochs": _initial_map("integ", 32, epochs=5),
    "initial_map_white_noise_adam_lowpass_nyquist": _initial_map("integ", 32, "--initial-lowpass", "6", epochs=5),
    "backend_cuda_without_gpu": _backend_cuda,
}
SLOW_OPTION_CASES = {"initial_map_white_noise_adam", "initial_map_white_noise_adam_5_epochs",
                     "initial_map_white_noise_adam_lowpass_nyquist"}

# ---- output hazards --------------------------------------------------------------------------


def _plant(ctx: Ctx, path: Path, content: bytes = b"my notes\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    ctx.protect(path)
    return path


def _out_is_file(ctx):
    d = ctx.data()
    _plant(ctx, ctx.dir / "out")
    ctx.run(d / "particles.star")


def _out_under_file(ctx):
    d = ctx.data()
    _plant(ctx, ctx.dir / "afile")
    ctx.run(d / "particles.star", out="afile/out")


def _out_nonempty(ctx):
    d = ctx.data()
    _plant(ctx, ctx.dir / "out" / "notes.txt")
    ctx.run(d / "particles.star")


def _overwrite_with_user_files(*where: str, mask: bool = False):
    """A finished run, user files planted in it, then the same run with --overwrite."""
    def build(ctx):
        d = ctx.data()
        extra = []
        if mask:
            write_map(ctx.dir / "mask.mrc", np.ones((16,) * 3), 3.0)
            extra = ["--mask", "mask.mrc"]
        ctx.prerun("run", d / "particles.star", "-o", ctx.dir / "out", "--backend", "cpu", "--epochs", "2", *extra)
        for w in where:
            _plant(ctx, ctx.dir / "out" / w, b"user data " + w.encode() + b"\n")
        ctx.run(d / "particles.star", "--overwrite", *extra)
    return build


def _overwrite_foreign(*names: str):
    """--overwrite into a folder numba-recon never wrote, holding user files."""
    def build(ctx):
        d = ctx.data()
        for n in names:
            _plant(ctx, ctx.dir / "out" / n, b"user file " + n.encode() + b"\n")
        ctx.run(d / "particles.star", "--overwrite")
    return build


def _input_is_run_data(overwrite: bool):
    def build(ctx):
        d = ctx.data()
        out = ctx.dir / "out"
        out.mkdir()
        shutil.copytree(d / "Particles", out / "Particles")
        shutil.copyfile(d / "particles.star", out / "run_data.star")
        ctx.run(out / "run_data.star", *(["--overwrite"] if overwrite else []))
    return build


def _out_is_data_folder(ctx):
    d = ctx.data()
    ctx.run(d / "particles.star", "--overwrite", out="data")


def _out_is_cwd(ctx):
    d = ctx.data()
    ctx.cwd = d
    ctx.run(d / "particles.star", "--overwrite", out="data")  # "-o ." from inside the data folder


def _simulate_overwrite(previous: bool, planted: str):
    def build(ctx):
        sim = ctx.dir / "sim"
        if previous:
            ctx.prerun("simulate", "-o", sim, "--n-particles", "20", "--box-size", "16", "--particles-per-stack", "10")
        _plant(ctx, sim / planted, b"\x00" * 1024 + b"user stack\n")
        ctx.command("simulate", "-o", sim, "--n-particles", "30", "--box-size", "16", "--overwrite")
    return build


def _simulate_over_run(ctx):
    d = ctx.data()
    ctx.prerun("run", d / "particles.star", "-o", ctx.dir / "out", "--backend", "cpu", "--epochs", "2")
    _plant(ctx, ctx.dir / "out" / "notes.txt")
    ctx.command("simulate", "-o", ctx.dir / "out", "--n-particles", "30", "--box-size", "16", "--overwrite")


def _mask_onto_input(ctx):
    d = ctx.data()
    ctx.command("mask", d / "truth.mrc", "-o", d / "truth.mrc", "--threshold", "auto")


def _convert_onto_input(ctx):
    d = ctx.data()
    ctx.command("convert", d / "particles.star", d / "particles.star")


def _project_onto_stack(ctx):
    d = ctx.data()
    ctx.command("project", d / "truth.mrc", "--star", d / "particles.star", "-o", stacks(d)[0])


def _select_onto_input(ctx):
    d = ctx.data()
    ctx.prerun("run", d / "particles.star", "-o", ctx.dir / "out", "--backend", "cpu", "--epochs", "2")
    ctx.protect(ctx.dir / "out" / "run_data.star")
    ctx.command("select", ctx.dir / "out" / "run_data.star", "-o", ctx.dir / "out" / "run_data.star",
                "--keep-fraction", "0.5")


OUTPUT_CASES: dict[str, Callable[[Ctx], None]] = {
    "out_is_a_file": _out_is_file,
    "out_under_a_file": _out_under_file,
    "out_nonempty_without_overwrite": _out_nonempty,
    "overwrite_user_file_in_checkpoints": _overwrite_with_user_files("checkpoints/my_notes.txt"),
    "overwrite_user_subfolder_in_checkpoints": _overwrite_with_user_files("checkpoints/old/ckpt_e0001.h5"),
    "overwrite_user_file_in_plots": _overwrite_with_user_files("plots/my_figure.png"),
    "overwrite_user_file_in_postprocess": _overwrite_with_user_files("postprocess/my_mask.mrc", mask=True),
    "overwrite_user_files_everywhere": _overwrite_with_user_files(
        "notes.txt", "checkpoints/a.txt", "checkpoints/sub/b.txt", "plots/c.png", "Particles/stack_0001.mrcs"),
    "overwrite_folder_numba_recon_never_wrote": _overwrite_foreign("notes.txt", "checkpoints/x.h5", "plots/y.png"),
    "overwrite_user_file_named_like_an_output": _overwrite_foreign("run_class001.mrc"),
    "input_star_is_out_run_data": _input_is_run_data(False),
    "input_star_is_out_run_data_overwrite": _input_is_run_data(True),
    "out_is_the_data_folder_overwrite": _out_is_data_folder,
    "out_is_cwd_data_folder_overwrite": _out_is_cwd,
    "simulate_overwrite_user_stack_9999": _simulate_overwrite(True, "Particles/stack_9999.mrcs"),
    "simulate_overwrite_user_stack_0001_no_earlier_simulation": _simulate_overwrite(False, "Particles/stack_0001.mrcs"),
    "simulate_overwrite_a_run_folder": _simulate_over_run,
    "mask_output_is_its_input": _mask_onto_input,
    "convert_output_is_its_input": _convert_onto_input,
    "project_output_is_an_input_stack": _project_onto_stack,
    "select_output_is_its_input": _select_onto_input,
}

# ---- resume hazards --------------------------------------------------------------------------

FINISHED = ("NUMBA_RECON_JOB_EXIT_SUCCESS", "run_class001.mrc", "run_half1_class001_unfil.mrc",
            "run_half2_class001_unfil.mrc", "summary.json", "run_data.star")


def _resume(prepare: Callable[[Ctx, Path, Path], None] | None = None, *extra: str, first: tuple[str, ...] = (),
            epochs: int | None = 4):
    """A finished 2-epoch run in ``out``, ``prepare(ctx, data, out)``, then ``run --resume out``."""
    def build(ctx):
        d = ctx.data()
        out = ctx.dir / "out"
        ctx.prerun("run", d / "particles.star", "-o", out, "--backend", "cpu", "--epochs", "2", *first)
        ctx.protect_if_failed(*(out / f for f in FINISHED))
        ctx.resume(out, *extra, epochs=epochs)
        if prepare is not None:
            prepare(ctx, d, out)
    return build


def _reorder(ctx, d, out):
    s = Star(d / "particles.star")
    s.rows = s.rows[::-1]
    s.save()


def _remove_rows(ctx, d, out):
    s = Star(d / "particles.star")
    s.rows = s.rows[:90]
    s.save()


def _change_pixels(ctx, d, out):
    rewrite_stacks(d, lambda im: -im)


def _other_cwd(decoy: bool):
    def prepare(ctx, d, out):
        elsewhere = ctx.dir / "elsewhere"
        elsewhere.mkdir()
        if decoy:  # the same relative path from there holds other images
            shutil.copytree(d, elsewhere / "data")
            rewrite_stacks(elsewhere / "data",
                           lambda im: np.random.default_rng(1).normal(size=im.shape).astype(np.float32))
        ctx.cwd = elsewhere
        ctx.argv[ctx.argv.index("--resume") + 1] = ctx.rel(out)
    return prepare


def _no_checkpoints(ctx, d, out):
    shutil.rmtree(out / "checkpoints")
    ctx.protect(*(out / f for f in FINISHED))


def _rm_input(ctx, d, out):
    (d / "particles.star").unlink()


def _move_data(ctx, d, out):
    d.rename(ctx.dir / "moved")


def _empty_folder(ctx):
    ctx.data()
    (ctx.dir / "out").mkdir()
    ctx.resume(ctx.dir / "out")


def _positional_other(ctx, d, out):
    s = Star(d / "particles.star")
    s.rows = s.rows[:60]
    s.save(d / "other.star")
    ctx.argv.insert(1, ctx.rel(d / "other.star"))


RESUME_CASES: dict[str, Callable[[Ctx], None]] = {
    "rows_reordered": _resume(_reorder),
    "rows_removed": _resume(_remove_rows),
    "stack_pixels_changed": _resume(_change_pixels),
    "lr_changed": _resume(None, "--optimizer", "adam", "--lr", "0.05", first=("--optimizer", "adam")),
    "sym_changed": _resume(None, "--sym", "C2"),
    "batch_size_changed": _resume(None, "--optimizer", "adam", "--batch-size", "16", first=("--optimizer", "adam")),
    "optimizer_changed": _resume(None, "--optimizer", "adam"),
    "loss_changed": _resume(None, "--loss", "trimmed"),
    "from_another_working_directory": _resume(_other_cwd(False)),
    "from_another_working_directory_with_decoy_data": _resume(_other_cwd(True)),
    "folder_without_checkpoints": _resume(_no_checkpoints),
    "empty_folder": _empty_folder,
    "input_star_deleted": _resume(_rm_input),
    "data_folder_moved": _resume(_move_data),
    "other_particles_given": _resume(_positional_other),
    "fewer_epochs_than_done": _resume(None, epochs=1),
    "with_overwrite": _resume(None, "--overwrite"),
}


def _register() -> None:
    def run_case(builder, *extra, epochs=2):
        def build(ctx):
            ctx.run(builder(ctx), *extra, epochs=epochs)
        return build

    def info_case(builder, *extra):
        def build(ctx):
            ctx.info(builder(ctx), *extra)
        return build

    slow_star = {"fifo", "dev_zero", "dev_zero_symlink"}
    for name, b in STAR_CASES.items():
        case(f"star/{name}", "star", run_case(b), slow=name in slow_star)
    for name, (b, integ) in MRC_CASES.items():
        case(f"mrc/{name}", "mrc", run_case(b, epochs=None if integ else 2), slow=integ or "fifo" in name)
    for name, (b, extra, integ) in DUP_CASES.items():
        case(f"duplicates/{name}", "duplicates", run_case(b, *extra, epochs=None if integ else 2), slow=integ)
    for name, b in PHYSICS_CASES.items():
        case(f"physics/{name}", "physics", run_case(b))
    for name, extra in PHYSICS_CLI.items():
        case(f"physics/{name}", "physics", run_case(lambda ctx: ctx.data() / "particles.star", *extra))
    for name, b in OPTION_CASES.items():
        case(f"options/{name}", "options", b, slow=name in SLOW_OPTION_CASES)
    for name, b in OUTPUT_CASES.items():
        case(f"output/{name}", "output", b)
    for name, b in RESUME_CASES.items():
        case(f"resume/{name}", "resume", b)
    for name, b in STAR_CASES.items():
        case(f"info/star-{name}", "info", info_case(b), slow=name in slow_star)
    for name, (b, integ) in MRC_CASES.items():
        case(f"info/mrc-{name}", "info", info_case(b, "--check-pixels"), slow="fifo" in name)
    for name in DUP_INFO:
        case(f"info/duplicates-{name}", "info", info_case(DUP_CASES[name][0]))
    for name, b in PHYSICS_CASES.items():
        case(f"info/physics-{name}", "info", info_case(b))


_register()

# ----------------------------------------------------------------------------------------------
# running and classifying


def classify(rc: int | None, stdout: str, stderr: str) -> tuple[str, str]:
    """The outcome class and the line that says most about it."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if rc is None:
        return "hang", (lines[-1] if lines else "(no output before the time limit)")
    if "Traceback" in stderr or "Traceback" in stdout:
        return "traceback", (lines[-1] if lines else "Traceback")
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIX)]
    if rc == 0:
        warned = [ln for ln in lines if re.search(r"\bWARNING\b", ln)]
        if warned:
            return "warning", warned[0]
        said = [ln for ln in stdout.splitlines() if ln.strip()]
        resolution = [ln for ln in said if ln.startswith("Resolution")]
        return "ok", (resolution or said[-1:] or lines[:1] or [""])[0]
    if rc == 2 and len(errors) == 1:
        return "refused", errors[0]
    what = f"exit {rc}" + (f" with {len(errors)} error lines" if rc == 2 else "")
    return "traceback", f"{what}: {(errors or lines or ['(no output)'])[-1]}"


def inflation(ctx: Ctx, started: float) -> dict:
    """Reported against truth-based resolution of the written average map (see the module doc)."""
    res = {"inflated": None}
    if ctx.out is None or ctx.truth is None:
        return res
    summary_path = ctx.out / "summary.json"
    try:
        if not summary_path.is_file() or summary_path.stat().st_mtime < started - 1:
            return res
        summary = json.loads(summary_path.read_text())
        reported = summary.get("resolution_angstrom")
        if reported is None:
            return res
        reported = float(reported)
        angpix = float(summary["pixel_size_angstrom"])
        from numba_recon.evaluate.fsc import fsc, resolution_at
        from numba_recon.io.mrc import read_volume

        average, _ = read_volume(ctx.out / "run_class001.mrc")
        truth, _ = read_volume(ctx.truth)
    except Exception as err:  # noqa: BLE001 - a damaged output is a finding, not a harness failure
        res["inflation_note"] = f"not checked: {type(err).__name__}: {err}"
        return res
    res["reported_resolution_angstrom"] = reported
    if average.shape != truth.shape:
        res["inflation_note"] = f"not checked: map box {average.shape} differs from the truth's {truth.shape}"
        return res
    box = truth.shape[0]
    curve = np.array(fsc(average, truth), dtype=np.float64)
    # shell 0 is the mean, which the FSC does not judge; with --initial-map the shells below the start
    # map's low-pass (and its edge) are shared by design, as with RELION's --ini_high
    ignore = 1
    argv = ctx.argv or []
    if "--initial-map" in argv:
        lowpass = float(argv[argv.index("--initial-lowpass") + 1]) if "--initial-lowpass" in argv else 60.0
        ignore = int(round(box * angpix / lowpass)) + 2
        res["ignored_shells"] = ignore
    curve[:ignore] = 1.0
    true_res = float(resolution_at(curve, box, angpix, 0.5))
    nyquist = 2 * angpix
    res["truth_resolution_angstrom"] = true_res
    at_nyquist = abs(reported - nyquist) <= 1e-6 * nyquist
    res["inflated"] = bool(reported < 0.8 * true_res or (at_nyquist and true_res > nyquist * (1 + 1e-6)))
    return res


def execute(case_: Case, work: Path, datasets: dict[str, Path], timeout: float, mem_limit_gb: float,
            keep: bool) -> dict:
    case_dir = work / "cases" / case_.name.replace("/", "__")
    case_dir.mkdir(parents=True)
    ctx = Ctx(case_dir, datasets, timeout, mem_limit_gb)
    record = {"name": case_.name, "family": case_.family}
    try:
        case_.build(ctx)
        if ctx.argv is None:
            raise SetupError("the case set no command")
    except Exception as err:  # noqa: BLE001
        record.update({"class": "setup-error", "message": f"{type(err).__name__}: {err}", "exit_code": None,
                       "seconds": 0.0, "files_lost": [], "inflated": None, "command": None,
                       "first_stderr_line": ""})
        if not keep:
            shutil.rmtree(case_dir, ignore_errors=True)
        return record
    watched = (regular_files(case_dir) - ctx.tool_files) | ctx.protected
    before = {p: file_hash(p) for p in watched}
    before_if_failed = {p: file_hash(p) for p in ctx.protected_if_failed if p not in before}
    started = time.time()
    rc, out, err, seconds = spawn(ctx.argv, ctx.cwd, timeout, mem_limit_gb)
    cls, message = classify(rc, out, err)
    lost = [p for p, h in before.items() if file_hash(p) != h]
    if rc != 0:
        lost += [p for p, h in before_if_failed.items() if file_hash(p) != h]
    stderr_lines = [ln for ln in err.splitlines() if ln.strip()]
    here = str(case_dir) + os.sep  # messages name paths relative to the case folder

    def short(text: str) -> str:
        return text.replace(here, "")

    record.update({
        "command": "numba-recon " + shlex.join(ctx.argv),
        "cwd": os.path.relpath(ctx.cwd, case_dir),
        "exit_code": rc,
        "class": cls,
        "seconds": round(seconds, 2),
        "files_lost": sorted(os.path.relpath(p, case_dir) for p in lost),
        "first_stderr_line": short(stderr_lines[0]) if stderr_lines else "",
        "message": short(message),
        "python_warning": bool(re.search(r"\w+Warning: ", err)),
    })
    record.update(inflation(ctx, started) if rc == 0 else {"inflated": None})
    if record.get("inflated") and cls == "warning" and record["family"] == "physics":
        # CTF or pixel-size values that do not fit the images: both half maps carry the same model
        # error, so their FSC cannot see it; the run warned about the values
        record["inflated"], record["wrong_model_warned"] = False, True
    if not keep:
        shutil.rmtree(case_dir, ignore_errors=True)
    return record


COLUMNS = ("cases", "ok", "warnings", "refused / clean errors", "tracebacks", "hangs", "files lost",
           "inflated resolutions", "wrong CTF or pixel size (warned)")


def tally(records: list[dict]) -> dict[str, collections.Counter]:
    rows: dict[str, collections.Counter] = {f: collections.Counter() for f in FAMILIES}
    rows["total"] = collections.Counter()
    for r in records:
        for key in (r["family"], "total"):
            c = rows[key]
            c["cases"] += 1
            c[{"ok": "ok", "warning": "warnings", "refused": "refused / clean errors", "traceback": "tracebacks",
               "hang": "hangs", "setup-error": "setup errors"}[r["class"]]] += 1
            c["files lost"] += bool(r["files_lost"])
            c["inflated resolutions"] += bool(r.get("inflated"))
            c["wrong CTF or pixel size (warned)"] += bool(r.get("wrong_model_warned"))
    return rows


def failures(records: list[dict]) -> list[dict]:
    return [r for r in records if r["class"] in ("traceback", "hang", "setup-error") or r["files_lost"]
            or r.get("inflated")]


def markdown(records: list[dict], seconds: float) -> str:
    rows = tally(records)
    cols = list(COLUMNS) + (["setup errors"] if rows["total"]["setup errors"] else [])
    out = ["| family | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, c in rows.items():
        if not c["cases"]:
            continue
        label = "**total**" if key == "total" else FAMILIES[key]
        cells = [f"**{c[k]}**" if key == "total" else str(c[k]) for k in cols]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"{len(records)} cases in {seconds / 60:.1f} min.")
    bad = failures(records)
    if bad:
        out += ["", "| case | class | files lost | inflated | message |", "|---|---|---|---|---|"]
        for r in bad:
            infl = ""
            if r.get("inflated"):
                infl = (f"reported {r['reported_resolution_angstrom']:.2f} A, "
                        f"truth {r['truth_resolution_angstrom']:.2f} A")
            msg = (r.get("message") or "").replace("|", "\\|")
            if len(msg) > 200:
                msg = msg[:197] + "..."
            out.append(f"| `{r['name']}` | {r['class']} | {', '.join(r['files_lost'])} | {infl} | {msg} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write one JSON object per case to this file (JSON lines)")
    parser.add_argument("--markdown", action="store_true", help="print the summary as markdown tables")
    parser.add_argument("--jobs", type=int, default=2, help="cases run in parallel (default 2)")
    parser.add_argument("--filter", default="", help="only cases whose name contains this substring")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per command before it counts as a hang")
    parser.add_argument("--mem-limit-gb", type=float, default=6.0,
                        help="address-space limit of each command (0: none); default 6")
    parser.add_argument("--keep", type=Path, help="build the cases in this folder and keep them (to reproduce one)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the harness's own damage (NaN pixels, overflows) is deliberate
    np.seterr(all="ignore")

    selected = [c for c in CASES if args.filter in c.name]
    if args.list:
        for c in selected:
            print(c.name)
        print(f"{len(selected)} cases", file=sys.stderr)
        return
    if not selected:
        parser.error(f"no case name contains {args.filter!r}")
    t0 = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
    with work_folder(args.keep.resolve() if args.keep else None, "numba-recon-hostile-") as work:
        print(f"simulating the data sets in {work} ...", file=sys.stderr)
        datasets = build_datasets(work)
        order = sorted(range(len(selected)), key=lambda i: not selected[i].slow)
        results: dict[int, dict] = {}
        lock = threading.Lock()
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(execute, selected[i], work, datasets, args.timeout, args.mem_limit_gb,
                                   bool(args.keep)): i for i in order}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    r = fut.result()
                except Exception as err:  # noqa: BLE001 - a harness failure is reported, not fatal
                    r = {"name": selected[i].name, "family": selected[i].family, "class": "setup-error",
                         "message": f"harness: {type(err).__name__}: {err}", "exit_code": None, "seconds": 0.0,
                         "files_lost": [], "inflated": None, "command": None, "first_stderr_line": ""}
                with lock:
                    results[i] = r
                    flags = (" FILES LOST" if r["files_lost"] else "") + (" INFLATED" if r.get("inflated") else "")
                    print(f"[{len(results)}/{len(selected)}] {r['seconds']:6.1f}s {r['class']:<11} {r['name']}{flags}",
                          file=sys.stderr, flush=True)
        records = [results[i] for i in range(len(selected))]
    seconds = time.perf_counter() - t0
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if args.markdown:
        print(markdown(records, seconds))
    else:
        for key, c in tally(records).items():
            if c["cases"]:
                print(f"{key:<11} " + "  ".join(f"{k}={c[k]}" for k in COLUMNS))
        print(f"{len(records)} cases in {seconds:.0f} s; {len(failures(records))} failing")
        for r in failures(records):
            print(f"  {r['class']:<11} {r['name']}: {r.get('message', '')}"
                  + (f" [files lost: {', '.join(r['files_lost'])}]" if r["files_lost"] else "")
                  + (" [inflated]" if r.get("inflated") else ""))


if __name__ == "__main__":
    main()
