"""One short, prepared check of the CUDA kernels on a real GPU, written to one JSON file.

Run on a machine with a GPU (about 1-3 minutes, most of it kernel compilation)::

    python -m numba_recon.cuda.device_check --out device_check.json

It starts with a preamble (:func:`preamble`), printed and stored under ``preamble``: the NVIDIA
driver release and the CUDA version it supports, the CUDA toolkit numba-cuda compiles with (its
NVRTC version) and the cuda-bindings wheels in use, the device name and compute capability, and a
trivial kernel (add 1 to an array) whose result is checked. When any of that fails the check stops
with one line naming the problem and a hint, for example::

    device_check: the CUDA 13 toolchain needs driver >= 580; this node has 570.124.06 (CUDA 12.8):
    pip install 'numba-recon[cu12]'

(exit status 2, the JSON file holds the preamble). Otherwise it records, in order, writing the
JSON file after every section so that an interrupted run keeps what it measured:

1. ``device``: name, compute capability, driver/runtime and numba-cuda versions.
2. ``correctness`` (at ``--parity-box``, default 32): every launcher against a NumPy reference
   and against the CPU backend, dot tests of ``project``/``backproject`` and ``fourier_filter``,
   an exact gradient check of ``forward_residual`` + ``weighted_backproject`` (the loss is
   quadratic, so a central difference of step 1 is exact), and the centre-voxel test.
3. ``timing``: CUDA-event medians of ``--repeats`` calls after a warm-up of ``project``,
   ``backproject`` and the full loss and gradient (``forward_residual`` +
   ``weighted_backproject``, gradient zeroing included) at boxes 64 and 128 with batches 32,
   128 and 512, as images/s and voxel-updates/s.
4. ``atomics``: a float32 ``atomic.add`` microbenchmark (global distinct addresses, global with
   512 threads per address, shared memory without conflicts).
5. ``memory``: peak device memory in use.
6. ``target``: the best loss-and-gradient images/s at box 128 against the 30,000 images/s target.

The exit status is 0 when every correctness check passed, 1 when one failed, 2 for bad options or
when the preamble failed (no usable GPU, a driver too old for the toolkit, a kernel that does not run).
``--simulator-smoke`` runs all sections at a tiny box in Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``): it proves the script runs, its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

import numba_recon
from numba_recon import cuda as nc
from numba_recon.cuda._target import SIMULATOR, cuda, describe, is_available
from numba_recon.cuda.memory import fill
from numba_recon.geometry import random_rotations

#: Loss-and-gradient images/s wanted at box 128 on one H100.
TARGET_IMAGES_PER_S = 30_000
TARGET_BOX = 128
#: Relative tolerance of every float32 comparison and dot test.
TOLERANCE = 1e-4

ATOMIC_THREADS = 256


@cuda.jit
def _atomic_global_kernel(arr, n_addr, reps):
    """Each thread adds 1 to ``arr[tid % n_addr]`` ``reps`` times."""
    idx = cuda.grid(1) % n_addr
    one = np.float32(1.0)
    for _ in range(reps):
        cuda.atomic.add(arr, idx, one)


@cuda.jit
def _atomic_shared_kernel(out, reps):
    """Each thread adds 1 to its own shared-memory slot ``reps`` times (no bank conflicts)."""
    buf = cuda.shared.array(ATOMIC_THREADS, np.float32)
    t = cuda.threadIdx.x
    buf[t] = np.float32(0.0)
    cuda.syncthreads()
    one = np.float32(1.0)
    for _ in range(reps):
        cuda.atomic.add(buf, t, one)
    cuda.syncthreads()
    out[cuda.blockIdx.x * ATOMIC_THREADS + t] = buf[t]


@cuda.jit
def _add_one_kernel(arr):
    """``arr[i] += 1`` (the preamble's trivial kernel)."""
    i = cuda.grid(1)
    if i < arr.shape[0]:
        arr[i] += np.float32(1.0)


# ---------------------------------------------------------------------------------------------
# preamble: driver, toolkit, device and one trivial kernel

#: Lowest NVIDIA driver branch for each CUDA major version (CUDA minor version compatibility:
#: https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html).
DRIVER_FLOOR: dict[int, int] = {12: 525, 13: 580}
#: The numba-recon extra that installs each CUDA major version's wheels.
EXTRA_FOR_CUDA: dict[int, str] = {12: "cu12", 13: "cuda"}
#: Lowest compute capability each CUDA major version compiles for (numba-cuda installation notes).
MIN_CC_FOR_CUDA: dict[int, tuple[int, int]] = {12: (5, 0), 13: (7, 5)}
#: Elements of the trivial kernel's array.
PREAMBLE_N = 1000

_INSTALL = "pip install 'numba-recon[cuda]' (CUDA 13, driver >= 580) or 'numba-recon[cu12]' (CUDA 12, driver >= 525)"


def _pair(version: Any) -> tuple[int, int] | None:
    """``(major, minor)`` from a version tuple or string, None when there is none."""
    if version is None:
        return None
    if isinstance(version, str):
        m = re.match(r"\s*(\d+)\.(\d+)", version)
        return (int(m.group(1)), int(m.group(2))) if m else None
    try:
        major, minor = int(version[0]), int(version[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (major, minor) if major >= 0 and minor >= 0 else None


def _dotted(version: tuple[int, int] | None) -> str | None:
    return None if version is None else f"{version[0]}.{version[1]}"


def parse_driver_release(text: str) -> str | None:
    """The release in the text of ``/proc/driver/nvidia/version`` (proprietary or open kernel module)."""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def driver_release() -> tuple[str | None, str | None]:
    """The NVIDIA driver release (``"570.124.06"``) and where it was read, or ``(None, None)``.

    Reads ``/proc/driver/nvidia/version`` (Linux), else asks ``nvidia-smi``. Never raises.
    """
    try:
        found = parse_driver_release(Path("/proc/driver/nvidia/version").read_text(errors="replace"))
        if found:
            return found, "/proc/driver/nvidia/version"
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
            lines = proc.stdout.split()
            if proc.returncode == 0 and lines and re.fullmatch(r"\d+\.\d+(?:\.\d+)?", lines[0]):
                return lines[0], "nvidia-smi"
        except (OSError, subprocess.SubprocessError):
            pass
    return None, None


def diagnose(toolkit: tuple[int, int] | None, driver_cuda: tuple[int, int] | None,
             release: str | None = None, compute_capability: tuple[int, int] | None = None
             ) -> tuple[str, str] | None:
    """``(problem, hint)`` when the toolkit cannot run on this driver or device, else None.

    Parameters
    ----------
    toolkit
        ``(major, minor)`` of the CUDA toolkit numba-cuda compiles with (its NVRTC version).
    driver_cuda
        ``(major, minor)`` of the newest CUDA the driver supports (``cuDriverGetVersion``).
    release
        The driver release, e.g. ``"570.124.06"``, when known.
    compute_capability
        The device's ``(major, minor)``, when known.
    """
    if toolkit is None:
        return None
    major = toolkit[0]
    floor = DRIVER_FLOOR.get(major)
    branch = None
    if release:
        m = re.match(r"(\d+)", release)
        branch = int(m.group(1)) if m else None
    too_old = (driver_cuda is not None and driver_cuda[0] < major) or (
        floor is not None and branch is not None and branch < floor)
    if too_old:
        have = release or "an older driver"
        if driver_cuda is not None:
            have += f" (CUDA {_dotted(driver_cuda)})"
        needs = f"driver >= {floor}" if floor is not None else f"a driver for CUDA {major}"
        problem = f"the CUDA {major} toolchain needs {needs}; this node has {have}"
        fits = [m for m in sorted(DRIVER_FLOOR) if m < major and (
            (branch is not None and branch >= DRIVER_FLOOR[m])
            or (branch is None and driver_cuda is not None and driver_cuda[0] >= m))]
        if fits:
            hint = f"pip install 'numba-recon[{EXTRA_FOR_CUDA[fits[-1]]}]'"
        else:
            hint = f"upgrade the NVIDIA driver to >= {min(DRIVER_FLOOR.values())} (CUDA 12) or >= 580 (CUDA 13)"
        return problem, hint
    min_cc = MIN_CC_FOR_CUDA.get(major)
    if compute_capability is not None and min_cc is not None and tuple(compute_capability) < min_cc:
        cc = f"{compute_capability[0]}.{compute_capability[1]}"
        problem = f"CUDA {major} does not compile for compute capability {cc} (it needs >= {min_cc[0]}.{min_cc[1]})"
        older = [m for m in sorted(MIN_CC_FOR_CUDA) if tuple(compute_capability) >= MIN_CC_FOR_CUDA[m]]
        hint = (f"pip install 'numba-recon[{EXTRA_FOR_CUDA[older[-1]]}]'" if older
                else "this GPU is too old for numba-cuda; use --backend cpu")
        return problem, hint
    return None


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()).rstrip(" :")
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _versions_of(*packages: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def preamble() -> dict[str, Any]:
    """Driver, toolkit, device and a trivial kernel: the first facts of every GPU check.

    Never raises. Returns a dict with ``status`` (``"passed"`` or ``"failed"``),
    ``driver_version`` (the driver release, e.g. ``"570.124.06"``), ``driver_cuda_version`` (newest
    CUDA the driver supports), ``runtime_version`` (the CUDA toolkit numba-cuda compiles with: its
    NVRTC version), ``cuda_major``/``extra`` (which numba-recon extra those wheels belong to),
    package versions, ``device_name``, ``compute_capability``, ``kernel`` (the add-one launch and
    its check), and on failure ``problem`` and ``hint``. In the simulator every version reads
    ``"simulator"``.
    """
    info: dict[str, Any] = {
        "status": "failed", "simulator": SIMULATOR,
        "packages": _versions_of("numba-cuda", "cuda-bindings", "cuda-core", "nvidia-cuda-nvrtc",
                                 "nvidia-cuda-nvrtc-cu12"),
        "driver_version": None, "driver_version_source": None, "driver_cuda_version": None,
        "runtime_version": None, "cuda_major": None, "extra": None,
        "device_name": None, "compute_capability": None, "kernel": None, "problem": None, "hint": None,
    }

    def fail(problem: str, hint: str) -> dict[str, Any]:
        info["problem"], info["hint"] = problem, hint
        return info

    toolkit = driver_cuda = None
    if SIMULATOR:
        for key in ("driver_version", "driver_cuda_version", "runtime_version", "driver_version_source"):
            info[key] = "simulator"
    else:
        info["driver_version"], info["driver_version_source"] = driver_release()
        try:
            toolkit = _pair(cuda.runtime.get_version())
        except Exception as err:  # noqa: BLE001 - a missing toolkit is a finding, not a crash
            return fail(f"the CUDA toolkit libraries numba-cuda needs could not be loaded ({_first_line(err)})",
                        _INSTALL)
        info["runtime_version"] = _dotted(toolkit)
        if toolkit is not None:
            info["cuda_major"] = toolkit[0]
            info["extra"] = EXTRA_FOR_CUDA.get(toolkit[0])
        # the release alone (read without any CUDA library) already tells a too-old driver
        found = diagnose(toolkit, None, info["driver_version"])
        if found is not None:
            return fail(*found)
        try:
            driver_cuda = _pair(cuda.cudadrv.driver.driver.get_version())
        except Exception as err:  # noqa: BLE001
            return fail(f"the CUDA driver could not be initialised ({_first_line(err)})",
                        "check the NVIDIA driver with nvidia-smi")
        info["driver_cuda_version"] = _dotted(driver_cuda)
        found = diagnose(toolkit, driver_cuda, info["driver_version"])
        if found is not None:
            return fail(*found)

    if not is_available():
        err = None
        try:
            err = cuda.cuda_error()
        except Exception as exc:  # noqa: BLE001
            err = _first_line(exc)
        if err:
            return fail(f"the CUDA driver could not be initialised ({' '.join(str(err).split())})",
                        "check the NVIDIA driver with nvidia-smi")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return fail(f"no CUDA GPU is visible{where}", "check nvidia-smi and CUDA_VISIBLE_DEVICES")
    try:
        dev = cuda.get_current_device()
        cc = tuple(int(v) for v in dev.compute_capability)
        name = getattr(dev, "name", "SIMULATOR" if SIMULATOR else None)
        info["device_name"] = name.decode() if isinstance(name, bytes) else name
        info["compute_capability"] = f"{cc[0]}.{cc[1]}"
    except Exception as err:  # noqa: BLE001
        return fail(f"the GPU could not be queried ({_first_line(err)})", "check nvidia-smi")
    if not SIMULATOR:
        found = diagnose(toolkit, driver_cuda, info["driver_version"], cc)
        if found is not None:
            return fail(*found)

    host = np.arange(PREAMBLE_N, dtype=np.float32)
    t0 = time.perf_counter()
    try:
        arr = cuda.to_device(host)
        _add_one_kernel[(PREAMBLE_N + 127) // 128, 128](arr)
        got = arr.copy_to_host()
    except Exception as err:  # noqa: BLE001
        text = _first_line(err)
        info["kernel"] = {"name": "add_one", "elements": PREAMBLE_N, "passed": False, "error": text}
        mismatch = re.search(r"PTX|UNSUPPORTED|222|version", text, re.I)
        hint = (f"the toolkit may be newer than the driver: {_INSTALL}" if mismatch
                else "check nvidia-smi (is the GPU in exclusive-process mode and busy?)")
        return fail(f"a trivial kernel failed to compile or launch ({text})", hint)
    wrong = int(np.count_nonzero(got != host + np.float32(1.0)))
    info["kernel"] = {"name": "add_one", "elements": PREAMBLE_N, "passed": wrong == 0, "wrong_values": wrong,
                      "seconds_including_compile": round(time.perf_counter() - t0, 3)}
    if wrong:
        return fail(f"a trivial kernel returned {wrong} wrong values of {PREAMBLE_N}",
                    "the GPU or driver is not working; check nvidia-smi and dmesg")
    info["status"] = "passed"
    return info


def preamble_line(info: dict[str, Any]) -> str:
    """One line for the console: the versions and device, or the problem and its hint."""
    if info.get("status") != "passed":
        return f"{info.get('problem')}: {info.get('hint')}"
    if info.get("simulator"):
        versions = "driver simulator, toolkit simulator"
    else:
        versions = (f"driver {info.get('driver_version') or '?'} (CUDA {info.get('driver_cuda_version') or '?'}), "
                    f"toolkit CUDA {info.get('runtime_version') or '?'} (extra {info.get('extra') or '?'})")
    numba_cuda = (info.get("packages") or {}).get("numba-cuda")
    return (f"{versions}, numba-cuda {numba_cuda}; device {info.get('device_name')} "
            f"(compute capability {info.get('compute_capability')}); add-one kernel ok")


# ---------------------------------------------------------------------------------------------
# NumPy references (float64, vectorised; independent of both backends)


def _support_offsets(n: int, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat voxel indices inside the support and their offsets ``r = (x, y, z)`` from the centre."""
    c = n // 2
    k, i, j = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    r = np.stack([j - c, i - c, k - c], axis=-1).reshape(-1, 3).astype(np.float64)
    inside = (r ** 2).sum(axis=1) <= float(radius_px) ** 2
    return np.flatnonzero(inside), r[inside]


def _corners(a: np.ndarray, r: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The four bilinear corners ``(valid, y, x, weight)`` of the splat positions of ``r`` under ``a``."""
    c = n // 2
    u = r @ a[0] + c
    v = r @ a[1] + c
    x0 = np.floor(u).astype(np.int64)
    y0 = np.floor(v).astype(np.int64)
    fx = u - x0
    fy = v - y0
    out = []
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        y = y0 + dy
        x = x0 + dx
        valid = (x >= 0) & (x < n) & (y >= 0) & (y < n)
        out.append((valid, y, x, w))
    return out


def numpy_project(volume: np.ndarray, rotations: np.ndarray, radius_px: float) -> np.ndarray:
    """Reference ``P x``: ``(N, N, N)``, ``(b, 3, 3)`` -> ``(b, N, N)`` float64."""
    n = volume.shape[0]
    idx, r = _support_offsets(n, radius_px)
    vals = volume.reshape(-1).astype(np.float64)[idx]
    out = np.zeros((len(rotations), n, n))
    for b, a in enumerate(np.asarray(rotations, dtype=np.float64)):
        for valid, y, x, w in _corners(a, r, n):
            np.add.at(out[b], (y[valid], x[valid]), (w * vals)[valid])
    return out


def numpy_backproject(images: np.ndarray, rotations: np.ndarray, radius_px: float,
                      scale: np.ndarray | None = None) -> np.ndarray:
    """Reference ``sum_b scale_b P_b^T images[b]``: ``(b, N, N)`` -> ``(N, N, N)`` float64."""
    n = images.shape[1]
    idx, r = _support_offsets(n, radius_px)
    acc = np.zeros(len(idx))
    for b, a in enumerate(np.asarray(rotations, dtype=np.float64)):
        s = 1.0 if scale is None else float(scale[b])
        img = images[b].astype(np.float64)
        for valid, y, x, w in _corners(a, r, n):
            acc[valid] += s * w[valid] * img[y[valid], x[valid]]
    out = np.zeros(n ** 3)
    out[idx] = acc
    return out.reshape(n, n, n)


def numpy_fourier_filter(images: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Reference ``real(ifft2(filters * fft2(images)))`` in float64."""
    return np.real(np.fft.ifft2(filters.astype(np.float64) * np.fft.fft2(images.astype(np.float64))))


# ---------------------------------------------------------------------------------------------
# helpers


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    """``max |a - ref| / max |ref|`` (absolute error when ``ref`` is all zero)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = float(np.abs(a - ref).max()) if ref.size else 0.0
    return err / scale if scale > 0 else err


def _dot_rel(lhs: float, rhs: float) -> float:
    return abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1e-30)


def _check(checks: list[dict[str, Any]], name: str, value: float, tol: float = TOLERANCE, **extra: Any) -> None:
    checks.append({"name": name, "value": float(value), "tolerance": tol,
                   "passed": bool(np.isfinite(value) and value <= tol), **extra})


def _problem(n: int, nb: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Host arrays of a random test problem at box ``n`` with ``nb`` particles."""
    freq = np.fft.fftfreq(n)
    k2 = freq[:, None] ** 2 + freq[None, :] ** 2
    # CTF-like squared filters: positive, oscillating, different per particle
    defocus = rng.uniform(200.0, 800.0, nb)
    ctf = np.sin(defocus[:, None, None] * k2[None]) * np.exp(-20.0 * k2)[None]
    return {
        "volume": rng.standard_normal((n, n, n)).astype(np.float32),
        "rotations": random_rotations(nb, rng).astype(np.float32),
        "images": rng.standard_normal((nb, n, n)).astype(np.float32),
        "filters2": (ctf ** 2).astype(np.float32),
        "data": rng.standard_normal((nb, n, n)).astype(np.float32),
        "data_norm2": rng.uniform(100.0, 200.0, nb).astype(np.float32),
        "weights": rng.uniform(0.5, 1.5, nb).astype(np.float32),
        **_prepare_problem(n, nb, rng),
    }


def _prepare_problem(n: int, nb: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of ``prepare_particles`` at box ``n`` (1.5 A/px): astigmatic CTFs at 1-3 um defocus
    with a phase shift and a B-factor, sub-pixel shifts up to 3 px, every fourth image
    CTF-premultiplied, raw images with a background offset."""
    du = rng.uniform(1e4, 3e4, nb)
    ctf = np.stack([du, du - rng.uniform(0, 500, nb), rng.uniform(0, 180, nb), np.full(nb, 300.0),
                    np.full(nb, 2.7), np.full(nb, 0.1), rng.uniform(0, 30, nb), rng.uniform(0, 50, nb),
                    np.ones(nb)], axis=1)
    c = n // 2
    y, x = np.ogrid[:n, :n]
    return {
        "raw_images": (rng.standard_normal((nb, n, n)) + 5.0).astype(np.float32),
        "ctf_params": np.ascontiguousarray(ctf, dtype=np.float64),
        "shifts_px": rng.uniform(-3.0, 3.0, (nb, 2)),
        "premultiplied": (np.arange(nb) % 4 == 3).astype(np.uint8),
        "background_mask": (((x - c) ** 2 + (y - c) ** 2) > (0.85 * n / 2) ** 2).astype(np.uint8),
        "angpix": np.float64(1.5),
    }


def _run_prepare(be: Any, p: dict[str, np.ndarray], out: tuple[Any, Any, Any, Any]) -> None:
    """``prepare_particles`` of backend ``be`` on the problem ``p`` into ``out`` (data, filters2,
    norms, noise variances; ``be``'s arrays)."""
    be.prepare_particles(be.to_device(p["raw_images"]), be.to_device(p["ctf_params"], None),
                         be.to_device(p["shifts_px"], None), be.to_device(p["premultiplied"], None),
                         float(p["angpix"]), be.to_device(p["background_mask"], None), *out)


def _run_forward_residual(p: dict[str, np.ndarray], volume: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    nb, n = p["images"].shape[0], p["images"].shape[1]
    res = nc.zeros((nb, n, n))
    loss = nc.zeros(nb)
    nc.forward_residual(nc.to_device(volume), nc.to_device(p["rotations"]), nc.to_device(p["filters2"]),
                        nc.to_device(p["data"]), nc.to_device(p["data_norm2"]), radius, res, loss)
    return nc.to_host(res), nc.to_host(loss)


def _cpu_backend() -> tuple[Any, str | None]:
    """The CPU twin, through the one dispatch point."""
    from numba_recon.backend import get_backend

    try:
        return get_backend("cpu"), None
    except Exception as err:  # noqa: BLE001 - reported in the check's JSON, not raised
        return None, f"the CPU backend is not usable: {err}"


# ---------------------------------------------------------------------------------------------
# sections


def check_correctness(n: int, nb: int, seed: int = 20240611) -> dict[str, Any]:
    """All correctness checks at box ``n`` with ``nb`` particles; see the module docstring."""
    rng = np.random.default_rng(seed)
    p = _problem(n, nb, rng)
    radius = n / 2 - 1.0
    checks: list[dict[str, Any]] = []
    rot_d = nc.to_device(p["rotations"])

    # project / backproject against the NumPy reference, and their dot test
    proj = nc.zeros((nb, n, n))
    nc.project(nc.to_device(p["volume"]), rot_d, radius, proj)
    proj = nc.to_host(proj)
    proj_ref = numpy_project(p["volume"], p["rotations"], radius)
    _check(checks, "project_vs_numpy", _rel(proj, proj_ref))
    bp = nc.zeros((n, n, n))
    nc.backproject(nc.to_device(p["images"]), rot_d, radius, bp)
    bp = nc.to_host(bp)
    _check(checks, "backproject_vs_numpy", _rel(bp, numpy_backproject(p["images"], p["rotations"], radius)))
    _check(checks, "dot_project_backproject",
           _dot_rel(float(np.vdot(proj.astype(np.float64), p["images"])),
                    float(np.vdot(p["volume"].astype(np.float64), bp))))

    # fourier_filter against numpy.fft, and its dot test (real(ifft2(H fft2 .)) is self-adjoint)
    ff = nc.zeros((nb, n, n))
    nc.fourier_filter(nc.to_device(p["images"]), nc.to_device(p["filters2"]), ff)
    ff = nc.to_host(ff)
    _check(checks, "fourier_filter_vs_numpy_fft", _rel(ff, numpy_fourier_filter(p["images"], p["filters2"])))
    ff_data = nc.zeros((nb, n, n))
    nc.fourier_filter(nc.to_device(p["data"]), nc.to_device(p["filters2"]), ff_data)
    _check(checks, "dot_fourier_filter",
           _dot_rel(float(np.vdot(ff.astype(np.float64), p["data"])),
                    float(np.vdot(p["images"].astype(np.float64), nc.to_host(ff_data)))))

    # forward_residual against the reference composition
    res, loss = _run_forward_residual(p, p["volume"], radius)
    s_ref = numpy_fourier_filter(proj_ref, p["filters2"])
    res_ref = s_ref - p["data"]
    loss_ref = (np.einsum("bij,bij->b", proj_ref, s_ref) - 2 * np.einsum("bij,bij->b", proj_ref, p["data"])
                + p["data_norm2"])
    _check(checks, "forward_residual_residual_vs_numpy", _rel(res, res_ref))
    _check(checks, "forward_residual_loss_vs_numpy", _rel(loss, loss_ref))

    # weighted_backproject against the reference
    grad = nc.zeros((n, n, n))
    nc.weighted_backproject(nc.to_device(res), rot_d, nc.to_device(p["weights"]), radius, grad)
    grad = nc.to_host(grad)
    _check(checks, "weighted_backproject_vs_numpy",
           _rel(grad, numpy_backproject(res, p["rotations"], radius, 2.0 * p["weights"])))

    # gradient check: L(x) = sum_b w_b loss_b(x) is quadratic, so (L(x+d) - L(x-d)) / 2 = <grad, d>
    d = rng.standard_normal((n, n, n)).astype(np.float32)
    w = p["weights"].astype(np.float64)
    l_plus = float(w @ _run_forward_residual(p, p["volume"] + d, radius)[1])
    l_minus = float(w @ _run_forward_residual(p, p["volume"] - d, radius)[1])
    _check(checks, "gradient_central_difference",
           _dot_rel(0.5 * (l_plus - l_minus), float(np.vdot(grad.astype(np.float64), d))))

    # centre voxel: lands on the image centre with weight 1 for every rotation
    delta = np.zeros((n, n, n), dtype=np.float32)
    delta[n // 2, n // 2, n // 2] = 1.0
    centre = nc.zeros((nb, n, n))
    nc.project(nc.to_device(delta), rot_d, radius, centre)
    centre = nc.to_host(centre)
    expected = np.zeros_like(centre)
    expected[:, n // 2, n // 2] = 1.0
    _check(checks, "centre_voxel", float(np.abs(centre - expected).max()), tol=1e-6)

    # parity with the CPU backend
    cpu, why = _cpu_backend()
    if cpu is None:
        checks.append({"name": "cpu_parity", "skipped": why, "passed": True})
    else:
        out = np.zeros((nb, n, n), dtype=np.float32)
        cpu.project(p["volume"], p["rotations"], radius, out)
        _check(checks, "cpu_parity_project", _rel(proj, out))
        out3 = np.zeros((n, n, n), dtype=np.float32)
        cpu.backproject(p["images"], p["rotations"], radius, out3)
        _check(checks, "cpu_parity_backproject", _rel(bp, out3))
        out = np.zeros((nb, n, n), dtype=np.float32)
        cpu.fourier_filter(p["images"], p["filters2"], out)
        _check(checks, "cpu_parity_fourier_filter", _rel(ff, out))
        res_cpu = np.zeros((nb, n, n), dtype=np.float32)
        loss_cpu = np.zeros(nb, dtype=np.float32)
        cpu.forward_residual(p["volume"], p["rotations"], p["filters2"], p["data"], p["data_norm2"], radius,
                             res_cpu, loss_cpu)
        _check(checks, "cpu_parity_forward_residual", max(_rel(res, res_cpu), _rel(loss, loss_cpu)))
        out3 = np.zeros((n, n, n), dtype=np.float32)
        cpu.weighted_backproject(res, p["rotations"], p["weights"], radius, out3)
        _check(checks, "cpu_parity_weighted_backproject", _rel(grad, out3))

    return {"box": n, "batch": nb, "radius_px": radius, "passed": all(c["passed"] for c in checks),
            "checks": checks}


def _timed(fn: Callable[[], None], prep: Callable[[], None] | None, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (``prep`` runs before each call, untimed), CUDA events on a GPU."""
    for _ in range(warmup):
        if prep is not None:
            prep()
        fn()
    nc.synchronize()
    times = []
    for _ in range(repeats):
        if prep is not None:
            prep()
        if SIMULATOR:
            nc.synchronize()
            t0 = time.perf_counter()
            fn()
            nc.synchronize()
            times.append(time.perf_counter() - t0)
        else:
            start = cuda.event()
            stop = cuda.event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
    return times


def _memory_used() -> int | None:
    try:
        info = cuda.current_context().get_memory_info()
        free, total = float(info[0]), float(info[1])
    except Exception:  # noqa: BLE001 - not every target reports memory
        return None
    if not (math.isfinite(free) and math.isfinite(total)):
        return None
    return int(total - free)


def time_kernels(boxes: list[int], batches: list[int], repeats: int, warmup: int, budget_s: float,
                 memory: dict[str, Any], seed: int = 7) -> list[dict[str, Any]]:
    """Timings of project, backproject, loss-and-gradient and the particle preparation (raw images
    and parameters uploaded, CTF, shift and filter on the device) for every box and batch."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for n in boxes:
        radius = n / 2
        c = n // 2
        grid = np.arange(n) - c
        support = int(((grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
                       <= radius ** 2).sum())
        volume = nc.to_device(rng.uniform(0.1, 1.0, (n, n, n)).astype(np.float32))
        grad = nc.zeros((n, n, n))
        for nb in batches:
            if time.perf_counter() - t_start > budget_s:
                rows.append({"box": n, "batch": nb, "skipped": f"time budget of {budget_s:g} s used up"})
                continue
            p = _problem(n, nb, rng)
            rot = nc.to_device(p["rotations"])
            images = nc.to_device(p["images"])
            filters2 = nc.to_device(p["filters2"])
            data = nc.to_device(p["data"])
            norm2 = nc.to_device(p["data_norm2"])
            weights = nc.to_device(p["weights"])
            proj = nc.zeros((nb, n, n))
            res = nc.zeros((nb, n, n))
            loss = nc.zeros(nb)

            def loss_and_gradient() -> None:
                fill(grad, 0.0)
                nc.forward_residual(volume, rot, filters2, data, norm2, radius, res, loss)
                nc.weighted_backproject(res, rot, weights, radius, grad)

            prepared = (nc.zeros((nb, n, n)), nc.zeros((nb, n, n)), nc.zeros(nb), nc.zeros(nb))
            ops: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {
                "project": (lambda: nc.project(volume, rot, radius, proj), lambda: fill(proj, 0.0)),
                "backproject": (lambda: nc.backproject(images, rot, radius, grad), None),
                "loss_and_gradient": (loss_and_gradient, None),
                # the upload of the raw images and parameters included, as a run pays it
                "prepare_particles": (lambda: _run_prepare(nc, p, prepared), None),
            }
            for op, (fn, prep) in ops.items():
                times = _timed(fn, prep, repeats, warmup)
                med = statistics.median(times)
                rows.append({
                    "box": n, "batch": nb, "op": op, "repeats": repeats,
                    "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
                    "images_per_s": nb / med if med > 0 else None,
                    "support_voxel_updates_per_s": nb * support / med if med > 0 else None,
                })
            used = _memory_used()
            if used is not None:
                memory["peak_used_bytes"] = max(memory.get("peak_used_bytes", 0), used)
            nc.synchronize()
    return rows


def atomics_benchmark(n_threads: int, reps: int) -> dict[str, Any]:
    """float32 ``atomic.add`` throughput (operations/s) in three access patterns."""
    blocks = max(1, n_threads // ATOMIC_THREADS)
    n_threads = blocks * ATOMIC_THREADS
    results: dict[str, Any] = {"threads": n_threads, "adds_per_thread": reps}
    cases = {"global_distinct": n_threads, "global_512_threads_per_address": max(1, n_threads // 512)}
    for name, n_addr in cases.items():
        arr = nc.zeros(n_addr)
        args = (arr, np.int64(n_addr), np.int64(reps))
        _atomic_global_kernel[blocks, ATOMIC_THREADS](*args)  # warm-up and compile
        fill(arr, 0.0)
        secs = statistics.median(_timed(lambda: _atomic_global_kernel[blocks, ATOMIC_THREADS](*args), None, 3, 0))
        # each repeat adds n_threads * reps in total; the last three repeats ran after the fill
        total = float(nc.to_host(arr).astype(np.float64).sum())
        results[name] = {"addresses": n_addr, "ops_per_s": n_threads * reps / secs if secs > 0 else None,
                         "sum_correct": bool(total == 3.0 * n_threads * reps)}
    out = nc.zeros(n_threads)
    _atomic_shared_kernel[blocks, ATOMIC_THREADS](out, np.int64(reps))
    secs = statistics.median(_timed(lambda: _atomic_shared_kernel[blocks, ATOMIC_THREADS](out, np.int64(reps)),
                                    None, 3, 0))
    results["shared_conflict_free"] = {"ops_per_s": n_threads * reps / secs if secs > 0 else None,
                                       "sum_correct": bool(np.all(nc.to_host(out) == reps))}
    return results


# ---------------------------------------------------------------------------------------------
# driver


def _write(path: Path, result: dict[str, Any]) -> None:
    from numba_recon.io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")


def _section(result: dict[str, Any], path: Path, name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
        result[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        result["errors"].append(name)
    result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 3)
    result["elapsed_s"] = round(time.perf_counter() - result["_t0"], 3)
    _write(path, {k: v for k, v in result.items() if not k.startswith("_")})


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m numba_recon.cuda.device_check",
                                     description="Correctness and speed of the CUDA kernels on this GPU, as JSON.")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--boxes", type=_ints, default=[64, 128], help="timing boxes (default 64,128)")
    parser.add_argument("--batches", type=_ints, default=[32, 128, 512], help="timing batches (default 32,128,512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (default 5)")
    parser.add_argument("--parity-box", type=int, default=32, help="box of the correctness checks (default 32)")
    parser.add_argument("--budget-s", type=float, default=90.0,
                        help="start no new timing case after this many seconds of timing (default 90)")
    parser.add_argument("--simulator-smoke", action="store_true",
                        help="tiny sizes in the CUDA simulator (NUMBA_ENABLE_CUDASIM=1): checks that the script runs")
    args = parser.parse_args(argv)

    if args.simulator_smoke != SIMULATOR:
        if SIMULATOR:
            print("device_check: NUMBA_ENABLE_CUDASIM=1 is set; the full check needs a GPU "
                  "(use --simulator-smoke to only exercise the script)", file=sys.stderr)
        else:
            print("device_check: --simulator-smoke needs NUMBA_ENABLE_CUDASIM=1 set before Python starts",
                  file=sys.stderr)
        return 2
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"device_check: cannot create the folder of {args.out} ({err.strerror})", file=sys.stderr)
        return 2
    if args.simulator_smoke:
        parity = (8, 2)
        boxes, batches, repeats, warmup = [8], [2], 1, 0
        atomic_threads, atomic_reps = ATOMIC_THREADS, 2
    else:
        parity = (args.parity_box, 8)
        boxes, batches, repeats, warmup = args.boxes, args.batches, max(1, args.repeats), 1
        atomic_threads, atomic_reps = 1 << 20, 256

    import numba

    result: dict[str, Any] = {
        "_t0": time.perf_counter(),
        "tool": "numba_recon.cuda.device_check",
        "numba_recon_version": numba_recon.__version__,
        "numba_version": numba.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "simulator": SIMULATOR,
        "settings": {"parity_box": parity[0], "parity_batch": parity[1], "boxes": boxes, "batches": batches,
                     "repeats": repeats, "warmup": warmup, "tolerance": TOLERANCE},
        "errors": [],
    }
    memory: dict[str, Any] = {}
    _section(result, args.out, "preamble", preamble)
    pre = result["preamble"]
    if not isinstance(pre, dict) or pre.get("status") != "passed":
        line = preamble_line(pre) if isinstance(pre, dict) else "the preamble failed"
        print(f"device_check: {line}", file=sys.stderr)
        return 2
    print(f"device_check: {preamble_line(pre)}")
    _section(result, args.out, "device", describe)
    _section(result, args.out, "correctness", lambda: check_correctness(*parity))
    _section(result, args.out, "timing", lambda: time_kernels(boxes, batches, repeats, warmup, args.budget_s, memory))
    _section(result, args.out, "atomics", lambda: atomics_benchmark(atomic_threads, atomic_reps))

    def memory_section() -> dict[str, Any]:
        used = _memory_used()
        if used is not None:
            memory["peak_used_bytes"] = max(memory.get("peak_used_bytes", 0), used)
        desc = result.get("device", {})
        memory["total_bytes"] = desc.get("total_memory_bytes") if isinstance(desc, dict) else None
        memory["note"] = "device-wide memory in use (total - free) sampled after each timing case"
        return memory

    _section(result, args.out, "memory", memory_section)

    def target_section() -> dict[str, Any]:
        rows = result.get("timing")
        best = None
        if isinstance(rows, list):
            rates = [r["images_per_s"] for r in rows
                     if r.get("op") == "loss_and_gradient" and r.get("box") == TARGET_BOX and r.get("images_per_s")]
            best = max(rates) if rates else None
        return {"metric": f"loss_and_gradient images/s at box {TARGET_BOX} (best batch)",
                "target_images_per_s": TARGET_IMAGES_PER_S, "best_images_per_s": best,
                "met": None if best is None else bool(best >= TARGET_IMAGES_PER_S),
                "device": (result.get("device") or {}).get("name")}

    _section(result, args.out, "target", target_section)

    correctness = result.get("correctness", {})
    passed = isinstance(correctness, dict) and correctness.get("passed") is True
    target = result.get("target", {})
    print(f"device_check: {(result.get('device') or {}).get('name')}: correctness "
          f"{'passed' if passed else 'FAILED'}; box {TARGET_BOX} loss-and-gradient best "
          f"{target.get('best_images_per_s')} images/s (target {TARGET_IMAGES_PER_S}, met: {target.get('met')}); "
          f"sections with errors: {result['errors'] or 'none'}; wrote {args.out}")
    return 0 if passed and not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
