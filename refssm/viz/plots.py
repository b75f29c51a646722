r"""Plots of state-space models from arrays: each returns a :class:`~matplotlib.figure.Figure`.

Every figure has a title a learner can read, labelled axes, and a colour bar
with its quantity named wherever colour carries a number. The functions here
take plain arrays (one batch element, time on the first axis); the wrappers
in :mod:`refssm.viz.models` take a model and an input.

=============================  ====================================================
:func:`plot_state_evolution`   the state ``h[t, n]`` over time, one heatmap per
                               channel (optionally with the input and ``delta``)
:func:`plot_delta_vs_input`    the step size ``delta[t, c]`` against the input
:func:`plot_impulse_response`  impulse response of a diagonal SSM, continuous vs
                               discretised by ZOH / bilinear / Euler
:func:`plot_eigenvalues`       eigenvalues in the complex plane: continuous (left
                               half-plane) and discretised (unit disc)
:func:`plot_scan_tree`         the Blelloch parallel scan's up-sweep / down-sweep tree
:func:`plot_s5_kernel`         the S5 convolution kernel ``K_k`` over the lag ``k``
:func:`plot_gate_over_time`    the SSTransformer gate ``g[t, f]`` (1 = SSM, 0 = attention)
=============================  ====================================================
"""
from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.patches import Circle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ._figure import data_axes, new_figure  # noqa: F401  (data_axes: doctests)

__all__ = [
    "plot_state_evolution", "plot_delta_vs_input", "plot_impulse_response",
    "impulse_response", "continuous_impulse_response", "discretize_eigenvalues",
    "plot_eigenvalues", "blelloch_trace", "plot_scan_tree", "plot_s5_kernel",
    "plot_gate_over_time", "METHODS",
]

#: Discretisation rules the plots know, with the label used in legends.
METHODS = {
    "zoh": "ZOH  exp(ΔA)",
    "bilinear": "bilinear  (1+ΔA/2)/(1-ΔA/2)",
    "euler": "Euler  1+ΔA",
    "mamba": "Mamba  exp(ΔA), ΔB",
}


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def _array(x, name, ndims, *, allow_complex=False):
    a = np.asarray(x)
    if a.dtype.kind not in ("f", "i", "u") + (("c",) if allow_complex else ()):
        raise ValueError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    if a.ndim not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, ndims))} dimensions, "
                         f"got shape {a.shape}")
    return a


def _pick_channels(channels, n_channels, default=3):
    if channels is None:
        return list(range(min(default, n_channels)))
    if np.isscalar(channels):
        channels = [channels]
    out = [int(c) for c in channels]
    for c in out:
        if not 0 <= c < n_channels:
            raise ValueError(f"channels: expected indices in [0, {n_channels}), got {c}")
    if not out:
        raise ValueError("channels: expected at least one channel, got none")
    return out


def _log_y(ax, values):
    """Log y scale; plain tick labels (``0.02``) at 1, 2, 5 x 10^k when the data span < 100x."""
    ax.set_yscale("log")
    v = np.asarray(values)
    v = v[v > 0]
    if v.size and v.max() / v.min() < 100:
        subs = (1.0, 2.0, 5.0) if v.max() / v.min() >= 3 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
        ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _symmetric_limit(a):
    m = float(np.max(np.abs(a))) if a.size else 1.0
    return m if m > 0 else 1.0


def _plot_inputs(ax, inputs, t, title, labels=None, ylabel=None):
    """Line plot of ``inputs`` ``[seq_len]`` or ``[seq_len, k]`` (a heatmap when k > 8)."""
    _plot_inputs_body(ax, inputs, t, title, labels)
    if ylabel:
        ax.set_ylabel(ylabel)


def _plot_inputs_body(ax, inputs, t, title, labels=None):
    if inputs.ndim == 1 or inputs.shape[1] == 1:
        ax.plot(t, inputs.reshape(len(t)), color="k", lw=1.2,
                label=None if labels is None else labels[0])
        if labels is not None:
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel("input u[t]")
    elif inputs.shape[1] <= 8:
        if labels is None:
            labels = [f"u[t, {k}]" for k in range(inputs.shape[1])]
        for k in range(inputs.shape[1]):
            ax.plot(t, inputs[:, k], lw=1.0, label=labels[k])
        ax.legend(loc="upper right", fontsize=7, ncol=min(4, inputs.shape[1]))
        ax.set_ylabel("input u[t, k]")
    else:
        lim = _symmetric_limit(inputs)
        ax.imshow(inputs.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                  extent=(t[0] - 0.5, t[-1] + 0.5, -0.5, inputs.shape[1] - 0.5),
                  interpolation="nearest")
        ax.set_ylabel("input feature k")
    ax.set_xlabel("time step t")
    ax.set_title(title, fontsize=10)


# ---------------------------------------------------------------------------
# state evolution, delta
# ---------------------------------------------------------------------------

def plot_state_evolution(states, *, inputs=None, delta=None, gate=None, channels=None,
                         part="real", title=None, state_label="state index n",
                         input_labels=None, input_title="input", input_ylabel=None,
                         state_title="state of channel {c}", value_label="h[t, n]"):
    r"""Heatmaps of the state ``h[t, c, n]`` over time, one panel per channel.

    The picture of the recurrence ``h_t = A_bar_t * h_{t-1} + B_bar_t u_t``:
    time runs left to right, one row per state dimension ``n``, colour is
    the value (red positive, blue negative, white zero). Optional panels
    on top show the input and the step size ``delta`` that drove it.

    Parameters
    ----------
    states : ndarray ``[seq_len, state]`` or ``[seq_len, channels, state]``
        Real or complex (see ``part``). One batch element.
    inputs : ndarray ``[seq_len]`` or ``[seq_len, k]``, optional
        Drawn above the states.
    delta : ndarray ``[seq_len]`` or ``[seq_len, channels]``, optional
        Step size; drawn for the channels shown, on a log scale.
    gate : ndarray ``[seq_len]`` or ``[seq_len, features]``, optional
        A gate in ``[0, 1]`` (e.g. the SSTransformer's SSM share); its mean
        over features is drawn with the min..max band.
    channels : int or sequence of int, optional
        Which channels to draw (default: the first three).
    part : {"real", "imag", "abs"}
        What to draw of a complex state.
    title : str, optional
    state_label : str
        y-axis label of the heatmaps.
    input_labels : sequence of str, optional
        Legend labels of the input lines (default ``u[t, k]``).
    input_title, input_ylabel : str, optional
        Title and y label of the input panel.
    state_title : str
        Title of each state panel; ``{c}`` is replaced by the channel.
    value_label : str
        Label of the state colour bar.

    Returns
    -------
    Figure

    Examples
    --------
    >>> h = np.cumsum(np.random.default_rng(0).standard_normal((20, 2, 4)), axis=0)
    >>> fig = plot_state_evolution(h, inputs=np.ones(20))
    >>> data_axes(fig)[-1].get_xlabel()
    'time step t'
    """
    states = _array(states, "states", (2, 3), allow_complex=True)
    if states.ndim == 2:
        states = states[:, None, :]
    if part not in ("real", "imag", "abs"):
        raise ValueError(f"part: expected 'real', 'imag' or 'abs', got {part!r}")
    raw = states
    if np.iscomplexobj(states):
        states = {"real": np.real, "imag": np.imag, "abs": np.abs}[part](states)
    elif part == "abs":                  # a real state's abs part is |h|, as the title says
        states = np.abs(states)
    elif part == "imag":
        raise ValueError("part: expected 'real' or 'abs' for real states (their imaginary "
                         "part is 0), got 'imag'")
    seq_len, n_channels, n_state = states.shape
    chans = _pick_channels(channels, n_channels)
    t = np.arange(seq_len)
    panels = []
    if inputs is not None:
        inputs = _array(inputs, "inputs", (1, 2))
        if inputs.shape[0] != seq_len:
            raise ValueError(f"inputs: expected seq_len {seq_len} on axis 0, got {inputs.shape}")
        panels.append("inputs")
    if gate is not None:
        gate = _array(gate, "gate", (1, 2))
        if gate.ndim == 1:
            gate = gate[:, None]
        if gate.shape[0] != seq_len:
            raise ValueError(f"gate: expected seq_len {seq_len} on axis 0, got {gate.shape}")
        panels.append("gate")
    if delta is not None:
        delta = _array(delta, "delta", (1, 2))
        if delta.ndim == 1:
            delta = delta[:, None]
        if delta.shape[0] != seq_len:
            raise ValueError(f"delta: expected seq_len {seq_len} on axis 0, got {delta.shape}")
        if not (delta > 0).all():        # a log axis would drop them without a word
            raise ValueError("delta: expected every step size > 0 (it is drawn on a log "
                             f"scale), got min {np.min(delta):.3g}")
        panels.append("delta")
    panels += [("state", c) for c in chans]
    ratios = [0.7 if p in ("inputs", "delta", "gate") else 1.0 for p in panels]
    fig, axes = new_figure(len(panels), 1, sharex=True, height_ratios=ratios,
                           figsize=(8.0, 0.8 + 1.9 * len(panels)))
    for ax, p in zip(axes[:, 0], panels):
        if p == "inputs":
            _plot_inputs(ax, inputs, t, input_title, input_labels, input_ylabel)
        elif p == "delta":
            for c in chans:
                ax.plot(t, delta[:, c if delta.shape[1] > 1 else 0], lw=1.2,
                        label=f"channel {c}")
                if delta.shape[1] == 1:
                    break
            _log_y(ax, delta[:, chans] if delta.shape[1] > 1 else delta)
            ax.set_ylabel("step size Δ[t]")
            ax.set_xlabel("time step t")
            ax.set_title("Δ: large = forget the past and write the input, small = hold",
                         fontsize=10)
            if delta.shape[1] > 1 and len(chans) > 1:
                ax.legend(loc="upper right", fontsize=7, ncol=len(chans))
        elif p == "gate":
            ax.fill_between(t, gate.min(axis=1), gate.max(axis=1), color="0.85",
                            label="min .. max over features")
            ax.plot(t, gate.mean(axis=1), color="k", lw=1.2, label="mean over features")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("gate g[t]")
            ax.set_xlabel("time step t")
            ax.set_title("gate: 1 = SSM path, 0 = attention", fontsize=10)
            ax.legend(loc="upper right", fontsize=7, ncol=2)
        else:
            c = p[1]
            h = states[:, c, :]
            lim = _symmetric_limit(h)
            im = ax.imshow(h.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim,
                           vmax=lim, interpolation="nearest",
                           extent=(-0.5, seq_len - 0.5, -0.5, n_state - 0.5))
            fig.colorbar(im, ax=ax, label=value_label, pad=0.01)
            ax.set_ylabel(state_label)
            ax.set_xlabel("time step t")
            ax.set_title(state_title.replace("{c}", str(c))
                         + (f" ({part} part)" if np.iscomplexobj(raw) or part != "real" else ""),
                         fontsize=10)
    fig.suptitle(title or "State evolution: how each state dimension changes over time")
    return fig


def plot_delta_vs_input(delta, inputs, *, channels=None, relative=False, title=None):
    r"""The step size ``delta[t, c]`` against the input that produced it.

    In a selective SSM ``delta = softplus(dt_proj(x_t))`` depends on the
    input: where it is large, ``A_bar = exp(delta A)`` is near 0 (the state
    forgets and takes the input in); where it is small, ``A_bar`` is near 1
    (the state holds and ignores the input). Three panels: the input, every
    channel's ``delta`` as a heatmap (log colour scale) and a few channels as
    lines.

    Parameters
    ----------
    delta : ndarray ``[seq_len, channels]`` (or ``[seq_len]``), every value > 0
    inputs : ndarray ``[seq_len]`` or ``[seq_len, k]``
    channels : int or sequence of int, optional
        Channels drawn as lines (default: the three whose ``delta`` varies
        most over time, relative to its median).
    relative : bool
        Colour the heatmap by ``delta / median_t(delta)`` per channel, so the
        changes over time show instead of the channels' different typical
        step sizes (an untrained model's ``dt_proj`` bias spreads those over
        two decades).
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> d = np.exp(np.random.default_rng(0).uniform(-5, -1, (30, 6)))
    >>> fig = plot_delta_vs_input(d, np.sin(np.arange(30.0)))
    >>> [ax.get_ylabel() for ax in fig.axes[:3]]
    ['input u[t]', 'channel c', 'step size Δ[t, c]']
    """
    delta = _array(delta, "delta", (1, 2))
    if delta.ndim == 1:
        delta = delta[:, None]
    if np.any(delta <= 0):
        raise ValueError("delta: expected every step size > 0 (it is drawn on a log scale)")
    inputs = _array(inputs, "inputs", (1, 2))
    seq_len, n_channels = delta.shape
    if inputs.shape[0] != seq_len:
        raise ValueError(f"inputs: expected seq_len {seq_len} on axis 0, got {inputs.shape}")
    ratio = delta / np.median(delta, axis=0, keepdims=True)
    if channels is None:
        spread = np.max(np.abs(np.log(ratio)), axis=0)
        channels = sorted(np.argsort(spread)[::-1][:min(3, n_channels)].tolist())
    chans = _pick_channels(channels, n_channels)
    t = np.arange(seq_len)
    fig, axes = new_figure(3, 1, sharex=True, height_ratios=[0.8, 1.0, 0.9],
                           figsize=(8.0, 6.6))
    _plot_inputs(axes[0, 0], inputs, t, "input")
    ax = axes[1, 0]
    if relative:
        m = float(np.max(np.abs(np.log(ratio)))) or 1.0
        shown, norm, cmap = ratio, LogNorm(vmin=np.exp(-m), vmax=np.exp(m)), "PuOr_r"
        what, cbar = "relative to its median over time", "Δ / median Δ (log scale)"
    else:
        shown, cmap = delta, "viridis"
        norm = LogNorm(vmin=float(delta.min()), vmax=float(delta.max()))
        what, cbar = "of every channel", "Δ (log scale)"
    im = ax.imshow(shown.T, aspect="auto", origin="lower", cmap=cmap, norm=norm,
                   interpolation="nearest", extent=(-0.5, seq_len - 0.5, -0.5, n_channels - 0.5))
    fig.colorbar(im, ax=ax, label=cbar, pad=0.01)
    ax.set_ylabel("channel c")
    ax.set_xlabel("time step t")
    ax.set_title(f"step size Δ[t, c] {what}", fontsize=10)
    ax = axes[2, 0]
    for c in chans:
        ax.plot(t, delta[:, c], lw=1.2, label=f"channel {c}")
    _log_y(ax, delta[:, chans])
    ax.set_ylabel("step size Δ[t, c]")
    ax.set_xlabel("time step t")
    ax.set_title("Δ of a few channels (large: forget and write; small: hold)", fontsize=10)
    ax.legend(loc="upper right", fontsize=7, ncol=len(chans))
    fig.suptitle(title or "Selection: the step size Δ follows the input")
    return fig


# ---------------------------------------------------------------------------
# discretisation: impulse responses and eigenvalues
# ---------------------------------------------------------------------------

def _discretize(A, B, delta, method):
    from ..ssm.discretize import bilinear, euler, zoh
    if method == "zoh":
        return zoh(A, B, delta)
    if method == "bilinear":
        return bilinear(A, B, delta)
    if method == "euler":
        return euler(A, B, delta)
    if method == "mamba":
        A_bar = zoh(A, B, delta)[0]
        return A_bar, np.asarray(delta) * B
    raise ValueError(f"method: expected one of {tuple(METHODS)}, got {method!r}")


def _diag_system(A, B, C):
    A = _array(A, "A", (1,), allow_complex=True).astype(np.complex128 if np.iscomplexobj(A)
                                                          else np.float64)
    N = A.shape[0]
    B = np.broadcast_to(np.asarray(B, dtype=np.result_type(B, np.float64)), (N,))
    C = np.broadcast_to(np.asarray(C, dtype=np.result_type(C, np.float64)), (N,))
    return A, B, C


def impulse_response(A, B, C, delta, steps: int, method: str = "zoh") -> np.ndarray:
    r"""Response of the discretised diagonal SSM to a unit impulse at ``t = 0``.

    With ``h_k = A_bar h_{k-1} + B_bar u_k``, ``y_k = Re(C . h_k)`` and
    ``u = (1, 0, 0, ...)``: ``y_k = Re(sum_n C_n A_bar_n^k B_bar_n)``
    (the convolution kernel of the LTI system, S4's ``K_k``).

    Parameters
    ----------
    A, B, C : ndarray ``[N]``
        Diagonal continuous system (real or complex; ``B``, ``C`` broadcast).
    delta : float
        Step size, > 0.
    steps : int
    method : {"zoh", "bilinear", "euler", "mamba"}

    Returns
    -------
    y : ndarray ``[steps]`` (real)

    Examples
    --------
    >>> impulse_response(np.array([-1.0]), 1.0, 1.0, 0.5, 3, "euler")
    array([0.5  , 0.25 , 0.125])
    """
    A, B, C = _diag_system(A, B, C)
    A_bar, B_bar = _discretize(A, B, delta, method)
    k = np.arange(int(steps))[:, None]
    return np.real(np.sum(C * A_bar ** k * B_bar, axis=-1))


def continuous_impulse_response(A, B, C, t) -> np.ndarray:
    r"""``h(t) = Re(C e^{tA} B)`` of the continuous diagonal SSM, at times ``t``.

    Examples
    --------
    >>> continuous_impulse_response(np.array([-1.0]), 1.0, 1.0, np.array([0.0, 1.0]))
    array([1.        , 0.36787944])
    """
    A, B, C = _diag_system(A, B, C)
    t = np.asarray(t, dtype=np.float64)[..., None]
    return np.real(np.sum(C * np.exp(t * A) * B, axis=-1))


def plot_impulse_response(A, B, C, delta, *, steps=None, methods=("zoh", "bilinear", "euler"),
                          title=None):
    r"""Impulse response of a diagonal SSM: continuous, and discretised by each rule.

    The continuous response ``h(t) = Re(C e^{tA} B)`` is drawn as a line; each
    rule's discrete response ``y_k / delta`` (the response to a unit-area
    pulse) as markers at ``t = k delta``. At small ``delta * A`` the rules
    agree with each other and with the line; at large ``delta * A`` they part.

    Parameters
    ----------
    A, B, C : ndarray ``[N]``
        Diagonal continuous system (real or complex).
    delta : float
    steps : int, optional
        Number of discrete steps (default: until ``t = 5 / min |Re A|``, at most 200).
    methods : sequence of {"zoh", "bilinear", "euler", "mamba"}
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> fig = plot_impulse_response(np.array([-1.0, -3.0]), 1.0, 1.0, 0.3)
    >>> fig.axes[0].get_xlabel()
    'time t (seconds of the continuous system)'
    """
    A, B, C = _diag_system(A, B, C)
    delta = float(delta)
    if steps is None:
        slowest = float(np.min(np.abs(np.real(A)))) or 1.0
        steps = int(min(200, max(10, np.ceil(5.0 / slowest / delta))))
    fig, axes = new_figure(1, 1, figsize=(8.0, 3.6))
    ax = axes[0, 0]
    t_fine = np.linspace(0.0, steps * delta, 400)
    h = continuous_impulse_response(A, B, C, t_fine)
    ax.plot(t_fine, h, color="k", lw=2, label="continuous  Re(C exp(tA) B)")
    lo, hi = float(min(h.min(), 0.0)), float(max(h.max(), 0.0))
    pad = 0.5 * (hi - lo) or 1.0
    lo, hi = lo - pad, hi + pad
    markers = {"zoh": "o", "bilinear": "s", "euler": "^", "mamba": "x"}
    for m in methods:
        y = impulse_response(A, B, C, delta, steps, m) / delta
        label = METHODS.get(m, m)
        if np.any((y < lo) | (y > hi)):
            label += "  (leaves the plot: unstable)" if np.abs(y[-1]) > np.abs(y[0]) else \
                "  (partly off the plot)"
        ax.plot(np.arange(steps) * delta, y, ls="none", marker=markers.get(m, "."), ms=4,
                label=label)
    ax.set_ylim(lo, hi)
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xlabel("time t (seconds of the continuous system)")
    ax.set_ylabel("response to a unit impulse")
    ax.legend(fontsize=8)
    fig.suptitle(title or f"Impulse response: continuous vs discretised at Δ = {delta:g}")
    return fig


def discretize_eigenvalues(eigenvalues, delta, method: str) -> np.ndarray:
    r"""Where a rule sends continuous eigenvalues ``lambda`` for step ``delta``.

    ZOH ``exp(delta lambda)``, bilinear ``(1 + delta lambda/2) / (1 - delta
    lambda/2)``, Euler ``1 + delta lambda`` (``mamba`` is ZOH for ``A``).

    Examples
    --------
    >>> discretize_eigenvalues(np.array([-1.0]), 3.0, "euler")
    array([-2.])
    """
    lam = np.asarray(eigenvalues)
    lam = lam.astype(np.complex128 if np.iscomplexobj(lam) else np.float64)
    return _discretize(lam, np.ones(lam.shape), delta, method)[0]


def plot_eigenvalues(A, delta=None, *, methods=("zoh", "bilinear", "euler"), title=None):
    r"""Eigenvalues in the complex plane: continuous, and after discretisation.

    Left: the continuous eigenvalues ``lambda`` of ``A``, stable when
    ``Re(lambda) < 0`` (left of the dashed line). Right (if ``delta`` is
    given): the discrete ``A_bar`` eigenvalues of each rule, stable when
    inside the unit circle. ZOH and bilinear map the whole left half-plane
    into the disc; Euler's ``1 + delta lambda`` leaves it once
    ``|1 + delta lambda| > 1`` (e.g. real ``delta lambda < -2``).

    Parameters
    ----------
    A : ndarray ``[N]`` (the diagonal) or ``[N, N]`` (dense; eigenvalues computed)
    delta : float or ndarray ``[N]``, optional
        Step size (one per eigenvalue allowed, as S5's per-state step).
    methods : sequence of {"zoh", "bilinear", "euler"}
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> fig = plot_eigenvalues(np.array([-0.5 + 1j, -0.5 - 1j, -2.0]), 0.5)
    >>> [ax.get_xlabel() for ax in fig.axes]
    ['Re(λ)', 'Re(λ̄)']
    """
    A = _array(A, "A", (1, 2), allow_complex=True)
    if A.ndim == 2:
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"A: expected a square matrix or its diagonal, got shape {A.shape}")
        lam = np.linalg.eigvals(A.astype(np.result_type(A, np.float64)))
    else:
        lam = A.astype(np.complex128)
    lam = np.asarray(lam, dtype=np.complex128)
    ncols = 1 if delta is None else 2
    fig, axes = new_figure(1, ncols, figsize=(4.2 * ncols, 4.0))
    ax = axes[0, 0]
    ax.scatter(lam.real, lam.imag, s=18, color="k", zorder=3, label="λ (continuous)")
    ax.axvline(0.0, color="r", ls="--", lw=1, label="Re λ = 0 (stability edge)")
    ax.axhline(0.0, color="0.8", lw=0.8)
    ax.set_xlabel("Re(λ)")
    ax.set_ylabel("Im(λ)")
    ax.set_title("continuous: stable if Re λ < 0", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    if delta is not None:
        ax = axes[0, 1]
        ax.add_patch(Circle((0, 0), 1.0, fill=False, color="r", ls="--", lw=1,
                            label="unit circle (stability edge)"))
        markers = {"zoh": "o", "bilinear": "s", "euler": "^", "mamba": "x"}
        pts = [np.array([1.0 + 0j, -1.0 + 0j])]
        for m in methods:
            z = np.asarray(discretize_eigenvalues(lam, delta, m), dtype=np.complex128)
            pts.append(z)
            ax.scatter(z.real, z.imag, s=18, marker=markers.get(m, "."), label=METHODS.get(m, m),
                       zorder=3, alpha=0.8)
        allp = np.concatenate(pts)
        lim = 1.08 * max(1.0, float(np.max(np.abs(allp.real))), float(np.max(np.abs(allp.imag))))
        lim = min(lim, 2.5)                       # keep the unit circle readable
        outside = int(np.sum(np.maximum(np.abs(allp.real), np.abs(allp.imag)) > lim))
        if outside:
            ax.text(0.98, 0.98, f"{outside} point(s) beyond the view", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, color="0.3")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axhline(0.0, color="0.8", lw=0.8)
        ax.axvline(0.0, color="0.8", lw=0.8)
        ax.set_xlabel("Re(λ̄)")
        ax.set_ylabel("Im(λ̄)")
        dtxt = f"Δ = {float(delta):g}" if np.ndim(delta) == 0 else "per-state Δ"
        ax.set_title(f"discrete ({dtxt}): stable if |λ̄| < 1", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title or "Eigenvalues of the state matrix in the complex plane")
    return fig


# ---------------------------------------------------------------------------
# the parallel scan's tree
# ---------------------------------------------------------------------------

def _combine_interval(x, y):
    """Symbolic ``x o y`` on intervals ``(i, j)`` = ``x_i o ... o x_j``; ``None`` = identity."""
    if x is None:
        return y
    if y is None:
        return x
    if x[1] + 1 != y[0]:
        raise AssertionError(f"combining non-adjacent intervals {x} and {y}")
    return (x[0], y[1])


def _interval_label(x):
    if x is None:
        return "I"
    return f"x{x[0]}" if x[0] == x[1] else f"{x[0]}:{x[1]}"


def blelloch_trace(seq_len: int):
    """Symbolic run of the Blelloch scan: what every buffer row holds after every level.

    Each element is an interval ``(i, j)`` meaning ``x_i o x_{i+1} o ... o
    x_j`` (the combined effect of steps ``i..j``), ``None`` the identity
    ``I = (1, 0)``; rows ``>= seq_len`` are padding (``I``) up to the next
    power of two. The schedule is the one of
    :mod:`refssm.scan.numba_logdepth` (Blelloch 1990, section 1.3).

    Parameters
    ----------
    seq_len : int, >= 1

    Returns
    -------
    levels : list of dict
        ``{"phase": "input" | "up-sweep" | "clear root" | "down-sweep",
        "d": int, "rows": list, "edges": list of (src, dst, kind)}``;
        ``kind`` is ``"combine"`` (``dst`` becomes ``src o dst`` or, down,
        ``dst o src``) or ``"copy"``.
    total : tuple
        The interval of the whole sequence ``(0, seq_len - 1)``.

    Examples
    --------
    >>> levels, total = blelloch_trace(4)
    >>> [lv["phase"] for lv in levels]
    ['input', 'up-sweep', 'up-sweep', 'clear root', 'down-sweep', 'down-sweep']
    >>> levels[-1]["rows"]                   # exclusive prefixes: row t holds [0 : t-1]
    [None, (0, 0), (0, 1), (0, 2)]
    """
    seq_len = int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
    Lp = 1
    while Lp < seq_len:
        Lp *= 2
    rows = [(t, t) if t < seq_len else None for t in range(Lp)]
    levels = [dict(phase="input", d=0, rows=list(rows), edges=[])]
    d = 1
    while d < Lp:
        edges = []
        for i in range(2 * d - 1, Lp, 2 * d):
            j = i - d
            rows[i] = _combine_interval(rows[j], rows[i])
            edges += [(j, i, "combine"), (i, i, "combine")]
        levels.append(dict(phase="up-sweep", d=d, rows=list(rows), edges=edges))
        d *= 2
    total = rows[Lp - 1]
    rows[Lp - 1] = None
    levels.append(dict(phase="clear root", d=Lp, rows=list(rows), edges=[]))
    d = Lp // 2
    while d >= 1:
        edges = []
        for i in range(2 * d - 1, Lp, 2 * d):
            j = i - d
            left = rows[j]
            rows[j] = rows[i]                              # left child: the parent's prefix
            rows[i] = _combine_interval(rows[i], left)     # right: prefix o left total
            edges += [(i, j, "copy"), (i, i, "combine"), (j, i, "combine")]
        levels.append(dict(phase="down-sweep", d=d, rows=list(rows), edges=edges))
        d //= 2
    return levels, total


def plot_scan_tree(seq_len: int = 8, *, title=None):
    r"""The Blelloch parallel scan as a picture: which rows combine at every level.

    Rows of the figure are the levels of the algorithm, top to bottom (input,
    up-sweep ``d = 1, 2, 4, ...``, clearing the root to the identity ``I``,
    down-sweep ``d = ..., 2, 1``); columns are positions ``t`` of the buffer.
    A box reads ``i:j`` for ``x_i o ... o x_j`` (the effect of steps ``i`` to
    ``j``; ``x_t`` is the step ``(a_t, b_t)``). Solid lines are combines, dashed
    grey lines copies; highlighted boxes changed at that level. Every level's
    combines are independent: ``2 log2 L`` levels, ``2 (L - 1)`` combines.

    Parameters
    ----------
    seq_len : int
        1 to 32 (the labels get crowded beyond 16).
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> fig = plot_scan_tree(8)
    >>> fig.axes[0].get_xlabel()
    'position t in the buffer'
    """
    seq_len = int(seq_len)
    if not 1 <= seq_len <= 32:
        raise ValueError(f"seq_len: expected 1 to 32 (a readable tree), got {seq_len}")
    levels, _ = blelloch_trace(seq_len)
    Lp = len(levels[0]["rows"])
    n = len(levels)
    fig, axes = new_figure(1, 1, figsize=(max(6.0, 0.75 * Lp + 2.2), 0.9 + 0.55 * n))
    ax = axes[0, 0]
    colors = {"up-sweep": "tab:blue", "down-sweep": "tab:orange"}
    for k, lv in enumerate(levels):
        y = -k
        if k > 0:
            for src, dst, kind in lv["edges"]:
                if kind == "copy":
                    ax.plot([src, dst], [y + 1, y], color="0.5", ls="--", lw=1.0, zorder=1)
                else:
                    ax.plot([src, dst], [y + 1, y], color=colors[lv["phase"]], lw=1.4, zorder=1)
        changed = {dst for _, dst, _ in lv["edges"]}
        if lv["phase"] == "clear root":
            changed = {Lp - 1}
        for t, x in enumerate(lv["rows"]):
            face = "white"
            if t in changed:
                face = {"up-sweep": "#cfe2f3", "down-sweep": "#fde2c4",
                        "clear root": "#eeeeee"}.get(lv["phase"], "white")
            style = "italic" if t >= seq_len and lv["phase"] == "input" else "normal"
            ax.text(t, y, _interval_label(x), ha="center", va="center", fontsize=8,
                    fontstyle=style, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.25", fc=face, ec="0.4", lw=0.6))
    ax.set_yticks([-k for k in range(n)])
    names = []
    for lv in levels:
        if lv["phase"] in ("up-sweep", "down-sweep"):
            names.append(f"{lv['phase']} d={lv['d']}")
        else:
            names.append(lv["phase"])
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xticks(range(Lp))
    ax.set_xlim(-0.7, Lp - 0.3)
    ax.set_ylim(-n + 0.4, 0.6)
    ax.set_xlabel("position t in the buffer")
    ax.set_ylabel("level (time flows down)")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    pad = f" (padded to {Lp} with the identity I)" if Lp != seq_len else ""
    fig.suptitle(title or f"Blelloch scan of L = {seq_len}{pad}: up-sweep, then down-sweep;"
                 f"\nlast row: exclusive prefixes, row t = x0 o ... o x(t-1) = h[t-1]",
                 fontsize=11)
    return fig


# ---------------------------------------------------------------------------
# S5 kernel, SSTransformer gate
# ---------------------------------------------------------------------------

def plot_s5_kernel(kernel, *, input_feature: int = 0, outputs=None, title=None):
    r"""The convolution kernel of an LTI SSM over the lag ``k``.

    For S5, ``K_k = Re(C_tilde Lambda_bar^k B_bar)`` is an ``H x H`` matrix per
    lag (``y_t = sum_k K_k u_{t-k} + D u_t``). Left/top: the column of input
    feature ``input_feature`` (how that input reaches every output, over the
    lag) as a heatmap; bottom: a few entries as lines and the size
    ``||K_k||_F`` of the whole matrix per lag, on a log scale: how fast the
    system forgets.

    Parameters
    ----------
    kernel : ndarray ``[L, H_out, H_in]`` (MIMO, S5), ``[L, H]`` (one
        kernel per feature, S4D) or ``[L]`` (one kernel)
    input_feature : int
        Which input column of a MIMO kernel to draw.
    outputs : sequence of int, optional
        Output features drawn as lines (default: the first three).
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> k = np.arange(40.0)
    >>> K = np.exp(-0.1 * k)[:, None, None] * np.ones((1, 3, 3))
    >>> fig = plot_s5_kernel(K)
    >>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
    ('lag k (time steps back)', 'output feature h')
    """
    K = _array(kernel, "kernel", (1, 2, 3))
    if K.ndim == 1:
        K2 = K[:, None]
        size = np.abs(K)
    elif K.ndim == 2:
        K2 = K
        size = np.sqrt(np.sum(K ** 2, axis=1))
    else:
        if not 0 <= input_feature < K.shape[2]:
            raise ValueError(f"input_feature: expected 0 <= j < {K.shape[2]}, got {input_feature}")
        K2 = K[:, :, input_feature]
        size = np.sqrt(np.sum(K ** 2, axis=(1, 2)))
    L, H = K2.shape
    outs = _pick_channels(outputs, H)
    lags = np.arange(L)
    fig, axes = new_figure(2, 1, sharex=True, figsize=(8.0, 5.6), height_ratios=[1.0, 1.0])
    ax = axes[0, 0]
    lim = _symmetric_limit(K2)
    im = ax.imshow(K2.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                   interpolation="nearest", extent=(-0.5, L - 0.5, -0.5, H - 0.5))
    fig.colorbar(im, ax=ax, label="K_k[h, j]", pad=0.01)
    ax.set_xlabel("lag k (time steps back)")
    ax.set_ylabel("output feature h")
    col = f"input feature j = {input_feature}" if K.ndim == 3 else "every feature"
    ax.set_title(f"kernel entries K_k[h, j], {col}", fontsize=10)
    ax = axes[1, 0]
    for h in outs:
        ax.plot(lags, K2[:, h], lw=1.1, label=f"K_k[{h}, {input_feature}]" if K.ndim == 3
                else f"feature {h}")
    ax.set_xlabel("lag k (time steps back)")
    ax.set_ylabel("kernel value")
    ax2 = ax.twinx()
    zeros = bool((size <= 0).any())      # exact zeros have no place on a log axis: not drawn
    ax2.plot(lags, np.where(size > 0, size, np.nan), color="k", ls="--", lw=1.2,
             label="‖K_k‖ (right axis)" + ("; exact zeros not drawn" if zeros else ""))
    if (size > 0).any():
        ax2.set_yscale("log")
    ax2.set_ylabel("‖K_k‖ (log scale)")
    ax2.set_xlabel("lag k (time steps back)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    ax.set_title("a few entries, and the size of the whole kernel per lag", fontsize=10)
    fig.suptitle(title or "Convolution kernel: y_t = Σ_k K_k u_(t-k) + D u_t")
    return fig


def plot_gate_over_time(gate, *, inputs=None, title=None):
    r"""The SSTransformer's gate ``g[t, f]`` over time: 1 = SSM path, 0 = attention.

    ``x = x + g * ssm + (1 - g) * attention`` per feature. Top (optional): the
    input; middle: ``g`` for every feature; bottom: the mean gate over
    features, i.e. the share of the SSM path at each step.

    Parameters
    ----------
    gate : ndarray ``[seq_len, features]``, values in ``[0, 1]``
    inputs : ndarray ``[seq_len]`` or ``[seq_len, k]``, optional
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> g = 1 / (1 + np.exp(-np.random.default_rng(0).standard_normal((25, 8))))
    >>> fig = plot_gate_over_time(g)
    >>> data_axes(fig)[-1].get_ylabel()
    'mean gate (SSM share)'
    """
    g = _array(gate, "gate", (1, 2))
    if g.ndim == 1:
        g = g[:, None]
    if np.any(g < 0) or np.any(g > 1):
        raise ValueError("gate: expected values in [0, 1] (a sigmoid)")
    seq_len, F = g.shape
    t = np.arange(seq_len)
    panels = (["inputs"] if inputs is not None else []) + ["heat", "mean"]
    ratios = [0.7 if p == "inputs" else 1.0 for p in panels]
    fig, axes = new_figure(len(panels), 1, sharex=True, height_ratios=ratios,
                           figsize=(8.0, 0.8 + 2.0 * len(panels)))
    axs = list(axes[:, 0])
    if inputs is not None:
        inputs = _array(inputs, "inputs", (1, 2))
        if inputs.shape[0] != seq_len:
            raise ValueError(f"inputs: expected seq_len {seq_len} on axis 0, got {inputs.shape}")
        _plot_inputs(axs.pop(0), inputs, t, "input")
    ax = axs[0]
    im = ax.imshow(g.T, aspect="auto", origin="lower", cmap="coolwarm", vmin=0.0, vmax=1.0,
                   interpolation="nearest", extent=(-0.5, seq_len - 0.5, -0.5, F - 0.5))
    fig.colorbar(im, ax=ax, label="g (1 = SSM, 0 = attention)", pad=0.01)
    ax.set_ylabel("feature f")
    ax.set_xlabel("time step t")
    ax.set_title("gate g[t, f] per feature", fontsize=10)
    ax = axs[1]
    ax.plot(t, g.mean(axis=1), color="k", lw=1.4, label="mean over features")
    ax.fill_between(t, g.min(axis=1), g.max(axis=1), color="0.85", label="min .. max")
    ax.axhline(0.5, color="0.5", ls=":", lw=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("mean gate (SSM share)")
    ax.set_xlabel("time step t")
    ax.set_title("how much of the update comes from the SSM path", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "Gate between the SSM path and attention, over time")
    return fig
