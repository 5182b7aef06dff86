"""Wall time of ``numba-recon run`` when only a tenth of the prepared particles fits in the cache.

Simulates a box-128 data set, then runs ``numba-recon run --backend cpu`` in a fresh process with
the full cache (every prepared particle kept) and with ``--cache-mb`` holding a tenth of them (the
rest prepared again at every pass by the background reader, :class:`numba_recon.batch.BatchLoader`),
alternating the two so that a change in the machine's load hits both. The runs make all ``--epochs``
passes (``--no-early-stop``), so that the passes, which stream, outweigh the fixed costs. For each run it reports the
wall time of the command in the child (interpreter start excluded), its CPU time (user + system,
all threads) and its peak resident memory (``ru_maxrss``), and it checks that every run wrote
bitwise the same maps (``run_class001.mrc`` and both half maps). A prepared particle takes
``2 N^2 * 4 + 16`` bytes (131 088 at box 128).

``--sync`` adds runs with the tenth cache and no background reader
(``numba_recon.batch.PREFETCH_DEPTH = 0`` in the child): what the read-ahead itself gains.

Example (about 3 minutes on 2 cores)::

    python benchmarks/cache_streaming.py --particles 3000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import add_workdir_option, measured_child, measured_report, run_in_work_folder, simulated

# The child: run the command line in-process and print its wall time on stderr.
# ``NUMBA_RECON_BENCH_PREFETCH`` sets the read-ahead depth of the loader.
CHILD = measured_child(setup="""
import numba_recon.batch as batch
if os.environ.get("NUMBA_RECON_BENCH_PREFETCH"):
    batch.PREFETCH_DEPTH = int(os.environ["NUMBA_RECON_BENCH_PREFETCH"])
""")

MAPS = ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc")


def row_bytes(box: int) -> int:
    """Memory of one prepared particle in the loader's cache: ``H T^-1 b`` and ``H^2``, float32."""
    return 2 * box * box * 4 + 16


def cache_mb_for(rows: int, box: int) -> float:
    """The ``--cache-mb`` that holds exactly ``rows`` prepared particles (half a row of slack, so the
    engine's ``int(mb * 2**20)`` does not round down to one row fewer)."""
    return (rows * row_bytes(box) + row_bytes(box) // 2) / 2**20


def measure(args: list[str], env: dict[str, str], log: Path, timeout: float = 1800) -> dict:
    """Run ``numba-recon <args>`` in a fresh process; its wall time, CPU time and peak memory."""
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not the sum of all children
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        outer = time.perf_counter() - t0
    text = log.read_text()
    report = measured_report(text)
    if proc.returncode != 0 or report is None or report["status"] != 0:
        raise RuntimeError(f"numba-recon {' '.join(args)} failed:\n{text[-3000:]}")
    report.update(process_s=outer, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_mib=usage.ru_maxrss / 1024)
    return report


def maps_of(out: Path) -> list[np.ndarray]:
    import mrcfile

    return [mrcfile.read(out / name) for name in MAPS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=3000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the prepared particles the small "
                        "cache holds")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each cache size (median reported)")
    parser.add_argument("--epochs", type=int, default=4, help="cg passes")
    parser.add_argument("--early-stop", action="store_true", help="let the held-out loss stop the runs (after two "
                        "passes on the default data set, where fixed costs then dominate); default: all passes")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sync", action="store_true", help="also run the small cache without the background reader")
    add_workdir_option(parser, "simulate and run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    run_in_work_folder(parser, "numba_recon_stream_", run_all)


def run_all(args: argparse.Namespace, work: Path) -> None:
    from numba_recon.tools.bench import machine_info

    data = work / "data"
    t0 = time.perf_counter()
    simulated(data, n_particles=args.particles, box_size=args.box, pixel_size_angstrom=2.0, snr=0.1, seed=1,
              max_shift_px=3.0, particles_per_stack=500)
    simulate_s = time.perf_counter() - t0
    n, box = args.particles, args.box
    small_rows = max(1, int(round(args.fraction * n)))
    modes = {"full": (cache_mb_for(n, box) + 1.0, ""),
             "tenth" if args.fraction == 0.1 else f"{args.fraction:g}": (cache_mb_for(small_rows, box), "")}
    if args.sync:
        modes[f"{list(modes)[1]}, no read-ahead"] = (modes[list(modes)[1]][0], "0")
    info = machine_info()
    cores = info["cpus_usable"]
    machine = {"nproc": cores, "cpu": info["cpu_model"], "python": info["python"], "load_before": os.getloadavg()}
    print(f"{n} particles, box {box}, batch {args.batch_size}, --epochs {args.epochs}"
          f"{'' if args.early_stop else ' --no-early-stop'}; prepared particle "
          f"{row_bytes(box)} B; {cores} cores ({machine['cpu']}); simulated in {simulate_s:.0f} s; "
          f"load average {machine['load_before'][0]:.1f}", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    reference = None
    for r in range(args.repeats):
        for mode, (mb, prefetch) in modes.items():
            out = work / f"run_{len(results[mode])}_{mode.replace(',', '').replace(' ', '_')}"
            command = ["-q", "run", str(data / "particles.star"), "-o", str(out), "--overwrite", "--backend", "cpu",
                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--cache-mb", f"{mb:.6f}",
                       "--early-stop" if args.early_stop else "--no-early-stop"]
            env = dict(os.environ, NUMBA_RECON_BENCH_PREFETCH=prefetch)
            report = measure(command, env, work / f"{out.name}.log")
            maps = maps_of(out)
            if reference is None:
                reference = maps
            report["identical_maps"] = all(np.array_equal(a, b) for a, b in zip(reference, maps))
            report["cache_mb"] = mb
            report["command"] = "numba-recon " + " ".join(command)
            results[mode].append(report)
            print(f"  {mode:<22} run {r + 1}: {report['wall_s']:6.1f} s wall, {report['cpu_s']:6.1f} s CPU, "
                  f"peak RSS {report['peak_rss_mib']:6.0f} MiB, maps identical: {report['identical_maps']}",
                  flush=True)
    machine["load_after"] = os.getloadavg()
    print()
    print("| cache | --cache-mb | prepared particles kept | wall s (runs) | median wall s | median CPU s "
          "| peak RSS MiB | maps identical |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for mode, reports in results.items():
        mb = reports[0]["cache_mb"]
        kept = min(n, int(mb * 2**20) // row_bytes(box))
        wall = statistics.median(r["wall_s"] for r in reports)
        cpu = statistics.median(r["cpu_s"] for r in reports)
        rss = max(r["peak_rss_mib"] for r in reports)
        same = all(r["identical_maps"] for r in reports)
        summary[mode] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss, "kept": kept, "identical": same}
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in reports)
        print(f"| {mode} | {mb:.1f} | {kept} of {n} | {walls} | {wall:.1f} | {cpu:.1f} | {rss:.0f} "
              f"| {'yes' if same else 'NO'} |")
    full = summary["full"]
    for mode, s in summary.items():
        if mode != "full":
            print(f"{mode} / full: wall {s['wall_s'] / full['wall_s']:.2f}x, CPU {s['cpu_s'] / full['cpu_s']:.2f}x")
    print(f"load average (1 min) before {machine['load_before'][0]:.1f}, after {machine['load_after'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": results, "summary": summary}, indent=1) + "\n")
    if not all(s["identical"] for s in summary.values()):
        raise SystemExit("the maps differ between cache sizes")


if __name__ == "__main__":
    main()
