"""Wall time of ``numba-recon locres``'s computation (:func:`local_resolution`) for boxes 64 and 128.

Half maps: a sphere of Gaussian pseudo-atoms (sigma 1 A) plus independent white noise, 1 A/voxel, a
soft spherical mask of radius 0.4 N. Each configuration is timed three times after one warm-up call
(which compiles the numba kernel, or loads it from the cache) and the median is printed, for the
default window (50 A, edge 25 A, sampling 25 A) and for a 4x denser grid (sampling 12.5 A, about
8x as many windows). Wall and CPU time (all threads) are printed; on a shared machine the wall
time grows with the load, which is printed too. Writing the output files is not included.

    python benchmarks/locres_speed.py [--boxes 64 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def half_maps(n: int, angpix: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from numba_recon.evaluate.mask import spherical_mask
    from numba_recon.sim.phantom import Blobs, render_volume

    rng = np.random.default_rng(seed)
    radius = 0.4 * n * angpix
    count = int(4.0 / 3.0 * np.pi * radius ** 3 / 60.0)  # one pseudo-atom per 60 A^3
    centres = rng.normal(size=(count, 3))
    centres *= (radius * rng.random(count) ** (1 / 3) / np.linalg.norm(centres, axis=1))[:, None]
    signal = render_volume(Blobs(centres, np.ones(count), rng.uniform(0.5, 1.5, count)), n, angpix)
    sd = float(signal.std())
    h1 = signal + sd * rng.standard_normal(signal.shape).astype(np.float32)
    h2 = signal + sd * rng.standard_normal(signal.shape).astype(np.float32)
    return h1, h2, spherical_mask(n, 0.4 * n, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--angpix", type=float, default=1.0)
    args = parser.parse_args()

    from numba_recon.evaluate.locres import local_resolution
    from numba_recon.tools.bench import machine_info

    info = machine_info()
    print(f"CPU: {info['cpu_model']}, nproc {info['cpu_count']}, affinity {info['cpus_usable']}, "
          f"load average {os.getloadavg()[0]:.1f} (wall times grow with other load)")
    for n in args.boxes:
        h1, h2, mask = half_maps(n, args.angpix)
        for sampling in (25.0, 12.5):
            local_resolution(h1, h2, args.angpix, mask, sampling_angstrom=sampling)  # warm-up / compile
            times, cpu = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                result = local_resolution(h1, h2, args.angpix, mask, sampling_angstrom=sampling)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            print(f"box {n:4d}  angpix {args.angpix:g}  sampling {sampling:5.1f} A  points {len(result.points):5d}  "
                  f"sub-box {result.subbox_size:3d}  median of {args.repeats}: {statistics.median(times):6.2f} s wall, "
                  f"{statistics.median(cpu):6.2f} s CPU (all threads)")


if __name__ == "__main__":
    main()
