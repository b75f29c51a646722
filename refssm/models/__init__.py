"""The architectures: config, parameters, forward, step, exact counts.

Each module offers the original API's functions (``build``, the block
builders, ``init_cache``, ``step``, ``output_size``, ``param_count``,
``recommended_defaults``) plus ``param_count_breakdown``,
``original_param_count`` and ``random_params``:

``mamba``          Mamba (selective SSM, S6); presets ``mamba_ssm``, ``edifice``
``gated_ssm``      GatedSSM (gated EMA, not Mamba); ``causal`` (default), ``edifice`` (legacy)
``ss_transformer`` State Space Transformer (S6 path + causal attention, gated)
``s5``             S5 (complex diagonal MIMO SSM)
"""
import importlib

__all__ = ["mamba", "gated_ssm", "ss_transformer", "s5"]


def __getattr__(name):
    # Import lazily so ``refssm.models.mamba`` does not pay for the others.
    if name in __all__:
        return importlib.import_module(f"refssm.models.{name}")
    raise AttributeError(f"module 'refssm.models' has no attribute {name!r}")
