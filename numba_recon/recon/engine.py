"""The reconstruction engine: the only code that knows the order of the stages.

read -> batch -> forward -> loss -> adjoint -> reduce -> step -> checkpoint -> evaluate -> report

Each half set is reconstructed independently. The default solver (``cg``) takes full passes over
the particles: preconditioned conjugate gradients on the objective of :mod:`numba_recon.objective`
(data term, per-shell prior learned from the gold-standard FSC, support), an exact line search, and
a stop when the held-out loss no longer falls. ``adam`` takes minibatch steps on
``sum_i w_i l_i + n_h lambda^2 ||x_h||^2``, the minibatch gradient scaled by ``n_h / sum_batch w_i``
so that it estimates the gradient over the training part of half set ``h``
(``docs/reconstruction.md``). The passes of ``cg`` are in :mod:`.cg`, the epochs of ``adam`` in
:mod:`.adam`; run state lives in :mod:`.state`, backend buffers in :mod:`.buffers`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from numba_recon.batch import BatchLoader, shard
from numba_recon.checkpoint import Checkpoint, load_latest, save_checkpoint
from numba_recon.config import RunConfig
from numba_recon.io.atomic import atomic_write_text
from numba_recon.adjoint import weighted_backproject
from numba_recon.forward import forward_residual
from numba_recon.geometry import default_radius_px
from numba_recon.provenance import environment
from numba_recon.errors import InputError, InputFileError
from numba_recon.loss import RobustSchedule, particle_scores
from numba_recon.particles import MIN_BOX_PX
from numba_recon.reduce import Comm, get_comm, select_device
from numba_recon.step import AdamState
from numba_recon.io.run_files import CHECKPOINTS_DIR, HALF_SETS_CSV, HISTORY_CSV
from numba_recon.recon.adam import AdamSolver
from numba_recon.recon.buffers import MIN_NOISE_VAR, Batch, DeviceStep
from numba_recon.recon.cg import MIN_SUPPORT_RADIUS_PX, CGSolver
from numba_recon.recon.state import EpochStats, RunState, particle_fingerprint, second_moment_per_half

log = logging.getLogger(__name__)


class Reconstruction(CGSolver, AdamSolver):
    """One reconstruction job on one rank. Build it, then call :meth:`run`.

    This class reads the particles, prepares batches, checkpoints and writes the outputs; the two
    solvers' passes and epochs are its mixins :class:`.cg.CGSolver` and :class:`.adam.AdamSolver`.

    Parameters
    ----------
    config
        The validated configuration.
    comm
        The communicator (serial stand-in with one process).
    progress
        Show a progress bar on rank 0 (automatically off when stderr is not a terminal).
    resume
        Continue from the newest good checkpoint in ``config.out_dir``.
    """

    def __init__(self, config: RunConfig, comm: Comm | None = None, progress: bool = True,
                 resume: bool = False) -> None:
        from numba_recon.backend import get_backend
        from numba_recon.read import read_particles

        self.config = config
        self.comm = comm or get_comm()
        self.progress = progress
        self.out = Path(config.out_dir)
        self.device_index = select_device(self.comm) if config.backend in ("cuda", "auto") else None
        self.backend = get_backend(config.backend)
        self._warm_up_kernels()
        self.particles = read_particles(config.particles, angpix=config.angpix, root=config.root,
                                        class_number=config.class_number, seed=config.seed)
        self._check_duplicates()
        if len(self.particles) < 4:
            raise InputFileError(f"only {len(self.particles)} particles", config.particles,
                                 "a reconstruction needs at least 4 particles (2 per half set)")
        self.box = int(self.particles.box_size)
        if self.box < MIN_BOX_PX:
            raise InputFileError(f"the particle images are {self.box} x {self.box} px; a reconstruction needs a box "
                                 f"of at least {MIN_BOX_PX} px", config.particles,
                                 "extract the particles in a larger box")
        self.angpix = float(self.particles.pixel_size_angstrom)
        #: the largest support radius of the box, and the one this run uses (``--radius``, or the largest)
        self.max_radius_px = default_radius_px(self.box)
        self.radius = float(config.radius_px if config.radius_px is not None else self.max_radius_px)
        if config.radius_px is not None and self.radius < MIN_SUPPORT_RADIUS_PX:
            # a support of a few voxels gives a map without content and a meaningless FSC
            raise InputError(f"--radius {config.radius_px:g} px is too small", None,
                             f"give a support of at least {MIN_SUPPORT_RADIUS_PX:g} px radius, or omit --radius for "
                             f"N/2 - 1 = {self.max_radius_px:g} px")
        if config.mask:
            from numba_recon.evaluate.mask import validate_mask

            validate_mask(config.mask, self.box, self.angpix)  # a wrong mask stops the run before any work
        if config.truth:
            from numba_recon.evaluate.truth import find_truth

            find_truth(config.particles, self.box, self.angpix, config.truth)  # so does a truth that does not fit
        self.background = self._survey_images()
        #: particles get their CTF and shift where the operator runs (``--prepare-on``)
        self.prepare_on_device = config.prepare_on == "device" or (config.prepare_on == "auto"
                                                                    and self.backend.name == "cuda")
        self.loader = BatchLoader(self.particles, cache_bytes=int(config.cache_mb * 2**20), raw=self.prepare_on_device)
        self._device_constants: dict[str, Any] = {}
        self.schedule = RobustSchedule(loss=config.loss, keep_start=config.keep_start, keep_end=config.keep_end,
                                       warmup_epochs=config.robust_warmup, power=config.reweight_power,
                                       epochs=config.epochs)
        from numba_recon.symmetry.groups import symmetry_operators

        self.sym_ops = symmetry_operators(config.symmetry)
        self.state = self._restore() if resume else None
        #: the epoch of the newest checkpoint on disk (what an interrupted run resumes from)
        self.last_checkpoint_epoch: int | None = self.state.epoch if self.state is not None else None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def _fingerprint(self) -> str:
        if getattr(self, "_fingerprint_value", None) is None:
            self._fingerprint_value = particle_fingerprint(self.particles)
        return self._fingerprint_value

    def _check_duplicates(self) -> None:
        """Refuse (or, with ``--drop-duplicates``, drop) rows that repeat an earlier row's image.

        The same image in both half sets correlates them: the gold-standard FSC would report a
        resolution the data do not support. In one half set it would count twice.
        """
        from numba_recon.read import duplicate_images

        repeated = duplicate_images(self.particles)
        if repeated.size == 0:
            return
        p = self.particles
        first = int(repeated[0])
        example = f"row {first + 1}: {int(p.stack_indices[first]) + 1:06d}@{Path(str(p.stack_paths[first])).name}"
        if not self.config.drop_duplicates:
            raise InputFileError(
                f"{repeated.size} particle row(s) repeat the image of an earlier row ({example}); one image in "
                "both half sets would inflate the resolution", self.config.particles,
                "remove the repeated rows, or add --drop-duplicates to keep the first row of each image")
        keep = np.setdiff1d(np.arange(len(p)), repeated)
        self.particles = p.subset(keep)
        log.warning("dropped %d particle row(s) that repeat an earlier row's image (%s); %d particles remain",
                    repeated.size, example, len(self.particles))

    def _survey_images(self) -> dict[str, float]:
        """Read every image once before any work: refuse images that cannot be reconstructed
        (overflowing, not finite, constant) and copies of one image in several rows (or, with
        --drop-duplicates, keep the first), and report the background offsets the loader subtracts."""
        from numba_recon.batch import BackgroundStats, check_backgrounds, copied_images, survey_backgrounds

        n, size = len(self.particles), self.comm.size
        rows = np.arange(n)
        stats = survey_backgrounds(self.particles, shard(rows, self.comm.rank, size), self.config.batch_size)
        parts = self.comm.allgather(stats) if size > 1 else [stats]
        # back to row order: rank r surveyed rows r::size
        order = np.concatenate([shard(rows, r, size) for r in range(size)])
        stats = BackgroundStats.concatenate(parts).take(np.argsort(order, kind="stable"))
        # every rank takes the same decisions; rank 0 alone logs them
        summary = check_backgrounds(stats, self.config.particles, report=self.comm.is_root)
        copies, originals = copied_images(stats.digest)
        if copies.size:
            p = self.particles

            def name(i: int) -> str:
                return f"row {i + 1} ({int(p.stack_indices[i]) + 1:06d}@{Path(str(p.stack_paths[i])).name})"

            example = f"{name(int(copies[0]))} has the pixels of {name(int(originals[0]))}"
            if not self.config.drop_duplicates:
                raise InputFileError(f"{copies.size} particle image(s) are pixel-for-pixel copies of an earlier row's "
                                     f"image ({example}); copies in both half sets would inflate the resolution",
                                     self.config.particles, "remove the copied rows (or the copied stacks), or add "
                                     "--drop-duplicates to keep the first of each image")
            keep = np.setdiff1d(rows, copies)
            self.particles = p.subset(keep)
            self._fingerprint_value = None
            if self.comm.is_root:
                log.warning("dropped %d particle row(s) whose image copies an earlier row's (%s); %d particles "
                            "remain", copies.size, example, len(self.particles))
            if len(self.particles) < 4:
                raise InputFileError(f"only {len(self.particles)} distinct particle images", self.config.particles,
                                     "a reconstruction needs at least 4 particles (2 per half set)")
        return summary

    def _warm_up_kernels(self) -> None:
        """Compile (or load from Numba's cache) every kernel on rank 0 first, then on the others:
        ranks compiling at once race on the on-disk cache."""
        be = self.backend
        n = 4

        def call() -> None:
            vol = be.zeros((n, n, n))
            rot = be.to_device(np.eye(3, dtype=np.float32)[None])
            img = be.zeros((1, n, n))
            res = be.zeros((1, n, n))
            loss = be.zeros((1,))
            forward_residual(be, vol, rot, be.to_device(np.ones((1, n, n), np.float32)), img, be.zeros((1,)), 1.0,
                                res, loss)
            weighted_backproject(be, res, rot, be.to_device(np.ones(1, np.float32)), 1.0, vol)
            be.insert_weights(rot, img, vol)
            be.weight_filters(img, be.zeros((n, n)), be.zeros((1,)), img)
            # defocus 1 um, 300 kV, Cs 2.7 mm, amplitude contrast 0.1 (CTF_COLUMNS order)
            ctf = np.array([[1e4, 1e4, 0.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0]])
            be.prepare_particles(img, be.to_device(ctf, None), be.to_device(np.zeros((1, 2)), None),
                                 be.to_device(np.zeros(1, np.uint8), None),
                                 1.0, be.to_device(np.ones((n, n), np.uint8), None), res, be.zeros((1, n, n)),
                                 be.zeros((1,)), be.zeros((1,)))
            be.synchronize()

        if self.comm.size > 1:
            if self.comm.is_root:
                call()
            self.comm.barrier()
            if not self.comm.is_root:
                call()
        else:
            call()

    def _restore(self) -> RunState | None:
        ckpt = load_latest(self.out) if self.comm.is_root else None
        ckpt = self.comm.bcast(ckpt)
        if ckpt is None:
            return None
        stored_n = len(ckpt.arrays["half_set"])
        stored = ckpt.state.get("particles_fingerprint")
        if stored_n != len(self.particles) or (stored is not None and stored != self._fingerprint()):
            raise InputFileError(f"the particle set differs from the one this run started with ({len(self.particles)} "
                                 f"rows now, {stored_n} then, or rows reordered, changed or moved between half "
                                 "sets): resuming would mix the gold-standard halves", self.config.particles,
                                 "resume with the original particle file, or start a new run in another -o folder")
        if ckpt.volumes.shape[1:] != (self.box,) * 3:
            raise InputFileError("checkpoint box size does not match the particles", self.out / CHECKPOINTS_DIR,
                                 "resume with the same particles, or start a new run with --overwrite")
        if ckpt.state.get("n_ranks") not in (None, self.comm.size):
            log.warning("resuming with %d ranks (checkpoint written with %s): results will equal an "
                        "uninterrupted run only to floating-point summation order",
                        self.comm.size, ckpt.state.get("n_ranks"))
        log.info("resuming from epoch %d (step %d)", ckpt.epoch, ckpt.step)
        if self.config.optimizer == "cg":
            return self._restore_cg(ckpt)
        return RunState(epoch=ckpt.epoch, step=ckpt.step, volumes=ckpt.volumes.astype(np.float32),
                        adam=AdamState(ckpt.adam_m.astype(np.float32), second_moment_per_half(ckpt.adam_v),
                                       ckpt.adam_t),
                        lr_abs=np.asarray(ckpt.state["lr_abs"], np.float64),
                        halves=ckpt.arrays["half_set"].astype(np.int8), cv=ckpt.arrays["cv"].astype(bool),
                        scores_prev=ckpt.arrays["scores_prev"].astype(np.float64),
                        history=list(ckpt.state.get("history", [])),
                        data_scale=float(ckpt.state.get("data_scale", 1.0)))

    def _support_mask(self) -> np.ndarray:
        c = self.box // 2
        z, y, x = np.ogrid[:self.box, :self.box, :self.box]
        return ((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2) <= self.radius**2

    # ------------------------------------------------------------------ one batch
    def symmetric_space(self) -> Any:
        """The maps of the run's point group inside its support (built once; adam's final projection
        and the report's symmetric filtered maps use it): :func:`numba_recon.symmetry.symmetric_subspace`."""
        from numba_recon.symmetry.subspace import symmetric_subspace

        return symmetric_subspace(self.box, self.config.symmetry, min(self.radius, self.max_radius_px))

    def _device_constant(self, name: str, make: Any, dtype: Any = np.float32) -> Any:
        """A backend copy of the host array ``make()``, made once per run."""
        if name not in self._device_constants:
            self._device_constants[name] = self.backend.to_device(make(), dtype)
        return self._device_constants[name]

    def _prepared(self, part: np.ndarray, buffers: "DeviceStep | None" = None, offset: int = 0,
                  scalars: str = "both") -> Batch:
        """The particles ``part (b,)`` ready for the operator.

        Prepared on the host (the loader's arrays, cached or read ahead), or on the device: the
        loader gives the images as read, and the backend's ``prepare_particles`` computes the
        CTFs, the shifted and filtered images, the norms and the noise variances there. With
        ``buffers`` (an adam run) the device inputs and outputs are the reused buffers, the norms
        and noise variances at ``[offset:offset + b]`` of the epoch's arrays. ``scalars`` says which
        ``(b,)`` host copies the caller needs from the device: ``"both"``, ``"norm2"`` or ``"none"``
        (host-prepared batches always have both).
        """
        prep = self.loader.prepare(part)
        if not self.prepare_on_device:
            return Batch(prep.data, prep.filters2, prep.data_norm2, prep.data_norm2, prep.noise_var, prep.rotations)
        be = self.backend
        b, n = part.size, self.box
        if buffers is not None:
            images = be.copy_into(buffers.images[:b], prep.images)
            ctf = be.copy_into(buffers.ctf_params[:b], prep.ctf_params)
            shifts = be.copy_into(buffers.shifts_px[:b], prep.shifts_px)
            premultiplied = be.copy_into(buffers.premultiplied[:b], prep.premultiplied.astype(np.uint8))
            data, filters2 = buffers.data[:b], buffers.filters2[:b]
            norm2, noise = buffers.norm2_epoch[offset:offset + b], buffers.noise_epoch[offset:offset + b]
        else:
            images = be.to_device(prep.images)
            ctf = be.to_device(prep.ctf_params, None)
            shifts = be.to_device(prep.shifts_px, None)
            premultiplied = be.to_device(prep.premultiplied.astype(np.uint8), None)
            data, filters2, norm2, noise = be.zeros((b, n, n)), be.zeros((b, n, n)), be.zeros((b,)), be.zeros((b,))
        mask = self._device_constant("background_mask", lambda: self.loader.background_mask.astype(np.uint8), None)
        be.prepare_particles(images, ctf, shifts, premultiplied, self.particles.pixel_size_angstrom, mask, data,
                             filters2, norm2, noise)
        norm2_host = np.asarray(be.to_host(norm2), np.float32) if scalars in ("both", "norm2") else None
        noise_host = (np.maximum(np.asarray(be.to_host(noise), np.float32), MIN_NOISE_VAR) if scalars == "both"
                      else None)
        return Batch(data, filters2, norm2, norm2_host, noise_host, prep.rotations)

    def _insert_input(self, prep: Batch, t2: np.ndarray, w: np.ndarray) -> Any:
        """``filters2 T^2 w`` per particle, the weights :func:`insert_weights` grids: on the host, or
        on the device in place of ``prep.filters2`` (which the batch no longer needs)."""
        be = self.backend
        w32 = w.astype(np.float32)
        if not self.prepare_on_device:
            return be.to_device(prep.filters2 * t2[None] * w32[:, None, None])
        plane = self._device_constant("splat_transfer2", lambda: t2)
        be.weight_filters(prep.filters2, plane, be.to_device(w32), prep.filters2)
        return prep.filters2

    # ------------------------------------------------------------------ the forward stage, the final maps
    def _forward(self, part: np.ndarray, volume_dev: Any) -> tuple[Any, Any, Any, np.ndarray, np.ndarray]:
        """The forward stage for the particles ``part``: prepared data, device rotations and
        residuals, and host ``(b,)`` losses and scores."""
        be = self.backend
        b, n = part.size, self.box
        prep = self._prepared(part)
        rot = be.to_device(prep.rotations)
        resid = be.zeros((b, n, n))
        losses_dev = be.zeros((b,))
        energy_dev = be.zeros((b,))
        forward_residual(be, volume_dev, rot, be.to_device(prep.filters2), be.to_device(prep.data),
                            be.to_device(prep.data_norm2_dev), self.radius, resid, losses_dev, energy_dev)
        losses = be.to_host(losses_dev).astype(np.float64)
        return prep, rot, resid, losses, particle_scores(losses, prep.data_norm2, be.to_host(energy_dev))

    def _symmetrize_final(self, st: RunState) -> None:
        """Make the written half maps symmetric; nothing to do for C1.

        ``adam``: each half map is projected exactly onto the maps with the point group's symmetry
        (``symmetry.subspace.SymmetricSubspace``). ``cg``: the group average (the operation applied to every
        pass's residual). The exact projection is not used there: it moves some low-resolution
        signal into high-resolution shells identically in both halves (the basis functions'
        own spectrum), and on maps whose noise the learned prior has removed from those shells
        that shared content would raise the half-map FSC above what the data support.
        """
        if len(self.sym_ops) > 1 and self.config.optimizer == "cg":
            from numba_recon.symmetry.groups import symmetrize_volume

            t0 = time.perf_counter()
            for h in (0, 1):
                st.volumes[h] = symmetrize_volume(st.volumes[h], self.sym_ops)
            self._volume_dev = [self.backend.to_device(st.volumes[0]), self.backend.to_device(st.volumes[1])]
            self.timings["symmetrize_s"] = time.perf_counter() - t0
            if self.comm.is_root:
                log.info("half maps averaged over %s (%d operators)", self.config.symmetry, len(self.sym_ops))
            return
        if len(self.sym_ops) > 1:
            t0 = time.perf_counter()
            space = self.symmetric_space()
            for h in (0, 1):
                st.volumes[h] = space.project(st.volumes[h])
            self._volume_dev = [self.backend.to_device(st.volumes[0]), self.backend.to_device(st.volumes[1])]
            self.timings["symmetrize_s"] = time.perf_counter() - t0
            if self.comm.is_root:
                log.info("half maps projected onto %s-symmetric maps (%d basis functions, %.1f s)",
                         self.config.symmetry, space.n_functions, self.timings["symmetrize_s"])

    # ------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        """Run the remaining passes or epochs, checkpointing, then write the outputs (rank 0).
        Returns the summary."""
        return self._run_cg() if self.config.optimizer == "cg" else self._run_adam()

    def _fault(self, where: str, epoch: int) -> None:
        """Fault injection for tests: ``NUMBA_RECON_FAULT=kill:epoch=E[:rank=R]`` SIGKILLs that rank at
        the start of epoch E; ``int:epoch=E`` sends it SIGINT (Ctrl-C) instead."""
        spec = os.environ.get("NUMBA_RECON_FAULT", "")
        kind, _, rest = spec.partition(":")
        if kind not in ("kill", "int"):
            return
        parts = dict(p.split("=", 1) for p in rest.split(":") if "=" in p)
        if int(parts.get("epoch", -1)) == epoch and int(parts.get("rank", self.comm.rank)) == self.comm.rank:
            import signal

            if kind == "int":
                # as a Ctrl-C at the terminal, also in a process started with SIGINT ignored (a
                # background job of a non-interactive shell), where Python installs no handler
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGINT)

    def _checkpoint(self, st: RunState) -> None:
        if st.solver is not None:
            sv = st.solver
            cg = sv["cg"]
            arrays = {"half_set": st.halves, "cv": st.cv, "scores_prev": st.scores_prev, "cg_v": cg.v, "cg_r": cg.r,
                      "cg_p": cg.p, "cg_rz": cg.rz, "cg_kernels": sv["kernels"], "cg_inv_tau2": sv["inv_tau2"]}
            if sv["best_epoch"] != st.epoch:  # otherwise the best maps are the current ones
                arrays["cg_best_volumes"] = sv["best_volumes"]
            small = {k: v for k, v in sv.items() if k not in ("cg", "kernels", "inv_tau2", "best_volumes")}
            ckpt = Checkpoint(epoch=st.epoch, step=st.step, volumes=st.volumes, adam_m=np.zeros(0, np.float32),
                              adam_v=np.zeros(0, np.float32), adam_t=0, arrays=arrays, config=self.config.to_dict(),
                              state={"solver": small, "history": st.history, "n_ranks": self.comm.size,
                                     "particles_fingerprint": self._fingerprint(),
                                     "provenance": environment(), "seed": self.config.seed, "lr_abs": [0.0, 0.0]})
            save_checkpoint(self.out, ckpt)
            self.last_checkpoint_epoch = st.epoch
            return
        ckpt = Checkpoint(
            epoch=st.epoch, step=st.step, volumes=st.volumes, adam_m=st.adam.m, adam_v=st.adam.v, adam_t=st.adam.t,
            arrays={"half_set": st.halves, "cv": st.cv, "scores_prev": st.scores_prev},
            config=self.config.to_dict(),
            state={"lr_abs": [float(v) for v in st.lr_abs], "history": st.history, "n_ranks": self.comm.size,
                   "particles_fingerprint": self._fingerprint(),
                   "data_scale": st.data_scale, "provenance": environment(), "seed": self.config.seed},
        )
        save_checkpoint(self.out, ckpt)
        self.last_checkpoint_epoch = st.epoch

    def _write_history(self, history: list[dict[str, Any]]) -> None:
        if not history:
            return
        # EpochStats' order first (rows restored from a checkpoint come back with sorted keys)
        fixed = list(EpochStats.__dataclass_fields__)
        keys = fixed + sorted(k for k in history[0] if k not in fixed)
        from numba_recon.provenance import comment_lines

        # "#" lines first: the version and the command (readers skip them, e.g. read_csv(comment="#"))
        lines = comment_lines() + [",".join(keys)] + [
            ",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k]) for k in keys) for row in history]
        atomic_write_text(self.out / HISTORY_CSV, "\n".join(lines) + "\n", durable=True)

    def _write_split(self, st: RunState) -> None:
        """Write the half split and hold-out back out, so a seeded random split is on record."""
        from numba_recon.provenance import comment_lines

        lines = comment_lines() + ["particle,half_set,cross_validation"] + [
            f"{i},{h},{int(c)}" for i, (h, c) in enumerate(zip(st.halves, st.cv))]
        atomic_write_text(self.out / HALF_SETS_CSV, "\n".join(lines) + "\n", durable=True)

    # ------------------------------------------------------------------ outputs
    def _final_scores(self, st: RunState) -> tuple[np.ndarray, np.ndarray]:
        """Per-particle final losses and scores against the final half maps (all particles)."""
        losses = np.full(len(self.particles), np.nan)
        scores = np.full(len(self.particles), np.nan)
        for h in (0, 1):
            idx = np.flatnonzero(st.halves == h + 1)
            local = shard(idx, self.comm.rank, self.comm.size)
            for start in range(0, local.size, self.config.batch_size):
                part = local[start:start + self.config.batch_size]
                _, _, _, losses[part], scores[part] = self._forward(part, self._volume_dev[h])
        if self.comm.size > 1:
            for arr in (losses, scores):
                for part in self.comm.allgather(arr):
                    ok = np.isfinite(part)
                    arr[ok] = part[ok]
        return losses, scores

    def _finish(self, st: RunState) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._symmetrize_final(st)
        losses, scores = self._final_scores(st)
        summary: dict[str, Any] = {}
        if self.comm.is_root:
            from numba_recon.report.outputs import write_run_outputs

            summary = write_run_outputs(self, st, losses, scores)
        self.timings["outputs_s"] = time.perf_counter() - t0
        self.comm.barrier()
        return self.comm.bcast(summary)


def run(config: RunConfig, *, resume: bool = False, progress: bool = True, comm: Comm | None = None) -> dict[str, Any]:
    """Run a reconstruction (all ranks call this). Returns ``summary.json``'s content."""
    job = Reconstruction(config, comm=comm, progress=progress, resume=resume)
    return job.run()


__all__ = ["Reconstruction", "run", "RunConfig"]
