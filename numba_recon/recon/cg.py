"""The default solver: preconditioned conjugate gradients over full passes.

One pass grids the CTF^2-weighted sampling density of the central slices and back-projects the
data (:meth:`CGSolver._kernel_pass`); dividing by the density plus the prior learned from the
gold-standard FSC gives the direct reconstruction; each further pass (:meth:`CGSolver._data_pass`)
takes an exact line-search step along the preconditioned conjugate direction, until the held-out
loss stops falling (``docs/reconstruction.md``). The engine (:mod:`.engine`) mixes this class into
:class:`~numba_recon.recon.engine.Reconstruction`, whose attributes the methods read.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from numba_recon.batch import assign_cross_validation, assign_halves, shard
from numba_recon.adjoint import weighted_backproject
from numba_recon.errors import InputError, InputFileError
from numba_recon.loss import pass_reference, pass_weights
from numba_recon.step import AdamState, CGState, cg_direction, cg_step
from numba_recon.recon.buffers import PassSums
from numba_recon.recon.state import EpochStats, RunState, eta_text

log = logging.getLogger(__name__)

#: The CG solver stops when a pass lowers the held-out loss by less than this fraction of what the
#: direct reconstruction gained over a blank map.
CV_TOLERANCE = 0.005
#: The smallest support radius (pixels) the cg solver accepts.
MIN_SUPPORT_RADIUS_PX = 3.0


class CGSolver:
    """Methods of :class:`~numba_recon.recon.engine.Reconstruction` for the cg solver."""

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
