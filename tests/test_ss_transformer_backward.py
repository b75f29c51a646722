"""Manual backward of the whole State Space Transformer (``forward_with_saved`` / ``backward``),
float64.

Golden fixtures carry gradients from this backward, so it is checked three
independent ways (DESIGN.md section 4 budgets, error = normwise
``max|a - b| / max|b|``, per array):

* central finite differences of the public :func:`refssm.models.ss_transformer.forward`,
  element by element, for ``dx``, the parameters and the carried state
  (SSM state, conv buffer, past keys and values): <= 1e-6. Every element of
  every parameter for the ``mamba_ssm`` preset with a carried state; every
  element of the ``edifice`` preset's SSM-path parameters (the only code the
  presets do not share) in training; ``dx`` and the state for every other
  setup (a full parameter sweep costs ~7000 forwards, ~7 s);
* torch autograd on a float64 torch transcription of the forward written
  here from DESIGN.md 1.4 (and, for the ``edifice`` EMA path, the equations
  of the module docstring), not from refssm's code: <= 1e-10, every
  parameter of every setup;
* the three selective-scan engines against each other: <= 1e-12.

Sizes: ``embed 5, hidden 8, state 3, expand 2, conv 3, 2 heads x head_dim 4,
2 layers, seq_len 7, batch 2``. Setups: both presets, with a carried state
(the state after a random 4-frame prefix: non-zero SSM state and conv buffer,
4 cached keys/values) or without, in inference or in training (dropout 0.1,
the default, between the blocks), and two mixed configs that flip the
softmax epsilon, the projection biases and the input projection. Each
finite-difference sweep differentiates three scalar losses at once (the
perturbed forward is shared): ``<W, output[:, -1]>`` (last timestep), ``<W,
output>`` (whole sequence), and the last-timestep loss plus a loss on every
part of the returned state (``d_state``). Parameters come from
``random_params`` (gates unsaturated, the state carrying), and every
finite-difference gradient is checked to be non-trivial, so no comparison
passes as ``0 == 0``.

The EMA core of the ``edifice`` preset (``ema_scan_forward/backward``,
``ema_gates_forward/backward``), which has no counterpart in ``refssm.ssm``,
is also checked on its own.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from conftest import require_peer
from refssm.models import ss_transformer as S
from refssm.models._common import tree_shapes
from refssm.verify.metrics import BUDGETS, normwise_error

FD = BUDGETS["grad_fd"]              # 1e-6
AUTOGRAD = BUDGETS["grad_autograd"]  # 1e-10
SCAN = BUDGETS["scan"]               # 1e-12
EPS = 1e-4                           # central-difference step: truncation ~ roundoff here
BATCH, SEQ_LEN, PREFIX = 2, 7, 4

BASE = dict(embed_dim=5, hidden_size=8, state_size=3, expand_factor=2, conv_size=3, num_layers=2,
            num_heads=2, head_dim=4)
CASES = {
    "mamba_ssm": dict(preset="mamba_ssm"),
    "edifice": dict(preset="edifice"),
    # the flags flipped: Edifice's softmax epsilon on the selective path, biases, no input proj
    "mixed_1": dict(preset="mamba_ssm", embed_dim=8, softmax_eps=1e-8, ssm_proj_bias=True),
    "mixed_2": dict(preset="edifice", softmax_eps=0.0, ssm_proj_bias=False, dropout=0.3),
}
LOSSES = ("last", "sequence", "last+state")
STATE_PARTS = ("ssm", "conv", "k", "v")


class Setup:
    """One case: config, parameters, input, carried state, dropout, loss weights."""

    def __init__(self, case: str, carried: bool, training: bool):
        self.case, self.carried, self.training = case, carried, training
        self.config = S.SSTransformerConfig(**{**BASE, **CASES[case]})
        self.params = S.random_params(self.config, seed=1)
        self.kw = dict(training=True, seed=11) if training else {}
        rng = np.random.default_rng(2)
        self.x = rng.standard_normal((BATCH, SEQ_LEN, self.config.embed_dim))
        self.state = None
        if carried:      # the state after a random prefix
            prefix = S.forward(self.params,
                               rng.standard_normal((BATCH, PREFIX, self.config.embed_dim)),
                               self.config)
            self.state = S.SSTransformerCache(*(a.copy() for a in prefix.state))
        ref = S.forward(self.params, self.x, self.config, state=self.state,
                        return_sequence=True, **self.kw)
        H = self.config.hidden_size
        self.W = {"last": rng.standard_normal((BATCH, H)),
                  "sequence": rng.standard_normal((BATCH, SEQ_LEN, H))}
        for part in STATE_PARTS:
            self.W[part] = rng.standard_normal(getattr(ref.state, part).shape)

    def forward(self, params=None, x=None, state=None, **kw):
        return S.forward(self.params if params is None else params,
                         self.x if x is None else x, self.config,
                         state=self.state if state is None else state,
                         **{**self.kw, **kw})

    def row_losses(self, res, base) -> np.ndarray:
        """``[3, rows]``: the three losses of every row (row ``r`` weighted as row ``base[r]``)."""
        W = self.W
        out = res.output                                                  # [rows, L, H]
        last = np.einsum("rh,rh->r", W["last"][base], out[:, -1])
        seq = np.einsum("rth,rth->r", W["sequence"][base], out)
        state = sum(np.sum((W[part][base] * getattr(res.state, part)).reshape(len(base), -1),
                           axis=1) for part in STATE_PARTS)
        return np.stack([last, seq, last + state])

    def d_state(self):
        return S.SSTransformerCache(*(self.W[part] for part in STATE_PARTS))

    def manual(self, loss: str, engine: str = "numpy") -> S.SSTransformerGrads:
        """refssm's backward for one of :data:`LOSSES`."""
        res, saved = S.forward_with_saved(self.params, self.x, self.config, state=self.state,
                                          return_sequence=(loss == "sequence"), engine=engine,
                                          **self.kw)
        d_out = self.W["sequence"] if loss == "sequence" else self.W["last"]
        d_state = self.d_state() if loss == "last+state" else None
        return S.backward(d_out, saved, d_state=d_state)


@functools.lru_cache(maxsize=None)
def setup(case: str, carried: bool, training: bool = False) -> Setup:
    return Setup(case, carried, training)


def _fd_rows(s: Setup, array_name: str) -> np.ndarray:
    """Central differences for ``x`` or a part of the state, all elements in one batched forward.

    Batch rows are independent (norms are per frame, attention per row), so
    every perturbed copy of a row is its own row of one big batch; row ``r`` is
    weighted as the original row it copies. Returns ``[3, *shape]``.
    """
    arrays = {"x": s.x}
    if s.state is not None:
        arrays.update({part: getattr(s.state, part) for part in STATE_PARTS})
    target = arrays[array_name]
    idx = list(np.ndindex(target.shape))
    rows = np.array([i[0] for i in idx] * 2)                             # + then -
    big = {k: v[rows].copy() for k, v in arrays.items()}
    for r, i in enumerate(idx):
        big[array_name][(r,) + i[1:]] += EPS
        big[array_name][(r + len(idx),) + i[1:]] -= EPS
    state = None if s.state is None else S.SSTransformerCache(*(big[p] for p in STATE_PARTS))
    res = S.forward(s.params, big["x"], s.config, state=state, return_sequence=True, **s.kw)
    losses = s.row_losses(res, rows)
    fd = (losses[:, :len(idx)] - losses[:, len(idx):]) / (2 * EPS)
    return fd.reshape((3,) + target.shape)


def _fd_elementwise(s: Setup, target: np.ndarray, params, x) -> np.ndarray:
    """Central differences for every element of ``target`` (an array inside ``params`` or
    ``x``, perturbed in place and restored). Returns ``[3, *shape]``."""
    out = np.empty((3,) + target.shape)
    base = np.arange(BATCH)
    for i in np.ndindex(target.shape):
        v = target[i]
        target[i] = v + EPS
        lp = s.row_losses(s.forward(params, x, return_sequence=True), base).sum(axis=1)
        target[i] = v - EPS
        lm = s.row_losses(s.forward(params, x, return_sequence=True), base).sum(axis=1)
        target[i] = v
        out[(slice(None),) + i] = (lp - lm) / (2 * EPS)
    return out


@functools.lru_cache(maxsize=None)
def fd_sweep(case: str, carried: bool, training: bool, layers: str = "all") -> dict:
    """Finite-difference gradients of the three losses: ``{"x", (layer, name), state parts}``.

    ``layers``: the parameters swept, ``"all"``, ``"ssm"`` (the SSM path's layers, the only
    ones whose code differs between the presets) or ``"none"``.
    """
    s = setup(case, carried, training)
    params = {layer: {k: v.copy() for k, v in p.items()} for layer, p in s.params.items()}
    x = s.x.copy()
    grads = {}
    if training:      # dropout masks depend on the batch shape: no batching
        grads["x"] = _fd_elementwise(s, x, params, x)
        assert not carried, "the training sweeps run without a carried state"
    else:
        grads["x"] = _fd_rows(s, "x")
        if carried:
            for part in STATE_PARTS:
                grads[part] = _fd_rows(s, part)
    for layer, p in params.items():
        if layers == "all" or (layers == "ssm" and "_ssm" in layer):
            for name, arr in p.items():
                grads[(layer, name)] = _fd_elementwise(s, arr, params, x)
    return grads


def _pairs(s: Setup, g: S.SSTransformerGrads, fd: dict, k: int):
    """``(name, manual, numeric)`` for every array the sweep differentiated."""
    pairs = [("x", g.x, fd["x"][k])]
    pairs += [(f"{layer}.{name}", g.params[layer][name], fd[(layer, name)][k])
              for layer, names in S.param_shapes(s.config).items() for name in names
              if (layer, name) in fd]
    if s.carried:
        pairs += [(f"state.{part}", getattr(g.state, part), fd[part][k]) for part in STATE_PARTS]
    else:
        assert g.state is None
    return pairs


def _key_bias_is_structurally_zero(s: Setup, name: str, loss: str) -> bool:
    """Without cached keys, the output's ``d attn_k.bias`` is zero: ``q . (k_j + b_k)``
    shifts every score of a query by the same ``q . b_k``, and the softmax ignores a shift
    (up to the tiny ``softmax_eps``, whose share of the denominator is ~1e-8). With a carried
    cache the past keys have no such shift, and a loss on the returned keys sees the bias."""
    return not s.carried and loss != "last+state" and name.endswith("_attn_k.bias")


def _compare(s: Setup, fd: dict) -> dict:
    """Normwise errors of refssm's backward against ``fd`` for every loss and array."""
    errors = {}
    for k, loss in enumerate(LOSSES):
        for name, manual, numeric in _pairs(s, s.manual(loss), fd, k):
            if _key_bias_is_structurally_zero(s, name, loss):
                assert np.max(np.abs(manual)) <= 1e-8 and np.max(np.abs(numeric)) <= 1e-8
                continue
            # teeth: a gradient that is zero (or lost in rounding) would compare as 0 == 0
            assert np.max(np.abs(numeric)) > 1e-5, f"{loss}: d{name} is trivially small"
            errors[f"{loss}: d{name}"] = normwise_error(manual, numeric)
    return errors


# Every element of every parameter of the selective preset with a carried state (SSM state,
# conv buffer, 4 cached keys/values); every element of every parameter of the EMA preset's
# SSM path (the layers whose code differs; the rest is the same code as above) without a
# state, in training (dropout 0.1 between the blocks). The other setups below: x and the
# carried state; torch autograd checks every parameter of every setup.
FD_CASES = [("mamba_ssm", True, False, "all"), ("edifice", False, True, "ssm")]


@pytest.mark.parametrize("case,carried,training,layers", FD_CASES)
def test_backward_matches_finite_differences(case, carried, training, layers):
    s = setup(case, carried, training)
    fd = fd_sweep(case, carried, training, layers)
    errors = _compare(s, fd)
    n_params = sum(len(names) for layer, names in S.param_shapes(s.config).items()
                   if layers == "all" or "_ssm" in layer)
    n_zero = 0 if carried or layers != "all" else 2 * s.config.num_layers   # the key biases
    assert len(errors) == 3 * (1 + n_params + (4 if carried else 0)) - n_zero  # none skipped
    worst = max(errors, key=errors.get)
    print(f"{case} carried={carried} training={training}: worst {worst}: {errors[worst]:.2e}")
    assert errors[worst] <= FD, f"worst {worst}: {errors[worst]:.2e}"
    # and the sweep has the resolution to see a plausible bug: d A_log without its chain
    # factor A (= -exp(A_log)) would be off by O(1), far above the budget
    if s.config.ssm_path == "selective":
        g = s.manual("last")
        A = -np.exp(s.params["sst_block_1_ssm"]["A_log"])
        assert normwise_error(g.params["sst_block_1_ssm"]["A_log"] / A,
                              fd[("sst_block_1_ssm", "A_log")][0]) > 0.1


XS_CASES = [("mamba_ssm", False, False), ("mamba_ssm", False, True), ("edifice", False, False),
            ("edifice", True, False), ("mixed_1", True, False), ("mixed_2", True, False)]


@pytest.mark.parametrize("case,carried,training", XS_CASES)
def test_input_and_state_gradients_match_finite_differences(case, carried, training):
    s = setup(case, carried, training)
    errors = _compare(s, fd_sweep(case, carried, training, layers="none"))
    assert len(errors) == 3 * (1 + (4 if carried else 0))
    worst = max(errors, key=errors.get)
    print(f"{case} carried={carried} training={training}: worst {worst}: {errors[worst]:.2e}")
    assert errors[worst] <= FD, f"worst {worst}: {errors[worst]:.2e}"


def test_the_setups_have_teeth():
    """The carried state is non-zero everywhere (4 cached frames), the EMA's forget gate and
    the fusion gate are unsaturated, the attention weights are neither uniform nor one-hot,
    and training really drops something."""
    for case in ("mamba_ssm", "edifice"):
        s = setup(case, True)
        st = s.state
        assert st.k.shape[3] == PREFIX
        for part in STATE_PARTS:
            assert np.abs(getattr(st, part)).min() > 0, part
        _, saved = S.forward_with_saved(s.params, s.x, s.config, state=s.state)
        for blk in saved.blocks:
            g = blk.gate_mix.g
            assert 0.02 < g.min() and g.max() < 0.98
            w = blk.attention.attention.weights[..., PREFIX:]      # queries past the first
            assert w.max() < 0.99 and np.ptp(w[w > 0]) > 0.1
            if s.config.ssm_path == "ema":
                forget = blk.ssm.core.gates.g
                assert 0.55 < forget.min() and forget.max() < 0.99 and np.ptp(forget) > 0.05
    s = setup("mamba_ssm", False, True)
    _, saved = S.forward_with_saved(s.params, s.x, s.config, **s.kw)
    assert s.config.dropout == 0.1                       # the default
    scale = saved.dropouts[0].scale
    assert 0 < np.mean(scale == 0) < 0.4
    assert saved.dropouts[0].scale is not None and len(saved.dropouts) == 1


# --------------------------------------------------------------------------
# torch autograd on an independent float64 transcription
# --------------------------------------------------------------------------
def torch_forward(torch, P, x, c, state, drop_scales):
    """The model of DESIGN.md 1.4 in torch, literally; returns ``(seq output, ssm, conv, k, v)``.

    ``state`` is ``(ssm [b, layers, ...], conv [b, layers, K-1, E], k, v [b, layers, heads,
    T, d])``.
    """
    F = torch.nn.functional
    E, N, R, K = c.inner_size, c.state_size, c.dt_rank_size, c.conv_size
    nh, hd = c.num_heads, c.head_dim
    bsz, L = x.shape[:2]
    ssm0, conv0, k0, v0 = state

    def dense(name, v):
        y = v @ P[name]["kernel"]
        return y + P[name]["bias"] if "bias" in P[name] else y

    def layer_norm(name, v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + c.norm_eps) * P[name]["gamma"] + P[name]["beta"]

    def heads(v):                                   # [b, L, nh * hd] -> [b, nh, L, hd]
        return v.reshape(bsz, L, nh, hd).transpose(1, 2)

    if "input_projection" in P:
        x = dense("input_projection", x)
    out_ssm, out_conv, out_k, out_v = [], [], [], []
    for i in range(1, c.num_layers + 1):
        b = f"sst_block_{i}"
        u = layer_norm(f"{b}_norm", x)
        # --- SSM path ---------------------------------------------------------
        xz = dense(f"{b}_ssm_in_proj", u)
        xs0, z = xz[..., :E], xz[..., E:]
        pad = torch.cat([conv0[:, i - 1], xs0], dim=1)                    # [b, K-1+L, E]
        w = P[f"{b}_ssm_conv"]["kernel"][:, 0, :]                         # [K, E]
        xs = F.silu(sum(w[k] * pad[:, k:k + L] for k in range(K)) + P[f"{b}_ssm_conv"]["bias"])
        out_conv.append(pad[:, L:])
        h = ssm0[:, i - 1]
        ys = []
        if c.ssm_path == "selective":
            xd = dense(f"{b}_ssm_x_proj", xs)
            dt_low, B, C = xd[..., :R], xd[..., R:R + N], xd[..., R + N:]
            delta = F.softplus(dense(f"{b}_ssm_dt_proj", dt_low))
            A = -torch.exp(P[f"{b}_ssm"]["A_log"])
            for t in range(L):
                h = (torch.exp(delta[:, t, :, None] * A) * h
                     + delta[:, t, :, None] * B[:, t, None, :] * xs[:, t, :, None])
                ys.append((h * C[:, t, None, :]).sum(-1) + P[f"{b}_ssm"]["D"] * xs[:, t])
        else:                                         # Edifice's EMA approximation
            delta = F.softplus(dense(f"{b}_ssm_dt_proj", xs))
            B, C = dense(f"{b}_ssm_b_proj", xs), dense(f"{b}_ssm_c_proj", xs)
            g = torch.sigmoid(delta.mean(-1, keepdim=True))
            sg = torch.sigmoid((B * C).sum(-1, keepdim=True))
            for t in range(L):
                h = g[:, t] * h + (1 - g[:, t]) * (g[:, t] * sg[:, t] * xs[:, t])
                ys.append(h)
        out_ssm.append(h)
        s = dense(f"{b}_ssm_out_proj", torch.stack(ys, dim=1) * F.silu(z))
        # --- attention --------------------------------------------------------
        q = heads(dense(f"{b}_attn_q", u))
        k = torch.cat([k0[:, i - 1], heads(dense(f"{b}_attn_k", u))], dim=2)
        v = torch.cat([v0[:, i - 1], heads(dense(f"{b}_attn_v", u))], dim=2)
        out_k.append(k)
        out_v.append(v)
        Lk = k.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        visible = torch.arange(Lk)[None, :] <= torch.arange(L)[:, None] + (Lk - L)
        scores = scores.masked_fill(~visible, float("-inf"))
        e = torch.exp(scores - scores.max(-1, keepdim=True).values)
        p = e / (e.sum(-1, keepdim=True) + c.softmax_eps)
        a = dense(f"{b}_attn_out_proj", (p @ v).transpose(1, 2).reshape(bsz, L, nh * hd))
        # --- gate, FFN --------------------------------------------------------
        gate = torch.sigmoid(dense(f"{b}_gate_proj", u))
        x = x + gate * s + (1 - gate) * a
        x = x + dense(f"{b}_ffn_down",
                      F.gelu(dense(f"{b}_ffn_up", layer_norm(f"{b}_ffn_norm", x))))
        if i < c.num_layers and drop_scales[i - 1] is not None:
            x = x * drop_scales[i - 1]
    out = layer_norm("final_norm", x)
    stack = lambda vs: torch.stack(vs, dim=1)                             # noqa: E731
    return out, stack(out_ssm), stack(out_conv), stack(out_k), stack(out_v)


@pytest.fixture
def torch():
    """torch (a peer), on one thread for these tiny tensors: with two, its worker threads
    spin for ~20x the CPU time of the work itself (the thread count is restored after)."""
    torch = require_peer("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


AUTOGRAD_CASES = [(case, carried, training) for case in CASES for carried in (False, True)
                  for training in (False, True)]


@pytest.mark.peers
@pytest.mark.parametrize("case,carried,training", AUTOGRAD_CASES)
def test_backward_matches_torch_autograd(torch, case, carried, training):
    s = setup(case, carried, training)
    c = s.config
    _, saved = S.forward_with_saved(s.params, s.x, c, state=s.state, **s.kw)
    drops = [None if d is None else torch.tensor(d.scale) for d in saved.dropouts]
    assert (drops[0] is not None) == training
    leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)  # noqa: E731
    P = {layer: {k: leaf(v) for k, v in p.items()} for layer, p in s.params.items()}
    init = s.state or S.init_cache(c, BATCH)
    tx = leaf(s.x)
    tstate = [leaf(getattr(init, part)) for part in STATE_PARTS]
    out, *new_state = torch_forward(torch, P, tx, c, tstate, drops)
    Wt = {k: torch.tensor(v) for k, v in s.W.items()}
    losses = {"last": (out[:, -1] * Wt["last"]).sum(),
              "sequence": (out * Wt["sequence"]).sum()}
    losses["last+state"] = losses["last"] + sum((t * Wt[part]).sum()
                                                for t, part in zip(new_state, STATE_PARTS))
    names = [(layer, k) for layer in P for k in P[layer]]
    leaves = [tx] + tstate + [P[layer][k] for layer, k in names]
    errors = {}
    for loss in LOSSES:
        tg = torch.autograd.grad(losses[loss], leaves, retain_graph=True)
        g = s.manual(loss)
        errors[f"{loss}: dx"] = normwise_error(g.x, tg[0].numpy())
        if carried:
            for part, t in zip(STATE_PARTS, tg[1:5]):
                errors[f"{loss}: dstate.{part}"] = normwise_error(getattr(g.state, part),
                                                                  t.numpy())
                assert np.max(np.abs(t.numpy())) > 1e-5, f"{loss}: dstate.{part} trivially small"
        else:
            assert g.state is None
        for (layer, k), t in zip(names, tg[5:]):
            if _key_bias_is_structurally_zero(s, f"{layer}.{k}", loss):
                assert np.max(np.abs(t.numpy())) <= 1e-8
                assert np.max(np.abs(g.params[layer][k] - t.numpy())) <= 1e-13   # round-off
                continue
            errors[f"{loss}: d{layer}.{k}"] = normwise_error(g.params[layer][k], t.numpy())
            assert np.max(np.abs(t.numpy())) > 1e-5, f"{loss}: d{layer}.{k} is trivially small"
    # the forward agrees too (else the comparison would be of two different functions)
    ref = s.forward(return_sequence=True)
    assert normwise_error(ref.output, out.detach().numpy()) <= SCAN
    for part, t in zip(STATE_PARTS, new_state):
        assert normwise_error(getattr(ref.state, part), t.detach().numpy()) <= SCAN
    worst = max(errors, key=errors.get)
    print(f"{case} carried={carried} training={training}: worst {worst}: {errors[worst]:.2e}")
    assert errors[worst] <= AUTOGRAD, f"worst {worst}: {errors[worst]:.2e}"


@pytest.mark.peers
def test_autograd_sees_the_softmax_epsilon_path(torch):
    """With Edifice's ``+1e-8`` the softmax depends on the subtracted max; torch differentiates
    through it, and dropping that path from refssm's backward would show above the budget."""
    s = setup("mixed_1", True)
    c = s.config
    leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)  # noqa: E731
    P = {layer: {k: leaf(v) for k, v in p.items()} for layer, p in s.params.items()}
    tx = leaf(s.x)
    tstate = [torch.tensor(getattr(s.state, part)) for part in STATE_PARTS]
    out, *_ = torch_forward(torch, P, tx, c, tstate, [None])
    (dx,) = torch.autograd.grad((out * torch.tensor(s.W["sequence"])).sum(), [tx])
    g = s.manual("sequence")
    assert normwise_error(g.x, dx.numpy()) <= AUTOGRAD
    # the same backward with the attention's max path removed
    res, saved = S.forward_with_saved(s.params, s.x, c, state=s.state, return_sequence=True)
    blocks = tuple(b._replace(attention=b.attention._replace(
        attention=b.attention.attention._replace(eps_share=None, argmax=None)))
        for b in saved.blocks)
    wrong = S.backward(s.W["sequence"], saved._replace(blocks=blocks))
    assert normwise_error(wrong.x, dx.numpy()) > 10 * AUTOGRAD


# --------------------------------------------------------------------------
# engines, chunks, consistency
# --------------------------------------------------------------------------
def _flat(g: S.SSTransformerGrads) -> dict:
    out = {"x": g.x}
    out.update({f"{layer}.{k}": v for layer, p in g.params.items() for k, v in p.items()})
    if g.state is not None:
        out.update({f"state.{part}": getattr(g.state, part) for part in STATE_PARTS})
    return out


@pytest.mark.parametrize("engine", ["numba", "logdepth"])
@pytest.mark.parametrize("case", ["mamba_ssm", "mixed_1", "edifice"])
def test_scan_engines_give_the_same_gradients(case, engine):
    s = setup(case, True)
    worst_all = 0.0
    for loss in ("sequence", "last+state"):
        ref, got = _flat(s.manual(loss, "numpy")), _flat(s.manual(loss, engine))
        assert ref.keys() == got.keys()
        errors = {k: normwise_error(got[k], ref[k]) for k in ref}
        worst = max(errors, key=errors.get)
        worst_all = max(worst_all, errors[worst])
        assert errors[worst] <= SCAN, f"{engine} {loss}: worst {worst}: {errors[worst]:.2e}"
        if s.config.ssm_path == "ema":            # no scan engine on this path: the same code
            assert errors[worst] == 0.0
    print(f"{case} {engine}: worst {worst_all:.2e}")


@pytest.mark.parametrize("case", ["mamba_ssm", "edifice"])
def test_chunked_backward_equals_one_call(case):
    """Backpropagating through the carried state chunk by chunk (``d_state`` in, the state's
    gradient out: SSM state, conv buffer, the growing key/value cache) gives the one-call
    gradients; a chunk of 1 frame < conv_size - 1 makes the conv buffer carry frames of the
    chunk before."""
    s = setup(case, True)
    c, W = s.config, s.W["sequence"]
    d_final = s.d_state()
    _, saved = S.forward_with_saved(s.params, s.x, c, state=s.state, return_sequence=True)
    one = S.backward(W, saved, d_state=d_final)
    cuts = [0, 3, 4, 7]
    states, saveds = [s.state], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        res, sv = S.forward_with_saved(s.params, s.x[:, a:b], c, state=states[-1],
                                       return_sequence=True)
        states.append(res.state)
        saveds.append(sv)
    d_state, dxs, dparams = d_final, [], []
    for (a, b), sv in reversed(list(zip(zip(cuts[:-1], cuts[1:]), saveds))):
        g = S.backward(W[:, a:b], sv, d_state=d_state)
        assert g.state.k.shape[3] == PREFIX + a                # the keys cached before the chunk
        d_state = g.state
        dxs.insert(0, g.x)
        dparams.append(g.params)
    summed = {layer: {k: sum(d[layer][k] for d in dparams) for k in p}
              for layer, p in one.params.items()}
    chunked = _flat(S.SSTransformerGrads(np.concatenate(dxs, axis=1), summed, d_state))
    errors = {k: normwise_error(chunked[k], v) for k, v in _flat(one).items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= SCAN, f"worst {worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_forward_with_saved_is_forward(case):
    """Same numbers as forward (bit for bit), dropout masks included."""
    for carried in (False, True):
        s = setup(case, carried, True)
        for seq in (False, True):
            ref = s.forward(return_sequence=seq)
            res, saved = S.forward_with_saved(s.params, s.x, s.config, state=s.state,
                                              return_sequence=seq, **s.kw)
            np.testing.assert_array_equal(res.output, ref.output)
            for part in STATE_PARTS:
                np.testing.assert_array_equal(getattr(res.state, part), getattr(ref.state, part))
            for a, b in zip(res.hidden_states, ref.hidden_states, strict=True):
                np.testing.assert_array_equal(a, b)
            assert len(saved.blocks) == s.config.num_layers
            assert len(saved.dropouts) == s.config.num_layers - 1
            assert all(d.scale is not None for d in saved.dropouts)
            assert (saved.input_projection is None) == (s.config.embed_dim == s.config.hidden_size)
            assert saved.past_len == (PREFIX if carried else 0)
        # same seed -> same masks; another seed -> other masks
        _, a = S.forward_with_saved(s.params, s.x, s.config, state=s.state, **s.kw)
        _, b = S.forward_with_saved(s.params, s.x, s.config, state=s.state, training=True, seed=12)
        np.testing.assert_array_equal(a.dropouts[0].scale, saved.dropouts[0].scale)
        assert not np.array_equal(a.dropouts[0].scale, b.dropouts[0].scale)
    # training=False: no dropout saved
    s = setup(case, False)
    _, saved = S.forward_with_saved(s.params, s.x, s.config)
    assert all(d is None for d in saved.dropouts)


def test_training_false_means_no_dropout_in_the_backward():
    s = setup("mamba_ssm", False)
    _, saved = S.forward_with_saved(s.params, s.x, s.config, training=False, seed=11)
    g = S.backward(s.W["last"], saved)
    np.testing.assert_array_equal(g.x, s.manual("last").x)
    assert normwise_error(g.x, setup("mamba_ssm", False, True).manual("last").x) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_tree_layout(case):
    """dparams has exactly the tree's layers, names, order and shapes; the state gradient
    exists exactly when a state was carried; d_state=None means zero; every part of
    ``d_state`` is used."""
    for carried in (False, True):
        s = setup(case, carried)
        g = s.manual("last")
        assert list(g.params) == list(s.params)
        for layer in s.params:
            assert list(g.params[layer]) == list(s.params[layer])
        assert tree_shapes(g.params) == S.param_shapes(s.config)
        assert g.x.shape == s.x.shape
        if carried:
            for part in STATE_PARTS:
                assert getattr(g.state, part).shape == getattr(s.state, part).shape
        else:
            assert g.state is None
        _, saved = S.forward_with_saved(s.params, s.x, s.config, state=s.state)
        zero = S.SSTransformerCache(*(np.zeros_like(s.W[p]) for p in STATE_PARTS))
        a = _flat(S.backward(s.W["last"], saved))
        b = _flat(S.backward(s.W["last"], saved, d_state=zero))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        for j, part in enumerate(STATE_PARTS):
            only = [None] * 4
            only[j] = s.W[part]
            half = _flat(S.backward(s.W["last"], saved, d_state=S.SSTransformerCache(*only)))
            assert normwise_error(half["x"], a["x"]) > 1e-3, f"d_state.{part} unused"


def test_model_methods():
    s = setup("edifice", True)
    model = S.SSTransformerModel(s.config, s.params)
    res, saved = model.forward_with_saved(s.x, state=s.state)
    g = model.backward(s.W["last"], saved, d_state=s.d_state())
    np.testing.assert_array_equal(g.x, s.manual("last+state").x)


def test_bad_gradients_are_refused():
    s = setup("mamba_ssm", True)
    _, saved = S.forward_with_saved(s.params, s.x, s.config, state=s.state)
    with pytest.raises(ValueError, match=r"d_out: expected 2 dimensions"):
        S.backward(s.W["sequence"], saved)
    with pytest.raises(ValueError, match=r"d_out: expected shape \(2, 8\) .* got \(2, 9\)"):
        S.backward(np.zeros((2, 9)), saved)
    with pytest.raises(ValueError, match="d_out"):
        S.backward(np.full((2, 8), np.nan), saved)
    with pytest.raises(ValueError, match=r"d_state.ssm: expected shape \(2, 2, 16, 3\) .* "
                                         r"got \(2, 2, 16, 4\)"):
        S.backward(s.W["last"], saved,
                   d_state=S.SSTransformerCache(np.zeros((2, 2, 16, 4)), None, None, None))
    with pytest.raises(ValueError, match=r"d_state.k: expected shape \(2, 2, 2, 11, 4\) .* "
                                         r"got \(2, 2, 2, 7, 4\)"):
        S.backward(s.W["last"], saved,           # the keys of x only, not the cached ones
                   d_state=S.SSTransformerCache(None, None, np.zeros((2, 2, 2, 7, 4)), None))
    with pytest.raises(ValueError, match="d_state.v"):
        bad = np.array(s.W["v"])
        bad[0, 0, 0, 0, 0] = np.inf
        S.backward(s.W["last"], saved, d_state=S.SSTransformerCache(None, None, None, bad))
    with pytest.raises(ValueError, match="d_state: expected a SSTransformerCache"):
        S.backward(s.W["last"], saved, d_state=np.zeros(3))
    with pytest.raises(ValueError, match="saved: expected the SSTransformerSaved"):
        S.backward(s.W["last"], saved.blocks[0])
    with pytest.raises(ValueError, match="forward_with_saved: training=True .* needs seed"):
        S.forward_with_saved(s.params, s.x, s.config, training=True)


# --------------------------------------------------------------------------
# The EMA core of the edifice preset, on its own
# --------------------------------------------------------------------------
def _central(f, arrays, name):
    """Central differences of the scalar ``f(**arrays)`` for every element of ``arrays[name]``."""
    target = arrays[name]
    out = np.empty_like(target)
    for i in np.ndindex(target.shape):
        v = target[i]
        target[i] = v + 1e-6
        lp = f(**arrays)
        target[i] = v - 1e-6
        lm = f(**arrays)
        target[i] = v
        out[i] = (lp - lm) / 2e-6
    return out


def test_ema_scan_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    arrays = dict(gx=rng.standard_normal((2, 6, 3)), g=rng.uniform(0.3, 0.95, (2, 6, 1)),
                  context0=rng.standard_normal((2, 3)))
    dy, d_last = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 3))

    def loss(gx, g, context0):
        y, last, _ = S.ema_scan_forward(gx, g, context0)
        return float(np.sum(dy * y) + np.sum(d_last * last))

    _, _, saved = S.ema_scan_forward(**arrays)
    got = S.ema_scan_backward(dy, d_last, saved)
    for name in arrays:
        fd = _central(loss, arrays, name)
        assert np.max(np.abs(fd)) > 1e-3
        assert normwise_error(got[name], fd) <= FD, name
    # the recurrence, frame by frame
    y, last, _ = S.ema_scan_forward(**arrays)
    h = arrays["context0"]
    for t in range(6):
        h = arrays["g"][:, t] * h + (1 - arrays["g"][:, t]) * arrays["gx"][:, t]
    assert normwise_error(last, h) <= 1e-15 and np.array_equal(y[:, -1], last)
    # d_last None means zero; no context0 means zeros
    _, _, s0 = S.ema_scan_forward(arrays["gx"], arrays["g"])
    assert np.array_equal(s0.y0, np.zeros((2, 3)))
    a = S.ema_scan_backward(dy, None, saved)
    b = S.ema_scan_backward(dy, np.zeros((2, 3)), saved)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_ema_gates_backward_matches_finite_differences():
    rng = np.random.default_rng(6)
    arrays = dict(delta=rng.uniform(0.5, 2.5, (2, 5, 4)), B=rng.standard_normal((2, 5, 3)),
                  C=rng.standard_normal((2, 5, 3)), xs=rng.standard_normal((2, 5, 4)))
    d_gx, d_g = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 1))

    def loss(delta, B, C, xs):
        g, gx, _ = S.ema_gates_forward(delta, B, C, xs)
        return float(np.sum(d_gx * gx) + np.sum(d_g * g))

    _, _, saved = S.ema_gates_forward(**arrays)
    got = S.ema_gates_backward(d_gx, d_g, saved)
    for name in arrays:
        fd = _central(loss, arrays, name)
        assert np.max(np.abs(fd)) > 1e-3
        assert normwise_error(got[name], fd) <= FD, name


def test_ema_ssm_backward_matches_finite_differences():
    """The EMA path's core with its projections (dt, B, C) and a carried context."""
    s = setup("edifice", True)
    p = {k: {n: a.copy() for n, a in v.items()} for k, v in s.params.items()}
    rng = np.random.default_rng(7)
    xs, ctx0 = rng.standard_normal((2, 6, 16)), rng.standard_normal((2, 16))
    dy, d_last = rng.standard_normal((2, 6, 16)), rng.standard_normal((2, 16))
    name = "sst_block_1"

    def loss(xs, context0):
        y, last = S.ema_ssm_forward(p, xs, name, context0)
        return float(np.sum(dy * y) + np.sum(d_last * last))

    y, last, saved = S.ema_ssm_forward_with_saved(p, xs, name, ctx0)
    dxs, d_ctx0, frag = S.ema_ssm_backward(dy, d_last, saved, name)
    arrays = dict(xs=xs, context0=ctx0)
    assert normwise_error(dxs, _central(loss, arrays, "xs")) <= FD
    assert normwise_error(d_ctx0, _central(loss, arrays, "context0")) <= FD
    assert sorted(frag) == [f"{name}_ssm_b_proj", f"{name}_ssm_c_proj", f"{name}_ssm_dt_proj"]
    for layer, grads in frag.items():
        for k, g in grads.items():
            fd = _central(lambda w: loss(xs, ctx0), {"w": p[layer][k]}, "w")
            assert np.max(np.abs(fd)) > 1e-4, (layer, k)
            assert normwise_error(g, fd) <= FD, (layer, k)
