r"""S5: one diagonal complex MIMO state-space model (Smith, Warrington & Linderman 2023).

"Simplified State Space Layers for Sequence Modeling" (ICLR 2023,
arXiv:2208.04933; code: lindermanlab/S5, ``s5/ssm.py`` and
``s5/ssm_init.py``). One linear SSM with ``P`` states maps all ``H``
features at once (multi-input, multi-output), instead of S4's ``H``
independent single-input systems:

.. math::

    x'(t) = A x(t) + B u(t), \qquad y(t) = C x(t) + D u(t),
    \qquad A \in \mathbb{R}^{P\times P},\ B \in \mathbb{R}^{P\times H},
    \ C \in \mathbb{R}^{H\times P},\ D = \mathrm{diag}(D).

S5 works in the eigenbasis of ``A = V Lambda V^-1`` (paper, section 3: the
S5 layer's parameterisation), so the state matrix is the diagonal
``Lambda`` (complex) and the learned matrices are ``B_tilde = V^-1 B``
``[P, H]`` and ``C_tilde = C V`` ``[H, P]``, complex. Each state has its own
step ``Delta_p = exp(log_step_p)``. Discretised (zero-order hold by default)::

    Lambda_bar = exp(Lambda * Delta)                      [P]
    B_bar      = (Lambda_bar - 1) / Lambda * B_tilde       [P, H]       (ZOH)
    x_k        = Lambda_bar * x_{k-1} + B_bar u_k          [batch, P]   (the recurrence)
    y_k        = Re(C_tilde x_k) + D * u_k                 [batch, H]   (the read-out)

With *conjugate symmetry* (the default, as the paper) only one eigenvalue of
every conjugate pair is kept: ``P/2`` complex states stand for a real
``P``-state system, and the read-out is ``2 * Re(C_tilde x_k)`` (the pair's
two terms are complex conjugates of each other). :func:`expand_conj_sym`
builds the full ``P``-state system those half states stand for.

This module holds the readable NumPy ground truth:

* initialisation as the paper: :func:`make_hippo` (HiPPO-LegS),
  :func:`make_normal_hippo` (its normal part, "HiPPO-N"),
  :func:`hippo_n_eig` (diagonalised with ``eigh``),
  :func:`init_block_diagonal` (``J`` blocks, conjugate symmetry) and
  :func:`init_s5_ssm` (``B_tilde = V^-1 B``, ``C_tilde = C V``, ``D``,
  ``log_step``);
* discretisation with its manual backward: :func:`discretize_forward` /
  :func:`discretize_backward` (ZOH and bilinear, via
  :mod:`refssm.ssm.discretize`);
* the core (recurrence + read-out) as a loop over time with its
  reverse-time backward: :func:`scan_forward` / :func:`scan_backward`;
* the convolution kernel ``K_k = Re(C_tilde Lambda_bar^k B_bar)``:
  :func:`s5_kernel`;
* the public layer, parameters in, gradients out:
  :func:`s5_ssm_forward` / :func:`s5_ssm_backward` / :func:`s5_ssm` /
  :func:`s5_ssm_step`.

Engines (``engine=``), one meaning, checked against each other in
``tests/test_s5_core.py``:

``"numpy"``
    :func:`scan_forward` here: one time step after another; the ground truth.
``"numba"``
    :mod:`refssm.scan.s5_engines`, sequential complex scan in Numba.
``"logdepth"``
    :mod:`refssm.scan.s5_engines`, Blelloch up-sweep / down-sweep over time
    (the parallel scan the paper computes S5 with).
``"fft"``
    :mod:`refssm.scan.s5_engines`, the LTI system as a causal convolution by
    FFT, through the diagonal: ``y = Re(C_tilde (lambda^k * (B_bar u)))``,
    ``O(P L log L)``.
``"fft_dense"``
    :mod:`refssm.scan.s5_engines`, the literal convolution with the dense
    ``[L, H, H]`` kernel ``K_k`` (:func:`s5_kernel`); ``O(L H^2 P)``, small
    sizes only: the independent check of the kernel formula.

Parameters (one layer), as lindermanlab/S5 names and lays them out (complex
matrices stored as real/imaginary pairs on a last axis of size 2)::

    Lambda_re [P]   Lambda_im [P]   B [P, H, 2]   C [H, P, 2]   D [H]   log_step [P]

(bidirectional: ``C1`` and ``C2`` ``[H, P, 2]`` instead of ``C``). ``P``
here is the number of *stored* complex states: ``state_size / 2`` with
conjugate symmetry. Gradients use the convention ``dz = dL/dRe(z) + i
dL/dIm(z)`` for complex intermediates (so ``dL/dB[..., 0] = Re(dB_tilde)``,
``dL/dB[..., 1] = Im(dB_tilde)``).

Everything is computed in float64 / complex128 (float32 inputs are promoted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np
import scipy.linalg

from .._validate import as_float_array, check_finite
from .discretize import bilinear, zoh

__all__ = [
    "ENGINES", "DISCRETIZATIONS", "C_INITS", "CLIP_EIGS_MAX",
    # initialisation
    "make_hippo", "make_nplr_hippo", "make_normal_hippo", "hippo_n_eig",
    "init_block_diagonal", "lecun_normal", "init_s5_ssm", "s5_param_shapes",
    # parameters
    "ssm_matrices", "expand_conj_sym",
    # discretisation
    "discretize_zoh", "discretize_bilinear", "discretize_forward", "discretize_backward",
    "DiscretizationSaved",
    # the core
    "ScanSaved", "scan_forward", "scan_backward", "read_out", "lambda_powers", "s5_kernel",
    # the layer
    "S5Saved", "s5_ssm_forward", "s5_ssm_backward", "s5_ssm", "s5_ssm_step",
]

#: The engines (see the module docstring).
ENGINES = ("numpy", "numba", "logdepth", "fft", "fft_dense")
#: Discretisation rules.
DISCRETIZATIONS = ("zoh", "bilinear")
#: lindermanlab/S5's ``C_init`` options.
C_INITS = ("trunc_standard_normal", "lecun_normal", "complex_normal")
#: ``clip_eigs``: ``Re(Lambda)`` is clipped to at most this (lindermanlab/S5's value).
CLIP_EIGS_MAX = -1e-4


# ===========================================================================
# Initialisation: HiPPO-N, diagonalised (paper, section 3: initialisation)
# ===========================================================================

def _check_size(N, name="N", minimum=1) -> int:
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {N!r}")
    return int(N)


def make_hippo(N: int) -> np.ndarray:
    r"""The HiPPO-LegS matrix, negated (a stable ``A``), ``[N, N]``.

    .. math::

        A_{nk} = -\begin{cases} \sqrt{2n+1}\sqrt{2k+1} & n > k \\ n + 1 & n = k \\
                 0 & n < k \end{cases}

    (Gu et al. 2020, HiPPO; ``make_HiPPO`` in lindermanlab/S5 ``ssm_init.py``.)

    Examples
    --------
    >>> make_hippo(3)
    array([[-1.        ,  0.        ,  0.        ],
           [-1.73205081, -2.        ,  0.        ],
           [-2.23606798, -3.87298335, -3.        ]])
    """
    N = _check_size(N)
    q = np.sqrt(1.0 + 2.0 * np.arange(N))
    return np.diag(np.arange(N, dtype=np.float64)) - np.tril(np.outer(q, q))


def make_nplr_hippo(N: int):
    r"""HiPPO-LegS as normal plus low rank: ``(A, p, b)``.

    ``A = make_hippo(N)``, ``p_n = sqrt(n + 1/2)`` (``A + p p^T`` is normal),
    ``b_n = sqrt(2n + 1)`` (HiPPO's input vector). As ``make_NPLR_HiPPO``
    in lindermanlab/S5.

    Returns
    -------
    A : ndarray ``[N, N]``
    p : ndarray ``[N]``
    b : ndarray ``[N]``

    Examples
    --------
    >>> A, p, b = make_nplr_hippo(2)
    >>> p, b
    (array([0.70710678, 1.22474487]), array([1.        , 1.73205081]))
    """
    A = make_hippo(N)
    n = np.arange(N, dtype=np.float64)
    return A, np.sqrt(n + 0.5), np.sqrt(2.0 * n + 1.0)


def make_normal_hippo(N: int) -> np.ndarray:
    r"""HiPPO-N: the normal part ``S = A + p p^T`` of HiPPO-LegS, ``[N, N]``.

    Computed from the closed form ``S = -I/2 + K``, ``K`` real skew-symmetric,
    ``K_{nk} = -\tfrac12 \sqrt{(2n+1)(2k+1)}`` for ``n > k`` (and ``-K^T``
    above the diagonal). So ``S`` is normal and every eigenvalue has real part
    exactly ``-1/2``; the imaginary parts come in ``+-`` pairs (and one 0 when
    ``N`` is odd).

    Examples
    --------
    >>> S = make_normal_hippo(4)
    >>> np.diag(S)
    array([-0.5, -0.5, -0.5, -0.5])
    >>> bool(np.allclose(S + S.T, -np.eye(4), rtol=0, atol=1e-14))     # -I/2 + skew
    True
    """
    N = _check_size(N)
    q = np.sqrt(1.0 + 2.0 * np.arange(N))
    lower = np.tril(np.outer(q, q), -1)
    # the closed form, so the diagonal is -1/2 exactly (A + p p^T rounds it:
    # -(n+1) + fl(sqrt(n+1/2))^2 is off by an ulp or two)
    return 0.5 * (lower.T - lower) - 0.5 * np.eye(N)


def hippo_n_eig(N: int):
    r"""Diagonalise HiPPO-N: ``S = V diag(Lambda) V^H`` with ``V`` unitary.

    As ``make_DPLR_HiPPO`` in lindermanlab/S5: the real part is the mean of
    ``diag(S)`` (``-1/2``), the imaginary parts and ``V`` come from ``eigh``
    of the Hermitian ``-i (S + I/2)`` (``-i`` times the skew part; lindermanlab
    passes ``-i S``, whose imaginary diagonal ``eigh`` ignores, so the result
    is the same). Eigenvalues are in ascending order of their imaginary part,
    so the first ``N/2`` hold one of every conjugate pair (the ones with
    negative imaginary part) when ``N`` is even.

    Parameters
    ----------
    N : int
        State size (of one block).

    Returns
    -------
    Lambda : ndarray ``[N]`` complex
    V : ndarray ``[N, N]`` complex, unitary

    Examples
    --------
    >>> Lambda, V = hippo_n_eig(4)
    >>> Lambda.real
    array([-0.5, -0.5, -0.5, -0.5])
    >>> bool(np.allclose(V @ np.diag(Lambda) @ V.conj().T, make_normal_hippo(4), atol=1e-13))
    True
    """
    S = make_normal_hippo(N)
    real = float(np.mean(np.diag(S)))                 # -1/2
    skew = S - real * np.eye(N)
    Lambda_imag, V = np.linalg.eigh(-1j * skew)       # -i K is Hermitian
    return real + 1j * Lambda_imag, V


def init_block_diagonal(state_size: int, blocks: int = 1, conj_sym: bool = True):
    r"""``Lambda``, ``V``, ``V^-1`` of the block-diagonal HiPPO-N initialisation.

    ``state_size`` (the paper's ``P``) is split into ``J = blocks`` blocks of
    ``state_size / J``; each block is HiPPO-N of that size, diagonalised by
    :func:`hippo_n_eig`; ``V`` and ``V^-1 = V^H`` are block diagonal. With
    conjugate symmetry each block keeps its first half (one eigenvalue of each
    pair) and ``V`` its first half of columns, so ``V`` is
    ``[state_size, state_size/2]`` and ``V^-1 = V^H`` is
    ``[state_size/2, state_size]`` (as ``train.py`` in lindermanlab/S5).

    Parameters
    ----------
    state_size : int
        ``P``. Divisible by ``blocks``; each block even when ``conj_sym``.
    blocks : int
        ``J``.
    conj_sym : bool

    Returns
    -------
    Lambda : ndarray ``[Ps]`` complex
        ``Ps = state_size / 2`` with conjugate symmetry, else ``state_size``.
    V : ndarray ``[state_size, Ps]`` complex
    Vinv : ndarray ``[Ps, state_size]`` complex

    Raises
    ------
    ValueError
        ``blocks`` not dividing ``state_size``, or an odd block size with
        conjugate symmetry.

    Examples
    --------
    >>> Lam, V, Vinv = init_block_diagonal(8, blocks=2)
    >>> Lam.shape, V.shape, Vinv.shape
    ((4,), (8, 4), (4, 8))
    >>> init_block_diagonal(6, blocks=2)
    Traceback (most recent call last):
    ...
    ValueError: state_size: conjugate symmetry needs an even block size state_size / blocks, got state_size 6 / blocks 2 = 3
    """
    state_size = _check_size(state_size, "state_size")
    blocks = _check_size(blocks, "blocks")
    if state_size % blocks:
        raise ValueError(f"blocks: expected a divisor of state_size {state_size}, got {blocks}")
    block = state_size // blocks
    if conj_sym and block % 2:
        raise ValueError(
            f"state_size: conjugate symmetry needs an even block size state_size / blocks, got "
            f"state_size {state_size} / blocks {blocks} = {block}")
    Lam, V = hippo_n_eig(block)
    if conj_sym:
        Lam, V = Lam[:block // 2], V[:, :block // 2]
    Lambda = np.tile(Lam, blocks)
    V_full = scipy.linalg.block_diag(*([V] * blocks))
    Vinv = scipy.linalg.block_diag(*([V.conj().T] * blocks))
    return Lambda, V_full, Vinv


def _truncated_standard_normal(rng, shape, bound=2.0):
    """Standard normal conditioned on ``|z| <= bound`` (rejection sampling)."""
    z = rng.standard_normal(shape)
    bad = np.abs(z) > bound
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > bound
    return z


def lecun_normal(rng, shape) -> np.ndarray:
    """``jax.nn.initializers.lecun_normal()``'s distribution.

    Truncated normal on ``[-2, 2]`` standard deviations, scaled to variance
    ``1 / fan_in`` with JAX's fans: ``fan_in = shape[-2] * prod(shape[:-2])``
    (the ``in_axis = -2`` convention; for S5's ``B`` ``[P, H]`` that is
    ``P``, not ``H``). The draw itself is NumPy's, not JAX's stream.

    Examples
    --------
    >>> w = lecun_normal(np.random.default_rng(0), (4, 4000))       # fan_in = 4
    >>> bool(abs(w.std() - 0.5) < 0.03), bool(np.abs(w).max() <= 2 * 0.5 / 0.8796256610342398)
    (True, True)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"lecun_normal: expected a shape of rank >= 2, got {shape}")
    fan_in = shape[-2] * math.prod(shape[:-2])
    # 0.8796...: the standard deviation of a standard normal truncated to [-2, 2]
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return _truncated_standard_normal(rng, shape) * std


def s5_param_shapes(hidden_size: int, state_size: int, *, conj_sym: bool = True,
                    bidirectional: bool = False) -> dict:
    """``{name: shape}`` of one S5 SSM's parameters.

    Examples
    --------
    >>> s5_param_shapes(3, 8)
    {'Lambda_re': (4,), 'Lambda_im': (4,), 'B': (4, 3, 2), 'C': (3, 4, 2), 'D': (3,), 'log_step': (4,)}
    """
    H = _check_size(hidden_size, "hidden_size")
    N = _check_size(state_size, "state_size")
    if conj_sym and N % 2:
        raise ValueError(f"state_size: expected an even state_size with conjugate symmetry "
                         f"(P/2 complex states), got {N}")
    P = N // 2 if conj_sym else N
    C = {"C1": (H, P, 2), "C2": (H, P, 2)} if bidirectional else {"C": (H, P, 2)}
    return {"Lambda_re": (P,), "Lambda_im": (P,), "B": (P, H, 2), **C, "D": (H,),
            "log_step": (P,)}


def init_s5_ssm(hidden_size: int, state_size: int, *, blocks: int = 1, conj_sym: bool = True,
                C_init: str = "trunc_standard_normal", dt_min: float = 1e-3,
                dt_max: float = 1e-1, bidirectional: bool = False, rng=None) -> dict:
    r"""Initial parameters of one S5 SSM, as the paper and lindermanlab/S5.

    * ``Lambda``: block-diagonal HiPPO-N eigenvalues (:func:`init_block_diagonal`).
    * ``B_tilde = V^-1 B`` with ``B`` ``[state_size, H]`` drawn
      :func:`lecun_normal` (``init_VinvB``).
    * ``C_tilde``: ``"trunc_standard_normal"`` draws each row of ``C``
      ``[H, state_size]`` (real and imaginary parts) :func:`lecun_normal` over
      ``(1, state_size, 2)`` (variance ``1/state_size``), ``"lecun_normal"``
      over the whole ``(H, state_size, 2)`` (variance ``1/(H state_size)``),
      then ``C_tilde = C V`` (``init_CV``); ``"complex_normal"`` draws
      ``C_tilde`` itself, real and imaginary parts ``N(0, 1/2)``.
    * ``D ~ N(0, 1)`` ``[H]``; ``log_step ~ U[log dt_min, log dt_max]`` ``[Ps]``.

    Parameters
    ----------
    hidden_size : int
        ``H``.
    state_size : int
        ``P`` (the paper's; ``P/2`` are stored with conjugate symmetry).
    blocks : int
        ``J``, the number of HiPPO-N blocks.
    conj_sym : bool
    C_init : {"trunc_standard_normal", "lecun_normal", "complex_normal"}
    dt_min, dt_max : float
        Range of the initial step sizes, ``0 < dt_min <= dt_max``.
    bidirectional : bool
        Two output matrices ``C1``, ``C2`` (forward and backward in time).
    rng : numpy Generator or int seed

    Returns
    -------
    dict
        ``Lambda_re, Lambda_im [Ps]``, ``B [Ps, H, 2]``, ``C [H, Ps, 2]`` (or
        ``C1``, ``C2``), ``D [H]``, ``log_step [Ps]``.

    Examples
    --------
    >>> p = init_s5_ssm(3, 8, rng=0)
    >>> {k: v.shape for k, v in p.items()}
    {'Lambda_re': (4,), 'Lambda_im': (4,), 'B': (4, 3, 2), 'C': (3, 4, 2), 'D': (3,), 'log_step': (4,)}
    >>> p["Lambda_re"]
    array([-0.5, -0.5, -0.5, -0.5])
    >>> bool(np.all((np.exp(p["log_step"]) >= 1e-3) & (np.exp(p["log_step"]) <= 0.1)))
    True
    """
    H = _check_size(hidden_size, "hidden_size")
    N = _check_size(state_size, "state_size")
    if conj_sym and N % 2:
        raise ValueError(f"state_size: expected an even state_size with conjugate symmetry "
                         f"(P/2 complex states), got {N}")
    if C_init not in C_INITS:
        raise ValueError(f"C_init: expected one of {C_INITS}, got {C_init!r}")
    if not (0 < float(dt_min) <= float(dt_max) and math.isfinite(float(dt_max))):
        raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max < inf, got "
                         f"{dt_min!r}, {dt_max!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    Lambda, V, Vinv = init_block_diagonal(N, blocks, conj_sym)
    P = Lambda.shape[0]
    B_tilde = Vinv @ lecun_normal(rng, (N, H))                     # V^-1 B   [P, H]

    def draw_C():
        if C_init == "complex_normal":                             # C_tilde directly
            return rng.normal(0.0, math.sqrt(0.5), (H, P, 2))
        if C_init == "lecun_normal":
            C = lecun_normal(rng, (H, N, 2))
        else:                                                      # one row at a time
            C = np.concatenate([lecun_normal(rng, (1, N, 2)) for _ in range(H)])
        CV = (C[..., 0] + 1j * C[..., 1]) @ V                      # C V   [H, P]
        return np.stack([CV.real, CV.imag], axis=-1)

    C = {"C1": draw_C(), "C2": draw_C()} if bidirectional else {"C": draw_C()}
    return {
        "Lambda_re": Lambda.real.copy(),
        "Lambda_im": Lambda.imag.copy(),
        "B": np.stack([B_tilde.real, B_tilde.imag], axis=-1),
        **C,
        "D": rng.standard_normal(H),
        "log_step": rng.uniform(math.log(dt_min), math.log(dt_max), P),
    }


# ===========================================================================
# Parameters -> complex matrices
# ===========================================================================

def _check_ssm_params(params, bidirectional: bool, hidden_size: Optional[int] = None) -> dict:
    """Check one SSM's parameter dict; return it as float64 arrays."""
    if not isinstance(params, dict):
        raise ValueError(f"params: expected a dict of arrays, got {type(params).__name__}")
    C_names = ("C1", "C2") if bidirectional else ("C",)
    names = ("Lambda_re", "Lambda_im", "B", *C_names, "D", "log_step")
    if set(params) != set(names):
        raise ValueError(f"params: expected exactly {sorted(names)} "
                         f"({'bidirectional' if bidirectional else 'unidirectional'}), "
                         f"got {sorted(params)}")
    p = {k: as_float_array(params[k], f"params[{k!r}]").astype(np.float64, copy=False)
         for k in names}
    if p["Lambda_re"].ndim != 1:
        raise ValueError(f"params['Lambda_re']: expected shape (P,), got {p['Lambda_re'].shape}")
    P = p["Lambda_re"].shape[0]
    H = p["D"].shape[0] if p["D"].ndim == 1 else None
    if hidden_size is not None:
        H = hidden_size
    if H is None:
        raise ValueError(f"params['D']: expected shape (H,), got {p['D'].shape}")
    want = {"Lambda_re": (P,), "Lambda_im": (P,), "B": (P, H, 2), "D": (H,), "log_step": (P,)}
    want.update({c: (H, P, 2) for c in C_names})
    for k in names:
        if p[k].shape != want[k]:
            raise ValueError(f"params[{k!r}]: expected shape {want[k]} (P = {P} states from "
                             f"Lambda_re, H = {H} features), got {p[k].shape}")
    return p


def ssm_matrices(params: dict, *, clip_eigs: bool = False, bidirectional: bool = False):
    """The complex matrices of one SSM's parameters.

    Parameters
    ----------
    params : dict
        ``Lambda_re, Lambda_im [P]``, ``B [P, H, 2]``, ``C [H, P, 2]`` (or
        ``C1, C2``), ``D [H]``, ``log_step [P]``.
    clip_eigs : bool
        Clip ``Re(Lambda)`` to at most ``CLIP_EIGS_MAX = -1e-4`` (the
        left-half-plane constraint of lindermanlab/S5).
    bidirectional : bool

    Returns
    -------
    Lambda : ndarray ``[P]`` complex
    B_tilde : ndarray ``[P, H]`` complex
    C_tilde : ndarray ``[H, P]`` complex (``[H, 2P]``: ``[C1, C2]`` when bidirectional)
    D : ndarray ``[H]``
    log_step : ndarray ``[P]``

    Examples
    --------
    >>> Lam, B, C, D, log_step = ssm_matrices(init_s5_ssm(3, 4, rng=0))
    >>> Lam.shape, B.shape, C.shape
    ((2,), (2, 3), (3, 2))
    """
    p = _check_ssm_params(params, bidirectional)
    re = np.minimum(p["Lambda_re"], CLIP_EIGS_MAX) if clip_eigs else p["Lambda_re"]
    Lambda = re + 1j * p["Lambda_im"]
    B_tilde = p["B"][..., 0] + 1j * p["B"][..., 1]
    Cs = [p[c][..., 0] + 1j * p[c][..., 1] for c in (("C1", "C2") if bidirectional else ("C",))]
    return Lambda, B_tilde, np.concatenate(Cs, axis=1), p["D"], p["log_step"]


def expand_conj_sym(params: dict, *, bidirectional: bool = False) -> dict:
    """The full system a conjugate-symmetric one stands for.

    A half-state SSM with ``2 Re(C_tilde x)`` read-out equals the
    ``2P``-state SSM with eigenvalues ``[Lambda, conj(Lambda)]``, input rows
    ``[B_tilde; conj(B_tilde)]``, output columns ``[C_tilde, conj(C_tilde)]``
    and ``Re(C x)`` read-out (without conjugate symmetry). That system is
    real: its output's imaginary part is 0.

    Returns
    -------
    dict
        Parameters of the full system, ``P`` doubled (run it with
        ``conj_sym=False``).

    Examples
    --------
    >>> full = expand_conj_sym(init_s5_ssm(2, 4, rng=0))
    >>> full["Lambda_im"].shape, full["B"].shape
    ((4,), (4, 2, 2))
    """
    p = _check_ssm_params(params, bidirectional)
    conj = np.array([1.0, -1.0])
    out = {
        "Lambda_re": np.concatenate([p["Lambda_re"], p["Lambda_re"]]),
        "Lambda_im": np.concatenate([p["Lambda_im"], -p["Lambda_im"]]),
        "B": np.concatenate([p["B"], p["B"] * conj], axis=0),
        "D": p["D"].copy(),
        "log_step": np.concatenate([p["log_step"], p["log_step"]]),
    }
    for c in (("C1", "C2") if bidirectional else ("C",)):
        out[c] = np.concatenate([p[c], p[c] * conj], axis=1)
    return out


# ===========================================================================
# Discretisation and its backward (paper, section 3; discretize_zoh / _bilinear)
# ===========================================================================

class DiscretizationSaved(NamedTuple):
    """What :func:`discretize_forward` keeps for its backward.

    Attributes
    ----------
    method : str
        ``"zoh"`` or ``"bilinear"``.
    Lambda : ndarray ``[P]`` complex
    step : ndarray ``[P]``
        ``Delta``.
    Lambda_bar : ndarray ``[P]`` complex
    coef : ndarray ``[P]`` complex
        ``B_bar = coef[:, None] * B_tilde``: ``(Lambda_bar - 1) / Lambda``
        (ZOH) or ``Delta / (1 - Delta Lambda / 2)`` (bilinear).
    B_tilde : ndarray ``[P, H]`` complex
    """

    method: str
    Lambda: np.ndarray
    step: np.ndarray
    Lambda_bar: np.ndarray
    coef: np.ndarray
    B_tilde: np.ndarray


def _check_step(step, P) -> np.ndarray:
    step = as_float_array(step, "step").astype(np.float64, copy=False)
    step = np.broadcast_to(step, (P,)) if step.ndim == 0 else step
    if step.shape != (P,):
        raise ValueError(f"step: expected shape ({P},) [P] (one step per state), got {step.shape}")
    if not np.all(step > 0):
        i = int(np.argmin(step > 0))
        raise ValueError(f"step: expected every step size Delta > 0, got {float(step[i])!r} at "
                         f"state {i} (Delta = step_rescale * exp(log_step); log_step below "
                         f"about -745 underflows to 0)")
    return step


def _check_lambda_b(Lambda, B_tilde):
    Lambda = np.asarray(Lambda)
    if Lambda.ndim != 1:
        raise ValueError(f"Lambda: expected shape (P,), got {Lambda.shape}")
    B_tilde = np.asarray(B_tilde)
    if B_tilde.ndim != 2 or B_tilde.shape[0] != Lambda.shape[0]:
        raise ValueError(f"B_tilde: expected shape ({Lambda.shape[0]}, H) [P, H], got "
                         f"{B_tilde.shape}")
    check_finite(Lambda, "Lambda")
    check_finite(B_tilde, "B_tilde")
    return Lambda.astype(np.complex128), B_tilde.astype(np.complex128)


def discretize_forward(Lambda, B_tilde, step, method: str = "zoh"):
    r"""Discretise the diagonal system: ``(Lambda_bar, B_bar, saved)``.

    ZOH (default)::

        Lambda_bar = exp(Lambda Delta),   B_bar = (Lambda_bar - 1) / Lambda * B_tilde

    (computed as ``Delta phi_1(Lambda Delta) B_tilde`` by
    :func:`refssm.ssm.discretize.zoh`, accurate when ``Lambda Delta`` is small).
    Bilinear::

        Lambda_bar = (1 + Delta Lambda / 2) / (1 - Delta Lambda / 2),
        B_bar      = Delta / (1 - Delta Lambda / 2) * B_tilde

    Parameters
    ----------
    Lambda : ndarray ``[P]`` complex
    B_tilde : ndarray ``[P, H]`` complex
    step : ndarray ``[P]``
        ``Delta``, every value > 0.
    method : {"zoh", "bilinear"}

    Returns
    -------
    Lambda_bar : ndarray ``[P]`` complex
    B_bar : ndarray ``[P, H]`` complex
    saved : DiscretizationSaved

    Raises
    ------
    ValueError
        Non-positive step, wrong shapes, an unknown method.

    Examples
    --------
    >>> Lb, Bb, _ = discretize_forward(np.array([-0.5 + 1j]), np.ones((1, 2)), np.array([0.1]))
    >>> bool(np.isclose(Lb[0], np.exp(0.1 * (-0.5 + 1j)))), bool(np.isclose(Bb[0, 0], (Lb[0] - 1) / (-0.5 + 1j)))
    (True, True)
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"discretization: expected one of {DISCRETIZATIONS}, got {method!r}")
    Lambda, B_tilde = _check_lambda_b(Lambda, B_tilde)
    step = _check_step(step, Lambda.shape[0])
    rule = zoh if method == "zoh" else bilinear
    Lambda_bar, coef = rule(Lambda, np.ones(Lambda.shape[0]), step)      # per state
    _, B_bar = rule(Lambda, B_tilde, step, mimo=True)                     # [P, H]
    return Lambda_bar, B_bar, DiscretizationSaved(method, Lambda, step, Lambda_bar, coef, B_tilde)


def discretize_zoh(Lambda, B_tilde, Delta):
    """``(Lambda_bar, B_bar)`` by zero-order hold (lindermanlab/S5's ``discretize_zoh``).

    Examples
    --------
    >>> Lb, Bb = discretize_zoh(np.array([-1.0 + 0j]), np.ones((1, 1)), np.array([1.0]))
    >>> print(np.round(Lb.real, 6), np.round(Bb.real, 6))
    [0.367879] [[0.632121]]
    """
    Lambda_bar, B_bar, _ = discretize_forward(Lambda, B_tilde, Delta, "zoh")
    return Lambda_bar, B_bar


def discretize_bilinear(Lambda, B_tilde, Delta):
    """``(Lambda_bar, B_bar)`` by the bilinear transform (``discretize_bilinear``).

    Examples
    --------
    >>> Lb, Bb = discretize_bilinear(np.array([-1.0 + 0j]), np.ones((1, 1)), np.array([1.0]))
    >>> print(np.round(Lb.real, 6), np.round(Bb.real, 6))
    [0.333333] [[0.666667]]
    """
    Lambda_bar, B_bar, _ = discretize_forward(Lambda, B_tilde, Delta, "bilinear")
    return Lambda_bar, B_bar


def _phi2(z: np.ndarray) -> np.ndarray:
    r"""``phi_2(z) = (e^z - 1 - z) / z^2`` (``phi_2(0) = 1/2``), accurate for every complex ``z``.

    For ``|z| < 1/2`` its Taylor series ``sum_k z^k / (k+2)!`` (18 terms:
    truncation below ``0.5^18/20! < 1e-23``); above, ``(expm1(z) - z) / z^2``,
    whose cancellation costs at most a factor ~8 at ``|z| = 1/2``.
    """
    z = np.asarray(z, dtype=np.complex128)
    small = np.abs(z) < 0.5
    series = np.zeros_like(z)
    for k in range(17, -1, -1):                   # Horner, from the smallest term
        series = series * z + 1.0 / math.factorial(k + 2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        direct = (np.expm1(z) - z) / (z * z)
    return np.where(small, series, direct)


def discretize_backward(d_Lambda_bar, d_B_bar, saved: DiscretizationSaved) -> dict:
    r"""Manual backward of :func:`discretize_forward`.

    With ``z = Lambda Delta`` and ``B_bar = coef * B_tilde`` (both maps are
    holomorphic in ``Lambda``, so ``dLambda = conj(f'(Lambda)) * d_out``)::

        d coef     = sum_h conj(B_tilde) * d B_bar,      d B_tilde = conj(coef) * d B_bar
        ZOH:       dLambda_bar/dLambda = Delta Lambda_bar,  dLambda_bar/dDelta = Lambda Lambda_bar
                   dcoef/dLambda = Delta^2 (phi_1(z) - phi_2(z)),  dcoef/dDelta = Lambda_bar
        bilinear:  with BL = 1 / (1 - z/2):
                   dLambda_bar/dLambda = Delta BL^2,  dLambda_bar/dDelta = Lambda BL^2
                   dcoef/dLambda = Delta^2 BL^2 / 2,  dcoef/dDelta = BL^2

    (``phi_1(z) = (e^z - 1)/z``, ``phi_2(z) = (e^z - 1 - z)/z^2``; ``phi_1' =
    phi_1 - phi_2``, evaluated without cancellation for small ``z``.)

    Parameters
    ----------
    d_Lambda_bar : ndarray ``[P]`` complex
    d_B_bar : ndarray ``[P, H]`` complex
    saved : DiscretizationSaved

    Returns
    -------
    dict
        ``Lambda`` ``[P]`` complex, ``B_tilde`` ``[P, H]`` complex, ``step``
        ``[P]`` real.

    Examples
    --------
    >>> Lam = np.array([-0.5 + 2j]); Bt = np.array([[1.0 + 0.5j]]); step = np.array([0.05])
    >>> Lb, Bb, saved = discretize_forward(Lam, Bt, step)
    >>> g = discretize_backward(np.array([1.0 + 0j]), np.zeros((1, 1), complex), saved)
    >>> bool(np.isclose(g["step"][0], (Lam * Lb).real[0]))      # d Re(Lambda_bar) / d Delta
    True
    """
    method, Lambda, step, Lambda_bar, coef, B_tilde = saved
    d_Lambda_bar = np.asarray(d_Lambda_bar, dtype=np.complex128)
    d_B_bar = np.asarray(d_B_bar, dtype=np.complex128)
    d_coef = np.sum(np.conj(B_tilde) * d_B_bar, axis=1)                    # [P]
    d_B_tilde = np.conj(coef)[:, None] * d_B_bar                           # [P, H]
    if method == "zoh":
        z = Lambda * step
        phi1 = coef / step
        dLb_dLam, dLb_dstep = step * Lambda_bar, Lambda * Lambda_bar
        dc_dLam, dc_dstep = step * step * (phi1 - _phi2(z)), Lambda_bar
    else:
        BL2 = (coef / step) ** 2
        dLb_dLam, dLb_dstep = step * BL2, Lambda * BL2
        dc_dLam, dc_dstep = 0.5 * step * step * BL2, BL2
    d_Lambda = np.conj(dLb_dLam) * d_Lambda_bar + np.conj(dc_dLam) * d_coef
    d_step = np.real(np.conj(dLb_dstep) * d_Lambda_bar + np.conj(dc_dstep) * d_coef)
    return {"Lambda": d_Lambda, "B_tilde": d_B_tilde, "step": d_step}


# ===========================================================================
# The core: recurrence and read-out, one step after another (the ground truth)
# ===========================================================================

class ScanSaved(NamedTuple):
    """What :func:`scan_forward` keeps for :func:`scan_backward`.

    Attributes
    ----------
    u : ndarray ``[batch, seq_len, H]``
    Lambda_bar : ndarray ``[P]`` complex
    B_bar : ndarray ``[P, H]`` complex
    C_tilde : ndarray ``[H, P]`` (``[H, 2P]`` bidirectional) complex
    x0 : ndarray ``[batch, P]`` complex
    states : ndarray ``[batch, seq_len, P]`` complex
        ``x_k`` after every step (forward in time).
    states_bwd : ndarray ``[batch, seq_len, P]`` complex or None
        The backward-in-time states (bidirectional only).
    conj_sym, bidirectional : bool
    """

    u: np.ndarray
    Lambda_bar: np.ndarray
    B_bar: np.ndarray
    C_tilde: np.ndarray
    x0: np.ndarray
    states: np.ndarray
    states_bwd: Optional[np.ndarray]
    conj_sym: bool
    bidirectional: bool


def read_out(C_tilde: np.ndarray, x: np.ndarray, conj_sym: bool) -> np.ndarray:
    """``y = Re(C_tilde x)``, doubled under conjugate symmetry.

    Parameters
    ----------
    C_tilde : ndarray ``[H, P]`` complex
    x : ndarray ``[..., P]`` complex

    Returns
    -------
    ndarray ``[..., H]``

    Examples
    --------
    >>> read_out(np.array([[1j]]), np.array([1j]), conj_sym=True)        # 2 Re(i * i)
    array([-2.])
    """
    y = np.real(x @ C_tilde.T)
    return 2.0 * y if conj_sym else y


def scan_forward(u, Lambda_bar, B_bar, C_tilde, x0=None, *, conj_sym=True, bidirectional=False):
    r"""The S5 core, one time step after another: ``(y, x_last, saved)``.

    ::

        x_k = Lambda_bar * x_{k-1} + B_bar u_k        x_{-1} = x0
        y_k = Re(C_tilde x_k)   (x 2 with conjugate symmetry; no D term)

    Bidirectional (lindermanlab's ``apply_ssm(bidirectional=True)``): a
    second state runs backwards in time over the same system,
    ``x'_k = Lambda_bar * x'_{k+1} + B_bar u_k`` from ``x'_L = 0``, and
    ``y_k = Re(C1 x_k + C2 x'_k)`` with ``C_tilde = [C1, C2]``.

    Parameters
    ----------
    u : ndarray ``[batch, seq_len, H]``
    Lambda_bar : ndarray ``[P]`` complex
    B_bar : ndarray ``[P, H]`` complex
    C_tilde : ndarray ``[H, P]`` complex (``[H, 2P]`` bidirectional)
    x0 : ndarray ``[batch, P]`` complex, optional
        State before the first step (zeros if omitted).
    conj_sym, bidirectional : bool

    Returns
    -------
    y : ndarray ``[batch, seq_len, H]``
    x_last : ndarray ``[batch, P]`` complex
        The forward state after the last step.
    saved : ScanSaved

    Examples
    --------
    >>> u = np.ones((1, 3, 1))
    >>> y, x, _ = scan_forward(u, np.array([0.5 + 0j]), np.array([[1.0 + 0j]]),
    ...                        np.array([[1.0 + 0j]]), conj_sym=False)
    >>> y[0, :, 0]                                   # 1, 0.5 + 1, 0.75 + 1
    array([1.  , 1.5 , 1.75])
    """
    batch, L, H = u.shape
    P = Lambda_bar.shape[0]
    x = np.zeros((batch, P), np.complex128) if x0 is None else np.asarray(x0, np.complex128)
    x0 = x.copy()
    states = np.empty((batch, L, P), np.complex128)
    y = np.empty((batch, L, H))
    C_f = C_tilde[:, :P]
    for k in range(L):
        x = Lambda_bar * x + u[:, k] @ B_bar.T               # x_k = Lambda_bar x_{k-1} + B_bar u_k
        states[:, k] = x
        y[:, k] = read_out(C_f, x, conj_sym)                  # y_k = Re(C_tilde x_k)
    states_bwd = None
    if bidirectional:
        states_bwd = np.empty_like(states)
        xb = np.zeros((batch, P), np.complex128)
        C_b = C_tilde[:, P:]
        for k in range(L - 1, -1, -1):
            xb = Lambda_bar * xb + u[:, k] @ B_bar.T          # x'_k = Lambda_bar x'_{k+1} + B_bar u_k
            states_bwd[:, k] = xb
            y[:, k] += read_out(C_b, xb, conj_sym)            # + Re(C2 x'_k)
    saved = ScanSaved(u, Lambda_bar, B_bar, C_tilde, x0, states, states_bwd, bool(conj_sym),
                      bool(bidirectional))
    return y, x, saved


def scan_backward(dy, dx_last, saved: ScanSaved) -> dict:
    r"""Manual backward of :func:`scan_forward`: a reverse-time scan.

    With ``g_k = dL/dx_k`` (complex, ``dRe + i dIm``) and ``c = 2`` under
    conjugate symmetry (else 1)::

        g_k         = c C_tilde^H dy_k + conj(Lambda_bar) g_{k+1}     (g_{L-1} adds dx_last)
        d Lambda_bar = sum_{b,k} conj(x_{k-1}) g_k
        d B_bar      = sum_{b,k} g_k u_k^T
        d u_k        = Re(B_bar^H g_k)
        d C_tilde    = c sum_{b,k} dy_k conj(x_k)^T
        d x0         = conj(Lambda_bar) g_0

    The backward-in-time states of a bidirectional SSM have the same
    adjoint running forward in time.

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, H]``
    dx_last : ndarray ``[batch, P]`` complex or None
    saved : ScanSaved

    Returns
    -------
    dict
        ``u [batch, seq_len, H]``, ``Lambda_bar [P]``, ``B_bar [P, H]``,
        ``C_tilde`` (its shape), ``x0 [batch, P]``; all complex but ``u``.

    Examples
    --------
    >>> u = np.ones((1, 2, 1)); lam = np.array([0.5 + 0j])
    >>> y, x, saved = scan_forward(u, lam, np.array([[1.0 + 0j]]), np.array([[1.0 + 0j]]),
    ...                            conj_sym=False)
    >>> g = scan_backward(np.array([[[0.0], [1.0]]]), None, saved)   # L = y_1 = 0.5 x_0 + 1
    >>> g["Lambda_bar"], g["u"][0, :, 0]                            # dL/dLambda_bar = x_0 = 1
    (array([1.+0.j]), array([0.5, 1. ]))
    """
    u, Lambda_bar, B_bar, C_tilde, x0, X, Xb, conj_sym, bidirectional = saved
    batch, L, H = u.shape
    P = Lambda_bar.shape[0]
    c = 2.0 if conj_sym else 1.0
    # the adjoint states, a scan backwards in time
    G = np.empty((batch, L, P), np.complex128)
    g = np.zeros((batch, P), np.complex128) if dx_last is None else \
        np.array(dx_last, dtype=np.complex128)
    C_f = C_tilde[:, :P]
    for k in range(L - 1, -1, -1):
        g = c * dy[:, k] @ C_f.conj() + g                      # dL/dx_k, complete
        G[:, k] = g
        g = np.conj(Lambda_bar) * g                             # its share of dL/dx_{k-1}
    dx0 = g
    X_prev = np.concatenate([x0[:, None], X[:, :-1]], axis=1)  # x_{k-1}
    dLambda_bar = np.sum(np.conj(X_prev) * G, axis=(0, 1))
    dC = np.zeros(C_tilde.shape, np.complex128)
    dC[:, :P] = c * np.einsum("bkh,bkp->hp", dy, np.conj(X))
    if bidirectional:
        # x'_k = Lambda_bar x'_{k+1} + B_bar u_k: its adjoint runs forward in time
        C_b = C_tilde[:, P:]
        G_b = np.empty_like(G)
        g = np.zeros((batch, P), np.complex128)
        for k in range(L):
            g = c * dy[:, k] @ C_b.conj() + g                  # dL/dx'_k
            G_b[:, k] = g
            g = np.conj(Lambda_bar) * g                         # its share of dL/dx'_{k+1}
        X_next = np.concatenate([Xb[:, 1:], np.zeros((batch, 1, P))], axis=1)   # x'_{k+1}
        dLambda_bar = dLambda_bar + np.sum(np.conj(X_next) * G_b, axis=(0, 1))
        dC[:, P:] = c * np.einsum("bkh,bkp->hp", dy, np.conj(Xb))
        G = G + G_b                                             # both read B_bar u_k
    dB_bar = np.einsum("bkp,bkh->ph", G, u)                     # sum_k g_k u_k^T
    du = np.real(np.conj(G) @ B_bar)                            # Re(B_bar^H g_k)
    return {"u": du, "Lambda_bar": dLambda_bar, "B_bar": dB_bar, "C_tilde": dC, "x0": dx0}


def lambda_powers(Lambda_bar, n: int) -> np.ndarray:
    """``Lambda_bar^k`` for ``k = 0 .. n-1``, ``[n, P]``, by repeated multiplication.

    Each power is the previous one times ``Lambda_bar``, the rounding pattern
    of a scan (``exp(k log Lambda_bar)`` would be off by ``k |log
    Lambda_bar| eps`` relative, 1e-12 at ``k = 4096`` for a fast-rotating
    eigenvalue).

    Examples
    --------
    >>> lambda_powers(np.array([0.5 + 0j, 1j]), 3)
    array([[ 1.  +0.j,  1.  +0.j],
           [ 0.5 +0.j,  0.  +1.j],
           [ 0.25+0.j, -1.  +0.j]])
    """
    Lambda_bar = as_float_array(Lambda_bar, "Lambda_bar", allow_complex=True, ndim=1)
    Lambda_bar = Lambda_bar.astype(np.complex128, copy=False)
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected an integer >= 0, got {n!r}")
    out = np.empty((n, Lambda_bar.shape[0]), np.complex128)
    if n:
        out[0] = 1.0
        # cumprod multiplies the running product by the next factor, one at a time
        np.cumprod(np.broadcast_to(Lambda_bar, (n - 1, Lambda_bar.shape[0])), axis=0,
                   out=out[1:])
    return out


def s5_kernel(Lambda_bar, B_bar, C_tilde, seq_len: int, *, conj_sym: bool = True) -> np.ndarray:
    r"""The convolution kernel of the LTI system: ``K_k = Re(C_tilde Lambda_bar^k B_bar)``.

    Unrolling the recurrence from ``x_{-1} = 0``,
    ``y_k = sum_{m=0}^{k} K_m u_{k-m} + D u_k`` with

    .. math::  K_m = \mathrm{Re}\big(\tilde C\, \mathrm{diag}(\bar\Lambda^m)\, \bar B\big)
               \in \mathbb{R}^{H\times H}

    (times 2 with conjugate symmetry). A dense ``[seq_len, H, H]`` array:
    ``O(seq_len H^2 P)`` work. This is why S5 is computed by a scan: the
    MIMO kernel is ``H x H`` per lag, where S4's SISO kernels are ``H``
    scalars per lag.

    Parameters
    ----------
    Lambda_bar : ndarray ``[P]`` complex
    B_bar : ndarray ``[P, H]`` complex
    C_tilde : ndarray ``[H, P]`` complex
    seq_len : int
    conj_sym : bool

    Returns
    -------
    K : ndarray ``[seq_len, H, H]`` (real)

    Examples
    --------
    >>> K = s5_kernel(np.array([0.5 + 0j]), np.array([[1.0, 2.0]]) + 0j,
    ...               np.array([[1.0], [3.0]]) + 0j, 2, conj_sym=False)
    >>> K[1]                                       # 0.5 * C B
    array([[0.5, 1. ],
           [1.5, 3. ]])
    """
    c = 2.0 if conj_sym else 1.0
    powers = lambda_powers(Lambda_bar, seq_len)                          # [L, P]
    P = powers.shape[1]
    B_bar = as_float_array(B_bar, "B_bar", allow_complex=True, ndim=2)
    C_tilde = as_float_array(C_tilde, "C_tilde", allow_complex=True, ndim=2)
    if B_bar.shape[0] != P or C_tilde.shape != (B_bar.shape[1], P):
        raise ValueError(f"s5_kernel: expected B_bar [P, H] and C_tilde [H, P] with P = {P} "
                         f"(from Lambda_bar), got {B_bar.shape} and {C_tilde.shape}")
    return c * np.real(np.einsum("hp,kp,pj->khj", C_tilde, powers, B_bar, optimize=True))


# ===========================================================================
# The layer: parameters in, output and gradients out
# ===========================================================================

@dataclass
class S5Saved:
    """Named values :func:`s5_ssm_forward` keeps for :func:`s5_ssm_backward`.

    Attributes
    ----------
    engine : str
    core : object
        The engine's saved values.
    disc : DiscretizationSaved
    u : ndarray ``[batch, seq_len, H]``
    D : ndarray ``[H]``
    flags : dict
        ``conj_sym, bidirectional, clip_eigs, step_rescale``, ``clip_mask``
        (``[P]`` bool: where ``Re(Lambda)`` was *not* clipped), ``P``, ``H``.
    """

    engine: str
    core: Any
    disc: DiscretizationSaved
    u: np.ndarray
    D: np.ndarray
    flags: dict


def _engine_functions(engine: str):
    if engine == "numpy":
        return scan_forward, scan_backward
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    from ..scan import s5_engines
    return s5_engines.ENGINE_FUNCTIONS[engine]


def _check_u(u, H=None) -> np.ndarray:
    u = as_float_array(u, "u", ndim=3).astype(np.float64, copy=False)
    if min(u.shape) < 1:
        raise ValueError(f"u: expected a non-empty [batch, seq_len, H], got shape {u.shape}")
    if H is not None and u.shape[2] != H:
        raise ValueError(f"u: expected shape (batch, seq_len, {H}) [batch, seq_len, H] (H from "
                         f"params['D']), got {u.shape}")
    return u


def _check_state(x, batch, P, name="initial_state") -> np.ndarray:
    x = as_float_array(x, name, allow_complex=True)
    if x.shape != (batch, P):
        raise ValueError(f"{name}: expected shape ({batch}, {P}) [batch, P] (complex), got "
                         f"{x.shape}")
    return x.astype(np.complex128)


def _step(log_step: np.ndarray, step_rescale) -> np.ndarray:
    try:
        rescale = float(step_rescale)
    except (TypeError, ValueError):
        raise ValueError(f"step_rescale: expected a number > 0, got {step_rescale!r}") from None
    if not (math.isfinite(rescale) and rescale > 0):
        raise ValueError(f"step_rescale: expected a finite number > 0 (the step is "
                         f"step_rescale * exp(log_step)), got {step_rescale!r}")
    return rescale * np.exp(log_step)


def s5_ssm_forward(params: dict, u, *, discretization: str = "zoh", conj_sym: bool = True,
                   bidirectional: bool = False, clip_eigs: bool = False, step_rescale=1.0,
                   initial_state=None, engine: str = "numpy"):
    r"""The S5 SSM over a sequence: ``(y, last_state, saved)``.

    ::

        Lambda     = clip?(Lambda_re) + i Lambda_im                         [P]
        Delta      = step_rescale * exp(log_step)                            [P]
        Lambda_bar, B_bar = discretize(Lambda, B_tilde, Delta)               ZOH or bilinear
        x_k        = Lambda_bar * x_{k-1} + B_bar u_k                        [batch, P]
        y_k        = Re(C_tilde x_k) (x 2 with conj_sym) + D * u_k           [batch, H]

    Parameters
    ----------
    params : dict
        ``Lambda_re, Lambda_im [P]``, ``B [P, H, 2]``, ``C [H, P, 2]`` (or
        ``C1, C2`` when bidirectional), ``D [H]``, ``log_step [P]``
        (:func:`init_s5_ssm`).
    u : ndarray ``[batch, seq_len, H]``
    discretization : {"zoh", "bilinear"}
    conj_sym : bool
        The ``P`` stored states are one of each conjugate pair: read out ``2 Re``.
    bidirectional : bool
        Add a backward-in-time pass read out by ``C2``; not causal.
    clip_eigs : bool
        ``Re(Lambda) <= -1e-4``.
    step_rescale : float
        Multiplies every step (> 0).
    initial_state : ndarray ``[batch, P]`` complex, optional
        ``x_{-1}``; pass a previous call's ``last_state`` to continue a
        sequence (chunks equal one call). Not for a bidirectional SSM.
    engine : {"numpy", "numba", "logdepth", "fft", "fft_dense"}

    Returns
    -------
    y : ndarray ``[batch, seq_len, H]``
    last_state : ndarray ``[batch, P]`` complex
        ``x`` after the last step (the forward direction's, if bidirectional).
    saved : S5Saved

    Raises
    ------
    ValueError
        Parameters or ``u`` of the wrong shape (the message names the
        expected and the actual), non-finite values, a non-positive step, an
        initial state for a bidirectional SSM, an unknown engine or rule.

    Examples
    --------
    >>> params = init_s5_ssm(4, 8, rng=0)
    >>> u = np.random.default_rng(1).standard_normal((2, 10, 4))
    >>> y, x, saved = s5_ssm_forward(params, u)
    >>> y.shape, x.shape, x.dtype
    ((2, 10, 4), (2, 4), dtype('complex128'))
    >>> y1, x1, _ = s5_ssm_forward(params, u[:, :6])
    >>> y2, _, _ = s5_ssm_forward(params, u[:, 6:], initial_state=x1)
    >>> bool(np.allclose(np.concatenate([y1, y2], axis=1), y, rtol=0, atol=1e-14))
    True
    """
    fwd, _ = _engine_functions(engine)
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization: expected one of {DISCRETIZATIONS}, got "
                         f"{discretization!r}")
    p = _check_ssm_params(params, bool(bidirectional))
    H, P = p["D"].shape[0], p["Lambda_re"].shape[0]
    u = _check_u(u, H)
    batch = u.shape[0]
    if initial_state is not None:
        if bidirectional:
            raise ValueError("initial_state: a bidirectional SSM has no carried state (its "
                             "backward pass starts at the end of the sequence), got one")
        x0 = _check_state(initial_state, batch, P)
    else:
        x0 = np.zeros((batch, P), np.complex128)
    Lambda, B_tilde, C_tilde, D, log_step = ssm_matrices(p, clip_eigs=clip_eigs,
                                                         bidirectional=bidirectional)
    step = _step(log_step, step_rescale)
    Lambda_bar, B_bar, disc = discretize_forward(Lambda, B_tilde, step, discretization)
    y, last_state, core = fwd(u, Lambda_bar, B_bar, C_tilde, x0, conj_sym=bool(conj_sym),
                              bidirectional=bool(bidirectional))
    y = y + D * u                                                            # feedthrough
    clip_mask = p["Lambda_re"] <= CLIP_EIGS_MAX if clip_eigs else np.ones(P, bool)
    flags = dict(conj_sym=bool(conj_sym), bidirectional=bool(bidirectional),
                 clip_eigs=bool(clip_eigs), step_rescale=float(step_rescale),
                 clip_mask=clip_mask, P=P, H=H)
    return y, last_state, S5Saved(engine, core, disc, u, D, flags)


def s5_ssm_backward(d_y, d_last_state, saved: S5Saved) -> dict:
    r"""Manual backward of :func:`s5_ssm_forward`.

    Chains the engine's core backward (a reverse-time scan, see
    :func:`scan_backward`), :func:`discretize_backward` and the
    parameterisation::

        d D        = sum_{b,k} d y_k * u_k          d u_k += D * d y_k
        d log_step = d Delta * Delta                 (Delta = step_rescale exp(log_step))
        d Lambda_re = Re(d Lambda) (0 where clipped),  d Lambda_im = Im(d Lambda)
        d B[..., 0] = Re(d B_tilde),  d B[..., 1] = Im(d B_tilde)    (same for C)

    Parameters
    ----------
    d_y : ndarray ``[batch, seq_len, H]``
        ``dL/dy``.
    d_last_state : ndarray ``[batch, P]`` complex or None
        ``dL/dRe(last_state) + i dL/dIm(last_state)``.
    saved : S5Saved

    Returns
    -------
    dict
        ``u [batch, seq_len, H]``, ``initial_state [batch, P]`` (complex),
        and one entry per parameter in its shape: ``Lambda_re``,
        ``Lambda_im``, ``B``, ``C`` (or ``C1``, ``C2``), ``D``, ``log_step``.

    Examples
    --------
    >>> params = init_s5_ssm(3, 4, rng=0)
    >>> u = np.random.default_rng(0).standard_normal((1, 5, 3))
    >>> y, x, saved = s5_ssm_forward(params, u)
    >>> g = s5_ssm_backward(np.ones_like(y), None, saved)
    >>> sorted(g)
    ['B', 'C', 'D', 'Lambda_im', 'Lambda_re', 'initial_state', 'log_step', 'u']
    """
    _, bwd = _engine_functions(saved.engine)
    f = saved.flags
    u, D = saved.u, saved.D
    batch, _, H = u.shape
    P = f["P"]
    d_y = as_float_array(d_y, "d_y", ndim=3).astype(np.float64, copy=False)
    if d_y.shape != u.shape:
        raise ValueError(f"d_y: expected shape {u.shape} [batch, seq_len, H] (as y), got "
                         f"{d_y.shape}")
    if d_last_state is not None:
        d_last_state = _check_state(d_last_state, batch, P, "d_last_state")
    g = bwd(np.ascontiguousarray(d_y), d_last_state, saved.core)
    dD = np.einsum("bkh,bkh->h", d_y, u)
    du = g["u"] + d_y * D
    gd = discretize_backward(g["Lambda_bar"], g["B_bar"], saved.disc)
    step = saved.disc.step
    d_log_step = gd["step"] * step
    dLambda = gd["Lambda"]
    out = {
        "u": du,
        "initial_state": g["x0"],
        "Lambda_re": np.real(dLambda) * f["clip_mask"],
        "Lambda_im": np.imag(dLambda).copy(),
        "B": np.stack([gd["B_tilde"].real, gd["B_tilde"].imag], axis=-1),
        "D": dD,
        "log_step": d_log_step,
    }
    dC = g["C_tilde"]
    if f["bidirectional"]:
        out["C1"] = np.stack([dC[:, :P].real, dC[:, :P].imag], axis=-1)
        out["C2"] = np.stack([dC[:, P:].real, dC[:, P:].imag], axis=-1)
    else:
        out["C"] = np.stack([dC.real, dC.imag], axis=-1)
    return out


def s5_ssm(params: dict, u, **kwargs):
    """The S5 SSM, forward only: ``(y, last_state)``.

    Same arguments as :func:`s5_ssm_forward`.

    Examples
    --------
    >>> params = init_s5_ssm(2, 4, rng=3)
    >>> u = np.random.default_rng(0).standard_normal((1, 7, 2))
    >>> a, _ = s5_ssm(params, u)
    >>> b, _ = s5_ssm(params, u, engine="fft")
    >>> bool(np.allclose(a, b, rtol=0, atol=1e-13))
    True
    """
    y, last_state, _ = s5_ssm_forward(params, u, **kwargs)
    return y, last_state


def s5_ssm_step(params: dict, u_k, x, *, discretization: str = "zoh", conj_sym: bool = True,
                clip_eigs: bool = False, step_rescale=1.0):
    r"""One step of the recurrence: ``(y_k, x_k)``, O(1) in the sequence length.

    ``x_k = Lambda_bar * x_{k-1} + B_bar u_k``,
    ``y_k = Re(C_tilde x_k) (x 2) + D * u_k``: the same floating-point
    operations as one iteration of :func:`scan_forward`, so stepping through a
    sequence reproduces the numpy engine's full output exactly.

    Parameters
    ----------
    params : dict
        Unidirectional parameters (a bidirectional SSM cannot be stepped).
    u_k : ndarray ``[batch, H]``
    x : ndarray ``[batch, P]`` complex
        ``x_{k-1}``.

    Returns
    -------
    y_k : ndarray ``[batch, H]``
    x_k : ndarray ``[batch, P]`` complex

    Examples
    --------
    >>> params = init_s5_ssm(2, 4, rng=0)
    >>> u = np.random.default_rng(0).standard_normal((1, 4, 2))
    >>> x = np.zeros((1, 2), complex)
    >>> for k in range(4):
    ...     y_k, x = s5_ssm_step(params, u[:, k], x)
    >>> full, _ = s5_ssm(params, u)
    >>> bool(np.array_equal(y_k, full[:, -1]))
    True
    """
    if isinstance(params, dict) and ("C1" in params or "C2" in params):
        raise ValueError("s5_ssm_step: a bidirectional SSM (params C1, C2) is not causal and "
                         "cannot be stepped")
    p = _check_ssm_params(params, False)
    H, P = p["D"].shape[0], p["Lambda_re"].shape[0]
    u_k = as_float_array(u_k, "u_k", ndim=2).astype(np.float64, copy=False)
    if u_k.shape[1] != H:
        raise ValueError(f"u_k: expected shape (batch, {H}) [batch, H], got {u_k.shape}")
    x = _check_state(x, u_k.shape[0], P, "x")
    Lambda, B_tilde, C_tilde, D, log_step = ssm_matrices(p, clip_eigs=clip_eigs)
    Lambda_bar, B_bar, _ = discretize_forward(Lambda, B_tilde, _step(log_step, step_rescale),
                                              discretization)
    x = Lambda_bar * x + u_k @ B_bar.T
    return read_out(C_tilde, x, conj_sym) + D * u_k, x
