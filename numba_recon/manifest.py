"""The output manifest: which files in an output folder numba-recon wrote, so ``--overwrite`` removes
exactly those and nothing the user made (``docs/outputs-and-overwrite.md``).

A manifest lists, relative to its folder, every file a command wrote there with the file's size and
modification time (nanoseconds) as they were when written; the folders the command created; and the
temporary files it was writing when it last saved (a killed run may leave them behind). A listed
file whose size or modification time no longer matches was replaced or edited by someone else and
is not ours any more: it is never removed.

Recording is central. A command *activates* a :class:`Manifest` for its output folder; every write
path reports to it: :func:`numba_recon.io.atomic.atomic_output` (MRC, STAR, ``.thu``, FSC tables,
figures, post-processing, checkpoints, ``latest.json``, ``history.csv``, ``half_sets.csv``, the
report and summary files). Each write updates the manifest file (atomically,
written to a temporary name and renamed) before the new file is renamed into place, so a run killed
at any moment leaves a manifest that covers everything it wrote. A file written outside an
activated folder is still remembered for the life of the process (:func:`is_ours`), which is what
checkpoint pruning needs when the engine is used without the command line.

``run`` keeps its manifest in ``OUT/.numba_recon_manifest.json``. ``simulate`` writes its data set
in one step and keeps the same manifest inside ``simulation.json`` (key ``"manifest"``); see
:mod:`numba_recon.sim.simulate`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from numba_recon.io.files import replace_text

log = logging.getLogger(__name__)

#: File name of the manifest in an output folder.
MANIFEST_NAME = ".numba_recon_manifest.json"
FORMAT = "numba-recon output manifest"
VERSION = 1
#: Empty marker files a run writes in its folder (RELION's job markers).
#: Append-only records of a folder (numba_recon.journal): never removed, never counted as foreign.
JOURNALS = ("note.txt", "run.log")
MARKERS = ("NUMBA_RECON_JOB_EXIT_SUCCESS", "NUMBA_RECON_JOB_EXIT_FAILURE")
#: Longest list of file names a warning spells out.
_NAMES_SHOWN = 12

_lock = threading.RLock()
_active: dict[str, "Manifest"] = {}
# files this process wrote (real path -> (size, mtime_ns)), also outside any active manifest
_written: dict[str, tuple[int, int]] = {}
# temporary files this process is writing (real paths)
_temporaries: set[str] = set()


def _real_path(path: str | os.PathLike) -> str:
    """Absolute path with the folder's symbolic links resolved (not the file's own name)."""
    p = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def _signature(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file (not a link), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def signature(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file as a manifest records it, or None (absent, a link, a folder)."""
    return _signature(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _ancestors(rel: str) -> list[str]:
    """``"a/b/c.txt"`` -> ``["a", "a/b"]``."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def _existing_dirs(root: str) -> set[str]:
    """Relative names of the folders under ``root`` now (links are not followed)."""
    found: set[str] = set()
    for top, dirs, _ in os.walk(root):
        for d in dirs:
            full = os.path.join(top, d)
            if not os.path.islink(full):
                found.add(Path(os.path.relpath(full, root)).as_posix())
    return found


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_NAMES_SHOWN])
    if len(items) > _NAMES_SHOWN:
        shown += f" and {len(items) - _NAMES_SHOWN} more"
    return shown


class Manifest:
    """What one command wrote in one output folder.

    Parameters
    ----------
    root
        The output folder.
    command
        The command that writes it (``"run"``, ``"simulate"``...).
    store_name
        File name of the manifest inside ``root``, or None for a manifest the caller stores itself
        (``simulate`` keeps it in ``simulation.json``).
    """

    def __init__(self, root: str | os.PathLike, command: str, store_name: str | None = MANIFEST_NAME):
        self.root = os.path.realpath(os.fspath(root))
        self.command = command
        self.store_name = store_name
        self.files: dict[str, dict[str, int]] = {}
        self.folders: set[str] = set()
        self.temporary: set[str] = set()
        self.sessions: list[dict[str, Any]] = []
        self.created = _now()
        self._preexisting: set[str] = set()
        self._save_failed = False
        self._unsaved = False

    # ------------------------------------------------------------------ storage
    @property
    def path(self) -> Path | None:
        """The manifest file, or None when the caller stores the manifest."""
        return None if self.store_name is None else Path(self.root) / self.store_name

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "command": self.command,
            "created": self.created,
            "updated": _now(),
            "sessions": self.sessions,
            "files": {rel: dict(self.files[rel]) for rel in sorted(self.files)},
            "folders": sorted(self.folders),
            "temporary": sorted(self.temporary),
        }

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike, command: str | None = None,
                  store_name: str | None = MANIFEST_NAME) -> "Manifest":
        """Rebuild a manifest; ``ValueError`` when ``data`` is not one (or of another ``command``)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError("not a numba-recon output manifest of a known version")
        if command is not None and data.get("command") != command:
            raise ValueError(f"written by {data.get('command')!r}, not {command!r}")
        m = cls(root, str(data["command"]), store_name)
        files = data.get("files", {})
        if not isinstance(files, dict):
            raise ValueError("'files' is not a table")
        for rel, entry in files.items():
            m.files[m._clean_rel(rel)] = {"size": int(entry["size"]), "mtime_ns": int(entry["mtime_ns"])}
        m.folders = {m._clean_rel(r) for r in data.get("folders", [])}
        m.temporary = {m._clean_rel(r) for r in data.get("temporary", [])}
        m.sessions = list(data.get("sessions", []))
        m.created = str(data.get("created", m.created))
        return m

    @staticmethod
    def _clean_rel(rel: Any) -> str:
        """A listed name must stay inside the folder: no absolute paths, no ``..``."""
        text = str(rel)
        parts = text.split("/")
        if not text or text.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in text:
            raise ValueError(f"bad file name {text!r} in the manifest")
        return text

    @classmethod
    def load(cls, root: str | os.PathLike, command: str | None = None,
             store_name: str = MANIFEST_NAME) -> "Manifest | None":
        """The manifest stored in ``root``, or None when there is none (or it is damaged, with a warning)."""
        path = Path(root) / store_name
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), root, command, store_name)
        except (OSError, ValueError, TypeError, KeyError) as err:
            log.warning("%s: output manifest not usable (%s); nothing it lists is treated as ours", path, err)
            return None

    def save(self) -> None:
        """Write the manifest file atomically (a temporary name, fsync, rename).

        A failure (a full disk) is logged once and does not stop the command: the manifest only
        decides what a later ``--overwrite`` may remove, and an incomplete one removes less.
        """
        if self.store_name is None:
            return
        final = Path(self.root) / self.store_name
        try:
            replace_text(final, json.dumps(self.to_dict(), indent=1) + "\n")
        except OSError as err:
            if not self._save_failed:
                log.warning("%s: cannot update the output manifest (%s); files written meanwhile will not be "
                            "removed by a later --overwrite", final, err.strerror or err)
            self._save_failed = True
            return
        self._save_failed = False
        self._unsaved = False

    # ------------------------------------------------------------------ names
    def rel(self, path: str | os.PathLike) -> str | None:
        """``path`` relative to the folder (``/``-separated), or None when it lies outside."""
        real = _real_path(path)
        rel = os.path.relpath(real, self.root)
        if rel == "." or rel.startswith("..") or os.path.isabs(rel):
            return None
        return Path(rel).as_posix()

    def matches(self, rel: str) -> bool:
        """True when ``rel`` is listed and the file there is still the one we wrote."""
        entry = self.files.get(rel)
        if entry is None:
            return False
        full = os.path.join(self.root, rel)
        if _real_path(full) != full:
            return False  # reached through a link the user made: not where we wrote it
        return _signature(full) == (entry["size"], entry["mtime_ns"])

    def begin_recording(self, mode: str) -> None:
        """Start a session: folders present now (and not listed as ours) are not ours."""
        self._preexisting = _existing_dirs(self.root) - self.folders
        argv = [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv else []
        from numba_recon import __version__

        self.sessions.append({"started": _now(), "mode": mode, "command_line": argv, "version": __version__})

    def _claim_folders(self, rel: str) -> None:
        for folder in _ancestors(rel):
            if folder not in self._preexisting:
                self.folders.add(folder)

    # ------------------------------------------------------------------ recording
    def note_temporary(self, path: str | os.PathLike, save: bool = True) -> None:
        rel = self.rel(path)
        if rel is None or rel == self.store_name:
            return
        self.temporary.add(rel)
        self._claim_folders(rel)
        if save:
            self.save()

    def drop_temporary(self, path: str | os.PathLike) -> None:
        """The temporary file is gone (renamed into place or removed); saved with the next change."""
        rel = self.rel(path)
        if rel is not None and rel in self.temporary:
            self.temporary.discard(rel)
            self._unsaved = True

    def record(self, path: str | os.PathLike, signature: tuple[int, int], save: bool = True):
        """List ``path`` as written with ``signature``; returns an undo token (None if not listed)."""
        rel = self.rel(path)
        if rel is None or rel == self.store_name or rel in self.temporary:
            return None  # outside, the manifest itself, or a temporary file of an enclosing write
        previous = self.files.get(rel)
        self.files[rel] = {"size": signature[0], "mtime_ns": signature[1]}
        self._claim_folders(rel)
        if save:
            self.save()
        return self, rel, previous

    def forget(self, path: str | os.PathLike, save: bool = True) -> None:
        rel = self.rel(path)
        if rel is not None and self.files.pop(rel, None) is not None and save:
            self.save()

    # ------------------------------------------------------------------ removal
    def remove_own(self, protect: Iterable[str | os.PathLike] = ()) -> tuple[list[str], list[str]]:
        """Remove the listed files that are still ours, the temporary files, then the empty folders
        we created. Returns (removed, kept): ``kept`` are listed files that were changed since."""
        protected = {_real_path(p) for p in protect if p}
        removed: list[str] = []
        kept: list[str] = []
        for rel in sorted(self.files):
            full = os.path.join(self.root, rel)
            if not os.path.lexists(full):
                continue
            if self.matches(rel) and _real_path(full) not in protected:
                try:
                    os.unlink(full)
                    removed.append(rel)
                    continue
                except OSError as err:
                    log.warning("%s: cannot remove (%s)", full, err.strerror or err)
            kept.append(rel)
        self.files.clear()
        for rel in sorted(self.temporary):
            full = os.path.join(self.root, rel)
            if _signature(full) is not None and _real_path(full) not in protected:
                with contextlib.suppress(OSError):
                    os.unlink(full)
                    removed.append(rel)
        self.temporary.clear()
        self.remove_empty_folders()
        return removed, kept

    def remove_empty_folders(self) -> None:
        """Remove the folders we created that are empty now (deepest first); keep the others listed."""
        for rel in sorted(self.folders, key=lambda r: r.count("/"), reverse=True):
            full = os.path.join(self.root, rel)
            if os.path.islink(full) or not os.path.isdir(full):
                self.folders.discard(rel)
                continue
            try:
                os.rmdir(full)
            except OSError:
                continue  # not empty: something else is in it
            self.folders.discard(rel)

    def foreign(self, folders: Sequence[str], extra_ignored: Iterable[str] = ()) -> list[str]:
        """Files (and links, and sub-folders as ``name/``) in the folder's top level and in
        ``folders`` (recursively) that are not listed as ours."""
        ignored = {self.store_name, f"{self.store_name}.tmp", *JOURNALS, *extra_ignored} - {None}
        found: list[str] = []
        root = Path(self.root)
        try:
            top = sorted(root.iterdir())
        except OSError:
            return found
        for entry in top:
            name = entry.name
            if name in ignored:
                continue
            if entry.is_dir() and not entry.is_symlink():
                if name in folders:
                    found += self._foreign_in(entry)
                elif name not in self.folders:
                    found.append(name + "/")
            elif not self.matches(name) and name not in self.temporary:
                found.append(name)
        return found

    def _foreign_in(self, folder: Path) -> list[str]:
        found = []
        for top, dirs, files in os.walk(folder):
            for d in list(dirs):
                full = os.path.join(top, d)
                rel = Path(os.path.relpath(full, self.root)).as_posix()
                if os.path.islink(full):
                    found.append(rel)
                    dirs.remove(d)
                elif rel not in self.folders:
                    found.append(rel + "/")
                    dirs.remove(d)  # named as a whole
            for f in files:
                rel = Path(os.path.relpath(os.path.join(top, f), self.root)).as_posix()
                if not self.matches(rel) and rel not in self.temporary:
                    found.append(rel)
        return sorted(found)


# ---------------------------------------------------------------------- the active recorders

def activate(manifest: Manifest) -> Manifest:
    """Record every write under ``manifest.root`` in ``manifest`` from now on (this process)."""
    with _lock:
        _active[manifest.root] = manifest
    return manifest


def deactivate(manifest: Manifest) -> None:
    """Stop recording into ``manifest`` (writes after this are remembered by the process only)
    and save what is not saved yet."""
    with _lock:
        if _active.get(manifest.root) is manifest:
            del _active[manifest.root]
        if manifest._unsaved:
            manifest.save()


def active_for(path: str | os.PathLike) -> Manifest | None:
    """The active manifest whose folder holds ``path`` (the innermost one), or None."""
    with _lock:
        if not _active:
            return None
        real = _real_path(path)
        best = None
        for root, m in _active.items():
            if real.startswith(root.rstrip(os.sep) + os.sep) and (best is None or len(root) > len(best.root)):
                best = m
        return best


def note_temporary(path: str | os.PathLike) -> None:
    """A writer is about to create the temporary file ``path`` (renamed into place when complete)."""
    with _lock:
        _temporaries.add(_real_path(path))
        m = active_for(path)
        if m is not None:
            m.note_temporary(path)


def discard_temporary(path: str | os.PathLike) -> None:
    """The temporary file ``path`` was renamed into place or removed."""
    with _lock:
        _temporaries.discard(_real_path(path))
        m = active_for(path)
        if m is not None:
            m.drop_temporary(path)


def record_write(path: str | os.PathLike, source: str | os.PathLike | None = None):
    """``path`` was written by us. With ``source`` (the finished temporary file about to be renamed
    onto ``path``; a rename keeps size and modification time) call this *before* the rename, so a
    kill in between cannot leave a file of ours that the manifest misses.

    Returns a token for :func:`undo` (when the rename then fails), or None.
    """
    with _lock:
        sig = _signature(source if source is not None else path)
        real = _real_path(path)
        if sig is None or real in _temporaries:
            return None  # nothing there, or the temporary file of an enclosing atomic write
        previous = _written.get(real)
        _written[real] = sig
        m = active_for(path)
        token = m.record(path, sig) if m is not None else None
        return real, previous, token


def undo(token) -> None:
    """Withdraw a :func:`record_write` whose rename failed."""
    if token is None:
        return
    with _lock:
        real, previous, inner = token
        if previous is None:
            _written.pop(real, None)
        else:
            _written[real] = previous
        if inner is not None:
            m, rel, entry = inner
            if entry is None:
                m.files.pop(rel, None)
            else:
                m.files[rel] = entry
            m.save()


def forget(path: str | os.PathLike) -> None:
    """We removed ``path``: it is no longer listed."""
    with _lock:
        _written.pop(_real_path(path), None)
        m = active_for(path)
        if m is not None:
            m.forget(path)


def is_ours(path: str | os.PathLike, root: str | os.PathLike | None = None) -> bool:
    """True when ``path`` is a regular file we provably wrote and nobody changed since: written by
    this process, or listed (with the same size and modification time) in the active manifest or
    in the manifest stored in ``root``."""
    sig = _signature(path)
    if sig is None:
        return False
    with _lock:
        if _written.get(_real_path(path)) == sig:
            return True
        m = active_for(path)
        if m is not None:
            rel = m.rel(path)
            if rel is not None and m.matches(rel):
                return True
    if root is not None:
        stored = Manifest.load(root)
        if stored is not None:
            rel = stored.rel(path)
            return rel is not None and stored.matches(rel)
    return False


def remove_if_ours(path: str | os.PathLike, root: str | os.PathLike | None = None) -> bool:
    """Delete ``path`` only if :func:`is_ours`; returns whether it was removed."""
    if not is_ours(path, root):
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    forget(path)
    return True


def withdraw_markers(root: str | os.PathLike, names: Sequence[str] = MARKERS) -> None:
    """Remove job marker files: ours, or empty ones (an empty marker holds no data, and a stale
    ``..._SUCCESS`` would declare an unfinished run finished)."""
    for name in names:
        p = Path(root) / name
        sig = _signature(p)
        if sig is None:
            continue
        if sig[0] == 0 or is_ours(p):
            with contextlib.suppress(OSError):
                p.unlink()
            forget(p)
        else:
            log.warning("%s is not an empty job marker; left in place", p)


# ---------------------------------------------------------------------- commands

def start(root: str | os.PathLike, command: str, *, overwrite: bool = False, resume: bool = False,
          protect: Iterable[str | os.PathLike] = (), folders: Sequence[str] = (),
          outputs: Sequence[str] = (), markers: Sequence[str] = ()) -> Manifest:
    """Begin recording ``command``'s writes into ``root`` and return the active manifest.

    New run (``resume`` False): with ``overwrite``, the files the previous manifest lists and that
    are still ours are removed first, with its temporary files and the folders it created that are
    then empty; nothing else is removed. Empty job ``markers`` are withdrawn. Files that remain and
    that this command did not write are named in one warning (those matching the ``outputs``
    patterns separately: they will be replaced when the command writes that name). ``folders``
    are the sub-folders this command writes into (searched for such files).

    Resume: the stored manifest is continued (a new one is started when there is none); the
    temporary files a killed run was writing are removed.

    The manifest is stopped with :func:`deactivate` (for a click command, automatically when the
    command ends).
    """
    old = Manifest.load(root, command)
    if resume:
        manifest = old if old is not None else Manifest(root, command)
        # a killed run leaves the temporary files it was writing (half-written, ours): remove them
        for rel in sorted(manifest.temporary):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(manifest.root, rel))
        manifest.temporary.clear()
        manifest.begin_recording("resume")
        manifest.save()
        return _activate_for_command(manifest)
    if overwrite:
        refuse_foreign_outputs(old if old is not None else Manifest(root, command), folders, outputs,
                               extra_ignored=markers)
    if overwrite and old is not None:
        removed, changed = old.remove_own(protect)
        if removed:
            log.info("--overwrite: removed %d file(s) of the previous %s in %s", len(removed), command, root)
        if changed:
            log.info("--overwrite: kept %d file(s) of the previous %s changed since it wrote them: %s",
                     len(changed), command, _names(changed))
    if markers:
        withdraw_markers(root, markers)
    manifest = Manifest(root, command)
    if old is not None:
        manifest.folders = {f for f in old.folders if os.path.isdir(os.path.join(manifest.root, f))}
    manifest.begin_recording("overwrite" if overwrite else "new")
    warn_foreign(manifest, folders, outputs)
    manifest.save()
    return _activate_for_command(manifest)


def refuse_foreign_outputs(manifest: Manifest, folders: Sequence[str], outputs: Sequence[str],
                           extra_ignored: Iterable[str] = ()) -> None:
    """Refuse to start when files that ``manifest`` does not list as ours (a user's, one the user
    changed since we wrote it, or one of a folder without a manifest) carry the names this command
    writes: --overwrite replaces our own outputs only, never a file we cannot prove is ours.

    Raises
    ------
    OutputError
        Naming those files and what to do.
    """
    from numba_recon.errors import OutputError

    clash = [f for f in manifest.foreign(folders, extra_ignored)
             if any(fnmatch.fnmatchcase(f, pat) for pat in outputs)]
    if clash:
        raise OutputError(f"{len(clash)} file(s) here have the names of numba-recon {manifest.command}'s outputs but "
                          f"were not written by it (or were changed since): {_names(clash)}", manifest.root,
                          "move them elsewhere and rerun, or choose another output folder (--overwrite replaces "
                          "only files numba-recon wrote)")


def warn_foreign(manifest: Manifest, folders: Sequence[str], outputs: Sequence[str] = (),
                 extra_ignored: Iterable[str] = ()) -> list[str]:
    """Log one warning naming the files in ``manifest.root`` that this command did not write.
    Returns them."""
    foreign = manifest.foreign(folders, extra_ignored)
    if not foreign:
        return foreign
    replaced = [f for f in foreign if any(fnmatch.fnmatchcase(f, pat) for pat in outputs)]
    kept = [f for f in foreign if f not in replaced]
    if kept:
        log.warning("%s: %d item(s) not written by numba-recon %s are kept and will sit beside the new outputs: %s",
                    manifest.root, len(kept), manifest.command, _names(kept))
    if replaced:
        log.warning("%s: %d file(s) not written by numba-recon %s have the names of its outputs and are replaced "
                    "when it writes them (--overwrite): %s", manifest.root, len(replaced), manifest.command,
                    _names(replaced))
    return foreign


def _activate_for_command(manifest: Manifest) -> Manifest:
    activate(manifest)
    try:
        import click

        ctx = click.get_current_context(silent=True)
    except ImportError:  # pragma: no cover
        ctx = None
    if ctx is not None:
        ctx.call_on_close(lambda: deactivate(manifest))
    return manifest
