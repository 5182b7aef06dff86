"""The reconstruction engine: the only code that knows the order of the stages.

read -> batch -> forward -> loss -> adjoint -> reduce -> step -> checkpoint -> evaluate -> report

Each half set is reconstructed independently. The default solver (``cg``) takes full passes over
the particles: preconditioned conjugate gradients on the objective of :mod:`numba_recon.objective`
(data term, per-shell prior learned from the gold-standard FSC, support), an exact line search, and
a stop when the held-out loss no longer falls. ``adam`` takes minibatch steps on
``sum_i w_i l_i + n_h lambda^2 ||x_h||^2``, the minibatch gradient scaled by ``n_h / sum_batch w_i``
so that it estimates the gradient over the training part of half set ``h``
(``docs/reconstruction.md``). Run state lives in :mod:`.state`, backend buffers in :mod:`.buffers`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from numba_recon.batch import BatchLoader, assign_cross_validation, assign_halves, epoch_batches, shard
from numba_recon.checkpoint import Checkpoint, load_latest, save_checkpoint
from numba_recon.config import RunConfig
from numba_recon.io.atomic import atomic_write_text
from numba_recon.adjoint import weighted_backproject
from numba_recon.forward import forward_residual
from numba_recon.geometry import default_radius_px
from numba_recon.provenance import environment
from numba_recon.errors import InputError, InputFileError
from numba_recon.loss import (RobustSchedule, good_population, particle_scores, pass_reference, pass_weights,
                              robust_weights)
from numba_recon.particles import MIN_BOX_PX
from numba_recon.reduce import Comm, get_comm, select_device
from numba_recon.step import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, AdamState, CGState, cg_direction, cg_step
from numba_recon.io.run_files import CHECKPOINTS_DIR, HALF_SETS_CSV, HISTORY_CSV
from numba_recon.recon.buffers import MIN_NOISE_VAR, Batch, DeviceStep, PassSums
from numba_recon.recon.state import EpochStats, RunState, eta_text, particle_fingerprint, second_moment_per_half

log = logging.getLogger(__name__)

#: The CG solver stops when a pass lowers the held-out loss by less than this fraction of what the
#: direct reconstruction gained over a blank map.
CV_TOLERANCE = 0.005
#: Width (pixels) of the soft edge that takes a start map to zero inside the adam support.
SOFT_START_EDGE_PX = 6.0
#: A start map low-passed finer than this shares detail between the halves that the FSC would count.
INITIAL_LOWPASS_WARN_ANGSTROM = 20.0
#: An adam epoch whose loss exceeds this multiple of a blank map's loss has diverged.
DIVERGENCE_FACTOR = 10.0
#: The smallest support radius (pixels) the cg solver accepts.
MIN_SUPPORT_RADIUS_PX = 3.0


class Reconstruction:
    """One reconstruction job on one rank. Build it, then call :meth:`run`.

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

    def _initial_state(self) -> RunState:
        cfg = self.config
        halves, from_input = assign_halves(self.particles, cfg.seed)
        if not from_input:
            log.info("no rlnRandomSubset in the input: split into random halves (seed %d)", cfg.seed)
        cv = assign_cross_validation(halves, cfg.cv_fraction, cfg.seed)
        volumes = np.zeros((2, self.box, self.box, self.box), np.float32)
        support = self._support_mask()
        lr_abs = np.zeros(2)
        scales = []
        for h in (0, 1):
            train = np.flatnonzero((halves == h + 1) & ~cv)
            if train.size == 0:
                raise InputFileError(f"half set {h + 1} has no training particles", cfg.particles,
                                     "check rlnRandomSubset (values 1 and 2) or lower --cv-fraction")
            first = epoch_batches(train, cfg.batch_size, cfg.seed, 1_000_000, h + 1)[0]  # its own stream
            step_map = self._steepest_descent_map(first)
            scales.append(float(np.sqrt(np.mean(step_map[support] ** 2))) or 1.0)
            volumes[h] = step_map
        if cfg.initial_map:
            from numba_recon.io.mrc import read_volume

            init, _ = read_volume(cfg.initial_map)
            if init.shape != volumes.shape[1:]:
                raise InputFileError(f"initial map has shape {init.shape}, the particles need a box of {self.box}",
                                     cfg.initial_map, "resample the map to the particle box size")
            from numba_recon.evaluate.filters import lowpass

            # both halves start here: detail the start map shares between them must not reach the
            # resolutions the FSC measures (RELION's --ini_high)
            from numba_recon.objective import soft_sphere

            # a soft edge inside the support first: the support's hard edge would otherwise put the
            # shared low-passed map back at every frequency
            edge = min(SOFT_START_EDGE_PX, 0.5 * self.radius)
            init = soft_sphere(self.box, self.radius - edge, edge) * lowpass(init.astype(np.float64),
                                                                              cfg.initial_lowpass, self.angpix)
            init = lowpass(init, cfg.initial_lowpass, self.angpix)
            volumes[:] = np.where(support, init, 0.0)[None]
            if self.comm.is_root:
                log.info("both half sets start from %s, low-passed at %.1f A (--initial-lowpass)", cfg.initial_map,
                         cfg.initial_lowpass)
                if cfg.initial_lowpass < INITIAL_LOWPASS_WARN_ANGSTROM:
                    log.warning("--initial-lowpass %.1f A keeps detail finer than %.0f A in the start map that both "
                                "half sets share: the FSC at those resolutions is not independent; 30-60 A is usual",
                                cfg.initial_lowpass, INITIAL_LOWPASS_WARN_ANGSTROM)
        lr_abs[:] = cfg.lr * np.asarray(scales)
        data_scale = float(np.mean(scales))
        return RunState(epoch=0, step=0, volumes=volumes, adam=AdamState.zeros(volumes.shape), lr_abs=lr_abs,
                        halves=halves, cv=cv, scores_prev=np.full(len(self.particles), np.nan), history=[],
                        data_scale=data_scale)

    def _steepest_descent_map(self, batch: np.ndarray) -> np.ndarray:
        """The exact line-search step from a blank map along the negative gradient of one batch.

        It fixes the scale of the map (data units differ between data sets), gives Adam a smooth
        start, and sets the learning rate's unit. Computed identically on every rank count.
        """
        be = self.backend
        local = shard(batch, self.comm.rank, self.comm.size)
        n = self.box
        grad = be.zeros((n, n, n))
        if local.size:
            prep = self._prepared(local, scalars="none")
            rot = be.to_device(prep.rotations)
            # weights of -1: the back-projection of -data, bit for bit, without negating on the host
            weighted_backproject(be, be.to_device(prep.data), rot, be.to_device(np.full(local.size, -1, np.float32)),
                                    self.radius, grad)
        self.comm.allreduce_sum_(grad)  # on the device where MPI is CUDA-aware
        g = be.to_host(grad).astype(np.float32)
        energy = 0.0
        if local.size:
            b = local.size
            resid = be.zeros((b, n, n))
            losses = be.zeros((b,))
            forward_residual(be, grad, rot, be.to_device(prep.filters2), be.zeros((b, n, n)),
                                be.zeros((b,)), self.radius, resid, losses)
            energy = float(np.sum(be.to_host(losses), dtype=np.float64))
        energy = self.comm.allreduce_scalar(energy)
        gg = float(np.dot(g.ravel().astype(np.float64), g.ravel()))
        if energy <= 0 or gg <= 0:
            return np.zeros_like(g)
        alpha = gg / (2.0 * energy)
        return (-alpha * g).astype(np.float32)

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

    # ------------------------------------------------------------------ one epoch
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

    def _loss_and_gradient(self, local: np.ndarray, volume_dev: Any, grad_dev: Any, weights_fn: Any,
                           buffers: DeviceStep, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """Forward, loss and adjoint for one rank's shard of a global minibatch, on the backend.

        The shard's inputs are copied into the reused ``buffers``; its losses and model energies
        are written to ``buffers.losses`` and ``buffers.energy`` at ``[offset:offset + b]`` and stay
        there (the epoch reads them once, at its end). ``weights_fn(local_scores) -> local_weights``
        sees the scores and returns the weights (it gathers across ranks when the robust loss
        needs global ranking): only then are the shard's ``(b,)`` losses and energies copied to the
        host, every step. ``weights_fn`` None means unit weights (plain L2), and nothing is copied.
        The gradient ``sum 2 w_i P_i^T r_i`` is accumulated into ``grad_dev`` ``(N, N, N)``.

        Returns the shard's host ``(b,)`` noise variances and image norms (what turns the losses
        into scores and noise-normalised losses at the end of the epoch), or None for either that
        stayed on the device (``buffers.noise_epoch``, ``buffers.norm2_epoch``).
        """
        be = self.backend
        b = local.size
        if b == 0:
            if weights_fn is not None:
                weights_fn(np.zeros(0))  # a collective on every rank, even one without particles
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        # on the device, the norms and noise variances stay in the epoch's arrays beside the losses;
        # a robust loss needs the norms for its scores now
        prep = self._prepared(local, buffers, offset, scalars="none" if weights_fn is None else "norm2")
        rot = be.copy_into(buffers.rotations[:b], prep.rotations)
        resid = buffers.residual[:b]
        losses_dev = buffers.losses[offset:offset + b]
        energy_dev = buffers.energy[offset:offset + b]
        if self.prepare_on_device:  # prepared into the buffers
            filters2, data, norm2 = prep.filters2, prep.data, prep.data_norm2_dev
        else:
            filters2 = be.copy_into(buffers.filters2[:b], prep.filters2)
            data = be.copy_into(buffers.data[:b], prep.data)
            norm2 = be.copy_into(buffers.data_norm2[:b], prep.data_norm2)
        forward_residual(be, volume_dev, rot, filters2, data, norm2, self.radius, resid, losses_dev, energy_dev)
        if weights_fn is None:
            weights = buffers.ones[:b]
        else:
            losses = be.to_host(losses_dev).astype(np.float64)
            w = weights_fn(particle_scores(losses, prep.data_norm2, be.to_host(energy_dev)))
            weights = be.copy_into(buffers.weights[:b], np.asarray(w, np.float32))
        weighted_backproject(be, resid, rot, weights, self.radius, grad_dev)
        return prep.noise_var, prep.data_norm2

    def _global_weights(self, global_batch: np.ndarray, local: np.ndarray, local_scores: np.ndarray,
                        half: int, epoch: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Gather the scores of a global minibatch, compute its weights, return this rank's part."""
        if self.schedule.active(epoch):
            parts = self.comm.allgather(local_scores)
            size = self.comm.size
            scores_global = np.empty(global_batch.size)
            for r, part in enumerate(parts):
                scores_global[r::size] = part
            w_global, q = robust_weights(scores_global, self.schedule, epoch, self._population.get(half))
            return w_global[self.comm.rank::size], w_global, q
        return np.ones(local.size), np.ones(global_batch.size), 1.0

    def _evaluate_losses(self, index: np.ndarray, volume_dev: Any) -> tuple[float, int]:
        """Sum of normalised losses ``l_i / (N^2 sigma_i^2)`` over the particles ``index`` (all ranks)."""
        from numba_recon.batch import batch_chunks

        batches = batch_chunks(shard(index, self.comm.rank, self.comm.size), self.config.batch_size)
        n = self.box
        total = 0.0
        with self.loader.schedule(batches):  # the next batches are prepared while one computes
            for part in batches:
                prep, _, _, losses, _ = self._forward(part, volume_dev)
                total += float(np.sum(losses / (n * n * prep.noise_var.astype(np.float64))))
        return self.comm.allreduce_scalar(total), int(index.size)

    def _symmetrize(self, grads: np.ndarray) -> None:
        """Constrain each half map to the point group on its own (the halves stay independent).

        The host gradients ``grads (2, N, N, N)`` are averaged over the group in place: the
        projected gradient of the objective restricted to symmetric maps (``docs/symmetry.md``).
        Before the first step of a new run the starting maps (on the backend, in
        :attr:`_device_step`) are averaged as well; otherwise their asymmetric part would never leave.
        """
        if len(self.sym_ops) > 1:
            from numba_recon.symmetry.groups import symmetrize_volume

            st = self.state
            if st is not None and st.step == 0:
                be = self.backend
                volumes = np.asarray(be.to_host(self._device_step.params), dtype=np.float32)  # a copy
                for h in (0, 1):
                    volumes[h] = symmetrize_volume(volumes[h], self.sym_ops)
                be.copy_into(self._device_step.params, volumes)
                st.volumes = volumes
            for h in (0, 1):
                grads[h] = symmetrize_volume(grads[h], self.sym_ops)

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

    def _build_adam_preconditioner(self, st: RunState) -> Any:
        """``--optimizer adam --precondition``: one extra pass grids the sampling density ``K_h``
        (as the default solver's pass 1), and every minibatch gradient is then multiplied by
        ``<K_h> (K_h + <K_h>_shell)^-1`` in Fourier space inside the support sphere (the solver's
        preconditioner with a prior of SSNR 1 per shell, so weakly sampled frequencies are not
        amplified, scaled to keep the unit of ``--lr``)."""
        from numba_recon.objective import Objective, full_to_half

        t0 = time.perf_counter()
        _, kernel_full = self._kernel_pass(st)
        kernel_full = self._symmetrize_cg(kernel_full, fourier=True)
        kernels = np.stack([full_to_half(kernel_full[h]) for h in (0, 1)])
        objective = Objective.create(self.box, self._support_mask().astype(np.float64), kernels)
        for h in (0, 1):  # a prior of SSNR 1 per shell: weakly sampled frequencies are not amplified
            objective.inv_tau2[h] = objective.shell_mean_kernel(h)
            objective.inv_tau2[h][0] = 0.0
        scale = [float(np.mean(kernels[h])) for h in (0, 1)]
        self.timings["preconditioner_s"] = time.perf_counter() - t0
        if self.comm.is_root:
            log.info("adam: gradients preconditioned by the Fourier model of the normal operator (%.1f s)",
                     self.timings["preconditioner_s"])

        def apply(g: np.ndarray, h: int) -> np.ndarray:
            return (scale[h] * objective.precondition(g.astype(np.float64), h)).astype(np.float32)

        return apply

    def _lr_factor(self, epoch: int, step: int, n_steps: int) -> float:
        """Cosine decay of the step size from 1 to 0.05 over the run: large steps find the map,
        small ones settle the minibatch noise so the iterates approach the minimum."""
        t = (epoch + step / max(n_steps, 1)) / max(self.config.epochs, 1)
        return 0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * min(max(t, 0.0), 1.0)))

    def _run_epoch(self, st: RunState, epoch: int) -> EpochStats:
        """One epoch of minibatch Adam on both half maps.

        Every step runs on the backend's arrays in :attr:`_device_step`: gradients zeroed by a
        kernel, forward and adjoint per half, one ``Allreduce`` of both gradients, then the scaling,
        the ridge prior and the Adam update in one backend call. The maps, gradients and losses
        stay there; the host sees the maps once, at the end of the epoch (FSC, divergence check,
        outputs), the Adam moments only when a checkpoint is due, and the per-particle losses once
        (scores and the training loss). Symmetry and ``--precondition`` work on the host: with
        either, each step copies the gradients to the host and back.
        """
        from numba_recon.batch import batch_chunks

        cfg = self.config
        be = self.backend
        n = self.box
        t0 = time.perf_counter()
        train = [np.flatnonzero((st.halves == h + 1) & ~st.cv) for h in (0, 1)]
        batches = [epoch_batches(train[h], cfg.batch_size, cfg.seed, epoch, h + 1) for h in (0, 1)]
        n_steps = max(len(batches[0]), len(batches[1]))
        scores_epoch = np.full(len(self.particles), np.nan)
        kept = []
        self._population: dict[int, tuple[float, float]] = {}
        robust = self.schedule.active(epoch)
        if robust:
            for h in (0, 1):
                prev = st.scores_prev[train[h]]
                prev = prev[np.isfinite(prev)]
                if prev.size:
                    self._population[h] = good_population(prev)
        dev = self._device_step
        host_step = self._adam_preconditioner is not None or len(self.sym_ops) > 1
        # (particles, offset into dev.losses, noise variances, image norms) of each shard, in order
        shards: list[tuple[np.ndarray, int, np.ndarray, np.ndarray]] = []
        offset = 0
        bar = self._progress_bar(n_steps, epoch)
        processed = 0
        last_note = t0
        # the shards this rank prepares, in the order the steps ask for them, then the held-out
        # particles of half 1 (the held-out loss reads them next): prepared while the steps compute
        rank, size = self.comm.rank, self.comm.size
        order = [part for k in range(n_steps) for h in (0, 1) if k < len(batches[h])
                 and (part := shard(batches[h][k], rank, size)).size]
        held_out = batch_chunks(shard(np.flatnonzero((st.halves == 1) & st.cv), rank, size), cfg.batch_size)
        with self.loader.schedule(order + held_out):
            for k in range(n_steps):
                be.fill(dev.grad, 0.0)
                weight_sums = np.zeros(2)
                for h in (0, 1):
                    if k >= len(batches[h]):
                        continue
                    gb = batches[h][k]
                    local = shard(gb, rank, size)
                    holder: dict[str, Any] = {"w_global": np.ones(gb.size), "q": 1.0}  # plain L2: unit weights

                    def weights_fn(local_scores, gb=gb, local=local, h=h, holder=holder):
                        w_local, w_global, q = self._global_weights(gb, local, local_scores, h, epoch)
                        holder["w_global"] = w_global
                        holder["q"] = q
                        return w_local

                    noise_var, norm2 = self._loss_and_gradient(local, self._volume_dev[h], dev.grad[h],
                                                               weights_fn if robust else None, dev, offset)
                    if local.size:
                        shards.append((local, offset, noise_var, norm2))
                        offset += local.size
                    weight_sums[h] = float(np.sum(holder["w_global"]))
                    kept.append(holder["q"])
                    processed += gb.size
                # reduce: both half maps' gradients in one Allreduce (on the device when MPI is CUDA-aware)
                self.comm.allreduce_sum_(dev.grad)
                # the gradient scale n_h / sum w and the regulariser n_h lambda^2 ||x||^2's 2 n_h lambda^2;
                # a half without particles in this step (scale 0) gets a zero gradient
                scale = np.zeros(2, np.float32)
                ridge = np.zeros(2, np.float32)
                for h in (0, 1):
                    if weight_sums[h] > 0:
                        n_h = float(train[h].size)
                        scale[h] = np.float32(n_h / weight_sums[h])
                        ridge[h] = np.float32(2.0 * n_h * cfg.reg_lambda**2)
                lr = st.lr_abs * self._lr_factor(epoch, k, n_steps)
                st.adam.t += 1
                if host_step:  # symmetry or the Fourier preconditioner: the gradient visits the host
                    be.scale_gradient(dev.grad, dev.params, scale, ridge)
                    g = np.asarray(be.to_host(dev.grad), dtype=np.float32)  # to_host copies
                    if self._adam_preconditioner is not None:
                        for h in (0, 1):
                            g[h] = self._adam_preconditioner(g[h], h)
                    self._symmetrize(g)
                    be.copy_into(dev.grad, g)
                    scale = ridge = None  # applied already
                be.adam_update(dev.params, dev.grad, dev.m, dev.v, lr, ADAM_BETA1, ADAM_BETA2, ADAM_EPS, st.adam.t,
                               scale, ridge)
                st.step += 1
                if bar is not None:
                    bar.update(1)
                elif self.progress and self.comm.is_root and time.perf_counter() - last_note > 30.0:
                    # no terminal (batch jobs): a plain line every 30 s instead of a bar
                    last_note = time.perf_counter()
                    rate = processed / max(last_note - t0, 1e-9)
                    log.info("epoch %d: step %d/%d, %.0f images/s", epoch + 1, k + 1, n_steps, rate)
        if bar is not None:
            bar.close()
        # the epoch's losses and energies: one copy each; scores and the training loss per shard, in order
        loss_sum = 0.0
        if offset:
            losses_all = np.asarray(be.to_host(dev.losses[:offset]), dtype=np.float64)
            energy_all = np.asarray(be.to_host(dev.energy[:offset]))
            if self.prepare_on_device:  # the norms and noise variances the device wrote beside them
                norm2_all = np.asarray(be.to_host(dev.norm2_epoch[:offset]), np.float32)
                noise_all = np.maximum(np.asarray(be.to_host(dev.noise_epoch[:offset]), np.float32), MIN_NOISE_VAR)
            for local, start, noise_var, norm2 in shards:
                if noise_var is None:
                    noise_var = noise_all[start:start + local.size]
                if norm2 is None:
                    norm2 = norm2_all[start:start + local.size]
                losses = losses_all[start:start + local.size]
                scores_epoch[local] = particle_scores(losses, norm2, energy_all[start:start + local.size])
                loss_sum += float(np.sum(losses / (n * n * noise_var.astype(np.float64))))
        self._adam_to_host(st, moments=self._checkpoint_due(epoch + 1))
        # scores from all ranks (each rank filled its own shard)
        if self.comm.size > 1:
            parts = self.comm.allgather(scores_epoch)
            for part in parts:
                ok = np.isfinite(part)
                scores_epoch[ok] = part[ok]
        st.scores_prev = scores_epoch
        total_loss = self.comm.allreduce_scalar(loss_sum)
        n_train = sum(t.size for t in train)
        cv_losses = []
        for h in (0, 1):
            idx = np.flatnonzero((st.halves == h + 1) & st.cv)
            if idx.size:
                s, c = self._evaluate_losses(idx, self._volume_dev[h])
                cv_losses.append((s, c))
        cv_loss = (sum(s for s, _ in cv_losses) / max(1, sum(c for _, c in cv_losses))) if cv_losses else float("nan")
        self._check_divergence(st, epoch + 1, total_loss / max(1, n_train), cv_loss)
        from numba_recon.evaluate.fsc import fsc, resolution_at

        curve = fsc(st.volumes[0], st.volumes[1])
        res = resolution_at(curve, n, self.angpix, 0.143)
        res05 = resolution_at(curve, n, self.angpix, 0.5)
        seconds = time.perf_counter() - t0
        return EpochStats(epoch=epoch + 1, train_loss=total_loss / max(1, n_train), cv_loss=cv_loss,
                          resolution_angstrom=res, resolution_05_angstrom=res05,
                          kept_fraction=float(np.mean(kept)) if kept else 1.0, seconds=seconds,
                          images_per_second=n_train / seconds if seconds > 0 else float("nan"))

    def _allocate_device_step(self, st: RunState) -> DeviceStep:
        """The backend arrays of an adam run (once per run), holding ``st``'s maps and moments."""
        train = [np.flatnonzero((st.halves == h + 1) & ~st.cv) for h in (0, 1)]
        # a rank's shard of a global minibatch is batch[rank::size]
        width = -(-min(self.config.batch_size, max(t.size for t in train)) // self.comm.size)
        return DeviceStep.allocate(self.backend, st, self.box, width, sum(t.size for t in train),
                                   raw=self.prepare_on_device)

    def _checkpoint_due(self, epoch: int) -> bool:
        """Whether this rank writes a checkpoint after ``epoch`` (1-based) of an adam run."""
        cfg = self.config
        return self.comm.is_root and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs)

    def _adam_to_host(self, st: RunState, moments: bool) -> None:
        """Copy the maps (and with ``moments`` the Adam moments) from the backend into ``st``."""
        be = self.backend
        dev = self._device_step
        # to_host returns a new array on every backend: nothing here aliases the backend's buffers
        st.volumes = np.asarray(be.to_host(dev.params), dtype=np.float32)
        if moments:
            st.adam.m = np.asarray(be.to_host(dev.m), dtype=np.float32)
            st.adam.v = np.asarray(be.to_host(dev.v), dtype=np.float32)

    def _progress_bar(self, total: int, epoch: int):
        if not (self.progress and self.comm.is_root):
            return None
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="step", leave=False,
                    file=sys.stderr)

    # ------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        """Run the remaining epochs, checkpointing, then write the outputs (rank 0). Returns the summary."""
        if self.config.optimizer == "cg":
            return self._run_cg()
        cfg = self.config
        t_start = time.perf_counter()
        st = self.state
        if self.comm.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
        if st is None:
            t0 = time.perf_counter()
            st = self._initial_state()
            self.timings["initialise_s"] = time.perf_counter() - t0
            if self.comm.is_root:
                self._write_split(st)
        self.state = st
        be = self.backend
        self._start_loss = self._held_out_loss(st) if st.epoch == 0 else float("nan")
        self._adam_preconditioner = self._build_adam_preconditioner(st) if cfg.precondition else None
        # the maps, gradients and moments live on the backend until the run ends (see _run_epoch)
        self._device_step = self._allocate_device_step(st)
        self._volume_dev = [self._device_step.params[0], self._device_step.params[1]]
        log.info("%d particles (half 1: %d, half 2: %d; %d held out), box %d, %.3f A/px, backend %s, %d rank(s)",
                 len(self.particles), int(np.sum(st.halves == 1)), int(np.sum(st.halves == 2)), int(st.cv.sum()),
                 self.box, self.angpix, be.name, self.comm.size)
        for epoch in range(st.epoch, cfg.epochs):
            self._fault("epoch", epoch)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # divergence is checked below
                stats = self._run_epoch(st, epoch)
            st.epoch = epoch + 1
            row = stats.__dict__.copy()
            st.history.append(row)
            if self.comm.is_root:
                log.info("epoch %d/%d  train %.5f  cv %.5f  resolution %.2f A (FSC 0.5: %.2f A)  kept %.2f  %.1f s"
                         "  ETA %s", stats.epoch, cfg.epochs, stats.train_loss, stats.cv_loss,
                         stats.resolution_angstrom, stats.resolution_05_angstrom, stats.kept_fraction, stats.seconds,
                         eta_text(st.history, cfg.epochs))
                self._write_history(st.history)
                if st.epoch % cfg.checkpoint_every == 0 or st.epoch == cfg.epochs:
                    self._checkpoint(st)
            self.comm.barrier()
        self.timings["epochs_s"] = time.perf_counter() - t_start
        summary = self._finish(st)
        return summary

    def _held_out_loss(self, st: RunState) -> float:
        """The held-out loss of the current maps (NaN without held-out particles)."""
        sums = [self._evaluate_losses(idx, self.backend.to_device(st.volumes[h]))
                for h in (0, 1) if (idx := np.flatnonzero((st.halves == h + 1) & st.cv)).size]
        count = sum(c for _, c in sums)
        return sum(t for t, _ in sums) / count if count else float("nan")

    def _check_divergence(self, st: RunState, epoch: int, train_loss: float, cv_loss: float) -> None:
        """Stop an adam run whose maps or losses are not finite or whose loss has grown far beyond a
        blank map's: such maps are garbage and their FSC means nothing. Checked before the epoch's
        FSC and checkpoint."""
        blank = self.background["blank_loss"]
        # a poor start map may score worse than a blank one; what it scored is no divergence
        reference = max([blank, self._start_loss] + [r["cv_loss"] for r in st.history if np.isfinite(r["cv_loss"])])
        losses = [train_loss, cv_loss] if st.cv.any() else [train_loss]
        if np.isfinite(st.volumes).all() and all(np.isfinite(v) and v <= DIVERGENCE_FACTOR * reference
                                                 for v in losses):
            return
        raise InputError(f"the reconstruction diverged in epoch {epoch} (training loss {train_loss:.3g}, held-out "
                         f"loss {cv_loss:.3g}; a blank map scores {blank:.3g}); no maps were written", None,
                         f"lower --lr (now {self.config.lr:g}; the default is 0.2) or use the default --optimizer cg")

    # ------------------------------------------------------------------ the CG solver (default)
    def _cg_initial_state(self) -> RunState:
        cfg = self.config
        halves, from_input = assign_halves(self.particles, cfg.seed)
        if not from_input:
            log.info("no rlnRandomSubset in the input: split into random halves (seed %d)", cfg.seed)
        cv = assign_cross_validation(halves, cfg.cv_fraction, cfg.seed, self.particles)
        for h in (1, 2):
            if not np.any((halves == h) & ~cv):
                raise InputFileError(f"half set {h} has no training particles", cfg.particles,
                                     "check rlnRandomSubset (values 1 and 2) or lower --cv-fraction")
        n = self.box
        return RunState(epoch=0, step=0, volumes=np.zeros((2, n, n, n), np.float32),
                        adam=AdamState(np.zeros(0, np.float32), np.zeros(0, np.float32), 0),
                        lr_abs=np.zeros(2), halves=halves, cv=cv,
                        scores_prev=np.full(len(self.particles), np.nan), history=[], solver=None)

    def _restore_cg(self, ckpt: Any) -> RunState:
        a = ckpt.arrays
        solver = dict(ckpt.state["solver"])
        solver["cg"] = CGState(a["cg_v"].astype(np.float32), a["cg_r"].astype(np.float32),
                               a["cg_p"].astype(np.float32), a["cg_rz"].astype(np.float64), bool(solver["exact"]))
        solver["kernels"] = a["cg_kernels"].astype(np.float32)
        solver["inv_tau2"] = a["cg_inv_tau2"].astype(np.float64)
        solver["best_volumes"] = (a["cg_best_volumes"] if "cg_best_volumes" in a else ckpt.volumes).astype(np.float32)
        st = RunState(epoch=ckpt.epoch, step=ckpt.step, volumes=ckpt.volumes.astype(np.float32),
                        adam=AdamState(np.zeros(0, np.float32), np.zeros(0, np.float32), 0), lr_abs=np.zeros(2),
                        halves=ckpt.arrays["half_set"].astype(np.int8), cv=ckpt.arrays["cv"].astype(bool),
                        scores_prev=ckpt.arrays["scores_prev"].astype(np.float64),
                        history=list(ckpt.state.get("history", [])), solver=solver)
        return st

    def _train_index(self, st: RunState) -> list[np.ndarray]:
        return [np.flatnonzero((st.halves == h + 1) & ~st.cv) for h in (0, 1)]

    def _kernel_pass(self, st: RunState) -> tuple[np.ndarray, np.ndarray]:
        """The first pass: the back-projected data ``b_h = sum w_i/sigma_i^2 P^T H_i T^-1 b_i`` and the
        gridded sampling density ``K_h`` of both halves, summed over ranks in ONE reduction.
        Returns ``b (2, N, N, N)`` float64 and ``K (2, N, N, N)`` (full DFT grid) float64."""
        from numba_recon.batch import batch_chunks
        from numba_recon.objective import splat_transfer2

        be = self.backend
        n = self.box
        sums = PassSums(be, 4, n)
        t2 = splat_transfer2(n).astype(np.float32)
        bs = self.config.batch_size
        rank, size = self.comm.rank, self.comm.size
        batches = [batch_chunks(shard(train, rank, size), bs) for train in self._train_index(st)]
        # the blank map's held-out loss (_blank_cv_loss) reads the held-out rows next: announced too,
        # so the background reader prepares them while this pass ends
        held_out = batch_chunks(shard(np.flatnonzero(st.cv), rank, size), bs)
        with self.loader.schedule(batches[0] + batches[1] + held_out):
            for h in (0, 1):
                for part in batches[h]:
                    prep = self._prepared(part)
                    w = (1.0 / prep.noise_var.astype(np.float64))
                    rot = be.to_device(prep.rotations)
                    weighted_backproject(be, be.to_device(prep.data), rot,
                                            be.to_device((0.5 * w).astype(np.float32)), self.radius, sums.target(h))
                    sums.commit()
                    be.insert_weights(rot, self._insert_input(prep, t2, w), sums.target(2 + h))
                    sums.commit()
        host = sums.reduce(self.comm)
        if not (np.isfinite(host).all() and np.abs(host[2:]).max() > 0):
            raise InputFileError("the particle images do not give a usable reconstruction (the back-projected "
                                 "data are not finite or the sampling is empty)", self.config.particles,
                                 "normalise the images (zero mean, unit noise outside the particle, as "
                                 "relion_preprocess does) and check them with numba-recon info")
        return host[:2], host[2:] * n

    def _data_pass(self, st: RunState, trial: np.ndarray, epoch: int, with_kernel: bool
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, float, float]:
        """One pass over the training particles at the trial maps ``trial (2, N, N, N)``.

        Forward, per-particle losses and scores, robust weights (against the previous pass's
        population), adjoint; with ``with_kernel`` the sampling density under the new weights too.
        Returns the back-projected data residual ``sum w_i/sigma_i^2 P^T H_i (T^-1 b_i - H_i P_i y)``
        ``(2, N, N, N)``, the kernel (full grid) or None, all particles' scores, the mean
        noise-normalised training loss and the kept fraction.
        """
        from numba_recon.batch import batch_chunks
        from numba_recon.objective import splat_transfer2

        be = self.backend
        n = self.box
        sums = PassSums(be, 4 if with_kernel else 2, n)
        t2 = splat_transfer2(n).astype(np.float32) if with_kernel else None
        bs = self.config.batch_size
        train = self._train_index(st)
        rank, size = self.comm.rank, self.comm.size
        batches = [batch_chunks(shard(train[h], rank, size), bs) for h in (0, 1)]
        # the held-out loss at the new maps (_cv_loss) comes next: its batches are announced too
        held_out = [batch_chunks(shard(np.flatnonzero((st.halves == h + 1) & st.cv), rank, size), bs)
                    for h in (0, 1)]
        local_scores = []
        loss_sum = 0.0
        kept = 0.0
        with self.loader.schedule(batches[0] + batches[1] + held_out[0] + held_out[1]):
            for h in (0, 1):
                reference = pass_reference(st.scores_prev[train[h]], self.schedule, epoch)
                volume_dev = be.to_device(trial[h])
                for part in batches[h]:
                    prep, rot, resid, losses, scores = self._forward(part, volume_dev)
                    robust = pass_weights(scores, self.schedule, reference)
                    w = robust / prep.noise_var.astype(np.float64)
                    weighted_backproject(be, resid, rot, be.to_device((-0.5 * w).astype(np.float32)), self.radius,
                                            sums.target(h))
                    sums.commit()
                    if with_kernel:
                        be.insert_weights(rot, self._insert_input(prep, t2, w), sums.target(2 + h))
                        sums.commit()
                    local_scores.append(scores)
                    loss_sum += float(np.sum(losses / (n * n * prep.noise_var.astype(np.float64))))
                    kept += float(np.sum(robust > 0.5))
        host = sums.reduce(self.comm)
        # every rank's scores, placed by the shards each rank took (a rank sends only its own)
        scores_all = np.full(len(self.particles), np.nan)
        parts = self.comm.allgather(np.concatenate(local_scores) if local_scores else np.zeros(0))
        for rank, part in enumerate(parts):
            idx = np.concatenate([shard(train[h], rank, self.comm.size) for h in (0, 1)])
            scores_all[idx] = part
        n_train = sum(t.size for t in train)
        loss = self.comm.allreduce_scalar(loss_sum) / max(1, n_train)
        kept_fraction = self.comm.allreduce_scalar(kept) / max(1, n_train)
        return host[:2], (host[2:] * n if with_kernel else None), scores_all, loss, kept_fraction

    def _symmetrize_cg(self, volumes: np.ndarray, fourier: bool = False) -> np.ndarray:
        """Average each of ``volumes (2, N, N, N)`` over the point group (real-space maps, or, with
        ``fourier``, kernels on the full DFT grid, which are averaged about their DC term)."""
        if len(self.sym_ops) <= 1:
            return volumes
        from numba_recon.symmetry.groups import symmetrize_volume

        out = np.empty_like(volumes)
        for h in range(volumes.shape[0]):
            v = np.fft.fftshift(volumes[h]) if fourier else volumes[h]
            v = symmetrize_volume(np.asarray(v, np.float64), self.sym_ops)
            out[h] = np.fft.ifftshift(v) if fourier else v
        return out

    def _cv_loss(self, st: RunState, volumes: np.ndarray, epoch: int) -> float:
        """Held-out loss at ``volumes (2, N, N, N)``: the mean noise-normalised loss of the held-out
        particles, weighted by the robust loss of pass ``epoch`` (the training particles' rule, against
        the population of the training scores of that pass, the newest there are), so junk among them
        does not decide the stopping."""
        from numba_recon.batch import batch_chunks

        n = self.box
        train = self._train_index(st)
        bs = self.config.batch_size
        rank, size = self.comm.rank, self.comm.size
        batches = [batch_chunks(shard(np.flatnonzero((st.halves == h + 1) & st.cv), rank, size), bs) for h in (0, 1)]
        # a further pass (_data_pass) reads the training rows in the same batches: announced too, so
        # their preparation overlaps the CG step between the passes (wasted if the run stops here)
        following = ([b for t in train for b in batch_chunks(shard(t, rank, size), bs)]
                     if epoch + 1 < self.config.epochs else [])
        total, weight = 0.0, 0.0
        with self.loader.schedule(batches[0] + batches[1] + following):
            for h in (0, 1):
                reference = pass_reference(st.scores_prev[train[h]], self.schedule, epoch)
                volume_dev = self.backend.to_device(volumes[h].astype(np.float32))
                for part in batches[h]:
                    prep, _, _, losses, scores = self._forward(part, volume_dev)
                    w = pass_weights(scores, self.schedule, reference)
                    total += float(np.sum(w * losses / (n * n * prep.noise_var.astype(np.float64))))
                    weight += float(np.sum(w))
        total = self.comm.allreduce_scalar(total)
        weight = self.comm.allreduce_scalar(weight)
        return total / weight if weight > 0 else float("nan")

    def _blank_cv_loss(self, st: RunState) -> float:
        """The held-out loss of a blank map (``||T^-1 b||^2 / (N^2 sigma^2)``), the scale of the
        improvements the stopping rule compares."""
        from numba_recon.batch import batch_chunks

        n = self.box
        bs = self.config.batch_size
        rank, size = self.comm.rank, self.comm.size
        batches = batch_chunks(shard(np.flatnonzero(st.cv), rank, size), bs)
        # the first pass's held-out loss (_cv_loss) reads the held-out rows of each half next
        following = [b for h in (0, 1)
                     for b in batch_chunks(shard(np.flatnonzero((st.halves == h + 1) & st.cv), rank, size), bs)]
        total = 0.0
        with self.loader.schedule(batches + following):
            for part in batches:
                prep = self._prepared(part)
                total += float(np.sum(prep.data_norm2.astype(np.float64)
                                      / (n * n * prep.noise_var.astype(np.float64))))
        count = int(np.sum(st.cv))
        return self.comm.allreduce_scalar(total) / count if count else float("nan")

    def _learn_prior(self, objective: Any, b: np.ndarray, rounds: int = 3) -> np.ndarray:
        """Alternate direct maps and the FSC-learned prior (as RELION's first iterations do);
        returns the last direct maps ``(2, N, N, N)``."""
        from numba_recon.evaluate.fsc import fsc

        maps = np.stack([objective.direct_map(b[h], h) for h in (0, 1)])
        for _ in range(rounds):
            objective.update_prior(fsc(maps[0], maps[1]))
            maps = np.stack([objective.direct_map(b[h], h) for h in (0, 1)])
        return maps

    def _cg_start(self, st: RunState) -> None:
        """The first pass, the support, the learned prior, the direct reconstruction and the CG state."""
        from numba_recon.objective import SOFT_EDGE_PX, Objective, estimate_particle_radius, full_to_half, soft_sphere

        cfg = self.config
        n = self.box
        outer = min(self.radius, self.max_radius_px)
        self.radius = outer
        b, kernel_full = self._kernel_pass(st)
        kernel_full = self._symmetrize_cg(kernel_full, fourier=True)
        b = self._symmetrize_cg(b)
        kernels = np.stack([full_to_half(kernel_full[h]) for h in (0, 1)])
        largest_inner = max(outer - SOFT_EDGE_PX, 1.0)
        objective = Objective.create(n, soft_sphere(n, largest_inner), kernels, cfg.reg_lambda)
        maps = self._learn_prior(objective, b)
        if cfg.particle_diameter is not None:
            inner = cfg.particle_diameter / (2.0 * self.angpix)
            source = "given"
            if inner > largest_inner:
                log.warning("--particle-diameter %.1f A does not fit the box with its %.0f-pixel soft edge: "
                            "using %.1f A", cfg.particle_diameter, SOFT_EDGE_PX, 2 * largest_inner * self.angpix)
                inner = largest_inner
        else:
            inner = estimate_particle_radius(0.5 * (maps[0] + maps[1]), largest_inner)
            source = "estimated"
        if self.comm.is_root:
            log.info("particle diameter %.1f A (%s): soft-edged support of radius %.1f px + %.0f px edge",
                     2 * inner * self.angpix, source, inner, SOFT_EDGE_PX)
        objective.mask = soft_sphere(n, inner)
        self.radius = min(inner + SOFT_EDGE_PX, outer)
        if self.radius < MIN_SUPPORT_RADIUS_PX:
            raise InputError(f"the map support has a radius of {self.radius:.3g} px (--radius "
                             f"{cfg.radius_px} / --particle-diameter {cfg.particle_diameter})", None,
                             f"give a support of at least {MIN_SUPPORT_RADIUS_PX:g} px radius, or omit both options")
        maps = self._learn_prior(objective, b)
        objective.kernels = objective.kernels.astype(np.float32)  # what checkpoints keep, exactly
        cg = CGState.start(np.stack([objective.mask * b[h] for h in (0, 1)]))
        for h in (0, 1):
            cg_direction(cg, h, objective.precondition(cg.r[h], h), restart=True)
        st.solver = {
            "cg": cg, "kernels": objective.kernels, "inv_tau2": objective.inv_tau2, "ridge": objective.ridge.tolist(),
            "radius_px": float(inner), "kernel_radius_px": float(self.radius), "diameter_source": source,
            "best_epoch": 0, "best_cv": float("inf"), "best_volumes": np.zeros((2, n, n, n), np.float32),
            "cv_blank": self._blank_cv_loss(st), "stopped": "", "exact": True,
        }

    def _objective(self, st: RunState) -> Any:
        from numba_recon.objective import Objective, soft_sphere

        sv = st.solver
        return Objective(self.box, soft_sphere(self.box, sv["radius_px"]), sv["kernels"], sv["inv_tau2"],
                         np.asarray(sv["ridge"], np.float64))

    def _run_cg(self) -> dict[str, Any]:
        """The default solver: the first pass builds the direct reconstruction, every further pass is
        one preconditioned conjugate-gradient iteration; stop when the held-out loss stops improving."""
        from numba_recon.evaluate.fsc import fsc, resolution_at

        cfg = self.config
        t_start = time.perf_counter()
        st = self.state
        if self.comm.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
        n = self.box
        if st is None:
            st = self._cg_initial_state()
            if self.comm.is_root:
                self._write_split(st)
        self.state = st
        log.info("%d particles (half 1: %d, half 2: %d; %d held out), box %d, %.3f A/px, backend %s, %d rank(s), "
                 "solver cg", len(self.particles), int(np.sum(st.halves == 1)), int(np.sum(st.halves == 2)),
                 int(st.cv.sum()), n, self.angpix, self.backend.name, self.comm.size)
        if st.solver is not None:
            self.radius = float(st.solver["kernel_radius_px"])
            if st.solver["stopped"] and st.epoch < cfg.epochs and self.comm.is_root:
                log.info("the run had already stopped (%s): no further passes; rerun with --no-early-stop "
                         "in a new folder to go on", st.solver["stopped"])
        if cfg.initial_map and st.solver is None and self.comm.is_root:
            log.warning("--initial-map is not used by the cg solver: its first map is the direct reconstruction "
                        "of each half set, so no start map is needed (or shared between the halves); use "
                        "--optimizer adam to start from %s", cfg.initial_map)
        n_train = int(np.sum(~st.cv))
        while st.epoch < cfg.epochs and not (st.solver or {}).get("stopped"):
            epoch = st.epoch
            self._fault("epoch", epoch)
            t0 = time.perf_counter()
            alphas = [float("nan")] * 2
            if st.solver is None:
                self._cg_start(st)
                objective = self._objective(st)
                cg = st.solver["cg"]
                maps = np.stack([objective.mask * cg.trial(h) for h in (0, 1)]).astype(np.float32)
                train_loss, kept_fraction = float("nan"), 1.0
            else:
                objective = self._objective(st)
                cg = st.solver["cg"]
                trial = np.stack([objective.mask * cg.trial(h) for h in (0, 1)]).astype(np.float32)
                with_kernel = self.schedule.active(epoch)
                bp, kernel_full, scores, train_loss, kept_fraction = self._data_pass(st, trial, epoch, with_kernel)
                st.scores_prev = scores
                bp = self._symmetrize_cg(bp)
                for h in (0, 1):
                    r_trial = objective.residual(bp[h], cg.trial(h).astype(np.float64), h)
                    alphas[h] = cg_step(cg, h, r_trial)
                if kernel_full is not None:
                    from numba_recon.objective import full_to_half

                    kernel_full = self._symmetrize_cg(kernel_full, fourier=True)
                    objective.kernels = np.stack([full_to_half(kernel_full[h]) for h in (0, 1)]).astype(np.float32)
                    st.solver["kernels"] = objective.kernels
                maps = np.stack([objective.mask * cg.v[h] for h in (0, 1)]).astype(np.float32)
                # conjugate directions while the objective stays the same; a robust loss changes the
                # weights (and the kernel) every pass, and the directions restart
                restart = not cg.exact or kernel_full is not None
                for h in (0, 1):
                    cg_direction(cg, h, objective.precondition(cg.r[h], h), restart=restart)
                st.step += 1
            cg.exact = not self.schedule.active(epoch + 1)
            st.solver["exact"] = cg.exact
            st.solver["inv_tau2"] = objective.inv_tau2
            st.volumes = maps
            cv_loss = self._cv_loss(st, maps, epoch)
            curve = fsc(maps[0], maps[1])
            res = resolution_at(curve, n, self.angpix, 0.143)
            res05 = resolution_at(curve, n, self.angpix, 0.5)
            st.epoch = epoch + 1
            self._cg_keep_best(st, cv_loss, maps)
            seconds = time.perf_counter() - t0
            row = EpochStats(epoch=st.epoch, train_loss=train_loss, cv_loss=cv_loss, resolution_angstrom=res,
                             resolution_05_angstrom=res05, kept_fraction=kept_fraction, seconds=seconds,
                             images_per_second=n_train / seconds if seconds > 0 else float("nan")).__dict__.copy()
            row["step_length"] = float(np.nanmean(alphas)) if st.epoch > 1 else float("nan")
            st.history.append(row)
            if self.comm.is_root:
                log.info("pass %d/%d  train %.6f  cv %.6f  resolution %.2f A (FSC 0.5: %.2f A)  kept %.2f  %.1f s%s"
                         "  ETA %s", st.epoch, cfg.epochs, train_loss, cv_loss, res, res05, kept_fraction, seconds,
                         "  (direct reconstruction)" if st.epoch == 1 else f"  step {row['step_length']:.2f}",
                         "done" if st.solver["stopped"] else "at most " + eta_text(st.history, cfg.epochs))
                self._write_history(st.history)
                if st.epoch % cfg.checkpoint_every == 0 or st.epoch == cfg.epochs or st.solver["stopped"]:
                    self._checkpoint(st)
            self.comm.barrier()
        sv = st.solver
        best = sv["best_volumes"]
        if not (np.isfinite(best).all() and np.abs(best).max() > 0):
            raise InputFileError("the reconstruction is empty or not finite: the images carry no usable signal",
                                 cfg.particles, "check the images and their CTF and pose columns (numba-recon info)")
        if not sv["stopped"]:
            sv["stopped"] = f"reached --epochs {cfg.epochs}"
        st.volumes = sv["best_volumes"].copy()
        self._volume_dev = [self.backend.to_device(st.volumes[0]), self.backend.to_device(st.volumes[1])]
        self.solver_summary = {
            "optimizer": "cg", "passes": int(st.epoch), "best_pass": int(sv["best_epoch"]),
            "best_cv_loss": float(sv["best_cv"]), "stop_reason": sv["stopped"],
            "particle_diameter_angstrom": round(2 * sv["radius_px"] * self.angpix, 2),
            "particle_diameter_source": sv["diameter_source"], "support_radius_px": sv["kernel_radius_px"],
        }
        if self.comm.is_root:
            log.info("kept the maps of pass %d (lowest held-out loss); %s", sv["best_epoch"], sv["stopped"])
        self.timings["epochs_s"] = time.perf_counter() - t_start
        return self._finish(st)

    def _cg_keep_best(self, st: RunState, cv_loss: float, maps: np.ndarray) -> None:
        """Keep the maps with the lowest held-out loss; decide whether to stop.

        A pass that lowers the held-out loss by less than :data:`CV_TOLERANCE` of what the direct
        reconstruction gained over a blank map (or raises it) ends the run: further passes would fit
        the training particles' noise. A robust loss changes what the held-out loss measures when
        it starts, so the comparison starts afresh then, and the run goes on for at least two
        robust passes. Without held-out particles every pass counts as better.
        """
        sv = st.solver
        index = st.epoch - 1  # the pass just done, 0-based
        if self.schedule.loss != "l2" and index == self.schedule.warmup_epochs:
            sv["best_cv"] = float("inf")  # the first robust pass: a new held-out measure
        if not np.isfinite(cv_loss):
            sv["best_epoch"], sv["best_volumes"] = st.epoch, maps.copy()
            return
        if st.epoch == 1:
            sv["cv_direct"] = cv_loss
        gain = float(sv.get("cv_blank", np.nan)) - float(sv.get("cv_direct", cv_loss))
        tolerance = CV_TOLERANCE * abs(gain) if np.isfinite(gain) and gain != 0 else 0.0
        improvement = sv["best_cv"] - cv_loss
        if cv_loss < sv["best_cv"]:
            sv["best_epoch"], sv["best_cv"], sv["best_volumes"] = st.epoch, float(cv_loss), maps.copy()
        first_stop = 1 if self.schedule.loss == "l2" else self.schedule.warmup_epochs + 1
        if index >= first_stop and improvement <= tolerance and self.config.early_stop:
            sv["stopped"] = (f"held-out loss {'rose' if improvement < 0 else 'improved by less than tolerance'} "
                             f"at pass {st.epoch}")

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
