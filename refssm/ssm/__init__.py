"""State-space cores: discretization (ZOH, bilinear, Euler, Mamba's rule)."""
from refssm.ssm.discretize import (
    bilinear,
    bilinear_dense,
    euler,
    euler_dense,
    mamba_discretize,
    zoh,
    zoh_dense,
)

__all__ = [
    "zoh",
    "bilinear",
    "euler",
    "zoh_dense",
    "bilinear_dense",
    "euler_dense",
    "mamba_discretize",
]
