"""Regenerate the MRC fixtures of tests/data (the STAR and .thu fixtures are plain text, written by hand).

Run ``python tests/data/make_fixtures.py`` from the repository root. The output is byte-for-byte
deterministic (seeded pixels, fixed header label); ``tests/test_io_mrc.py`` checks that the
committed files match what this script writes.

Files (16 x 16 pixels unless stated, float32, pixel size 1.5 A):

- ``Particles/stack_a.mrcs``: 4 images; ``Particles/stack_b.mrcs``: 3 images.
- ``bad/truncated.mrcs``: ``stack_a`` cut 100 bytes short (header declares more data than the file has).
- ``bad/nonsquare.mrcs``: 2 images of 12 rows x 16 columns.
- ``bad/nan.mrcs``: 3 images, image 2 (1-based) has one NaN pixel.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np

PIXEL_SIZE_ANGSTROM = 1.5
LABEL = "numba-recon test fixture"


def fixture_images(seed: int, n: int, ny: int = 16, nx: int = 16) -> np.ndarray:
    """The deterministic pixel values of a fixture stack: ``(n, ny, nx)`` float32."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, ny, nx)).astype(np.float32)


def _write(path: Path, images: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(images, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = PIXEL_SIZE_ANGSTROM
        mrc.header.label[:] = b""
        mrc.header.nlabl = 0
        mrc.add_label(LABEL)
        mrc.update_header_stats()


def main(out_dir: str | Path) -> list[Path]:
    """Write every MRC fixture under ``out_dir``; return their paths."""
    out = Path(out_dir)
    written = []
    stack_a = out / "Particles" / "stack_a.mrcs"
    _write(stack_a, fixture_images(1, 4))
    written.append(stack_a)
    stack_b = out / "Particles" / "stack_b.mrcs"
    _write(stack_b, fixture_images(2, 3))
    written.append(stack_b)

    truncated = out / "bad" / "truncated.mrcs"
    truncated.parent.mkdir(parents=True, exist_ok=True)
    truncated.write_bytes(stack_a.read_bytes()[:-100])
    written.append(truncated)

    nonsquare = out / "bad" / "nonsquare.mrcs"
    _write(nonsquare, fixture_images(3, 2, ny=12, nx=16))
    written.append(nonsquare)

    nan = out / "bad" / "nan.mrcs"
    images = fixture_images(4, 3)
    images[1, 5, 7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about the NaN we put there
        _write(nan, images)
    written.append(nan)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    for p in main(target):
        print(p)
