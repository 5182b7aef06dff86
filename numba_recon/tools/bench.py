"""Throughput of the projector kernels: images per second per backend, box and batch size.

Three calls are timed, each on random data with random rotations and the default support radius
``N // 2 - 1``:

- ``project``: ``out += P x`` for a batch of images;
- ``backproject``: ``x += P^T y`` for a batch of images;
- ``loss_and_gradient``: ``forward_residual`` followed by ``weighted_backproject``, the full
  per-minibatch work of a reconstruction step (projection, CTF filtering, residuals, losses and
  the gradient back-projection).

Each is called once to compile (and warm caches), then ``repeats`` times; the reported rate is
``batch / median(seconds)``. Device work is synchronised before each clock read.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from numba_recon import __version__
from numba_recon.backend import Backend, get_backend
from numba_recon.ctf import ctf_images
from numba_recon.forward import default_radius_px
from numba_recon.geometry import random_rotations

#: Boxes at or above this size run at most this many repeats (each call takes seconds on a CPU).
LARGE_BOX = 256
LARGE_BOX_REPEATS = 2


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backends: list[str] | None = None) -> dict[str, Any]:
    """CPU model, core counts, thread settings, library versions and, for ``"cuda"``, the GPU."""
    import numba

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_recon": __version__,
    }
    try:
        import numba_cuda

        info["numba_cuda"] = numba_cuda.__version__
    except ImportError:
        info["numba_cuda"] = None
    if backends and "cuda" in backends:
        import numba_recon.cuda

        info["gpu"] = numba_recon.cuda.describe()
    return info


def _host_peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS); tracemalloc does not see numba's allocations
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _gpu_used_mib() -> float | None:
    try:
        from numba_recon.cuda._target import cuda

        free, total = cuda.current_context().get_memory_info()
        return (total - free) / (1024.0 * 1024.0)
    except Exception:  # noqa: BLE001 - not every target reports memory (the simulator does not)
        return None


def _median_seconds(fn: Callable[[], None], backend: Backend, repeats: int) -> float:
    fn()  # compile and warm up
    backend.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _random_ctf_squared(rng: np.random.Generator, batch: int, box: int) -> np.ndarray:
    params = {
        "defocus_u_angstrom": rng.uniform(8000, 25000, batch),
        "defocus_v_angstrom": rng.uniform(8000, 25000, batch),
        "defocus_angle_deg": rng.uniform(0, 180, batch),
        "voltage_kv": np.full(batch, 300.0),
        "cs_mm": np.full(batch, 2.7),
        "amplitude_contrast": np.full(batch, 0.1),
        "phase_shift_deg": np.zeros(batch),
        "bfactor_angstrom2": np.zeros(batch),
        "scale": np.ones(batch),
    }
    return ctf_images(params, box, 1.5, half=False, dtype=np.float64) ** 2


def bench_case(backend: Backend, box: int, batch: int, repeats: int, dtype: Any = np.float32,
               seed: int = 0) -> dict[str, Any]:
    """Time ``project``, ``backproject`` and the loss-and-gradient call for one box and batch size.

    Returns
    -------
    dict
        ``backend``, ``box``, ``batch``, ``dtype``, ``repeats``, ``radius_px``, the median seconds
        per call (``*_s``) and images per second (``*_images_per_s``) of ``project``,
        ``backproject`` and ``loss_and_gradient``, ``host_peak_rss_mib`` (the process's peak
        resident memory so far) and ``gpu_used_mib`` (device memory in use, None on the CPU).
    """
    rng = np.random.default_rng(seed)
    n = int(box)
    radius = default_radius_px(n)
    be = backend
    volume = be.to_device(rng.standard_normal((n, n, n)), dtype)
    rotations = be.to_device(random_rotations(batch, rng), dtype)
    images = be.to_device(rng.standard_normal((batch, n, n)), dtype)
    filters2 = be.to_device(_random_ctf_squared(rng, batch, n), dtype)
    norm2 = be.to_device(np.full(batch, float(n * n)), dtype)
    weights = be.to_device(np.ones(batch), dtype)
    projections = be.zeros((batch, n, n), dtype)
    grad = be.zeros((n, n, n), dtype)
    residuals = be.zeros((batch, n, n), dtype)
    losses = be.zeros((batch,), dtype)

    def project() -> None:
        be.project(volume, rotations, radius, projections)

    def backproject() -> None:
        be.backproject(images, rotations, radius, grad)

    def loss_and_gradient() -> None:
        be.forward_residual(volume, rotations, filters2, images, norm2, radius, residuals, losses)
        be.weighted_backproject(residuals, rotations, weights, radius, grad)

    result: dict[str, Any] = {"backend": be.name, "box": n, "batch": int(batch), "dtype": np.dtype(dtype).name,
                              "repeats": int(repeats), "radius_px": radius}
    for name, fn in (("project", project), ("backproject", backproject), ("loss_and_gradient", loss_and_gradient)):
        seconds = _median_seconds(fn, be, repeats)
        result[f"{name}_s"] = seconds
        result[f"{name}_images_per_s"] = batch / seconds
    result["host_peak_rss_mib"] = _host_peak_rss_mib()
    result["gpu_used_mib"] = _gpu_used_mib() if be.name == "cuda" else None
    return result


def resolve_backends(name: str) -> tuple[list[str], list[dict[str, str]]]:
    """Backends to run for ``--backend name`` and, for ``"all"``, those skipped with the reason.

    An explicit ``"cpu"``/``"cuda"`` that cannot run raises
    :class:`~numba_recon.errors.BackendUnavailableError`.
    """
    from numba_recon.errors import BackendUnavailableError

    if name != "all":
        get_backend(name)
        return [name], []
    names, skipped = ["cpu"], []
    try:
        get_backend("cuda")
        names.append("cuda")
    except BackendUnavailableError as err:
        skipped.append({"backend": "cuda", "reason": str(err)})
    return names, skipped


def run_benchmark(backends: list[str], boxes: list[int], batches: list[int], repeats: int,
                  dtype: Any = np.float32, progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict]:
    """:func:`bench_case` for every backend, box and batch size (boxes >= 256: at most 2 repeats)."""
    results = []
    for name in backends:
        backend = get_backend(name)
        for box in boxes:
            reps = min(repeats, LARGE_BOX_REPEATS) if box >= LARGE_BOX else repeats
            for batch in batches:
                row = bench_case(backend, box, batch, reps, dtype)
                results.append(row)
                if progress is not None:
                    progress(row)
    return results


_STARTUP_SCRIPT = """
import time
t0 = time.perf_counter()
import numpy as np
from numba_recon.backend import get_backend
be = get_backend({backend!r})
n, b = 32, 2
rng = np.random.default_rng(0)
rot = be.to_device(np.stack([np.eye(3)] * b))
vol = be.to_device(rng.standard_normal((n, n, n)))
img = be.to_device(rng.standard_normal((b, n, n)))
resid, loss, grad = be.zeros((b, n, n)), be.zeros((b,)), be.zeros((n, n, n))
be.forward_residual(vol, rot, be.to_device(np.ones((b, n, n))), img, be.to_device(np.ones(b)), 15.0, resid, loss)
be.weighted_backproject(resid, rot, be.to_device(np.ones(b)), 15.0, grad)
be.synchronize()
print(time.perf_counter() - t0)
"""


def measure_startup(backend: str = "cpu") -> dict[str, Any]:
    """Seconds from a fresh interpreter to the end of the first loss-and-gradient call.

    Runs two subprocesses sharing an empty ``NUMBA_CACHE_DIR``: the first compiles every kernel
    and writes the on-disk cache (``cold``), the second loads it (``warm``). Each figure is the
    subprocess's wall time (interpreter start included) and, in ``*_in_process_s``, the time from
    the script's first line (imports included).
    """
    out: dict[str, Any] = {"backend": backend}
    with tempfile.TemporaryDirectory(prefix="numba-recon-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT.format(backend=backend)], env=env,
                                  capture_output=True, text=True, check=False)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"startup measurement failed ({label}): {proc.stderr.strip()[-2000:]}")
            out[f"{label}_s"] = wall
            out[f"{label}_in_process_s"] = float(proc.stdout.strip().splitlines()[-1])
    return out


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`bench_case` rows."""
    head = (f"{'backend':<8}{'box':>5}{'batch':>6}{'project':>12}{'backproject':>13}{'loss+grad':>12}"
            f"{'peak MiB':>10}{'GPU MiB':>9}")
    lines = [head, f"{'':<19}{'(images/s, median)':>37}"]
    for r in results:
        gpu = "-" if r["gpu_used_mib"] is None else f"{r['gpu_used_mib']:.0f}"
        lines.append(f"{r['backend']:<8}{r['box']:>5}{r['batch']:>6}{r['project_images_per_s']:>12.1f}"
                     f"{r['backproject_images_per_s']:>13.1f}{r['loss_and_gradient_images_per_s']:>12.1f}"
                     f"{r['host_peak_rss_mib']:>10.0f}{gpu:>9}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON through a temporary file, so a crash leaves no half file."""
    from numba_recon.io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
