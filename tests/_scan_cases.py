"""Random selective-scan problems shared by the scan tests."""
from __future__ import annotations

import numpy as np


def make_case(rng, batch=2, seq_len=9, channels=4, state=3, bc="variable", groups=2,
              with_D=True, with_z=True, with_bias=True, with_h0=True, dtype=np.float64,
              delta_range=(-3.0, 0.5)):
    """Keyword arguments for ``selective_scan_forward`` (raw delta, softplus-ready).

    ``bc`` is ``"variable"`` ``[batch, seq_len, state]``, ``"grouped"``
    ``[batch, seq_len, groups, state]`` or ``"constant"`` ``[channels, state]``.
    A is S4D-real-like, ``-(1..state)`` scaled per channel, so decay is varied.
    """
    if bc == "variable":
        bshape = (batch, seq_len, state)
    elif bc == "grouped":
        bshape = (batch, seq_len, groups, state)
    else:
        bshape = (channels, state)
    args = dict(
        u=rng.standard_normal((batch, seq_len, channels)),
        delta=rng.uniform(*delta_range, (batch, seq_len, channels)),
        A=-np.arange(1.0, state + 1)[None, :] * rng.uniform(0.3, 2.0, (channels, 1)),
        B=rng.standard_normal(bshape),
        C=rng.standard_normal(bshape),
        D=rng.standard_normal(channels) if with_D else None,
        z=rng.standard_normal((batch, seq_len, channels)) if with_z else None,
        delta_bias=0.3 * rng.standard_normal(channels) if with_bias else None,
        initial_state=rng.standard_normal((batch, channels, state)) if with_h0 else None,
    )
    return {k: (None if v is None else v.astype(dtype)) for k, v in args.items()}
