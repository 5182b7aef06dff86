"""Peak memory of ``numba-recon run`` against the number of particles.

Builds RELION data sets of increasing size whose images live in one large memory-mapped stack
(the images of a small simulated data set repeated, so every image is a real particle), runs one
epoch of ``numba-recon run`` on each in a fresh process, and reports that process's peak memory:
``ru_maxrss`` (what a batch system reports) and the peaks of anonymous memory (``RssAnon``: arrays
the program allocates) and of mapped file pages (``RssFile``: memory-mapped stacks), sampled from
``/proc/self/status`` every 20 ms.

Each size runs twice: ``--cache-mb 0`` (prepared particles are not kept: memory must not depend on
the data set) and the default cache (2048 MB: the prepared data set is kept while it fits, so
memory grows with it by design, 2 N^2 float32 per particle). ``--mmap-reads`` adds a run of the
largest size that reads images by indexing the memory map instead of with ``preadv``, to show
what reading through the map costs in resident memory.

Example (about 2.5 minutes on 2 cores)::

    NUMBA_NUM_THREADS=2 python benchmarks/memory_scaling.py --sizes 5000 15000 50000 --mmap-reads
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import add_workdir_option, measured_child, measured_report, run_in_work_folder, simulated

# The child: sample /proc/self/status in a thread, run the command line in-process, print a JSON
# line of peaks on stderr. ``NUMBA_RECON_BENCH_MMAP_READS=1`` reads images through the memory map.
CHILD = measured_child(setup="""
import resource, threading
peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
samples = []
stop = threading.Event()
def sample():
    while not stop.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        stop.wait(0.02)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
if os.environ.get("NUMBA_RECON_BENCH_MMAP_READS") == "1":
    import numba_recon.io.mrc as mrc
    mrc.READ_WITH_PREAD = False
""", finish="""
stop.set()
thread.join()
report["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
report.update({f"peak_{k}_mib": v / 1024 for k, v in peak.items()})
""")


def measure(args: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> dict:
    """Run ``numba-recon <args>`` in a fresh Python process; return its peak-memory report."""
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=timeout,
                         env=env or dict(os.environ))
    report = measured_report(res.stderr)
    if res.returncode != 0 or report is None:
        raise RuntimeError(f"numba-recon {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    if report["status"] != 0:
        raise RuntimeError(f"numba-recon {' '.join(args)} exited with {report['status']}:\n{res.stderr[-3000:]}")
    return report


def build_base(folder: Path, box: int, n_base: int) -> Path:
    """A small simulated data set whose images and poses are repeated to build the large ones."""
    return simulated(folder, n_particles=n_base, box_size=box, pixel_size_angstrom=3.0, snr=0.5, seed=1,
                     particles_per_stack=n_base, max_shift_px=2.0)


def build_large(base_star: Path, folder: Path, n: int) -> tuple[Path, int]:
    """``n`` particles in one stack ``big.mrcs``: the base images and their metadata, tiled.

    Returns the STAR file and the stack's size in bytes.
    """
    import mrcfile
    import starfile

    folder.mkdir(parents=True, exist_ok=True)
    blocks = starfile.read(base_star, always_dict=True)
    particles = blocks["particles"]
    stack_name = particles["rlnImageName"].iloc[0].split("@", 1)[1]
    with mrcfile.mmap(base_star.parent / stack_name, mode="r") as mrc:
        images = np.array(mrc.data)
        voxel = float(mrc.voxel_size.x)
    k = len(particles)
    table = particles.iloc[np.arange(n) % k].reset_index(drop=True)
    table["rlnImageName"] = [f"{i + 1:07d}@big.mrcs" for i in range(n)]
    table["rlnRandomSubset"] = np.arange(n) % 2 + 1
    starfile.write({"optics": blocks["optics"], "particles": table}, folder / "particles.star", overwrite=True)
    stack = mrcfile.new_mmap(folder / "big.mrcs", shape=(n, *images.shape[1:]), mrc_mode=2, overwrite=True)
    for start in range(0, n, k):
        stop = min(n, start + k)
        stack.data[start:stop] = images[: stop - start]
    stack.set_image_stack()
    stack.voxel_size = voxel
    stack.close()
    return folder / "particles.star", (folder / "big.mrcs").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 15000, 50000], help="particle counts")
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--mmap-reads", action="store_true",
                        help="also run the largest size reading images through the memory map")
    add_workdir_option(parser, "build the data sets and keep them")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    run_in_work_folder(parser, "numba_recon_mem_", run_all)


def run_all(args: argparse.Namespace, work: Path) -> None:
    base = build_base(work / "base", args.box, 2000)
    threads = os.environ.get("NUMBA_NUM_THREADS", "all")
    print(f"box {args.box}, {args.epochs} epoch(s), batch {args.batch_size}, NUMBA_NUM_THREADS={threads}, "
          f"work dir {work}")
    header = (f"{'particles':>9} {'stack MiB':>9} {'cache':>6} {'ru_maxrss':>9} {'RssAnon':>8} {'RssFile':>8} "
              f"{'wall s':>7}")
    print(header)
    results = []
    runs = [(n, cache, "pread") for n in args.sizes for cache in ("0", "2048")]
    if args.mmap_reads:
        runs.append((max(args.sizes), "0", "mmap"))
    for n, cache, reads in runs:
        star, stack_bytes = build_large(base, work / f"n{n}", n)
        out = work / f"n{n}" / f"run_cache{cache}_{reads}"
        env = dict(os.environ)
        env["NUMBA_RECON_BENCH_MMAP_READS"] = "1" if reads == "mmap" else "0"
        t0 = time.perf_counter()
        report = measure(["-q", "run", str(star), "-o", str(out), "--overwrite", "--backend", "cpu",
                          "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--cache-mb", cache],
                         env=env)
        report.update(particles=n, stack_mib=stack_bytes / 2**20, cache_mb=float(cache), reads=reads,
                      total_s=time.perf_counter() - t0)
        results.append(report)
        label = cache + ("" if reads == "pread" else "*")
        print(f"{n:>9} {report['stack_mib']:>9.0f} {label:>6} {report['ru_maxrss_mib']:>9.0f} "
              f"{report['peak_RssAnon_mib']:>8.0f} {report['peak_RssFile_mib']:>8.0f} {report['wall_s']:>7.1f}",
              flush=True)
    if args.mmap_reads:
        print("* images read through the memory map (numba_recon.io.mrc.READ_WITH_PREAD = False)")
    print("memory in MiB; RssAnon and RssFile are peaks sampled every 20 ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
