"""Seeded keys drawn from image names, for choices that must not depend on row order or format."""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

import numpy as np


def image_keys(stack_paths: Iterable[object], stack_indices: Iterable[int], seed: int, salt: int) -> np.ndarray:
    """A seeded pseudo-random 64-bit key per image, ``(n,)`` uint64.

    The key of image ``index@stack`` depends on the 1-based index and the stack's file name only
    (not its folder, which differs between a STAR file and its ``.thu`` conversion, nor the row),
    on ``seed`` and on ``salt`` (one salt per purpose: half split, hold-out...).
    """
    prefix = f"{int(seed)}:{int(salt)}:".encode()
    # surrogateescape: a stack name read from a non-UTF-8 file hashes as its bytes on disk
    names = (f"{int(i)}@{os.path.basename(str(p))}".encode("utf-8", "surrogateescape")
             for p, i in zip(stack_paths, stack_indices))
    keys = [int.from_bytes(hashlib.blake2b(prefix + name, digest_size=8).digest(), "little") for name in names]
    return np.asarray(keys, dtype=np.uint64)


def order_by_key(index: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``index`` sorted by ``keys[index]`` (ties, i.e. the same image twice, by position)."""
    index = np.asarray(index)
    return index[np.lexsort((index, keys[index]))]


def keyed_half_sets(stack_paths: Iterable[object], stack_indices: Iterable[int], seed: int) -> np.ndarray:
    """Gold-standard halves from the image names: ``(n,)`` int8, the ``ceil(n/2)`` images with the
    smallest keys in half 1, the rest in half 2."""
    keys = image_keys(stack_paths, stack_indices, seed, HALF_SALT)
    n = keys.size
    half = np.full(n, 2, dtype=np.int8)
    half[order_by_key(np.arange(n), keys)[: (n + 1) // 2]] = 1
    return half


#: Salts of :func:`image_keys` for the half split and the cross-validation hold-out.
HALF_SALT = 7001
HOLDOUT_SALT = 7002
