"""Peer benchmark: numba-recon against cryoDRGN's ``backproject_voxel`` on the same simulated sets.

cryoDRGN's ``backproject_voxel`` is a single-pass Fourier-insertion reconstruction (trilinear
insertion of CTF-multiplied image transforms, division by the summed CTF^2 plus a Wiener-like
constant). It runs from its own virtual environment, made by ``bash benchmarks/peer_env.sh``
(``benchmarks/.venv-cryodrgn``); cryoDRGN is never a dependency of numba-recon. Without that
environment this script says how to create it and runs numba-recon alone.

Cases (``--cases``; every case simulates with defocus 1.0-2.5 um, 300 kV, Cs 2.7 mm, Q0 0.1,
origins up to 3 px, seed 0, into ``OUT/CASE/data`` and re-uses the set while its parameters match):

==============  =========  =====  ======  =====  ========================================
case            particles  box    A/px    SNR    junk / object
==============  =========  =====  ======  =====  ========================================
standard        5000       64     2.0     0.1    none; built-in D7 phantom
low_snr         2000       64     2.0     0.02   none
wrong_pose50    5000       64     2.0     0.1    50 % wrong_pose
noise50         5000       64     2.0     0.1    50 % noise
mixed20         3000       64     2.0     0.05   20 %, noise + wrong_pose + other_object;
                                                 an asymmetric map (the phantom with 3 of
                                                 its 14 D7 copies removed: C1)
box128          10000      128    1.0     0.05   none; same 128 A box as the box-64 cases
==============  =========  =====  ======  =====  ========================================

Methods (one row each per case):

- ``numba-recon``: ``numba-recon -q run STAR -o OUT --overwrite --backend cpu [--extra ...]``;
  junk cases add ``numba-recon-trimmed`` (``--loss trimmed``) and ``numba-recon-reweighted``
  (``--loss reweighted``). Maps: ``run_half{1,2}_class001_unfil.mrc``.
- ``cryodrgn``: ``cryodrgn parse_pose_star`` + ``cryodrgn parse_ctf_star`` (``--ps 0`` when the
  STAR file has no ``rlnPhaseShift``: cryoDRGN would otherwise store NaN) and one
  ``cryodrgn backproject_voxel --no-half-maps --ind HALF.pkl`` per half set, the halves being
  numba-recon's (``rlnRandomSubset``), so that both methods' half maps hold the same particles.
  (cryoDRGN's own half maps alternate images in file order, so they are not used.)
- ``cryodrgn-clean`` (junk cases): the same on the good particles only (``junk.csv``): the
  reference the robust numba-recon maps should reach.

Wall time is the median over ``--repeats`` of the whole command line(s), process start-up
included; for cryoDRGN the two parse steps and both half reconstructions.

Scores, all from numba-recon's own code (``numba_recon.evaluate.fsc``):

- ``truth_fsc05_A``: resolution where the FSC of the average of the two half maps against
  ``truth.mrc`` drops below 0.5 (RELION's rule: first crossing), unmasked;
- ``truth_fsc05_masked_A``: the same with both maps multiplied by a soft sphere (radius 0.4 box,
  3 px cosine edge, centred at N//2);
- ``halfmap_fsc0143_A``: half map 1 against half map 2 at 0.143, unmasked;
- ``cc_truth`` / ``cc_truth_flipz``: real-space correlation of the average map with the truth and
  with the truth flipped along z. A sign/handedness check (a correct map has ``cc_truth`` clearly
  above ``cc_truth_flipz``), not a quality score: it weights shells by their power, so it favours
  maps whose high frequencies are damped (cryoDRGN's Wiener-like constant) over unfiltered ones.

cryoDRGN's conventions, checked on the ``standard`` set (``--check-conventions`` prints them for
each case): its map is ``[z, y, x]`` on the same grid as the truth with the centre at voxel N//2
(cross-correlation peak at shift 0, fitted sub-voxel shift < 0.01 px), the same hand (CC 0.95
with the truth, 0.77 with the z-flipped truth; transposing x/z gives 0.18; on the asymmetric
``mixed20`` map 0.80 against 0.47 flipped) and the same sign
(``backproject_voxel`` inverts the images by default and its CTF has the opposite sign of
RELION's; the two cancel). So no transform is applied to cryoDRGN's maps.

Usage (with the project's environment)::

    bash benchmarks/peer_env.sh                                  # once: the cryoDRGN venv
    .venv/bin/python benchmarks/peers.py --out /tmp/peers --cases standard \\
        --json peers.json --markdown
    .venv/bin/python benchmarks/peers.py --out /tmp/peers --cases wrong_pose50 noise50 --repeats 3
    .venv/bin/python benchmarks/peers.py --cases standard --extra --epochs 10   # options for `run`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CRYODRGN_VENV = HERE / ".venv-cryodrgn"

COMMON = dict(defocus_min_um=1.0, defocus_max_um=2.5, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1,
              max_shift_px=3.0, seed=0)
CASES: dict[str, dict] = {
    "standard": dict(n_particles=5000, box_size=64, pixel_size_angstrom=2.0, snr=0.1),
    "low_snr": dict(n_particles=2000, box_size=64, pixel_size_angstrom=2.0, snr=0.02),
    "wrong_pose50": dict(n_particles=5000, box_size=64, pixel_size_angstrom=2.0, snr=0.1, junk_fraction=0.5,
                         junk_kinds=["wrong_pose"]),
    "noise50": dict(n_particles=5000, box_size=64, pixel_size_angstrom=2.0, snr=0.1, junk_fraction=0.5,
                    junk_kinds=["noise"]),
    # box and pixel size come from the asymmetric map (64 px, 2.0 A)
    "mixed20": dict(n_particles=3000, snr=0.05, junk_fraction=0.2,
                    junk_kinds=["noise", "wrong_pose", "other_object"], asymmetric_map=True),
    "box128": dict(n_particles=10000, box_size=128, pixel_size_angstrom=1.0, snr=0.05),
}
ASYM_BOX, ASYM_ANGPIX = 64, 2.0
#: the D7 copies (operator indices of ``proteasome_blobs``) left out of the asymmetric map; no
#: subgroup of D7 (orders 1, 2, 7, 14) can permute a 3-element set freely, so the rest is C1.
ASYM_REMOVED_COPIES = (0, 3, 9)
JUNK_LOSSES = ("trimmed", "reweighted")


# --- data --------------------------------------------------------------------------------------

def make_asymmetric_map(path: Path) -> None:
    """The built-in phantom without 3 of its 14 D7 copies (exact C1), rendered at 64 px, 2.0 A/px."""
    from numba_recon.io.mrc import write_volume
    from numba_recon.sim.phantom import (Blobs, fit_scales, proteasome_asymmetric_unit, proteasome_blobs,
                                     render_volume)
    from numba_recon.symmetry.groups import symmetry_operators

    ops = symmetry_operators("D7")
    unit = proteasome_asymmetric_unit(0)
    keep = [g for g in range(len(ops)) if g not in ASYM_REMOVED_COPIES]
    blobs = Blobs.concatenate([unit.apply(ops[g]) for g in keep])
    # scale like the full phantom (the simulator's fit), so the object is the phantom minus 3 copies
    cs, ss = fit_scales(proteasome_blobs(0), ASYM_BOX, ASYM_ANGPIX)
    blobs = Blobs(blobs.centres_angstrom * cs, blobs.sigmas_angstrom * ss, blobs.amplitudes)
    vol = render_volume(blobs, ASYM_BOX, ASYM_ANGPIX)
    write_volume(path, vol, ASYM_ANGPIX, overwrite=True)


def simulate_case(name: str, root: Path, force: bool) -> Path:
    """Simulate case ``name`` into ``root/name/data`` (re-used while the parameters match)."""
    from numba_recon.sim.simulate import simulate_dataset

    spec = dict(COMMON)
    spec.update(CASES[name])
    case_dir = root / name
    data = case_dir / "data"
    stamp = case_dir / "parameters.json"
    if not force and stamp.is_file() and (data / "particles.star").is_file() and (data / "truth.mrc").is_file():
        if json.loads(stamp.read_text()) == spec:
            return data
    case_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {k: v for k, v in spec.items() if k != "asymmetric_map"}
    if spec.get("asymmetric_map"):
        vol = case_dir / "asymmetric_map.mrc"
        make_asymmetric_map(vol)
        kwargs["volume_path"] = str(vol)
    t0 = time.perf_counter()
    info = simulate_dataset(data, overwrite=True, **kwargs)
    print(f"# simulated {name}: {info['n_particles']} particles, box {info['box_size']}, "
          f"{info['pixel_size_angstrom']:g} A/px, SNR {info['measured_snr']:.3g}, junk {info['junk']} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    stamp.write_text(json.dumps(spec))
    return data


def half_and_junk(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """``rlnRandomSubset`` (1/2) of every STAR row, and the junk flags of ``junk.csv``."""
    import pandas as pd

    from numba_recon.io.star import read_star

    parts = read_star(data / "particles.star")
    halves = np.asarray(parts.half_set, dtype=np.int64)
    junk_table = pd.read_csv(data / "junk.csv")
    if len(junk_table) != len(halves) or not np.array_equal(junk_table["row_index"].to_numpy(),
                                                            np.arange(len(halves))):
        raise RuntimeError(f"{data}: junk.csv rows do not match particles.star")
    if not set(np.unique(halves)) <= {1, 2}:
        raise RuntimeError(f"{data}: rlnRandomSubset must be 1 or 2 for every particle")
    return halves, junk_table["is_junk"].to_numpy().astype(bool)


# --- scoring -----------------------------------------------------------------------------------

def _cc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def score(h1_path: Path, h2_path: Path, truth: np.ndarray, angpix: float) -> dict:
    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.evaluate.mask import spherical_mask
    from numba_recon.io.mrc import read_volume

    h1, _ = read_volume(h1_path)
    h2, _ = read_volume(h2_path)
    n = truth.shape[0]
    if h1.shape != truth.shape or h2.shape != truth.shape:
        raise RuntimeError(f"map shapes {h1.shape}, {h2.shape} differ from the truth {truth.shape}")
    avg = 0.5 * (h1 + h2)
    mask = spherical_mask(n, 0.4 * n, 3.0)
    return {
        "truth_fsc05_A": round(resolution_at(fsc(avg, truth), n, angpix, 0.5), 3),
        "truth_fsc05_masked_A": round(resolution_at(fsc(avg, truth, mask), n, angpix, 0.5), 3),
        "halfmap_fsc0143_A": round(resolution_at(fsc(h1, h2), n, angpix, 0.143), 3),
        "cc_truth": round(_cc(avg, truth), 4),
        "cc_truth_flipz": round(_cc(avg, truth[::-1]), 4),
    }


def check_conventions(map_path: Path, truth: np.ndarray) -> dict:
    """Where the map sits relative to the truth: integer and sub-voxel shift, sign, hand, axis order."""
    from numba_recon.io.mrc import read_volume

    m, _ = read_volume(map_path)
    n = m.shape[0]
    fm, ft = np.fft.fftn(m), np.fft.fftn(truth)
    x = fm * np.conj(ft)
    peak = np.unravel_index(np.argmax(np.fft.ifftn(x).real), m.shape)
    k = np.fft.fftfreq(n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    sel = (np.sqrt(kz ** 2 + ky ** 2 + kx ** 2) < 0.2) & (np.abs(x) > 0)
    w = np.sqrt(np.abs(x[sel]))
    a = np.stack([kz[sel], ky[sel], kx[sel]], 1) * (-2 * np.pi)
    sub = np.linalg.lstsq(a * w[:, None], np.angle(x[sel]) * w, rcond=None)[0]
    return {
        "xcorr_peak_shift_zyx": [int(p if p < n // 2 else p - n) for p in peak],
        "subvoxel_shift_zyx": [round(float(s), 3) for s in sub],
        "cc": round(_cc(m, truth), 4), "cc_flipz": round(_cc(m, truth[::-1]), 4),
        "cc_flipx": round(_cc(m, truth[:, :, ::-1]), 4),
        "cc_transpose_xz": round(_cc(m, truth.transpose(2, 1, 0)), 4),
    }


# --- runners -----------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n# rc {res.returncode}, {wall:.1f} s\n{res.stdout}{res.stderr}\n")
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"command failed (rc {res.returncode}): {' '.join(cmd)}\n{tail}")
    return wall


def numba_recon_tree() -> str | None:
    """The numba-recon source the runs used: HEAD, plus a hash of uncommitted changes under numba_recon/."""
    import hashlib

    import numba_recon

    src = Path(numba_recon.__file__).resolve().parent

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", ".")
        if not dirty:
            return head
        h = hashlib.sha1(git("diff", "HEAD", "--", ".").encode())
        for line in sorted(dirty.splitlines()):  # untracked files too
            if line.startswith("??"):
                f = src.parent / line[3:].strip()
                for g in sorted(f.rglob("*.py")) if f.is_dir() else [f]:
                    h.update(g.read_bytes())
        return f"{head}+dirty.{h.hexdigest()[:10]}"
    except (OSError, subprocess.CalledProcessError):
        return None


def numba_recon_command() -> list[str]:
    exe = Path(sys.executable).with_name("numba-recon")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "numba_recon"]


def run_numba_recon(data: Path, out: Path, loss: str | None, extra: list[str], env: dict) -> float:
    cmd = [*numba_recon_command(), "-q", "run", str(data / "particles.star"), "-o", str(out), "--overwrite",
           "--backend", "cpu"]
    if loss:
        cmd += ["--loss", loss]
    cmd += extra
    out.parent.mkdir(parents=True, exist_ok=True)
    return _run(cmd, env, out.parent / f"{out.name}.log")


def write_index_pkl(venv: Path, indices: np.ndarray, path: Path) -> None:
    """``indices`` as the pickled int64 array ``--ind`` wants, pickled by cryoDRGN's own numpy."""
    txt = path.with_suffix(".txt")
    np.savetxt(txt, indices, fmt="%d")
    code = ("import pickle, sys, numpy as np; "
            "pickle.dump(np.loadtxt(sys.argv[1], dtype=np.int64, ndmin=1), open(sys.argv[2], 'wb'))")
    subprocess.run([str(venv / "bin" / "python"), "-c", code, str(txt), str(path)], check=True)


def run_cryodrgn(venv: Path, data: Path, out: Path, halves: np.ndarray, keep: np.ndarray,
                 env: dict) -> tuple[float, dict]:
    """Parse poses and CTFs, back-project each half; returns wall time and its parts."""
    exe = str(venv / "bin" / "cryodrgn")
    star = data / "particles.star"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "cryodrgn.log"
    log.unlink(missing_ok=True)
    for h in (1, 2):
        write_index_pkl(venv, np.flatnonzero((halves == h) & keep), out / f"half{h}_ind.pkl")
    star_text = star.read_text()
    ctf_cmd = [exe, "parse_ctf_star", str(star), "-o", str(out / "ctf.pkl")]
    if "_rlnPhaseShift" not in star_text:
        ctf_cmd += ["--ps", "0"]  # otherwise cryoDRGN stores NaN and the map is NaN
    parts = {
        "parse_pose_s": _run([exe, "parse_pose_star", str(star), "-o", str(out / "pose.pkl")], env, log),
        "parse_ctf_s": _run(ctf_cmd, env, log),
    }
    for h in (1, 2):
        hdir = out / f"half{h}"
        parts[f"backproject_half{h}_s"] = _run(
            [exe, "backproject_voxel", str(star), "--datadir", str(data), "--poses", str(out / "pose.pkl"),
             "--ctf", str(out / "ctf.pkl"), "--ind", str(out / f"half{h}_ind.pkl"), "--no-half-maps",
             "-o", str(hdir)], env, log)
    return sum(parts.values()), {k: round(v, 2) for k, v in parts.items()}


# --- reporting ---------------------------------------------------------------------------------

def machine_info(venv: Path | None) -> dict:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": model, "nproc": os.cpu_count(), "host": platform.node(),
            "python": platform.python_version()}
    try:
        from numba_recon import __version__

        info["numba_recon"] = __version__
    except ImportError:
        pass
    if venv is not None:
        res = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import cryodrgn, torch; print(cryodrgn.__version__, torch.__version__)"],
                             capture_output=True, text=True)
        if res.returncode == 0:
            info["cryodrgn"], info["torch"] = res.stdout.split()
    return info


def markdown_table(rows: list[dict]) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| case | method | particles | wall s | FSC 0.5 vs truth (A) | masked (A) | half-map 0.143 (A) "
             "| CC truth |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['method']} | {r.get('n_particles', '-')} | failed | - | - | - | - |")
            continue
        lines.append(f"| {r['case']} | {r['method']} | {r['n_particles']} | {f(r['wall_s'], '{:.1f}')} "
                     f"| {f(r['truth_fsc05_A'])} | {f(r['truth_fsc05_masked_A'])} | {f(r['halfmap_fsc0143_A'])} "
                     f"| {f(r['cc_truth'], '{:.3f}')} |")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="peer_runs", help="Working folder (data sets and maps).")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                    help="Cases to run (default: all; box128 is by far the slowest).")
    ap.add_argument("--repeats", type=int, default=1, help="Timed repeats per method (median reported).")
    ap.add_argument("--methods", nargs="+", default=["numba-recon", "cryodrgn"], choices=["numba-recon", "cryodrgn"])
    ap.add_argument("--cryodrgn-venv", default=str(DEFAULT_CRYODRGN_VENV),
                    help="Virtual environment with cryoDRGN (made by benchmarks/peer_env.sh).")
    ap.add_argument("--threads", type=int, default=None,
                    help="Set NUMBA_NUM_THREADS and OMP_NUM_THREADS for both methods (default: all cores).")
    ap.add_argument("--resimulate", action="store_true", help="Simulate again even if the set exists.")
    ap.add_argument("--check-conventions", action="store_true",
                    help="Print the shift/sign/hand check of each cryoDRGN half map against the truth.")
    ap.add_argument("--json", default=None, help="Write all rows and the machine info to this file.")
    ap.add_argument("--markdown", nargs="?", const="-", default=None,
                    help="Print a markdown table at the end (and write it to the FILE if given).")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="Options passed to every `numba-recon run` (must come last).")
    args = ap.parse_args()

    from numba_recon.io.mrc import read_volume

    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if args.threads:
        for key in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(args.threads)

    venv: Path | None = Path(args.cryodrgn_venv).resolve()
    if "cryodrgn" in args.methods and not (venv / "bin" / "cryodrgn").is_file():
        print(f"# cryoDRGN environment not found at {venv}: create it with\n#     bash {HERE / 'peer_env.sh'}\n"
              f"# (or pass --cryodrgn-venv). Running numba-recon only.", file=sys.stderr, flush=True)
        venv = None
    elif "cryodrgn" not in args.methods:
        venv = None

    rows: list[dict] = []
    for name in args.cases:
        data = simulate_case(name, root, args.resimulate)
        truth, angpix = read_volume(data / "truth.mrc")
        halves, junk = half_and_junk(data)
        base = {"case": name, "box": int(truth.shape[0]), "angpix": angpix}
        jobs: list[tuple[str, dict]] = []
        if "numba-recon" in args.methods:
            jobs.append(("numba-recon", {"loss": None}))
            if junk.any():
                jobs += [(f"numba-recon-{loss}", {"loss": loss}) for loss in JUNK_LOSSES]
        if venv is not None:
            jobs.append(("cryodrgn", {"keep": np.ones_like(junk)}))
            if junk.any():
                jobs.append(("cryodrgn-clean", {"keep": ~junk}))

        for method, opts in jobs:
            out = root / name / method
            row = dict(base, method=method)
            walls, parts = [], []
            try:
                for _ in range(args.repeats):
                    if method.startswith("numba-recon"):
                        walls.append(run_numba_recon(data, out, opts["loss"], args.extra, env))
                    else:
                        w, p = run_cryodrgn(venv, data, out, halves, opts["keep"], env)
                        walls.append(w)
                        parts.append(p)
                if method.startswith("numba-recon"):
                    h1, h2 = out / "run_half1_class001_unfil.mrc", out / "run_half2_class001_unfil.mrc"
                    row["n_particles"] = len(halves)
                    row["numba_recon_tree"] = numba_recon_tree()
                    row["command"] = "numba-recon -q run particles.star --backend cpu" + (
                        f" --loss {opts['loss']}" if opts["loss"] else "") + "".join(f" {e}" for e in args.extra)
                else:
                    h1, h2 = out / "half1" / "backproject.mrc", out / "half2" / "backproject.mrc"
                    row["n_particles"] = int(opts["keep"].sum())
                    row["command"] = "cryodrgn parse_pose_star + parse_ctf_star + 2 x backproject_voxel --ind"
                    row["wall_parts_s"] = {k: round(float(np.median([p[k] for p in parts])), 2) for k in parts[0]}
                    if args.check_conventions:
                        for h, path in ((1, h1), (2, h2)):
                            print(json.dumps({"case": name, "method": method, "half": h,
                                              "conventions": check_conventions(path, truth)}), flush=True)
                row["repeats"] = args.repeats
                row["wall_s"] = round(float(np.median(walls)), 2)
                row["wall_s_all"] = [round(w, 2) for w in walls]
                row.update(score(h1, h2, truth, angpix))
            except Exception as err:  # keep going: report the failure in the row
                row["error"] = str(err)
                print(f"# {name} / {method} failed: {err}", file=sys.stderr, flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(venv), "rows": rows}, indent=2) + "\n")
    if args.markdown:
        table = markdown_table(rows)
        print(table)
        if args.markdown != "-":
            Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
