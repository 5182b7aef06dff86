"""numba-recon: cryo-EM reconstruction from particles with known poses.

The data flow, one module per stage::

    read -> batch -> forward -> loss -> adjoint -> reduce -> step -> checkpoint -> evaluate -> report

``read.py`` (particles in), ``batch.py`` (half sets, batches, particle preparation), ``forward.py``
(``C P x``), ``loss.py`` (per-particle losses and robust weights), ``adjoint.py`` (``P^T C r``),
``reduce.py`` (MPI sums), ``step.py`` (conjugate gradients, Adam), ``checkpoint.py`` (HDF5 state),
``evaluate/`` (FSC, masks, post-processing) and ``report/`` (maps, tables, figures, the HTML page).
``recon/engine.py`` runs them in order; docs/architecture.md has the folders and the layers.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
