"""float32 parameters and input stay float32 through a whole model (no silent upcast).

Without a carried state the models used to start from a float64 zero cache, so the output came
back typed float64 although the first block's norm, projections and conv ran in float32: an
array that looks like a float64 reference but is not one.
"""
from __future__ import annotations

import numpy as np
import pytest

from refssm.models import gated_ssm, mamba, ss_transformer
from refssm.verify.metrics import normwise_error

MODELS = {
    "mamba": (mamba, dict(embed_dim=5, hidden_size=16, state_size=4, num_layers=2)),
    "gated_ssm": (gated_ssm, dict(embed_dim=5, hidden_size=16, state_size=4, num_layers=2)),
    "ss_transformer": (ss_transformer, dict(embed_dim=5, hidden_size=16, state_size=4,
                                            num_layers=2, num_heads=2, head_dim=4)),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_float32_in_float32_out_close_to_float64_from_the_same_values(arch):
    mod, opts = MODELS[arch]
    c = mod.as_config(dict(opts, dropout=0.0))
    p32 = {layer: {k: v.astype(np.float32) for k, v in d.items()}
           for layer, d in mod.random_params(c, seed=1).items()}
    p64 = {layer: {k: v.astype(np.float64) for k, v in d.items()} for layer, d in p32.items()}
    x32 = np.random.default_rng(0).standard_normal((2, 30, 5)).astype(np.float32)
    a = mod.forward(p32, x32, c, return_sequence=True)
    b = mod.forward(p64, x32.astype(np.float64), c, return_sequence=True)
    assert a.output.dtype == np.float32
    assert all(s.dtype == np.float32 for s in a.state if isinstance(s, np.ndarray))
    err = normwise_error(a.output, b.output)
    assert 1e-9 < err <= 1e-5, err                 # really float32 arithmetic, and close
