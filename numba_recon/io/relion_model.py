"""``run_model.star`` in the shape RELION's ``MlModel::write`` (``src/ml_model.cpp``) gives it.

RELION's refinement writes, for every iteration, a model file with a key/value block
``data_model_general``, a loop ``data_model_classes`` (one row per class) and one loop
``data_model_class_N`` per class with the per-shell spectra; then ``data_model_groups``, the noise
spectra ``data_model_group_N`` and the orientation distribution ``data_model_pdf_orient_class_N``.
numba-recon reconstructs one map from known poses, so it writes the first three blocks with the
labels whose values it knows, and leaves out every label it would have to invent
(``docs/file-formats.md`` lists both):

``data_model_general``
    ``rlnReferenceDimensionality`` 3, ``rlnDataDimensionality`` 2, ``rlnOriginalImageSize`` and
    ``rlnCurrentImageSize`` (the box: every Fourier shell is used), ``rlnCurrentResolution`` (the
    half-map FSC 0.143 resolution in Angstrom; RELION writes ``1 / current_resolution`` with
    ``current_resolution`` in 1/Angstrom, i.e. Angstrom, whatever the label's description says),
    ``rlnIsHelix`` 0, ``rlnPixelSize``, ``rlnNrClasses`` 1, ``rlnNrBodies`` 1,
    ``rlnOrientationalPriorMode`` 0 (no prior on the orientations: they are given), and
    ``rlnTau2FudgeFactor`` 1 when the solver learned the signal prior (``1/tau^2 = <K> (1 - FSC) /
    FSC``, RELION's update with ``T = 1``).
``data_model_classes``
    ``rlnReferenceImage`` (the map), ``rlnClassDistribution`` 1, ``rlnEstimatedResolution`` and,
    with the learned prior, ``rlnOverallFourierCompleteness``, both computed as RELION's
    ``MlModel::calculateTotalFourierCoverage`` does (last shell with ``rlnSsnrMap >= 1``).
``data_model_class_1``
    Per shell: ``rlnSpectralIndex``, ``rlnResolution`` (1/Angstrom), ``rlnAngstromResolution``
    (999 for shell 0, as RELION's ``getResolutionAngstrom``), ``rlnSsnrMap``
    (``FSC / (1 - FSC)``, negative FSC as 0), ``rlnGoldStandardFsc`` and, with the learned prior,
    ``rlnFourierCompleteness`` and ``rlnReferenceTau2``.

The file is not a model RELION can continue a refinement from (``MlModel::read`` needs the
orientation and noise tables, which a reconstruction from known poses does not estimate).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from numba_recon.io.atomic import atomic_output
from numba_recon.io.run_files import MAP
from numba_recon.io.star_text import format_number, loop_block, quote, record_block
from numba_recon.provenance import comment_lines

__all__ = ["MODEL_STAR_VERSION", "estimated_resolution", "overall_fourier_completeness",
           "write_model_star"]

#: ``# version`` line of the file (RELION 3.1 / 4 / 5 read it).
MODEL_STAR_VERSION = 30001
# FSC values are clipped below 1 before FSC / (1 - FSC) (an FSC of exactly 1 has no finite SSNR)
_FSC_CEIL = 0.999999


def ssnr_from_fsc(fsc_curve: np.ndarray) -> np.ndarray:
    """``FSC / (1 - FSC)`` per shell with negative FSC as 0 and FSC clipped below 1, ``(S,)`` float64."""
    f = np.clip(np.asarray(fsc_curve, np.float64), -1.0, _FSC_CEIL)
    f = np.where(np.isfinite(f), np.maximum(f, 0.0), 0.0)
    return f / (1.0 - f)


def _last_shell_with_ssnr_one(ssnr: np.ndarray) -> int:
    # MlModel::calculateTotalFourierCoverage: from shell 0, the last shell before SSNR first drops below 1
    maxres = 0
    for i, value in enumerate(np.asarray(ssnr, np.float64).tolist()):
        if value < 1.0:
            break
        maxres = i
    return maxres


def estimated_resolution(ssnr: np.ndarray, box_size: int, pixel_size_angstrom: float) -> float:
    """RELION's ``rlnEstimatedResolution``: ``1 / getResolution(maxres)`` in Angstrom, with
    ``maxres`` the last shell before ``rlnSsnrMap`` first drops below 1 (``inf`` when that is shell 0)."""
    maxres = _last_shell_with_ssnr_one(ssnr)
    return math.inf if maxres == 0 else box_size * pixel_size_angstrom / maxres


def overall_fourier_completeness(ssnr: np.ndarray, completeness: np.ndarray) -> float:
    """RELION's ``rlnOverallFourierCompleteness``: the per-shell completeness averaged over the
    Fourier voxels up to the estimated resolution.

    Transcribes ``MlModel::calculateTotalFourierCoverage``: voxels ``(k, i, j)`` of the cube
    ``|k|, |i|, |j| <= maxres - 1`` whose truncated radius ``int(sqrt(k^2 + i^2 + j^2))`` is at most
    ``maxres``, each counting the completeness of its shell; 0 when ``maxres`` is 0 (RELION
    divides by a count of 0 there).
    """
    maxres = _last_shell_with_ssnr_one(ssnr)
    half = maxres - 1
    if half < 0:
        return 0.0
    comp = np.asarray(completeness, np.float64)
    axis = np.arange(-half, half + 1)
    ii, jj = np.meshgrid(axis, axis, indexing="ij")
    plane = ii.astype(np.int64) ** 2 + jj.astype(np.int64) ** 2
    total = 0.0
    count = 0
    for k in axis.tolist():  # one plane at a time: the cube of a large box does not fit in memory
        r = np.sqrt((plane + k * k).astype(np.float64)).astype(np.int64)
        inside = r <= maxres
        total += float(comp[np.minimum(r[inside], comp.size - 1)].sum())
        count += int(inside.sum())
    return total / count if count else 0.0


def write_model_star(path: str | os.PathLike, fsc_curve: np.ndarray, box_size: int, pixel_size_angstrom: float,
                     resolution_angstrom: float, *, reference_image: str = MAP,
                     tau2: np.ndarray | None = None, fourier_completeness: np.ndarray | None = None) -> Path:
    """Write ``run_model.star`` (RELION's model file blocks and labels, see the module text), atomically.

    Parameters
    ----------
    path
        Output file.
    fsc_curve
        ``(N // 2 + 1,)`` gold-standard FSC of the half maps per shell.
    box_size, pixel_size_angstrom
        ``N`` and the pixel size.
    resolution_angstrom
        The FSC 0.143 resolution (``rlnCurrentResolution``).
    reference_image
        ``rlnReferenceImage``: the map's path as RELION should open it (relative to the folder
        RELION runs in, which for a RELION project is the project folder).
    tau2, fourier_completeness
        ``(N // 2 + 1,)`` the learned signal prior ``tau^2`` and the Fourier completeness per shell
        (:func:`solver_spectra`); without them the labels that need them are left out.

    Returns
    -------
    Path
        ``path``.
    """
    box = int(box_size)
    angpix = float(pixel_size_angstrom)
    fsc = np.asarray(fsc_curve, np.float64).reshape(-1)
    shells = np.arange(fsc.size)
    ssnr = ssnr_from_fsc(fsc)
    learned = tau2 is not None
    general: list[tuple[str, str]] = [
        ("rlnReferenceDimensionality", "3"),
        ("rlnDataDimensionality", "2"),
        ("rlnOriginalImageSize", format_number(box)),
        ("rlnCurrentResolution", format_number(resolution_angstrom)),
        ("rlnCurrentImageSize", format_number(box)),
        ("rlnIsHelix", "0"),
        ("rlnPixelSize", format_number(angpix)),
        ("rlnNrClasses", "1"),
        ("rlnNrBodies", "1"),
    ]
    if learned:
        general.append(("rlnTau2FudgeFactor", format_number(1.0)))
    general.append(("rlnOrientationalPriorMode", "0"))

    classes: dict[str, list[str]] = {
        "rlnReferenceImage": [quote(str(reference_image))],
        "rlnClassDistribution": [format_number(1.0)],
        "rlnEstimatedResolution": [format_number(estimated_resolution(ssnr, box, angpix))],
    }
    if fourier_completeness is not None:
        completeness = overall_fourier_completeness(ssnr, fourier_completeness)
        classes["rlnOverallFourierCompleteness"] = [format_number(completeness)]

    with np.errstate(divide="ignore"):
        angstrom = np.where(shells > 0, box * angpix / np.maximum(shells, 1), 999.0)
    spectra: dict[str, list[str]] = {
        "rlnSpectralIndex": [str(int(i)) for i in shells.tolist()],
        "rlnResolution": [format_number(v) for v in (shells / (box * angpix)).tolist()],
        "rlnAngstromResolution": [format_number(v) for v in angstrom.tolist()],
        "rlnSsnrMap": [format_number(v) for v in ssnr.tolist()],
        "rlnGoldStandardFsc": [format_number(v) for v in fsc.tolist()],
    }
    if fourier_completeness is not None:
        comp = np.asarray(fourier_completeness, np.float64).reshape(-1)
        spectra["rlnFourierCompleteness"] = [format_number(v) for v in comp[: fsc.size].tolist()]
    if learned:
        t2 = np.asarray(tau2, np.float64).reshape(-1)
        spectra["rlnReferenceTau2"] = [format_number(v) for v in t2[: fsc.size].tolist()]
    lengths = {label: len(values) for label, values in spectra.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-shell spectra differ in length: {lengths}")

    text = ("\n".join(comment_lines(star=True)) + "\n"
            + record_block("model_general", general)
            + loop_block("model_classes", classes)
            + loop_block("model_class_1", spectra))
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path
