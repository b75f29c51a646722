"""Manual backward of the whole Mamba model (``forward_with_saved`` / ``backward``), float64.

Golden fixtures carry gradients from this backward, so it is checked three
independent ways (DESIGN.md section 4 budgets, error = normwise
``max|a - b| / max|b|``, per array):

* central finite differences of the public :func:`refssm.models.mamba.forward`,
  element by element, for ``dx``, every parameter and the carried state:
  <= 1e-6;
* torch autograd on a float64 torch transcription of the forward written
  here from DESIGN.md 1.1 (not from refssm's code): <= 1e-10;
* the three scan engines against each other: <= 1e-12.

Cases (``hidden 8, state 3, expand 2, conv 3, 2 layers, seq_len 7, batch 2``):
both presets, each with and without a carried state, and two mixed configs
that flip every flag to its other value (among them ``dt_rank = 2``, no input
projection, no conv bias, an *active* delta clip, dropout in training). Each
finite-difference sweep differentiates three scalar losses at once (the
perturbed forward is shared): ``<W, output[:, -1]>`` (last timestep),
``<W, output>`` (whole sequence), and the last-timestep loss plus ``<Wh,
state.h> + <Wc, state.conv>`` (a loss on the returned state, ``d_state``).
Parameters come from ``random_params`` (deltas inside Edifice's clip, every
value away from the one that would hide a bug), and every finite-difference
gradient is checked to be non-trivial, so no comparison passes as ``0 == 0``.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import require_peer
from refssm.models import mamba as M
from refssm.models._common import tree_shapes
from refssm.ops.activations import softplus_forward
from refssm.verify.metrics import BUDGETS, normwise_error

FD = BUDGETS["grad_fd"]              # 1e-6
AUTOGRAD = BUDGETS["grad_autograd"]  # 1e-10
SCAN = BUDGETS["scan"]               # 1e-12
EPS = 1e-4                           # central-difference step: truncation ~ roundoff here
BATCH, SEQ_LEN = 2, 7

BASE = dict(embed_dim=5, hidden_size=8, state_size=3, expand_factor=2, conv_size=3, num_layers=2)
CASES = {
    "mamba_ssm": dict(preset="mamba_ssm"),
    "edifice": dict(preset="edifice"),
    # every mamba_ssm flag flipped except x_proj; dt_rank 2; embed == hidden; the clip active
    "mixed_1": dict(preset="mamba_ssm", embed_dim=8, norm="layer", a_param="fixed", d_skip=False,
                    dt_rank=2, proj_bias=True, conv_bias=False, delta_clip=(0.001, 0.1),
                    b_bar="channel_mean"),
    # every edifice flag flipped except x_proj; dt_rank 2; dropout in training
    "mixed_2": dict(preset="edifice", norm="rms", final_norm=True, a_param="learned", d_skip=True,
                    dt_rank=2, proj_bias=False, conv_bias=False, delta_clip=None,
                    b_bar="per_channel", dropout=0.3),
}
DELTA_RANGE = {"mixed_1": (3e-4, 0.3)}        # straddles the clip [0.001, 0.1]
TRAINING = {"mixed_2": dict(training=True, seed=11)}
LOSSES = ("last", "sequence", "last+state")


class Setup:
    """One case: config, parameters, input, carried state, loss weights."""

    def __init__(self, case: str, carried: bool):
        self.case, self.carried = case, carried
        self.config = M.MambaConfig(**{**BASE, **CASES[case]})
        self.params = M.random_params(self.config, seed=1,
                                      delta_range=DELTA_RANGE.get(case, (0.005, 0.04)))
        self.kw = TRAINING.get(case, {})
        rng = np.random.default_rng(2)
        self.x = rng.standard_normal((BATCH, SEQ_LEN, self.config.embed_dim))
        self.state = None
        if carried:      # the state after a random prefix: non-zero conv buffer and h
            prefix = M.forward(self.params, rng.standard_normal((BATCH, 4, self.config.embed_dim)),
                               self.config)
            self.state = M.MambaCache(prefix.state.h.copy(), prefix.state.conv.copy())
        ref = M.forward(self.params, self.x, self.config, state=self.state,
                        return_sequence=True, **self.kw)
        H = self.config.hidden_size
        self.W = {"last": rng.standard_normal((BATCH, H)),
                  "sequence": rng.standard_normal((BATCH, SEQ_LEN, H)),
                  "h": rng.standard_normal(ref.state.h.shape),
                  "conv": rng.standard_normal(ref.state.conv.shape)}

    def forward(self, params=None, x=None, state=None, **kw):
        return M.forward(self.params if params is None else params,
                         self.x if x is None else x, self.config,
                         state=self.state if state is None else state,
                         **{**self.kw, **kw})

    def row_losses(self, res, base) -> np.ndarray:
        """``[3, rows]``: the three losses of every row (row ``r`` weighted as row ``base[r]``)."""
        W = self.W
        out = res.output                                                  # [rows, L, H]
        last = np.einsum("rh,rh->r", W["last"][base], out[:, -1])
        seq = np.einsum("rth,rth->r", W["sequence"][base], out)
        state = (np.einsum("rlen,rlen->r", W["h"][base], res.state.h)
                 + np.einsum("rlke,rlke->r", W["conv"][base], res.state.conv))
        return np.stack([last, seq, last + state])

    def manual(self, loss: str, engine: str = "numpy") -> M.MambaGrads:
        """refssm's backward for one of :data:`LOSSES`."""
        res, saved = M.forward_with_saved(self.params, self.x, self.config, state=self.state,
                                          return_sequence=(loss == "sequence"), engine=engine,
                                          **self.kw)
        d_out = self.W["sequence"] if loss == "sequence" else self.W["last"]
        d_state = M.MambaCache(self.W["h"], self.W["conv"]) if loss == "last+state" else None
        return M.backward(d_out, saved, d_state=d_state)


@functools.lru_cache(maxsize=None)
def setup(case: str, carried: bool) -> Setup:
    return Setup(case, carried)


def _fd_rows(s: Setup, array_name: str) -> np.ndarray:
    """Central differences for ``x`` or the state, all elements in one batched forward.

    Batch rows are independent (norms are per frame), so every perturbed copy
    of a row is its own row of one big batch; row ``r`` is weighted as the
    original row it copies. Returns ``[3, *shape]``.
    """
    base_x, st = s.x, s.state
    arrays = {"x": base_x, "h": None if st is None else st.h,
              "conv": None if st is None else st.conv}
    target = arrays[array_name]
    idx = list(np.ndindex(target.shape))
    rows = np.array([i[0] for i in idx] * 2)                             # + then -
    big = {k: None if v is None else v[rows].copy() for k, v in arrays.items()}
    for r, i in enumerate(idx):
        big[array_name][(r,) + i[1:]] += EPS
        big[array_name][(r + len(idx),) + i[1:]] -= EPS
    state = None if st is None else M.MambaCache(big["h"], big["conv"])
    res = M.forward(s.params, big["x"], s.config, state=state, return_sequence=True, **s.kw)
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
def fd_sweep(case: str, carried: bool) -> dict:
    """Finite-difference gradients of the three losses: ``{"x", (layer, name), "h", "conv"}``."""
    s = setup(case, carried)
    params = {layer: {k: v.copy() for k, v in p.items()} for layer, p in s.params.items()}
    x = s.x.copy()
    grads = {}
    if s.kw.get("training"):      # dropout masks depend on the batch shape: no batching
        grads["x"] = _fd_elementwise(s, x, params, x)
        assert s.state is None, "the training case runs without a carried state"
    else:
        grads["x"] = _fd_rows(s, "x")
        if carried:
            grads["h"] = _fd_rows(s, "h")
            grads["conv"] = _fd_rows(s, "conv")
    for layer, p in params.items():
        for name, arr in p.items():
            grads[(layer, name)] = _fd_elementwise(s, arr, params, x)
    return grads


FD_CASES = [("mamba_ssm", False), ("mamba_ssm", True), ("edifice", False), ("edifice", True),
            ("mixed_1", True), ("mixed_2", False)]


@pytest.mark.parametrize("case,carried", FD_CASES)
def test_backward_matches_finite_differences(case, carried):
    s = setup(case, carried)
    fd = fd_sweep(case, carried)
    errors = {}
    for k, loss in enumerate(LOSSES):
        g = s.manual(loss)
        pairs = [("x", g.x, fd["x"][k])]
        pairs += [(f"{layer}.{name}", g.params[layer][name], fd[(layer, name)][k])
                  for layer, names in M.param_shapes(s.config).items() for name in names]
        if carried:
            pairs += [("state.h", g.state.h, fd["h"][k]),
                      ("state.conv", g.state.conv, fd["conv"][k])]
        else:
            assert g.state is None
        for name, manual, numeric in pairs:
            # teeth: a gradient that is zero (or lost in rounding) would compare as 0 == 0
            assert np.max(np.abs(numeric)) > 1e-5, f"{loss}: d{name} is trivially small"
            errors[f"{loss}: d{name}"] = normwise_error(manual, numeric)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= FD, f"worst {worst}: {errors[worst]:.2e}"
    # and the sweep has the resolution to see a plausible bug: d A_log without its chain
    # factor A (= -exp(A_log)) would be off by O(1), far above the budget
    if s.config.a_param == "learned":
        g = s.manual("last")
        A = -np.exp(s.params["mamba_block_1_ssm"]["A_log"])
        assert normwise_error(g.params["mamba_block_1_ssm"]["A_log"] / A,
                              fd[("mamba_block_1_ssm", "A_log")][0]) > 0.1


def test_the_cases_have_teeth():
    """Edifice's deltas sit inside the clip (a saturated clip has zero gradient); mixed_1's clip
    is active for some deltas and not others, and no delta is within reach of a clip edge for
    the finite-difference step."""
    for case in ("edifice", "mixed_1"):
        s = setup(case, True)
        c = s.config
        _, saved = M.forward_with_saved(s.params, s.x, c, state=s.state)
        lo, hi = c.delta_clip
        dt = np.concatenate([softplus_forward(b.scan.scan.delta_pre)[0].ravel()
                             for b in saved.blocks])
        inside = (dt > lo) & (dt < hi)
        if case == "edifice":
            assert inside.all() and dt.min() > 2 * lo and dt.max() < 0.9 * hi
        else:
            assert 0.2 < inside.mean() < 0.8, inside.mean()
        gap = np.minimum(np.abs(dt - lo) / lo, np.abs(dt - hi) / hi).min()
        assert gap > 1e-2, gap
    # mixed_2 really drops something, and the state carried into the carried cases is not zero
    s = setup("mixed_2", False)
    _, saved = M.forward_with_saved(s.params, s.x, s.config, **s.kw)
    scale = saved.dropouts[0].scale
    assert 0 < np.mean(scale == 0) < 0.6
    for case in ("mamba_ssm", "edifice", "mixed_1"):
        st = setup(case, True).state
        assert np.abs(st.h).min() > 0 and np.abs(st.conv).min() > 0


# --------------------------------------------------------------------------
# torch autograd on an independent float64 transcription
# --------------------------------------------------------------------------
def torch_forward(torch, P, x, c, h0, conv0, drop_scales):
    """The model of DESIGN.md 1.1 in torch, literally; returns ``(seq output, h, conv)``."""
    F = torch.nn.functional
    E, N, R, K, T = c.inner_size, c.state_size, c.dt_rank_size, c.conv_size, x.shape[1]

    def dense(name, v):
        y = v @ P[name]["kernel"]
        return y + P[name]["bias"] if "bias" in P[name] else y

    def norm(name, v):
        if c.norm == "layer":
            mu = v.mean(-1, keepdim=True)
            var = ((v - mu) ** 2).mean(-1, keepdim=True)
            return (v - mu) / torch.sqrt(var + c.norm_eps) * P[name]["gamma"] + P[name]["beta"]
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + c.norm_eps) * P[name]["gamma"]

    if "input_projection" in P:
        x = dense("input_projection", x)
    hs, convs = [], []
    for i in range(1, c.num_layers + 1):
        b = f"mamba_block_{i}"
        xz = dense(f"{b}_in_proj", norm(f"{b}_norm", x))
        xs0, z = xz[..., :E], xz[..., E:]
        pad = torch.cat([conv0[:, i - 1], xs0], dim=1)                    # [b, K-1+T, E]
        w = P[f"{b}_conv_dw_conv"]["kernel"][:, 0, :]                     # [K, E]
        pre = sum(w[k] * pad[:, k:k + T] for k in range(K))
        if c.conv_bias:
            pre = pre + P[f"{b}_conv_dw_conv"]["bias"]
        convs.append(pad[:, T:])
        xs = F.silu(pre)
        if c.x_proj == "fused":
            xd = dense(f"{b}_ssm_x_proj", xs)
            dt_low, B, C = xd[..., :R], xd[..., R:R + N], xd[..., R + N:]
        else:
            bc = dense(f"{b}_ssm_bc_proj", xs)
            B, C = bc[..., :N], bc[..., N:]
            dt_low = dense(f"{b}_ssm_dt_rank", xs)
        delta = F.softplus(dense(f"{b}_ssm_dt_proj", dt_low))
        if c.delta_clip is not None:
            delta = torch.clamp(delta, *c.delta_clip)
        delta_B = delta.mean(-1, keepdim=True) if c.b_bar == "channel_mean" else delta
        if c.a_param == "learned":
            A = -torch.exp(P[f"{b}_ssm"]["A_log"])
        else:
            A = -torch.arange(1, N + 1, dtype=torch.float64).expand(E, N)
        h = h0[:, i - 1]
        ys = []
        for t in range(T):
            h = (torch.exp(delta[:, t, :, None] * A) * h
                 + delta_B[:, t, :, None] * B[:, t, None, :] * xs[:, t, :, None])
            ys.append((h * C[:, t, None, :]).sum(-1))
        y = torch.stack(ys, dim=1)
        if c.d_skip:
            y = y + P[f"{b}_ssm"]["D"] * xs
        hs.append(h)
        x = x + dense(f"{b}_out_proj", y * F.silu(z))
        if i < c.num_layers and drop_scales[i - 1] is not None:
            x = x * drop_scales[i - 1]
    if c.final_norm:
        x = norm("final_norm", x)
    return x, torch.stack(hs, dim=1), torch.stack(convs, dim=1)


@pytest.mark.peers
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_torch_autograd(case, carried):
    torch = require_peer("torch")
    s = setup(case, carried)
    c = s.config
    _, saved = M.forward_with_saved(s.params, s.x, c, state=s.state, **s.kw)
    drops = [None if d is None else torch.tensor(d.scale) for d in saved.dropouts]
    leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)  # noqa: E731
    P = {layer: {k: leaf(v) for k, v in p.items()} for layer, p in s.params.items()}
    init = s.state or M.init_cache(c, BATCH)
    tx, th0, tconv0 = leaf(s.x), leaf(init.h), leaf(init.conv)
    out, h, conv = torch_forward(torch, P, tx, c, th0, tconv0, drops)
    Wt = {k: torch.tensor(v) for k, v in s.W.items()}
    losses = {"last": (out[:, -1] * Wt["last"]).sum(),
              "sequence": (out * Wt["sequence"]).sum()}
    losses["last+state"] = losses["last"] + (h * Wt["h"]).sum() + (conv * Wt["conv"]).sum()
    leaves = [tx, th0, tconv0] + [P[layer][k] for layer in P for k in P[layer]]
    errors = {}
    for loss in LOSSES:
        tg = torch.autograd.grad(losses[loss], leaves, retain_graph=True)
        g = s.manual(loss)
        errors[f"{loss}: dx"] = normwise_error(g.x, tg[0].numpy())
        if carried:
            errors[f"{loss}: dstate.h"] = normwise_error(g.state.h, tg[1].numpy())
            errors[f"{loss}: dstate.conv"] = normwise_error(g.state.conv, tg[2].numpy())
        names = [(layer, k) for layer in P for k in P[layer]]
        for (layer, k), t in zip(names, tg[3:]):
            errors[f"{loss}: d{layer}.{k}"] = normwise_error(g.params[layer][k], t.numpy())
            assert np.max(np.abs(t.numpy())) > 1e-5, f"{loss}: d{layer}.{k} is trivially small"
    # the forward agrees too (else the comparison would be of two different functions)
    ref = s.forward(return_sequence=True)
    assert normwise_error(ref.output, out.detach().numpy()) <= SCAN
    assert normwise_error(ref.state.h, h.detach().numpy()) <= SCAN
    worst = max(errors, key=errors.get)
    assert errors[worst] <= AUTOGRAD, f"worst {worst}: {errors[worst]:.2e}"


# --------------------------------------------------------------------------
# engines, chunks, consistency
# --------------------------------------------------------------------------
def _flat(g: M.MambaGrads) -> dict:
    out = {"x": g.x}
    out.update({f"{layer}.{k}": v for layer, p in g.params.items() for k, v in p.items()})
    if g.state is not None:
        out.update({"state.h": g.state.h, "state.conv": g.state.conv})
    return out


@pytest.mark.parametrize("engine", ["numba", "logdepth"])
@pytest.mark.parametrize("case", list(CASES))
def test_scan_engines_give_the_same_gradients(case, engine):
    s = setup(case, case != "mixed_2")
    for loss in ("sequence", "last+state"):
        ref, got = _flat(s.manual(loss, "numpy")), _flat(s.manual(loss, engine))
        assert ref.keys() == got.keys()
        errors = {k: normwise_error(got[k], ref[k]) for k in ref}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= SCAN, f"{engine} {loss}: worst {worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("case", ["mamba_ssm", "edifice", "mixed_1"])
def test_chunked_backward_equals_one_call(case):
    """Backpropagating through the carried state chunk by chunk (``d_state`` in, the state's
    gradient out) gives the one-call gradients; a chunk of 1 frame < conv_size - 1 makes the
    conv buffer carry frames of the chunk before."""
    s = setup(case, True)
    c, W = s.config, s.W["sequence"]
    d_final = M.MambaCache(s.W["h"], s.W["conv"])
    _, saved = M.forward_with_saved(s.params, s.x, c, state=s.state, return_sequence=True)
    one = M.backward(W, saved, d_state=d_final)
    cuts = [0, 3, 4, 7]
    states, saveds = [s.state], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        res, sv = M.forward_with_saved(s.params, s.x[:, a:b], c, state=states[-1],
                                       return_sequence=True)
        states.append(res.state)
        saveds.append(sv)
    d_state, dxs, dparams = d_final, [], []
    for (a, b), sv in reversed(list(zip(zip(cuts[:-1], cuts[1:]), saveds))):
        g = M.backward(W[:, a:b], sv, d_state=d_state)
        d_state = g.state
        dxs.insert(0, g.x)
        dparams.append(g.params)
    summed = {layer: {k: sum(d[layer][k] for d in dparams) for k in p}
              for layer, p in one.params.items()}
    chunked = _flat(M.MambaGrads(np.concatenate(dxs, axis=1), summed, d_state))
    errors = {k: normwise_error(chunked[k], v) for k, v in _flat(one).items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= SCAN, f"worst {worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_forward_with_saved_is_forward(case):
    """Same numbers as forward (bit for bit), dropout masks included."""
    s = setup(case, case != "mixed_2")
    for seq in (False, True):
        ref = s.forward(return_sequence=seq)
        res, saved = M.forward_with_saved(s.params, s.x, s.config, state=s.state,
                                          return_sequence=seq, **s.kw)
        np.testing.assert_array_equal(res.output, ref.output)
        np.testing.assert_array_equal(res.state.h, ref.state.h)
        np.testing.assert_array_equal(res.state.conv, ref.state.conv)
        for a, b in zip(res.hidden_states, ref.hidden_states, strict=True):
            np.testing.assert_array_equal(a, b)
        assert len(saved.blocks) == s.config.num_layers
        assert len(saved.dropouts) == s.config.num_layers - 1
        assert (saved.input_projection is None) == (s.config.embed_dim == s.config.hidden_size)
        assert (saved.final_norm is None) != s.config.final_norm


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_tree_layout(case):
    """dparams has exactly the tree's layers, names, order and shapes; the state gradient
    exists exactly when a state was carried; d_state=None means zero."""
    for carried in ((False,) if case == "mixed_2" else (False, True)):
        s = setup(case, carried)
        g = s.manual("last")
        assert list(g.params) == list(s.params)
        for layer in s.params:
            assert list(g.params[layer]) == list(s.params[layer])
        assert tree_shapes(g.params) == M.param_shapes(s.config)
        assert g.x.shape == s.x.shape
        if carried:
            assert g.state.h.shape == s.state.h.shape and g.state.conv.shape == s.state.conv.shape
        else:
            assert g.state is None
        _, saved = M.forward_with_saved(s.params, s.x, s.config, state=s.state, **s.kw)
        zero = M.MambaCache(np.zeros_like(s.W["h"]), np.zeros_like(s.W["conv"]))
        a, b = _flat(M.backward(s.W["last"], saved)), _flat(M.backward(s.W["last"], saved,
                                                                         d_state=zero))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        half = _flat(M.backward(s.W["last"], saved, d_state=M.MambaCache(s.W["h"], None)))
        assert normwise_error(half["x"], a["x"]) > 1e-3          # d_state.h is used


def test_model_methods():
    s = setup("mamba_ssm", False)
    model = M.MambaModel(s.config, s.params)
    res, saved = model.forward_with_saved(s.x)
    g = model.backward(s.W["last"], saved)
    np.testing.assert_array_equal(g.x, s.manual("last").x)


def test_bad_gradients_are_refused():
    s = setup("mamba_ssm", True)
    _, saved = M.forward_with_saved(s.params, s.x, s.config, state=s.state)
    with pytest.raises(ValueError, match=r"d_out: expected 2 dimensions"):
        M.backward(s.W["sequence"], saved)
    with pytest.raises(ValueError, match=r"d_out: expected shape \(2, 8\)"):
        M.backward(np.zeros((2, 9)), saved)
    with pytest.raises(ValueError, match="d_out"):
        M.backward(np.full((2, 8), np.nan), saved)
    with pytest.raises(ValueError, match=r"d_state.h: expected shape \(2, 2, 16, 3\)"):
        M.backward(s.W["last"], saved, d_state=M.MambaCache(np.zeros((2, 2, 16, 4)), None))
    with pytest.raises(ValueError, match="d_state: expected a MambaCache"):
        M.backward(s.W["last"], saved, d_state=np.zeros(3))
    with pytest.raises(ValueError, match="saved: expected the MambaSaved"):
        M.backward(s.W["last"], saved.blocks[0])
