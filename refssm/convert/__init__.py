"""Converters between refssm parameter trees and other implementations' checkpoints."""
from refssm.convert.mamba import (
    cache_from_official,
    cache_to_official,
    config_from_official_state_dict,
    from_official_state_dict,
    to_official_state_dict,
)

__all__ = ["to_official_state_dict", "from_official_state_dict",
           "config_from_official_state_dict", "cache_from_official", "cache_to_official"]
