"""One-shot acceptance check of the CUDA backend on a GPU node, written to one JSON file.

Run on the node, in the environment that will run the reconstructions (about 2-3 minutes)::

    python -m numba_recon.cuda.acceptance --json acceptance.json

Steps, in order; each is recorded under ``steps`` with ``status`` (``passed``, ``failed`` or
``skipped``), ``reason`` (why it failed or was skipped), ``seconds`` and its ``figures``:

1. ``preamble``: driver, toolkit, device and a trivial kernel
   (:func:`numba_recon.cuda.device_check.preamble`). If it fails, every other step is skipped.
2. ``parity``: every kernel of the backend contract (``project``, ``backproject``,
   ``weighted_backproject``, ``forward_residual`` residuals and losses, ``insert_weights``,
   ``weight_filters``, and ``prepare_particles``' four outputs from raw images) on the GPU against
   the CPU twin, through :func:`numba_recon.backend.get_backend`, at box 100 with
   150 particles and box 256 with 130; relative error ``max|gpu - cpu| / max|cpu|`` <= 1e-4.
3. ``repeatability``: the same kernels run twice on the same input (box 128, 64 particles): the
   gathers (``backproject``, ``weighted_backproject``) must be bitwise identical, the kernels
   with atomics within a relative 1e-5.
4. ``timing``: CUDA-event medians of ``project``, ``backproject``, the loss and gradient and
   ``prepare_particles`` (with the upload of the raw images) at
   boxes 64, 128 and 256 (128 particles, 3 calls after a warm-up) and once at box 400
   (32 particles): ms per call and images/s.
5. ``end_to_end``: ``numba-recon simulate`` (box 64, 2,000 particles), then ``numba-recon run``
   with ``--backend cuda`` and with ``--backend cpu`` (2 CG passes, subprocesses); the FSC
   between the two results must exceed 0.99 in every shell up to Nyquist, for the map and both
   half maps. Records images/s of each backend and the stage times of ``summary.json``.
6. ``mpi_shared_gpu``: the same run under ``mpiexec -n 2`` with ``--backend cuda`` (both ranks
   on one GPU); the FSC against the one-rank CUDA map must exceed 0.99. Skipped, with the
   reason, when ``mpiexec`` is missing.

``--quick`` (automatic in Numba's CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``) shrinks every size
(boxes 8-12, a few particles, one CG pass) so that the whole check runs end to end in the
simulator; its timings mean nothing there. A step starts only while the time budget
(``--budget-s``, default 150 s on a GPU) lasts; later steps are skipped with the reason.

Exit status: 0 when no step failed (skipped steps allowed), 1 when one failed, 2 for bad options
or when the preamble failed (its one-line problem and hint are printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import numba_recon
from numba_recon.cuda import device_check
from numba_recon.cuda._target import SIMULATOR
from numba_recon.io.run_files import HALF1_MAP, HALF2_MAP, MAP, SUMMARY_JSON

#: Step names, in the order they run.
STEPS: tuple[str, ...] = ("preamble", "parity", "repeatability", "timing", "end_to_end", "mpi_shared_gpu")
STATUSES: tuple[str, ...] = ("passed", "failed", "skipped")

#: Relative error allowed between the GPU kernels and their CPU twins.
PARITY_TOLERANCE = 1e-4
#: Relative difference allowed between two runs of a kernel that uses atomics.
REPEAT_TOLERANCE = 1e-5
#: Kernels without atomics (gathers): two runs must be bitwise identical.
BITWISE_KERNELS: tuple[str, ...] = ("backproject", "weighted_backproject")
#: Lowest FSC allowed in any shell (0 to Nyquist) between two maps that must agree.
FSC_MIN = 0.99
DEFAULT_BUDGET_S = 150.0
SIMULATOR_BUDGET_S = 1200.0


@dataclass
class Sizes:
    """Every size the check uses; :data:`FULL` on a GPU, :data:`QUICK` with ``--quick``."""

    parity_cases: list[tuple[int, int]]
    repeat_case: tuple[int, int]
    timing_boxes: list[int]
    timing_batch: int
    once_box: int
    once_batch: int
    repeats: int
    warmup: int
    e2e_box: int
    e2e_particles: int
    e2e_angpix: float
    e2e_snr: float
    e2e_epochs: int
    e2e_max_shift: float = 3.0
    e2e_extra_args: list[str] = field(default_factory=list)
    mpi_ranks: int = 2
    #: a subprocess step does not start with less budget left than this
    min_subprocess_s: float = 30.0


FULL = Sizes(parity_cases=[(100, 150), (256, 130)], repeat_case=(128, 64), timing_boxes=[64, 128, 256],
             timing_batch=128, once_box=400, once_batch=32, repeats=3, warmup=1,
             e2e_box=64, e2e_particles=2000, e2e_angpix=3.0, e2e_snr=0.1, e2e_epochs=2)
QUICK = Sizes(parity_cases=[(8, 3), (12, 2)], repeat_case=(8, 2), timing_boxes=[8], timing_batch=2,
              once_box=10, once_batch=1, repeats=1, warmup=0,
              e2e_box=8, e2e_particles=8, e2e_angpix=8.0, e2e_snr=1.0, e2e_epochs=1, e2e_max_shift=1.0,
              e2e_extra_args=["--batch-size", "8", "--cv-fraction", "0"], min_subprocess_s=10.0)


class Skip(Exception):
    """Raised by a step that cannot run here; the message is the reason."""


class Fail(Exception):
    """Raised by a step whose check did not hold; the message is the reason."""


# ---------------------------------------------------------------------------------------------
# helpers


def _rel(a: Any, ref: Any) -> float:
    return device_check._rel(a, ref)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _gpu_and_cpu() -> tuple[Any, Any]:
    from numba_recon.backend import get_backend

    return get_backend("cuda"), get_backend("cpu")


def _run_contract(be: Any, p: dict[str, np.ndarray], radius: float) -> dict[str, np.ndarray]:
    """Every kernel of the backend contract on the problem ``p``; host results by name."""
    nb, n = p["images"].shape[0], p["images"].shape[1]
    vol = be.to_device(p["volume"])
    rot = be.to_device(p["rotations"])
    images = be.to_device(p["images"])
    out: dict[str, np.ndarray] = {}

    proj = be.zeros((nb, n, n))
    be.project(vol, rot, radius, proj)
    out["project"] = be.to_host(proj)

    bp = be.zeros((n, n, n))
    be.backproject(images, rot, radius, bp)
    out["backproject"] = be.to_host(bp)

    grad = be.zeros((n, n, n))
    be.weighted_backproject(images, rot, be.to_device(p["weights"]), radius, grad)
    out["weighted_backproject"] = be.to_host(grad)

    res = be.zeros((nb, n, n))
    loss = be.zeros(nb)
    be.forward_residual(vol, rot, be.to_device(p["filters2"]), be.to_device(p["data"]),
                        be.to_device(p["data_norm2"]), radius, res, loss)
    out["forward_residual"] = be.to_host(res)
    out["forward_residual_loss"] = be.to_host(loss)

    density = be.zeros((n, n, n))
    be.insert_weights(rot, be.to_device(p["filters2"]), density)
    out["insert_weights"] = be.to_host(density)

    weighted = be.zeros((nb, n, n))
    be.weight_filters(be.to_device(p["filters2"]), be.to_device(p["filters2"][0]), be.to_device(p["weights"]), weighted)
    out["weight_filters"] = be.to_host(weighted)

    prepared = (be.zeros((nb, n, n)), be.zeros((nb, n, n)), be.zeros(nb), be.zeros(nb))
    device_check._run_prepare(be, p, prepared)
    for name, array in zip(("data", "filters2", "data_norm2", "noise_var"), prepared):
        out[f"prepare_particles_{name}"] = be.to_host(array)
    be.synchronize()
    return out


def _python() -> list[str]:
    return [sys.executable, "-m", "numba_recon"]


def _find_mpiexec() -> str | None:
    """``mpiexec`` on PATH, else beside this Python (the mpich extra installs it there)."""
    found = shutil.which("mpiexec")
    if found:
        return found
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _run_cli(cmd: list[str], timeout: float, log: Path, on_timeout: type[Exception] | None = None
             ) -> tuple[float, subprocess.CompletedProcess]:
    """Run one CLI command; its output goes to ``log``.

    Raises :class:`Fail` when it exits with an error, and ``on_timeout`` (default :class:`Fail`)
    when it runs past ``timeout`` seconds.
    """
    label = "numba-recon " + ("simulate" if "simulate" in cmd else "run")
    if cmd and Path(cmd[0]).name.startswith("mpiexec"):
        label = "mpiexec " + label
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired as err:
        log.write_text(f"$ {' '.join(cmd)}\n(timed out after {timeout:.0f} s)\n{err.stdout or ''}{err.stderr or ''}")
        raise (on_timeout or Fail)(f"{label} did not finish within {timeout:.0f} s (log: {log})") from None
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise Fail(f"{label} exited with status {proc.returncode}: {_tail(proc.stderr or proc.stdout, 3)} "
                   f"(log: {log})")
    return secs, proc


def _read_map(path: Path) -> np.ndarray:
    import mrcfile

    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float32).copy()


MAPS = (MAP, HALF1_MAP, HALF2_MAP)


def _compare_maps(a: Path, b: Path) -> dict[str, Any]:
    """Lowest FSC (shells 0 to Nyquist) between the maps of two run folders, per map.

    A shell where neither map has any power (a map low-passed to zero there) is listed under
    ``empty_shells`` and left out of the minimum; one where only one map has power counts as 0.
    """
    from numba_recon.evaluate.fsc import fsc_from_ft, rfft3, shell_sum

    out: dict[str, Any] = {}
    for name in MAPS:
        m1, m2 = _read_map(a / name), _read_map(b / name)
        n = m1.shape[0]
        if m2.shape != m1.shape:
            raise Fail(f"{name}: the maps have different boxes {m1.shape} and {m2.shape}")
        ft1, ft2 = rfft3(m1), rfft3(m2)
        curve = np.asarray(fsc_from_ft(ft1, ft2, n), dtype=np.float64)
        empty = (shell_sum(np.abs(ft1) ** 2, n) == 0) & (shell_sum(np.abs(ft2) ** 2, n) == 0)
        used = curve[~empty]
        low = float(used.min()) if used.size and np.isfinite(used).all() else None
        out[name] = {"fsc_min": None if low is None else _sig(low), "empty_shells": np.flatnonzero(empty).tolist(),
                     "fsc": [round(float(v), 6) for v in curve]}
    return out


def _require_agreement(maps: dict[str, Any], figures: dict[str, Any], pair: str) -> None:
    """Record the lowest FSC of :func:`_compare_maps`'s ``maps`` as ``figures["fsc_min"]``; raise
    :class:`Fail` when any map's FSC is missing or falls to :data:`FSC_MIN` or below.

    ``pair`` names the two runs in the message, e.g. ``"CUDA and CPU"``.
    """
    figures["fsc_min"] = min((m["fsc_min"] for m in maps.values() if m["fsc_min"] is not None), default=None)
    bad = [name for name, m in maps.items() if m["fsc_min"] is None or m["fsc_min"] <= FSC_MIN]
    if bad:
        raise Fail(f"FSC between the {pair} maps falls to {figures['fsc_min']} (needs > {FSC_MIN}) "
                   f"in {', '.join(bad)}")


def _run_figures(run_dir: Path, wall_s: float) -> dict[str, Any]:
    """images/s and stage times of one finished run, from its ``summary.json``."""
    summary = json.loads((run_dir / SUMMARY_JSON).read_text())
    timings = summary.get("timings_s") or {}
    passes = (summary.get("solver") or {}).get("passes") or summary.get("epochs")
    particles = summary.get("particles")
    epochs_s = timings.get("epochs_s")
    rate = None
    if particles and passes and epochs_s:
        rate = round(float(particles) * float(passes) / float(epochs_s), 1)
    return {"wall_s": round(wall_s, 2), "backend": summary.get("backend"), "ranks": summary.get("ranks"),
            "particles": particles, "passes": passes, "images_per_s": rate, "timings_s": timings,
            "seconds_per_epoch": summary.get("seconds_per_epoch"),
            "resolution_angstrom": summary.get("resolution_angstrom")}


# ---------------------------------------------------------------------------------------------
# the check


class Acceptance:
    """Runs the steps in order and keeps the JSON result up to date on disk."""

    def __init__(self, out: Path, sizes: Sizes, quick: bool, budget_s: float, workdir: Path,
                 tolerance: float = PARITY_TOLERANCE) -> None:
        self.out = out
        self.sizes = sizes
        self.tolerance = tolerance
        self.workdir = workdir
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.star: Path | None = None
        self.cuda_run: Path | None = None
        self.result: dict[str, Any] = {
            "tool": "numba_recon.cuda.acceptance",
            "numba_recon_version": numba_recon.__version__,
            "python": platform.python_version(),
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "simulator": SIMULATOR,
            "quick": quick,
            "settings": {**asdict(sizes), "parity_tolerance": tolerance, "repeat_tolerance": REPEAT_TOLERANCE,
                         "bitwise_kernels": list(BITWISE_KERNELS), "fsc_min": FSC_MIN, "budget_s": budget_s,
                         "workdir": str(workdir)},
            "device": None,
            "steps": {},
            "passed": None,
            "counts": {},
            "elapsed_s": 0.0,
        }

    # -- bookkeeping

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        device_check._write(self.out, self.result)

    def record(self, name: str, status: str, reason: str | None, figures: dict[str, Any], seconds: float) -> None:
        self.result["steps"][name] = {"status": status, "reason": reason, "seconds": round(seconds, 2),
                                      "figures": figures}
        mark = {"passed": "passed", "failed": "FAILED", "skipped": "skipped"}[status]
        why = f": {reason}" if reason else ""
        print(f"acceptance: {name} {mark}{why} [{seconds:.1f} s]", flush=True)
        self.write()

    def step(self, name: str, fn: Callable[[dict[str, Any]], None], min_left_s: float = 0.0) -> None:
        """Run ``fn(figures)``: it fills ``figures`` and raises :class:`Fail` or :class:`Skip`."""
        figures: dict[str, Any] = {}
        t0 = time.perf_counter()
        if self.left_s() < min_left_s:
            self.record(name, "skipped", f"time budget of {self.budget_s:g} s used up "
                                         f"({max(self.left_s(), 0):.0f} s left, this step needs {min_left_s:g} s)",
                        figures, 0.0)
            return
        try:
            fn(figures)
        except Skip as why:
            self.record(name, "skipped", str(why), figures, time.perf_counter() - t0)
        except Fail as why:
            self.record(name, "failed", str(why), figures, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - one broken step must not lose the others
            figures["traceback"] = traceback.format_exc()
            self.record(name, "failed", f"{type(err).__name__}: {err}", figures, time.perf_counter() - t0)
        else:
            self.record(name, "passed", None, figures, time.perf_counter() - t0)

    def skip_rest(self, reason: str) -> None:
        for name in STEPS:
            if name not in self.result["steps"]:
                self.record(name, "skipped", reason, {}, 0.0)

    def finish(self) -> int:
        steps = self.result["steps"]
        counts = {s: sum(1 for v in steps.values() if v["status"] == s) for s in STATUSES}
        self.result["counts"] = counts
        self.result["passed"] = counts["failed"] == 0
        self.write()
        print(f"acceptance: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
              f"in {self.result['elapsed_s']:.0f} s; wrote {self.out}", flush=True)
        return 0 if counts["failed"] == 0 else 1

    # -- steps

    def preamble(self, figures: dict[str, Any]) -> None:
        info = device_check.preamble()
        figures.update(info)
        self.result["device"] = {k: info.get(k) for k in (
            "device_name", "compute_capability", "driver_version", "driver_cuda_version", "runtime_version",
            "extra")}
        if info.get("status") != "passed":
            raise Fail(device_check.preamble_line(info))
        print(f"acceptance: {device_check.preamble_line(info)}", flush=True)

    def parity(self, figures: dict[str, Any]) -> None:
        gpu, cpu = _gpu_and_cpu()
        cases = figures.setdefault("cases", [])
        figures["tolerance"] = self.tolerance
        worst = 0.0
        for n, nb in self.sizes.parity_cases:
            rng = np.random.default_rng(1000 + n)
            p = device_check._problem(n, nb, rng)
            radius = n / 2 - 1.0
            t0 = time.perf_counter()
            got = _run_contract(gpu, p, radius)
            t1 = time.perf_counter()
            ref = _run_contract(cpu, p, radius)
            t2 = time.perf_counter()
            errors = {k: _sig(_rel(got[k], ref[k])) for k in ref}
            ok = all(np.isfinite(v) and v <= self.tolerance for v in errors.values())
            cases.append({"box": n, "batch": nb, "radius_px": radius, "errors": errors, "passed": bool(ok),
                          "gpu_seconds": round(t1 - t0, 3), "cpu_seconds": round(t2 - t1, 3)})
            worst = max([worst, *errors.values()])
            self.write()
        figures["max_error"] = worst
        bad = [f"{k} at box {c['box']} ({v:.2g})" for c in cases for k, v in c["errors"].items()
               if not (np.isfinite(v) and v <= self.tolerance)]
        if bad:
            raise Fail(f"GPU and CPU differ by more than {self.tolerance:g}: {', '.join(bad)}")

    def repeatability(self, figures: dict[str, Any]) -> None:
        gpu, _ = _gpu_and_cpu()
        n, nb = self.sizes.repeat_case
        p = device_check._problem(n, nb, np.random.default_rng(7))
        radius = n / 2 - 1.0
        first = _run_contract(gpu, p, radius)
        second = _run_contract(gpu, p, radius)
        kernels: dict[str, Any] = {}
        bad = []
        for k in first:
            bitwise = bool(np.array_equal(first[k], second[k]))
            diff = 0.0 if bitwise else _sig(_rel(second[k], first[k]))
            must_be_bitwise = k in BITWISE_KERNELS
            ok = bitwise if must_be_bitwise else bool(np.isfinite(diff) and diff <= REPEAT_TOLERANCE)
            kernels[k] = {"bitwise": bitwise, "relative_difference": diff, "required": (
                "bitwise" if must_be_bitwise else f"<= {REPEAT_TOLERANCE:g}"), "passed": ok}
            if not ok:
                bad.append(f"{k} ({'not bitwise' if must_be_bitwise else f'{diff:.2g}'})")
        figures.update({"box": n, "batch": nb, "kernels": kernels})
        if bad:
            raise Fail(f"two runs on the same input differ: {', '.join(bad)}")

    def timing(self, figures: dict[str, Any]) -> None:
        s = self.sizes
        memory: dict[str, Any] = {}
        reserve = 3 * s.min_subprocess_s  # for the end-to-end and MPI steps
        budget = max(self.left_s() - reserve, 1.0)
        rows = device_check.time_kernels(s.timing_boxes, [s.timing_batch], s.repeats, s.warmup, budget, memory)
        left = max(self.left_s() - reserve, 0.0)
        if left > 0:
            rows += device_check.time_kernels([s.once_box], [s.once_batch], 1, 1, left, memory)
        else:
            rows.append({"box": s.once_box, "batch": s.once_batch, "skipped": "time budget used up"})
        figures["rows"] = [{k: (_sig(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        figures["peak_device_bytes"] = memory.get("peak_used_bytes")
        figures["clock"] = "perf_counter around synchronize (simulator)" if SIMULATOR else "CUDA events"
        timed = [r for r in rows if "op" in r]
        if not timed:
            raise Skip("time budget used up before the first timing case")
        broken = [f"{r['op']} at box {r['box']}" for r in timed if not (r.get("images_per_s") or 0) > 0]
        if broken:
            raise Fail(f"no valid timing for {', '.join(broken)}")

    def _simulate(self) -> Path:
        if self.star is not None:
            return self.star
        s = self.sizes
        sim = self.workdir / "sim"
        cmd = [*_python(), "-q", "simulate", "-o", str(sim), "--n-particles", str(s.e2e_particles),
               "--box-size", str(s.e2e_box), "--angpix", str(s.e2e_angpix), "--snr", str(s.e2e_snr),
               "--max-shift", str(s.e2e_max_shift), "--seed", "1", "--overwrite"]
        _run_cli(cmd, max(self.left_s(), s.min_subprocess_s), self.workdir / "simulate.log")
        self.star = sim / "particles.star"
        return self.star

    def _run_cmd(self, backend: str, out_dir: Path) -> list[str]:
        s = self.sizes
        return [*_python(), "-q", "run", str(self._simulate()), "-o", str(out_dir), "--backend", backend,
                "--epochs", str(s.e2e_epochs), "--no-early-stop", "--seed", "0", "--overwrite", *s.e2e_extra_args]

    def end_to_end(self, figures: dict[str, Any]) -> None:
        s = self.sizes
        t0 = time.perf_counter()
        star = self._simulate()
        figures["data"] = {"box": s.e2e_box, "particles": s.e2e_particles, "angpix": s.e2e_angpix,
                           "snr": s.e2e_snr, "epochs": s.e2e_epochs, "star": str(star),
                           "simulate_s": round(time.perf_counter() - t0, 2)}
        runs: dict[str, Any] = {}
        figures["runs"] = runs
        for backend in ("cuda", "cpu"):
            out_dir = self.workdir / f"run_{backend}"
            # a CUDA run past the budget is a finding; a slow CPU reference only leaves nothing to compare
            wall, _ = _run_cli(self._run_cmd(backend, out_dir), max(self.left_s(), s.min_subprocess_s),
                               self.workdir / f"run_{backend}.log", on_timeout=Fail if backend == "cuda" else Skip)
            runs[backend] = _run_figures(out_dir, wall)
            if backend == "cuda":
                self.cuda_run = out_dir
            self.write()
        if runs["cuda"]["images_per_s"] and runs["cpu"]["images_per_s"]:
            figures["speedup_cuda_over_cpu"] = _sig(runs["cuda"]["images_per_s"] / runs["cpu"]["images_per_s"])
        maps = _compare_maps(self.workdir / "run_cuda", self.workdir / "run_cpu")
        figures["fsc_cuda_vs_cpu"] = maps
        _require_agreement(maps, figures, "CUDA and CPU")

    def mpi_shared_gpu(self, figures: dict[str, Any]) -> None:
        s = self.sizes
        mpiexec = _find_mpiexec()
        if mpiexec is None:
            raise Skip("mpiexec not found (install the mpich or openmpi extra, or load a site MPI)")
        figures["mpiexec"] = mpiexec
        figures["ranks"] = s.mpi_ranks
        out_dir = self.workdir / "run_cuda_mpi"
        cmd = [mpiexec, "-n", str(s.mpi_ranks), *self._run_cmd("cuda", out_dir)]
        wall, _ = _run_cli(cmd, max(self.left_s(), s.min_subprocess_s), self.workdir / "run_cuda_mpi.log")
        figures["run"] = _run_figures(out_dir, wall)
        if figures["run"]["ranks"] != s.mpi_ranks:
            raise Fail(f"summary.json reports {figures['run']['ranks']} ranks, expected {s.mpi_ranks}")
        reference = self.cuda_run or (self.workdir / "run_cpu" if (self.workdir / "run_cpu").is_dir() else None)
        if reference is None or not (reference / MAPS[0]).is_file():
            raise Skip("no one-rank map to compare with (the end-to-end step did not finish)")
        maps = _compare_maps(reference, out_dir)
        figures["compared_with"] = str(reference)
        figures["fsc_vs_one_rank"] = maps
        _require_agreement(maps, figures, f"{s.mpi_ranks}-rank and one-rank")

    def run(self) -> int:
        s = self.sizes
        self.write()
        self.step("preamble", self.preamble)
        if self.result["steps"]["preamble"]["status"] != "passed":
            self.skip_rest("the preamble failed: " + str(self.result["steps"]["preamble"]["reason"]))
            self.finish()
            return 2
        self.step("parity", self.parity)
        self.step("repeatability", self.repeatability)
        self.step("timing", self.timing)
        self.step("end_to_end", self.end_to_end, min_left_s=2 * s.min_subprocess_s)
        self.step("mpi_shared_gpu", self.mpi_shared_gpu, min_left_s=s.min_subprocess_s)
        return self.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m numba_recon.cuda.acceptance",
                                     description="One-shot acceptance check of the CUDA backend, as JSON.")
    parser.add_argument("--json", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (boxes 8-12, a few particles); automatic in the CUDA simulator")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"start no step after this many seconds (default {DEFAULT_BUDGET_S:g}; "
                             f"{SIMULATOR_BUDGET_S:g} in the simulator)")
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                        help=f"relative GPU-CPU error allowed (default {PARITY_TOLERANCE:g})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the simulated data and the runs (kept; default a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    quick = bool(args.quick or SIMULATOR)
    budget = args.budget_s if args.budget_s is not None else (SIMULATOR_BUDGET_S if SIMULATOR else DEFAULT_BUDGET_S)
    try:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="numba_recon_acceptance_"))
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"acceptance: cannot create {err.filename} ({err.strerror})", file=sys.stderr)
        return 2
    check = Acceptance(args.json, QUICK if quick else FULL, quick, budget, workdir, args.tolerance)
    if SIMULATOR:
        check.result["settings"]["quick_reason"] = "the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
        old = sys.getswitchinterval()
        sys.setswitchinterval(5e-4)  # simulated CUDA threads wait on barriers: switch faster
    try:
        return check.run()
    finally:
        if SIMULATOR:
            sys.setswitchinterval(old)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
