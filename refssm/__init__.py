"""refssm: the NumPy/Numba reference implementation of four state-space
sequence models (Mamba, GatedSSM, S5, the State Space Transformer).

The NumPy path is the ground truth; Numba fast paths are checked against it.

Importing refssm sets ``GOMP_SPINCOUNT=10000`` in the environment unless
``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is already set: Numba's default
threading layer here is GNU OpenMP, whose idle workers spin for 300,000
iterations after each parallel region. A model's forward runs NumPy's BLAS
(its own threads) between Numba kernels, and on this 2-core machine the
spinning workers took the cores from it: the "numba" forward of Mamba at its
recommended defaults took 16.0 ms instead of 5.9 ms, the State Space
Transformer's 92 ms instead of 48 ms. 10,000 spins still cover back-to-back
kernels (W3's scans timed the same). The variable is read when the OpenMP
runtime loads, at the first parallel Numba call; set either variable
yourself, before that, to choose otherwise.
"""
import os as _os

if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"

__version__ = "0.1.0"
