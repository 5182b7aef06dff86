"""Tools around the reconstruction: the kernel benchmark behind ``numba-recon bench``."""
