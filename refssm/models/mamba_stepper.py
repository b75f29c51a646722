"""Mamba's ``step`` as one compiled function: the Numba step engine.

:func:`refssm.models.mamba.step` is the readable NumPy step (the ground
truth): per frame it validates every parameter and runs some thirty NumPy
calls per block. For real-time use (one frame every 16 ms at 60 fps, or many
frames per second on a CPU) :func:`make_stepper` packs the parameters once,
validated, into contiguous per-layer stacks, and every frame then runs one
``@njit`` function over them::

    x  = input_projection(frame)                     (if embed_dim != hidden)
    for each block:
        u      = norm(x)                             LayerNorm or RMSNorm
        xs, z  = in_proj(u)                          [2E]
        xs     = silu(conv_step(buffer, xs))         depthwise, window conv_size
        dt, B, C = x_proj(xs)                        (or Edifice's dt_rank, bc_proj)
        delta  = clip(softplus(dt_proj(dt) + bias))  (clip: Edifice)
        dtB    = delta, or mean_e delta              (Edifice's channel mean)
        h      = exp(delta A) h + dtB B xs           eq. 2a, per channel
        y      = (C . h + D xs) silu(z)              eq. 2b and the gate
        x      = x + out_proj(y)
    final_norm(x)                                    (if any)

The state update of each channel is the fused scan's vector step
(:func:`refssm.scan.numba_seq` ``_forward_step``: ``fexp``, <= 1 ulp);
softplus and sigmoid are :mod:`refssm.scan._fastexp`'s (<= 3 ulp). So the
stepper agrees with :func:`~refssm.models.mamba.step` to round-off, not to the
bit (``tests/test_mamba.py``: <= 1e-12 normwise over 200 frames, both presets).

Where the time goes: a frame must read every weight once. At the recommended
defaults (``embed_dim`` 287, hidden 256, 2 layers) that is 0.95 M parameters,
7.6 MB in float64 (3.8 MB in float32), more than the per-core caches, so a
frame is bound by the last-level cache's bandwidth: on this machine NumPy's
own matrix-vector products alone take ~110 us (float64) / ~60 us (float32)
per frame. ``dtype=np.float32`` packs the weights in float32 (state and
arithmetic in float32 too).

The stepper snapshots the parameters: later changes to the ``params`` dict
do not reach it (make a new one).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .._validate import as_float_array
from ..scan import numba_seq as _ns
from ..scan._fastexp import _fsigmoid_scalar, _fsoftplus_scalar, check_fingerprint, deps_fingerprint
from ..scan.numba_seq import _forward_step
from ._common import check_params

#: Fingerprint of the code from other files inlined into the cached kernel below
#: (``fexp``/softplus/sigmoid and the fused scan's vector step): Numba keys the
#: cache on this file only, so a change there must come with a change here.
_DEPS_FINGERPRINT = "b8281b0c67447cfd84567fbedecaad038979c0d72d874a67cce337b75efab4b7"
check_fingerprint(__name__, _DEPS_FINGERPRINT, deps_fingerprint(
    _ns._forward_step_body, _ns._vector_loop_codegen, _ns._loop_intrinsic, _ns._check_loop_args,
    _ns._halving_sum))

__all__ = ["MambaStepper", "make_stepper"]


@njit(inline="always")
def _gemv(x, W, b, y):
    """``y = x @ W + b``: ``x [n]``, ``W [n, m]`` (rows contiguous), ``b, y [m]``."""
    m = y.shape[0]
    for j in range(m):
        y[j] = b[j]
    for i in range(x.shape[0]):
        xi = x[i]
        for j in range(m):
            y[j] += xi * W[i, j]


@njit(inline="always")
def _norm(x, g, beta, layer, eps, out):
    """LayerNorm (``layer``) or RMSNorm of ``x [H]`` into ``out [H]``."""
    H = x.shape[0]
    mean = 0.0
    if layer:
        for i in range(H):
            mean += x[i]
        mean /= H
    var = 0.0
    for i in range(H):
        d = x[i] - mean
        var += d * d
    if not np.isfinite(var):      # x * x overflowed: rstd would be 0, out = beta (wrong)
        raise ValueError("norm: expected a finite variance / mean square of a norm's input "
                         "features, got inf or NaN (computed in float64: features near "
                         "1e154 overflow x * x)")
    rstd = 1.0 / np.sqrt(var / H + eps)
    for i in range(H):
        out[i] = (x[i] - mean) * rstd * g[i] + beta[i]


@njit(cache=True)
def _step_kernel(frame, in0_w, in0_b, has_in0, norm_g, norm_b, layer_norm, eps,
                 in_w, in_b, conv_w, conv_b, xp_w, xp_b, dt_w, dt_b, A, D, out_w, out_b,
                 fin_g, fin_b, has_final, lo, hi, b_mean, R, N,
                 conv_in, h_in, y_out, conv_out, h_out):
    """One frame for every batch row; see the module docstring for the equations."""
    batch = frame.shape[0]
    n_layers, H = norm_g.shape
    E = conv_w.shape[2]
    K = conv_w.shape[1]
    dtype = frame.dtype
    x = np.empty(H, dtype)
    u = np.empty(H, dtype)
    xz = np.empty(2 * E, dtype)
    xs = np.empty(E, dtype)
    xdbl = np.empty(xp_w.shape[2], dtype)
    delta = np.empty(E, dtype)
    y = np.empty(E, dtype)
    o = np.empty(H, dtype)
    dtB = np.empty(E, dtype)
    Bv = np.empty(N, dtype)
    Cv = np.empty(N, dtype)
    Af = A.reshape(-1)
    for b in range(batch):
        if has_in0:
            _gemv(frame[b], in0_w, in0_b, x)
        else:
            x[:] = frame[b]
        for ly in range(n_layers):
            _norm(x, norm_g[ly], norm_b[ly], layer_norm, eps, u)
            _gemv(u, in_w[ly], in_b[ly], xz)
            # causal depthwise conv over [buffer (K-1 frames); xs], then silu
            for e in range(E):
                acc = 0.0
                for k in range(K - 1):
                    acc += conv_w[ly, k, e] * conv_in[b, ly, k, e]
                acc += conv_w[ly, K - 1, e] * xz[e]
                v = acc + conv_b[ly, e]
                xs[e] = v * _fsigmoid_scalar(v)
            for k in range(K - 2):
                conv_out[b, ly, k, :] = conv_in[b, ly, k + 1, :]
            if K > 1:
                conv_out[b, ly, K - 2, :] = xz[:E]
            # projections: [dt (R); B (N); C (N)], then delta = clip(softplus(dt_proj(dt)))
            _gemv(xs, xp_w[ly], xp_b[ly], xdbl)
            _gemv(xdbl[:R], dt_w[ly], dt_b[ly], delta)
            dmean = 0.0
            for e in range(E):
                d = _fsoftplus_scalar(delta[e])
                d = lo if d < lo else d
                d = hi if d > hi else d
                delta[e] = d
                dmean += d
            dmean /= E
            for e in range(E):
                dtB[e] = dmean if b_mean else delta[e]
            Bv[:] = xdbl[R:R + N]
            Cv[:] = xdbl[R + N:R + 2 * N]
            # the recurrence, channel by channel, in the state h_out[b, ly] (eq. 2a, 2b)
            h_out[b, ly] = h_in[b, ly]
            hf = h_out[b, ly].reshape(-1)
            for e in range(E):
                yc = _forward_step(hf, e * N, Af, (ly * E + e) * N, Bv, 0, Cv, 0,
                                   delta[e], dtB[e] * xs[e], N)
                zv = xz[E + e]
                y[e] = (yc + D[ly, e] * xs[e]) * (zv * _fsigmoid_scalar(zv))
            _gemv(y, out_w[ly], out_b[ly], o)
            for i in range(H):
                x[i] += o[i]
        if has_final:
            _norm(x, fin_g, fin_b, layer_norm, eps, u)
            y_out[b] = u
        else:
            y_out[b] = x


class MambaStepper:
    """A Mamba model's :func:`~refssm.models.mamba.step`, compiled; from :func:`make_stepper`.

    ``y, cache = stepper.step(cache, frame)`` (or ``stepper(cache, frame)``)
    has :func:`refssm.models.mamba.step`'s arguments and results.
    """

    def __init__(self, config, packed: dict, dtype):
        self.config = config
        self.dtype = np.dtype(dtype)
        self._p = packed

    def step(self, cache, frame):
        """Advance by one frame: ``frame [batch, embed_dim]`` -> ``y [batch, hidden]``, new cache.

        Raises
        ------
        ValueError
            A frame of the wrong shape, non-finite values, a cache from another config.
        """
        from .mamba import MambaCache, _check_cache

        c = self.config
        frame = as_float_array(frame, "frame", ndim=2)
        if frame.shape[1] != c.embed_dim:
            raise ValueError(f"frame: expected shape (batch, {c.embed_dim}) [batch, embed_dim], "
                             f"got {frame.shape}")
        cache = _check_cache(cache, c, frame.shape[0])
        dt = self.dtype
        frame = np.ascontiguousarray(frame, dtype=dt)
        h_in = np.ascontiguousarray(cache.h, dtype=dt)
        conv_in = np.ascontiguousarray(cache.conv, dtype=dt)
        y = np.empty((frame.shape[0], c.hidden_size), dtype=dt)
        h_out = np.empty_like(h_in)
        conv_out = np.empty_like(conv_in)
        p = self._p
        _step_kernel(frame, p["in0_w"], p["in0_b"], p["has_in0"], p["norm_g"], p["norm_b"],
                     p["layer_norm"], p["eps"], p["in_w"], p["in_b"], p["conv_w"], p["conv_b"],
                     p["xp_w"], p["xp_b"], p["dt_w"], p["dt_b"], p["A"], p["D"], p["out_w"],
                     p["out_b"], p["fin_g"], p["fin_b"], p["has_final"], p["lo"], p["hi"],
                     p["b_mean"], p["R"], p["N"], conv_in, h_in, y, conv_out, h_out)
        return y, MambaCache(h_out, conv_out)

    __call__ = step

    def __repr__(self):
        return f"MambaStepper({self.config!r}, dtype={self.dtype.name})"


def make_stepper(params: dict, config=None, *, dtype=np.float64, **opts) -> MambaStepper:
    """Pack (and validate, once) a Mamba model's parameters for the compiled step.

    Parameters
    ----------
    params : dict
        The parameter tree (:func:`refssm.models.mamba.param_shapes`); copied.
    config : MambaConfig or dict
    dtype : {np.float64, np.float32}
        Precision of the packed weights, the state and the arithmetic.

    Returns
    -------
    MambaStepper

    Raises
    ------
    ValueError
        Parameters that do not match the config, non-finite values, another dtype.

    Examples
    --------
    >>> from refssm.models import mamba
    >>> c = mamba.MambaConfig(embed_dim=3, hidden_size=8, state_size=2, num_layers=2)
    >>> params = mamba.random_params(c, seed=0)
    >>> stepper = make_stepper(params, c)
    >>> x = np.random.default_rng(0).standard_normal((1, 5, 3))
    >>> cache = mamba.init_cache(c, 1)
    >>> for t in range(5):
    ...     y, cache = stepper.step(cache, x[:, t])
    >>> full = mamba.forward(params, x, c).output
    >>> bool(np.max(np.abs(y - full)) <= 1e-12 * np.max(np.abs(full)))
    True
    """
    from .mamba import _A, _block_name, as_config, param_shapes

    c = as_config(config, **opts)
    dt = np.dtype(dtype)
    if dt not in (np.float64, np.float32):
        raise ValueError(f"dtype: expected float64 or float32, got {dt}")
    params = check_params(params, param_shapes(c))
    H, E, N, R = c.hidden_size, c.inner_size, c.state_size, c.dt_rank_size
    zeros = lambda *s: np.zeros(s, dtype=dt)                       # noqa: E731

    def arr(a):
        return np.ascontiguousarray(a, dtype=dt)

    def dense(name, n_out):
        p = params[name]
        return arr(p["kernel"]), (arr(p["bias"]) if "bias" in p else zeros(n_out))

    layers = []
    for i in range(1, c.num_layers + 1):
        b = _block_name(i)
        norm = params[f"{b}_norm"]
        in_w, in_b = dense(f"{b}_in_proj", 2 * E)
        conv = params[f"{b}_conv_dw_conv"]
        if c.x_proj == "fused":
            xp_w, xp_b = dense(f"{b}_ssm_x_proj", R + 2 * N)
        else:                                          # Edifice: [dt_rank | bc_proj]
            w1, b1 = dense(f"{b}_ssm_dt_rank", R)
            w2, b2 = dense(f"{b}_ssm_bc_proj", 2 * N)
            xp_w, xp_b = np.concatenate([w1, w2], axis=1), np.concatenate([b1, b2])
        dt_w, dt_b = dense(f"{b}_ssm_dt_proj", E)
        out_w, out_b = dense(f"{b}_out_proj", H)
        layers.append(dict(
            norm_g=arr(norm["gamma"]), norm_b=arr(norm["beta"]) if "beta" in norm else zeros(H),
            in_w=in_w, in_b=in_b, conv_w=arr(conv["kernel"][:, 0, :]),
            conv_b=arr(conv["bias"]) if "bias" in conv else zeros(E),
            xp_w=xp_w, xp_b=xp_b, dt_w=dt_w, dt_b=dt_b, A=arr(_A(params, f"{b}_ssm", c)),
            D=arr(params[f"{b}_ssm"]["D"]) if c.d_skip else zeros(E), out_w=out_w, out_b=out_b))
    packed = {k: np.ascontiguousarray(np.stack([ly[k] for ly in layers])) for k in layers[0]}
    if "input_projection" in params:
        packed["in0_w"], packed["in0_b"] = dense("input_projection", H)
    else:
        packed["in0_w"], packed["in0_b"] = zeros(1, 1), zeros(1)
    fin = params.get("final_norm")
    packed["fin_g"] = arr(fin["gamma"]) if fin else zeros(H)
    packed["fin_b"] = arr(fin["beta"]) if fin and "beta" in fin else zeros(H)
    lo, hi = c.delta_clip if c.delta_clip is not None else (-np.inf, np.inf)
    packed.update(has_in0="input_projection" in params, layer_norm=c.norm == "layer",
                  eps=dt.type(c.norm_eps), has_final=bool(fin), lo=dt.type(lo), hi=dt.type(hi),
                  b_mean=c.b_bar == "channel_mean", R=R, N=N)
    return MambaStepper(c, packed, dt)
