"""The state of a run: what a checkpoint restores (:class:`RunState`), one row of ``history.csv``
(:class:`EpochStats`), and the identity of the particle set a resume must match."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from numba_recon.step import AdamState


@dataclass
class EpochStats:
    """Figures of one epoch, one row of ``history.csv``."""

    epoch: int
    train_loss: float
    cv_loss: float
    resolution_angstrom: float
    resolution_05_angstrom: float
    kept_fraction: float
    seconds: float
    images_per_second: float



@dataclass
class RunState:
    """Mutable state of a run (what a checkpoint restores)."""

    epoch: int
    step: int
    volumes: np.ndarray
    adam: AdamState
    lr_abs: np.ndarray
    halves: np.ndarray
    cv: np.ndarray
    scores_prev: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    data_scale: float = 1.0
    solver: dict[str, Any] | None = None



def eta_text(history: list[dict[str, Any]], epochs: int) -> str:
    """The time the remaining epochs take at the median pace so far, as ``1h02m``, ``3m05s`` or ``12s``."""
    done = len(history)
    if done >= epochs:
        return "done"
    seconds = float(np.median([float(r["seconds"]) for r in history[-5:]])) * (epochs - done)
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.0f}s"



def particle_fingerprint(particles: Any) -> str:
    """SHA-256 of the particle set as a run sees it: every row's image (``index@stack file name``) and
    input half set, in row order. A resume with another set (rows added, removed, reordered or moved
    between halves) would mix the gold-standard halves, so it is refused."""
    import hashlib

    digest = hashlib.sha256()
    for path, index, half in zip(particles.stack_paths, particles.stack_indices, np.asarray(particles.half_set)):
        # surrogateescape: a stack name read from a non-UTF-8 file hashes as its bytes on disk
        digest.update(f"{int(index)}@{Path(str(path)).name}:{int(half)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()



def second_moment_per_half(v: np.ndarray) -> np.ndarray:
    """A checkpoint's Adam second moment as ``(2,)`` float32. Checkpoints of earlier versions hold
    one per voxel; their mean over the map is exactly the map-wide moment the step now keeps."""
    v = np.asarray(v)
    if v.ndim > 1:
        v = v.reshape(len(v), -1).mean(axis=1, dtype=np.float64)
    return v.astype(np.float32)
