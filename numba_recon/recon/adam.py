"""The minibatch solver (``--optimizer adam``): Adam on the ridge-regularised objective.

Each epoch visits the training particles of both halves in minibatches; the gradient of a
minibatch is scaled to estimate the whole half set's (:meth:`AdamSolver._loss_and_gradient`), the
step runs on the backend with the maps and moments kept there (:class:`.buffers.DeviceStep`), and
the held-out loss and the FSC are evaluated once per epoch (``docs/reconstruction.md``). The engine
(:mod:`.engine`) mixes this class into :class:`~numba_recon.recon.engine.Reconstruction`, whose
attributes the methods read.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np

from numba_recon.batch import assign_cross_validation, assign_halves, epoch_batches, shard
from numba_recon.adjoint import weighted_backproject
from numba_recon.forward import forward_residual
from numba_recon.errors import InputError, InputFileError
from numba_recon.loss import good_population, particle_scores, robust_weights
from numba_recon.step import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, AdamState
from numba_recon.recon.buffers import MIN_NOISE_VAR, DeviceStep
from numba_recon.recon.state import EpochStats, RunState, eta_text

log = logging.getLogger(__name__)

#: Width (pixels) of the soft edge that takes a start map to zero inside the adam support.
SOFT_START_EDGE_PX = 6.0
#: A start map low-passed finer than this shares detail between the halves that the FSC would count.
INITIAL_LOWPASS_WARN_ANGSTROM = 20.0
#: An adam epoch whose loss exceeds this multiple of a blank map's loss has diverged.
DIVERGENCE_FACTOR = 10.0


class AdamSolver:
    """Methods of :class:`~numba_recon.recon.engine.Reconstruction` for the adam solver."""

    def _run_adam(self) -> dict[str, Any]:
        """Run the remaining epochs, checkpointing, then write the outputs (rank 0). Returns the summary."""
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
