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

import subprocess  # noqa: E402
import sys  # noqa: E402

if "numba" in sys.modules:  # imported early by a plugin: make it see the simulator setting
    from numba.core import config as _numba_config

    _numba_config.reload_config()

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

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
