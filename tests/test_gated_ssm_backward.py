"""Manual backward of the whole GatedSSM model (``forward_with_saved`` / ``backward``), float64.

Golden fixtures carry gradients from this backward, so it is checked three
independent ways (DESIGN.md section 4 budgets, error = normwise
``max|a - b| / max|b|``, per array):

* central finite differences of the public :func:`refssm.models.gated_ssm.forward`,
  element by element, for ``dx``, every parameter and the carried state
  (causal mode): <= 1e-6;
* torch autograd on a float64 torch transcription of the forward written
  here from DESIGN.md 1.2 (not from refssm's code): <= 1e-10;
* the two core engines (numpy, numba) against each other: <= 1e-12.

Cases (``hidden 8, state 3 (dt_rank 2), expand 2, conv 3, 2 layers, seq_len 7,
batch 2``): both presets (``causal``: the EMA recurrence with a carried state;
``edifice``: the legacy, length-normalised scan mode, which takes no state),
the causal one with and without a carried state, and a mixed config of each
that changes every other option (no input projection, ``conv_size`` 4,
``state_size`` 2 so ``dt_rank`` 4, ``alpha`` 0.75, dropout in training; the
causal one carries a state too). Each finite-difference sweep differentiates
the scalar losses at once (the perturbed forward is shared): ``<W, output[:,
-1]>`` (last timestep), ``<W, output>`` (whole sequence) and, in causal mode,
the last-timestep loss plus ``<Wc, state.context> + <Wv, state.conv>`` (a
loss on the returned state, ``d_state``). Parameters come from
``random_params`` (``bc_proj`` scaled so both gates spread without saturating), and every
finite-difference gradient is checked to be non-trivial, so no comparison
passes as ``0 == 0``.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import require_peer
from refssm.models import gated_ssm as G
from refssm.models._common import tree_shapes
from refssm.ssm.gated_ema import GatedEMASaved
from refssm.verify.metrics import BUDGETS, normwise_error

FD = BUDGETS["grad_fd"]              # 1e-6
AUTOGRAD = BUDGETS["grad_autograd"]  # 1e-10
SCAN = BUDGETS["scan"]               # 1e-12
EPS = 1e-4                           # central-difference step: truncation ~ roundoff here
BATCH, SEQ_LEN = 2, 7

BASE = dict(embed_dim=5, hidden_size=8, state_size=3, expand_factor=2, conv_size=3, num_layers=2)
MIXED = dict(embed_dim=8, state_size=2, conv_size=4, alpha=0.75, dropout=0.3)
CASES = {
    "causal": dict(preset="causal"),
    "edifice": dict(preset="edifice"),
    "causal_mixed": dict(preset="causal", **MIXED),
    "edifice_mixed": dict(preset="edifice", **MIXED),
}
TRAINING = {"causal_mixed": dict(training=True, seed=11),
            "edifice_mixed": dict(training=True, seed=11)}
FD_CASES = [("causal", False), ("causal", True), ("edifice", False), ("causal_mixed", True),
            ("edifice_mixed", False)]
STATE_CASES = [("causal", True), ("causal_mixed", True)]     # the two with a carried state
#: ``random_params`` scales ``bc_proj`` for ``sum_n B C`` of order 1 at the model tests' sizes;
#: with ``hidden 8`` and ``N`` 2-3 the sum is smaller and the gate ``s`` stays near 1/2:
#: scaled up, it spreads over about (0.1, 0.9) (:func:`test_the_cases_have_teeth`).
BC_SCALE = 1.5


def losses_of(config) -> tuple:
    """The scalar losses of a config: a loss on the returned state only in causal mode."""
    if config.scan_mode == "causal":
        return ("last", "sequence", "last+state")
    return ("last", "sequence")


class Setup:
    """One case: config, parameters, input, carried state, loss weights."""

    def __init__(self, case: str, carried: bool):
        self.case, self.carried = case, carried
        self.config = G.GatedSSMConfig(**{**BASE, **CASES[case]})
        self.causal = self.config.scan_mode == "causal"
        assert self.causal or not carried, "the legacy mode takes no state"
        self.params = G.random_params(self.config, seed=3)
        for layer, p in self.params.items():
            if layer.endswith("_ssm_bc_proj"):   # spread the B.C gate s at these small sizes
                p["kernel"] = BC_SCALE * p["kernel"]
        self.kw = TRAINING.get(case, {})
        self.losses = losses_of(self.config)
        rng = np.random.default_rng(2)
        E = self.config.embed_dim
        self.x = rng.standard_normal((BATCH, SEQ_LEN, E))
        self.state = None
        if carried:      # the state after a random prefix: non-zero conv buffer and context
            prefix = G.forward(self.params, rng.standard_normal((BATCH, 4, E)), self.config)
            self.state = G.GatedSSMCache(prefix.state.context.copy(), prefix.state.conv.copy())
        H, c = self.config.hidden_size, self.config
        self.W = {"last": rng.standard_normal((BATCH, H)),
                  "sequence": rng.standard_normal((BATCH, SEQ_LEN, H)),
                  "context": rng.standard_normal((BATCH, c.num_layers, c.inner_size)),
                  "conv": rng.standard_normal((BATCH, c.num_layers, c.conv_size - 1,
                                               c.inner_size))}

    def forward(self, params=None, x=None, state=None, **kw):
        return G.forward(self.params if params is None else params,
                         self.x if x is None else x, self.config,
                         state=self.state if state is None else state,
                         **{**self.kw, **kw})

    def row_losses(self, res, base) -> np.ndarray:
        """``[n_losses, rows]``: the losses of every row (row ``r`` weighted as row ``base[r]``)."""
        W = self.W
        out = res.output                                                  # [rows, L, H]
        last = np.einsum("rh,rh->r", W["last"][base], out[:, -1])
        seq = np.einsum("rth,rth->r", W["sequence"][base], out)
        if not self.causal:
            assert res.state is None
            return np.stack([last, seq])
        state = (np.einsum("rle,rle->r", W["context"][base], res.state.context)
                 + np.einsum("rlke,rlke->r", W["conv"][base], res.state.conv))
        return np.stack([last, seq, last + state])

    def manual(self, loss: str, engine: str = "numpy") -> G.GatedSSMGrads:
        """refssm's backward for one of :attr:`losses`."""
        res, saved = G.forward_with_saved(self.params, self.x, self.config, state=self.state,
                                          return_sequence=(loss == "sequence"), engine=engine,
                                          **self.kw)
        d_out = self.W["sequence"] if loss == "sequence" else self.W["last"]
        d_state = (G.GatedSSMCache(self.W["context"], self.W["conv"]) if loss == "last+state"
                   else None)
        return G.backward(d_out, saved, d_state=d_state)


@functools.lru_cache(maxsize=None)
def setup(case: str, carried: bool) -> Setup:
    return Setup(case, carried)


def _fd_rows(s: Setup, array_name: str) -> np.ndarray:
    """Central differences for ``x`` or the state, all elements in one batched forward.

    Batch rows are independent (the norm is per frame, the gates per row),
    so every perturbed copy of a row is its own row of one big batch; row
    ``r`` is weighted as the original row it copies. Returns ``[n_losses, *shape]``.
    """
    st = s.state
    arrays = {"x": s.x, "context": None if st is None else st.context,
              "conv": None if st is None else st.conv}
    target = arrays[array_name]
    idx = list(np.ndindex(target.shape))
    rows = np.array([i[0] for i in idx] * 2)                             # + then -
    big = {k: None if v is None else v[rows].copy() for k, v in arrays.items()}
    for r, i in enumerate(idx):
        big[array_name][(r,) + i[1:]] += EPS
        big[array_name][(r + len(idx),) + i[1:]] -= EPS
    state = None if st is None else G.GatedSSMCache(big["context"], big["conv"])
    res = G.forward(s.params, big["x"], s.config, state=state, return_sequence=True, **s.kw)
    losses = s.row_losses(res, rows)
    fd = (losses[:, :len(idx)] - losses[:, len(idx):]) / (2 * EPS)
    return fd.reshape((len(s.losses),) + target.shape)


def _fd_elementwise(s: Setup, target: np.ndarray, params, x, state) -> np.ndarray:
    """Central differences for every element of ``target`` (an array inside ``params``, ``x``
    or ``state``, perturbed in place and restored). Returns ``[n_losses, *shape]``."""
    out = np.empty((len(s.losses),) + target.shape)
    base = np.arange(BATCH)

    def total():
        res = s.forward(params, x, state, return_sequence=True)
        return s.row_losses(res, base).sum(axis=1)

    for i in np.ndindex(target.shape):
        v = target[i]
        target[i] = v + EPS
        lp = total()
        target[i] = v - EPS
        lm = total()
        target[i] = v
        out[(slice(None),) + i] = (lp - lm) / (2 * EPS)
    return out


@functools.lru_cache(maxsize=None)
def fd_sweep(case: str, carried: bool) -> dict:
    """Finite-difference gradients of the losses: ``{"x", (layer, name), "context", "conv"}``."""
    s = setup(case, carried)
    params = {layer: {k: v.copy() for k, v in p.items()} for layer, p in s.params.items()}
    x = s.x.copy()
    state = None if s.state is None else G.GatedSSMCache(s.state.context.copy(),
                                                        s.state.conv.copy())
    grads = {}
    if s.kw.get("training"):      # dropout masks depend on the batch shape: no batching
        grads["x"] = _fd_elementwise(s, x, params, x, state)
        if carried:
            grads["context"] = _fd_elementwise(s, state.context, params, x, state)
            grads["conv"] = _fd_elementwise(s, state.conv, params, x, state)
    else:
        grads["x"] = _fd_rows(s, "x")
        if carried:
            grads["context"] = _fd_rows(s, "context")
            grads["conv"] = _fd_rows(s, "conv")
    for layer, p in params.items():
        for name, arr in p.items():
            grads[(layer, name)] = _fd_elementwise(s, arr, params, x, state)
    return grads


@pytest.mark.parametrize("case,carried", FD_CASES)
def test_backward_matches_finite_differences(case, carried):
    s = setup(case, carried)
    fd = fd_sweep(case, carried)
    errors = {}
    for k, loss in enumerate(s.losses):
        g = s.manual(loss)
        pairs = [("x", g.x, fd["x"][k])]
        pairs += [(f"{layer}.{name}", g.params[layer][name], fd[(layer, name)][k])
                  for layer, names in G.param_shapes(s.config).items() for name in names]
        if carried:
            pairs += [("state.context", g.state.context, fd["context"][k]),
                      ("state.conv", g.state.conv, fd["conv"][k])]
        else:
            assert g.state is None
        for name, manual, numeric in pairs:
            # teeth: a gradient that is zero (or lost in rounding) would compare as 0 == 0
            assert np.max(np.abs(numeric)) > 1e-5, f"{loss}: d{name} is trivially small"
            errors[f"{loss}: d{name}"] = normwise_error(manual, numeric)
    worst = max(errors, key=errors.get)
    print(f"{case} carried={carried}: worst FD error {worst}: {errors[worst]:.2e}")
    assert errors[worst] <= FD, f"worst {worst}: {errors[worst]:.2e}"
    # and the sweep has the resolution to see a plausible bug: d delta without the 1/inner
    # of the channel mean (g = sigmoid(mean_c delta)) would be off by O(1), far above the budget
    g = s.manual("last")
    bias = g.params["mamba_block_1_ssm_dt_proj"]["bias"]
    assert normwise_error(bias * s.config.inner_size,
                          fd[("mamba_block_1_ssm_dt_proj", "bias")][0]) > 0.1


def test_the_cases_have_teeth():
    """Both gates of every layer unsaturated and moving; the context matters against gx; the
    training cases really drop something; the carried states are not zero."""
    for case, carried in FD_CASES:
        s = setup(case, carried)
        _, saved = G.forward_with_saved(s.params, s.x, s.config, state=s.state, **s.kw)
        for blk in saved.blocks:
            core = blk.ssm.core
            assert 0.55 < core.g.min() and core.g.max() < 0.95, (case, core.g.min(), core.g.max())
            assert np.ptp(core.g) > 0.02, (case, np.ptp(core.g))      # moves over frames
            assert 0.05 < core.s.min() and core.s.max() < 0.95, (case, core.s.min(), core.s.max())
            assert np.ptp(core.s) > 0.2, (case, np.ptp(core.s))
            # y = gx + (1 - g) ctx: the context term is a few % of gx here (7 frames of an
            # EMA), so a bug in its gradient would show ~4 orders of magnitude above FD's budget
            gx = core.g * core.s * core.x
            ratio = np.abs((1 - core.g) * core.context).max() / np.abs(gx).max()
            assert ratio > 0.02, (case, ratio)
        if s.kw.get("training"):
            scale = saved.dropouts[0].scale
            assert 0.05 < np.mean(scale == 0) < 0.6
        else:
            assert all(d is None for d in saved.dropouts)
    for case, carried in STATE_CASES:
        st = setup(case, carried).state
        assert np.abs(st.context).min() > 0 and np.abs(st.conv).min() > 0


# --------------------------------------------------------------------------
# torch autograd on an independent float64 transcription
# --------------------------------------------------------------------------
def torch_forward(torch, P, x, c, ctx0, conv0, drop_scales):
    """The model of DESIGN.md 1.2 in torch, literally; returns ``(seq output, ctx, conv)``
    (``ctx``, ``conv`` None in legacy mode)."""
    F = torch.nn.functional
    E, N, K, T, a = c.inner_size, c.state_size, c.conv_size, x.shape[1], c.alpha

    def dense(name, v):
        return v @ P[name]["kernel"] + P[name]["bias"]

    def layer_norm(name, v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + c.norm_eps) * P[name]["gamma"] + P[name]["beta"]

    if "input_projection" in P:
        x = dense("input_projection", x)
    ctxs, convs = [], []
    for i in range(1, c.num_layers + 1):
        b = f"mamba_block_{i}"
        xz = dense(f"{b}_in_proj", layer_norm(f"{b}_norm", x))
        xs, z = xz[..., :E], xz[..., E:]
        if conv0 is None:                                                 # zero left pad
            pad = torch.cat([torch.zeros(x.shape[0], K - 1, E, dtype=x.dtype), xs], dim=1)
        else:
            pad = torch.cat([conv0[:, i - 1], xs], dim=1)                 # [b, K-1+T, E]
        window_mean = sum(pad[:, k:k + T] for k in range(K)) / K
        convs.append(pad[:, T:])
        xs = F.silu(dense(f"{b}_conv_proj", window_mean))
        bc = dense(f"{b}_ssm_bc_proj", xs)
        B, C = bc[..., :N], bc[..., N:]
        delta = F.softplus(dense(f"{b}_ssm_dt_proj", dense(f"{b}_ssm_dt_rank", xs)))
        g = torch.sigmoid(delta.mean(-1, keepdim=True))                   # [b, T, 1]
        gbc = torch.sigmoid((B * C).sum(-1, keepdim=True))                # [b, T, 1]
        gx = g * gbc * xs
        if c.scan_mode == "causal":
            ctx = ctx0[:, i - 1]
            steps = []
            for t in range(T):
                ctx = a * ctx + (1 - a) * gx[:, t]
                steps.append(ctx)
            context = torch.stack(steps, dim=1)
            ctxs.append(ctx)
        else:                       # ctx = gx * alpha^(L-1-t) / sum_t alpha^(L-1-t)
            w = a ** torch.arange(T - 1, -1, -1, dtype=torch.float64)
            context = gx * (w / w.sum())[:, None]
        y = gx + (1 - g) * context
        x = x + dense(f"{b}_out_proj", y * F.silu(z))
        if i < c.num_layers and drop_scales[i - 1] is not None:
            x = x * drop_scales[i - 1]
    if c.scan_mode != "causal":
        return x, None, None
    return x, torch.stack(ctxs, dim=1), torch.stack(convs, dim=1)


AUTOGRAD_CASES = [("causal", False), ("causal", True), ("edifice", False),
                  ("causal_mixed", True), ("edifice_mixed", False)]


@pytest.mark.peers
@pytest.mark.parametrize("case,carried", AUTOGRAD_CASES)
def test_backward_matches_torch_autograd(case, carried):
    torch = require_peer("torch")
    s = setup(case, carried)
    c = s.config
    _, saved = G.forward_with_saved(s.params, s.x, c, state=s.state, **s.kw)
    drops = [None if d is None else torch.tensor(d.scale) for d in saved.dropouts]
    leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)  # noqa: E731
    P = {layer: {k: leaf(v) for k, v in p.items()} for layer, p in s.params.items()}
    tx = leaf(s.x)
    leaves = [tx]
    tctx0 = tconv0 = None
    if s.causal:
        init = s.state or G.init_cache(c, BATCH)
        tctx0, tconv0 = leaf(init.context), leaf(init.conv)
        leaves += [tctx0, tconv0]
    names = [(layer, k) for layer in P for k in P[layer]]
    leaves += [P[layer][k] for layer, k in names]
    out, ctx, conv = torch_forward(torch, P, tx, c, tctx0, tconv0, drops)
    Wt = {k: torch.tensor(v) for k, v in s.W.items()}
    losses = {"last": (out[:, -1] * Wt["last"]).sum(),
              "sequence": (out * Wt["sequence"]).sum()}
    if s.causal:
        losses["last+state"] = (losses["last"] + (ctx * Wt["context"]).sum()
                                + (conv * Wt["conv"]).sum())
    errors = {}
    for loss in s.losses:
        tg = torch.autograd.grad(losses[loss], leaves, retain_graph=True)
        g = s.manual(loss)
        errors[f"{loss}: dx"] = normwise_error(g.x, tg[0].numpy())
        if carried:
            errors[f"{loss}: dstate.context"] = normwise_error(g.state.context, tg[1].numpy())
            errors[f"{loss}: dstate.conv"] = normwise_error(g.state.conv, tg[2].numpy())
        for (layer, k), t in zip(names, tg[len(leaves) - len(names):], strict=True):
            errors[f"{loss}: d{layer}.{k}"] = normwise_error(g.params[layer][k], t.numpy())
            assert np.max(np.abs(t.numpy())) > 1e-5, f"{loss}: d{layer}.{k} is trivially small"
    # the forward agrees too (else the comparison would be of two different functions)
    ref = s.forward(return_sequence=True)
    assert normwise_error(ref.output, out.detach().numpy()) <= SCAN
    if s.causal:
        assert normwise_error(ref.state.context, ctx.detach().numpy()) <= SCAN
        assert normwise_error(ref.state.conv, conv.detach().numpy()) <= SCAN
    worst = max(errors, key=errors.get)
    print(f"{case} carried={carried}: worst autograd error {worst}: {errors[worst]:.2e}")
    assert errors[worst] <= AUTOGRAD, f"worst {worst}: {errors[worst]:.2e}"


# --------------------------------------------------------------------------
# engines, chunks, consistency
# --------------------------------------------------------------------------
def _flat(g: G.GatedSSMGrads) -> dict:
    out = {"x": g.x}
    out.update({f"{layer}.{k}": v for layer, p in g.params.items() for k, v in p.items()})
    if g.state is not None:
        out.update({"state.context": g.state.context, "state.conv": g.state.conv})
    return out


@pytest.mark.parametrize("case,carried", FD_CASES)
def test_core_engines_give_the_same_gradients(case, carried):
    s = setup(case, carried)
    worst_all = 0.0
    for loss in s.losses:
        ref, got = _flat(s.manual(loss, "numpy")), _flat(s.manual(loss, "numba"))
        assert ref.keys() == got.keys()
        errors = {k: normwise_error(got[k], ref[k]) for k in ref}
        worst = max(errors, key=errors.get)
        worst_all = max(worst_all, errors[worst])
        assert errors[worst] <= SCAN, f"numba {loss}: worst {worst}: {errors[worst]:.2e}"
    print(f"{case} carried={carried}: numba vs numpy worst {worst_all:.2e}")


@pytest.mark.parametrize("case", ["causal", "causal_mixed"])
def test_chunked_backward_equals_one_call(case):
    """Backpropagating through the carried state chunk by chunk (``d_state`` in, the state's
    gradient out) gives the one-call gradients; a chunk of 1 frame < conv_size - 1 makes the
    conv buffer carry frames of the chunk before. (Inference: dropout masks are per call.)"""
    s = setup(case, True)
    c, W = s.config, s.W["sequence"]
    d_final = G.GatedSSMCache(s.W["context"], s.W["conv"])
    _, saved = G.forward_with_saved(s.params, s.x, c, state=s.state, return_sequence=True)
    one = G.backward(W, saved, d_state=d_final)
    cuts = [0, 3, 4, 7]
    states, saveds = [s.state], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        res, sv = G.forward_with_saved(s.params, s.x[:, a:b], c, state=states[-1],
                                       return_sequence=True)
        states.append(res.state)
        saveds.append(sv)
    d_state, dxs, dparams = d_final, [], []
    for (a, b), sv in reversed(list(zip(zip(cuts[:-1], cuts[1:]), saveds))):
        g = G.backward(W[:, a:b], sv, d_state=d_state)
        d_state = g.state
        dxs.insert(0, g.x)
        dparams.append(g.params)
    summed = {layer: {k: sum(d[layer][k] for d in dparams) for k in p}
              for layer, p in one.params.items()}
    chunked = _flat(G.GatedSSMGrads(np.concatenate(dxs, axis=1), summed, d_state))
    errors = {k: normwise_error(chunked[k], v) for k, v in _flat(one).items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= SCAN, f"worst {worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("case,carried", FD_CASES)
def test_forward_with_saved_is_forward(case, carried):
    """Same numbers as forward (bit for bit), dropout masks included, both engines."""
    s = setup(case, carried)
    for engine in ("numpy", "numba"):
        for seq in (False, True):
            ref = s.forward(return_sequence=seq, engine=engine)
            res, saved = G.forward_with_saved(s.params, s.x, s.config, state=s.state,
                                              return_sequence=seq, engine=engine, **s.kw)
            np.testing.assert_array_equal(res.output, ref.output)
            if s.causal:
                np.testing.assert_array_equal(res.state.context, ref.state.context)
                np.testing.assert_array_equal(res.state.conv, ref.state.conv)
            else:
                assert res.state is None and ref.state is None
            for a, b in zip(res.hidden_states, ref.hidden_states, strict=True):
                np.testing.assert_array_equal(a, b)
            assert len(saved.blocks) == s.config.num_layers
            assert len(saved.dropouts) == s.config.num_layers - 1
            assert (saved.input_projection is None) == (s.config.embed_dim ==
                                                        s.config.hidden_size)
            assert saved.has_state == carried and saved.return_sequence == seq
            assert all(b.ssm.core.engine == engine for b in saved.blocks)


def test_block_forward_keeps_its_contract():
    """``mamba_block_forward`` (used for tracing) is the saved block's numbers and core."""
    s = setup("causal", True)
    c = s.config
    h = G._dense(s.params["input_projection"], s.x)
    out, buf, ctx, core = G.mamba_block_forward(s.params, h, c, 1, s.state.conv[:, 0],
                                                s.state.context[:, 0])
    out2, buf2, ctx2, saved = G.mamba_block_forward_with_saved(
        s.params, h, c, 1, s.state.conv[:, 0], s.state.context[:, 0])
    assert isinstance(core, GatedEMASaved)
    for a, b in ((out, out2), (buf, buf2), (ctx, ctx2), (core.context, saved.ssm.core.context)):
        np.testing.assert_array_equal(a, b)


def test_dropout_masks_are_saved_and_seeded():
    """Training: the same seed draws the same masks (forward and forward_with_saved alike), a
    different seed others; the backward uses the saved masks (a dropped unit of x_1 gets no
    gradient through the residual path's dropout)."""
    s = setup("causal_mixed", True)
    c = s.config
    run = lambda seed: G.forward_with_saved(s.params, s.x, c, state=s.state,  # noqa: E731
                                            return_sequence=True, training=True, seed=seed)
    (r1, s1), (r2, s2), (_, s3) = run(11), run(11), run(12)
    np.testing.assert_array_equal(s1.dropouts[0].scale, s2.dropouts[0].scale)
    np.testing.assert_array_equal(r1.output, r2.output)
    assert not np.array_equal(s1.dropouts[0].scale, s3.dropouts[0].scale)
    # a generator works as the seed too, and gives the masks of the int seed it was made from
    _, s4 = G.forward_with_saved(s.params, s.x, c, state=s.state, training=True,
                                 seed=np.random.default_rng(11))
    np.testing.assert_array_equal(s1.dropouts[0].scale, s4.dropouts[0].scale)
    # the backward uses the saved masks: with them, training and inference gradients differ
    g_train = G.backward(s.W["sequence"], s1)
    _, s_inf = G.forward_with_saved(s.params, s.x, c, state=s.state, return_sequence=True)
    g_inf = G.backward(s.W["sequence"], s_inf)
    assert normwise_error(g_train.x, g_inf.x) > 1e-2
    with pytest.raises(ValueError, match="forward_with_saved: training=True with dropout > 0 "
                                         "needs seed"):
        G.forward_with_saved(s.params, s.x, c, training=True)


@pytest.mark.parametrize("case,carried", FD_CASES)
def test_gradient_tree_layout(case, carried):
    """dparams has exactly the tree's layers, names, order and shapes; the state gradient
    exists exactly when a state was carried; d_state=None means zero."""
    s = setup(case, carried)
    g = s.manual("last")
    assert list(g.params) == list(s.params)
    for layer in s.params:
        assert list(g.params[layer]) == list(s.params[layer])
    assert tree_shapes(g.params) == G.param_shapes(s.config)
    assert g.x.shape == s.x.shape
    if carried:
        assert g.state.context.shape == s.state.context.shape
        assert g.state.conv.shape == s.state.conv.shape
    else:
        assert g.state is None
    if not s.causal:
        return
    _, saved = G.forward_with_saved(s.params, s.x, s.config, state=s.state, **s.kw)
    zero = G.GatedSSMCache(np.zeros_like(s.W["context"]), np.zeros_like(s.W["conv"]))
    a = _flat(G.backward(s.W["last"], saved))
    b = _flat(G.backward(s.W["last"], saved, d_state=zero))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for half in (G.GatedSSMCache(s.W["context"], None), G.GatedSSMCache(None, s.W["conv"])):
        got = _flat(G.backward(s.W["last"], saved, d_state=half))
        assert normwise_error(got["x"], a["x"]) > 1e-3             # each half of d_state is used


def test_model_methods():
    s = setup("causal", False)
    model = G.GatedSSMModel(s.config, s.params)
    res, saved = model.forward_with_saved(s.x)
    g = model.backward(s.W["last"], saved)
    np.testing.assert_array_equal(g.x, s.manual("last").x)


def test_bad_gradients_are_refused():
    s = setup("causal", True)
    _, saved = G.forward_with_saved(s.params, s.x, s.config, state=s.state)
    with pytest.raises(ValueError, match=r"d_out: expected 2 dimensions"):
        G.backward(s.W["sequence"], saved)
    with pytest.raises(ValueError, match=r"d_out: expected shape \(2, 8\)"):
        G.backward(np.zeros((2, 9)), saved)
    with pytest.raises(ValueError, match="d_out"):
        G.backward(np.full((2, 8), np.nan), saved)
    with pytest.raises(ValueError, match=r"d_state.context: expected shape \(2, 2, 16\)"):
        G.backward(s.W["last"], saved, d_state=G.GatedSSMCache(np.zeros((2, 2, 15)), None))
    with pytest.raises(ValueError, match=r"d_state.conv: expected shape \(2, 2, 2, 16\)"):
        G.backward(s.W["last"], saved, d_state=G.GatedSSMCache(None, np.zeros((2, 2, 3, 16))))
    with pytest.raises(ValueError, match="d_state.context"):
        G.backward(s.W["last"], saved,
                   d_state=G.GatedSSMCache(np.full((2, 2, 16), np.inf), None))
    with pytest.raises(ValueError, match="d_state: expected a GatedSSMCache"):
        G.backward(s.W["last"], saved, d_state=np.zeros(3))
    with pytest.raises(ValueError, match="saved: expected the GatedSSMSaved"):
        G.backward(s.W["last"], saved.blocks[0])
    # the legacy mode has no state: none in, none out, no gradient of one
    e = setup("edifice", False)
    _, saved = G.forward_with_saved(e.params, e.x, e.config, return_sequence=True)
    with pytest.raises(ValueError, match="d_state: GatedSSM scan_mode 'legacy' returns no state"):
        G.backward(e.W["sequence"], saved, d_state=G.GatedSSMCache(None, None))
    with pytest.raises(ValueError, match="state: GatedSSM scan_mode 'legacy' has no carried"):
        G.forward_with_saved(e.params, e.x, e.config,
                             state=G.init_cache(e.config.replace(preset="causal"), BATCH))
