"""Evaluation and post-processing of maps: FSC and resolution, masks, filters, RELION-style
post-processing.

- :mod:`~numba_recon.evaluate.fsc`: :func:`fsc`, :func:`resolution_at` (first drop below 0.143),
  :class:`FSCCurve`, :func:`randomize_phases_beyond`, :func:`plot_fsc`;
- :mod:`~numba_recon.evaluate.mask`: :func:`create_mask` (``relion_mask_create``),
  :func:`auto_threshold`, :func:`spherical_mask`;
- :mod:`~numba_recon.evaluate.filters`: :func:`lowpass`, :func:`apply_bfactor`, :func:`guinier`,
  :func:`fit_bfactor`, :func:`fsc_weight`;
- :mod:`~numba_recon.evaluate.postprocess`: :func:`postprocess` (``relion_postprocess``) and
  :func:`write_postprocess`.

The rules and output labels are described in ``docs/postprocessing.md``.
"""

from numba_recon.evaluate.filters import apply_bfactor, fit_bfactor, fsc_weight, guinier, lowpass
from numba_recon.evaluate.fsc import FSCCurve, fsc, plot_fsc, randomize_phases_beyond, resolution_at, write_fsc_csv
from numba_recon.evaluate.mask import auto_threshold, create_mask, spherical_mask
from numba_recon.evaluate.postprocess import PostprocessResult, postprocess, write_postprocess

__all__ = [
    "FSCCurve",
    "fsc",
    "resolution_at",
    "randomize_phases_beyond",
    "plot_fsc",
    "write_fsc_csv",
    "create_mask",
    "auto_threshold",
    "spherical_mask",
    "lowpass",
    "apply_bfactor",
    "guinier",
    "fit_bfactor",
    "fsc_weight",
    "PostprocessResult",
    "postprocess",
    "write_postprocess",
]
