"""Reading cost with many optics groups and many stack files, against one group in one stack.

Writes the same particles (random images, random poses and CTFs) in four layouts: one optics group
in one stack (the baseline), hundreds of optics groups, thousands of stacks, and both. For each it
times :func:`numba_recon.io.star.read_star` (parsing, optics merge, validation of every stack
header) and two full passes over the images through :class:`numba_recon.io.mrc.StackReader`:
in file order in batches (as ``numba-recon info --check-images`` does) and in random minibatches
(as every epoch of ``numba-recon run --cache-mb 0`` does, which with thousands of stacks keeps
opening and closing files beyond the reader's cache of open stacks).

Example (about 1 minute on 2 cores)::

    python benchmarks/io_scaling.py --particles 20000 --groups 500 --stacks 2000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import add_workdir_option, run_in_work_folder


def write_layout(folder: Path, n: int, box: int, n_groups: int, n_stacks: int, seed: int = 0) -> Path:
    """``n`` particles in ``n_stacks`` stacks and ``n_groups`` optics groups; returns the STAR file."""
    import pandas as pd
    import starfile

    from numba_recon.io.mrc import write_stack

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Particles").mkdir(exist_ok=True)
    per_stack = -(-n // n_stacks)
    names = []
    for k in range(n_stacks):
        count = min(per_stack, n - k * per_stack)
        if count <= 0:
            break
        stack = f"Particles/stack_{k:05d}.mrcs"
        write_stack(folder / stack, rng.standard_normal((count, box, box)).astype(np.float32), 1.5, overwrite=True)
        names += [f"{i + 1:06d}@{stack}" for i in range(count)]
    groups = np.arange(1, n_groups + 1)
    optics = pd.DataFrame({
        "rlnOpticsGroup": groups,
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
        "rlnAmplitudeContrast": 0.1,
        "rlnSphericalAberration": 2.7,
        "rlnVoltage": 300.0,
        "rlnImagePixelSize": 1.5,
        "rlnImageSize": box,
        "rlnImageDimensionality": 2,
    })
    defocus = rng.uniform(8000, 25000, n)
    particles = pd.DataFrame({
        "rlnImageName": names,
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-3, 3, n),
        "rlnOriginYAngst": rng.uniform(-3, 3, n),
        "rlnDefocusU": defocus,
        "rlnDefocusV": defocus - 200,
        "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnOpticsGroup": rng.integers(1, n_groups + 1, n),
        "rlnRandomSubset": np.arange(n) % 2 + 1,
    })
    starfile.write({"optics": optics, "particles": particles}, folder / "particles.star", overwrite=True)
    return folder / "particles.star"


def time_read_star(star: Path, repeats: int) -> tuple[float, object]:
    from numba_recon.io.star import read_star

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        particles = read_star(star)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), particles


def time_pass(particles, order: np.ndarray, batch: int) -> float:
    """One pass over all images in ``order``, ``batch`` at a time, through a fresh reader."""
    from numba_recon.io.mrc import StackReader

    reader = StackReader()
    t0 = time.perf_counter()
    for start in range(0, order.size, batch):
        particles.read_images(order[start:start + batch], reader=reader)
    elapsed = time.perf_counter() - t0
    reader.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=20000)
    parser.add_argument("--box", type=int, default=16)
    parser.add_argument("--groups", type=int, default=500, help="optics groups of the many-groups layouts")
    parser.add_argument("--stacks", type=int, default=2000, help="stack files of the many-stacks layouts")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    add_workdir_option(parser, "write the layouts")
    run_in_work_folder(parser, "numba_recon_io_", run_all)


def run_all(args: argparse.Namespace, work: Path) -> None:
    from numba_recon.io.mrc import MAX_OPEN_STACKS, factorize_paths

    layouts = [("1 group, 1 stack", 1, 1), (f"{args.groups} groups, 1 stack", args.groups, 1),
               (f"1 group, {args.stacks} stacks", 1, args.stacks),
               (f"{args.groups} groups, {args.stacks} stacks", args.groups, args.stacks)]
    print(f"{args.particles} particles, box {args.box}, batches of {args.batch_size}, "
          f"reader keeps {MAX_OPEN_STACKS} stacks open; median of {args.repeats} (read_star), one pass each")
    print(f"{'layout':<28} {'read_star s':>11} {'file-order pass s':>17} {'random-batch pass s':>19}")
    base = None
    for label, groups, stacks in layouts:
        star = write_layout(work / f"g{groups}_s{stacks}", args.particles, args.box, groups, stacks)
        read_s, particles = time_read_star(star, args.repeats)
        codes, _ = factorize_paths(particles.stack_paths)
        file_order = np.lexsort((particles.stack_indices, codes))
        random_order = np.random.default_rng(1).permutation(len(particles))
        sorted_s = time_pass(particles, file_order, args.batch_size)
        random_s = time_pass(particles, random_order, args.batch_size)
        row = (read_s, sorted_s, random_s)
        base = base or row
        ratios = [f"({v / b:.1f}x)" for v, b in zip(row, base)]
        print(f"{label:<28} {read_s:>5.2f} {ratios[0]:>6} {sorted_s:>10.2f} {ratios[1]:>7} "
              f"{random_s:>11.2f} {ratios[2]:>8}", flush=True)


if __name__ == "__main__":
    main()
