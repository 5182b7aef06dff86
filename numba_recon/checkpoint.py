"""Atomic HDF5 checkpoints and resume.

One file per checkpoint, ``checkpoints/ckpt_e0005.h5``, written by rank 0 only:

1. everything is written under a hidden temporary name in the folder, closed and ``fsync``-ed;
2. it is renamed into place with ``os.replace`` and the folder is ``fsync``-ed;
3. ``latest.json`` (the newest good checkpoint's name) is replaced the same way.

(:func:`numba_recon.io.atomic.atomic_output` with ``durable=True``, which names a failed write's
cause and how to continue with ``--resume``.)

A crash at any moment therefore leaves the previous checkpoint intact. Each dataset carries a
CRC-32 and the file a final ``complete`` attribute; :func:`load_latest` checks both and falls back to
the previous checkpoint (with a warning) when the newest is damaged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from numba_recon import manifest
from numba_recon.errors import InputFileError
from numba_recon.io.atomic import atomic_output, atomic_write_text
from numba_recon.io.run_files import CHECKPOINTS_DIR, LATEST_CHECKPOINT_JSON as LATEST

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """The complete state needed to continue a run.

    Attributes
    ----------
    epoch
        Number of epochs completed.
    step
        Number of optimiser steps taken.
    volumes
        ``(2, N, N, N)`` float32 half maps.
    adam_m, adam_v
        Adam moments, float32: the first ``(2, N, N, N)``, the second ``(2,)`` (one per half; checkpoints
        of earlier versions hold ``(2, N, N, N)``); ``adam_t`` the Adam step count.
    arrays
        Other per-particle arrays (half split, cross-validation flags, robust weights...).
    config
        The run configuration (JSON-serialisable).
    state
        Other scalars and small lists (learning rates, RNG seeds, history, provenance).
    """

    epoch: int
    step: int
    volumes: np.ndarray
    adam_m: np.ndarray
    adam_v: np.ndarray
    adam_t: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).tobytes()) & 0xFFFFFFFF


def _fault_point(name: str) -> None:
    """Fault injection for tests: ``NUMBA_RECON_FAULT=kill_during_checkpoint`` kills the process here."""
    if os.environ.get("NUMBA_RECON_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_name(epoch: int) -> str:
    """The file name of the checkpoint written after ``epoch`` epochs: ``ckpt_e0005.h5``."""
    return f"ckpt_e{int(epoch):04d}.h5"


def save_checkpoint(out_dir: Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically under ``out_dir/checkpoints`` and point ``latest.json`` at it.

    Keeps the newest ``keep`` checkpoints and removes older ones. Returns the checkpoint's path.
    """
    folder = Path(out_dir) / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(ckpt.epoch)
    final = folder / name
    datasets = {"volumes": ckpt.volumes, "adam_m": ckpt.adam_m, "adam_v": ckpt.adam_v}
    datasets.update({f"arrays/{k}": v for k, v in ckpt.arrays.items()})
    # The HDF5 image is built in memory and written with plain file I/O: a full disk then fails
    # one ordinary write with a clean OSError, instead of failing inside the HDF5 library (which
    # prints tracebacks from its object finalisers and can crash while closing a half-written file).
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["epoch"] = ckpt.epoch
        h5.attrs["step"] = ckpt.step
        h5.attrs["adam_t"] = ckpt.adam_t
        h5.attrs["config"] = json.dumps(ckpt.config, sort_keys=True)
        h5.attrs["state"] = json.dumps(ckpt.state, sort_keys=True)
        for key, value in datasets.items():
            arr = np.ascontiguousarray(value)
            ds = h5.create_dataset(key, data=arr)
            ds.attrs["crc32"] = _crc(arr)
        h5.attrs["complete"] = True
    image = buffer.getbuffer()
    # make room first: the newest good checkpoint stays while this one is written, so the disk
    # never holds more than ``keep`` checkpoint-sized files (a full disk at box 400 is gigabytes)
    _prune(folder, keep - 1, exclude=final)
    try:
        with atomic_output(final, durable=True) as tmp:
            with open(tmp, "wb") as fh:
                half = len(image) // 2
                fh.write(image[:half])
                fh.flush()
                _fault_point("kill_during_checkpoint")  # a file cut in the middle, never renamed into place
                fh.write(image[half:])
    finally:
        del image
    atomic_write_text(folder / LATEST, json.dumps({"checkpoint": name, "epoch": ckpt.epoch}) + "\n", durable=True)
    _prune(folder, keep)
    return final


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> None:
    """After a finished run: keep the newest ``keep`` of the run's own checkpoints in
    ``out_dir/checkpoints`` (``--keep-checkpoints``)."""
    folder = Path(out_dir) / CHECKPOINTS_DIR
    if folder.is_dir():
        _prune(folder, keep)


def _prune(folder: Path, keep: int, exclude: Path | None = None) -> None:
    """Remove all but the newest ``keep`` (at least one) of our checkpoints in ``folder``.

    Only checkpoints this run wrote are counted and removed: files this process wrote, or listed in
    the run folder's output manifest and unchanged since (:func:`numba_recon.manifest.is_ours`). A
    file of the user (or of an older run without a manifest) named like a checkpoint is left alone.
    """
    old = [p for p in sorted(folder.glob("ckpt_e*.h5"))
           if p != exclude and manifest.is_ours(p, root=folder.parent)]
    for stale in old[:-max(keep, 1)]:
        manifest.remove_if_ours(stale, root=folder.parent)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file.

    Raises :class:`InputFileError` when the file is unreadable, incomplete or fails a checksum.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            if not h5.attrs.get("complete", False):
                raise InputFileError("checkpoint is incomplete (the write was interrupted)", path,
                                     "resume from an earlier checkpoint")
            data: dict[str, np.ndarray] = {}

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    arr = obj[()]
                    if _crc(arr) != int(obj.attrs.get("crc32", -1)):
                        raise InputFileError(f"checksum mismatch in dataset {name!r}", path,
                                             "the file is corrupted; resume from an earlier checkpoint")
                    data[name] = arr

            h5.visititems(visit)
            return Checkpoint(
                epoch=int(h5.attrs["epoch"]),
                step=int(h5.attrs["step"]),
                volumes=data["volumes"],
                adam_m=data["adam_m"],
                adam_v=data["adam_v"],
                adam_t=int(h5.attrs["adam_t"]),
                arrays={k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("arrays/")},
                config=json.loads(h5.attrs["config"]),
                state=json.loads(h5.attrs["state"]),
            )
    except InputFileError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise InputFileError(f"cannot read checkpoint: incomplete or damaged ({err})", path,
                             "resume from an earlier checkpoint") from None


def load_latest(out_dir: Path) -> Checkpoint | None:
    """The newest good checkpoint of a run folder, or None if it has none.

    Tries the file named in ``latest.json`` first, then every ``ckpt_e*.h5`` from newest to oldest,
    warning about each damaged one it skips.
    """
    folder = Path(out_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    candidates = sorted(folder.glob("ckpt_e*.h5"), reverse=True)
    try:
        latest = json.loads((folder / LATEST).read_text())["checkpoint"]
        first = folder / latest
        if first in candidates:
            candidates.remove(first)
            candidates.insert(0, first)
    except (OSError, ValueError, KeyError):
        if candidates:
            log.warning("%s is missing or damaged; scanning for the newest complete checkpoint", folder / LATEST)
    for path in candidates:
        try:
            return load_checkpoint(path)
        except InputFileError as err:
            log.warning("skipping damaged checkpoint: %s", err)
    return None
