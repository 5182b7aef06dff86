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

import sys  # noqa: E402

if "numba" in sys.modules:  # imported early by a plugin: make it see the simulator setting
    from numba.core import config as _numba_config

    _numba_config.reload_config()

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


def cli_env() -> dict[str, str]:
    """Environment for subprocess calls of the CLI (simulator on, no GPU needed)."""
    env = dict(os.environ)
    env.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    return env


def backend_for_test(name: str):
    """The backend ``name`` for a parametrised test: ``cuda`` is Numba's simulator here, or a real
    GPU with ``NUMBA_RECON_TEST_REAL_GPU=1`` (skipped, naming the reason, when that GPU is unusable)."""
    from numba_recon.backend import get_backend
    from numba_recon.errors import BackendUnavailableError

    try:
        return get_backend(name)
    except BackendUnavailableError as err:
        if name == "cuda" and os.environ.get("NUMBA_RECON_TEST_REAL_GPU") == "1":
            pytest.skip(f"no usable GPU: {err}")
        raise
