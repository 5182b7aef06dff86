"""``numba-recon bench``: images per second of the projector kernels."""

from __future__ import annotations

from typing import Any

import click
import numpy as np

from numba_recon.backend import CHOICES as BACKENDS
from numba_recon.cli._common import (POSITIVE_INT, OptionValueError, check_output_file, handle_errors,
                                     overwrite_option)
from numba_recon.errors import InputError


class PositiveIntList(click.ParamType):
    """Comma-separated positive integers, e.g. ``64,128,256``; each item follows :data:`POSITIVE_INT`."""

    name = "N,N,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        for item in items or [""]:
            _, why = POSITIVE_INT.parse(item)
            if why is not None:
                raise OptionValueError(f"must be comma-separated positive integers (got {value!r}: {item!r} is "
                                       f"{why or 'below 1'})", ctx=ctx, param=param)
        return [int(v) for v in items]


@click.command("bench")
@click.option("--backend", "backend_name", type=click.Choice([*(b for b in BACKENDS if b != "auto"), "all"]),
              default="all", show_default=True,
              help="Backend to time; 'all' runs every available one and says which it skipped.")
@click.option("--box", "boxes", type=PositiveIntList(), default="64,128,256", show_default=True,
              help="Box sizes (comma-separated).")
@click.option("--batch", "batches", type=PositiveIntList(), default="1,8,32", show_default=True,
              help="Images per kernel call (comma-separated).")
@click.option("--repeats", type=POSITIVE_INT, default=5, show_default=True,
              help="Timed calls per case after one warm-up call; the median is reported "
                   "(boxes of 256 and more run at most 2).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Array type (float64: CPU only).")
@click.option("--threads", type=POSITIVE_INT, default=None,
              help="CPU threads for the Numba kernels (default: all; set NUMBA_NUM_THREADS to allow more).")
@click.option("--startup", is_flag=True,
              help="Also time a fresh process's import and first call with an empty and with a warm "
                   "kernel cache.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the results and machine details to this JSON file.")
@overwrite_option
@handle_errors
def bench(backend_name: str, boxes: list[int], batches: list[int], repeats: int, dtype: str, threads: int | None,
          startup: bool, json_path: str | None, overwrite: bool) -> None:
    """Benchmark the projector kernels: images/s for projection, back-projection and the full
    loss-and-gradient call (forward_residual + weighted_backproject) of a reconstruction step.

    Data are random, the support radius is box // 2 - 1, rates are batch / median time.

    \b
    Example:
      numba-recon bench --backend cpu --box 128 --batch 32 --repeats 5 --json bench.json
    """
    from numba_recon.tools import bench as b

    if json_path is not None:
        check_output_file(json_path, overwrite)
    backends, skipped = b.resolve_backends(backend_name)
    if dtype == "float64" and "cuda" in backends:
        raise InputError("--dtype float64 runs on the CPU backend only", fix="use --backend cpu or --dtype float32")
    if threads is not None:
        import numba

        if threads > numba.config.NUMBA_NUM_THREADS:
            raise InputError(f"--threads {threads} exceeds NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}",
                             fix="set NUMBA_NUM_THREADS in the environment to allow more threads")
        numba.set_num_threads(threads)
    for s in skipped:
        click.echo(f"skipping {s['backend']}: {s['reason']}", err=True)
    info = b.machine_info(backends)
    gpu = info.get("gpu", {}).get("name") if isinstance(info.get("gpu"), dict) else None
    click.echo(f"# {info['cpu_model']}, {info['cpus_usable']} CPUs, {info['numba_threads']} numba threads"
               + (f", GPU {gpu}" if gpu else ""))
    results = b.run_benchmark(backends, boxes, batches, repeats, np.dtype(dtype))
    click.echo(b.format_table(results))
    startup_rows = []
    if startup:
        for name in backends:
            row = b.measure_startup(name)
            startup_rows.append(row)
            click.echo(f"startup {name}: cold cache {row['cold_s']:.1f} s, warm cache {row['warm_s']:.1f} s "
                       "(fresh process to the end of the first loss-and-gradient call)")
    if json_path is not None:
        b.write_json(json_path, {
            "machine": info,
            "settings": {"backend": backend_name, "boxes": boxes, "batches": batches, "repeats": repeats,
                         "dtype": dtype},
            "results": results,
            "skipped": skipped,
            "startup": startup_rows,
        })
        click.echo(f"wrote {json_path}", err=True)
