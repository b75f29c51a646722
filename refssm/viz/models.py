"""Plots from a model and an input, and :func:`plot_main` behind ``refssm plot``.

A *trace* runs one layer of a model on one input with the readable NumPy
engine and keeps what the plots need (the SSM's input, ``delta``, ``B``,
``C`` and every state ``h[t]``), for batch element ``batch``. The plot
functions of :mod:`refssm.viz.plots` then draw it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._figure import DPI, data_axes, save_png  # noqa: F401  (data_axes: doctests)
from .plots import plot_delta_vs_input, plot_gate_over_time, plot_s5_kernel, plot_state_evolution

__all__ = ["MambaLayerTrace", "trace_mamba", "plot_mamba_state_evolution", "plot_mamba_delta",
           "S5LayerTrace", "trace_s5", "plot_s5_state_evolution", "plot_s5_model_kernel",
           "GatedSSMLayerTrace", "trace_gated_ssm", "plot_gated_ssm_state_evolution",
           "SSTLayerTrace", "trace_sst", "plot_sst_gate", "plot_sst_state_evolution",
           "demo_input", "selective_copy_demo", "plot_main", "ARCHITECTURES"]


@dataclass
class MambaLayerTrace:
    """One Mamba layer's selective scan on one input (one batch element).

    Attributes
    ----------
    layer : int
        1-based block index.
    x : ndarray ``[seq_len, hidden]``
        The block's input (residual stream before the norm).
    xs : ndarray ``[seq_len, inner]``
        The scan's input ``u`` (after in_proj, causal conv and SiLU).
    delta : ndarray ``[seq_len, inner]``
        The step size actually used (after softplus and any clip).
    A : ndarray ``[inner, state]``
    B, C : ndarray ``[seq_len, state]``
    states : ndarray ``[seq_len, inner, state]``
        ``h[t]`` after every step.
    y_core : ndarray ``[seq_len, inner]``
        ``C_t . h_t`` (before the ``D`` skip and the ``silu(z)`` gate).
    """

    layer: int
    x: np.ndarray
    xs: np.ndarray
    delta: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    states: np.ndarray
    y_core: np.ndarray


def trace_mamba(model, x, *, layer: int = 1, batch: int = 0) -> MambaLayerTrace:
    """Run ``model`` on ``x`` and keep layer ``layer``'s scan (NumPy engine).

    Parameters
    ----------
    model : refssm.models.mamba.MambaModel
        (anything with ``.params`` and a Mamba ``.config``).
    x : ndarray ``[batch_size, seq_len, embed_dim]``
    layer : int
        1-based block index.
    batch : int
        Which batch element to keep.

    Returns
    -------
    MambaLayerTrace

    Examples
    --------
    >>> from refssm.models import mamba
    >>> m = mamba.build(embed_dim=3, hidden_size=8, state_size=4, num_layers=2, seed=0)
    >>> tr = trace_mamba(m, np.ones((1, 5, 3)), layer=2)
    >>> tr.states.shape, tr.delta.shape
    ((5, 16, 4), (5, 16))
    """
    from ..models import mamba

    c = mamba.as_config(model.config)
    x, layer, b = _check_trace_args(x, layer, batch, c.num_layers)
    out = mamba.forward(model.params, x, c, return_sequence=True, engine="numpy")
    block_in = out.hidden_states[layer - 1]
    _, _, _, saved = mamba.mamba_block_forward(model.params, block_in, c, layer, engine="numpy")
    core = saved.core
    bB = b if core.B4.shape[0] > 1 else 0
    bC = b if core.C4.shape[0] > 1 else 0
    return MambaLayerTrace(
        layer=layer, x=block_in[b], xs=saved.u[b], delta=saved.dt[b], A=core.A,
        B=core.B4[bB, :, 0, :], C=core.C4[bC, :, 0, :], states=core.states[b],
        y_core=saved.y_core[b])


def plot_mamba_state_evolution(model, x, *, layer: int = 1, channels=None, batch: int = 0,
                               title=None):
    """State evolution of a Mamba layer on ``x``: the scan's input, ``delta`` and ``h``.

    Parameters
    ----------
    model : MambaModel
    x : ndarray ``[batch_size, seq_len, embed_dim]``
    layer : int
    channels : sequence of int, optional
        Inner channels to draw (default: the three whose state varies most).
    batch : int
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> from refssm.models import mamba
    >>> m = mamba.build(embed_dim=2, hidden_size=4, state_size=3, num_layers=1, seed=0)
    >>> fig = plot_mamba_state_evolution(m, np.ones((1, 6, 2)))
    >>> data_axes(fig)[-1].get_ylabel()
    'state index n'
    """
    tr = trace_mamba(model, x, layer=layer, batch=batch)
    chans = _busiest(tr.states) if channels is None else [int(c) for c in np.atleast_1d(channels)]
    return plot_state_evolution(
        tr.states, inputs=tr.xs[:, chans], delta=tr.delta, channels=chans,
        input_labels=[f"channel {c}" for c in chans],
        input_title="the scan's input x[t, c] (after the conv and SiLU)", input_ylabel="x[t, c]",
        title=title or f"Mamba layer {tr.layer}: input, step size Δ and state over time")


def plot_mamba_delta(model, x, *, layer: int = 1, channels=None, batch: int = 0,
                     relative: bool = True, title=None):
    """``delta`` of a Mamba layer against the model's input ``x``.

    ``relative`` (default True): colour by ``delta / median_t(delta)`` per
    channel (see :func:`~refssm.viz.plots.plot_delta_vs_input`).

    Examples
    --------
    >>> from refssm.models import mamba
    >>> m = mamba.build(embed_dim=2, hidden_size=4, state_size=3, num_layers=1, seed=0)
    >>> fig = plot_mamba_delta(m, np.ones((1, 6, 2)))
    >>> fig.axes[1].get_ylabel()
    'channel c'
    """
    tr = trace_mamba(model, x, layer=layer, batch=batch)
    return plot_delta_vs_input(tr.delta, np.asarray(x)[batch], channels=channels,
                               relative=relative,
                               title=title or f"Mamba layer {tr.layer}: the step size Δ "
                                              f"against the input")


def _check_trace_args(x, layer, batch, num_layers):
    if not 1 <= int(layer) <= num_layers:
        raise ValueError(f"layer: expected 1 to {num_layers}, got {layer}")
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x: expected [batch, seq_len, embed_dim], got shape {x.shape}")
    if not 0 <= int(batch) < x.shape[0]:
        raise ValueError(f"batch: expected 0 <= batch < {x.shape[0]}, got {batch}")
    return x, int(layer), int(batch)


def _busiest(states, k=3):
    """The ``k`` channels of ``states [seq_len, channels, state]`` whose states reach the
    largest ``|h|``."""
    spread = np.max(np.abs(states), axis=(0, 2))
    return sorted(np.argsort(spread)[::-1][:k].tolist())


# ---------------------------------------------------------------------------
# S5
# ---------------------------------------------------------------------------

@dataclass
class S5LayerTrace:
    """One S5 layer's SSM on one input (one batch element; the paper's SSM, preset ``s5``).

    Attributes
    ----------
    layer : int
    x : ndarray ``[seq_len, H]``
        The block's input.
    u : ndarray ``[seq_len, H]``
        The SSM's input (after the LayerNorm).
    Lambda, Lambda_bar : ndarray ``[P]`` complex
        Continuous and discretised eigenvalues (``P`` stored states).
    step : ndarray ``[P]``
        ``Delta`` per state.
    B_bar : ndarray ``[P, H]`` complex
    C_tilde : ndarray ``[H, P]`` complex (``[H, 2P]`` if bidirectional)
    states : ndarray ``[seq_len, P]`` complex
        ``x_k`` after every step (forward direction).
    y : ndarray ``[seq_len, H]``
        The SSM's output ``Re(C_tilde x_k) (x2) + D u_k`` (before the activation).
    conj_sym : bool
    """

    layer: int
    x: np.ndarray
    u: np.ndarray
    Lambda: np.ndarray
    Lambda_bar: np.ndarray
    step: np.ndarray
    B_bar: np.ndarray
    C_tilde: np.ndarray
    states: np.ndarray
    y: np.ndarray
    conj_sym: bool


def _s5_system(params, c, name):
    from ..ssm import s5 as core

    Lambda, B_tilde, C_tilde, D, log_step = core.ssm_matrices(
        params[f"{name}_ssm"], clip_eigs=c.clip_eigs, bidirectional=c.bidirectional)
    step = c.step_rescale * np.exp(log_step)
    Lambda_bar, B_bar, _ = core.discretize_forward(Lambda, B_tilde, step, c.discretization)
    return Lambda, Lambda_bar, step, B_bar, C_tilde


def trace_s5(model, x, *, layer: int = 1, batch: int = 0) -> S5LayerTrace:
    """Run an S5 ``model`` on ``x`` and keep layer ``layer``'s SSM (NumPy engine).

    Examples
    --------
    >>> from refssm.models import s5
    >>> m = s5.build(embed_dim=3, hidden_size=4, state_size=8, num_layers=2, seed=0)
    >>> tr = trace_s5(m, np.ones((1, 5, 3)), layer=2)
    >>> tr.states.shape, tr.states.dtype
    ((5, 4), dtype('complex128'))
    """
    from ..models import s5
    from ..ops.norms import layer_norm_forward
    from ..ssm import s5 as core

    c = s5.as_config(model.config)
    if c.ssm != "s5":
        raise ValueError(f"trace_s5: expected the paper's S5 SSM (ssm='s5'), got ssm={c.ssm!r} "
                         f"(preset {c.preset!r}: a real, input-projected SSM)")
    x, layer, batch = _check_trace_args(x, layer, batch, c.num_layers)
    out = s5.forward(model.params, x, c, return_sequence=True, engine="numpy")
    name = f"s5_block_{layer}_ssm"
    block_in = out.hidden_states[layer - 1]
    norm = model.params[f"{name}_norm"]
    u = layer_norm_forward(block_in, norm["gamma"], norm["beta"], c.norm_eps)[0]
    y, _, saved = core.s5_ssm_forward(
        model.params[f"{name}_ssm"], u, discretization=c.discretization, conj_sym=c.conj_sym,
        bidirectional=c.bidirectional, clip_eigs=c.clip_eigs, step_rescale=c.step_rescale,
        engine="numpy")
    Lambda, Lambda_bar, step, B_bar, C_tilde = _s5_system(model.params, c, name)
    return S5LayerTrace(layer=layer, x=block_in[batch], u=u[batch], Lambda=Lambda,
                        Lambda_bar=Lambda_bar, step=step, B_bar=B_bar, C_tilde=C_tilde,
                        states=saved.core.states[batch], y=y[batch], conj_sym=c.conj_sym)


def plot_s5_state_evolution(model, x, *, layer: int = 1, batch: int = 0, part: str = "real",
                            title=None):
    """State evolution of an S5 layer: its input and the complex state ``x_k`` (one MIMO system).

    Examples
    --------
    >>> from refssm.models import s5
    >>> m = s5.build(embed_dim=2, hidden_size=4, state_size=8, num_layers=1, seed=0)
    >>> fig = plot_s5_state_evolution(m, np.ones((1, 6, 2)))
    >>> data_axes(fig)[-1].get_ylabel()
    'state p (complex)'
    """
    tr = trace_s5(model, x, layer=layer, batch=batch)
    H = tr.u.shape[1]
    feats = list(range(min(3, H)))
    return plot_state_evolution(
        tr.states, inputs=tr.u[:, feats], part=part, state_label="state p (complex)",
        input_labels=[f"feature {f}" for f in feats], input_title="SSM input (after LayerNorm)",
        state_title="S5 state x[t, p], all features share it", value_label="x[t, p]",
        title=title or f"S5 layer {tr.layer}: one MIMO state for all {H} features")


def plot_s5_model_kernel(model, *, layer: int = 1, seq_len: int = 64, input_feature: int = 0,
                         title=None):
    """The convolution kernel ``K_k = Re(C_tilde Lambda_bar^k B_bar)`` of an S5 layer.

    Examples
    --------
    >>> from refssm.models import s5
    >>> m = s5.build(embed_dim=2, hidden_size=4, state_size=8, num_layers=1, seed=0)
    >>> fig = plot_s5_model_kernel(m, seq_len=16)
    >>> fig.axes[0].get_xlabel()
    'lag k (time steps back)'
    """
    from ..models import s5
    from ..ssm import s5 as core

    c = s5.as_config(model.config)
    if c.ssm != "s5" or c.bidirectional:
        raise ValueError("plot_s5_model_kernel: expected a causal S5 SSM (ssm='s5', "
                         "bidirectional=False)")
    if not 1 <= int(layer) <= c.num_layers:
        raise ValueError(f"layer: expected 1 to {c.num_layers}, got {layer}")
    _, Lambda_bar, _, B_bar, C_tilde = _s5_system(model.params, c, f"s5_block_{int(layer)}_ssm")
    K = core.s5_kernel(Lambda_bar, B_bar, C_tilde, int(seq_len), conj_sym=c.conj_sym)
    return plot_s5_kernel(K, input_feature=input_feature,
                          title=title or f"S5 layer {int(layer)}: convolution kernel "
                                         f"K_k = Re(C̃ Λ̄^k B̄) over the lag k")


# ---------------------------------------------------------------------------
# GatedSSM
# ---------------------------------------------------------------------------

@dataclass
class GatedSSMLayerTrace:
    """One GatedSSM layer's gated core on one input (one batch element).

    Attributes
    ----------
    layer : int
    xs : ndarray ``[seq_len, inner]``
        The core's input (after the conv + SiLU).
    g, s : ndarray ``[seq_len]``
        Selection gate ``sigmoid(mean_c delta)`` and B.C gate ``sigmoid(B . C)``.
    context : ndarray ``[seq_len, inner]``
        ``ctx_t`` (causal: the EMA; legacy: ``w_t gx_t``).
    y : ndarray ``[seq_len, inner]``
    scan_mode : str
    """

    layer: int
    xs: np.ndarray
    g: np.ndarray
    s: np.ndarray
    context: np.ndarray
    y: np.ndarray
    scan_mode: str


def trace_gated_ssm(model, x, *, layer: int = 1, batch: int = 0) -> GatedSSMLayerTrace:
    """Run a GatedSSM ``model`` on ``x`` and keep layer ``layer``'s gates and context.

    Examples
    --------
    >>> from refssm.models import gated_ssm
    >>> m = gated_ssm.build(embed_dim=3, hidden_size=8, state_size=2, seed=0)
    >>> tr = trace_gated_ssm(m, np.ones((1, 5, 3)))
    >>> tr.context.shape, bool(np.all(tr.g > 0.5))
    ((5, 16), True)
    """
    from ..models import gated_ssm

    c = gated_ssm.as_config(model.config)
    x, layer, batch = _check_trace_args(x, layer, batch, c.num_layers)
    out = gated_ssm.forward(model.params, x, c, return_sequence=True, engine="numpy")
    _, _, _, saved = gated_ssm.mamba_block_forward(model.params, out.hidden_states[layer - 1], c,
                                                   layer, engine="numpy")
    g, s = saved.g[batch, :, 0], saved.s[batch, :, 0]
    gx = g[:, None] * s[:, None] * saved.x[batch]
    y = gx + (1.0 - g[:, None]) * saved.context[batch]
    return GatedSSMLayerTrace(layer=layer, xs=saved.x[batch], g=g, s=s,
                              context=saved.context[batch], y=y, scan_mode=saved.scan_mode)


def plot_gated_ssm_state_evolution(model, x, *, layer: int = 1, batch: int = 0, title=None):
    """GatedSSM's "state": the context of every channel, with the gates that drive it.

    Examples
    --------
    >>> from refssm.models import gated_ssm
    >>> m = gated_ssm.build(embed_dim=2, hidden_size=4, state_size=2, seed=0)
    >>> fig = plot_gated_ssm_state_evolution(m, np.ones((1, 6, 2)))
    >>> data_axes(fig)[-1].get_ylabel()
    'channel c'
    """
    tr = trace_gated_ssm(model, x, layer=layer, batch=batch)
    gates = np.stack([tr.g, tr.s], axis=1)
    return plot_state_evolution(
        tr.context[:, None, :], inputs=gates, channels=[0], state_label="channel c",
        input_labels=["selection gate g = σ(mean Δ)", "B·C gate s = σ(B·C)"],
        input_title="the two gates (one number per frame, shared by all channels)",
        input_ylabel="gate value", state_title="context ctx[t, c] of every channel",
        value_label="ctx[t, c]",
        title=title or f"GatedSSM layer {tr.layer} ({tr.scan_mode}): the gates and the "
                       f"context of every channel")


# ---------------------------------------------------------------------------
# SSTransformer
# ---------------------------------------------------------------------------

@dataclass
class SSTLayerTrace:
    """One SSTransformer block on one input (one batch element).

    Attributes
    ----------
    layer : int
    u : ndarray ``[seq_len, H]``
        The block's normalised input.
    gate : ndarray ``[seq_len, H]``
        ``g = sigmoid(gate_proj(u))``: the SSM path's share, per feature.
    xs : ndarray ``[seq_len, inner]``
        The SSM's input (after the conv + SiLU).
    delta : ndarray ``[seq_len, inner]`` or None
        The selective path's step size (None for the EMA path).
    states : ndarray ``[seq_len, inner, N]`` (selective) or ``[seq_len, 1, inner]`` (EMA)
    ssm_out : ndarray ``[seq_len, H]``
        The SSM path's output ``s`` (after ``ssm_out_proj``).
    """

    layer: int
    u: np.ndarray
    gate: np.ndarray
    xs: np.ndarray
    delta: np.ndarray
    states: np.ndarray
    ssm_out: np.ndarray


def trace_sst(model, x, *, layer: int = 1, batch: int = 0) -> SSTLayerTrace:
    """Run an SSTransformer ``model`` on ``x``; keep block ``layer``'s gate and SSM state.

    Examples
    --------
    >>> from refssm.models import ss_transformer as sst
    >>> m = sst.build(embed_dim=3, hidden_size=8, state_size=2, num_layers=1, num_heads=2,
    ...               head_dim=4, seed=0)
    >>> tr = trace_sst(m, np.ones((1, 5, 3)))
    >>> tr.gate.shape, tr.states.shape
    ((5, 8), (5, 16, 2))
    """
    from ..models import ss_transformer as sst
    from ..ops.activations import sigmoid, silu_forward
    from ..ops.conv import causal_depthwise_conv1d_forward
    from ..ops.dense import dense_forward
    from ..ops.norms import layer_norm_forward
    from ..ssm.selective_scan import selective_scan_forward

    c = sst.as_config(model.config)
    x, layer, batch = _check_trace_args(x, layer, batch, c.num_layers)
    params = model.params
    out = sst.forward(params, x, c, return_sequence=True, engine="numpy")
    b = f"sst_block_{layer}"
    dense = lambda p, v: dense_forward(v, p["kernel"], p.get("bias"))[0]      # noqa: E731
    norm = params[f"{b}_norm"]
    u = layer_norm_forward(out.hidden_states[layer - 1], norm["gamma"], norm["beta"],
                           c.norm_eps)[0]
    gate = sigmoid(dense(params[f"{b}_gate_proj"], u))
    s, _, _ = sst.ssm_path_forward(params, u, c, b, engine="numpy")
    # the SSM's own input and state (the path above returns only its output)
    E = c.inner_size
    xz = dense(params[f"{b}_ssm_in_proj"], u)
    conv = params[f"{b}_ssm_conv"]
    xs = silu_forward(causal_depthwise_conv1d_forward(xz[..., :E], conv["kernel"],
                                                      conv["bias"])[0])[0]
    if c.ssm_path == "selective":
        N, R = c.state_size, c.dt_rank_size
        x_dbl = dense(params[f"{b}_ssm_x_proj"], xs)
        dt_proj = params[f"{b}_ssm_dt_proj"]
        _, _, saved = selective_scan_forward(
            xs, dense_forward(x_dbl[..., :R], dt_proj["kernel"])[0],
            -np.exp(params[f"{b}_ssm"]["A_log"]), x_dbl[..., R:R + N], x_dbl[..., R + N:],
            delta_bias=dt_proj["bias"], delta_softplus=True, engine="numpy")
        states, delta = saved.core.states[batch], saved.dt[batch]
    else:
        y, _ = sst.ema_ssm_forward(params, xs, b)
        states, delta = y[batch][:, None, :], None
    return SSTLayerTrace(layer=layer, u=u[batch], gate=gate[batch], xs=xs[batch], delta=delta,
                         states=states, ssm_out=s[batch])


def plot_sst_gate(model, x, *, layer: int = 1, batch: int = 0, title=None):
    """The gate ``g[t, f]`` of an SSTransformer block over time (1 = SSM, 0 = attention).

    Examples
    --------
    >>> from refssm.models import ss_transformer as sst
    >>> m = sst.build(embed_dim=2, hidden_size=4, state_size=2, num_layers=1, num_heads=1,
    ...               head_dim=4, seed=0)
    >>> fig = plot_sst_gate(m, np.ones((1, 6, 2)))
    >>> data_axes(fig)[-1].get_ylabel()
    'mean gate (SSM share)'
    """
    tr = trace_sst(model, x, layer=layer, batch=batch)
    xin = np.asarray(x)[batch]
    return plot_gate_over_time(tr.gate, inputs=xin,
                               title=title or f"SSTransformer block {tr.layer}: the gate between "
                                              f"the SSM path and attention, over time")


def plot_sst_state_evolution(model, x, *, layer: int = 1, channels=None, batch: int = 0,
                             title=None):
    """An SSTransformer block: the gate, the SSM path's step size and state over time.

    Examples
    --------
    >>> from refssm.models import ss_transformer as sst
    >>> m = sst.build(embed_dim=2, hidden_size=4, state_size=2, num_layers=1, num_heads=1,
    ...               head_dim=4, seed=0)
    >>> fig = plot_sst_state_evolution(m, np.ones((1, 6, 2)))
    >>> data_axes(fig)[0].get_ylabel()
    'gate g[t]'
    """
    tr = trace_sst(model, x, layer=layer, batch=batch)
    if tr.delta is None:                                      # EMA path: [seq_len, 1, inner]
        return plot_state_evolution(
            tr.states, gate=tr.gate, channels=[0], state_label="channel c",
            state_title="EMA context of every channel", value_label="y[t, c]",
            title=title or f"SSTransformer block {tr.layer} (EMA path): gate and SSM context")
    chans = _busiest(tr.states) if channels is None else [int(c) for c in np.atleast_1d(channels)]
    return plot_state_evolution(
        tr.states, gate=tr.gate, delta=tr.delta, channels=chans,
        title=title or f"SSTransformer block {tr.layer}: gate, SSM step size Δ and SSM state")


def selective_copy_demo(seq_len: int = 64, n_tokens: int = 4, *, seed: int = 0,
                        noise: float = 0.3):
    r"""A selective-copying input for the bare selective scan (one channel).

    ``n_tokens`` data values sit at random positions among noise; the scan
    should keep the data and ignore the noise. Everything the scan reads is a
    linear function of the current frame, as in Mamba: ``delta`` is
    ``softplus`` of a large value on data frames (write) and a negative one on
    noise frames (hold); ``B_t`` is the one-hot *slot* a data frame carries
    (data token ``k`` goes to state ``k``) and all ones on other frames (so
    only a small ``delta`` keeps the noise out); ``C_t`` reads slot ``j``
    during the last ``n_tokens`` steps. ``A = -1e-3`` per state: slow decay, long memory.

    Returns
    -------
    dict
        ``u, delta_raw [1, seq_len, 1]``, ``A [1, N]``, ``B, C [1, seq_len, N]``,
        ``data_pos [n_tokens]``, ``data [n_tokens]``, ``read_pos [n_tokens]``
        (``N = n_tokens``; pass ``delta_softplus=True`` to the scan).

    Examples
    --------
    >>> ex = selective_copy_demo(32, 3)
    >>> ex["u"].shape, ex["B"].shape
    ((1, 32, 1), (1, 32, 3))
    """
    rng = np.random.default_rng(seed)
    N = int(n_tokens)
    if N < 1:
        raise ValueError(f"n_tokens: expected >= 1, got {n_tokens}")
    if seq_len < 3 * N:
        raise ValueError(f"seq_len: expected >= 3 * n_tokens = {3 * N}, got {seq_len}")
    read_pos = np.arange(seq_len - N, seq_len)
    data_pos = np.sort(rng.choice(seq_len - N, size=N, replace=False))
    data = rng.choice([-1.0, 1.0], size=N) * rng.uniform(0.5, 1.5, size=N)
    u = noise * rng.standard_normal(seq_len)
    u[read_pos] = 0.0
    u[data_pos] = data
    is_data = np.zeros(seq_len)
    is_data[data_pos] = 1.0
    delta_raw = np.where(is_data > 0, 3.0, -7.0)            # softplus: ~3.05 vs ~9e-4
    B = np.ones((seq_len, N))                                # noise frames: every slot
    B[data_pos] = 0.0
    B[data_pos, np.arange(N)] = 1.0 / np.log1p(np.exp(3.0))  # data k -> slot k, delta * B = 1
    C = np.zeros((seq_len, N))
    C[read_pos, np.arange(N)] = 1.0
    return dict(u=u[None, :, None], delta_raw=delta_raw[None, :, None], A=np.full((1, N), -1e-3),
                B=B[None], C=C[None], data_pos=data_pos, data=data, read_pos=read_pos)


def _plot_scan(out_png, *, seq_len=64, n_tokens=4, seed=0, dpi=DPI):
    from ..ssm.selective_scan import selective_scan_forward

    ex = selective_copy_demo(seq_len, n_tokens, seed=seed)
    _, _, saved = selective_scan_forward(ex["u"], ex["delta_raw"], ex["A"], ex["B"], ex["C"],
                                         delta_softplus=True, engine="numpy")
    fig = plot_state_evolution(
        saved.core.states[0], inputs=ex["u"][0, :, 0], delta=saved.dt[0], channels=[0],
        state_label="slot n",
        title="Selective scan on a selective-copying input: data is written, noise is ignored")
    fig.set_dpi(dpi)
    save_png(fig, out_png)
    return fig


def demo_input(seq_len: int = 64, embed_dim: int = 4, *, seed: int = 0) -> np.ndarray:
    """The input ``plot_main`` feeds the models: a sine, noise and a few pulses.

    Returns
    -------
    ndarray ``[1, seq_len, embed_dim]``

    Examples
    --------
    >>> demo_input(16, 3).shape
    (1, 16, 3)
    """
    rng = np.random.default_rng(seed + 1)
    t = np.arange(seq_len)
    x = 0.3 * rng.standard_normal((1, seq_len, embed_dim))
    x[0, :, 0] += np.sin(2 * np.pi * t / 16.0)
    pulses = rng.choice(seq_len, size=max(1, seq_len // 16), replace=False)
    x[0, pulses, :] += 2.0
    return x


def _save(fig, out_png, dpi):
    fig.set_dpi(dpi)
    save_png(fig, out_png)
    return fig


def _plot_mamba(out_png, *, embed_dim=4, hidden_size=16, state_size=8, num_layers=2,
                preset="mamba_ssm", seq_len=64, layer=1, channels=None, seed=0, dpi=DPI):
    from ..models import mamba

    model = mamba.build(embed_dim=embed_dim, hidden_size=hidden_size, state_size=state_size,
                        num_layers=num_layers, preset=preset, seed=seed)
    x = demo_input(seq_len, embed_dim, seed=seed)
    return _save(plot_mamba_state_evolution(model, x, layer=layer, channels=channels), out_png,
                 dpi)


def _plot_s5(out_png, *, embed_dim=4, hidden_size=16, state_size=16, num_layers=2, seq_len=64,
             layer=1, part="real", seed=0, dpi=DPI):
    from ..models import s5

    model = s5.build(embed_dim=embed_dim, hidden_size=hidden_size, state_size=state_size,
                     num_layers=num_layers, seed=seed)
    x = demo_input(seq_len, embed_dim, seed=seed)
    return _save(plot_s5_state_evolution(model, x, layer=layer, part=part), out_png, dpi)


def _plot_gated_ssm(out_png, *, embed_dim=4, hidden_size=16, state_size=8, num_layers=2,
                    preset="causal", seq_len=64, layer=1, seed=0, dpi=DPI):
    from ..models import gated_ssm

    model = gated_ssm.build(embed_dim=embed_dim, hidden_size=hidden_size, state_size=state_size,
                            num_layers=num_layers, preset=preset, seed=seed)
    x = demo_input(seq_len, embed_dim, seed=seed)
    return _save(plot_gated_ssm_state_evolution(model, x, layer=layer), out_png, dpi)


def _plot_sst(out_png, *, embed_dim=4, hidden_size=16, state_size=8, num_layers=2, num_heads=2,
              head_dim=8, preset="mamba_ssm", seq_len=64, layer=1, channels=None, seed=0,
              dpi=DPI):
    from ..models import ss_transformer as sst

    model = sst.build(embed_dim=embed_dim, hidden_size=hidden_size, state_size=state_size,
                      num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
                      preset=preset, seed=seed)
    x = demo_input(seq_len, embed_dim, seed=seed)
    return _save(plot_sst_state_evolution(model, x, layer=layer, channels=channels), out_png,
                 dpi)


#: ``plot_main``'s architectures: name -> (drawing function, options it accepts).
ARCHITECTURES = {
    "scan": (_plot_scan, ("seq_len", "n_tokens", "seed", "dpi")),
    "mamba": (_plot_mamba, ("embed_dim", "hidden_size", "state_size", "num_layers", "preset",
                            "seq_len", "layer", "channels", "seed", "dpi")),
    "s5": (_plot_s5, ("embed_dim", "hidden_size", "state_size", "num_layers", "seq_len", "layer",
                      "part", "seed", "dpi")),
    "gated_ssm": (_plot_gated_ssm, ("embed_dim", "hidden_size", "state_size", "num_layers",
                                    "preset", "seq_len", "layer", "seed", "dpi")),
    "ss_transformer": (_plot_sst, ("embed_dim", "hidden_size", "state_size", "num_layers",
                                   "num_heads", "head_dim", "preset", "seq_len", "layer",
                                   "channels", "seed", "dpi")),
}


def plot_main(arch: str, out_png, **opts):
    """Draw the state evolution of ``arch`` to ``out_png`` (``refssm plot``).

    Parameters
    ----------
    arch : str
        What to draw (see :data:`ARCHITECTURES`), each freshly built with its
        default initialisation and fed :func:`demo_input` (a sine, noise and
        pulses):

        ``"scan"``
            the bare selective scan on a selective-copying input
            (:func:`selective_copy_demo`): input, ``delta``, the state's slots;
        ``"mamba"``
            one Mamba layer: the scan's input, ``delta`` and the states of
            the three busiest channels;
        ``"s5"``
            one S5 layer: its input and its complex MIMO state (real part);
        ``"gated_ssm"``
            one GatedSSM layer: the two gates and every channel's context;
        ``"ss_transformer"``
            one SSTransformer block: the SSM/attention gate, the SSM path's
            ``delta`` and state.
    out_png : str or Path
        Where to write the PNG (folders are created).
    **opts
        All optional. Every architecture: ``seq_len`` (64), ``seed`` (0),
        ``dpi`` (80). ``scan``: ``n_tokens`` (4). Models: ``embed_dim`` (4),
        ``hidden_size`` (16), ``state_size`` (8; S5: 16), ``num_layers`` (2),
        ``layer`` (1); ``preset`` (the model's default; not S5); ``channels``
        (mamba, ss_transformer: the three busiest); ``part`` (s5: "real",
        "imag" or "abs"); ``num_heads`` (2), ``head_dim`` (8) (ss_transformer).

    Returns
    -------
    Figure
        The figure written (already saved).

    Raises
    ------
    ValueError
        Unknown architecture or option.

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     fig = plot_main("scan", os.path.join(d, "scan.png"), seq_len=32)
    ...     os.path.getsize(os.path.join(d, "scan.png")) > 1000
    True
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}, got {arch!r}")
    func, allowed = ARCHITECTURES[arch]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"plot_main({arch!r}): unknown option(s) {unknown}; expected some of "
                         f"{list(allowed)}")
    return func(out_png, **opts)
