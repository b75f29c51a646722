"""Mamba's compiled step (refssm.models.mamba_stepper) against the NumPy step and forward.

The NumPy :func:`refssm.models.mamba.step` is the ground truth; the stepper
uses the fused scan's vector step and fast softplus/sigmoid, so the two agree
to round-off (normwise, DESIGN.md section 4 budget for step vs full: 1e-12).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refssm.models import mamba as M
from refssm.models.mamba_stepper import make_stepper
from refssm.verify.metrics import BUDGETS, normwise_error

STEP = BUDGETS["step_vs_full"]       # 1e-12

CONFIGS = {
    "mamba_ssm": dict(preset="mamba_ssm"),
    "edifice": dict(preset="edifice"),
    # every flag flipped, no input projection, dt_rank 2, conv 2, clip active
    "mixed": dict(preset="mamba_ssm", embed_dim=12, norm="layer", a_param="fixed",
                  d_skip=False, dt_rank=2, proj_bias=True, conv_bias=False, conv_size=2,
                  delta_clip=(0.001, 0.1), b_bar="channel_mean", final_norm=False),
}


def _setup(case, layers=3, seed=0):
    c = M.as_config(dict(dict(embed_dim=7, hidden_size=12, state_size=4, num_layers=layers),
                         **CONFIGS[case]))
    # "mixed": steps from 3e-4 to 0.3, so that the clip (0.001, 0.1) acts on part of them
    # (with the default range no step reached it, and a stepper ignoring it passed)
    params = M.random_params(c, seed=seed,
                             **(dict(delta_range=(3e-4, 0.3)) if case == "mixed" else {}))
    x = np.random.default_rng(seed + 1).standard_normal((2, 200, c.embed_dim))
    return c, params, x


def _run(stepper_or_none, params, c, x):
    cache = M.init_cache(c, x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        if stepper_or_none is None:
            y, cache = M.step(params, cache, x[:, t], c)
        else:
            y, cache = stepper_or_none.step(cache, x[:, t])
        ys.append(y)
    return np.stack(ys, axis=1), cache


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_stepper_equals_numpy_step_and_full_forward(case):
    c, params, x = _setup(case)
    got, cache = _run(make_stepper(params, c), params, c, x)
    ref, ref_cache = _run(None, params, c, x)
    full = M.forward(params, x, c, return_sequence=True)
    assert normwise_error(got, ref) <= STEP
    assert normwise_error(got, full.output) <= STEP
    assert normwise_error(cache.h, ref_cache.h) <= STEP
    assert normwise_error(cache.conv, ref_cache.conv) <= STEP
    assert normwise_error(cache.h, full.state.h) <= STEP
    assert np.max(np.abs(cache.h)) > 1e-3          # the state carries something


def test_float32_stepper_error_against_float64():
    """float32 weights and state: measured ~7e-7 normwise over 200 frames (asserted 1e-5)."""
    c, params, x = _setup("mamba_ssm")
    got, _ = _run(make_stepper(params, c, dtype=np.float32), params, c, x)
    assert got.dtype == np.float32
    assert normwise_error(got, M.forward(params, x, c, return_sequence=True).output) <= 1e-5


def test_caches_interoperate_with_numpy_step():
    """Half the frames by the stepper, the rest by the NumPy step: the same outputs."""
    c, params, x = _setup("edifice")
    stepper = make_stepper(params, c)
    cache = M.init_cache(c, 2)
    ys = []
    for t in range(x.shape[1]):
        fn = stepper.step if t % 2 else (lambda ca, f: M.step(params, ca, f, c))
        y, cache = fn(cache, x[:, t])
        ys.append(y)
    full = M.forward(params, x, c, return_sequence=True).output
    assert normwise_error(np.stack(ys, axis=1), full) <= STEP


def test_stepper_snapshots_the_parameters():
    c, params, x = _setup("mamba_ssm", layers=1)
    stepper = make_stepper(params, c)
    before, _ = _run(stepper, params, c, x[:, :5])
    params["mamba_block_1_out_proj"]["kernel"] *= 2.0          # after packing: not seen
    after, _ = _run(stepper, params, c, x[:, :5])
    np.testing.assert_array_equal(before, after)


def test_bad_input_is_a_clear_error():
    c, params, x = _setup("mamba_ssm", layers=1)
    stepper = make_stepper(params, c)
    cache = M.init_cache(c, 2)
    with pytest.raises(ValueError, match=r"frame: expected shape \(batch, 7\)"):
        stepper.step(cache, np.zeros((2, 6)))
    with pytest.raises(ValueError, match="not finite|NaN"):
        stepper.step(cache, np.full((2, 7), np.nan))
    other = M.init_cache(M.as_config(dict(embed_dim=7, hidden_size=12, state_size=5,
                                          num_layers=1)), 2)
    with pytest.raises(ValueError, match="cache"):
        stepper.step(other, x[:, 0])
    with pytest.raises(ValueError, match="dtype: expected float64 or float32"):
        make_stepper(params, c, dtype=np.int32)
    bad = {k: dict(v) for k, v in params.items()}
    bad["mamba_block_1_in_proj"]["kernel"] = bad["mamba_block_1_in_proj"]["kernel"][:, :-1]
    with pytest.raises(ValueError, match="mamba_block_1_in_proj"):
        make_stepper(bad, c)


@settings(max_examples=12, deadline=None)
@given(preset=st.sampled_from(["mamba_ssm", "edifice"]), hidden=st.integers(1, 9),
       state=st.integers(1, 5), expand=st.integers(1, 3), conv=st.integers(1, 4),
       layers=st.integers(1, 3), embed=st.integers(1, 6), seq=st.integers(1, 9))
def test_stepper_random_configs(preset, hidden, state, expand, conv, layers, embed, seq):
    c = M.as_config(dict(embed_dim=embed, hidden_size=hidden, state_size=state,
                         expand_factor=expand, conv_size=conv, num_layers=layers, preset=preset))
    params = M.random_params(c, seed=3)
    x = np.random.default_rng(4).standard_normal((1, seq, embed))
    got, cache = _run(make_stepper(params, c), params, c, x)
    full = M.forward(params, x, c, return_sequence=True)
    assert normwise_error(got, full.output) <= STEP
    assert normwise_error(cache.h, full.state.h) <= STEP


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_stepper_refuses_a_frame_whose_square_overflows_the_norm():
    # a finite frame of ~1e160 made the norm's x * x inf, rstd 0: every such frame gave
    # the same output (the norm's beta / 0), not an error
    c, params, x = _setup("mamba_ssm", layers=1)
    stepper = make_stepper(params, c)
    cache = M.init_cache(c, x.shape[0])
    with pytest.raises(ValueError, match="norm: expected a finite variance"):
        stepper.step(cache, x[:, 0] * 1e160)
    with pytest.raises(ValueError, match=r"rms_norm: .* overflow float64"):
        M.step(params, cache, x[:, 0] * 1e160, c)


def test_the_mixed_case_has_its_clip_active():
    """Teeth for the 'mixed' case: without the clip the same model gives another answer, so
    the stepper's agreement with the clipped full forward shows it clips."""
    c, params, x = _setup("mixed")
    clipped = M.forward(params, x, c, return_sequence=True).output
    c_free = M.as_config(dict(c._asdict() if hasattr(c, "_asdict") else vars(c),
                              delta_clip=None))
    free = M.forward(params, x, c_free, return_sequence=True).output
    assert normwise_error(free, clipped) > 1e-3
    got, _ = _run(make_stepper(params, c), params, c, x)
    assert normwise_error(got, clipped) <= STEP
