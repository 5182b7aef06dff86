"""A long run: hundreds of epochs on a small data set, memory and time per epoch.

The epochs are minibatch adam epochs (``--optimizer adam``): the default solver, cg, stops after a
few passes, so only adam runs for hundreds of epochs.

Runs ``numba-recon run`` in-process in a fresh child (checkpoint and ``history.csv`` written every
epoch, as by default) and records after every epoch: the wall time of the epoch including its
checkpoint, the process's ``VmRSS``, ``RssAnon`` and ``RssFile`` (``/proc/self/status``), and the
number of objects tracked by Python's garbage collector. A leak shows as a positive slope of
memory or object count against the epoch; a slowdown as a slope of the time per epoch.

Example (about 1 minute on 2 cores)::

    NUMBA_NUM_THREADS=2 python benchmarks/long_run.py --epochs 300 --particles 200 --box 24
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from _common import add_workdir_option, run_in_work_folder, simulated

CHILD = r"""
import gc, json, sys, time
from numba_recon.recon.engine import Reconstruction
rows = []
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    return out
original = Reconstruction._run_epoch
def timed_epoch(self, st, epoch):
    t0 = time.perf_counter()
    stats = original(self, st, epoch)
    t1 = time.perf_counter()
    row = {"epoch": epoch + 1, "compute_s": t1 - t0, **status(), "gc_objects": len(gc.get_objects())}
    row["probe_s"] = time.perf_counter() - t1  # this instrumentation's own cost, excluded below
    row["t"] = t1
    rows.append(row)
    return stats
Reconstruction._run_epoch = timed_epoch
from numba_recon.cli import main
try:
    main(sys.argv[2:], prog_name="numba-recon", standalone_mode=False)
finally:
    # an epoch's full cost runs from the end of the previous one (includes checkpoint and history)
    for a, b in zip(rows, rows[1:]):
        b["epoch_s"] = b["t"] - a["t"] - a["probe_s"]
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f)
"""


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``y`` against ``x``."""
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--particles", type=int, default=200)
    parser.add_argument("--box", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    add_workdir_option(parser, "write the data set and the run")
    parser.add_argument("--csv", type=Path, default=None, help="write the per-epoch table here")
    run_in_work_folder(parser, "numba_recon_long_", run_all)


def run_all(args: argparse.Namespace, work: Path) -> None:
    star = simulated(work / "sim", n_particles=args.particles, box_size=args.box, pixel_size_angstrom=4.0, snr=0.5,
                     seed=2, particles_per_stack=100, max_shift_px=2.0)
    table = work / "epochs.json"
    res = subprocess.run([sys.executable, "-c", CHILD, str(table), "-q", "run", str(star), "-o",
                          str(work / "run"), "--overwrite", "--backend", "cpu", "--optimizer", "adam",
                          "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    rows = json.loads(table.read_text())
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)

    e = np.array([r["epoch"] for r in rows], dtype=float)
    anon = np.array([r["RssAnon"] for r in rows], dtype=float) / 1024
    rss = np.array([r["VmRSS"] for r in rows], dtype=float) / 1024
    objects = np.array([r["gc_objects"] for r in rows], dtype=float)
    epoch_s = np.array([r.get("epoch_s", np.nan) for r in rows])
    compute_s = np.array([r["compute_s"] for r in rows])
    print(f"{args.epochs} epochs, {args.particles} particles, box {args.box}, batch {args.batch_size}, "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'all')}")
    print(f"{'epochs':>11} {'epoch ms':>9} {'compute ms':>10} {'VmRSS MiB':>9} {'RssAnon MiB':>11} {'gc objects':>10}")
    edges = np.linspace(0, len(rows), 11).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        lo = max(lo, 1)  # the first epoch has no start time
        print(f"{int(e[lo]):>5}-{int(e[hi - 1]):<5} {np.nanmedian(epoch_s[lo:hi]) * 1e3:>9.1f} "
              f"{np.median(compute_s[lo:hi]) * 1e3:>10.1f} {np.median(rss[lo:hi]):>9.1f} "
              f"{np.median(anon[lo:hi]):>11.1f} {np.median(objects[lo:hi]):>10.0f}")
    warm = slice(10, None)  # skip start-up (JIT, first allocations)
    print(f"after epoch 10: RssAnon {anon[9]:.1f} -> {anon[-1]:.1f} MiB (max {anon[warm].max():.1f}); "
          f"gc objects {objects[9]:.0f} -> {objects[-1]:.0f}; fitted slopes {slope(e[warm], anon[warm]) * 1024:+.2f} "
          f"KiB/epoch, {slope(e[warm], epoch_s[warm]) * 1e6:+.2f} us/epoch")
    print("epoch ms: from the end of one epoch to the end of the next (compute, checkpoint, history.csv); "
          "compute ms: the epoch's optimiser steps, cross-validation and FSC")


if __name__ == "__main__":
    main()
