"""Reconstruction quality and wall time on the standard simulated set (docs/benchmarks.md).

Simulates the set once (built-in phantom, box 64, 2.0 A/px, 5000 particles, SNR 0.1, defocus
1.0-2.5 um, 300 kV, Cs 2.7 mm, amplitude contrast 0.1, shifts up to 3 px), then times the command
line `numba-recon run` as a user would run it, and scores the result:

- resolution where the FSC of the unfiltered average map against the ground truth drops below 0.5;
- half-map resolution at FSC 0.143 (RELION's rule);
- wall time of the whole run, seconds per epoch, and the first epoch whose half-map resolution is
  within one shell of the final one ("epochs to convergence").

    python benchmarks/reconstruction_quality.py --out /tmp/quality                  # 1 process
    python benchmarks/reconstruction_quality.py --out /tmp/quality --ranks 2 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quality_runs")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="NUMBA_NUM_THREADS per rank")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra `numba-recon run` options")
    args = ap.parse_args()

    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.io.mrc import read_volume
    from numba_recon.sim.simulate import simulate_dataset

    root = Path(args.out)
    data = root / "data"
    if not (data / "particles.star").is_file():
        simulate_dataset(data, n_particles=5000, box_size=64, pixel_size_angstrom=2.0, snr=0.1, defocus_min_um=1.0,
                         defocus_max_um=2.5, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, max_shift_px=3.0,
                         seed=0, overwrite=True)
    truth, _ = read_volume(data / "truth.mrc")
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if args.threads:
        env["NUMBA_NUM_THREADS"] = str(args.threads)
    rows = []
    for rep in range(args.repeats):
        out = root / f"run_r{args.ranks}_{rep}"
        cmd = [sys.executable, "-m", "numba_recon", "-q", "run", str(data / "particles.star"), "-o", str(out),
               "--overwrite", "--backend", args.backend, *args.extra]
        if args.ranks > 1:
            cmd = ["mpiexec", "-n", str(args.ranks), *cmd]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"run failed:\n{res.stderr}")
        h1, _ = read_volume(out / "run_half1_class001_unfil.mrc")
        h2, _ = read_volume(out / "run_half2_class001_unfil.mrc")
        truth_res = resolution_at(fsc(0.5 * (h1 + h2), truth), 64, 2.0, 0.5)
        half_res = resolution_at(fsc(h1, h2), 64, 2.0, 0.143)
        with open(out / "history.csv") as fh:
            hist = list(csv.DictReader(line for line in fh if not line.startswith("#")))
        res_hist = [float(r["resolution_angstrom"]) for r in hist]
        shell = [round(128 / r) for r in res_hist]
        converged = next(i + 1 for i, s in enumerate(shell) if s >= shell[-1] - 1)
        row = {"ranks": args.ranks, "threads": args.threads, "wall_s": round(wall, 1),
               "seconds_per_epoch_median": round(float(np.median([float(r["seconds"]) for r in hist])), 2),
               "epochs": len(hist), "epochs_to_convergence": converged,
               "truth_fsc05_angstrom": round(truth_res, 2), "halfmap_fsc0143_angstrom": round(half_res, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.repeats > 1:
        print(json.dumps({"median_wall_s": float(np.median([r["wall_s"] for r in rows]))}))


if __name__ == "__main__":
    main()
