"""The architectures: config, parameters, forward, step, exact counts.

Each module offers the original API's functions (``build``, the block
builders, ``init_cache``, ``step``, ``output_size``, ``param_count``,
``recommended_defaults``).
"""
from refssm.models import mamba

__all__ = ["mamba"]
