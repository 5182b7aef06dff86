"""Atomic HDF5 checkpoints and resume.

One file per checkpoint, ``checkpoints/ckpt_e0005.h5``, written by rank 0 only:

1. everything is written to ``ckpt_e0005.h5.tmp``, the file is closed and ``fsync``-ed;
2. it is renamed into place with ``os.replace`` and the folder is ``fsync``-ed;
3. ``latest.json`` (the newest good checkpoint's name) is replaced the same way.

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
from numba_recon.errors import InputFileError, OutputError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).tobytes()) & 0xFFFFFFFF


def _fault_point(name: str) -> None:
    """Fault injection for tests: ``NUMBA_RECON_FAULT=kill_during_checkpoint`` kills the process here."""
    if os.environ.get("NUMBA_RECON_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_SPACE_FIX = "free space or raise the limit, then continue with --resume (files already written are complete and intact)"
_WRITABLE_FIX = ("make the folder writable again (remount it read-write), then continue with --resume (files already "
                 "written are complete and intact)")
#: (problem, (text needles, errno needle), fix): the first match names the failure and its fix.
_WRITE_ERRORS = (
    ("no space left on device", ("no space left", "errno = 28"), _SPACE_FIX),
    ("disk quota exceeded", ("quota", "errno = 122"), _SPACE_FIX),
    ("file too large for the file-size limit", ("file too large", "errno = 27"), _SPACE_FIX),
    ("read-only file system", ("read-only file system", "errno = 30"), _WRITABLE_FIX),
    ("permission denied", ("permission denied", "errno = 13"), _WRITABLE_FIX),
    ("input/output error", ("input/output error", "errno = 5"),
     "check the disk (the kernel log names the device), then continue with --resume"),
)


def checkpoint_name(epoch: int) -> str:
    """The file name of the checkpoint written after ``epoch`` epochs: ``ckpt_e0005.h5``."""
    return f"ckpt_e{int(epoch):04d}.h5"


def write_error(path: Path, err: BaseException) -> OutputError:
    """One clear :class:`OutputError` for a failed write of ``path`` (disk full, quota, file-size
    limit, I/O error), whatever layer raised it (the OS, or HDF5 through h5py)."""
    text = f"{getattr(err, 'strerror', None) or ''} {err}".lower()
    code = getattr(err, "errno", None)
    for problem, needles, fix in _WRITE_ERRORS:
        if any(n in text for n in needles) or (code is not None and f"errno = {code}" == needles[1]):
            break
    else:
        problem = f"cannot write ({getattr(err, 'strerror', None) or err})"
        fix = "check the output folder, then continue with --resume (files already written are complete and intact)"
    return OutputError(problem, path, fix)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename, fsync folder).

    On failure the temporary file is removed, ``path`` is left as it was, and an
    :class:`OutputError` names ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    manifest.note_temporary(tmp)  # the output manifest lists what we write (numba_recon.manifest)
    token = None
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        token = manifest.record_write(path, source=tmp)
        os.replace(tmp, path)
    except OSError as err:
        manifest.undo(token)
        _remove_quietly(tmp)
        raise write_error(path, err) from None
    finally:
        manifest.discard_temporary(tmp)
    _fsync_dir(path.parent)


def save_checkpoint(out_dir: Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically under ``out_dir/checkpoints`` and point ``latest.json`` at it.

    Keeps the newest ``keep`` checkpoints and removes older ones. Returns the checkpoint's path.
    """
    folder = Path(out_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(ckpt.epoch)
    final = folder / name
    tmp = folder / (name + ".tmp")
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
    manifest.note_temporary(tmp)
    token = None
    try:
        with open(tmp, "wb") as fh:
            half = len(image) // 2
            fh.write(image[:half])
            fh.flush()
            _fault_point("kill_during_checkpoint")  # a file cut in the middle, never renamed into place
            fh.write(image[half:])
            fh.flush()
            os.fsync(fh.fileno())
        token = manifest.record_write(final, source=tmp)
        os.replace(tmp, final)
    except OSError as err:
        manifest.undo(token)
        _remove_quietly(tmp)
        raise write_error(final, err) from None
    finally:
        manifest.discard_temporary(tmp)
        del image
    _fsync_dir(folder)
    atomic_write_text(folder / LATEST, json.dumps({"checkpoint": name, "epoch": ckpt.epoch}) + "\n")
    _prune(folder, keep)
    return final


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> None:
    """After a finished run: keep the newest ``keep`` of the run's own checkpoints in
    ``out_dir/checkpoints`` (``--keep-checkpoints``)."""
    folder = Path(out_dir) / "checkpoints"
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
    folder = Path(out_dir) / CHECKPOINT_DIR
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
