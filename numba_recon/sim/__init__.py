"""Simulated data with known truth: the blob phantom and its analytic projector
(:mod:`.phantom`), and whole particle data sets written as RELION files (:mod:`.simulate`)."""
