"""refssm: the NumPy/Numba reference implementation of four state-space
sequence models (Mamba, GatedSSM, S5, the State Space Transformer).

The NumPy path is the ground truth; Numba fast paths are checked against it.
"""

__version__ = "0.1.0"
