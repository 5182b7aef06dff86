"""The arrays a run keeps on its backend: the pass sums of the cg solver (:class:`PassSums`), one
prepared batch (:class:`Batch`), and the buffers of an adam step kept on the device (:class:`DeviceStep`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from numba_recon.recon.state import RunState
from numba_recon.reduce import Comm


class PassSums:
    """The volumes a pass sums over particles (back-projections, kernels), ``(k, N, N, N)``.

    On the CPU each batch is accumulated into a float32 scratch volume by the kernels and then
    added into float64 sums on the host, so that the sums of a pass depend on the split of the
    particles between ranks and batches only at float64 rounding (the direct reconstruction
    divides by small sampling densities, which magnifies float32 summation noise about tenfold).
    On the GPU the kernels accumulate into float32 device sums, copied to the host once per pass.
    """

    def __init__(self, backend: Any, k: int, n: int) -> None:
        self.backend = backend
        self.on_host = backend.name == "cpu"
        if self.on_host:
            self.total = np.zeros((k, n, n, n), np.float64)
            self._scratch = np.zeros((n, n, n), np.float32)
        else:
            self.total = backend.zeros((k, n, n, n))
        self._current = -1

    def target(self, j: int) -> Any:
        """The buffer the next kernel call for sum ``j`` accumulates into; :meth:`commit` after it."""
        if not self.on_host:
            return self.total[j]
        self._scratch[...] = 0.0
        self._current = j
        return self._scratch

    def commit(self) -> None:
        if self.on_host and self._current >= 0:
            self.total[self._current] += self._scratch
            self._current = -1

    def reduce(self, comm: Comm) -> np.ndarray:
        """Sum over ranks (one reduction) and return the host float64 sums."""
        comm.allreduce_sum_(self.total)
        return np.asarray(self.backend.to_host(self.total) if not self.on_host else self.total, dtype=np.float64)



@dataclass
class Batch:
    """One batch of ``b`` particles ready for the operator (``Reconstruction._prepared`` in :mod:`.engine`).

    Attributes
    ----------
    data, filters2
        ``(b, N, N)`` float32 ``H T^-1 b`` and ``H^2``: backend arrays when prepared on the device,
        host arrays otherwise (the backend's ``to_device``/``copy_into`` take either).
    data_norm2_dev
        ``(b,)`` float32 ``||T^-1 b||^2``, where ``data`` is.
    data_norm2, noise_var
        ``(b,)`` float32 host copies of the norms and the noise variances, or None where the caller
        asked for them to stay on the device.
    rotations
        ``(b, 3, 3)`` float32, host.
    """

    data: Any
    filters2: Any
    data_norm2_dev: Any
    data_norm2: np.ndarray | None
    noise_var: np.ndarray | None
    rotations: np.ndarray



#: The noise variance is floored here (an image with a constant background).
MIN_NOISE_VAR = np.float32(1e-12)



@dataclass
class DeviceStep:
    """The backend arrays of an adam run, allocated once and reused by every step.

    The maps, their gradients and the Adam moments live here from the first step to the last;
    the host copies in :class:`RunState` are refreshed once per epoch (the maps, for the FSC and
    the outputs) or when a checkpoint is due (the moments). ``B`` is the largest shard of a
    minibatch one rank handles; ``P`` bounds the particles one rank processes in an epoch.

    Attributes
    ----------
    params, grad, m
        ``(2, N, N, N)`` float32: half maps, summed minibatch gradients, first moments.
    v
        ``(2,)`` float32: the second moment of each half.
    rotations
        ``(B, 3, 3)`` float32, the shard's poses (uploaded into ``[:b]`` each step).
    filters2, data, residual
        ``(B, N, N)`` float32: squared CTFs, filtered images, residuals.
    data_norm2, weights, ones
        ``(B,)`` float32: image norms, robust weights, and unit weights for the plain L2 loss.
    losses, energy
        ``(P,)`` float32: per-particle losses and model energies of the epoch, in processing
        order, left on the device and copied to the host once at the end of the epoch.
    images, ctf_params, shifts_px, premultiplied
        With particles prepared on the device (else None): the shard's raw images ``(B, N, N)``
        float32, CTF parameters ``(B, 9)`` float64, shifts ``(B, 2)`` float64 and flags ``(B,)``
        uint8, the inputs of the backend's ``prepare_particles``.
    norm2_epoch, noise_epoch
        With particles prepared on the device (else None): ``(P,)`` float32 image norms and noise
        variances of the epoch, written by ``prepare_particles`` beside the losses.
    """

    params: Any
    grad: Any
    m: Any
    v: Any
    rotations: Any
    filters2: Any
    data: Any
    residual: Any
    data_norm2: Any
    weights: Any
    ones: Any
    losses: Any
    energy: Any
    images: Any = None
    ctf_params: Any = None
    shifts_px: Any = None
    premultiplied: Any = None
    norm2_epoch: Any = None
    noise_epoch: Any = None

    @classmethod
    def allocate(cls, backend: Any, st: RunState, n: int, width: int, per_epoch: int,
                 raw: bool = False) -> "DeviceStep":
        """Buffers for maps of box ``n``, shards of up to ``width`` particles and ``per_epoch``
        particles an epoch (with ``raw``, the inputs of ``prepare_particles`` too); the maps and
        moments start as ``st``'s."""
        be = backend
        shape = st.volumes.shape
        width, per_epoch = max(1, width), max(1, per_epoch)
        raw_buffers = {}
        if raw:
            raw_buffers = dict(images=be.zeros((width, n, n)), ctf_params=be.zeros((width, 9), np.float64),
                               shifts_px=be.zeros((width, 2), np.float64),
                               premultiplied=be.zeros((width,), np.uint8), norm2_epoch=be.zeros((per_epoch,)),
                               noise_epoch=be.zeros((per_epoch,)))
        return cls(**raw_buffers, params=be.copy_into(be.zeros(shape), st.volumes), grad=be.zeros(shape),
                   m=be.copy_into(be.zeros(shape), st.adam.m), v=be.copy_into(be.zeros(shape[:1]), st.adam.v),
                   rotations=be.zeros((width, 3, 3)), filters2=be.zeros((width, n, n)), data=be.zeros((width, n, n)),
                   residual=be.zeros((width, n, n)), data_norm2=be.zeros((width,)), weights=be.zeros((width,)),
                   ones=be.copy_into(be.zeros((width,)), np.ones(width, np.float32)),
                   losses=be.zeros((per_epoch,)), energy=be.zeros((per_epoch,)))
