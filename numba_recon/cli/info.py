"""``numba-recon info``: summarise a particle file (STAR, .thu) or an MRC map or stack."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from numba_recon.cli._common import angpix_option, handle_errors
from numba_recon.errors import InputFileError
from numba_recon.particles import MIN_BOX_PX, ParticleSet

MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec", ".st")
# values per read when checking pixels (about 16 MB of float32): memory stays bounded for any box
_CHECK_CHUNK_VALUES = 1 << 22
#: Fewest particles ``numba-recon run`` accepts (2 per half set).
MIN_PARTICLES = 4


def particle_summary(particles: ParticleSet) -> dict[str, Any]:
    """The facts ``info`` reports about a particle set, as JSON-ready values."""
    from numba_recon.io.mrc import factorize_paths

    ctf = particles.ctf
    defocus = np.concatenate([ctf["defocus_u_angstrom"], ctf["defocus_v_angstrom"]])
    halves = {str(h): int(np.count_nonzero(particles.half_set == h)) for h in (1, 2, 0)}
    classes = None
    if particles.class_number is not None:
        values, counts = np.unique(particles.class_number, return_counts=True)
        classes = {str(int(v)): int(c) for v, c in zip(values, counts)}
    groups, group_counts = np.unique(particles.optics_group, return_counts=True)
    meta = particles.meta
    summary: dict[str, Any] = {
        "file": os.fspath(particles.source) if particles.source is not None else None,
        "format": meta.get("format"),
        "n_particles": len(particles),
        "n_optics_groups": int(len(groups)),
        "optics_groups": {str(int(g)): int(c) for g, c in zip(groups, group_counts)},
        "pixel_size_angstrom": float(particles.pixel_size_angstrom),
        "pixel_size_source": meta.get("pixel_size_source"),
        "box_size": int(particles.box_size),
        "defocus_min_angstrom": float(defocus.min()),
        "defocus_max_angstrom": float(defocus.max()),
        "voltage_kv": sorted({float(v) for v in np.unique(ctf["voltage_kv"])}),
        "half_sets": halves,
        "half_split": meta.get("half_split", {"method": "rlnRandomSubset"} if halves["0"] == 0 else None),
        "classes": classes,
        "n_ctf_premultiplied": int(np.count_nonzero(particles.ctf_premultiplied)),
        "n_stack_files": int(len(factorize_paths(particles.stack_paths)[1])),
    }
    if meta.get("format") == "star":
        summary["star_version"] = meta.get("star_version")
    return summary


def _read_images_raw(path: str, wanted: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Images ``wanted`` (sorted, unique, 0-based) of one stack as stored, a bounded chunk at a time.

    Unlike :class:`~numba_recon.io.mrc.StackReader` (which stops at the first non-finite image)
    this returns NaN and infinite pixels, so they can be counted. Yields ``(indices (k,),
    images (k, ny, nx))`` in the file's dtype.

    Raises
    ------
    InputFileError
        The stack is not a regular file, is corrupt, or is shorter than its header says.
    """
    from numba_recon.io.mrc import mrc_header

    h = mrc_header(path)  # refuses named pipes and devices before anything is opened
    image_bytes = h.ny * h.nx * h.dtype.itemsize
    per_chunk = max(1, _CHECK_CHUNK_VALUES // (h.ny * h.nx))
    try:
        with open(path, "rb") as f:
            for start in range(0, len(wanted), per_chunk):
                chunk = wanted[start:start + per_chunk]
                images = np.empty((len(chunk), h.ny, h.nx), dtype=h.dtype)
                runs = np.split(np.arange(len(chunk)), np.flatnonzero(np.diff(chunk) != 1) + 1)
                for run in runs:  # consecutive images in one read
                    f.seek(h.data_offset + int(chunk[run[0]]) * image_bytes)
                    view = memoryview(images[run[0]:run[-1] + 1]).cast("B")
                    if f.readinto(view) != len(view):
                        raise InputFileError(f"image {int(chunk[run[0]]) + 1} could not be read (file shorter than "
                                             "its header says)", path, "re-copy the file or re-extract the particles")
                yield chunk, images
    except OSError as err:
        raise InputFileError(f"cannot read the file ({err.strerror})", path, "check the path and permissions") from None


def check_particle_pixels(particles: ParticleSet) -> dict[str, Any]:
    """Read every particle image once, stack by stack, and count the unusable ones.

    Counts images with NaN or infinite pixels and constant images (every pixel equal: no noise,
    so not a particle image; ``numba-recon run`` refuses both). Each distinct image is read once,
    in file order, at most about 16 MB at a time.

    Returns
    -------
    dict
        ``images_checked``, ``images_nonfinite`` and ``images_constant`` (counts of particles,
        i.e. rows), and ``first_nonfinite`` / ``first_constant``: ``(row, stack, index)`` of the
        first such particle (0-based row and index) or None; ``first_constant`` also carries the
        constant value.
    """
    from numba_recon.io.mrc import factorize_paths

    import hashlib

    from numba_recon.batch import PEAK_LIMIT

    n = len(particles)
    nonfinite = np.zeros(n, dtype=bool)
    constant = np.zeros(n, dtype=bool)
    huge = np.zeros(n, dtype=bool)
    digest = np.zeros(n, dtype=np.uint64)  # copies of one image under other names have equal digests
    value = np.zeros(n, dtype=np.float64)  # the pixel value of a constant image
    codes, stacks = factorize_paths(particles.stack_paths)
    indices = np.asarray(particles.stack_indices, dtype=np.int64)
    for code, stack in enumerate(stacks):
        rows = np.flatnonzero(codes == code)
        wanted, where = np.unique(indices[rows], return_inverse=True)  # rows sharing an image read it once
        bad = np.zeros(len(wanted), dtype=bool)
        flat = np.zeros(len(wanted), dtype=bool)
        big = np.zeros(len(wanted), dtype=bool)
        hashes = np.zeros(len(wanted), dtype=np.uint64)
        level = np.zeros(len(wanted), dtype=np.float64)
        done = 0
        for chunk, images in _read_images_raw(str(stack), wanted):
            pixels = images.reshape(len(chunk), -1)
            finite = np.isfinite(pixels).all(axis=1)
            lo, hi = pixels.min(axis=1), pixels.max(axis=1)
            part = slice(done, done + len(chunk))
            bad[part] = ~finite
            flat[part] = finite & (lo == hi)
            with np.errstate(invalid="ignore"):
                big[part] = finite & (np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64) > PEAK_LIMIT)
            level[part] = np.where(finite, lo, 0).astype(np.float64)
            # as float32, as the reconstruction reads them: the same digest as its survey
            hashes[part] = [int.from_bytes(hashlib.blake2b(np.ascontiguousarray(im, dtype=np.float32).tobytes(),
                                                           digest_size=8).digest(), "little") for im in images]
            done += len(chunk)
        nonfinite[rows], constant[rows], value[rows] = bad[where], flat[where], level[where]
        huge[rows], digest[rows] = big[where], hashes[where]

    def first(mask: np.ndarray) -> tuple[int, str, int] | None:
        if not mask.any():
            return None
        i = int(np.flatnonzero(mask)[0])
        return i, str(particles.stack_paths[i]), int(indices[i])

    result: dict[str, Any] = {
        "images_checked": n,
        "images_nonfinite": int(nonfinite.sum()),
        "images_constant": int(constant.sum()),
        "first_nonfinite": first(nonfinite),
        "first_constant": first(constant),
        "images_huge": int(huge.sum()),
        "first_huge": first(huge),
    }
    from numba_recon.batch import copied_images

    # rows naming the same image are counted by the metadata check; copies under other names here
    named = np.unique(np.stack([codes, indices]), axis=1, return_index=True)[1] if n else np.zeros(0, np.int64)
    distinct = np.sort(named)
    copies, originals = copied_images(digest[distinct])
    result["images_copied"] = int(copies.size)
    result["first_copied"] = (None if not copies.size else
                              (int(distinct[copies[0]]), int(distinct[originals[0]])))
    if result["first_constant"] is not None:
        result["first_constant"] += (float(value[result["first_constant"][0]]),)
    return result


def blocking_problem(particles: ParticleSet, summary: dict[str, Any]) -> InputFileError | None:
    """The first problem that stops any reconstruction from these particles, as the error to raise.

    Checked from the metadata: a box below :data:`~numba_recon.particles.MIN_BOX_PX` (what
    ``numba-recon run`` accepts), and half sets from the file (``rlnRandomSubset``) with every
    particle in one half. Checked from the pixels when ``summary`` has them
    (:func:`check_particle_pixels`): images with NaN or infinite pixels and constant images.
    """
    path = particles.source
    box = summary["box_size"]
    if box < MIN_BOX_PX:
        return InputFileError(f"box size {box} px is too small for a reconstruction (at least {MIN_BOX_PX} px)",
                              path, f"re-extract the particles with a box of at least {MIN_BOX_PX} px")
    halves = summary["half_sets"]
    from_file = (summary.get("half_split") or {}).get("method") == "rlnRandomSubset"
    if from_file and halves["0"] == 0 and 0 in (halves["1"], halves["2"]):
        full, empty = ("1", "2") if halves["2"] == 0 else ("2", "1")
        return InputFileError(f"all {halves[full]} particles are in half set {full} (rlnRandomSubset {full}) and "
                              f"half set {empty} is empty: a gold-standard reconstruction needs both halves", path,
                              "set rlnRandomSubset to 1 for about half of the particles and 2 for the others, or "
                              "remove the column for a seeded random split")
    parts = []
    n = summary.get("images_checked", 0)
    if summary.get("images_nonfinite"):
        row, stack, index = summary["first_nonfinite"]
        parts.append(f"image {index + 1} contains NaN or infinite pixels (stack {stack}, particle {row + 1}, "
                     f"{summary['images_nonfinite']} of {n} particle images in all)")
    if summary.get("images_constant"):
        row, stack, index, level = summary["first_constant"]
        parts.append(f"image {index + 1} is constant, every pixel {level:g} (stack {stack}, particle {row + 1}, "
                     f"{summary['images_constant']} of {n} particle images in all)")
    if summary.get("images_huge"):
        row, stack, index = summary["first_huge"]
        parts.append(f"image {index + 1} has pixel values beyond 1e15 (stack {stack}, particle {row + 1}, "
                     f"{summary['images_huge']} of {n} particle images in all: not normalised)")
    if parts:
        why = " (constant images are not particle images)" if summary.get("images_constant") else ""
        return InputFileError(" and ".join(parts), path,
                              f"re-extract the particles, or remove those rows from the particle file{why}")
    return None


def readiness(particles: ParticleSet, summary: dict[str, Any]) -> list[str]:
    """Why ``numba-recon run`` with its default options would still refuse these particles ([] when
    nothing found): too few particles, or rows that repeat an earlier row's image."""
    from numba_recon.read import duplicate_images

    reasons = []
    if summary["n_particles"] < MIN_PARTICLES:
        reasons.append(f"only {summary['n_particles']} particles (a reconstruction needs at least {MIN_PARTICLES}, "
                       "2 per half set)")
    repeated = duplicate_images(particles)
    if repeated.size:
        reasons.append(f"{repeated.size} particle row(s) repeat the image of an earlier row (numba-recon run "
                       "refuses them unless given --drop-duplicates)")
    if summary.get("images_copied"):
        copy, original = summary["first_copied"]
        reasons.append(f"{summary['images_copied']} particle image(s) are pixel-for-pixel copies of another row's "
                       f"image (particle {copy + 1} copies particle {original + 1}; numba-recon run refuses them "
                       "unless given --drop-duplicates)")
    return reasons


def mrc_summary(path: Path) -> dict[str, Any]:
    """Shape, voxel size, kind and value statistics of an MRC file (data read in chunks).

    Raises :class:`InputFileError` for a missing, corrupt or truncated file, or one containing
    NaN or infinite values.
    """
    import warnings

    import mrcfile

    from numba_recon.io.mrc import mrc_header

    header = mrc_header(path)
    nz, ny, nx = header.nz, header.ny, header.nx
    suffix = path.suffix.lower()
    if nz == 1:
        kind = "image"
    elif nz == ny == nx and suffix != ".mrcs":
        kind = "volume"  # whatever ispg says: cryoSPARC writes maps with ispg 0
    else:
        kind = "stack"
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
            data = mrc.data.reshape(nz, ny, nx)  # a view: 2D images and volume stacks alike
            chunk = max(1, (1 << 22) // max(1, ny * nx))  # about 4 M values per chunk
            for start in range(0, nz, chunk):
                block = np.asarray(data[start:start + chunk], dtype=np.float64)
                finite = np.isfinite(block)
                if not finite.all():
                    bad = int(np.flatnonzero(~finite.reshape(len(block), -1).all(axis=1))[0]) + start
                    where = f"image {bad + 1}" if kind != "volume" else f"section z={bad}"
                    raise InputFileError(f"{where} contains NaN or infinite values", path,
                                         "regenerate the file or remove the bad images")
                # Chan et al. pairwise update of mean and sum of squared deviations
                n_b = block.size
                mean_b = float(block.mean())
                m2_b = float(((block - mean_b) ** 2).sum())
                delta = mean_b - mean
                total = count + n_b
                mean += delta * n_b / total
                m2 += m2_b + delta * delta * count * n_b / total
                count = total
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return {
        "file": os.fspath(path),
        "format": "mrc",
        "kind": kind,
        "shape": [nz, ny, nx],
        "dtype": header.dtype.name,
        "ispg": header.ispg,
        "voxel_size_angstrom": header.voxel_size_angstrom[0],
        "min": lo,
        "max": hi,
        "mean": mean,
        "std": float(np.sqrt(m2 / count)),
    }


def _format_particles(s: dict[str, Any]) -> list[tuple[str, str]]:
    kinds = {"star": f"RELION STAR, version {s.get('star_version')}", "thu": "THUNDER .thu"}
    kind = kinds.get(s["format"], s["format"])
    halves = s["half_sets"]
    half_text = f"1: {halves['1']}, 2: {halves['2']}"
    if halves["0"]:
        half_text = f"none in the file ({halves['0']} particles; split at run time)"
    elif s.get("half_split") and s["half_split"].get("method") != "rlnRandomSubset":
        half_text += f" (seeded random split, seed {s['half_split'].get('seed')})"
    classes = "none" if s["classes"] is None else ", ".join(f"{k}: {v}" for k, v in s["classes"].items())
    groups = ", ".join(f"{k}: {v}" for k, v in s["optics_groups"].items())
    premultiplied = s["n_ctf_premultiplied"]
    rows = [
        ("file", f"{s['file']} ({kind})"),
        ("particles", str(s["n_particles"])),
        ("optics groups", f"{s['n_optics_groups']} ({groups})"),
        ("pixel size", f"{s['pixel_size_angstrom']:g} A (from {s['pixel_size_source']})"),
        ("box size", f"{s['box_size']} px"),
        ("defocus range", f"{s['defocus_min_angstrom']:.1f} - {s['defocus_max_angstrom']:.1f} A"),
        ("voltage", ", ".join(f"{v:g} kV" for v in s["voltage_kv"])),
        ("half sets", half_text),
        ("classes", classes),
        ("CTF premultiplied", "no" if premultiplied == 0 else
         ("yes" if premultiplied == s["n_particles"] else f"{premultiplied} of {s['n_particles']} particles")),
        ("stack files", str(s["n_stack_files"])),
    ]
    if s["pixels_checked"]:
        rows.append(("images checked", f"{s['images_checked']}, all finite, none constant, none beyond 1e15"))
    if s["not_ready_because"]:
        verdict = "not ready: " + "; ".join(s["not_ready_because"])
        if not s["pixels_checked"]:
            verdict += "; pixels not checked (add --check-pixels)"
    elif s["pixels_checked"]:
        verdict = "ready (metadata, stack headers and the pixels of every image checked)"
    else:
        verdict = "ready as far as the metadata and stack headers go; pixels not checked (add --check-pixels)"
    rows.append(("reconstruction", verdict))
    return rows


def _format_mrc(s: dict[str, Any]) -> list[tuple[str, str]]:
    nz, ny, nx = s["shape"]
    return [
        ("file", f"{s['file']} (MRC {s['kind']}, {s['dtype']}, ispg {s['ispg']})"),
        ("shape", f"{nz} x {ny} x {nx} ([z or image, y, x])"),
        ("voxel size", f"{s['voxel_size_angstrom']:g} A"),
        ("min / max", f"{s['min']:.6g} / {s['max']:.6g}"),
        ("mean / std", f"{s['mean']:.6g} / {s['std']:.6g}"),
    ]


@click.command(name="info")
@click.argument("file", type=click.Path(dir_okay=True, path_type=Path))
@angpix_option
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Folder the image paths of a STAR/.thu file are relative to (default: the file's folder).")
@click.option("--check-pixels", "--check-images", "check_pixels", is_flag=True,
              help="Also read every particle image, stack by stack with bounded memory, and count images with "
                   "NaN or infinite pixels and constant images (every pixel equal); either stops a "
                   "reconstruction, so any found gives exit status 2. Off by default because it reads all the "
                   "image data (hundreds of GB for large data sets) where the other checks read only the "
                   "particle file and the stack headers.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def info(file: Path, angpix: float | None, root: Path | None, check_pixels: bool, as_json: bool) -> None:
    """Summarise a STAR, .thu or MRC file.

    For particle files (RELION .star, THUNDER .thu): particle count, optics groups, pixel size,
    box size, defocus range, half-set sizes, classes, CTF-premultiplied flag and number of stack
    files. Every index@stack entry is checked against the stack headers. Problems that stop any
    reconstruction (a box too small to reconstruct; all particles in one rlnRandomSubset half
    set; with --check-pixels, images with NaN or infinite pixels or constant images) give one
    error line and exit status 2. Otherwise the last line, "reconstruction", says "ready", or
    "not ready" with the reasons numba-recon run would refuse the file (fewer than 4 particles,
    repeated images), and what was checked: without --check-pixels the pixel values are not
    read. For MRC files (.mrc, .mrcs, .map): shape, voxel size, whether it is a stack or a
    volume, and min/max/mean/std of the values.

    Examples:

      numba-recon info Refine3D/job010/run_data.star --root .

      numba-recon info particles.thu --angpix 1.06 --json

      numba-recon info run_half1_class001_unfil.mrc
    """
    from numba_recon.io.mrc import non_regular_kind

    kind = non_regular_kind(file)
    if kind is not None and kind != "folder":  # folders get each reader's own message
        # never opened: reading a named pipe waits for a writer, a device such as /dev/zero never ends
        raise InputFileError(f"is a {kind}, not a regular file", file,
                             "give the path of a .star, .thu or MRC file")
    suffix = file.suffix.lower()
    if suffix in (".star", ".thu"):
        from numba_recon.read import read_particles

        particles = read_particles(file, angpix=angpix, root=root)
        summary = particle_summary(particles)
        problem = blocking_problem(particles, summary)  # the metadata first: no point reading pixels then
        if problem is None and check_pixels:
            summary.update(check_particle_pixels(particles))
            problem = blocking_problem(particles, summary)
            for key in ("first_nonfinite", "first_constant", "first_huge"):  # None when nothing is found
                del summary[key]
        if problem is not None:
            raise problem
        summary["pixels_checked"] = check_pixels
        summary["not_ready_because"] = readiness(particles, summary)
        summary["ready_for_reconstruction"] = not summary["not_ready_because"]
        rows = _format_particles(summary)
    elif suffix in MRC_SUFFIXES:
        if not file.exists():
            raise InputFileError("file not found", file, "check the path")
        summary = mrc_summary(file)
        rows = _format_mrc(summary)
    else:
        raise InputFileError(f"unknown file type {file.suffix or '(no extension)'!r}", file,
                             "give a .star, .thu, .mrc, .mrcs or .map file")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key + ':':<{width + 1}} {value}")
