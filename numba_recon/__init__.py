"""numba-recon: cryo-EM reconstruction from particles with known poses.

The data flow, one module per stage::

    read -> batch -> forward -> loss -> adjoint -> reduce -> step -> checkpoint -> evaluate -> report

``read.py`` (particles in), ``batch.py`` (minibatches), ``forward.py`` (``C P x``), ``loss.py``
(per-particle losses and robust weights), ``adjoint.py`` (``P^T C r``), ``reduce.py`` (MPI sums),
``step.py`` (Adam), ``checkpoint.py`` (HDF5 state), ``evaluate/`` (FSC, masks, post-processing)
and ``report.py`` (plots and the HTML page). ``engine.py`` runs them in order.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
