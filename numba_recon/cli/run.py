"""Reconstruct gold-standard half maps from particles with known poses.

\b
Examples:
  numba-recon run particles.star -o recon
  mpirun -n 4 numba-recon run particles.star -o recon --backend cuda
  numba-recon run particles.thu --angpix 1.34 -o recon --loss trimmed --keep-fraction 0.5:0.8
  numba-recon run --resume recon            # continue after a crash or with more --epochs
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from numba_recon.backend import CHOICES as BACKENDS
from numba_recon.cli._common import (FRACTION, NONNEGATIVE_FLOAT, NONNEGATIVE_INT, PIXEL_SIZE, POSITIVE_FLOAT,
                                     POSITIVE_INT, RESOLUTION_ANGSTROM, SEED, FiniteNumber, OptionValueError,
                                     handle_errors, option_name, prepare_output_dir)
from numba_recon.config import OPTIMIZERS, PREPARE_ON
from numba_recon.errors import InputError, OutputError
from numba_recon.io.run_files import (COMMAND_TXT, HALF1_MAP, HALF2_MAP, MAP, REPORT_HTML, RUN_OUTPUT_FILES,
                                      RUN_OUTPUT_FOLDERS, SUCCESS_MARKER)
from numba_recon.loss import LOSS_NAMES

log = logging.getLogger(__name__)


class KeepFraction(click.ParamType):
    """``--keep-fraction``: ``"0.5:0.8"`` -> (0.5, 0.8); ``"0.7"`` -> (0.7, 0.7); ``"auto"`` -> (None, None).
    Each part is a :data:`~numba_recon.cli._common.FRACTION`."""

    name = "START:END|auto"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[float | None, float | None]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if text.lower() == "auto":
            return None, None
        parts = text.split(":")
        if len(parts) > 2:
            why = f"{len(parts)} parts"
        else:
            parsed = [FRACTION.parse(part) for part in parts]
            why = next((reason or "outside (0, 1]" for _, reason in parsed if reason is not None), None)
            if why is None:
                return float(parsed[0][0]), float(parsed[-1][0])
        raise OptionValueError(f"must be auto, a fraction in (0, 1] or START:END (got {text!r}: {why}); e.g. "
                               f"{option_name(param)} 0.5:0.8", ctx=ctx, param=param)


#: Held-out share of each half: [0, 0.5), so the training part stays the larger.
CV_FRACTION = FiniteNumber(0, 0.5, max_open=True)


@click.command("run", help=__doc__)
@click.argument("particles", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=True), help="Output folder.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="cg", show_default=True,
              help="cg: one-pass direct reconstruction refined by preconditioned conjugate gradients, stopping "
                   "when the held-out loss stops improving; adam: minibatch Adam.")
@click.option("--epochs", type=POSITIVE_INT, default=None,
              help="Passes over each half set (cg: at most, 1 = the direct reconstruction alone).  "
                   "[default: 8 for cg, 20 for adam]")
@click.option("--early-stop/--no-early-stop", default=True, show_default=True,
              help="cg: stop when the held-out loss stops improving (the maps with the lowest held-out loss are "
                   "kept either way).")
@click.option("--drop-duplicates", is_flag=True,
              help="Keep the first row of each image when rows repeat an image (refused otherwise: one image in "
                   "both half sets would inflate the resolution).")
@click.option("--precondition", is_flag=True,
              help="adam: precondition the minibatch gradients with the Fourier model of the normal operator "
                   "(built in one extra pass); cg always does.")
@click.option("--particle-diameter", type=POSITIVE_FLOAT, default=None,
              help="Particle diameter in Angstrom (RELION's --particle_diameter): cg keeps the map in a soft-edged "
                   "sphere of this diameter.  [default: estimated from the data]")
@click.option("--batch-size", type=POSITIVE_INT, default=256, show_default=True,
              help="Particles per half per optimiser step, summed over all MPI ranks.")
@click.option("--lr", type=POSITIVE_FLOAT, default=0.2, show_default=True,
              help="Adam step size relative to the map scale (cosine-decayed to 5% over the run).")
@click.option("--reg-lambda", type=NONNEGATIVE_FLOAT, default=None,
              help="adam: lambda of the regulariser n*lambda^2*||x||^2 (default 0.01); cg: an optional fixed ridge "
                   "lambda^2 <K> on top of the prior learned from the FSC (default 0).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seeds half split, hold-out and batch order (0 to 2^63-1).")
@click.option("--angpix", type=PIXEL_SIZE, default=None, help="Pixel size in Angstrom (needed for .thu input).")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder that stack paths in the STAR file are relative to (default: the STAR file's folder).")
@click.option("--class", "class_number", type=int, default=None, help="Use only particles of this rlnClassNumber.")
@click.option("--cv-fraction", type=CV_FRACTION, default=0.05, show_default=True,
              help="Fraction of each half held out for the cross-validation loss.")
@click.option("--checkpoint-every", type=POSITIVE_INT, default=1, show_default=True, help="Checkpoint every N epochs.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this folder from its newest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the results in an existing output folder.")
@click.option("--initial-map", type=click.Path(dir_okay=False), default=None,
              help="adam: start both halves from this map, low-passed at --initial-lowpass (cg starts from the direct "
                   "reconstruction and ignores it).")
@click.option("--initial-lowpass", type=RESOLUTION_ANGSTROM, default=60.0, show_default=True,
              help="adam: low-pass the start map at this resolution in Angstrom (RELION's --ini_high). Both halves "
                   "share the start map, so detail beyond this would be common to them and inflate the FSC.")
@click.option("--loss", type=click.Choice(LOSS_NAMES), default="l2", show_default=True,
              help="Per-particle loss: plain least squares, trimmed (sorted) or iteratively reweighted.")
@click.option("--keep-fraction", type=KeepFraction(), default="auto", show_default=True, metavar="START:END|auto",
              help="Trimmed loss: kept fraction START:END, moving linearly over the robust epochs, or auto "
                   "(keep particles scoring within 3 robust sigmas of the good population).")
@click.option("--robust-warmup", type=NONNEGATIVE_INT, default=2, show_default=True,
              help="Epochs of plain L2 before a robust loss starts.")
@click.option("--reweight-power", type=POSITIVE_FLOAT, default=1.0, show_default=True,
              help="Reweighted loss: weights ~ 1/(loss + eps)^p.")
@click.option("--sym", "symmetry", default="C1", show_default=True, help="Point group: C1, Cn, Dn, T, O, I1-I4.")
@click.option("--truth", type=click.Path(dir_okay=False), default=None,
              help="A map of the truth (simulated data): the report adds its FSC with the map.  [default: truth.mrc "
                   "beside the particle file, when its box and voxel size fit]")
@click.option("--mask", type=click.Path(dir_okay=False), default=None,
              help="Mask for post-processing at the end of the run (masked FSC, sharpening).")
@click.option("--radius", "radius_px", type=POSITIVE_FLOAT, default=None,
              help="Map support radius in pixels (default N/2-1).")
@click.option("--threads", type=POSITIVE_INT, default=None,
              help="CPU threads per process for the kernels and FFTs.  [default: the cores available divided by "
                   "the MPI ranks on the node]")
@click.option("--keep-checkpoints", type=POSITIVE_INT, default=1, show_default=True,
              help="Checkpoints kept once the run has finished (during the run the newest two are kept; at box 400 "
                   "each holds several GB).")
@click.option("--cache-mb", type=NONNEGATIVE_FLOAT, default=2048, show_default=True,
              help="Memory for particles kept between passes (prepared on the host, or as read when they are "
                   "prepared on the GPU); beyond it particles are re-read every pass.")
@click.option("--prepare-on", "prepare_on", type=click.Choice(PREPARE_ON), default="auto",
              show_default=True,
              help="Where particle images get their CTF and shift: the backend's device, or host numpy while the "
                   "backend computes. auto: device with --backend cuda, host on the CPU.")
@click.pass_context
@handle_errors
def run(ctx: click.Context, particles: str | None, out_dir: str | None, resume_dir: str | None, overwrite: bool,
        keep_fraction: tuple[float | None, float | None], optimizer: str, epochs: int | None, early_stop: bool,
        drop_duplicates: bool, precondition: bool, particle_diameter: float | None, batch_size: int, lr: float,
        reg_lambda: float | None, backend: str, seed: int, angpix: float | None, root: str | None,
        class_number: int | None, cv_fraction: float, checkpoint_every: int, initial_map: str | None,
        initial_lowpass: float, loss: str, robust_warmup: int, reweight_power: float, symmetry: str,
        truth: str | None, mask: str | None, radius_px: float | None, threads: int | None, keep_checkpoints: int,
        cache_mb: float, prepare_on: str) -> None:
    from numba_recon.config import RunConfig
    from numba_recon.reduce import get_comm

    # Each option and the RunConfig field it sets. The keys are also the options' click names, which
    # --resume uses to tell what the command line gave (RESUME_SAFE_OPTIONS).
    settings: dict[str, Any] = {
        "optimizer": optimizer, "epochs": epochs, "early_stop": early_stop, "drop_duplicates": drop_duplicates,
        "precondition": precondition, "particle_diameter": particle_diameter, "batch_size": batch_size, "lr": lr,
        "reg_lambda": reg_lambda, "backend": backend, "seed": seed, "angpix": angpix, "root": root,
        "class_number": class_number, "cv_fraction": cv_fraction, "checkpoint_every": checkpoint_every,
        "initial_map": initial_map, "initial_lowpass": initial_lowpass, "loss": loss, "robust_warmup": robust_warmup,
        "reweight_power": reweight_power, "symmetry": symmetry, "truth": truth, "mask": mask, "radius_px": radius_px,
        "keep_checkpoints": keep_checkpoints, "cache_mb": cache_mb, "prepare_on": prepare_on,
    }
    comm = get_comm()
    _use_threads(threads, comm)
    resume = resume_dir is not None
    if resume:
        config = _config_from_checkpoint(resume_dir, ctx, settings, particles)
    else:
        if particles is None:
            raise InputError("no particle file given", None, "usage: numba-recon run PARTICLES.star -o OUTDIR")
        if out_dir is None:
            raise InputError("no output folder given", None, "add -o OUTDIR")
        keep_start, keep_end = keep_fraction
        # absolute paths: a resume from another working directory finds the same files
        for name in ("root", "mask", "initial_map", "truth"):
            if settings[name]:
                settings[name] = str(Path(settings[name]).resolve())
        config = RunConfig(particles=str(Path(particles).resolve()), out_dir=str(Path(out_dir).resolve()),
                           keep_start=keep_start, keep_end=keep_end, **settings)
        if not Path(particles).is_file():
            raise InputError("file not found", particles, "check the path")
        _refuse_inputs_among_outputs(config, Path(out_dir))
    verbosity = (ctx.find_root().obj or {}).get("verbosity", 0)
    from numba_recon.recon.engine import Reconstruction

    # reading and checking every input comes first: invalid input leaves no (empty) -o folder behind
    job = Reconstruction(config, comm=comm, progress=verbosity >= 0, resume=resume)
    if not resume:
        if comm.is_root:
            _clear_outputs(prepare_output_dir(out_dir, overwrite), overwrite, config)
        comm.barrier()
    if resume and comm.is_root:
        # only now, with the stored run reloaded and checked, is the finished run's marker withdrawn
        _clear_outputs(Path(config.out_dir), resume=True)
    handler = _start_records(Path(config.out_dir), resume, verbosity) if comm.is_root else None
    try:
        summary = job.run()
    except KeyboardInterrupt:
        _interrupted(job, comm)
    finally:
        if handler is not None:
            from numba_recon.journal import detach_log

            detach_log(handler)
    if comm.is_root:
        from numba_recon.checkpoint import prune_checkpoints

        out = Path(config.out_dir)
        prune_checkpoints(out, config.keep_checkpoints)
        _mark_success(out)
        click.echo(f"Resolution (half maps, FSC 0.143): {summary['resolution_angstrom']:.2f} A")
        masked = summary.get("postprocess") or {}
        if masked.get("resolution_angstrom") is not None:
            click.echo(f"Resolution (masked, phase-randomisation corrected, FSC 0.143): "
                       f"{masked['resolution_angstrom']:.2f} A  (mask {masked.get('mask') or config.mask})")
        click.echo(f"Maps: {out / MAP}, {out / HALF1_MAP}, {out / HALF2_MAP}")
        click.echo(f"Report: {out / REPORT_HTML}")




def _start_records(out: Path, resume: bool, verbosity: int):
    """note.txt gets this command, run.log the log from here on; a new run writes command.txt (a
    resume keeps the command that started the run). Returns the log handler."""
    from numba_recon.io.atomic import atomic_write_text
    from numba_recon.journal import append_note, attach_log, command_line

    append_note(out)
    if not resume:
        atomic_write_text(out / COMMAND_TXT, command_line() + "\n", durable=True)
    return attach_log(out, verbosity)


def _use_threads(threads: int | None, comm) -> None:
    """Set the threads of this process: ``--threads`` (positive, by its type), else the cores available
    over the ranks on the node."""
    from numba_recon.threads import available_cores, default_threads, set_threads

    n = threads if threads is not None else default_threads(comm.local_size)
    kernel = set_threads(n)
    log.debug("%d thread(s) per process (%d core(s) available, %d rank(s) on this node)%s", n, available_cores(),
              comm.local_size, "" if kernel == n else f"; Numba kernels capped at NUMBA_NUM_THREADS={kernel}")


def _interrupted(job, comm) -> None:
    """Ctrl-C (SIGINT): say how far the run got and how to continue it, exit status 130."""
    import shlex

    from numba_recon.cli._common import fail

    if not comm.is_root:
        raise SystemExit(130)
    done = job.state.epoch if job.state is not None else 0
    saved = job.last_checkpoint_epoch
    out = Path(job.config.out_dir)
    if saved:
        fail(f"interrupted after {done} complete epoch(s) of {job.config.epochs}; the newest checkpoint is epoch "
             f"{saved}: continue with  numba-recon run --resume {shlex.quote(str(out))}", 130)
    fail(f"interrupted after {done} complete epoch(s), before the first checkpoint in {out}: nothing to resume; "
         "rerun the same command with --overwrite", 130)


def _refuse_inputs_among_outputs(config, out: Path) -> None:
    """Refuse an input file (particles, mask, start map) that this run would overwrite or remove,
    with or without --overwrite: a run never destroys its own input."""
    targets = [out / name for name in RUN_OUTPUT_FILES]
    folders = [(out / name).resolve() for name in RUN_OUTPUT_FOLDERS]
    for option, value in (("particles", config.particles), ("--mask", config.mask),
                          ("--initial-map", config.initial_map)):
        if not value or not Path(value).exists():
            continue
        path = Path(value).resolve()
        clash = next((t for t in targets if t.exists() and os.path.samefile(t, path)), None)
        if clash is None and any(f == path.parent or f in path.parents for f in folders):
            clash = path
        if clash is not None:
            raise InputError(f"the {option} file is where this run writes its own output ({clash})", value,
                             "copy it elsewhere first, or give another -o folder")


def run_output_names(config) -> tuple[str, ...]:
    """The names a run with ``config`` may write (relative to its folder): with --overwrite, a file of
    another with one of these names is refused, never replaced."""
    from numba_recon.checkpoint import checkpoint_name
    from numba_recon.io.run_files import (CHECKPOINTS_DIR, LATEST_CHECKPOINT_JSON, PLOT_FILES, PLOTS_DIR,
                                          POSTPROCESS_DIR)

    names = [*RUN_OUTPUT_FILES, f"{CHECKPOINTS_DIR}/{LATEST_CHECKPOINT_JSON}",
             *(f"{PLOTS_DIR}/{name}" for name in PLOT_FILES)]
    epochs = getattr(config, "epochs", None) or 0
    names += [f"{CHECKPOINTS_DIR}/{checkpoint_name(e)}" for e in range(1, epochs + 1)]
    if getattr(config, "mask", None):
        names.append(f"{POSTPROCESS_DIR}/postprocess*")
    return tuple(names)


def _clear_outputs(out: Path, overwrite: bool = False, config=None, resume: bool = False) -> None:
    """Start (or, with ``resume``, continue) the run's output manifest in ``out`` and record into it.

    With --overwrite, remove exactly what the previous run's manifest lists and that is still
    unchanged (its maps, checkpoints, plots, post-processing...), then the folders it created that
    are empty; never a file the run did not write (``docs/outputs-and-overwrite.md``). Files that
    stay are named in a warning. The job markers are withdrawn either way.
    """
    from numba_recon import manifest

    protect = [] if config is None else [config.particles, config.mask, config.initial_map]
    manifest.start(out, "run", overwrite=overwrite, resume=resume, protect=protect, folders=RUN_OUTPUT_FOLDERS,
                   outputs=run_output_names(config), markers=manifest.MARKERS)
    if resume:
        manifest.withdraw_markers(out)


def _mark_success(out: Path) -> None:
    """RELION's marker of a finished job, listed in the output manifest."""
    from numba_recon.io.atomic import write_marker

    write_marker(out / SUCCESS_MARKER)


def _config_from_checkpoint(resume_dir: str, ctx: click.Context, options: dict[str, Any], particles: str | None):
    """The stored configuration of a run, with --epochs (and the number of ranks) allowed to change.

    ``options`` maps RunConfig fields to this command line's values (defaults included); only those
    the command line gave are compared with the stored run.
    """
    from numba_recon.checkpoint import load_latest
    from numba_recon.config import RunConfig

    out = Path(resume_dir)
    if not out.is_dir():
        raise OutputError("no such run folder", out, "give the -o folder of an earlier run")
    ckpt = load_latest(out)
    if ckpt is None:
        raise OutputError("no usable checkpoint in this folder", out, "start a new run with -o and --overwrite")
    data = dict(ckpt.config)
    data["out_dir"] = str(out.resolve())
    given = [name for name in options if _from_command_line(ctx, name)]
    changing = [name for name in given if name not in RESUME_SAFE_OPTIONS and options[name] != data.get(name)]
    if _from_command_line(ctx, "keep_fraction"):
        changing.append("keep_fraction")
    if changing:
        spelling = {param.name: max(param.opts, key=len) for param in ctx.command.params if param.opts}
        flags = ", ".join(spelling.get(name, name) for name in changing)
        raise InputError(f"--resume continues the stored run, and {flags} would change it", out,
                         "resume without those options (only --epochs, --early-stop/--no-early-stop, --mask, "
                         "--backend, --cache-mb, --prepare-on and --checkpoint-every may change), or start a new run "
                         "in another -o folder")
    for name in given:
        if name in RESUME_SAFE_OPTIONS:
            data[name] = (str(Path(options[name]).resolve()) if name in ("mask", "truth") and options[name]
                          else options[name])
    if particles is not None and Path(particles).resolve() != Path(data["particles"]).resolve():
        raise InputError("the particle file differs from the one the run started with", particles,
                         f"resume with {data['particles']} (or omit the file)")
    return RunConfig.from_dict(data)


#: Options a resumed run may change: how long it goes on and what it writes at the end, not what
#: it computes.
RESUME_SAFE_OPTIONS = ("epochs", "early_stop", "mask", "backend", "cache_mb", "prepare_on", "checkpoint_every",
                       "keep_checkpoints", "truth")


def _from_command_line(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"
