"""Oracle checks of the SSM core: each returns figures, not just pass/fail.

Every check is a function returning a list of :class:`Figure` (value, budget,
ok). ``refssm verify`` runs them and prints the table. Each figure compares two
*independent* computations: a second algorithm, scipy, or finite differences.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..ssm.selective_scan import (
    ENGINES,
    selective_scan,
    selective_scan_backward,
    selective_scan_forward,
)
from .metrics import BUDGETS, normwise_error

__all__ = ["Figure", "check_discretization", "check_scan_engines", "check_scan_gradients",
           "check_scan_autograd", "check_scan_chunking", "CORE_CHECKS"]


@dataclass
class Figure:
    """One measured figure of the oracle.

    Attributes
    ----------
    arch, preset, check : str
        What was checked (``arch="core"`` for the SSM core).
    value : float
        The measured error (normwise relative unless the check says otherwise).
    budget : float
        The largest value that passes (DESIGN.md section 4).
    ok : bool
        ``value <= budget`` (and finite).
    detail : str
        What exactly was compared.
    """

    arch: str
    preset: str
    check: str
    value: float
    budget: float
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _fig(arch, preset, check, value, budget, detail=""):
    value = float(value)
    return Figure(arch, preset, check, value, budget, bool(np.isfinite(value) and value <= budget),
                  detail)


def _scan_problem(rng, batch=2, seq_len=300, channels=24, state=16, bc_groups=None):
    """A non-degenerate selective-scan problem: dt inside (1e-3, 0.1), slow decay."""
    u = rng.standard_normal((batch, seq_len, channels))
    delta = rng.uniform(-6.0, -2.5, (batch, seq_len, channels))   # softplus -> ~(2.5e-3, 0.08)
    A = -np.tile(np.arange(1.0, state + 1), (channels, 1))         # S4D-real, A_log = log(1..N)
    shape = (batch, seq_len, state) if bc_groups is None else (batch, seq_len, bc_groups, state)
    return dict(u=u, delta=delta, A=A, B=rng.standard_normal(shape),
                C=rng.standard_normal(shape), D=np.ones(channels),
                z=rng.standard_normal((batch, seq_len, channels)),
                delta_bias=0.1 * rng.standard_normal(channels),
                initial_state=0.1 * rng.standard_normal((batch, channels, state)))


def check_discretization(seed: int = 0) -> list[Figure]:
    """ZOH / bilinear / Euler against ``scipy.signal.cont2discrete`` and ``expm``."""
    import scipy.linalg
    import scipy.signal

    from ..ssm import discretize as dz

    rng = np.random.default_rng(seed)
    figs = []
    N, M = 8, 3
    worst = {"zoh": 0.0, "bilinear": 0.0, "euler": 0.0, "expm_diag": 0.0}
    for _ in range(20):
        lam = -rng.uniform(0.1, 5.0, N)
        Bm = rng.standard_normal((N, M))
        dt = float(np.exp(rng.uniform(np.log(1e-4), np.log(1.0))))
        Ad = np.diag(lam)
        A_bar, _ = dz.zoh(lam, Bm, dt)
        ref = np.diag(scipy.linalg.expm(dt * Ad))
        worst["expm_diag"] = max(worst["expm_diag"], normwise_error(A_bar, ref))
        for method in ("zoh", "bilinear", "euler"):
            _, B_bar = getattr(dz, method)(lam, Bm, dt)
            Ad_ref, Bd_ref, *_ = scipy.signal.cont2discrete(
                (Ad, Bm, np.eye(N), np.zeros((N, M))), dt, method=method)
            worst[method] = max(worst[method], normwise_error(B_bar, Bd_ref))
    budget = BUDGETS["discretization"]
    figs.append(_fig("core", "-", "discretization: A_bar=exp(dt A) vs scipy expm", worst["expm_diag"],
                     budget, "diagonal A, 20 random stable systems"))
    for method in ("zoh", "bilinear", "euler"):
        figs.append(_fig("core", "-", f"discretization: {method} B_bar vs cont2discrete",
                         worst[method], budget, "diagonal A, N=8, M=3, dt in [1e-4, 1]"))
    return figs


def check_scan_engines(seed: int = 0) -> list[Figure]:
    """NumPy vs Numba fused vs Numba log-depth: forward, final state and all gradients."""
    rng = np.random.default_rng(seed)
    figs = []
    for preset, opts, groups in (("mamba_ssm", dict(delta_softplus=True), None),
                                 ("edifice", dict(delta_softplus=True, delta_clip=(1e-3, 0.1),
                                                  delta_b_mean=True), None),
                                 ("grouped", dict(delta_softplus=True), 4)):
        args = _scan_problem(rng, bc_groups=groups)
        W = rng.standard_normal(args["u"].shape)
        ref_out, ref_h, ref_saved = selective_scan_forward(**args, **opts, engine="numpy")
        ref_g = selective_scan_backward(W, None, ref_saved)
        for engine in ENGINES[1:]:
            out, h, saved = selective_scan_forward(**args, **opts, engine=engine)
            g = selective_scan_backward(W, None, saved)
            fwd = max(normwise_error(out, ref_out), normwise_error(h, ref_h))
            bwd = max(normwise_error(g[k], ref_g[k]) for k in ref_g if ref_g[k] is not None)
            figs.append(_fig("core", preset, f"scan: {engine} vs numpy, forward", fwd,
                             BUDGETS["scan"], "batch 2, seq_len 300, channels 24, state 16"))
            figs.append(_fig("core", preset, f"scan: {engine} vs numpy, backward", bwd,
                             BUDGETS["scan"], "all 9 gradients, worst"))
    return figs


def check_scan_gradients(seed: int = 0, engine: str = "numpy") -> list[Figure]:
    """Manual backward vs central finite differences along random directions."""
    rng = np.random.default_rng(seed)
    args = _scan_problem(rng, batch=2, seq_len=40, channels=6, state=4)
    opts = dict(delta_softplus=True)
    W = rng.standard_normal(args["u"].shape)
    Wh = rng.standard_normal(args["initial_state"].shape)

    def loss(a):
        out, h, _ = selective_scan_forward(**a, **opts, engine=engine)
        return float(np.sum(W * out) + np.sum(Wh * h))

    _, _, saved = selective_scan_forward(**args, **opts, engine=engine)
    g = selective_scan_backward(W, Wh, saved)
    worst = 0.0
    for key, v in args.items():
        for _ in range(3):
            direction = rng.standard_normal(v.shape)
            eps = 1e-5
            plus = dict(args, **{key: v + eps * direction})
            minus = dict(args, **{key: v - eps * direction})
            fd = (loss(plus) - loss(minus)) / (2 * eps)
            an = float(np.sum(g[key] * direction))
            worst = max(worst, abs(an - fd) / max(abs(fd), 1e-300))
    return [_fig("core", "mamba_ssm", f"gradients: {engine} backward vs finite differences",
                 worst, BUDGETS["grad_fd"], "9 inputs x 3 random directions, relative")]


def check_scan_autograd(seed: int = 0) -> list[Figure]:
    """Every engine's manual backward vs torch autograd (when torch is installed).

    torch differentiates :func:`refssm.verify.peers.torch_selective_scan`, a
    transcription of the math written independently of refssm's engines.
    Without torch the check reports nothing (``pip install -e .[peers]``).
    """
    try:
        import torch
    except ImportError:
        return []
    from .peers import torch_selective_scan

    rng = np.random.default_rng(seed)
    args = _scan_problem(rng, batch=2, seq_len=40, channels=6, state=4)
    W = rng.standard_normal(args["u"].shape)
    Wh = rng.standard_normal(args["initial_state"].shape)
    figs = []
    for preset, opts in (("mamba_ssm", dict(delta_softplus=True)),
                         ("edifice", dict(delta_softplus=True, delta_clip=(0.01, 0.05),
                                          delta_b_mean=True))):
        t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in args.items()}
        t_out, t_h = torch_selective_scan(
            torch, t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
            t["initial_state"], True, opts.get("delta_clip"), opts.get("delta_b_mean", False))
        ((t_out * torch.tensor(W)).sum() + (t_h * torch.tensor(Wh)).sum()).backward()
        for engine in ENGINES:
            _, _, saved = selective_scan_forward(**args, **opts, engine=engine)
            g = selective_scan_backward(W, Wh, saved)
            worst = max(normwise_error(g[k], tv.grad.numpy()) for k, tv in t.items())
            figs.append(_fig("core", preset, f"gradients: {engine} backward vs torch autograd",
                             worst, BUDGETS["grad_autograd"],
                             f"all 9 gradients, worst; torch {torch.__version__}"))
    return figs


def check_scan_chunking(seed: int = 0) -> list[Figure]:
    """Stepping one token at a time (carried state) equals one full call, every engine."""
    rng = np.random.default_rng(seed)
    args = _scan_problem(rng, batch=2, seq_len=64, channels=8, state=16)
    args.pop("initial_state")
    figs = []
    for engine in ENGINES:
        full, h_full = selective_scan(**args, delta_softplus=True, engine=engine)
        h = None
        outs = []
        for t in range(args["u"].shape[1]):
            part = {k: (v[:, t:t + 1] if k in ("u", "delta", "B", "C", "z") else v)
                    for k, v in args.items()}
            o, h = selective_scan(**part, initial_state=h, delta_softplus=True, engine=engine)
            outs.append(o)
        err = max(normwise_error(np.concatenate(outs, axis=1), full), normwise_error(h, h_full))
        figs.append(_fig("core", "mamba_ssm", f"step vs full: {engine} scan, every prefix", err,
                         BUDGETS["step_vs_full"], "64 single-token calls carrying the state"))
    return figs


CORE_CHECKS = (check_discretization, check_scan_engines, check_scan_gradients,
               check_scan_autograd, check_scan_chunking)
