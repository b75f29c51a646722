"""Manual backward of the whole S5 model (``forward_with_saved`` / ``backward``), float64.

Golden fixtures carry gradients from this backward, so it is checked three
independent ways (DESIGN.md section 4 budgets, error = normwise
``max|a - b| / max|b|``, per array):

* central finite differences of the public :func:`refssm.models.s5.forward`,
  element by element, for ``dx``, every parameter and the carried state
  (its real and imaginary parts, for the ``s5`` preset's complex state):
  <= 1e-6;
* torch autograd on a float64 torch transcription of the forward written
  here from DESIGN.md 1.3 (not from refssm's code): <= 1e-10;
* every engine against numpy (``numba``, ``logdepth``, and ``fft``,
  ``fft_dense`` for the LTI ``s5`` SSM; the ``edifice`` SSM is time-varying
  and has no FFT engine): <= 1e-12.

Cases (``hidden 8, state 4, 2 layers, ffn_expand 2, seq_len 7, batch 2``;
``ffn_expand`` is 2 rather than the default 4 only to halve the
finite-difference sweep, the code path is the same): both presets, each with
and without a carried state; ``mixed_s5`` flips every S5 option off its
default (no input projection, the tanh GELU, bilinear, no conjugate
symmetry, an *active* eigenvalue clip, ``step_rescale``) and trains with
S5's default dropout 0.1 from a carried state; ``mixed_edifice`` adds a GELU
and trains with dropout 0.3; ``bidir`` is the non-causal S5 (``C1``, ``C2``,
no state). The finite differences cover every parameter of four of these and
``x``, the state and the SSM sub-layers' parameters of the rest (see
:data:`FD_CASES`). Each finite-difference sweep differentiates the scalar losses at
once (the perturbed forward is shared): ``<W, output[:, -1]>`` (last
timestep), ``<W, output>`` (whole sequence), and the last-timestep loss plus
a loss on the returned state, ``<Wr, Re h> + <Wi, Im h>`` (``d_state = Wr +
i Wi``; real ``W h`` for ``edifice``). Parameters come from
``random_params`` and every finite-difference gradient is checked to be
non-trivial, so no comparison passes as ``0 == 0``.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import require_peer
from refssm.models import s5 as M
from refssm.models._common import tree_shapes
from refssm.ssm import s5 as core
from refssm.verify.metrics import BUDGETS, normwise_error

FD = BUDGETS["grad_fd"]              # 1e-6
AUTOGRAD = BUDGETS["grad_autograd"]  # 1e-10
SCAN = BUDGETS["scan"]               # 1e-12
EPS = 1e-5                           # central-difference step: truncation ~ roundoff here
#: ``Lambda`` acts only through ``Lambda * Delta`` (``Delta <= 0.15``): its gradients are small
#: and its differences at ``EPS`` round-off bound (5.7e-7 in mixed_s5; 4e-8 at 1e-4, where the
#: others' truncation error is 1.5e-6: one step for all cannot serve both).
EPS_OF = {"Lambda_re": 1e-4, "Lambda_im": 1e-4}
BATCH, SEQ_LEN = 2, 7

BASE = dict(embed_dim=5, hidden_size=8, state_size=4, num_layers=2, ffn_expand=2)
CASES = {
    "s5": dict(preset="s5"),
    "edifice": dict(preset="edifice"),
    # every S5 option off its default; S5's default dropout 0.1, in training
    "mixed_s5": dict(preset="s5", embed_dim=8, activation="gelu_tanh", discretization="bilinear",
                     conj_sym=False, clip_eigs=True, step_rescale=1.5),
    # Edifice's SSM with a GELU after it, no input projection, dropout 0.3 in training
    "mixed_edifice": dict(preset="edifice", embed_dim=8, activation="gelu", dropout=0.3),
    "bidir": dict(preset="s5", bidirectional=True),
}
TRAINING = {"mixed_s5": dict(training=True, seed=11), "mixed_edifice": dict(training=True, seed=12)}
#: Re(Lambda) set above the clip -1e-4 (clipped: zero gradient), per layer and state.
CLIPPED = {"mixed_s5": {("s5_block_1_ssm_ssm", 0): 0.05, ("s5_block_2_ssm_ssm", 2): 0.02}}


def figure(name, value):
    print(f"FIGURE {name}: {value:.3e}")


class Setup:
    """One case: config, parameters, input, carried state, loss weights."""

    def __init__(self, case: str, carried: bool):
        self.case, self.carried = case, carried
        self.config = c = M.S5Config(**{**BASE, **CASES[case]})
        self.params = M.random_params(c, seed=1)
        for (layer, k), value in CLIPPED.get(case, {}).items():
            self.params[layer]["Lambda_re"][k] = value
        self.kw = TRAINING.get(case, {})
        self.has_state = not c.bidirectional
        self.losses = ("last", "sequence") + (("last+state",) if self.has_state else ())
        rng = np.random.default_rng(2)
        self.x = rng.standard_normal((BATCH, SEQ_LEN, c.embed_dim))
        self.state = None
        if carried:      # the state after a random prefix: non-zero h in every layer
            prefix = M.forward(self.params, rng.standard_normal((BATCH, 4, c.embed_dim)), c)
            self.state = M.S5Cache(prefix.state.h.copy())
        H = c.hidden_size
        self.W = {"last": rng.standard_normal((BATCH, H)),
                  "sequence": rng.standard_normal((BATCH, SEQ_LEN, H))}
        if self.has_state:
            shape = M.init_cache(c, BATCH).h.shape
            self.W["h"] = rng.standard_normal(shape)
            if c.ssm == "s5":      # d_state = dL/dRe(h) + i dL/dIm(h)
                self.W["h"] = self.W["h"] + 1j * rng.standard_normal(shape)

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
        state = np.zeros_like(last)
        if self.has_state:       # <Wr, Re h> + <Wi, Im h> = Re <conj(W), h>
            h = res.state.h
            state = np.real(np.sum(np.conj(W["h"][base]) * h, axis=tuple(range(1, h.ndim))))
        return np.stack([last, seq, last + state])

    def manual(self, loss: str, engine: str = "numpy") -> M.S5Grads:
        """refssm's backward for one of the losses."""
        res, saved = M.forward_with_saved(self.params, self.x, self.config, state=self.state,
                                          return_sequence=(loss == "sequence"), engine=engine,
                                          **self.kw)
        d_out = self.W["sequence"] if loss == "sequence" else self.W["last"]
        d_state = M.S5Cache(self.W["h"]) if loss == "last+state" else None
        return M.backward(d_out, saved, d_state=d_state)


@functools.lru_cache(maxsize=None)
def setup(case: str, carried: bool) -> Setup:
    return Setup(case, carried)


def _real_view(a: np.ndarray) -> np.ndarray:
    """A real view of ``a`` (complex: ``[..., 2P]``, re and im interleaved) to perturb in place."""
    return a.view(np.float64) if np.iscomplexobj(a) else a


def _as_grad(fd: np.ndarray, like: np.ndarray) -> np.ndarray:
    """FD of a real view back in ``like``'s layout: ``dL/dRe + i dL/dIm`` for complex."""
    fd = np.ascontiguousarray(fd)
    return fd.view(np.complex128) if np.iscomplexobj(like) else fd


def _fd_rows(s: Setup, array_name: str) -> np.ndarray:
    """Central differences for ``x`` or the state, all elements in one batched forward.

    Batch rows are independent (norms are per frame, each row has its own
    state), so every perturbed copy of a row is its own row of one big batch;
    row ``r`` is weighted as the original row it copies. Returns ``[3, *shape]``
    (complex for the ``s5`` state).
    """
    arrays = {"x": s.x, "h": None if s.state is None else s.state.h}
    target = arrays[array_name]
    real_shape = _real_view(target).shape
    idx = list(np.ndindex(real_shape))
    rows = np.array([i[0] for i in idx] * 2)                             # + then -
    big = {k: None if v is None else v[rows].copy() for k, v in arrays.items()}
    view = _real_view(big[array_name])
    for r, i in enumerate(idx):
        view[(r,) + i[1:]] += EPS
        view[(r + len(idx),) + i[1:]] -= EPS
    state = None if s.state is None else M.S5Cache(big["h"])
    res = M.forward(s.params, big["x"], s.config, state=state, return_sequence=True, **s.kw)
    losses = s.row_losses(res, rows)
    fd = ((losses[:, :len(idx)] - losses[:, len(idx):]) / (2 * EPS)).reshape((3,) + real_shape)
    return np.stack([_as_grad(f, target) for f in fd])


def _fd_elementwise(s: Setup, target: np.ndarray, params, x, state,
                    eps: float = EPS) -> np.ndarray:
    """Central differences for every element of ``target`` (an array inside ``params``, ``x``
    or ``state``, perturbed in place and restored). Returns ``[3, *shape]``."""
    view = _real_view(target)
    out = np.empty((3,) + view.shape)
    base = np.arange(BATCH)
    for i in np.ndindex(view.shape):
        v = view[i]
        view[i] = v + eps
        lp = s.row_losses(s.forward(params, x, state, return_sequence=True), base).sum(axis=1)
        view[i] = v - eps
        lm = s.row_losses(s.forward(params, x, state, return_sequence=True), base).sum(axis=1)
        view[i] = v
        out[(slice(None),) + i] = (lp - lm) / (2 * eps)
    return np.stack([_as_grad(f, target) for f in out])


def _in_scope(layer: str, scope: str) -> bool:
    """``"all"`` layers, or ``"ssm"``: the SSM sub-layers' (``s5_block_{i}_ssm_*``) only."""
    return scope == "all" or (layer.startswith("s5_block_") and "_ssm_" in layer)


@functools.lru_cache(maxsize=None)
def fd_sweep(case: str, carried: bool, scope: str = "all") -> dict:
    """Finite-difference gradients of the three losses: ``{"x", (layer, name), "h"}`` (the
    parameters of the layers in ``scope``)."""
    s = setup(case, carried)
    params = {layer: {k: v.copy() for k, v in p.items()} for layer, p in s.params.items()}
    x = s.x.copy()
    state = None if s.state is None else M.S5Cache(s.state.h.copy())
    grads = {}
    if s.kw.get("training"):      # dropout masks depend on the batch shape: no batching
        grads["x"] = _fd_elementwise(s, x, params, x, state)
        if carried:
            grads["h"] = _fd_elementwise(s, state.h, params, x, state)
    else:
        grads["x"] = _fd_rows(s, "x")
        if carried:
            grads["h"] = _fd_rows(s, "h")
    for layer, p in params.items():
        for name, arr in p.items() if _in_scope(layer, scope) else ():
            grads[(layer, name)] = _fd_elementwise(s, arr, params, x, state,
                                                   EPS_OF.get(name, EPS))
    return grads


#: (case, carried, scope). Both presets with a carried state and mixed_edifice without one
#: sweep every parameter; s5 and edifice without a state and bidir sweep ``x`` and the SSM
#: sub-layers' parameters (the rest of their backward is the code the full sweeps check),
#: which keeps the file fast. torch autograd checks every parameter of every case.
FD_CASES = [("s5", True, "all"), ("edifice", True, "all"), ("mixed_s5", True, "all"),
            ("mixed_edifice", False, "all"), ("s5", False, "ssm"), ("edifice", False, "ssm"),
            ("bidir", False, "ssm")]


@pytest.mark.parametrize("case,carried,scope", FD_CASES)
def test_backward_matches_finite_differences(case, carried, scope):
    s = setup(case, carried)
    fd = fd_sweep(case, carried, scope)
    errors = {}
    for k, loss in enumerate(s.losses):
        g = s.manual(loss)
        pairs = [("x", g.x, fd["x"][k])]
        pairs += [(f"{layer}.{name}", g.params[layer][name], fd[(layer, name)][k])
                  for layer, names in M.param_shapes(s.config).items() for name in names
                  if _in_scope(layer, scope)]
        if carried:
            assert g.state.h.dtype == s.state.h.dtype
            pairs += [("state.h", g.state.h, fd["h"][k])]
        else:
            assert g.state is None
        for name, manual, numeric in pairs:
            # teeth: a gradient that is zero (or lost in rounding) would compare as 0 == 0
            assert np.max(np.abs(numeric)) > 1e-5, f"{loss}: d{name} is trivially small"
            errors[f"{loss}: d{name}"] = normwise_error(manual, numeric)
    worst = max(errors, key=errors.get)
    figure(f"fd {case} carried={carried} worst ({worst})", errors[worst])
    assert errors[worst] <= FD, f"worst {worst}: {errors[worst]:.2e}"
    # the sweep has the resolution to see a plausible bug: d log_step without its chain
    # factor Delta (= step_rescale exp(log_step) ~ 1e-2) would be off by O(1)
    if s.config.ssm == "s5":
        g = s.manual("last")
        Delta = s.config.step_rescale * np.exp(s.params["s5_block_1_ssm_ssm"]["log_step"])
        assert normwise_error(g.params["s5_block_1_ssm_ssm"]["log_step"] / Delta,
                              fd[("s5_block_1_ssm_ssm", "log_step")][0]) > 0.1


def test_the_cases_have_teeth():
    """mixed_s5's eigenvalue clip is active for some states and not others (none within the
    finite-difference step of its edge); dropout really drops something in both training cases;
    the carried states are non-zero and carry (|Lambda_bar| near 1)."""
    s = setup("mixed_s5", True)
    for layer in ("s5_block_1_ssm_ssm", "s5_block_2_ssm_ssm"):
        re = s.params[layer]["Lambda_re"]
        clipped = re > core.CLIP_EIGS_MAX
        assert clipped.any() and not clipped.all()
        assert np.min(np.abs(re - core.CLIP_EIGS_MAX)) > 10 * EPS_OF["Lambda_re"]
    g = s.manual("last")
    fd = fd_sweep("mixed_s5", True, "all")
    for (layer, k) in CLIPPED["mixed_s5"]:       # clipped: zero gradient, both ways
        assert g.params[layer]["Lambda_re"][k] == 0 and fd[(layer, "Lambda_re")][0][k] == 0
    for case in TRAINING:
        s = setup(case, case == "mixed_s5")
        _, saved = M.forward_with_saved(s.params, s.x, s.config, state=s.state, **s.kw)
        for b in saved.blocks:
            for d in (b.ssm.dropout, b.ffn.dropout):
                assert 0 < np.mean(d.scale == 0) < 0.6
                assert set(np.unique(d.scale)) == {0.0, 1 / (1 - s.config.dropout)}
    for case in ("s5", "edifice", "mixed_s5"):
        st = setup(case, True).state
        assert np.abs(st.h).min() > 1e-4
    s = setup("s5", True)
    _, saved = M.forward_with_saved(s.params, s.x, s.config, state=s.state)
    lam_bar = np.abs(saved.blocks[0].ssm.ssm.disc.Lambda_bar)
    assert 0.9 < lam_bar.min() and lam_bar.max() < 1


# --------------------------------------------------------------------------
# torch autograd on an independent float64 transcription
# --------------------------------------------------------------------------
def torch_forward(torch, P, x, c, h0, drop_scales):
    """The model of DESIGN.md 1.3 in torch, literally.

    ``h0`` is ``[batch, num_layers, Ps]`` complex (``s5``) or ``[batch,
    num_layers, H, N]`` (``edifice``), or None (bidirectional);
    ``drop_scales[i]`` the (SSM, FFN) dropout scales of block ``i + 1``.
    Returns ``(seq output, h_last)`` (``h_last`` None if bidirectional).
    """
    F = torch.nn.functional
    T = x.shape[1]

    def dense(name, v):
        return v @ P[name]["kernel"] + P[name]["bias"]

    def layer_norm(name, v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + c.norm_eps) * P[name]["gamma"] + P[name]["beta"]

    def act(v):
        if c.activation == "none":
            return v
        return F.gelu(v, approximate="tanh" if c.activation == "gelu_tanh" else "none")

    def cplx(pair):                                       # [..., 2] -> complex
        return torch.complex(pair[..., 0], pair[..., 1])

    def s5_ssm(p, u, h):
        # Lambda_bar = exp(Lambda Delta), B_bar = (Lambda_bar - 1) / Lambda B_tilde (ZOH)
        re = torch.clamp(p["Lambda_re"], max=-1e-4) if c.clip_eigs else p["Lambda_re"]
        lam = torch.complex(re, p["Lambda_im"])
        delta = c.step_rescale * torch.exp(p["log_step"])
        if c.discretization == "zoh":
            lam_bar = torch.exp(lam * delta)
            b_coef = (lam_bar - 1) / lam
        else:                                             # bilinear
            bl = 1 / (1 - delta * lam / 2)
            lam_bar = bl * (1 + delta * lam / 2)
            b_coef = bl * delta
        B_bar = b_coef[:, None] * cplx(p["B"])            # [Ps, H]
        Bu = u.to(torch.complex128) @ B_bar.T             # [b, T, Ps]
        k = 2.0 if c.conj_sym else 1.0                    # conjugate symmetry: 2 Re(C x)
        states = []
        for t in range(T):                                # x_k = Lambda_bar x_{k-1} + B_bar u_k
            h = lam_bar * h + Bu[:, t]
            states.append(h)
        C = cplx(p["C1"] if c.bidirectional else p["C"])
        y = k * torch.real(torch.stack(states, 1) @ C.T)
        if c.bidirectional:                               # backwards in time, read out by C2
            xb, back = torch.zeros_like(Bu[:, 0]), [None] * T
            for t in range(T - 1, -1, -1):
                xb = lam_bar * xb + Bu[:, t]
                back[t] = xb
            y = y + k * torch.real(torch.stack(back, 1) @ cplx(p["C2"]).T)
            h = None
        return y + p["D"] * u, h

    def edifice_ssm(name, u, h):
        # B, C, D projected from the input; A = -(1..N)/N, dt = 0.1 fixed
        N = c.state_size
        B, C, d = dense(f"{name}_b_proj", u), dense(f"{name}_c_proj", u), dense(f"{name}_d_proj", u)
        A = -torch.arange(1, N + 1, dtype=torch.float64) / N
        ys = []
        for t in range(T):
            h = torch.exp(0.1 * A) * h + 0.1 * B[:, t, None, :] * u[:, t, :, None]
            ys.append((C[:, t, None, :] * h).sum(-1))
        return torch.stack(ys, 1) + d, h

    if "input_projection" in P:
        x = dense("input_projection", x)
    hs = []
    for i in range(1, c.num_layers + 1):
        b = f"s5_block_{i}"
        h = None if h0 is None else h0[:, i - 1]
        u = layer_norm(f"{b}_ssm_norm", x)
        if c.ssm == "s5":
            y, h = s5_ssm(P[f"{b}_ssm_ssm"], u, torch.zeros(
                x.shape[0], c.ssm_states, dtype=torch.complex128) if h is None else h)
        else:
            y, h = edifice_ssm(f"{b}_ssm", u, h)
        hs.append(h)
        r = act(y)
        if drop_scales[i - 1][0] is not None:
            r = r * drop_scales[i - 1][0]
        x = x + r
        v = layer_norm(f"{b}_ffn_norm", x)
        f = dense(f"{b}_ffn_down", F.silu(dense(f"{b}_ffn_gate", v)) * dense(f"{b}_ffn_up", v))
        if drop_scales[i - 1][1] is not None:
            f = f * drop_scales[i - 1][1]
        x = x + f
    x = layer_norm("final_norm", x)
    return x, (None if c.bidirectional else torch.stack(hs, dim=1))


TORCH_CASES = [(case, carried) for case in CASES for carried in (False, True)
               if not (case == "bidir" and carried)]


@pytest.mark.peers
@pytest.mark.parametrize("case,carried", TORCH_CASES)
def test_backward_matches_torch_autograd(case, carried):
    torch = require_peer("torch")
    s = setup(case, carried)
    c = s.config
    _, saved = M.forward_with_saved(s.params, s.x, c, state=s.state, **s.kw)
    as_t = lambda d: None if d.scale is None else torch.tensor(d.scale)  # noqa: E731
    drops = [(None if b.ssm.dropout is None else as_t(b.ssm.dropout),
              None if b.ffn.dropout is None else as_t(b.ffn.dropout)) for b in saved.blocks]
    leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)  # noqa: E731
    P = {layer: {k: leaf(v) for k, v in p.items()} for layer, p in s.params.items()}
    tx = leaf(s.x)
    h_leaves, h0 = [], None
    if s.has_state:
        init = (s.state or M.init_cache(c, BATCH)).h
        if c.ssm == "s5":            # the complex state as two real leaves: no convention needed
            h_leaves = [leaf(init.real), leaf(init.imag)]
            h0 = torch.complex(*h_leaves)
        else:
            h_leaves = [leaf(init)]
            h0 = h_leaves[0]
    out, h = torch_forward(torch, P, tx, c, h0, drops)
    Wt = {k: torch.tensor(v) for k, v in s.W.items()}
    losses = {"last": (out[:, -1] * Wt["last"]).sum(),
              "sequence": (out * Wt["sequence"]).sum()}
    if s.has_state:
        if c.ssm == "s5":
            state_loss = (h.real * Wt["h"].real).sum() + (h.imag * Wt["h"].imag).sum()
        else:
            state_loss = (h * Wt["h"]).sum()
        losses["last+state"] = losses["last"] + state_loss
    names = [(layer, k) for layer in P for k in P[layer]]
    leaves = [tx] + h_leaves + [P[layer][k] for layer, k in names]
    errors = {}
    for loss in s.losses:
        tg = [t.numpy() for t in torch.autograd.grad(losses[loss], leaves, retain_graph=True)]
        g = s.manual(loss)
        errors[f"{loss}: dx"] = normwise_error(g.x, tg[0])
        if carried:
            t_h = tg[1] + 1j * tg[2] if c.ssm == "s5" else tg[1]
            errors[f"{loss}: dstate.h"] = normwise_error(g.state.h, t_h)
        for (layer, k), t in zip(names, tg[1 + len(h_leaves):]):
            errors[f"{loss}: d{layer}.{k}"] = normwise_error(g.params[layer][k], t)
            assert np.max(np.abs(t)) > 1e-5, f"{loss}: d{layer}.{k} is trivially small"
    # the forward agrees too (else the comparison would be of two different functions)
    ref = s.forward(return_sequence=True)
    assert normwise_error(ref.output, out.detach().numpy()) <= SCAN
    if s.has_state:
        assert normwise_error(ref.state.h, h.detach().numpy()) <= SCAN
    worst = max(errors, key=errors.get)
    figure(f"autograd {case} carried={carried} worst ({worst})", errors[worst])
    assert errors[worst] <= AUTOGRAD, f"worst {worst}: {errors[worst]:.2e}"


# --------------------------------------------------------------------------
# engines, chunks, consistency
# --------------------------------------------------------------------------
def _flat(g: M.S5Grads) -> dict:
    out = {"x": g.x}
    out.update({f"{layer}.{k}": v for layer, p in g.params.items() for k, v in p.items()})
    if g.state is not None:
        out["state.h"] = g.state.h
    return out


def _engines(c: M.S5Config) -> list:
    return ["numba", "logdepth"] + (["fft", "fft_dense"] if c.ssm == "s5" else [])


@pytest.mark.parametrize("case", list(CASES))
def test_engines_give_the_same_gradients(case):
    s = setup(case, case != "bidir")
    worst_all = 0.0
    for engine in _engines(s.config):
        for loss in s.losses[1:]:
            ref, got = _flat(s.manual(loss, "numpy")), _flat(s.manual(loss, engine))
            assert ref.keys() == got.keys()
            errors = {k: normwise_error(got[k], ref[k]) for k in ref}
            worst = max(errors, key=errors.get)
            worst_all = max(worst_all, errors[worst])
            assert errors[worst] <= SCAN, f"{engine} {loss}: worst {worst}: {errors[worst]:.2e}"
    figure(f"engines {case} worst", worst_all)


def test_edifice_has_no_fft_engine():
    s = setup("edifice", False)
    for engine in ("fft", "fft_dense"):
        with pytest.raises(ValueError, match="time-varying: no FFT engine"):
            M.forward_with_saved(s.params, s.x, s.config, engine=engine)


@pytest.mark.parametrize("case", ["s5", "edifice", "mixed_s5"])
def test_chunked_backward_equals_one_call(case):
    """Backpropagating through the carried state chunk by chunk (``d_state`` in, the state's
    gradient out) gives the one-call gradients (no dropout: chunks would draw other masks)."""
    s = setup(case, True)
    c, W = s.config, s.W["sequence"]
    d_final = M.S5Cache(s.W["h"])
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
    chunked = _flat(M.S5Grads(np.concatenate(dxs, axis=1), summed, d_state))
    errors = {k: normwise_error(chunked[k], v) for k, v in _flat(one).items()}
    worst = max(errors, key=errors.get)
    figure(f"chunked {case} worst ({worst})", errors[worst])
    assert errors[worst] <= SCAN, f"worst {worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_forward_with_saved_is_forward(case):
    """Same numbers as forward (bit for bit), dropout masks included; what is saved."""
    s = setup(case, case != "bidir")
    c = s.config
    for seq in (False, True):
        ref = s.forward(return_sequence=seq)
        res, saved = M.forward_with_saved(s.params, s.x, c, state=s.state,
                                          return_sequence=seq, **s.kw)
        np.testing.assert_array_equal(res.output, ref.output)
        if s.has_state:
            np.testing.assert_array_equal(res.state.h, ref.state.h)
        else:
            assert res.state is None and ref.state is None
        for a, b in zip(res.hidden_states, ref.hidden_states, strict=True):
            np.testing.assert_array_equal(a, b)
        assert isinstance(saved, M.S5ModelSaved) and saved.config == c
        assert [b.layer_idx for b in saved.blocks] == list(range(1, c.num_layers + 1))
        assert (saved.input_projection is None) == (c.embed_dim == c.hidden_size)
        assert (saved.batch, saved.seq_len, saved.return_sequence) == (BATCH, SEQ_LEN, seq)
        assert saved.has_state == (s.state is not None)
        training = bool(s.kw.get("training"))
        for b in saved.blocks:
            assert (b.ssm.dropout is not None) == training
            assert (b.ffn.dropout is not None) == training
            assert (b.ssm.activation is None) == (c.activation == "none")
            assert isinstance(b.ssm.ssm, core.S5Saved if c.ssm == "s5" else M.EdificeSsmSaved)


def test_dropout_masks_are_saved_and_seeded():
    """Training with the same seed draws the same masks (and gradients); another seed, other
    masks; training=False (or dropout 0) applies none, and then the gradients are
    inference's."""
    s = setup("mixed_s5", True)
    c = s.config

    def run(**kw):
        res, saved = M.forward_with_saved(s.params, s.x, c, state=s.state, **kw)
        masks = [d.scale for b in saved.blocks for d in (b.ssm.dropout, b.ffn.dropout)
                 if d is not None]
        return res, masks, M.backward(s.W["last"], saved)

    _, m1, g1 = run(training=True, seed=11)
    _, m2, g2 = run(training=True, seed=11)
    _, m3, g3 = run(training=True, seed=12)
    assert len(m1) == 2 * c.num_layers
    for a, b in zip(m1, m2):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(m1, m3))
    np.testing.assert_array_equal(g1.x, g2.x)
    assert normwise_error(g3.x, g1.x) > 1e-3
    _, m0, g0 = run()                                    # inference: no masks
    assert m0 == []
    res0, saved0 = M.forward_with_saved(s.params, s.x, c.replace(dropout=0.0), state=s.state,
                                        training=True, seed=11)
    assert all(b.ssm.dropout is None and b.ffn.dropout is None for b in saved0.blocks)
    for a, b in zip(_flat(M.backward(s.W["last"], saved0)).values(), _flat(g0).values()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="forward_with_saved: training=True with dropout > 0 "
                                         "needs seed"):
        M.forward_with_saved(s.params, s.x, c, training=True)


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_tree_layout(case):
    """dparams has exactly the tree's layers, names, order, shapes and (real) dtype; the state
    gradient exists exactly when a state was carried, in the state's dtype; d_state=None
    means zero."""
    for carried in ((False,) if case == "bidir" else (False, True)):
        s = setup(case, carried)
        g = s.manual("last")
        assert list(g.params) == list(s.params)
        for layer in s.params:
            assert list(g.params[layer]) == list(s.params[layer])
            for k, v in g.params[layer].items():
                assert v.dtype == np.float64, f"{layer}.{k}: {v.dtype}"
        assert tree_shapes(g.params) == M.param_shapes(s.config)
        assert g.x.shape == s.x.shape and g.x.dtype == np.float64
        if carried:
            assert g.state.h.shape == s.state.h.shape and g.state.h.dtype == s.state.h.dtype
        else:
            assert g.state is None
        if not s.has_state:
            continue
        _, saved = M.forward_with_saved(s.params, s.x, s.config, state=s.state, **s.kw)
        base = _flat(M.backward(s.W["last"], saved))
        for zero in (M.S5Cache(np.zeros_like(s.W["h"])), M.S5Cache(None)):
            for k, v in _flat(M.backward(s.W["last"], saved, d_state=zero)).items():
                np.testing.assert_array_equal(v, base[k])
        with_h = _flat(M.backward(s.W["last"], saved, d_state=M.S5Cache(s.W["h"])))
        assert normwise_error(with_h["x"], base["x"]) > 1e-3           # d_state.h is used


def test_model_methods():
    s = setup("s5", True)
    model = M.S5Model(s.config, s.params)
    res, saved = model.forward_with_saved(s.x, state=s.state)
    g = model.backward(s.W["last"], saved, d_state=M.S5Cache(s.W["h"]))
    np.testing.assert_array_equal(g.x, s.manual("last+state").x)
    np.testing.assert_array_equal(g.state.h, s.manual("last+state").state.h)


def test_bad_gradients_are_refused():
    s = setup("s5", True)
    _, saved = M.forward_with_saved(s.params, s.x, s.config, state=s.state)
    with pytest.raises(ValueError, match=r"d_out: expected 2 dimensions"):
        M.backward(s.W["sequence"], saved)
    with pytest.raises(ValueError, match=r"d_out: expected shape \(2, 8\) .* got \(2, 9\)"):
        M.backward(np.zeros((2, 9)), saved)
    with pytest.raises(ValueError, match="d_out: expected finite values"):
        M.backward(np.full((2, 8), np.nan), saved)
    with pytest.raises(ValueError, match=r"d_state.h: expected shape \(2, 2, 2\) .* got "
                                         r"\(2, 2, 3\)"):
        M.backward(s.W["last"], saved, d_state=M.S5Cache(np.zeros((2, 2, 3), complex)))
    with pytest.raises(ValueError, match="d_state.h: expected finite values"):
        M.backward(s.W["last"], saved, d_state=M.S5Cache(np.full((2, 2, 2), np.inf)))
    with pytest.raises(ValueError, match="d_state: expected an S5Cache"):
        M.backward(s.W["last"], saved, d_state=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="saved: expected the S5ModelSaved .* got S5BlockSaved"):
        M.backward(s.W["last"], saved.blocks[0])
    with pytest.raises(ValueError, match="saved: expected the S5ModelSaved .* got S5Saved"):
        M.backward(s.W["last"], saved.blocks[0].ssm.ssm)
    # edifice: the state is real
    e = setup("edifice", True)
    _, saved = M.forward_with_saved(e.params, e.x, e.config, state=e.state)
    with pytest.raises(ValueError, match="d_state.h: expected a floating-point array"):
        M.backward(e.W["last"], saved, d_state=M.S5Cache(e.W["h"] + 0j))
    with pytest.raises(ValueError, match=r"d_state.h: expected shape \(2, 2, 8, 4\)"):
        M.backward(e.W["last"], saved, d_state=M.S5Cache(np.zeros((2, 2, 4, 8))))
    # bidirectional: no state, so no gradient of it
    b = setup("bidir", False)
    _, saved = M.forward_with_saved(b.params, b.x, b.config)
    with pytest.raises(ValueError, match="d_state: a bidirectional S5 returns no state"):
        M.backward(b.W["last"], saved, d_state=M.S5Cache(np.zeros((2, 2, 2), complex)))
