"""Compile-only check of every kernel: ``cuda.compile_ptx`` with the real launch signatures.

The CUDA simulator does no type inference, so a kernel that would not compile for a GPU can still
pass every simulator test. This module compiles each kernel to PTX for a chosen compute
capability with the exact argument types its launcher passes; it needs libNVVM (shipped with the
numba-cuda ``cu12``/``cu13`` extras) but no GPU and no driver. It must run in a process without
``NUMBA_ENABLE_CUDASIM``::

    python -m numba_recon.cuda.compile_check --cc 9.0
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from numba_recon.cuda._target import SIMULATOR, cuda
from numba_recon.cuda.backproject import _backproject_kernel
from numba_recon.cuda.device_check import _atomic_global_kernel, _atomic_shared_kernel
from numba_recon.cuda.elementwise import _fill_kernel, _residual_loss_kernel
from numba_recon.cuda.fourier import _dft_stage_kernel
from numba_recon.cuda.insert import _insert_kernel, _weight_filters_kernel
from numba_recon.cuda.prepare import _background_kernel, _spectrum_kernel
from numba_recon.cuda.project import _project_kernel
from numba_recon.cuda.step import _adam_kernel, _decay_kernel, _scale_gradient_kernel, _scale_square_kernel

_A1 = "float32[::1]"
_A2 = "float32[:, ::1]"
_A3 = "float32[:, :, ::1]"

#: name -> (kernel, signature exactly as the launcher calls it, fastmath)
KERNELS: dict[str, tuple[Any, str, bool]] = {
    "project": (_project_kernel, f"void({_A3}, {_A3}, int32, {_A3})", True),
    "backproject": (_backproject_kernel, f"void({_A1}, {_A3}, {_A1}, int32, float32, int32, {_A3})", True),
    "dft_stage": (_dft_stage_kernel, f"void({_A2}, {_A3}, {_A3}, int32, float32, {_A3})", True),
    "residual_loss": (_residual_loss_kernel, f"void({_A3}, {_A3}, {_A3}, {_A1}, {_A1}, {_A1})", False),
    "insert_weights": (_insert_kernel, f"void({_A3}, {_A3}, {_A3})", True),
    "weight_filters": (_weight_filters_kernel, f"void({_A3}, {_A2}, {_A1}, {_A3})", False),
    "fill": (_fill_kernel, f"void({_A1}, float32)", False),
    "scale_gradient": (_scale_gradient_kernel, f"void({_A1}, {_A1}, float32, float32)", False),
    "adam_decay": (_decay_kernel, f"void({_A1}, int32, float32)", False),
    "adam_square": (_scale_square_kernel, f"void({_A1}, {_A1}, int32, float32, float32, {_A1}, int32, float64)",
                    False),
    "adam": (_adam_kernel, f"void({_A1}, {_A1}, {_A1}, {_A1}, int32, {', '.join(['float32'] * 4)})", False),
    "atomic_global_benchmark": (_atomic_global_kernel, f"void({_A1}, int64, int64)", False),
    "atomic_shared_benchmark": (_atomic_shared_kernel, f"void({_A1}, int64)", False),
    "prepare_background": (_background_kernel, f"void({_A3}, uint8[:, ::1], {_A3}, {_A1})", False),
    "prepare_spectrum": (_spectrum_kernel, f"void({_A3}, float64[:, ::1], float64[:, ::1], uint8[::1], float64, {_A3}, "
                         f"{_A1})", False),
}

#: kernels whose inner loops must stay in float32 (float64 there would be a silent 2x-64x slowdown)
FLOAT32_ONLY = ("project", "backproject", "dft_stage")

_F64_OP = re.compile(r"^\s*(?:@%p\d+\s+)?(?:add|sub|mul|fma|div|sqrt|rcp|cvt\.rn\.f32)\S*\.f64\b", re.M)


def _compile(name: str, cc: tuple[int, int]) -> str:
    if SIMULATOR:
        raise RuntimeError("compile-only checks need a process without NUMBA_ENABLE_CUDASIM=1")
    kernel, signature, fastmath = KERNELS[name]
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc, fastmath=fastmath)
    return ptx


def compile_all(cc: tuple[int, int] = (9, 0)) -> dict[str, int]:
    """Compile every kernel to PTX for compute capability ``cc``.

    Returns
    -------
    dict
        Kernel name -> number of PTX characters. Raises whatever the compiler raises.
    """
    return {name: len(_compile(name, cc)) for name in KERNELS}


def compile_report(cc: tuple[int, int] = (9, 0)) -> dict[str, dict[str, Any]]:
    """Like :func:`compile_all`, with facts read from the PTX of each kernel.

    Returns
    -------
    dict
        Kernel name -> ``ptx_chars``, ``f64_ops`` (float64 arithmetic instructions),
        ``local_bytes`` (per-thread local memory declared: a spilled array shows here),
        ``shared_atomics`` and ``global_atomics`` (``atom``/``red`` float32 adds).
    """
    report: dict[str, dict[str, Any]] = {}
    for name in KERNELS:
        ptx = _compile(name, cc)
        local = sum(int(m) for m in re.findall(r"\.local\s+\.align\s+\d+\s+\.b8\s+\S+\[(\d+)\]", ptx))
        report[name] = {
            "ptx_chars": len(ptx),
            "f64_ops": len(_F64_OP.findall(ptx)),
            "local_bytes": local,
            "shared_atomics": len(re.findall(r"\b(?:atom|red)\.shared\.add\.f32\b", ptx)),
            "global_atomics": len(re.findall(r"\b(?:atom|red)(?:\.global)?\.add\.f32\b", ptx)),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (default) or 8.0")
    args = parser.parse_args(argv)
    major, minor = (int(v) for v in args.cc.split("."))
    json.dump(compile_report((major, minor)), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
