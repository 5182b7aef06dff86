"""Test configuration.

The CUDA kernels are tested in Numba's CUDA simulator unless ``NUMBA_RECON_TEST_REAL_GPU=1`` asks
for a real GPU. The simulator must be chosen before numba is imported, which is why it is set here,
at the top of the first file pytest loads.
"""

from __future__ import annotations

import os

if os.environ.get("NUMBA_RECON_TEST_REAL_GPU", "0") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

if "numba" in sys.modules:  # imported early by a plugin: make it see the simulator setting
    from numba.core import config as _numba_config

    _numba_config.reload_config()

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()


class Cli:
    """Runs ``python -m numba_recon ARGS`` in a child process (``python -c CODE ARGS`` with ``code``),
    under ``mpiexec -n N`` with ``mpi=N``.

    The child's environment is this one without ``NUMBA_ENABLE_CUDASIM`` (CPU runs compile as they
    would for a user) or ``NUMBA_RECON_FAULT``, with ``NUMBA_NUM_THREADS=1`` (bitwise-reproducible CPU
    sums); ``env`` adds to it or replaces (a value ``None`` removes the variable), and
    ``simulator=True`` keeps this process's CUDA simulator setting.
    """

    def env(self, env: dict[str, str | None] | None = None, *, simulator: bool = False) -> dict[str, str]:
        out = dict(os.environ)
        if not simulator:
            out.pop("NUMBA_ENABLE_CUDASIM", None)
        out.pop("NUMBA_RECON_FAULT", None)
        out["NUMBA_NUM_THREADS"] = "1"
        for key, value in (env or {}).items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    @staticmethod
    def command(args: Sequence[str], *, mpi: int | None = None, code: str | None = None) -> list[str]:
        launcher = ["mpiexec", "-n", str(mpi)] if mpi else []
        program = ["-c", code] if code is not None else ["-m", "numba_recon"]
        return [*launcher, sys.executable, *program, *map(str, args)]

    def __call__(self, args: Sequence[str], *, env: dict[str, str | None] | None = None, cwd: Path | None = None,
                 timeout: float = 300, mpi: int | None = None, code: str | None = None,
                 simulator: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args, mpi=mpi, code=code), capture_output=True, text=True,
                              timeout=timeout, env=self.env(env, simulator=simulator), cwd=cwd)

    def start(self, args: Sequence[str], *, env: dict[str, str | None] | None = None,
              mpi: int | None = None) -> subprocess.Popen:
        """The same command, started and not waited for (stdout and stderr piped)."""
        return subprocess.Popen(self.command(args, mpi=mpi), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.env(env))


@pytest.fixture(scope="session")
def cli() -> Cli:
    """The command line in a child process: ``cli(args, env=..., cwd=..., timeout=..., mpi=N)``; see
    :class:`Cli`."""
    return Cli()


def backend_for_test(name: str):
    """The backend ``name``: ``cuda`` is Numba's simulator here, or a real GPU with
    ``NUMBA_RECON_TEST_REAL_GPU=1`` (skipped, naming the reason, when that GPU is unusable)."""
    from numba_recon.backend import get_backend
    from numba_recon.errors import BackendUnavailableError

    try:
        return get_backend(name)
    except BackendUnavailableError as err:
        if name == "cuda" and os.environ.get("NUMBA_RECON_TEST_REAL_GPU") == "1":
            pytest.skip(f"no usable GPU: {err}")
        raise


@pytest.fixture(scope="session")
def make_backend() -> Callable[[str], object]:
    """``make_backend(name)``: the backend ``name`` (see :func:`backend_for_test`)."""
    return backend_for_test


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """Each backend in turn; parametrise ``backend`` indirectly to choose (``indirect=["backend"]``)."""
    return backend_for_test(request.param)


@pytest.fixture(scope="session")
def sim_box24(tmp_path_factory) -> Path:
    """A simulated data set shared read-only by several modules: 300 particles, box 24, 4 A/px,
    SNR 0.5, seed 11, shifts up to 2 px, three stacks of 100. The folder ``simulate`` writes
    (``particles.star``, ``truth.mrc``, ``Particles/``)."""
    from numba_recon.sim.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("sim_box24") / "sim"
    simulate_dataset(folder, n_particles=300, box_size=24, pixel_size_angstrom=4.0, snr=0.5, seed=11,
                     particles_per_stack=100, max_shift_px=2.0, overwrite=True)
    return folder


@pytest.fixture(scope="session")
def simulate(tmp_path_factory) -> Callable[..., Path]:
    """``simulate(**options)``: the folder ``simulate_dataset(folder, **options)`` writes
    (``particles.star``, ``truth.mrc``, ``Particles/``), made once per session for each set of
    options and shared read-only by every module that asks for the same set: a test that writes into
    it copies it first."""
    made: dict[str, Path] = {}

    def make(**options) -> Path:
        key = repr(sorted(options.items()))
        if key not in made:
            from numba_recon.sim.simulate import simulate_dataset

            folder = tmp_path_factory.mktemp("sim") / "data"
            simulate_dataset(folder, **options)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def sim_box32(simulate) -> Path:
    """A simulated data set shared read-only by several modules: 1200 particles, box 32, 3 A/px,
    SNR 0.05, seed 11, shifts up to 2 px, three stacks of 400 (see ``simulate``)."""
    return simulate(n_particles=1200, box_size=32, pixel_size_angstrom=3.0, snr=0.05, max_shift_px=2.0, seed=11,
                    particles_per_stack=400)


def _run_summary(star: Path, out: Path, *extra: str) -> dict:
    from click.testing import CliRunner

    from numba_recon.cli import main

    res = CliRunner().invoke(main, ["-q", "run", str(star), "-o", str(out), "--backend", "cpu", *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def run_summary() -> Callable[..., dict]:
    """``run_summary(star, out, *extra)``: ``numba-recon -q run STAR -o OUT --backend cpu EXTRA`` in
    this process; asserts exit status 0 and returns the run's ``summary.json``."""
    return _run_summary


def _assert_one_line_error(result, *fragments: str, ignore_case: bool = False) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("numba-recon: error:") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        if ignore_case:
            assert fragment.lower() in err.lower(), err
        else:
            assert fragment in err, err


@pytest.fixture(scope="session")
def assert_one_line_error() -> Callable[..., None]:
    """``assert_one_line_error(result, *fragments, ignore_case=False)``: the click result has exit
    status 2 and its stderr is one ``numba-recon: error:`` line, without a traceback, that contains
    every fragment."""
    return _assert_one_line_error


def _blobs(n: int, count: int, sigma: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    idx = np.arange(n) - n // 2
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    v = np.zeros((n, n, n))
    for _ in range(count):
        p = rng.normal(size=3)
        p *= radius * rng.random() ** (1 / 3) / np.linalg.norm(p)
        v += np.exp(-((z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2) / (2 * sigma ** 2))
    return v.astype(np.float32)


@pytest.fixture(scope="session")
def blobs() -> Callable[..., np.ndarray]:
    """``blobs(n, count, sigma, radius, rng)``: the sum of ``count`` Gaussian blobs (``sigma`` voxels)
    centred at random points of a sphere of ``radius`` voxels, ``(n, n, n)`` float32: a smooth
    particle whose spectrum decays with frequency."""
    return _blobs


def _even_part(filters: np.ndarray) -> np.ndarray:
    return (filters + np.roll(filters[:, ::-1, ::-1], 1, axis=(1, 2))) / 2


@pytest.fixture(scope="session")
def even_part() -> Callable[[np.ndarray], np.ndarray]:
    """``even_part(filters)``: ``(H(k) + H(-k)) / 2`` of ``(b, n, n)`` filters in numpy's ``fft2``
    layout. An astigmatic CTF on an even grid is not even on its Nyquist lines (it differs between a
    Nyquist frequency and its alias); its even part makes ``H^2`` exactly the square of the filter
    that ``H`` applies."""
    return _even_part


def _random_ctfs(rng: np.random.Generator, b: int, n: int, pixel_size_angstrom: float = 2.0, *,
                 bfactor_angstrom2: float = 0.0, even: bool = False) -> np.ndarray:
    from numba_recon.ctf import ctf_images

    params = {
        "defocus_u_angstrom": rng.uniform(8000, 20000, b),
        "defocus_v_angstrom": rng.uniform(8000, 20000, b),
        "defocus_angle_deg": rng.uniform(0, 180, b),
        "voltage_kv": np.full(b, 300.0),
        "cs_mm": np.full(b, 2.7),
        "amplitude_contrast": np.full(b, 0.1),
        "phase_shift_deg": np.zeros(b),
        "bfactor_angstrom2": np.full(b, bfactor_angstrom2),
        "scale": np.ones(b),
    }
    h = ctf_images(params, n, pixel_size_angstrom, half=False, dtype=np.float64)
    return _even_part(h) if even else h


@pytest.fixture(scope="session")
def random_ctfs() -> Callable[..., np.ndarray]:
    """``random_ctfs(rng, b, n, pixel_size_angstrom=2.0, *, bfactor_angstrom2=0.0, even=False)``:
    RELION CTFs of ``b`` random astigmatic particles (defocus 0.8-2 um, 300 kV, Cs 2.7 mm, amplitude
    contrast 0.1), ``(b, n, n)`` float64 in the full ``fft2`` layout; ``even=True``: their even part
    (see ``even_part``)."""
    return _random_ctfs


# ------------------------------------------------------------------------------------------
# CUDA: the simulator's threads, and compile-only checks in a child process

@pytest.fixture(scope="module")
def fast_thread_switching():
    """A GIL switch interval of 0.5 ms for a module's tests. Numba's CUDA simulator runs one Python
    thread per CUDA thread, and they meet at barriers: with Python's default 5 ms a block of a few
    hundred threads spends most of its time waiting. It makes the tests several times faster and
    changes nothing else."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(old)


_COMPILE_ONLY = """
import json, re, sys
try:
    from numba.cuda.cudadrv.error import NvvmSupportError
except ImportError:
    NvvmSupportError = ()
from numba_recon.cuda import _target
if _target.SIMULATOR:
    print("simulator is active in the subprocess"); sys.exit(4)
def compile_only():
BODY
try:
    result = compile_only()
except NvvmSupportError as err:
    print("libNVVM is missing:", err); sys.exit(3)
print(json.dumps(result))
"""


@pytest.fixture(scope="session")
def compile_only(cli) -> Callable[[str], Any]:
    """``compile_only(body)``: what ``body`` returns (JSON), run as a function's body in a child
    process without the CUDA simulator, where ``_target`` (``numba_recon.cuda._target``), ``json``,
    ``re`` and ``sys`` are imported. Kernels compile there to PTX for a real GPU: no GPU is needed,
    but libNVVM is (numba-cuda's cu12/cu13 extras); without it the test is skipped, saying so."""

    def run(body: str) -> Any:
        script = _COMPILE_ONLY.replace("BODY", textwrap.indent(textwrap.dedent(body).strip("\n"), "    "))
        proc = cli([], code=script, timeout=600)
        if proc.returncode == 3:
            pytest.skip(f"compile-only checks need libNVVM: {proc.stdout.strip()}")
        assert proc.returncode == 0, f"compilation failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
