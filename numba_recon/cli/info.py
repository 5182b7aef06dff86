"""``numba-recon info``: summarise a particle file (STAR, .thu) or an MRC map or stack."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import numpy as np

from numba_recon.cli._common import angpix_option, handle_errors
from numba_recon.errors import InputFileError
from numba_recon.particles import ParticleSet

MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec", ".st")
_CHECK_BATCH = 256  # images per read when checking every image


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


def check_particle_images(particles: ParticleSet) -> int:
    """Read every particle image once (stack by stack) and check it is finite; return the count.

    Raises :class:`InputFileError` naming the stack and the 1-based image index of the first
    image with NaN or infinite pixels.
    """
    from numba_recon.io.mrc import StackReader, factorize_paths

    codes, _ = factorize_paths(particles.stack_paths)
    order = np.lexsort((particles.stack_indices, codes))
    with StackReader() as reader:
        for start in range(0, len(order), _CHECK_BATCH):
            index = order[start:start + _CHECK_BATCH]
            reader.read(particles.stack_paths[index], particles.stack_indices[index], particles.box_size)
    return len(order)


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
    if "images_checked" in s:
        rows.append(("images checked", f"{s['images_checked']}, all finite"))
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
@click.option("--check-images", is_flag=True,
              help="Also read every particle image and check it for NaN or infinite pixels (reads all image data).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def info(file: Path, angpix: float | None, root: Path | None, check_images: bool, as_json: bool) -> None:
    """Summarise a STAR, .thu or MRC file.

    For particle files (RELION .star, THUNDER .thu): particle count, optics groups, pixel size,
    box size, defocus range, half-set sizes, classes, CTF-premultiplied flag and number of stack
    files. Every index@stack entry is checked against the stack headers, so a clean report means
    the file is ready for reconstruction. For MRC files (.mrc, .mrcs, .map): shape, voxel size,
    whether it is a stack or a volume, and min/max/mean/std of the values.

    Examples:

      numba-recon info Refine3D/job010/run_data.star --root .

      numba-recon info particles.thu --angpix 1.06 --json

      numba-recon info run_half1_class001_unfil.mrc
    """
    suffix = file.suffix.lower()
    if suffix in (".star", ".thu"):
        from numba_recon.read import read_particles

        particles = read_particles(file, angpix=angpix, root=root)
        summary = particle_summary(particles)
        if check_images:
            summary["images_checked"] = check_particle_images(particles)
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
