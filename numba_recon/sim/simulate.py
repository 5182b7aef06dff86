"""Simulated particle data sets with known truth (``numba-recon simulate``).

Forward model of particle ``i`` (RELION's, ``docs/simulation.md``)::

    b_i = shift_by(-o_i)( CTF_i * P_{A_i} x ) / sigma + n_i,   n_i ~ N(0, 1) white

``P_{A_i} x`` is the analytic projection of the blob phantom (:func:`phantom.project_blobs`) or
a padded Fourier-slice projection of a user map (:class:`phantom.FourierProjector`), never the
reconstruction's voxel-splat operator. The CTF (RELION's, positive at low frequency) and the
sub-pixel shift are applied together in Fourier space. ``o_i`` is the RELION origin written to
the STAR file: the shift that re-centres the particle. ``sigma`` is chosen so that the mean
signal variance over the images that contain an object, divided by the noise variance, is the
requested SNR; the images are divided by it, so their noise has unit variance.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from numba_recon.checks import finite_above
from numba_recon import __version__, manifest
from numba_recon.ctf import ctf_images
from numba_recon.errors import InputError, OutputError
from numba_recon.geometry import euler_to_matrix, matrix_to_euler, random_rotations
from numba_recon.io.files import make_output_folder, refuse_output_folder
from numba_recon.sim.phantom import (
    Blobs,
    FourierProjector,
    fit_scales,
    fit_to_box,
    project_blobs,
    proteasome_blobs,
    random_blob_object,
    render_volume,
)

logger = logging.getLogger(__name__)

#: Junk kinds, in the order they share the junk when several are requested.
JUNK_KINDS = ("noise", "wrong_pose", "other_object")
_KIND_CODES = {"none": 0, "noise": 1, "wrong_pose": 2, "other_object": 3}
_CODE_NAMES = {v: k for k, v in _KIND_CODES.items()}

STAR_NAME = "particles.star"
STACK_DIR = "Particles"
TRUTH_NAME = "truth.mrc"
JUNK_NAME = "junk.csv"
SUMMARY_NAME = "simulation.json"
#: Prefix of the hidden staging folder the data set is written into before it is moved into place
#: (one per invocation, with its own output manifest, so a killed simulate's leftovers are provably ours).
_TMP_NAME = ".simulate-partial"
_STAGING_COMMAND = "simulate-staging"
#: Key of ``simulation.json`` that holds the output manifest of the data set (the files
#: ``simulate`` wrote, with size and modification time): what a later ``--overwrite`` may remove.
MANIFEST_KEY = "manifest"


def apply_ctf_and_shift(projections: np.ndarray, shifts_px: np.ndarray | None, ctf_params: dict | None,
                        pixel_size_angstrom: float) -> np.ndarray:
    """``shift_by(-origin)(CTF * projection)``, both applied in Fourier space.

    Parameters
    ----------
    projections
        ``(b, N, N)`` clean projections ``[n, y, x]``.
    shifts_px
        ``(b, 2)`` RELION origins ``(origin_x, origin_y)`` in pixels, or None for no shift. The
        particle is moved by ``-origin`` (multiplying ``F(k)`` by ``exp(+2 pi i k.o / N)``), so
        that ``T^{-1}`` (moving by ``+origin``) re-centres it.
    ctf_params
        CTF parameters with ``(b,)`` arrays (keys of :func:`numba_recon.ctf.ctf_images`), or None
        for no CTF.
    pixel_size_angstrom
        Pixel size (sets the CTF's frequencies).

    Returns
    -------
    numpy.ndarray
        ``(b, N, N)`` float64 images.
    """
    proj = np.asarray(projections, dtype=np.float64)
    b, n = proj.shape[0], proj.shape[-1]
    ft = np.fft.rfft2(proj)
    if ctf_params is not None:
        ft *= ctf_images(ctf_params, n, pixel_size_angstrom, half=True, dtype=np.float64)
    if shifts_px is not None:
        o = np.asarray(shifts_px, dtype=np.float64).reshape(b, 2)
        kx = np.fft.rfftfreq(n)[None, None, :]
        ky = np.fft.fftfreq(n)[None, :, None]
        ft *= np.exp(2j * np.pi * (kx * o[:, 0, None, None] + ky * o[:, 1, None, None]))
    return np.fft.irfft2(ft, s=(n, n))


def random_shifts_px(n: int, max_shift_px: float, rng: np.random.Generator) -> np.ndarray:
    """``(n, 2)`` sub-pixel shifts uniform in the disc of radius ``max_shift_px``."""
    r = max_shift_px * np.sqrt(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


@dataclass
class SimulationPlan:
    """Everything drawn at random for a data set, one row per particle.

    Attributes
    ----------
    rotations
        ``(n, 3, 3)`` the RELION matrices written to the STAR file (from the written angles).
    angles_deg
        ``(n, 3)`` rot, tilt, psi written to the STAR file.
    true_rotations
        ``(n, 3, 3)`` the matrices the images were projected with (differ for ``wrong_pose``).
    shifts_px
        ``(n, 2)`` RELION origins in pixels.
    ctf
        CTF parameters, ``(n,)`` arrays with the keys of :data:`numba_recon.particles.CTF_KEYS`.
    half_set
        ``(n,)`` int8, 1 or 2.
    junk_code
        ``(n,)`` int8: 0 good, 1 noise, 2 wrong_pose, 3 other_object.
    """

    rotations: np.ndarray
    angles_deg: np.ndarray
    true_rotations: np.ndarray
    shifts_px: np.ndarray
    ctf: dict[str, np.ndarray]
    half_set: np.ndarray
    junk_code: np.ndarray

    def __len__(self) -> int:
        return int(self.half_set.shape[0])

    def ctf_subset(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.ctf.items()}


def draw_plan(n_particles: int, *, rng: np.random.Generator, defocus_min_um: float, defocus_max_um: float,
              astigmatism_angstrom: float, voltage_kv: float, cs_mm: float, amplitude_contrast: float,
              max_shift_px: float, junk_fraction: float = 0.0,
              junk_kinds: Sequence[str] = JUNK_KINDS) -> SimulationPlan:
    """Draw poses, shifts, CTFs, half sets and junk assignments (no images).

    Rotations are uniform on SO(3); defocus U is uniform in ``[min, max]`` um, ``V = U -
    astigmatism``, the angle uniform in ``[0, 180)`` degrees; half sets are a balanced random
    split; ``round(junk_fraction * n)`` particles (at most ``n - 1``) are junk, the kinds sharing
    them evenly.
    """
    n = int(n_particles)
    written = random_rotations(n, rng)
    angles = matrix_to_euler(written).reshape(n, 3)
    # project with the matrix of the angles as written, so file and images agree exactly
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).reshape(n, 3, 3)
    shifts = random_shifts_px(n, max_shift_px, rng)
    du = rng.uniform(defocus_min_um, defocus_max_um, n) * 1e4
    ctf = {
        "defocus_u_angstrom": du,
        "defocus_v_angstrom": du - astigmatism_angstrom,
        "defocus_angle_deg": rng.uniform(0.0, 180.0, n),
        "voltage_kv": np.full(n, float(voltage_kv)),
        "cs_mm": np.full(n, float(cs_mm)),
        "amplitude_contrast": np.full(n, float(amplitude_contrast)),
        "phase_shift_deg": np.zeros(n),
        "bfactor_angstrom2": np.zeros(n),
        "scale": np.ones(n),
    }
    half = np.full(n, 2, dtype=np.int8)
    half[rng.permutation(n)[: (n + 1) // 2]] = 1
    junk = np.zeros(n, dtype=np.int8)
    n_junk = min(int(np.floor(junk_fraction * n + 0.5)), n - 1)
    kinds = [k for k in JUNK_KINDS if k in set(junk_kinds)]
    if n_junk > 0 and kinds:
        chosen = rng.choice(n, size=n_junk, replace=False)
        for kind, idx in zip(kinds, np.array_split(chosen, len(kinds))):
            junk[idx] = _KIND_CODES[kind]
    true_rot = rotations.copy()
    wrong = np.flatnonzero(junk == _KIND_CODES["wrong_pose"])
    if wrong.size:
        true_rot[wrong] = random_rotations(wrong.size, rng)
    return SimulationPlan(rotations, angles, true_rot, shifts, ctf, half, junk)


ProjectFn = Callable[[np.ndarray], np.ndarray]


def clean_images(plan: SimulationPlan, index: np.ndarray, project_object: ProjectFn, project_other: ProjectFn,
                 box_size: int, pixel_size_angstrom: float, other_scale: float = 1.0) -> np.ndarray:
    """Noise-free images ``shift_by(-o)(CTF * P x)`` of the particles ``index`` (before ``1/sigma``).

    ``project_object`` / ``project_other`` map ``(b, 3, 3)`` rotations to ``(b, N, N)``
    projections of the particle and of the "other object" junk; noise junk is zero.
    Returns ``(b, N, N)`` float64.
    """
    index = np.asarray(index, dtype=np.int64)
    code = plan.junk_code[index]
    rot = plan.true_rotations[index]
    proj = np.zeros((index.size, box_size, box_size))
    for sel, fn, scale in ((code == 0) | (code == 2), project_object, 1.0), (code == 3, project_other, other_scale):
        if np.any(sel):
            proj[sel] = fn(rot[sel]) * scale
    if not np.any(code != 1):  # only noise junk here: the images are empty
        return proj
    return apply_ctf_and_shift(proj, plan.shifts_px[index], plan.ctf_subset(index), pixel_size_angstrom)


def _validate(n_particles, box_size, pixel_size_angstrom, snr, defocus_min_um, defocus_max_um, astigmatism_angstrom,
              voltage_kv, cs_mm, amplitude_contrast, max_shift_px, junk_fraction, junk_kinds, particles_per_stack,
              seed):
    def bad(option: str, problem: str, fix: str) -> InputError:
        return InputError(f"{option} {problem}", fix=fix)

    if not float(n_particles).is_integer() or n_particles < 1:
        raise bad("--n-particles", f"must be a positive integer (got {n_particles})", "use e.g. --n-particles 5000")
    if box_size is not None and (not float(box_size).is_integer() or box_size < 8):
        raise bad("--box-size", f"must be an integer >= 8 (got {box_size})", "use e.g. --box-size 64")
    if pixel_size_angstrom is not None and not finite_above(pixel_size_angstrom):
        raise bad("--angpix", f"must be a finite positive number (got {pixel_size_angstrom})",
                  "give the pixel size in Angstrom")
    if not finite_above(snr):
        raise bad("--snr", f"must be a finite positive number (got {snr})", "use e.g. --snr 0.1")
    if not finite_above(defocus_min_um):
        raise bad("--defocus-min", f"must be a finite positive number (got {defocus_min_um} um)",
                  "use e.g. --defocus-min 1.0")
    if not (np.isfinite(defocus_max_um) and defocus_max_um >= defocus_min_um):
        raise bad("--defocus-max",
                  f"({defocus_max_um} um) must be finite and not below --defocus-min ({defocus_min_um} um)",
                  "swap or correct the two values")
    if not (np.isfinite(astigmatism_angstrom) and 0 <= astigmatism_angstrom < defocus_min_um * 1e4):
        raise bad("--astigmatism",
                  f"must be finite, >= 0 and below the smallest defocus (got {astigmatism_angstrom} A)",
                  "use e.g. --astigmatism 200")
    if not finite_above(voltage_kv):
        raise bad("--voltage", f"must be a finite positive number (got {voltage_kv} kV)", "use e.g. --voltage 300")
    if not (np.isfinite(cs_mm) and cs_mm >= 0):
        raise bad("--cs", f"must be a finite number >= 0 (got {cs_mm} mm)", "use e.g. --cs 2.7")
    if not (np.isfinite(amplitude_contrast) and 0 <= amplitude_contrast < 1):
        raise bad("--amplitude-contrast", f"must be in [0, 1) (got {amplitude_contrast})", "use e.g. 0.1")
    if not (np.isfinite(max_shift_px) and max_shift_px >= 0):
        raise bad("--max-shift", f"must be a finite number >= 0 (got {max_shift_px} px)", "use e.g. --max-shift 3")
    if box_size is not None and max_shift_px > box_size / 4:
        raise bad("--max-shift", f"({max_shift_px} px) must not exceed a quarter of the box ({box_size} px)",
                  "use a smaller shift or a larger box")
    if not (np.isfinite(junk_fraction) and 0 <= junk_fraction < 1):
        raise bad("--junk-fraction", f"must be in [0, 1) (got {junk_fraction})", "use e.g. --junk-fraction 0.2")
    unknown = sorted(set(junk_kinds) - set(JUNK_KINDS))
    if unknown:
        raise bad("--junk-kind", f"has unknown kinds {unknown}", f"choose from {', '.join(JUNK_KINDS)}")
    if not float(seed).is_integer() or seed < 0:
        raise bad("--seed", f"must be a non-negative integer (got {seed})", "use e.g. --seed 0")
    if not float(particles_per_stack).is_integer() or particles_per_stack < 1:
        raise bad("--particles-per-stack", f"must be a positive integer (got {particles_per_stack})",
                  "use e.g. --particles-per-stack 1000")


def _read_user_volume(volume_path, box_size, pixel_size_angstrom) -> tuple[np.ndarray, int, float]:
    from numba_recon.io.mrc import read_volume

    path = Path(volume_path)
    volume, voxel_size = read_volume(path)  # a finite cubic float32 map, or InputFileError
    n = int(volume.shape[0])
    if n < 8:
        raise InputError(f"the map is {n} px, smaller than the minimum box of 8 px", path, "use a larger map")
    if box_size is not None and int(box_size) != n:
        raise InputError(f"the map is {n} px but --box-size is {box_size}", path,
                         "omit --box-size (the map's size is used) or resample the map")
    header = float(voxel_size) if voxel_size is not None else 0.0
    if pixel_size_angstrom is None:
        if not header > 0:
            raise InputError("the map header has no voxel size", path, "pass --angpix")
        pixel_size_angstrom = header
    elif header > 0 and abs(header - pixel_size_angstrom) > 1e-3 * pixel_size_angstrom:
        logger.warning("%s: header voxel size %.4f A differs from --angpix %.4f A; using --angpix",
                       path, header, pixel_size_angstrom)
    return volume, n, float(pixel_size_angstrom)


def _check_out_dir(out_dir: Path, overwrite: bool, n_stacks: int | None = None) -> None:
    """Refuse an output path that is a file, a non-empty folder without ``overwrite``, and with
    ``overwrite`` files this data set would replace (``n_stacks`` stacks and the fixed names) that
    no earlier ``simulate`` provably wrote."""
    refuse_output_folder(out_dir, overwrite)
    if overwrite and out_dir.is_dir() and n_stacks is not None:
        previous = _previous_manifest(out_dir)
        probe = previous if previous is not None else manifest.Manifest(out_dir, "simulate", store_name=None)
        names = [_stack_name(k) for k in range(n_stacks)] + [STAR_NAME, TRUTH_NAME, JUNK_NAME, SUMMARY_NAME]
        # an earlier simulate's simulation.json holds its manifest: it is ours when the manifest is usable
        ignored = [SUMMARY_NAME] if previous is not None else []
        manifest.refuse_foreign_outputs(probe, (STACK_DIR,), names, extra_ignored=ignored)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    _check_out_dir(out_dir, overwrite)
    make_output_folder(out_dir)


def _stack_name(k: int) -> str:
    return f"{STACK_DIR}/stack_{k + 1:04d}.mrcs"


def _particle_set(plan: SimulationPlan, image_names: list[str], stack_numbers: np.ndarray, stack_paths: list[str],
                  stack_indices: np.ndarray, box_size: int, pixel_size_angstrom: float, voltage_kv: float,
                  cs_mm: float, amplitude_contrast: float, star_path: Path):
    from numba_recon.particles import ParticleSet

    n = len(plan)
    # one notional micrograph per stack (RELION groups by it; no such file is needed)
    micrographs = [f"Micrographs/simulated_{k + 1:04d}.mrc" for k in stack_numbers]
    table = pd.DataFrame({
        "rlnImageName": image_names,
        "rlnMicrographName": micrographs,
        "rlnAngleRot": plan.angles_deg[:, 0],
        "rlnAngleTilt": plan.angles_deg[:, 1],
        "rlnAnglePsi": plan.angles_deg[:, 2],
        "rlnOriginXAngst": plan.shifts_px[:, 0] * pixel_size_angstrom,
        "rlnOriginYAngst": plan.shifts_px[:, 1] * pixel_size_angstrom,
        "rlnDefocusU": plan.ctf["defocus_u_angstrom"],
        "rlnDefocusV": plan.ctf["defocus_v_angstrom"],
        "rlnDefocusAngle": plan.ctf["defocus_angle_deg"],
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnRandomSubset": plan.half_set.astype(np.int64),
        "rlnClassNumber": np.ones(n, dtype=np.int64),
    })
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [float(amplitude_contrast)],
        "rlnSphericalAberration": [float(cs_mm)],
        "rlnVoltage": [float(voltage_kv)],
        "rlnImagePixelSize": [float(pixel_size_angstrom)],
        "rlnImageSize": [int(box_size)],
        "rlnImageDimensionality": [2],
    })
    return ParticleSet(
        table=table,
        stack_paths=np.asarray(stack_paths, dtype=object),
        stack_indices=np.asarray(stack_indices, dtype=np.int64),
        rotations=plan.rotations,
        shifts_px=plan.shifts_px,
        ctf={k: np.asarray(v, dtype=np.float64) for k, v in plan.ctf.items()},
        pixel_size_angstrom=float(pixel_size_angstrom),
        box_size=int(box_size),
        half_set=plan.half_set.astype(np.int8),
        optics_group=np.ones(n, dtype=np.int64),
        optics=optics,
        class_number=np.ones(n, dtype=np.int64),
        source=star_path,
    )


def _junk_table(plan: SimulationPlan, image_names: list[str]) -> pd.DataFrame:
    true_angles = matrix_to_euler(plan.true_rotations).reshape(-1, 3)
    noise = plan.junk_code == _KIND_CODES["noise"]
    true_angles[noise] = np.nan  # a noise image has no pose
    return pd.DataFrame({
        "row_index": np.arange(len(plan)),
        "image_name": image_names,
        "is_junk": (plan.junk_code != 0).astype(np.int64),
        "junk_kind": [_CODE_NAMES[int(c)] for c in plan.junk_code],
        "true_rot": true_angles[:, 0],
        "true_tilt": true_angles[:, 1],
        "true_psi": true_angles[:, 2],
    })


def _chunk_size(box_size: int) -> int:
    # about 32 MiB of float64 images per chunk; the projectors run in parallel over a chunk
    return int(max(1, min(512, (32 << 20) // (8 * box_size * box_size))))


def _chunks(n: int, particles_per_stack: int, chunk: int):
    """(stack number, start, stop) of the image chunks, never crossing a stack boundary."""
    for k, start in enumerate(range(0, n, particles_per_stack)):
        stop = min(n, start + particles_per_stack)
        for a in range(start, stop, chunk):
            yield k, a, min(stop, a + chunk)


def simulate_dataset(
    out_dir: str | os.PathLike,
    *,
    n_particles: int = 5000,
    box_size: int | None = None,
    pixel_size_angstrom: float | None = None,
    snr: float = 0.1,
    defocus_min_um: float = 1.0,
    defocus_max_um: float = 2.5,
    astigmatism_angstrom: float = 200.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    max_shift_px: float = 3.0,
    junk_fraction: float = 0.0,
    junk_kinds: Sequence[str] | None = None,
    volume_path: str | os.PathLike | None = None,
    seed: int = 0,
    particles_per_stack: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Simulate a particle data set with known poses, CTFs and truth, written as RELION files.

    Parameters
    ----------
    out_dir
        Output folder; must be empty or absent unless ``overwrite``.
    n_particles
        Number of particle images.
    box_size
        Image size ``N`` (default 64, or the size of ``volume_path``).
    pixel_size_angstrom
        Pixel size (default 2.0, or the voxel size of ``volume_path``).
    snr
        Mean signal variance over the images that contain an object divided by the noise
        variance (signal: the clean, CTF-modulated, shifted image over the whole box).
    defocus_min_um, defocus_max_um
        Range of defocus U in micrometres (uniform).
    astigmatism_angstrom
        ``DefocusU - DefocusV``.
    voltage_kv, cs_mm, amplitude_contrast
        Optics.
    max_shift_px
        Radius of the disc the origins are drawn from, pixels.
    junk_fraction
        Fraction of junk particles, in ``[0, 1)``.
    junk_kinds
        Subset of :data:`JUNK_KINDS` sharing the junk evenly (default: all three).
    volume_path
        An MRC map to project instead of the built-in phantom (padded Fourier slicing).
    seed
        Seeds everything (>= 0); the same seed gives identical images (the MRC header label
        alone carries the write time).
    particles_per_stack
        Images per ``Particles/stack_KKKK.mrcs``.
    overwrite
        Replace the results of an earlier run in ``out_dir``: the files its manifest (in
        ``simulation.json``) lists and that are unchanged are removed, the new files replace those
        of the same name; anything else stays (``docs/outputs-and-overwrite.md``).

    Returns
    -------
    dict
        Summary: paths, counts, ``noise_sigma``, ``measured_snr``, ``elapsed_s``.

    Raises
    ------
    InputError
        A bad value (one line naming the option and the fix).
    OutputError
        ``out_dir`` is not empty (without ``overwrite``) or not writable.
    """
    t0 = time.perf_counter()
    kinds = list(JUNK_KINDS) if not junk_kinds else [str(k) for k in junk_kinds]
    _validate(n_particles, box_size, pixel_size_angstrom, snr, defocus_min_um, defocus_max_um, astigmatism_angstrom,
              voltage_kv, cs_mm, amplitude_contrast, max_shift_px, junk_fraction, kinds, particles_per_stack, seed)
    n = int(n_particles)
    pps = int(particles_per_stack)
    out = Path(out_dir)

    if volume_path is not None:
        user_volume, box, pix = _read_user_volume(volume_path, box_size, pixel_size_angstrom)
    else:
        user_volume = None
        box = int(box_size) if box_size is not None else 64
        pix = float(pixel_size_angstrom) if pixel_size_angstrom is not None else 2.0
    _validate(n, box, pix, snr, defocus_min_um, defocus_max_um, astigmatism_angstrom, voltage_kv, cs_mm,
              amplitude_contrast, max_shift_px, junk_fraction, kinds, pps, seed)
    # fail before the work; the folder is made once the noise level is known
    _check_out_dir(out, overwrite, n_stacks=(n + pps - 1) // pps)

    seeds = np.random.SeedSequence(int(seed)).spawn(2)
    plan = draw_plan(n, rng=np.random.default_rng(seeds[0]), defocus_min_um=defocus_min_um,
                     defocus_max_um=defocus_max_um, astigmatism_angstrom=astigmatism_angstrom,
                     voltage_kv=voltage_kv, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast,
                     max_shift_px=max_shift_px, junk_fraction=junk_fraction, junk_kinds=kinds)

    other = random_blob_object(0)
    other = fit_to_box(other, box, pix)
    if user_volume is None:
        full = proteasome_blobs(0)
        centre_scale, sigma_scale = fit_scales(full, box, pix)
        blobs = fit_to_box(full, box, pix)
        phantom_info = {"kind": "proteasome_d7", "n_blobs": len(blobs), "centre_scale": centre_scale,
                        "sigma_scale": sigma_scale, "extent_angstrom": blobs.extent_angstrom()}

        def project_object(rot: np.ndarray) -> np.ndarray:
            return project_blobs(blobs, rot, box, pix)
    else:
        projector = FourierProjector(user_volume, oversample=2)
        phantom_info = {"kind": "user_volume", "path": str(Path(volume_path).resolve()),
                        "projector": "fourier_slice_pad2_trilinear"}
        project_object = projector.project

    def project_other(rot: np.ndarray) -> np.ndarray:
        return project_blobs(other, rot, box, pix)

    chunk = _chunk_size(box)
    codes = plan.junk_code
    # pass 1: signal variances (images are recomputed in pass 2, so memory stays bounded)
    var = np.zeros(n)
    for _, a, b in _chunks(n, pps, chunk):
        idx = np.arange(a, b)
        var[idx] = clean_images(plan, idx, project_object, project_other, box, pix).var(axis=(1, 2))
    phantom_images = (codes == 0) | (codes == 2)
    signal_var = float(var[phantom_images].mean())
    if not signal_var > 0:
        raise InputError("the object projects to empty images", volume_path,
                         "check that the map has density inside the box")
    other_sel = codes == 3
    other_scale = float(np.sqrt(signal_var / var[other_sel].mean())) if np.any(other_sel) else 1.0
    noise_sigma = float(np.sqrt(signal_var / snr))

    _prepare_out_dir(out, overwrite)
    _remove_staging_leftovers(out)
    tmp = out / f"{_TMP_NAME}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as err:
        raise OutputError(f"cannot create a folder in the output folder ({err.strerror})", out,
                          "choose a writable location") from None
    # every file written into the staging folder is recorded in its own manifest
    staging = manifest.activate(manifest.Manifest(tmp, _STAGING_COMMAND))
    staging.begin_recording("new")
    staging.save()
    try:
        (tmp / STACK_DIR).mkdir()
        summary = _write_outputs(
            out, tmp, plan, project_object, project_other, other_scale, noise_sigma, box, pix, pps, chunk,
            seeds[1], user_volume, blobs if user_volume is None else None, voltage_kv, cs_mm, amplitude_contrast)
        params = {
            "n_particles": n, "box_size": box, "pixel_size_angstrom": pix, "snr": float(snr),
            "defocus_min_um": float(defocus_min_um), "defocus_max_um": float(defocus_max_um),
            "astigmatism_angstrom": float(astigmatism_angstrom), "voltage_kv": float(voltage_kv),
            "cs_mm": float(cs_mm), "amplitude_contrast": float(amplitude_contrast),
            "max_shift_px": float(max_shift_px), "junk_fraction": float(junk_fraction), "junk_kinds": kinds,
            "volume_path": None if volume_path is None else str(volume_path), "seed": int(seed),
            "particles_per_stack": pps,
        }
        record = {
            "parameters": params,
            "seed": int(seed),
            "noise_sigma": noise_sigma,
            "signal_variance": signal_var,
            "requested_snr": float(snr),
            "measured_snr": summary["measured_snr"],
            "truth_scale": 1.0 / noise_sigma,
            "other_object_scale": other_scale,
            "phantom": phantom_info,
            "counts": {
                "particles": n,
                "half1": int(np.sum(plan.half_set == 1)),
                "half2": int(np.sum(plan.half_set == 2)),
                "junk": {k: int(np.sum(codes == _KIND_CODES[k])) for k in JUNK_KINDS},
                "stacks": summary["n_stacks"],
            },
            "snr_definition": ("mean over the images containing an object (all but noise junk) of the variance "
                               "over the whole box of the clean CTF-modulated shifted image, divided by the "
                               "white-noise variance; images are divided by noise_sigma (noise std 1)"),
            "forward_model": "b_i = shift_by(-origin_i)(CTF_i * P_{A_i} x) / noise_sigma + n_i",
            "versions": _versions(),
        }
        _commit(tmp, out, record, overwrite)
    except BaseException:
        manifest.deactivate(staging)
        _remove_staging(tmp, staging)
        raise
    manifest.deactivate(staging)
    _remove_staging(tmp, staging)
    elapsed = time.perf_counter() - t0
    result = {
        "out_dir": str(out),
        "star": str(out / STAR_NAME),
        "truth": str(out / TRUTH_NAME),
        "junk_table": str(out / JUNK_NAME),
        "summary_json": str(out / SUMMARY_NAME),
        "n_particles": n,
        "n_stacks": summary["n_stacks"],
        "box_size": box,
        "pixel_size_angstrom": pix,
        "noise_sigma": noise_sigma,
        "requested_snr": float(snr),
        "measured_snr": summary["measured_snr"],
        "junk": record["counts"]["junk"],
        "phantom": phantom_info["kind"],
        "elapsed_s": elapsed,
    }
    logger.info("simulated %d particles (box %d, %.3f A/px) in %.1f s into %s", n, box, pix, elapsed, out)
    return result


def _write_outputs(out: Path, tmp: Path, plan: SimulationPlan, project_object: ProjectFn, project_other: ProjectFn,
                   other_scale: float, noise_sigma: float, box: int, pix: float, pps: int, chunk: int,
                   noise_seed: np.random.SeedSequence, user_volume: np.ndarray | None, blobs: Blobs | None,
                   voltage_kv: float, cs_mm: float, amplitude_contrast: float) -> dict:
    from numba_recon.io.atomic import atomic_output
    from numba_recon.io.mrc import write_stack, write_volume
    from numba_recon.io.star import write_star

    n = len(plan)
    n_stacks = (n + pps - 1) // pps
    noise_rng = np.random.default_rng(noise_seed)
    object_images = (plan.junk_code == 0) | (plan.junk_code == 2)
    sig_sum = 0.0
    noise_sum = 0.0
    stack = None
    current = -1
    for k, a, b in _chunks(n, pps, chunk):
        if k != current:
            current = k
            stack = np.empty((min(n, (k + 1) * pps) - k * pps, box, box), dtype=np.float32)
        idx = np.arange(a, b)
        clean = clean_images(plan, idx, project_object, project_other, box, pix, other_scale) / noise_sigma
        noise = noise_rng.standard_normal(clean.shape)
        sig_sum += float(clean[object_images[idx]].var(axis=(1, 2)).sum())
        noise_sum += float(noise.var(axis=(1, 2)).sum())
        stack[a - k * pps:b - k * pps] = clean + noise
        if b == min(n, (k + 1) * pps):
            write_stack(tmp / _stack_name(k), stack, pix, overwrite=True)
            logger.info("wrote %s (%d/%d)", _stack_name(k), k + 1, n_stacks)
    n_obj = int(object_images.sum())
    measured_snr = (sig_sum / n_obj) / (noise_sum / n)

    stack_no = np.arange(n) // pps
    stack_idx = np.arange(n) - stack_no * pps
    image_names = [f"{j + 1:06d}@{_stack_name(k)}" for k, j in zip(stack_no, stack_idx)]
    # paths inside the temporary folder: write_star makes them relative to the STAR file's folder,
    # which stays valid once both are moved into out_dir
    stack_paths = [str(tmp / _stack_name(k)) for k in stack_no]
    particles = _particle_set(plan, image_names, stack_no, stack_paths, stack_idx, box, pix, voltage_kv, cs_mm,
                              amplitude_contrast, out / STAR_NAME)
    write_star(particles, tmp / STAR_NAME)
    truth = user_volume if user_volume is not None else render_volume(blobs, box, pix)
    write_volume(tmp / TRUTH_NAME, (np.asarray(truth, dtype=np.float64) / noise_sigma).astype(np.float32), pix,
                 overwrite=True)
    with atomic_output(tmp / JUNK_NAME) as path:
        _junk_table(plan, image_names).to_csv(path, index=False, float_format="%.6f")
    return {"n_stacks": n_stacks, "measured_snr": float(measured_snr)}


def _previous_manifest(out: Path) -> "manifest.Manifest | None":
    """The output manifest of an earlier ``simulate`` in ``out`` (kept in its ``simulation.json``)."""
    path = out / SUMMARY_NAME
    if manifest.signature(path) is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s is not readable JSON: nothing of the earlier data set is removed", path)
        return None
    if not isinstance(data, dict) or MANIFEST_KEY not in data:
        return None  # written before simulate kept a manifest: nothing can be proven ours
    try:
        return manifest.Manifest.from_dict(data[MANIFEST_KEY], out, "simulate", store_name=None)
    except (ValueError, TypeError, KeyError) as err:
        logger.warning("%s: the output manifest is not usable (%s); nothing of the earlier data set is removed",
                       path, err)
        return None


def _commit(tmp: Path, out: Path, record: dict, overwrite: bool) -> None:
    """Move the finished outputs from ``tmp`` into ``out``, replacing an earlier data set's files.

    With ``overwrite``, the files the earlier data set's manifest lists (in its ``simulation.json``)
    and that are unchanged since are removed first, then its folders that are empty; nothing else
    is removed (a stack of the user, or one the user replaced, stays, and a warning names it).
    ``simulation.json`` is moved in first: its manifest lists the files of the new data set (with
    the size and time they keep when renamed), so a kill during the moves leaves nothing of ours
    unlisted.
    """
    previous = _previous_manifest(out) if overwrite else None
    listing = manifest.Manifest(out, "simulate", store_name=None)
    if previous is not None:
        removed, changed = previous.remove_own()
        if removed:
            logger.info("--overwrite: removed %d file(s) of the earlier data set in %s", len(removed), out)
        listing.folders = {f for f in previous.folders if (out / f).is_dir()}
    listing.begin_recording("overwrite" if overwrite else "new")
    try:
        (out / STACK_DIR).mkdir(exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create folder ({err.strerror})", out / STACK_DIR,
                          "choose a writable location") from None
    moves = [(f, out / STACK_DIR / f.name) for f in sorted((tmp / STACK_DIR).iterdir())]
    moves += [(tmp / name, out / name) for name in (STAR_NAME, TRUTH_NAME, JUNK_NAME)]
    for src, dst in moves:
        listing.record(dst, manifest.signature(src), save=False)
    record[MANIFEST_KEY] = listing.to_dict()
    from numba_recon.io.atomic import atomic_output

    with atomic_output(tmp / SUMMARY_NAME) as path:
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp / SUMMARY_NAME, out / SUMMARY_NAME)
    for src, dst in moves:
        os.replace(src, dst)
    if overwrite:
        names = [f"{STACK_DIR}/{dst.name}" for _, dst in moves if dst.parent.name == STACK_DIR]
        names += [STAR_NAME, TRUTH_NAME, JUNK_NAME]
        manifest.warn_foreign(listing, (STACK_DIR,), names, extra_ignored=(SUMMARY_NAME, tmp.name))


def _remove_staging(tmp: Path, staging: "manifest.Manifest") -> None:
    """Remove a staging folder: the files its manifest lists (still unchanged), then the manifest
    and the folder. Anything else in it stays, named in a warning."""
    staging.remove_own()
    path = staging.path
    if path is not None:
        for name in (path, path.with_name(path.name + ".tmp")):
            try:
                name.unlink()
            except OSError:
                pass
    try:
        tmp.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
        logger.warning("%s: staging folder kept, it holds files simulate did not write: %s", tmp,
                       ", ".join(left[:12]) + (f" and {len(left) - 12} more" if len(left) > 12 else ""))


def _remove_staging_leftovers(out: Path) -> None:
    """Staging folders of earlier simulate runs that were killed: removed where their manifest
    proves the files ours."""
    try:
        entries = sorted(out.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(_TMP_NAME + "-") and entry.is_dir() and not entry.is_symlink():
            staging = manifest.Manifest.load(entry, _STAGING_COMMAND)
            if staging is not None:
                _remove_staging(entry, staging)


def _versions() -> dict[str, str]:
    import numba

    return {"numba_recon": __version__, "numpy": np.__version__, "numba": numba.__version__,
            "python": platform.python_version()}
