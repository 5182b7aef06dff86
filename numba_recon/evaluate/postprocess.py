"""RELION-style post-processing of two half maps: masked and phase-randomised FSC, FSC weighting,
Guinier B-factor sharpening, low-pass, and the ``postprocess.*`` outputs.

The steps follow ``Postprocessing::run`` and ``sharpenMap`` of RELION (``src/postprocessing.cpp``):

1. ``FSC_unmasked`` of the half maps; with a mask, ``FSC_masked`` of the masked half maps.
2. ``randomize_at`` = first shell ``i > 0`` with ``FSC_unmasked(i) < 0.8``; both unmasked half maps
   get random phases from that shell on, are masked, and give ``FSC_random``.
3. ``FSC_true = FSC_masked`` for ``i < randomize_at + 2``, else
   ``(FSC_masked - FSC_random) / (1 - FSC_random)`` (Chen et al. 2013).
4. Resolution: last shell before ``FSC_true`` first drops below 0.143. If the unmasked FSC
   reaches a higher shell, the mask is not trusted: the unmasked curve and its resolution are used
   (with a warning) unless ``force_mask``. A warning is also given when ``FSC_random > 0.1`` at the
   resolution shell.
5. Average of the half maps, FSC weighting ``sqrt(2 FSC_true / (1 + FSC_true))``, Guinier fit of
   the weighted map (``B = 4 slope``) unless a B-factor is given, ``exp(-(B/4) s^2)`` up to Nyquist,
   raised-cosine low-pass at the resolution (or the given one); the masked map is that map times
   the mask.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from numba_recon.checks import finite_above
from numba_recon.errors import InputError, OutputError
from numba_recon.io.atomic import atomic_output
from numba_recon.io.files import make_output_folder
from numba_recon.io.star_text import format_value, loop_block, record_block
from numba_recon.evaluate.filters import (bfactor_factor, fit_guinier_line, fsc_weighting_factors,
                                          guinier_from_ft, lowpass_factor)
from numba_recon.evaluate.fsc import (_new_figure, check_mask, check_volume, fsc_from_ft, irfft3,
                                      last_shell_above, per_shell, plot_fsc, randomize_phases_from_ft, rfft3,
                                      save_figure, shell_resolutions_angstrom, write_fsc_csv)

__all__ = [
    "PostprocessResult",
    "postprocess",
    "check_bfactor",
    "write_postprocess",
    "check_postprocess_outputs",
    "POSTPROCESS_FILES",
    "postprocess_star_text",
    "plot_guinier",
]

logger = logging.getLogger(__name__)

#: Output file names written by :func:`write_postprocess` (the masked map only with a mask).
POSTPROCESS_FILES = ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "postprocess_fsc.csv",
                     "postprocess_fsc.png", "postprocess_guinier.png")


@dataclass
class PostprocessResult:
    """Everything ``postprocess`` computed. Curves are ``(N//2 + 1,)`` float64 over shells ``0 .. N//2``.

    Attributes
    ----------
    box_size, pixel_size_angstrom
        Geometry of the maps.
    fsc_unmasked
        FSC of the half maps.
    fsc_masked, fsc_random_masked
        FSC of the masked half maps and of the masked phase-randomised half maps (``None`` without
        a mask). Shell 0 is set to 1 where it came out non-positive (RELION).
    fsc_corrected
        ``FSC_true``: the curve used for the resolution and the weighting (the unmasked FSC
        without a mask, or after the unmasked fallback).
    randomize_at_shell
        First phase-randomised shell (``None`` without a mask).
    resolution_angstrom, resolution_shell
        FSC = 0.143 resolution of ``fsc_corrected`` by RELION's rule and its shell.
    bfactor_angstrom2
        B used for sharpening (fitted or given; 0 when the fit was impossible).
    bfactor_fitted
        Whether B came from the Guinier fit.
    guinier_slope, guinier_intercept, guinier_correlation
        Fit results (``None`` when B was given or could not be fitted).
    guinier_fit_shells
        Boolean ``(N//2 + 1,)``, the shells in the fit (``None`` without a fit).
    guinier_s2, guinier_ln_original, guinier_ln_weighted, guinier_ln_sharpened
        Guinier plots (``s^2`` in 1/Angstrom^2, ln mean amplitude; NaN for empty shells) of the
        averaged map before weighting, after FSC weighting, and after the B-factor.
    lowpass_angstrom
        Resolution of the final low-pass.
    autob_lowres_angstrom, autob_highres_angstrom
        Range of the Guinier fit (``None`` high limit: Nyquist).
    map, map_masked
        Sharpened, low-passed average ``(N, N, N)`` float32, and the same times the mask
        (``None`` without a mask).
    mask_used
        A mask was given and its corrected FSC was kept.
    unmasked_fallback
        The unmasked FSC was used because it reached a higher resolution than the masked one.
    warnings
        Warnings raised on the way (also logged).
    """

    box_size: int
    pixel_size_angstrom: float
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray | None
    fsc_random_masked: np.ndarray | None
    fsc_corrected: np.ndarray
    randomize_at_shell: int | None
    resolution_angstrom: float
    resolution_shell: int
    bfactor_angstrom2: float
    bfactor_fitted: bool
    guinier_slope: float | None
    guinier_intercept: float | None
    guinier_correlation: float | None
    guinier_fit_shells: np.ndarray | None
    guinier_s2: np.ndarray
    guinier_ln_original: np.ndarray
    guinier_ln_weighted: np.ndarray
    guinier_ln_sharpened: np.ndarray
    lowpass_angstrom: float
    autob_lowres_angstrom: float
    autob_highres_angstrom: float | None
    map: np.ndarray
    map_masked: np.ndarray | None
    mask_used: bool
    unmasked_fallback: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def randomize_at_angstrom(self) -> float | None:
        """Resolution of the first randomised shell, ``N * angpix / randomize_at``."""
        if self.randomize_at_shell is None:
            return None
        return self.box_size * self.pixel_size_angstrom / self.randomize_at_shell

    def curves(self) -> dict[str, np.ndarray]:
        """The FSC curves for a plot or table, label -> values."""
        if self.fsc_masked is None:
            return {"unmasked": self.fsc_unmasked}
        return {"unmasked": self.fsc_unmasked, "masked": self.fsc_masked,
                "phase-randomised masked": self.fsc_random_masked, "corrected": self.fsc_corrected}


def _warn(result_warnings: list[str], message: str) -> None:
    logger.warning(message)
    result_warnings.append(message)


# exp() of more than this overflows float64; float32 is the MRC mode the maps are written in.
_MAX_LOG_GAIN = math.log(np.finfo(np.float64).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_bfactor(bfactor_angstrom2: float, pixel_size_angstrom: float) -> None:
    """Refuse a B-factor that is not finite or whose gain ``exp(-(B/4) s^2)`` at Nyquist
    (``s = 1 / (2 angpix)``) overflows float64, which would turn the sharpened map into inf/NaN.

    Raises
    ------
    InputError
        Naming ``--bfactor``, the problem and a usable range.
    """
    b = float(bfactor_angstrom2)
    if not math.isfinite(b):
        raise InputError(f"--bfactor {b} is not a finite number", fix="e.g. --bfactor -80, or omit it to fit one")
    log_gain = -b / 4.0 / (2.0 * float(pixel_size_angstrom)) ** 2
    if log_gain > _MAX_LOG_GAIN:
        raise InputError(f"--bfactor {b:g} A^2 amplifies Nyquist by exp({log_gain:.3g}), which overflows",
                         fix="use a milder sharpening B-factor, e.g. --bfactor -50 to -200")


def postprocess(half1: np.ndarray, half2: np.ndarray, pixel_size_angstrom: float,
                mask: np.ndarray | None = None, bfactor: float | None = None,
                lowpass_angstrom: float | None = None, randomize_at_fsc: float = 0.8, seed: int = 0,
                autob_lowres: float = 10.0, *, autob_highres: float | None = -1.0,
                force_mask: bool = False, fsc_weighting: bool = True) -> PostprocessResult:
    """Post-process two half maps exactly as ``relion_postprocess`` does (see the module docstring).

    Parameters
    ----------
    half1, half2
        Unfiltered half maps ``(N, N, N)`` from independent halves of the data.
    pixel_size_angstrom
        Voxel size.
    mask
        Optional ``(N, N, N)`` soft mask with values in [0, 1] (1 = protein).
    bfactor
        B-factor in Angstrom^2 to sharpen with (negative sharpens, e.g. -100); ``None`` fits it to
        the Guinier plot of the FSC-weighted map.
    lowpass_angstrom
        Final low-pass resolution; ``None`` uses the FSC = 0.143 resolution.
    randomize_at_fsc
        Randomise phases from the first shell where the unmasked FSC drops below this value.
    seed
        Seed of the phase randomisation.
    autob_lowres
        Lowest resolution (Angstrom) in the Guinier fit.
    autob_highres
        Highest resolution (Angstrom) in the Guinier fit: -1 (default) uses the FSC = 0.143
        resolution, ``None`` or 0 fits up to Nyquist (``relion_postprocess``'s own default, where
        the FSC weighting has zeroed the shells beyond the first FSC < 1e-4).
    force_mask
        Keep the masked FSC even when the unmasked one reaches a higher resolution.
    fsc_weighting
        Apply the ``sqrt(2 FSC / (1 + FSC))`` weighting (RELION's default; off is
        ``--skip_fsc_weighting``).

    Returns
    -------
    PostprocessResult

    Raises
    ------
    InputError
        Maps of different or non-cubic shapes, a bad mask, a non-positive pixel size, a non-finite
        or out-of-range option, an unmasked FSC that never drops below ``randomize_at_fsc``, or a
        B-factor so strongly negative that the sharpened map overflows.
    """
    h1 = check_volume(half1, "half map 1")
    h2 = check_volume(half2, "half map 2")
    if h1.shape != h2.shape:
        raise InputError(f"the half maps have different boxes {h1.shape} and {h2.shape}",
                         fix="use the two half maps of one reconstruction")
    # Every check is ``not (finite and in range)``: NaN and infinity pass plain ``> 0`` tests.
    if pixel_size_angstrom is None or not finite_above(pixel_size_angstrom, 0.0):
        raise InputError(f"pixel size {pixel_size_angstrom} must be a finite positive number of Angstrom",
                         fix="pass --angpix or fix the map header")
    if not 0.0 < float(randomize_at_fsc) < 1.0:
        raise InputError(f"randomize_at_fsc {randomize_at_fsc} must lie between 0 and 1", fix="use e.g. 0.8")
    if lowpass_angstrom is not None and not finite_above(lowpass_angstrom, 0.0):
        raise InputError(f"--lowpass {lowpass_angstrom} must be a finite positive resolution in Angstrom",
                         fix="e.g. --lowpass 4")
    if not finite_above(autob_lowres, 0.0):
        raise InputError(f"--autob-lowres {autob_lowres} must be a finite positive resolution in Angstrom",
                         fix="e.g. --autob-lowres 10")
    if autob_highres is not None and not math.isfinite(float(autob_highres)):
        raise InputError(f"--autob-highres {autob_highres} is not a finite number",
                         fix="give a resolution in Angstrom, or 0 for Nyquist")
    angpix = float(pixel_size_angstrom)
    if bfactor is not None:
        check_bfactor(bfactor, angpix)
    n = h1.shape[0]
    m = None if mask is None else check_mask(mask, h1.shape)
    warnings: list[str] = []

    ft1, ft2 = rfft3(h1), rfft3(h2)
    fsc_unmasked = fsc_from_ft(ft1, ft2, n)
    fsc_masked = fsc_random = None
    randomize_at = None
    if m is not None:
        fsc_masked = fsc_from_ft(rfft3(h1 * m), rfft3(h2 * m), n)
        below = np.flatnonzero(fsc_unmasked[1:] < randomize_at_fsc)
        if below.size == 0:
            raise InputError(
                f"the unmasked FSC never drops below {randomize_at_fsc:g}, so there is no shell to randomise "
                "phases from",
                fix="check that the half maps come from independent halves of the data (not the same map twice) "
                    "and that the box is not cropped too tightly, or run without a mask")
        randomize_at = int(below[0]) + 1
        rng = np.random.default_rng(seed)
        r1 = irfft3(randomize_phases_from_ft(ft1, n, randomize_at, rng), n)
        r2 = irfft3(randomize_phases_from_ft(ft2, n, randomize_at, rng), n)
        fsc_random = fsc_from_ft(rfft3(r1 * m), rfft3(r2 * m), n)
        del r1, r2
        # RELION: "Sometimes FSC at origin becomes -1!"
        if fsc_masked[0] <= 0:
            fsc_masked[0] = 1.0
        if fsc_random[0] <= 0:
            fsc_random[0] = 1.0
        fsc_true = fsc_masked.copy()
        beyond = np.arange(fsc_true.size) >= randomize_at + 2
        with np.errstate(divide="ignore", invalid="ignore"):
            corrected = (fsc_masked - fsc_random) / (1.0 - fsc_random)
        fsc_true[beyond] = corrected[beyond]
    else:
        fsc_true = fsc_unmasked.copy()

    resolution_shell = last_shell_above(fsc_true, 0.143)
    mask_used = m is not None
    unmasked_fallback = False
    if m is not None:
        unmasked_shell = last_shell_above(fsc_unmasked, 0.143)
        if unmasked_shell > resolution_shell:
            if force_mask:
                _warn(warnings, "the unmasked FSC extends beyond the solvent-corrected FSC")
            else:
                _warn(warnings, "the unmasked FSC extends beyond the solvent-corrected FSC: the mask is not "
                                "used for the resolution; check the mask (too tight, or cutting density?) or "
                                "pass --force-mask")
                fsc_true = fsc_unmasked.copy()
                resolution_shell = unmasked_shell
                unmasked_fallback = True
                mask_used = False
        elif fsc_random[resolution_shell] > 0.1:
            _warn(warnings, f"the phase-randomised FSC is {fsc_random[resolution_shell]:.3f} (> 0.10) at the "
                            "estimated resolution: the estimate may be wrong; use a softer mask with fewer features")
    if resolution_shell == 0:
        _warn(warnings, "the FSC is below 0.143 already at shell 1: there is no resolution to report")
        resolution = float(n * angpix)
    else:
        resolution = float(n * angpix / resolution_shell)

    # Sharpening of the average of the half maps.
    ft = (ft1 + ft2) * 0.5
    del ft1, ft2
    s2, ln_original = guinier_from_ft(ft, n, angpix)
    if fsc_weighting:
        ft *= per_shell(fsc_weighting_factors(fsc_true), n)
    _, ln_weighted = guinier_from_ft(ft, n, angpix)

    if autob_highres is not None and autob_highres < 0:
        highres = resolution
    elif autob_highres is None or autob_highres == 0:
        highres = None
    else:
        highres = float(autob_highres)
    slope = intercept = corr = None
    fit_shells = None
    if bfactor is None:
        try:
            fit = fit_guinier_line(s2, ln_weighted, n, angpix, autob_lowres, highres)
        except InputError:
            upper = "Nyquist" if highres is None else f"{highres:.2f} A"
            if autob_highres is not None and autob_highres < 0:
                upper += " (the resolution)"
            _warn(warnings, f"no B-factor fitted: fewer than 2 shells between {float(autob_lowres):g} A and {upper}; "
                            "the map is not sharpened: give a B-factor to sharpen it")
            bfactor_used, fitted = 0.0, False
        else:
            bfactor_used, fitted = fit.bfactor_angstrom2, True
            slope, intercept, corr, fit_shells = fit.slope, fit.intercept, fit.correlation, fit.used
    else:
        bfactor_used, fitted = float(bfactor), False
        if bfactor_used > 0:
            _warn(warnings, f"B-factor {bfactor_used:g} is positive: it blurs the map; use a negative value "
                            "to sharpen")
    if bfactor_used != 0.0:
        ft *= bfactor_factor(n, bfactor_used, angpix)
    _, ln_sharpened = guinier_from_ft(ft, n, angpix)

    applied_lowpass = float(lowpass_angstrom) if lowpass_angstrom is not None else resolution
    ft *= lowpass_factor(n, applied_lowpass, angpix, 2)
    sharpened = irfft3(ft, n)
    del ft
    # A map that overflows (or exceeds float32, the MRC mode written) must not be written as a NaN map.
    peak = float(np.max(np.abs(sharpened))) if sharpened.size else 0.0
    if not (math.isfinite(peak) and peak <= _FLOAT32_MAX):
        which = "--bfactor" if bfactor is not None else "the fitted B-factor"
        raise InputError(f"the sharpened map is not finite ({which} {bfactor_used:g} A^2 amplifies high "
                         "frequencies beyond the float32 range)",
                         fix="give a milder --bfactor, e.g. --bfactor -50 to -200")
    masked_map = sharpened * m if m is not None else None

    return PostprocessResult(
        box_size=n, pixel_size_angstrom=angpix, fsc_unmasked=fsc_unmasked, fsc_masked=fsc_masked,
        fsc_random_masked=fsc_random, fsc_corrected=fsc_true, randomize_at_shell=randomize_at,
        resolution_angstrom=resolution, resolution_shell=resolution_shell, bfactor_angstrom2=float(bfactor_used),
        bfactor_fitted=fitted, guinier_slope=slope, guinier_intercept=intercept, guinier_correlation=corr,
        guinier_fit_shells=fit_shells, guinier_s2=s2, guinier_ln_original=ln_original,
        guinier_ln_weighted=ln_weighted, guinier_ln_sharpened=ln_sharpened, lowpass_angstrom=applied_lowpass,
        autob_lowres_angstrom=float(autob_lowres), autob_highres_angstrom=highres, map=sharpened,
        map_masked=masked_map, mask_used=mask_used, unmasked_fallback=unmasked_fallback, warnings=warnings)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def _star_value(value) -> str:
    """A value of ``postprocess.star``: text quoted by the one STAR rule, numbers as RELION's
    post-processing writes them (six decimals, -99 for an empty Guinier shell)."""
    if isinstance(value, (str, os.PathLike, bool, np.bool_, int, np.integer)):
        return format_value(value)
    v = float(value)
    if not np.isfinite(v):
        v = -99.0  # RELION's value for an empty Guinier shell
    return f"{v:.6f}" if abs(v) >= 1e-4 or v == 0 else f"{v:.6e}"


def _star_loop(name: str, columns: dict[str, np.ndarray]) -> str:
    return loop_block(name, {label: [_star_value(v) for v in values] for label, values in columns.items()})


def postprocess_star_text(result: PostprocessResult, half1_path: str | os.PathLike,
                          half2_path: str | os.PathLike, mask_path: str | os.PathLike | None) -> str:
    """``postprocess.star`` with RELION's blocks ``data_general``, ``data_fsc``, ``data_guinier``."""
    general: dict[str, object] = {
        "rlnFinalResolution": result.resolution_angstrom,
        "rlnBfactorUsedForSharpening": result.bfactor_angstrom2,
        "rlnUnfilteredMapHalf1": half1_path,
        "rlnUnfilteredMapHalf2": half2_path,
    }
    if result.fsc_masked is not None:
        general["rlnMaskName"] = mask_path if mask_path is not None else "None"
        general["rlnRandomiseFrom"] = result.randomize_at_angstrom
    if result.bfactor_fitted:
        general["rlnFittedSlopeGuinierPlot"] = result.guinier_slope
        general["rlnFittedInterceptGuinierPlot"] = result.guinier_intercept
        general["rlnCorrelationFitGuinierPlot"] = result.guinier_correlation
    text = record_block("general", [(k, _star_value(v)) for k, v in general.items()])

    n, angpix = result.box_size, result.pixel_size_angstrom
    idx = np.arange(n // 2 + 1)
    res = shell_resolutions_angstrom(n, angpix)
    fsc_cols: dict[str, np.ndarray] = {
        "rlnSpectralIndex": idx,
        "rlnResolution": 1.0 / res,
        "rlnAngstromResolution": res,
        "rlnFourierShellCorrelationCorrected": result.fsc_corrected,
        "rlnFourierShellCorrelationUnmaskedMaps": result.fsc_unmasked,
    }
    if result.fsc_masked is not None:
        fsc_cols["rlnFourierShellCorrelationMaskedMaps"] = result.fsc_masked
        fsc_cols["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"] = result.fsc_random_masked
    text += _star_loop("fsc", fsc_cols)

    guinier_cols: dict[str, np.ndarray] = {
        "rlnResolutionSquared": result.guinier_s2,
        "rlnLogAmplitudesOriginal": result.guinier_ln_original,
        "rlnLogAmplitudesWeighted": result.guinier_ln_weighted,
        "rlnLogAmplitudesSharpened": result.guinier_ln_sharpened,
    }
    if result.bfactor_fitted:
        guinier_cols["rlnLogAmplitudesIntercept"] = np.full(result.guinier_s2.size, result.guinier_intercept)
    text += _star_loop("guinier", guinier_cols)
    return text


def plot_guinier(result: PostprocessResult, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Guinier plot (ln mean amplitude against ``s^2``) of the averaged, weighted and sharpened map,
    with the fitted line over the fitted shells; saved as PNG through a temporary name."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    s2 = result.guinier_s2
    ax.plot(s2[1:], result.guinier_ln_original[1:], label="average of half maps", linewidth=1.4)
    ax.plot(s2[1:], result.guinier_ln_weighted[1:], label="FSC-weighted", linewidth=1.4)
    ax.plot(s2[1:], result.guinier_ln_sharpened[1:],
            label=f"sharpened (B = {result.bfactor_angstrom2:.1f} \u00c5\u00b2)", linewidth=1.4)
    if result.bfactor_fitted and result.guinier_fit_shells is not None:
        x = s2[result.guinier_fit_shells]
        ax.plot(x, result.guinier_intercept + result.guinier_slope * x, "k--", linewidth=1.2,
                label=(f"fit, slope {result.guinier_slope:.1f} \u00c5\u00b2 "
                       f"(r\u00b2 = {result.guinier_correlation:.3f})"))
    ax.set_xlabel("resolution\u00b2 (1/\u00c5\u00b2)")
    ax.set_ylabel("ln(mean Fourier amplitude)")
    ax.set_title("Guinier plot", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return save_figure(fig, path, overwrite)


def check_output_files(out_dir: str | os.PathLike, names: list[str] | tuple[str, ...],
                       overwrite: bool) -> dict[str, Path]:
    """Check (and create) an output folder for the files ``names`` and return their paths by name.

    Raises :class:`OutputError` when the folder is a file or not writable, or when an output exists
    and ``overwrite`` is False, so that nothing is computed or written in vain.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError("output folder is an existing file", out, "choose another -o path")
    targets = {name: out / name for name in names}
    if not overwrite:
        existing = [p for p in targets.values() if p.exists()]
        if existing:
            raise OutputError("output files exist", existing[0] if len(existing) == 1 else out,
                              "pass --overwrite to replace them, or choose another -o folder")
    make_output_folder(out)
    return targets


def check_postprocess_outputs(out_dir: str | os.PathLike, with_mask: bool, overwrite: bool) -> dict[str, Path]:
    """:func:`check_output_files` for the post-processing files (the masked map only with a mask)."""
    names = [f for f in POSTPROCESS_FILES if f != "postprocess_masked.mrc" or with_mask]
    return check_output_files(out_dir, names, overwrite)


def write_postprocess(result: PostprocessResult, out_dir: str | os.PathLike, half1_path: str | os.PathLike,
                      half2_path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
                      overwrite: bool = False) -> dict[str, Path]:
    """Write the post-processing outputs into ``out_dir``.

    Files: ``postprocess.mrc`` (sharpened, low-passed average), ``postprocess_masked.mrc`` (times the
    mask, only with a mask), ``postprocess.star`` (RELION blocks and labels), ``postprocess_fsc.csv``,
    ``postprocess_fsc.png`` and ``postprocess_guinier.png``. Everything is first written under
    temporary names and renamed into place at the end, so an error leaves no partial output.

    Parameters
    ----------
    result
        From :func:`postprocess`.
    out_dir
        Output folder (created if missing).
    half1_path, half2_path, mask_path
        Input names recorded in ``postprocess.star``.
    overwrite
        Replace existing outputs; without it an existing output file raises :class:`OutputError`
        before anything is written.

    Returns
    -------
    dict
        File name -> path written.
    """
    from numba_recon.io.mrc import write_volume

    targets = check_postprocess_outputs(out_dir, result.map_masked is not None, overwrite)
    angpix = result.pixel_size_angstrom
    curves = {"fsc_corrected": result.fsc_corrected, "fsc_unmasked": result.fsc_unmasked}
    if result.fsc_masked is not None:
        curves["fsc_masked"] = result.fsc_masked
        curves["fsc_phase_randomised_masked"] = result.fsc_random_masked
    title = f"resolution {result.resolution_angstrom:.2f} \u00c5 (FSC = 0.143)"
    if result.unmasked_fallback:
        title += ", unmasked FSC"
    # Every file goes to a temporary name first; all are renamed into place only after the last
    # one is complete, and all temporaries are removed if anything fails.
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_output(p, overwrite=overwrite)) for name, p in targets.items()}
        write_volume(tmp["postprocess.mrc"], result.map, angpix, overwrite=True)
        if result.map_masked is not None:
            write_volume(tmp["postprocess_masked.mrc"], result.map_masked, angpix, overwrite=True)
        tmp["postprocess.star"].write_text(postprocess_star_text(result, half1_path, half2_path, mask_path),
                                           encoding="utf-8")
        write_fsc_csv(tmp["postprocess_fsc.csv"], curves, result.box_size, angpix, overwrite=True)
        plot_fsc(result.curves(), result.box_size, angpix, tmp["postprocess_fsc.png"],
                 resolution=result.resolution_angstrom, title=title)
        plot_guinier(result, tmp["postprocess_guinier.png"])
    return targets
