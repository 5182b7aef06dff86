"""What the host still does per pass of the cg solver, and per particle image, at box 64-256.

The CUDA backend keeps the projection, the back-projection and the per-pass sums on the device;
two pieces of work stay on the host and bound how fast a GPU run can go:

- ``cg_update``: the solver's update after each data pass, both halves: the residual
  (``Objective.residual``: two 3-D FFTs), the preconditioner (two more), the step and the new
  direction (``step.cg_step``, ``step.cg_direction``), all float64 numpy/scipy on the maps.
- ``prepare``: one particle's preparation from its image (background, CTF on two grids, three
  2-D FFTs and the shift; ``batch.BatchLoader._compute``), which the cache pays once per particle
  and the streaming path pays on every pass for the particles that do not fit.

Prints one JSON line per box with the median over ``--repeats`` (seconds), the machine and the
number of FFT workers. Example (about a minute on 2 cores)::

    python benchmarks/host_step.py --boxes 64 128 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _cg_update_seconds(box: int, repeats: int) -> list[float]:
    from numba_recon.objective import Objective, soft_sphere
    from numba_recon.step import CGState, cg_direction, cg_step

    rng = np.random.default_rng(0)
    shape = (2, box, box, box)
    mask = soft_sphere(box, box / 2 - 2)
    kernels = rng.uniform(0.5, 2.0, (2, box, box, box // 2 + 1))
    obj = Objective.create(box, mask, kernels, reg_lambda=0.01)
    cg = CGState(v=rng.standard_normal(shape).astype(np.float32), r=rng.standard_normal(shape).astype(np.float32),
                 p=rng.standard_normal(shape).astype(np.float32), rz=np.ones(2))
    bp = rng.standard_normal(shape)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for h in (0, 1):
            r_trial = obj.residual(bp[h], cg.trial(h).astype(np.float64), h)
            cg_step(cg, h, r_trial)
            cg_direction(cg, h, obj.precondition(cg.r[h], h), restart=False)
        times.append(time.perf_counter() - t0)
    return times


def _prepare_seconds_per_image(box: int, repeats: int, n: int) -> list[float]:
    from numba_recon.batch import BatchLoader
    from numba_recon.read import read_particles
    from numba_recon.sim.simulate import simulate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data"
        simulate_dataset(path, n_particles=n, box_size=box, pixel_size_angstrom=2.0, snr=0.1, seed=1,
                         particles_per_stack=n)
        particles = read_particles(path / "particles.star")
        loader = BatchLoader(particles, cache_bytes=0, prefetch=0)
        index = np.arange(n)
        loader.prepare(index)  # warm: file cache, kernels
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loader.prepare(index)
            times.append((time.perf_counter() - t0) / n)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=256, help="images prepared per repeat")
    args = parser.parse_args()
    from numba_recon.threads import fft_workers

    machine = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "fft_workers": fft_workers()}
    for box in args.boxes:
        cg = _cg_update_seconds(box, args.repeats)
        prep = _prepare_seconds_per_image(box, args.repeats, args.images)
        print(json.dumps({"box": box, "cg_update_s_median": round(statistics.median(cg), 4),
                          "prepare_ms_per_image_median": round(1e3 * statistics.median(prep), 4),
                          "prepare_images_per_s": round(1 / statistics.median(prep)), **machine}), flush=True)


if __name__ == "__main__":
    main()
