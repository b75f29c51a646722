"""Build the tutorial notebooks from their sources and store their outputs.

The notebooks in ``tutorials/`` are generated: each one's cells live below,
in :data:`NOTEBOOKS`, as one text in a light cell format (a line ``%% md``
starts a Markdown cell, a line ``%% code`` a code cell). This script writes
every ``NN_name.ipynb`` with nbformat and executes it from scratch with
nbclient in ``tutorials/`` (kernel ``python3``), so the committed notebooks
carry their outputs and render on GitHub.

Usage::

    python tutorials/_build.py                 # build and execute every notebook
    python tutorials/_build.py 01 03           # only the notebooks whose name starts so
    python tutorials/_build.py --no-execute    # write the cells, no outputs

``tests/test_tutorials.py`` executes every notebook again from scratch and
checks that the committed cells equal what this script generates.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
KERNEL = "python3"
#: Per-cell timeout of the execution, seconds.
TIMEOUT = 600


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` from the ``%% md`` / ``%% code`` format.

    Leading and trailing blank lines of every cell are dropped; a cell with
    no text is an error (a stray marker).
    """
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in ("%% md", "%% code"):
            cells.append(("markdown" if stripped == "%% md" else "code", []))
            continue
        if not cells:
            if stripped:
                raise ValueError(f"text before the first cell marker: {line!r}")
            continue
        cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        source = "\n".join(lines).strip("\n")
        if not source.strip():
            raise ValueError(f"empty {kind} cell (a stray marker?)")
        out.append((kind, source))
    return out


def make_notebook(text: str) -> nbformat.NotebookNode:
    """A fresh (unexecuted) notebook of the cells in ``text``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(parse_cells(text)):
        cell = (nbformat.v4.new_markdown_cell(source) if kind == "markdown"
                else nbformat.v4.new_code_cell(source))
        cell["id"] = f"cell-{i:02d}"                     # stable ids: small diffs
        nb.cells.append(cell)
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path = HERE, timeout: int = TIMEOUT):
    """Run every cell of ``nb`` in a fresh kernel (raises on the first error)."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="name prefixes (e.g. 01 03); default all")
    parser.add_argument("--no-execute", action="store_true", help="write cells without outputs")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if not names:
        print(f"no notebook matches {args.only}; known: {list(NOTEBOOKS)}", file=sys.stderr)
        return 2
    for name in names:
        nb = make_notebook(NOTEBOOKS[name])
        t0 = time.perf_counter()
        if not args.no_execute:
            execute(nb)
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        print(f"{path.name}: {len(nb.cells)} cells, {path.stat().st_size / 1024:.0f} kB, "
              f"{time.perf_counter() - t0:.1f} s")
    return 0


# ===========================================================================
# The notebooks: name -> cells (sources of NN_name.ipynb)
# ===========================================================================

NOTEBOOKS: dict[str, str] = {}

NOTEBOOKS["01_discretization"] = r'''
%% md
# 1. From a continuous SSM to a discrete recurrence

A state-space model starts in continuous time. A state $x(t) \in \mathbb{R}^N$ is driven by an input $u(t)$:

$$x'(t) = A\,x(t) + B\,u(t), \qquad y(t) = C\,x(t).$$

A sequence model sees samples $u_0, u_1, \dots$ taken every $\Delta$ seconds, so we need a *recurrence*

$$x_k = \bar A\, x_{k-1} + \bar B\, u_k, \qquad y_k = C\, x_k .$$

Turning $(A, B, \Delta)$ into $(\bar A, \bar B)$ is **discretization**. This notebook derives the three rules
refssm offers, checks each against an independent computation (an ODE solver, `scipy.linalg.expm`,
`scipy.signal.cont2discrete`), and shows with pictures where they differ.

| rule | $\bar A$ | $\bar B$ | used by |
|---|---|---|---|
| zero-order hold (ZOH) | $e^{\Delta A}$ | $(\Delta A)^{-1}(e^{\Delta A} - I)\,\Delta B$ | Mamba (eq. 4), S5 |
| bilinear (Tustin) | $(I - \tfrac{\Delta}{2}A)^{-1}(I + \tfrac{\Delta}{2}A)$ | $(I - \tfrac{\Delta}{2}A)^{-1}\Delta B$ | S4 (eq. 3) |
| forward Euler | $I + \Delta A$ | $\Delta B$ | a textbook baseline |

Every check below is an `assert` that prints the measured figure; if a number is wrong, the notebook fails.
%% code
%matplotlib inline
import numpy as np
import scipy.integrate
import scipy.linalg
import scipy.signal

from refssm.ssm.discretize import (bilinear, bilinear_dense, euler, euler_dense, mamba_discretize,
                                   zoh, zoh_dense)
from refssm.verify.metrics import normwise_error
from refssm.viz import new_figure, plot_eigenvalues, plot_impulse_response, impulse_response

np.set_printoptions(precision=4, suppress=True)
%% md
## Zero-order hold: exact when the input is held constant

Hold the input at $u_k$ over one step. The ODE is linear, so its solution after $\Delta$ seconds is

$$x(t + \Delta) = e^{\Delta A} x(t) + \int_0^{\Delta} e^{sA}\,ds\; B\,u_k
= \underbrace{e^{\Delta A}}_{\bar A}\,x(t) + \underbrace{(\Delta A)^{-1}(e^{\Delta A} - I)\,\Delta B}_{\bar B}\,u_k .$$

For one eigenvalue $a$ (a diagonal $A$, as in Mamba and S5) everything is a scalar:
$\bar a = e^{\Delta a}$ and $\bar b = \frac{e^{\Delta a} - 1}{a}\, b$. The other two rules are approximations of the
same integral: bilinear uses the trapezoid rule, Euler a single rectangle.
%% code
def zoh_scalar(a, b, delta):
    """ZOH for one eigenvalue a: (exp(delta a), (exp(delta a) - 1) / a * b)."""
    a_bar = np.exp(delta * a)
    return a_bar, (a_bar - 1) / a * b

def bilinear_scalar(a, b, delta):
    """Bilinear (trapezoid): ((1 + delta a/2) / (1 - delta a/2), delta b / (1 - delta a/2))."""
    return (1 + delta * a / 2) / (1 - delta * a / 2), delta * b / (1 - delta * a / 2)

def euler_scalar(a, b, delta):
    """Forward Euler: (1 + delta a, delta b)."""
    return 1 + delta * a, delta * b

a = np.array([-0.5, -2.0, -0.3 + 4.0j])     # three eigenvalues, one of them oscillating
b = np.array([1.0, 0.5, 1.0 + 0.0j])
delta = 0.1
for name, mine, lib in [("zoh", zoh_scalar, zoh), ("bilinear", bilinear_scalar, bilinear),
                        ("euler", euler_scalar, euler)]:
    ours, theirs = mine(a, b, delta), lib(a, b, delta)
    err = max(normwise_error(ours[0], theirs[0]), normwise_error(ours[1], theirs[1]))
    print(f"{name:8s}  scalar formula vs refssm.ssm.discretize.{name}: {err:.1e}")
    assert err < 1e-14
%% md
**Check: ZOH is the exact solution.** Solve the ODE over one step with a high-accuracy solver (DOP853),
starting from a random state, with the input held at $u_k$, and compare with $\bar A x + \bar B u_k$.
We use the 4-state HiPPO-LegS matrix of S4 as $A$ (dense, non-normal: a hard case).
ZOH should agree to the solver's accuracy; bilinear and Euler carry a truncation error.
%% code
def hippo_legs(N):
    """HiPPO-LegS (S4): A[n, k] = -sqrt(2n+1) sqrt(2k+1) below the diagonal, -(n+1) on it."""
    q = np.sqrt(2 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(1.0, N + 1))
    return A, q.copy()

A, B = hippo_legs(4)
rng = np.random.default_rng(0)
x0, u_k, delta = rng.standard_normal(4), 0.7, 0.25

sol = scipy.integrate.solve_ivp(lambda t, x: A @ x + B * u_k, (0.0, delta), x0,
                                method="DOP853", rtol=1e-13, atol=1e-14)
x_ode = sol.y[:, -1]
errors = {}
for name, rule in [("zoh", zoh_dense), ("bilinear", bilinear_dense), ("euler", euler_dense)]:
    A_bar, B_bar = rule(A, B, delta)
    errors[name] = normwise_error(A_bar @ x0 + B_bar * u_k, x_ode)
    print(f"{name:8s}  one step vs the ODE solver: {errors[name]:.1e}")
assert errors["zoh"] < 1e-10                      # exact, up to the solver's tolerance
assert errors["zoh"] < errors["bilinear"] < errors["euler"]
%% md
## $\bar A = \exp(\Delta A)$, diagonal and dense, against scipy

For a diagonal $A$ the matrix exponential is the exponential of each eigenvalue, so Mamba and S5 never form a
matrix. For a dense $A$, refssm computes ZOH as one matrix exponential of Van Loan's block matrix
$\exp\left(\Delta\begin{bmatrix}A & B\\ 0 & 0\end{bmatrix}\right) = \begin{bmatrix}\bar A & \bar B\\ 0 & I\end{bmatrix}$.
Two independent references: `scipy.linalg.expm` and `scipy.signal.cont2discrete` (which names the rules
`'zoh'`, `'bilinear'`, `'euler'`).
%% code
# diagonal: exp of each eigenvalue == expm of the diagonal matrix
lam = np.array([-1.0, -2.0, -0.5 + 3.0j, -0.5 - 3.0j])
A_bar_diag, _ = zoh(lam, np.ones(4), 0.3)
err = normwise_error(A_bar_diag, np.diag(scipy.linalg.expm(np.diag(0.3 * lam))))
print(f"diagonal ZOH vs scipy.linalg.expm(diag(delta * lambda)): {err:.1e}")
assert err < 1e-14

# dense: every rule against scipy.signal.cont2discrete
C, D = np.ones((1, 4)), np.zeros((1, 1))
for name, rule in [("zoh", zoh_dense), ("bilinear", bilinear_dense), ("euler", euler_dense)]:
    A_bar, B_bar = rule(A, B[:, None], delta)
    Ad, Bd, *_ = scipy.signal.cont2discrete((A, B[:, None], C, D), delta, method=name)
    err = max(normwise_error(A_bar, Ad), normwise_error(B_bar, Bd))
    print(f"{name:8s}  refssm vs scipy.signal.cont2discrete: {err:.1e}")
    assert err < 1e-12
%% md
## Where the rules differ: one eigenvalue

Each rule is a function of $z = \Delta a$ alone: $\bar a = e^{z}$, $\frac{1 + z/2}{1 - z/2}$ or $1 + z$.
All three agree to first order near $z = 0$ (small steps). Far from it:

* **ZOH** decays to 0: a large step forgets everything, as the continuous system would.
* **bilinear** tends to $-1$: the sign flips every step (ringing), but $|\bar a| < 1$ always, so it stays stable.
* **Euler** leaves the stable band $|\bar a| < 1$ at $z = -2$: a step too large *explodes*.
%% code
z = np.linspace(-6, 0.3, 400)
fig, axes = new_figure(1, 1, figsize=(8, 3.6))
ax = axes[0, 0]
ax.axhspan(-1, 1, color="0.92", label="stable: |ā| < 1")
ax.plot(z, np.exp(z), lw=2, label="ZOH  exp(z)")
ax.plot(z, (1 + z / 2) / (1 - z / 2), lw=2, label="bilinear  (1 + z/2)/(1 - z/2)")
ax.plot(z, 1 + z, lw=2, label="Euler  1 + z")
ax.axvline(-2, color="tab:green", ls=":", lw=1)
ax.set_ylim(-3, 1.5)
ax.set_xlabel("z = Δ·a  (step size times a real eigenvalue)")
ax.set_ylabel("discrete eigenvalue ā")
ax.set_title("What each rule makes of one real eigenvalue a < 0")
ax.legend(fontsize=8, loc="lower right")
fig
%% md
## Complex eigenvalues: the left half-plane and the unit disc

Oscillating modes have complex eigenvalues. S4D-Lin initialises them at $\lambda_n = -\tfrac12 + i\pi n$.
A continuous system is stable when every $\operatorname{Re}\lambda < 0$; a discrete one when every $|\bar\lambda| < 1$.
ZOH and bilinear map the whole left half-plane into the unit disc, for any $\Delta$. Euler's $1 + \Delta\lambda$
is a shifted copy of the half-plane, and lightly damped oscillations land outside the disc as soon as
$\Delta > 2|\operatorname{Re}\lambda| / |\lambda|^2$.
%% code
n = np.arange(5)
lam = np.concatenate([-0.5 + 1j * np.pi * n, -0.5 - 1j * np.pi * n[1:]])   # S4D-Lin and conjugates
delta = 0.2
fig = plot_eigenvalues(lam, delta, title="S4D-Lin eigenvalues λ = -1/2 ± iπn, continuous and discretised")
for name, rule in [("zoh", zoh), ("bilinear", bilinear), ("euler", euler)]:
    radius = np.abs(rule(lam, np.ones_like(lam), delta)[0])
    print(f"{name:8s}  largest |λ̄| = {radius.max():.4f}   ({np.sum(radius > 1)} of {lam.size} outside the disc)")
assert np.all(np.abs(zoh(lam, np.ones_like(lam), delta)[0]) < 1)
assert np.all(np.abs(bilinear(lam, np.ones_like(lam), delta)[0]) < 1)
assert np.sum(np.abs(euler(lam, np.ones_like(lam), delta)[0]) > 1) > 0   # Euler is unstable here
fig
%% md
## Impulse responses: what the discrete systems compute

Feed a unit impulse $u = (1, 0, 0, \dots)$ into the recurrence. The output is the system's convolution kernel
$y_k = \operatorname{Re}\sum_n C_n \bar a_n^k \bar b_n$ (S4's $\bar K$). Divided by $\Delta$ it approximates the
continuous impulse response $h(t) = \operatorname{Re}(C e^{tA} B)$ at $t = k\Delta$. Take a damped oscillator with
eigenvalues $-0.5 \pm 2i$ and a deliberately coarse step:
%% code
lam = np.array([-0.5 + 2.0j, -0.5 - 2.0j])
fig = plot_impulse_response(lam, 1.0, 1.0, 0.4, steps=25,
                            title="A damped oscillator (λ = -0.5 ± 2i) sampled with a coarse step Δ = 0.4")
fig
%% md
The three rules part visibly at $\Delta = 0.4$ ($|\Delta\lambda| \approx 0.8$) and all converge to the continuous
curve as $\Delta$ shrinks. Measured against $h(k\Delta)$:
%% code
from refssm.viz import continuous_impulse_response

def deviation(method, delta, t_end=6.0):
    steps = int(round(t_end / delta))
    y = impulse_response(lam, 1.0, 1.0, delta, steps, method) / delta
    h = continuous_impulse_response(lam, 1.0, 1.0, np.arange(steps) * delta)
    return normwise_error(y, h)

for method in ("zoh", "bilinear", "euler"):
    coarse, fine = deviation(method, 0.4), deviation(method, 0.04)
    print(f"{method:8s}  deviation from h(t): Δ = 0.4: {coarse:.3f}   Δ = 0.04: {fine:.4f}")
    assert fine < coarse / 5          # ten times smaller steps, at least five times closer
%% md
**Check: the same response two ways.** The oscillator as a *real dense* system
$A = \begin{bmatrix}-0.5 & 2\\ -2 & -0.5\end{bmatrix}$, discretised by `scipy.signal.cont2discrete` and simulated by
`scipy.signal.dimpulse`, against refssm's *complex diagonal* form (its eigenbasis: $\tilde B = V^{-1}B$,
$\tilde C = CV$). scipy's convention puts the input one step earlier ($x_{k+1} = A_d x_k + B_d u_k$), so its output is
ours shifted by one sample.
%% code
A_real = np.array([[-0.5, 2.0], [-2.0, -0.5]])
B_real, C_real = np.array([[1.0], [0.0]]), np.array([[1.0, 0.0]])
delta, steps = 0.4, 25
sys_d = scipy.signal.cont2discrete((A_real, B_real, C_real, np.zeros((1, 1))), delta, method="zoh")
_, (y_scipy,) = scipy.signal.dimpulse(sys_d, n=steps + 1)    # one output array per input
y_scipy = y_scipy[1:, 0]

w, V = np.linalg.eig(A_real)
B_t = np.linalg.solve(V, B_real[:, 0])
C_t = C_real[0] @ V
y_ours = impulse_response(w, B_t, C_t, delta, steps, "zoh")
err = normwise_error(y_ours, y_scipy)
print(f"diagonal (refssm) vs dense (scipy dimpulse) impulse response: {err:.1e}")
assert err < 1e-12
%% md
## Mamba's own convention: ZOH for $A$, Euler for $B$

The Mamba paper states ZOH, but the official code computes $\bar A = \exp(\Delta A)$ and $\bar B = \Delta B$
(`deltaB_u = delta * B * u` in `selective_scan_ref` and the CUDA kernel). A. Gu: *"a mix of ZOH for A and Euler
discretization for B"* (state-spaces/mamba issue #114). An implementation that must reproduce Mamba's numbers must
do the same: `refssm.ssm.discretize.mamba_discretize`.

How far is $\Delta B$ from ZOH's $\bar B$? Their ratio depends on $z = \Delta a$ only:
$\dfrac{\Delta b}{\bar b_{ZOH}} = \dfrac{z}{e^z - 1}$. At the default initialisation ($A = -(1, \dots, 16)$,
$\Delta \in [10^{-3}, 10^{-1}]$) $z$ reaches $-1.6$: there Mamba's $\bar B$ is **twice** ZOH's.
%% code
A_m = -np.tile(np.arange(1.0, 17.0), (3, 1))                   # [channels=3, state=16]
rng = np.random.default_rng(1)
delta_m = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (1, 5, 3)))   # [batch, seq_len, channels]
B_m = rng.standard_normal((1, 5, 16))
A_bar, B_bar = mamba_discretize(A_m, B_m, delta_m)
A_bar_zoh, B_bar_zoh = zoh(A_m, B_m[..., None, :], delta_m[..., None])
assert np.array_equal(A_bar, A_bar_zoh)                      # A: exactly ZOH
assert np.array_equal(B_bar, delta_m[..., None] * B_m[..., None, :])   # B: exactly delta * B
ratio = np.abs(B_bar / B_bar_zoh)
print(f"A_bar identical to ZOH; B_bar / B_bar_ZOH ranges over [{ratio.min():.4f}, {ratio.max():.4f}]")

z = np.linspace(-4, -1e-6, 300)
fig, axes = new_figure(1, 1, figsize=(8, 3.2))
ax = axes[0, 0]
ax.axvspan(-1.6, -1e-3, color="0.9", label="reached at Mamba's default init")
ax.plot(z, z / np.expm1(z), lw=2, color="tab:purple")
ax.set_xlabel("z = Δ·a")
ax.set_ylabel("Mamba's B̄ / ZOH's B̄")
ax.set_title("Mamba's ΔB against ZOH's B̄: equal for small steps, twice as large at z = -1.6")
ax.legend(fontsize=8)
print(f"ratio at z = -1.6: {-1.6 / np.expm1(-1.6):.3f}")
assert abs(-1.6 / np.expm1(-1.6) - 2.0) < 0.01
fig
%% md
## Summary

* ZOH is exact for a piecewise-constant input (checked against an ODE solver to $10^{-10}$); bilinear and Euler are
  second- and first-order approximations of the same integral.
* For a diagonal $A$, $\bar A = \exp(\Delta A)$ is an elementwise exponential; all rules match
  `scipy.linalg.expm` and `scipy.signal.cont2discrete` to round-off.
* ZOH and bilinear keep every stable system stable for any $\Delta$; Euler does not.
* Mamba uses $\exp(\Delta A)$ with $\Delta B$; that is a different model from ZOH, and the difference is a factor
  up to 2 at the default initialisation.

Next: [2. The selective scan](02_selective_scan.ipynb) makes $\Delta$, $B$ and $C$ depend on the input.
'''

NOTEBOOKS["02_selective_scan"] = r'''
%% md
# 2. The selective scan: how $\Delta$, $B$ and $C$ select

An S4-style SSM is **time-invariant**: the same $\bar A$, $\bar B$, $C$ at every step. Whatever arrives is written
into the state the same way, so the model cannot decide to *keep* one token and *ignore* another.
Mamba (Gu & Dao 2023, Algorithm 2, "S6") makes three of the parameters functions of the current input $x_t$:

$$\Delta_t = \operatorname{softplus}(W_\Delta x_t + b_\Delta), \qquad B_t = W_B\, x_t, \qquad C_t = W_C\, x_t,$$

and runs, for every channel $c$ and state $n$ (eqs. 2a, 2b, 4):

$$\bar A_{t} = \exp(\Delta_t A), \qquad h_t = \bar A_t \odot h_{t-1} + \Delta_t B_t\, u_t, \qquad y_t = C_t \cdot h_t + D\,u_t .$$

Each knob selects something different:

* $\Delta_t$ decides **whether** the input is taken in. Large $\Delta$: $\bar A \to 0$ and $\Delta B$ is large, the state
  forgets and writes. Small $\Delta$: $\bar A \to 1$ and $\Delta B \to 0$, the state holds and the input is ignored.
* $B_t$ decides **where** in the state the input is written.
* $C_t$ decides **what** is read out.

This notebook writes the scan in a few lines of NumPy, checks it against refssm's three engines, then builds a
selective-copying problem by hand and watches the state remember the right things.
%% code
%matplotlib inline
import numpy as np

from refssm.models import mamba
from refssm.ssm.selective_scan import selective_scan, selective_scan_forward, softplus
from refssm.verify.metrics import normwise_error
from refssm.viz import (new_figure, plot_mamba_delta, plot_mamba_state_evolution,
                        plot_state_evolution, trace_mamba)

np.set_printoptions(precision=3, suppress=True)
%% md
## The scan in NumPy

One sequence, `channels` channels, `N` states per channel. `A` is `[channels, N]` (negative: $A = -\exp(A_{\log})$);
$\Delta$ is per channel; $B_t$, $C_t$ are shared by all channels.
%% code
def selective_scan_loop(u, delta, A, B, C):
    """h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t.

    u, delta: [seq_len, channels]; A: [channels, N]; B, C: [seq_len, N].
    Returns y [seq_len, channels] and every state h [seq_len, channels, N].
    """
    seq_len, channels = u.shape
    h = np.zeros(A.shape)
    ys, hs = [], []
    for t in range(seq_len):
        A_bar = np.exp(delta[t, :, None] * A)                   # [channels, N]   eq. 4
        h = A_bar * h + delta[t, :, None] * B[t] * u[t, :, None]  #                 eq. 2a
        ys.append(h @ C[t])                                     # [channels]      eq. 2b
        hs.append(h)
    return np.array(ys), np.array(hs)
%% md
**Check: the loop against refssm's engines.** `engine="numpy"` is refssm's readable ground truth, `"numba"` a fused
compiled loop, `"logdepth"` the parallel (Blelloch) scan of notebook 3. All must agree with our loop to round-off
(budget $10^{-12}$, normwise).
%% code
rng = np.random.default_rng(0)
L, channels, N = 50, 3, 4
u = rng.standard_normal((L, channels))
delta = softplus(rng.standard_normal((L, channels)) - 2)      # positive step sizes
A = -np.tile(np.arange(1.0, N + 1), (channels, 1))             # S4D-real: A = -(1..N)
B, C = rng.standard_normal((L, N)), rng.standard_normal((L, N))
y_loop, _ = selective_scan_loop(u, delta, A, B, C)
for engine in ("numpy", "numba", "logdepth"):
    y, _ = selective_scan(u[None], delta[None], A, B[None], C[None], engine=engine)
    err = normwise_error(y[0], y_loop)
    print(f"{engine:9s} engine vs the loop above: {err:.1e}")
    assert err < 1e-12
%% md
## Selective copying, built by hand

The task (Mamba paper, section 3.1): a few *data* tokens are scattered among *noise*; at the end the model must
output the data tokens in order. An LTI model cannot: it mixes whatever comes in with fixed weights.

We set every weight by hand. Each frame $x_t$ has features
`[value, is_data, slot one-hot (K), read one-hot (K)]`. The data frames carry their slot number
(the $k$-th data token goes to state $k$; in a trained Mamba the preceding convolution and other layers have to
work that out). All the scan's inputs are **linear functions of the current frame**, as in Mamba:

* $u_t$ = the value;
* $\Delta_t = \operatorname{softplus}(10\cdot\text{is\_data} - 7)$: $\approx 3.05$ on data frames, $\approx 0.0009$ on noise;
* $B_t$ = the slot one-hot (scaled so that $\Delta_t B_t = 1$) on data frames, all ones on the others
  (a bias): if $\Delta$ let it in, noise would be written into *every* slot;
* $C_t$ = the read one-hot: during the last $K$ frames, read slot $j$;
* $A = -10^{-3}$ for every state: a slow decay, a long memory.
%% code
K, L = 4, 48
rng = np.random.default_rng(14)
read_pos = np.arange(L - K, L)
data_pos = np.sort(rng.choice(L - K, size=K, replace=False))
data = rng.choice([-1.0, 1.0], K) * rng.uniform(0.5, 1.5, K)

x = np.zeros((L, 2 + 2 * K))                                  # the frames
x[:, 0] = 0.3 * rng.standard_normal(L)                        # noise values ...
x[read_pos, 0] = 0.0
x[data_pos, 0] = data                                         # ... and the data
x[data_pos, 1] = 1.0                                          # is_data
x[data_pos, 2 + np.arange(K)] = 1.0                           # slot one-hot
x[read_pos, 2 + K + np.arange(K)] = 1.0                       # read one-hot

w_delta = np.zeros(2 + 2 * K); w_delta[1] = 10.0              # delta = softplus(x @ w_delta - 7)
W_B = np.zeros((2 + 2 * K, K))
W_B[2:2 + K] = np.eye(K) / softplus(3.0)                      # data frame: its slot, delta * B = 1
W_B[1] = -1.0                                                 # cancels the bias on data frames
b_B = np.ones(K)                                              # other frames: every slot
W_C = np.zeros((2 + 2 * K, K)); W_C[2 + K:] = np.eye(K)       # read one-hot -> C

u_t = x[:, :1]                                                # [L, 1]: one channel
delta_t = softplus(x @ w_delta - 7.0)[:, None]                # [L, 1]
B_t, C_t = x @ W_B + b_B, x @ W_C                             # [L, K] each
A_sel = np.full((1, K), -1e-3)

y_sel, h_sel = selective_scan_loop(u_t, delta_t, A_sel, B_t, C_t)
copied = y_sel[read_pos, 0]
print("data tokens:      ", data)
print("read out at the end:", copied)
err_sel = normwise_error(copied, data)
print(f"copy error (normwise): {err_sel:.2e}")
assert err_sel < 0.02
%% md
The state of the one channel, slot by slot. Each data token lights up its own slot and stays there; the noise
frames between them leave no visible mark, because their $\Delta$ is a thousand times smaller:
%% code
fig = plot_state_evolution(h_sel, inputs=u_t[:, 0], delta=delta_t, channels=[0], state_label="slot n",
                           title="Selective copying: each data token is written to its slot and held")
fig
%% md
Where the writing and reading happen, i.e. the selected $\Delta_t B_t$ (what enters each slot) and $C_t$
(which slot is read):
%% code
fig, axes = new_figure(1, 2, figsize=(8, 2.8))
for ax, M, name in [(axes[0, 0], delta_t * B_t, "written: Δ_t B_t"), (axes[0, 1], C_t, "read: C_t")]:
    im = ax.imshow(M.T, aspect="auto", origin="lower", cmap="Greys", interpolation="nearest",
                   extent=(-0.5, L - 0.5, -0.5, K - 0.5), vmin=0)
    fig.colorbar(im, ax=ax, pad=0.01, label="weight")
    ax.set_xlabel("time step t")
    ax.set_ylabel("slot n")
    ax.set_title(name, fontsize=10)
fig.suptitle("B selects where the input is written, C what is read")
fig
%% md
**Without selection.** Freeze $\Delta$ and $B$ to their averages over the sequence: the model is now time-invariant
(a convolution) in what it writes. Keep the same $A$ and the same reader $C_t$. Every frame, noise or data, is written
into every slot with the same weight, and the copy fails:
%% code
delta_lti = np.full_like(delta_t, delta_t.mean())
B_lti = np.tile(B_t.mean(axis=0), (L, 1))
y_lti, h_lti = selective_scan_loop(u_t, delta_lti, A_sel, B_lti, C_t)
err_lti = normwise_error(y_lti[read_pos, 0], data)
print("read out, LTI:  ", y_lti[read_pos, 0])
print(f"copy error: selective {err_sel:.2e}, time-invariant {err_lti:.2f}")
assert err_lti > 0.5 and err_lti > 20 * err_sel
fig = plot_state_evolution(h_lti, inputs=u_t[:, 0], channels=[0], state_label="slot n",
                           title="Without selection: noise and data are written everywhere alike")
fig
%% md
## A real Mamba layer

In Mamba, $u$, $\Delta$, $B$, $C$ come from learned projections of the layer's input, after a causal
depthwise convolution (refssm's `refssm.models.mamba`). Below: a small model with `random_params` (parameters
"with teeth": random, but with $\Delta$ in a realistic range) on an input with four bursts. An untrained layer's
$\Delta$ already moves with the input (by up to a factor of two around each channel's median), but nothing yet tells
it what to keep:
that is what training learns. `refssm.viz.trace_mamba` runs one layer with the NumPy engine and keeps
$\Delta$, $B$, $C$ and every state.
%% code
cfg = mamba.MambaConfig(embed_dim=4, hidden_size=16, state_size=8, num_layers=2)
model = mamba.MambaModel(cfg, mamba.random_params(cfg, seed=0))
rng = np.random.default_rng(3)
x_in = 0.3 * rng.standard_normal((1, 48, 4))
x_in[0, [8, 20, 27, 36]] += 2.5 * np.array([1.0, -1.0, 1.0, 0.5])
fig = plot_mamba_delta(model, x_in, layer=1)
fig
%% code
fig = plot_mamba_state_evolution(model, x_in, layer=1)
fig
%% md
**Check: the trace is the model.** The states kept by the trace reproduce the scan's output
($y_t = C_t \cdot h_t$), and running the whole model one frame at a time with `step` (an $O(1)$ recurrent update with a
carried state) gives the same outputs as the full forward pass at every prefix.
%% code
tr = trace_mamba(model, x_in, layer=1)
err = normwise_error(np.einsum("tcn,tn->tc", tr.states, tr.C), tr.y_core)
print(f"C_t . h_t from the traced states vs the scan's output: {err:.1e}")
assert err < 1e-12

full = model.forward(x_in, return_sequence=True).output[0]        # [seq_len, hidden]
cache = model.init_cache(batch_size=1)
stepped = []
for t in range(x_in.shape[1]):
    y_t, cache = model.step(cache, x_in[:, t])
    stepped.append(y_t[0])
err = normwise_error(np.array(stepped), full)
print(f"step-by-step vs full forward, every prefix: {err:.1e}")
assert err < 1e-12
%% md
## Summary

* The selective scan is the S4 recurrence with $\Delta$, $B$, $C$ computed from the current frame; refssm's three
  engines agree with a ten-line loop to $10^{-15}$.
* $\Delta$ gates the input (write vs hold), $B$ routes it to a slot, $C$ picks what to read. With hand-set weights one
  channel of four states solves selective copying; freezing $\Delta$ and $B$ (an LTI model) breaks it.
* A Mamba layer computes these knobs with learned projections; `refssm.viz` draws $\Delta$ and the state for any
  model and input.

Next: [3. The parallel scan](03_parallel_scan.ipynb) computes the same recurrence in $O(\log L)$ depth.
'''

NOTEBOOKS["03_parallel_scan"] = r'''
%% md
# 3. The parallel scan

The recurrence $h_t = a_t h_{t-1} + b_t$ looks inherently sequential: step $t$ needs step $t-1$. It is not. This notebook
shows why (an associative operator), computes it with Blelloch's work-efficient parallel scan step by step, checks
it against the loop and against refssm's Numba kernel, and counts what it costs.

For the selective scan, $a_t = \exp(\Delta_t A)$ and $b_t = \Delta_t B_t u_t$, one such recurrence per
(channel, state) pair.
%% code
%matplotlib inline
import time
import numpy as np

from refssm.scan.numba_logdepth import linear_scan
from refssm.ssm.selective_scan import selective_scan_backward, selective_scan_forward
from refssm.verify.metrics import normwise_error
from refssm.viz import blelloch_trace, new_figure, plot_scan_tree
%% md
## Steps as affine maps, and the operator that composes them

Step $t$ is the affine map $h \mapsto a_t h + b_t$; write it as the pair $x_t = (a_t, b_t)$. Doing step 1 and then
step 2 gives $h \mapsto a_2(a_1 h + b_1) + b_2$, again affine:

$$(a_1, b_1) \circ (a_2, b_2) = (a_1 a_2,\; a_2 b_1 + b_2), \qquad \text{identity } I = (1, 0).$$

Composition of maps is **associative**: $(x_1 \circ x_2) \circ x_3 = x_1 \circ (x_2 \circ x_3)$. So the prefix
$x_0 \circ x_1 \circ \dots \circ x_t$ can be bracketed any way we like (a tree instead of a chain), and its $b$
part is $h_t$ (starting from $h_{-1} = 0$). (It is not commutative: the order of the steps matters.)
%% code
def combine(left, right):
    """(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): first the left step, then the right one."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2

rng = np.random.default_rng(0)
x1, x2, x3 = [(rng.uniform(0.5, 1.0, 1000), rng.standard_normal(1000)) for _ in range(3)]
lhs = combine(combine(x1, x2), x3)
rhs = combine(x1, combine(x2, x3))
err = max(normwise_error(lhs[0], rhs[0]), normwise_error(lhs[1], rhs[1]))
print(f"(x1 o x2) o x3 vs x1 o (x2 o x3), 1000 random triples: {err:.1e}")
assert err < 1e-15
ident = (np.ones(1000), np.zeros(1000))
assert all(np.array_equal(p, q) for p, q in zip(combine(ident, x1), x1))
assert all(np.array_equal(p, q) for p, q in zip(combine(x1, ident), x1))
%% md
## Blelloch's scan: up-sweep, then down-sweep

Blelloch (1990, *Prefix sums and their applications*) computes all prefixes in two passes over a binary tree laid on
the buffer (the length padded to a power of two with $I$):

* **up-sweep** (reduce): at level $d = 1, 2, 4, \dots$ every row $i = 2dk + 2d - 1$ becomes
  $\text{row}_{i-d} \circ \text{row}_i$: the total of its subtree;
* **down-sweep** (distribute): clear the root to $I$; at $d = \dots, 2, 1$ the left child takes the parent's prefix and
  the right child becomes $\text{prefix} \circ \text{left total}$.

Afterwards row $t$ holds the *exclusive* prefix $x_0 \circ \dots \circ x_{t-1}$, i.e. $h_{t-1}$. In the picture a box
`i:j` means $x_i \circ \dots \circ x_j$; each level's combines are independent of each other:
%% code
fig = plot_scan_tree(8)
fig
%% md
The same schedule in NumPy. Each level is **one vectorised operation** over all its rows: that is the parallelism.
As refssm's kernel does, the buffer has one extra row for the total, and $h_t$ is read from row $t + 1$.
%% code
def blelloch_scan(a, b, record=None):
    """h_t = a_t h_{t-1} + b_t (h_{-1} = 0) by up-sweep / down-sweep. a, b: [L]. Returns (h, combines)."""
    L = len(a)
    Lp = 1 << max(L - 1, 0).bit_length()              # next power of two
    xa, xb = np.ones(Lp + 1), np.zeros(Lp + 1)         # padding = identity (1, 0)
    xa[:L], xb[:L] = a, b
    combines = 0
    d = 1
    while d < Lp:                                      # up-sweep
        i = np.arange(2 * d - 1, Lp, 2 * d)
        j = i - d
        xa[i], xb[i] = combine((xa[j], xb[j]), (xa[i], xb[i]))
        combines += len(i)
        if record is not None: record.append((f"up d={d}", xb[:Lp].copy()))
        d *= 2
    xa[Lp], xb[Lp] = xa[Lp - 1], xb[Lp - 1]            # the total, kept in the extra row
    xa[Lp - 1], xb[Lp - 1] = 1.0, 0.0                  # clear the root
    if record is not None: record.append(("clear root", xb[:Lp].copy()))
    d = Lp // 2
    while d >= 1:                                      # down-sweep
        i = np.arange(2 * d - 1, Lp, 2 * d)
        j = i - d
        left = xa[j].copy(), xb[j].copy()              # the left subtree's total
        xa[j], xb[j] = xa[i], xb[i]                    # left child <- parent's prefix
        xa[i], xb[i] = combine((xa[i], xb[i]), left)   # right child <- prefix o left total
        combines += len(i)
        if record is not None: record.append((f"down d={d}", xb[:Lp].copy()))
        d //= 2
    return xb[1:L + 1], combines                       # row t + 1 holds h_t

def sequential_scan(a, b):
    h, out = 0.0, np.empty(len(a))
    for t in range(len(a)):
        h = a[t] * h + b[t]
        out[t] = h
    return out
%% md
Watch it on a prefix **sum** ($a_t = 1$, so $h_t = b_0 + \dots + b_t$), with $b = (1, 2, \dots, 8)$: the up-sweep
leaves partial sums at the tree's nodes, the down-sweep turns them into the exclusive prefix sums
$0, 1, 3, 6, 10, \dots$
%% code
steps = []
h, _ = blelloch_scan(np.ones(8), np.arange(1.0, 9.0), record=steps)
print(f"{'level':12s}" + "".join(f"{t:>6d}" for t in range(8)))
print(f"{'input b':12s}" + "".join(f"{v:6.0f}" for v in np.arange(1.0, 9.0)))
for name, row in steps:
    print(f"{name:12s}" + "".join(f"{v:6.0f}" for v in row))
print(f"{'h_t':12s}" + "".join(f"{v:6.0f}" for v in h))
assert np.array_equal(h, np.cumsum(np.arange(1.0, 9.0)))
%% md
**Checks.** (1) The symbolic run of `refssm.viz.blelloch_trace` ends with row $t$ holding exactly
$x_0 \circ \dots \circ x_{t-1}$ for every $t$, for lengths that are and are not powers of two.
(2) The NumPy scan equals the loop, for decaying and growing $a_t$ and many lengths.
(3) It equals refssm's compiled Blelloch kernel `refssm.scan.numba_logdepth.linear_scan`.
%% code
for L in (1, 2, 5, 8, 13, 32):
    levels, total = blelloch_trace(L)
    final = levels[-1]["rows"]
    assert final[0] is None and all(final[t] == (0, t - 1) for t in range(1, L)), L
    assert total == (0, L - 1)
print("symbolic trace: every row t ends as x0 o ... o x(t-1), for L = 1, 2, 5, 8, 13, 32")

rng = np.random.default_rng(1)
worst = 0.0
for L in (1, 2, 3, 7, 8, 9, 100, 1000, 4097):
    a, b = rng.uniform(0.5, 1.05, L), rng.standard_normal(L)
    worst = max(worst, normwise_error(blelloch_scan(a, b)[0], sequential_scan(a, b)))
print(f"Blelloch (NumPy) vs the loop, L from 1 to 4097: max error {worst:.1e}")
assert worst < 1e-12

a, b = rng.uniform(0.5, 1.0, (300, 16)), rng.standard_normal((300, 16))   # [L, N]: 16 independent scans
ours = np.stack([blelloch_scan(a[:, n], b[:, n])[0] for n in range(16)], axis=1)
err = normwise_error(linear_scan(a, b), ours)
print(f"refssm.scan.numba_logdepth.linear_scan vs the NumPy Blelloch scan: {err:.1e}")
assert err < 1e-14
%% md
## The selective scan, in log depth

refssm's `engine="logdepth"` runs this scan for every (batch, channel, state), discretising on the fly
($a_t = \exp(\Delta_t A)$, $b_t = \Delta_t B_t u_t$) and never storing `[batch, seq_len, channels, state]`.
Its backward pass is the same scan run in reverse time (see notebook 7). It must agree with the
sequential NumPy engine forward and backward:
%% code
rng = np.random.default_rng(2)
batch, L, channels, N = 2, 300, 8, 16
u = rng.standard_normal((batch, L, channels))
delta = rng.standard_normal((batch, L, channels)) - 3            # raw, softplus inside
A = -np.tile(np.arange(1.0, N + 1), (channels, 1))
B, C = rng.standard_normal((batch, L, N)), rng.standard_normal((batch, L, N))
d_out = rng.standard_normal((batch, L, channels))
res = {}
for engine in ("numpy", "logdepth"):
    out, last, saved = selective_scan_forward(u, delta, A, B, C, D=np.ones(channels),
                                              delta_softplus=True, engine=engine)
    res[engine] = (out, selective_scan_backward(d_out, None, saved))
err_f = normwise_error(res["logdepth"][0], res["numpy"][0])
err_b = max(normwise_error(res["logdepth"][1][k], res["numpy"][1][k]) for k in ("u", "delta", "A", "B", "C"))
print(f"log-depth vs sequential: forward {err_f:.1e}, backward (worst of u, delta, A, B, C) {err_b:.1e}")
assert err_f < 1e-12 and err_b < 1e-12
%% md
## What it costs

| | combines (work) | levels (depth) |
|---|---|---|
| sequential loop | $L$ | $L$ |
| Blelloch | $2(L_p - 1)$, $L_p$ = next power of two | $2\log_2 L_p$ |

Blelloch does about **twice the work** of the loop (and each combine costs three multiply-adds against one), in
exponentially fewer dependent levels. It wins when there are enough idle lanes to run a level's combines at once
(a GPU), and loses when the sequential work already fills the machine.
%% code
for L in (8, 100, 1024):
    _, n = blelloch_scan(np.ones(L), np.ones(L))
    Lp = 1 << (L - 1).bit_length()
    print(f"L = {L:5d}: {n:5d} combines = 2 (L_p - 1) with L_p = {Lp}; depth 2 log2 L_p = {2 * Lp.bit_length() - 2}")
    assert n == 2 * (Lp - 1)

Ls = 2 ** np.arange(1, 21)
fig, axes = new_figure(1, 1, figsize=(8, 3.4))
ax = axes[0, 0]
ax.loglog(Ls, Ls, "k-", lw=2, label="sequential: work = depth = L")
ax.loglog(Ls, 2 * (Ls - 1), "--", color="tab:blue", lw=2, label="Blelloch work 2(L - 1)")
ax.loglog(Ls, 2 * np.log2(Ls), "-", color="tab:orange", lw=2, label="Blelloch depth 2 log2 L")
ax.set_xlabel("sequence length L")
ax.set_ylabel("combines (work) or levels (depth)")
ax.set_title("The parallel scan trades twice the work for logarithmic depth")
ax.legend(fontsize=8)
fig
%% md
Measured here (median of 5, batch 1, 64 channels, state 16, float64), on **one thread** so that the numbers
measure work rather than how busy the machine's other cores are. The NumPy engine is the readable loop; the Numba
sequential engine the same loop compiled; the log-depth engine does about twice its work. (With several threads both
Numba engines split batch × channels between them, not time.) Timings depend on the machine; nothing is asserted
about them.
%% code
import numba

def median_time(fn, repeats=5):
    fn()                                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return float(np.median(times))

threads = numba.get_num_threads()
numba.set_num_threads(1)
rng = np.random.default_rng(3)
print(f"{'seq_len':>8s} {'numpy':>10s} {'numba':>10s} {'logdepth':>10s}")
for L in (256, 1024, 4096):
    u = rng.standard_normal((1, L, 64)); delta = rng.uniform(1e-3, 0.1, (1, L, 64))
    A = -np.tile(np.arange(1.0, 17.0), (64, 1))
    B, C = rng.standard_normal((1, L, 16)), rng.standard_normal((1, L, 16))
    ms = [1e3 * median_time(lambda: selective_scan_forward(u, delta, A, B, C, engine=e))
          for e in ("numpy", "numba", "logdepth")]
    print(f"{L:8d} " + " ".join(f"{m:8.2f}ms" for m in ms))
numba.set_num_threads(threads)
%% md
## Summary

* Each step of a linear recurrence is an affine map; composing them is associative, so the prefixes can be computed on
  a tree.
* Blelloch's up-sweep / down-sweep does $2(L_p - 1)$ combines in $2\log_2 L_p$ levels; our NumPy version, refssm's Numba
  kernel and the plain loop agree to round-off, and so do the log-depth and sequential selective scans forward and
  backward.
* It halves nothing on a CPU: it buys depth with work. refssm keeps it as a check that a GPU-style implementation
  computes the same numbers, and as the shape of the backward pass (notebook 7).

Next: [7. Manual backprop through a scan](07_backprop.ipynb).
'''

NOTEBOOKS["04_s5"] = r'''
%% md
# 4. S5: one MIMO state space, HiPPO-N, and the scan as a convolution

S4 runs $H$ independent single-input single-output (SISO) SSMs, one per feature, each with $N$ states. S5 (Smith,
Warrington & Linderman, ICLR 2023) runs **one** multi-input multi-output (MIMO) SSM with $P$ states over all $H$
features at once, in the eigenbasis of its state matrix:

$$\bar\Lambda = e^{\Lambda\Delta}, \qquad \bar B = \frac{\bar\Lambda - 1}{\Lambda}\,\tilde B, \qquad
x_k = \bar\Lambda \odot x_{k-1} + \bar B u_k, \qquad y_k = \operatorname{Re}(\tilde C x_k) + D \odot u_k,$$

with $\Lambda \in \mathbb{C}^P$ diagonal, $\tilde B = V^{-1}B \in \mathbb{C}^{P\times H}$, $\tilde C = CV \in \mathbb{C}^{H\times P}$
and one step $\Delta_p$ per state. This notebook builds the initialisation (HiPPO-N, diagonalised), shows that
MIMO contains many SISO systems as a special case, and checks that the scan equals a convolution computed by FFT,
five ways.
%% code
%matplotlib inline
import time
import numpy as np

from refssm.models import s5
from refssm.ssm import s5 as core
from refssm.verify.metrics import normwise_error
from refssm.viz import plot_eigenvalues, plot_s5_kernel, plot_s5_model_kernel, plot_s5_state_evolution
%% md
## HiPPO-LegS, its normal part HiPPO-N, and why S5 diagonalises the latter

HiPPO-LegS (Gu et al. 2020) is the state matrix that makes the state a running Legendre projection of the input's
history: $A_{nk} = -\sqrt{2n+1}\sqrt{2k+1}$ below the diagonal, $-(n+1)$ on it. It is *normal plus low rank*:
$A = S - pp^\top$ with $p_n = \sqrt{n + 1/2}$ and $S$ normal ($SS^\top = S^\top S$). S5 initialises $\Lambda$ with
the eigenvalues of $S$, "HiPPO-N". Why not diagonalise $A$ itself? Its eigenvectors are nearly parallel: the
matrix $V$ that diagonalises it has a condition number around $10^{11}$ at $N = 16$, so $V^{-1}B$ would be numerical
noise. $S$ is normal, so its eigenvector matrix is unitary (condition number 1).
%% code
N = 16
A = core.make_hippo(N)
S = core.make_normal_hippo(N)
p = np.sqrt(np.arange(N) + 0.5)
Lambda, V = core.hippo_n_eig(N)

checks = {
    "A = S - p p^T": normwise_error(S - np.outer(p, p), A),
    "S normal: S S^T = S^T S": normwise_error(S @ S.T, S.T @ S),
    "V unitary: V^H V = I": normwise_error(V.conj().T @ V, np.eye(N)),
    "S = V diag(Lambda) V^H": normwise_error(V @ np.diag(Lambda) @ V.conj().T, S),
    "Re(Lambda) = -1/2": normwise_error(Lambda.real, np.full(N, -0.5)),
}
for name, err in checks.items():
    print(f"{name:28s} {err:.1e}")
    assert err < 1e-13
cond_A = np.linalg.cond(np.linalg.eig(A)[1])
print(f"condition number of the eigenvectors: HiPPO-LegS {cond_A:.1e}, HiPPO-N {np.linalg.cond(V):.3f}")
assert cond_A > 1e8 and np.linalg.cond(V) < 1 + 1e-12
%% md
Every HiPPO-N eigenvalue sits on the line $\operatorname{Re}\lambda = -\tfrac12$, the imaginary parts spread out
(fast and slow oscillations), and they come in conjugate pairs. Each state gets its own step, drawn log-uniform in
$[10^{-3}, 10^{-1}]$; the discrete eigenvalues land just inside the unit circle, near 1: slow decay, long memory.
%% code
rng = np.random.default_rng(0)
step = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), N))
fig = plot_eigenvalues(Lambda, step, methods=("zoh", "bilinear"),
                       title="HiPPO-N eigenvalues (N = 16): continuous, and discretised with one step per state")
assert np.all(np.abs(np.exp(Lambda * step)) < 1)
fig
%% md
**Conjugate symmetry.** Because the eigenvalues come in pairs $\lambda, \bar\lambda$ (and $\tilde B$, $\tilde C$ with
them), the two states of a pair are complex conjugates at every step, and their contributions to $y$ add up to
twice the real part of one. So S5 stores $P/2$ complex states and reads out $2\operatorname{Re}(\tilde C x)$. Check:
the half system with `conj_sym=True` against the full one (`expand_conj_sym`) without it.
%% code
params = core.init_s5_ssm(hidden_size=8, state_size=16, rng=1)               # P = 16: 8 stored states
u = np.random.default_rng(2).standard_normal((2, 100, 8))
y_half, _, _ = core.s5_ssm_forward(params, u, conj_sym=True)
y_full, _, _ = core.s5_ssm_forward(core.expand_conj_sym(params), u, conj_sym=False)
err = normwise_error(y_half, y_full)
print(f"{params['Lambda_re'].size} stored states with 2 Re(.) vs all {core.expand_conj_sym(params)['Lambda_re'].size}: {err:.1e}")
assert err < 1e-13
%% md
## MIMO versus many SISO systems

A bank of $H$ SISO systems (S4D) is a MIMO system whose $\tilde B$ and $\tilde C$ are block diagonal: feature $h$ writes
only into its own block of states and reads only from it. So S5 *contains* S4D-style layers; a dense $\tilde B$,
$\tilde C$ lets every state mix every feature. Check: a block-diagonal MIMO scan equals $H$ separate SISO scans.
%% code
H, n = 3, 4                                             # 3 features, 4 states each: P = 12
rng = np.random.default_rng(3)
lam = -rng.uniform(0.1, 1.0, (H, n)) + 1j * rng.uniform(-3, 3, (H, n))
b = rng.standard_normal((H, n)) + 1j * rng.standard_normal((H, n))
c = rng.standard_normal((H, n)) + 1j * rng.standard_normal((H, n))
Lambda_bar = np.exp(0.1 * lam)                           # [H, n]
B_bar = (Lambda_bar - 1) / lam * b
u = rng.standard_normal((1, 80, H))

# one MIMO system: block-diagonal B_bar [P, H] and C_tilde [H, P]
B_mimo = np.zeros((H * n, H), complex); C_mimo = np.zeros((H, H * n), complex)
for h in range(H):
    B_mimo[h * n:(h + 1) * n, h] = B_bar[h]
    C_mimo[h, h * n:(h + 1) * n] = c[h]
y_mimo, _, _ = core.scan_forward(u, Lambda_bar.ravel(), B_mimo, C_mimo, conj_sym=False)
# H SISO systems, one per feature
y_siso = np.concatenate([core.scan_forward(u[..., h:h + 1], Lambda_bar[h], B_bar[h][:, None],
                                           c[h][None, :], conj_sym=False)[0] for h in range(H)], axis=-1)
err = normwise_error(y_mimo, y_siso)
print(f"block-diagonal MIMO (P = {H * n}) vs {H} SISO systems of {n} states: {err:.1e}")
assert err < 1e-14
%% md
What the mixing looks like: the convolution kernel $K_k = \operatorname{Re}(\tilde C \bar\Lambda^k \bar B)$ (times 2) of
the freshly initialised S5 SSM above is a full $H\times H$ matrix at every lag $k$, where an S4D bank's is diagonal.
One column (how input feature 0 reaches every output), and the size of the whole matrix as the lag grows:
%% code
Lam_c, B_t, C_t, D, log_step = core.ssm_matrices(params)
Lb, Bb, _ = core.discretize_forward(Lam_c, B_t, np.exp(log_step))
K = core.s5_kernel(Lb, Bb, C_t, 200)                                     # [L, H, H]
print(f"kernel shape {K.shape}; off-diagonal share of |K|: {np.abs(K - np.einsum('khh->kh', K)[..., None] * np.eye(8)).sum() / np.abs(K).sum():.0%}")
fig = plot_s5_kernel(K, title="S5 at initialisation: one H x H kernel matrix per lag (input feature 0 shown)")
fig
%% md
## The scan is a convolution: five ways to compute S5

The system is linear and time-invariant, so unrolling the recurrence from $x_{-1} = 0$ gives a causal convolution:

$$y_k = \sum_{m=0}^{k} K_m\, u_{k-m} + D \odot u_k, \qquad K_m = 2\operatorname{Re}\big(\tilde C\, \bar\Lambda^m \bar B\big).$$

A convolution of length $L$ is a product after an FFT of length $\ge 2L$ (zero-padded, so it does not wrap around):
$O(L \log L)$ instead of $O(L^2)$. Our own FFT convolution with the dense kernel, against refssm's five engines:
the sequential NumPy scan (the ground truth), a Numba scan, the log-depth (Blelloch) scan, the FFT through the
diagonal ($\lambda^k$ per state) and the FFT with the dense kernel.
%% code
L = 200
u = np.random.default_rng(4).standard_normal((2, L, 8))
y_ref, _, _ = core.s5_ssm_forward(params, u, engine="numpy")

n_fft = 2 * L
U = np.fft.rfft(u, n=n_fft, axis=1)                                   # [batch, freq, H]
KF = np.fft.rfft(K[:L], n=n_fft, axis=0)                              # [freq, H_out, H_in]
y_conv = np.fft.irfft(np.einsum("fij,bfj->bfi", KF, U), n=n_fft, axis=1)[:, :L] + D * u
err = normwise_error(y_conv, y_ref)
print(f"{'our FFT convolution':22s} vs the sequential scan: {err:.1e}")
assert err < 1e-12
for engine in ("numba", "logdepth", "fft", "fft_dense"):
    y, _, _ = core.s5_ssm_forward(params, u, engine=engine)
    err = normwise_error(y, y_ref)
    print(f"{'engine ' + engine:22s} vs the sequential scan: {err:.1e}")
    assert err < 1e-12
%% md
What each costs here (median of 5 on one thread, batch 1, $H = 32$, $P = 32$; machine-dependent, nothing
asserted). The scan is $O(LPH)$; the FFT through the diagonal $O(PH L\log L)$ with a larger constant, but with every
frequency independent of the others.
%% code
import numba
params32 = core.init_s5_ssm(hidden_size=32, state_size=32, rng=5)
def median_ms(fn, repeats=5):
    fn()                                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))
threads = numba.get_num_threads()
numba.set_num_threads(1)
print(f"{'seq_len':>8s}" + "".join(f"{e:>11s}" for e in ("numpy", "numba", "logdepth", "fft")))
for L in (256, 4096):
    u = np.random.default_rng(6).standard_normal((1, L, 32))
    print(f"{L:8d}" + "".join(f"{median_ms(lambda: core.s5_ssm_forward(params32, u, engine=e)):9.1f}ms"
                             for e in ("numpy", "numba", "logdepth", "fft")))
numba.set_num_threads(threads)
%% md
## The S5 model

`refssm.models.s5` stacks S5 blocks as the original API does (LayerNorm, S5 SSM, GELU, residual; LayerNorm,
SwiGLU, residual; a final LayerNorm). The state of one layer is a single complex vector shared by all features;
here its real part over time on an input with a sine and pulses (`refssm.viz.demo_input`):
%% code
from refssm.viz import demo_input
model = s5.build(embed_dim=4, hidden_size=16, state_size=16, num_layers=2, seed=0)
x = demo_input(64, 4)
fig = plot_s5_state_evolution(model, x, layer=1)
fig
%% md
**Check: stepping equals the full forward.** `step` carries one complex state per layer and advances it one frame at a
time; at every prefix it must give the full forward's output (budget $10^{-12}$). (This is the check that caught a
real bug in S5's history: layers sharing one state.)
%% code
full = model.forward(x, return_sequence=True).output[0]
cache = model.init_cache(batch_size=1)
stepped = []
for t in range(x.shape[1]):
    y_t, cache = model.step(cache, x[:, t])
    stepped.append(y_t[0])
err = normwise_error(np.array(stepped), full)
print(f"step-by-step vs full forward, every prefix: {err:.1e}")
assert err < 1e-12
%% md
## Summary

* HiPPO-LegS is normal plus rank one; S5 diagonalises the normal part, HiPPO-N ($\operatorname{Re}\lambda = -1/2$),
  with a unitary eigenbasis; LegS's own eigenbasis is numerically useless (condition number $10^{11}$ at $N = 16$).
* Conjugate symmetry halves the stored states exactly.
* A MIMO SSM with block-diagonal $\tilde B$, $\tilde C$ is a bank of SISO SSMs; S5's dense ones mix features: one
  $H\times H$ kernel matrix per lag.
* The LTI scan is a causal convolution: five ways of computing it (sequential, Numba, log-depth, FFT through the
  diagonal, FFT with the dense kernel) agree to $10^{-15}$.

Next: [5. GatedSSM vs Mamba](05_gated_ssm.ipynb).
'''

NOTEBOOKS["05_gated_ssm"] = r'''
%% md
# 5. GatedSSM vs Mamba: what the gated approximation keeps and loses

GatedSSM (Edifice's `Edifice.SSM.GatedSSM`; no paper) is built like a Mamba block (norm, `in_proj`, a short causal
mixing over time, SiLU, projections to $\Delta$, $B$, $C$, the `silu(z)` gate, `out_proj`) but its core is **not** a
selective scan. Side by side, for one block (shapes: `inner` channels, `N` states):

| | Mamba (S6) | GatedSSM |
|---|---|---|
| state per channel | $h_t \in \mathbb{R}^N$ | one number, $\text{ctx}_t$ |
| forgetting | $\bar A_t = \exp(\Delta_t A)$: per channel, per state, input-dependent | $\alpha = 0.9$, fixed |
| writing | $\Delta_t B_t u_t$: per channel, routed to states by $B_t$ | $g_t s_t x_t$: two scalar gates per frame |
| reading | $C_t \cdot h_t$ | $g_t s_t x_t + (1 - g_t)\,\text{ctx}_t$ |
| gates | | $g_t = \sigma(\operatorname{mean}_c \Delta_t)$, $s_t = \sigma(B_t \cdot C_t)$ |

This notebook checks the gated core, then *shows* what survives of selection and what does not, and why the
`legacy` mode (Edifice's original formula) cannot be run one frame at a time.
%% code
%matplotlib inline
import numpy as np

from refssm.models import gated_ssm
from refssm.ssm.gated_ema import gated_ema_forward, legacy_weights
from refssm.ssm.selective_scan import selective_scan, softplus
from refssm.verify.metrics import normwise_error
from refssm.viz import demo_input, new_figure, plot_gated_ssm_state_evolution, trace_gated_ssm
%% md
## The gated core in five lines

$$g_t = \sigma\big(\tfrac{1}{C}\textstyle\sum_c \Delta_{t,c}\big), \quad s_t = \sigma(B_t\cdot C_t), \quad
\text{gx}_t = g_t s_t x_t, \quad \text{ctx}_t = \alpha\,\text{ctx}_{t-1} + (1-\alpha)\,\text{gx}_t, \quad
y_t = \text{gx}_t + (1 - g_t)\,\text{ctx}_t .$$
%% code
def sigmoid(v):
    return 1 / (1 + np.exp(-v))

def gated_core(x, delta, B, C, alpha=0.9):
    """x, delta: [L, inner]; B, C: [L, N]. Returns y [L, inner] and the context [L, inner]."""
    g = sigmoid(delta.mean(axis=1, keepdims=True))               # [L, 1]  selection gate
    s = sigmoid(np.sum(B * C, axis=1, keepdims=True))            # [L, 1]  B.C gate
    gx = g * s * x
    ctx, c = np.empty_like(x), np.zeros(x.shape[1])
    for t in range(len(x)):
        c = alpha * c + (1 - alpha) * gx[t]
        ctx[t] = c
    return gx + (1 - g) * ctx, ctx

rng = np.random.default_rng(0)
x = rng.standard_normal((40, 6)); delta = softplus(rng.standard_normal((40, 6)))
B, C = rng.standard_normal((2, 40, 3))
y_ours, _ = gated_core(x, delta, B, C)
for engine in ("numpy", "numba"):
    y, _, _ = gated_ema_forward(x[None], delta[None], B[None], C[None], engine=engine)
    err = normwise_error(y[0], y_ours)
    print(f"refssm gated_ema_forward ({engine}) vs the five lines: {err:.1e}")
    assert err < 1e-14
%% md
## What it keeps: gating that depends on the input

Both gates move with the input, frame by frame. Here a GatedSSM layer with `random_params` (parameters with teeth:
the gates spread over their range) on a sine with pulses; the context of each channel is a smoothed, gated copy
of its input:
%% code
cfg = gated_ssm.GatedSSMConfig(embed_dim=4, hidden_size=16, state_size=8, num_layers=2)
model = gated_ssm.GatedSSMModel(cfg, gated_ssm.random_params(cfg, seed=0))
x_in = demo_input(64, 4)
fig = plot_gated_ssm_state_evolution(model, x_in, layer=1)
fig
%% md
## What it loses, shown

**1. The selection gate never closes.** $\Delta = \operatorname{softplus}(\cdot) > 0$, so
$g = \sigma(\operatorname{mean}\Delta) > \tfrac12$ always: at least half of every frame goes through, whatever the
input. And it is *one* number per frame, shared by every channel (Mamba has one $\Delta$ per channel).
%% code
tr = trace_gated_ssm(model, x_in, layer=1)
print(f"selection gate g over the sequence: min {tr.g.min():.3f}, max {tr.g.max():.3f}")
print(f"B.C gate s over the sequence:       min {tr.s.min():.3f}, max {tr.s.max():.3f}")
assert tr.g.min() > 0.5
g_tiny = gated_ema_forward(x[None], np.full((1, 40, 6), 1e-9), B[None], C[None])[2].g
print(f"even with every delta = 1e-9: g = {float(g_tiny.min()):.9f}")
assert float(g_tiny.min()) > 0.5
%% md
**2. The memory is fixed.** Mamba chooses per frame how long to remember: a tiny $\Delta$ makes
$\bar A = e^{\Delta A} \approx 1$ and the state holds. GatedSSM's context decays by $\alpha = 0.9$ every frame no
matter what: after 40 frames $0.9^{40} \approx 1.5\,\%$ is left. One impulse at $t = 0$, then silence:
%% code
L = 60
u = np.zeros((1, L, 1)); u[0, 0, 0] = 1.0
# Mamba core, one channel, one state, A = -1: a large delta writes the impulse, a tiny one holds it
delta_m = np.full((1, L, 1), 1e-3); delta_m[0, 0, 0] = 1.0
y_m, _ = selective_scan(u, delta_m, -np.ones((1, 1)), np.ones((1, L, 1)), np.ones((1, L, 1)))
# GatedSSM core: the same impulse, gates wide open (g -> 1, s -> 1)
_, _, saved = gated_ema_forward(u, np.full((1, L, 1), 30.0), np.full((1, L, 1), 6.0),
                                np.full((1, L, 1), 6.0))
mamba_kept = y_m[0, :, 0] / y_m[0, 0, 0]
gated_kept = saved.context[0, :, 0] / saved.context[0, 0, 0]
print(f"share of the impulse left after 40 frames: Mamba {mamba_kept[40]:.3f}, GatedSSM {gated_kept[40]:.4f}")
assert mamba_kept[40] > 0.9 and gated_kept[40] < 0.02
assert abs(gated_kept[40] - 0.9 ** 40) < 1e-12

fig, axes = new_figure(1, 1, figsize=(8, 3.2))
ax = axes[0, 0]
ax.semilogy(mamba_kept, lw=2, label="Mamba: Δ = 1 on the impulse, 0.001 after (Ā ≈ 0.999)")
ax.semilogy(gated_kept, lw=2, label="GatedSSM: α = 0.9 whatever the input")
ax.set_xlabel("frames since the impulse")
ax.set_ylabel("share of the impulse kept")
ax.set_title("Memory of one impulse: selective (held) vs gated EMA (fixed decay)")
ax.legend(fontsize=8)
fig
%% md
**3. No state dimension: $B$ and $C$ cannot route.** In notebook 2, one Mamba channel with four states copied four
tokens: $B$ wrote each into its own slot and $C$ read them back. GatedSSM's channel holds one number, and $B$, $C$ only
enter through the scalar $s_t$. During read-out frames (input 0) the context only decays,
$\text{ctx}_t = \alpha\,\text{ctx}_{t-1}$, and the output is $(1-g_t)\,\text{ctx}_t$: the four "read-outs" are one
stored number times $0.9^j$ and a gate, never four different tokens. Shown on the same kind of input (data tokens
$\pm 1$ among noise, then four empty frames), for random settings of the gates:
%% code
rng = np.random.default_rng(14)
L, K = 48, 4
xs = 0.3 * rng.standard_normal((1, L, 1)); xs[0, L - K:] = 0.0
data_pos = np.sort(rng.choice(L - K, K, replace=False)); xs[0, data_pos, 0] = [1.3, -1.2, 1.0, -1.1]
for trial in range(3):                                 # three random settings of the gates' inputs
    d = softplus(rng.normal(0, 2, (1, L, 1)))
    Bg, Cg = rng.normal(0, 2, (2, 1, L, 4))
    y, _, saved = gated_ema_forward(xs, d, Bg, Cg)
    ctx = saved.context[0, :, 0]
    ratios = ctx[L - K + 1:] / ctx[L - K:-1]
    print(f"trial {trial}: the four read-outs {np.round(y[0, L - K:, 0], 4)}; ctx ratio at each read step {np.round(ratios, 12)}")
    assert np.allclose(ratios, 0.9, rtol=1e-12, atol=0)
%% md
## Why the legacy mode cannot be stepped

Edifice's original formula (`scan_mode="legacy"`, preset `edifice`) is not a recurrence: frame $t$ is scaled by

$$w_t = \frac{\alpha^{L-1-t}}{\sum_{s=0}^{L-1}\alpha^{L-1-s}},$$

a weight normalised over the **whole** sequence length $L$. Frame 0's weight depends on how many frames come after
it. The weights for three lengths:
%% code
fig, axes = new_figure(1, 1, figsize=(8, 3.2))
ax = axes[0, 0]
for L in (10, 20, 40):
    ax.plot(np.arange(L), legacy_weights(L, 0.9), marker="o", ms=3, label=f"sequence length L = {L}")
ax.set_xlabel("frame t")
ax.set_ylabel("legacy weight w_t")
ax.set_title("The legacy weights change when the sequence gets longer")
ax.legend(fontsize=8)
print(f"weight of frame 0: L = 10: {legacy_weights(10, 0.9)[0]:.4f}, L = 40: {legacy_weights(40, 0.9)[0]:.4f}")
fig
%% md
So the output at a fixed frame changes when more frames arrive. Same parameters, same first 8 frames: the output at
$t = 7$ computed on sequences of length 8 to 40. The causal mode gives one value; the legacy mode a different one for
every length. A stepped model would have to produce frame 7's output before knowing $L$.
%% code
legacy = gated_ssm.GatedSSMModel(cfg.replace(preset="edifice"), model.params)
x_long = demo_input(40, 4, seed=3)
lengths = np.arange(8, 41, 2)
out7 = {name: np.array([m.forward(x_long[:, :L], return_sequence=True).output[0, 7, 0] for L in lengths])
        for name, m in (("causal", model), ("legacy", legacy))}
spread = {k: float(np.ptp(v)) for k, v in out7.items()}
print(f"spread of the output at t = 7 over lengths 8..40: causal {spread['causal']:.1e}, legacy {spread['legacy']:.3f}")
assert spread["causal"] < 1e-14 and spread["legacy"] > 1e-3

fig, axes = new_figure(1, 1, figsize=(8, 3.2))
ax = axes[0, 0]
for name, v in out7.items():
    ax.plot(lengths, v, marker="o", ms=4, label=f"scan_mode = {name}")
ax.set_xlabel("total sequence length L")
ax.set_ylabel("output at frame t = 7 (feature 0)")
ax.set_title("The same frame 7, computed inside longer and longer sequences")
ax.legend(fontsize=8)
fig
%% md
refssm therefore refuses to step or chunk the legacy mode, with a message that says why; the causal mode steps
exactly (every prefix equals the full forward).
%% code
try:
    legacy.init_cache()
    raise AssertionError("the legacy mode was stepped")
except ValueError as exc:
    print("legacy.init_cache():", exc)

full = model.forward(x_in, return_sequence=True).output[0]
cache = model.init_cache(batch_size=1)
stepped = []
for t in range(x_in.shape[1]):
    y_t, cache = model.step(cache, x_in[:, t])
    stepped.append(y_t[0])
err = normwise_error(np.array(stepped), full)
print(f"causal: step-by-step vs full forward, every prefix: {err:.1e}")
assert err < 1e-12
%% md
## Summary

* GatedSSM keeps the Mamba block's skeleton and input-dependent gating of what goes through.
* It loses the selective scan: the selection gate is $\ge 1/2$ and shared by all channels, the memory decays by a
  fixed $\alpha = 0.9$ per frame (1.5 % left after 40 frames, where a selective state holds), and with one number
  per channel $B$ and $C$ cannot route tokens to slots.
* The legacy formula normalises over the whole length: the same frame gets a different output in a longer sequence,
  so it has no state to carry and cannot be stepped. The causal mode is a true recurrence and steps exactly.

Next: [6. The State Space Transformer](06_ss_transformer.ipynb).
'''

NOTEBOOKS["06_ss_transformer"] = r'''
%% md
# 6. The State Space Transformer: a gate between an SSM and attention

The State Space Transformer block (Edifice's `SSTransformer`; cf. Hymba and Mamba-2's hybrids) runs two sequence
mixers side by side on the same normalised input and lets a learned gate decide, **per feature and per frame**, how
much of each to add to the residual stream:

$$u = \operatorname{LN}(x), \quad s = \text{SSM path}(u), \quad a = \text{causal attention}(u), \quad
g = \sigma(W_g u + b_g), \quad x \leftarrow x + g \odot s + (1 - g) \odot a,$$

then $x \leftarrow x + \operatorname{FFN}(\operatorname{LN}(x))$. The SSM path is the Mamba mixer of notebook 2 (a fixed-size
state, $O(1)$ per frame); attention looks back at every earlier frame (a cache that grows by one frame per step). This
notebook checks each part against a plain NumPy version, shows the gate over time, shows that the gate's extremes
switch a path off, and steps the model with its growing cache.
%% code
%matplotlib inline
import numpy as np

from refssm.models import ss_transformer as sst
from refssm.ops.attention import causal_attention_forward
from refssm.ops.norms import layer_norm_forward
from refssm.verify.metrics import normwise_error
from refssm.viz import demo_input, new_figure, plot_sst_gate, plot_sst_state_evolution, trace_sst
%% md
## Causal attention in NumPy

$\operatorname{softmax}\big(QK^\top/\sqrt{d}\big)V$ with the future masked out: frame $i$ sees frames $0..i$.
%% code
def causal_attention(q, k, v):
    """q, k, v: [heads, L, d] -> [heads, L, d]."""
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])            # [heads, L, L]
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v

rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((3, 2, 12, 4))
ref, _ = causal_attention_forward(q[None], k[None], v[None])
err = normwise_error(causal_attention(q, k, v), ref[0])
print(f"NumPy causal attention vs refssm.ops.attention: {err:.1e}")
assert err < 1e-14
%% md
## One block, assembled by hand

With a model whose parameters have teeth (`random_params`), compute the two paths and the gate with refssm's path
functions and fuse them ourselves; the result must be the block's output.
%% code
cfg = sst.SSTransformerConfig(embed_dim=4, hidden_size=16, state_size=8, num_layers=2, num_heads=2, head_dim=8)
model = sst.SSTransformerModel(cfg, sst.random_params(cfg, seed=0))
params, x_in = model.params, demo_input(64, 4)
out = model.forward(x_in, return_sequence=True)

b, x = "sst_block_1", out.hidden_states[0]                              # block 1 and its input
ln = lambda p, h: layer_norm_forward(h, p["gamma"], p["beta"], cfg.norm_eps)[0]
u = ln(params[f"{b}_norm"], x)
s, _, _ = sst.ssm_path_forward(params, u, cfg, b)
a, _, _ = sst.attention_path_forward(params, u, cfg, b)
g = 1 / (1 + np.exp(-(u @ params[f"{b}_gate_proj"]["kernel"] + params[f"{b}_gate_proj"]["bias"])))
x_mid = x + g * s + (1 - g) * a
x_out = x_mid + sst.ffn_forward(params, ln(params[f"{b}_ffn_norm"], x_mid), f"{b}_ffn")
err = normwise_error(x_out, out.hidden_states[1])
print(f"x + g s + (1 - g) a + FFN, by hand, vs the model's block 1: {err:.1e}")
assert err < 1e-14
%% md
## The gate over time

Per feature and per frame, the gate's value is the SSM path's share. An untrained model's gate sits around $1/2$
with a spread over features and moves with the input; training decides which features lean on the SSM (a compressed
summary of the whole past) and which on attention (exact look-up of individual earlier frames).
%% code
fig = plot_sst_gate(model, x_in, layer=1)
fig
%% code
fig = plot_sst_state_evolution(model, x_in, layer=1)
fig
%% md
## The gate's extremes switch a path off

If the gate's bias is pushed to $+40$, $g = 1$ to machine precision and the attention path no longer matters:
setting attention's output projection to zero must not change the output. With $-40$, the SSM path no longer matters.
%% code
def with_changes(changes):
    p = {layer: dict(v) for layer, v in params.items()}
    for (layer, name), value in changes.items():
        p[layer][name] = value
    return sst.SSTransformerModel(cfg, p)

def zero(layer):
    return {(layer, n): np.zeros_like(v) for n, v in params[layer].items()}

for bias, off in ((40.0, "attn_out_proj"), (-40.0, "ssm_out_proj")):
    gate = {(f"sst_block_{i}_gate_proj", "bias"): np.full(16, bias) for i in (1, 2)}
    both = with_changes(gate)(x_in, return_sequence=True)
    switched_off = {}
    for i in (1, 2):
        switched_off.update(zero(f"sst_block_{i}_{off}"))
    without = with_changes({**gate, **switched_off})(x_in, return_sequence=True)
    err = normwise_error(without, both)
    print(f"gate bias {bias:+.0f}: output with {off} zeroed vs intact: {err:.1e}")
    assert err < 1e-14
%% md
## Stepping: a fixed SSM state and a growing key/value cache

`step` advances the model one frame: the SSM path carries `[inner, N]` numbers per layer and a conv buffer, whatever
the length; attention must keep the keys and values of every frame seen so far. Stepping must reproduce the full
forward at every prefix:
%% code
cache = model.init_cache(batch_size=1)
stepped, sizes = [], []
for t in range(x_in.shape[1]):
    y_t, cache = model.step(cache, x_in[:, t])
    stepped.append(y_t[0])
    sizes.append((cache.ssm.size + cache.conv.size, cache.k.size + cache.v.size))
err = normwise_error(np.array(stepped), out.output[0])
print(f"step-by-step vs full forward, every prefix: {err:.1e}")
assert err < 1e-12
sizes = np.array(sizes)
print(f"cache after 1 frame: SSM + conv {sizes[0, 0]}, keys + values {sizes[0, 1]}; "
      f"after 64 frames: {sizes[-1, 0]}, {sizes[-1, 1]}")
assert np.all(sizes[:, 0] == sizes[0, 0]) and np.all(np.diff(sizes[:, 1]) == sizes[0, 1])

fig, axes = new_figure(1, 1, figsize=(8, 3.0))
ax = axes[0, 0]
ax.plot(np.arange(1, 65), sizes[:, 0], lw=2, label="SSM state + conv buffer (fixed)")
ax.plot(np.arange(1, 65), sizes[:, 1], lw=2, label="attention keys + values (grows every frame)")
ax.set_xlabel("frames seen")
ax.set_ylabel("numbers kept in the cache")
ax.set_title("What the model carries from frame to frame (2 layers)")
ax.legend(fontsize=8)
fig
%% md
## Summary

* The block is $x + g \odot s + (1-g) \odot a$ then an FFN; assembled by hand from refssm's paths it equals the model's
  block to round-off, and our six-line causal attention equals refssm's.
* The gate is per feature and per frame; at its extremes one path is switched off exactly.
* Stepping equals the full forward; the SSM's state is fixed-size while attention's cache grows linearly with the
  frames seen, the trade the hybrid is built around.

Next: [7. Manual backprop through a scan](07_backprop.ipynb).
'''

NOTEBOOKS["07_backprop"] = r'''
%% md
# 7. Manual backprop through a scan

refssm has no autograd: every SSM core has a `*_forward` that returns what it saves and a `*_backward` next to it
(llm.c style). This notebook derives the backward pass of a linear scan by hand, implements it in a few lines,
checks it entry by entry against finite differences, shows that it is itself a scan (in reverse time), and then
checks refssm's full selective-scan backward, through the discretisation, the skip and the gate.
%% code
%matplotlib inline
import numpy as np

from refssm.scan.numba_logdepth import linear_scan
from refssm.ssm.selective_scan import selective_scan_backward, selective_scan_forward
from refssm.verify.metrics import central_difference, normwise_error
from refssm.viz import new_figure, selective_copy_demo
%% md
## The forward pass and what it must save

$N$ independent states (a diagonal system), read out by a sum:

$$h_t = a_t \odot h_{t-1} + b_t, \qquad y_t = c_t \cdot h_t, \qquad t = 0, \dots, L-1, \quad h_{-1} \text{ given}.$$

Let the loss be $\ell = \sum_t \bar y_t\, y_t$ for an upstream gradient $\bar y_t = \partial\ell/\partial y_t$ (any loss
looks like this locally). The backward pass needs every $h_t$, so the forward saves them.
%% code
def scan_forward(a, b, c, h0):
    """a, b, c: [L, N]; h0: [N]. Returns y [L] and what the backward needs."""
    h, hs = h0, []
    for t in range(len(a)):
        h = a[t] * h + b[t]
        hs.append(h)
    hs = np.array(hs)
    y = np.sum(c * hs, axis=1)
    return y, dict(a=a, c=c, h0=h0, hs=hs)
%% md
## The chain rule, backwards in time

$h_t$ influences the loss twice: directly through $y_t$, and through $h_{t+1} = a_{t+1} \odot h_t + b_{t+1}$. So the
*adjoint* $g_t = \partial\ell/\partial h_t$ obeys

$$g_t = c_t\,\bar y_t + a_{t+1} \odot g_{t+1}, \qquad g_{L-1} = c_{L-1}\,\bar y_{L-1},$$

and every gradient is local once $g_t$ is known:

$$\frac{\partial\ell}{\partial b_t} = g_t, \qquad
\frac{\partial\ell}{\partial a_t} = g_t \odot h_{t-1}, \qquad
\frac{\partial\ell}{\partial c_t} = \bar y_t\, h_t, \qquad
\frac{\partial\ell}{\partial h_{-1}} = a_0 \odot g_0 .$$
%% code
def scan_backward(dy, saved):
    """dy: [L]. Returns the gradients of sum(dy * y) with respect to a, b, c, h0, and the adjoints g [L, N]."""
    a, c, h0, hs = saved["a"], saved["c"], saved["h0"], saved["hs"]
    L = len(a)
    g = np.zeros_like(hs)
    carry = np.zeros_like(h0)                      # a_{t+1} * g_{t+1}
    for t in range(L - 1, -1, -1):
        g[t] = c[t] * dy[t] + carry
        carry = a[t] * g[t]
    h_prev = np.vstack([h0[None], hs[:-1]])
    return dict(a=g * h_prev, b=g, c=dy[:, None] * hs, h0=carry), g
%% md
**Check: every entry against central finite differences.** Perturb each input entry by $\pm\epsilon$ and difference
the loss: $\frac{\ell(x + \epsilon) - \ell(x - \epsilon)}{2\epsilon}$ has error $O(\epsilon^2)$ plus round-off
$O(10^{-16}/\epsilon)$, so agreement to about $10^{-9}$ is the best float64 allows.
%% code
rng = np.random.default_rng(0)
L, N = 12, 3
a, b, c = rng.uniform(0.3, 1.0, (L, N)), rng.standard_normal((L, N)), rng.standard_normal((L, N))
h0, dy = rng.standard_normal(N), rng.standard_normal(L)
inputs = dict(a=a, b=b, c=c, h0=h0)

def loss(**kw):
    args = {**inputs, **kw}
    return float(dy @ scan_forward(args["a"], args["b"], args["c"], args["h0"])[0])

grads, g = scan_backward(dy, scan_forward(a, b, c, h0)[1])
eps = 1e-6
for name, x in inputs.items():
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x); e[idx] = eps
        fd[idx] = (loss(**{name: x + e}) - loss(**{name: x - e})) / (2 * eps)
    err = normwise_error(grads[name], fd)
    print(f"d loss / d {name:3s}: manual vs finite differences, every entry: {err:.1e}")
    assert err < 1e-7
%% md
## The backward pass is a scan too

Read the adjoint recurrence from the end: with $s = L - 1 - t$ it is $g'_s = a'_s\, g'_{s-1} + b'_s$ with
$a'_s = a_{t+1}$ and $b'_s = c_t \bar y_t$: the **same** linear recurrence, in reversed time. Everything
notebook 3 said applies: it can run sequentially or in log depth. refssm's log-depth engine computes its
backward exactly this way. Check with refssm's Blelloch kernel:
%% code
a_rev = np.vstack([np.ones((1, N)), a[::-1][:-1]])        # a'_s = a_{t+1}; a'_0 multiplies nothing
b_rev = (c * dy[:, None])[::-1]                           # b'_s = c_t dy_t
g_scan = linear_scan(np.ascontiguousarray(a_rev), np.ascontiguousarray(b_rev))[::-1]
err = normwise_error(g_scan, g)
print(f"adjoints: reverse-time Blelloch scan vs the backward loop: {err:.1e}")
assert err < 1e-14
%% md
## Through the discretisation: refssm's selective scan

The selective scan feeds this core with $a_t = \exp(\Delta_t A)$ and $b_t = \Delta_t B_t u_t$, where
$\Delta_t = \operatorname{softplus}(\delta_t + \text{bias})$, and adds a skip and a gate:
$\text{out}_t = (C_t \cdot h_t + D u_t)\,\operatorname{silu}(z_t)$. The chain rule goes through each piece
(`refssm/scan/numpy_seq.py` writes it out):

$$\frac{\partial\ell}{\partial \Delta_t} = \sum_n g_{t,n}\, h_{t-1,n}\, a_{t,n} A_n + \sum_n g_{t,n} B_{t,n} u_t, \qquad
\frac{\partial\ell}{\partial A_n} = \sum_t g_{t,n}\, h_{t-1,n}\, a_{t,n} \Delta_t, \qquad
\frac{\partial\ell}{\partial u_t} = \sum_n g_{t,n} \Delta_t B_{t,n} + \dots$$

**Check:** `selective_scan_backward` against central differences of the loss
$\ell = \langle \bar o, \text{out}\rangle + \langle \bar h, h_{L-1}\rangle$, for every argument, along a random
direction $v$: $\langle \nabla\ell, v\rangle$ against $\frac{\ell(x + \epsilon v) - \ell(x - \epsilon v)}{2\epsilon}$.
Budget (DESIGN.md): $10^{-6}$ relative. All three engines have their own backward; all are checked.
%% code
rng = np.random.default_rng(1)
batch, L, channels, N = 2, 20, 3, 4
args = dict(u=rng.standard_normal((batch, L, channels)),
            delta=rng.standard_normal((batch, L, channels)) - 1.0,
            A=-np.exp(rng.normal(np.log(np.arange(1.0, N + 1)), 0.3, (channels, N))),
            B=rng.standard_normal((batch, L, N)), C=rng.standard_normal((batch, L, N)),
            D=rng.standard_normal(channels), z=rng.standard_normal((batch, L, channels)),
            delta_bias=0.5 * rng.standard_normal(channels),
            initial_state=rng.standard_normal((batch, channels, N)))
d_out = rng.standard_normal((batch, L, channels))
d_last = rng.standard_normal((batch, channels, N))

def scan_loss(engine, **kw):
    out, last, _ = selective_scan_forward(**{**args, **kw}, delta_softplus=True, engine=engine)
    return float(np.sum(d_out * out) + np.sum(d_last * last))

print(f"{'argument':15s}" + "".join(f"{e:>11s}" for e in ("numpy", "numba", "logdepth")))
for name, x in args.items():
    v = rng.standard_normal(x.shape)
    errs = []
    for engine in ("numpy", "numba", "logdepth"):
        _, _, saved = selective_scan_forward(**args, delta_softplus=True, engine=engine)
        grad = selective_scan_backward(d_out, d_last, saved)[name]
        fd = central_difference(lambda xx: scan_loss(engine, **{name: xx}), x, v, eps=1e-6)
        errs.append(abs(float(np.sum(grad * v)) - fd) / max(abs(fd), 1e-300))
    print(f"{name:15s}" + "".join(f"{e:11.1e}" for e in errs))
    assert max(errs) < 1e-6, (name, errs)
%% md
## Where the gradient flows: selective copying

Back to the hand-built copying task of notebook 2 (`refssm.viz.selective_copy_demo`: data tokens at four random
positions, noise elsewhere, the data read back at the end). Take as loss the sum of the four read-outs and
run the backward pass. The adjoint $g_t$ carries the gradient from the read-outs back in time; because $\Delta$
is tiny on noise frames, $\bar A \approx 1$ there and the gradient passes through without decaying, while
$\partial\ell/\partial u_t = \sum_n g_{t,n} \Delta_t B_{t,n}$ is large only where the model *writes*: the data
frames.
%% code
ex = selective_copy_demo(48, 4, seed=3)
d_out = np.zeros_like(ex["u"]); d_out[0, ex["read_pos"], 0] = 1.0      # loss = sum of the read-outs
out, _, saved = selective_scan_forward(ex["u"], ex["delta_raw"], ex["A"], ex["B"], ex["C"],
                                       delta_softplus=True)
grad_u = selective_scan_backward(d_out, None, saved)["u"][0, :, 0]

dt = saved.dt[0, :, 0]                                                # the delta actually used
a_t = np.exp(dt[:, None] * ex["A"][0]); b_t = dt[:, None] * ex["B"][0] * ex["u"][0]
_, fwd = scan_forward(a_t, b_t, ex["C"][0], np.zeros(4))
_, g = scan_backward(d_out[0, :, 0], fwd)                             # our adjoints [L, N]

is_data = np.zeros(48, bool); is_data[ex["data_pos"]] = True
print(f"|d loss / d u| on data frames:  min {np.abs(grad_u[is_data]).min():.3f}")
print(f"|d loss / d u| on noise frames: max {np.abs(grad_u[~is_data]).max():.5f}")
assert np.abs(grad_u[is_data]).min() > 0.9 and np.abs(grad_u[~is_data]).max() < 0.01
ours = np.sum(g * dt[:, None] * ex["B"][0], axis=1)
err = normwise_error(ours, grad_u)
print(f"d loss / d u from our adjoints vs refssm's backward: {err:.1e}")
assert err < 1e-12

fig, axes = new_figure(2, 1, sharex=True, height_ratios=[0.8, 1.0], figsize=(8, 5))
ax = axes[0, 0]
ax.stem(np.arange(48), grad_u, basefmt="0.7")
ax.set_ylabel("∂loss/∂u_t")
ax.set_xlabel("time step t")
ax.set_title("gradient with respect to the input: only the data frames matter", fontsize=10)
ax = axes[1, 0]
lim = np.abs(g).max()
im = ax.imshow(g.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
               interpolation="nearest", extent=(-0.5, 47.5, -0.5, 3.5))
fig.colorbar(im, ax=ax, pad=0.01, label="g[t, n]")
ax.set_xlabel("time step t")
ax.set_ylabel("slot n")
ax.set_title("adjoint g_t = ∂loss/∂h_t: starts at each slot's read-out, carried back undiminished (Ā ≈ 1)",
             fontsize=10)
fig.suptitle("Backprop through the selective scan, selective-copying task")
fig
%% md
## Summary

* The backward pass of $h_t = a_t h_{t-1} + b_t$ is the adjoint recurrence $g_t = c_t\bar y_t + a_{t+1} g_{t+1}$,
  plus local formulas; it needs the forward states (refssm's NumPy engine saves them; the Numba engines recompute
  them from checkpoints or a second scan).
* It is a linear scan in reversed time, so it parallelises exactly like the forward.
* refssm's manual gradients of the whole selective scan match central finite differences to the $10^{-6}$ budget
  for every argument and engine (measured above, typically $10^{-9}$ to $10^{-11}$).

Next: [9. Numerical traps](09_numerical_traps.ipynb).
'''

NOTEBOOKS["08_golden_fixtures"] = r'''
%% md
# 8. Golden fixtures: write one, check an implementation, read the report

An implementation of Mamba in another language (Elixir/Nx, PyTorch, JAX, CUDA) can be tested against refssm without
running Python in its test suite: refssm writes **golden fixtures**, folders of inputs, parameters and the exact
outputs, and `refssm compare` checks another implementation's outputs against them. A fixture is

```
FIXTURE/
  manifest.json         format version, arch, preset, full config, seed, dtype, refssm version,
                        tolerances, the loss the gradients differentiate, and per tensor:
                        name, role, shape, dtype, sha256
  tensors.safetensors   every tensor by name (raw little-endian buffers: nothing to unpickle);
                        its header records the sha256 of manifest.json's bytes
```

Tensor names say what a tensor is: `input/...`, `output/...`, `step/...`, `cache/...`, `grad/...`, and model
parameters as `layer.name` (the Axon layer and parameter names). A golden value is only worth something if a wrong
implementation does **not** match it: this notebook writes a fixture, checks a correct and several subtly wrong
implementations against it, and measures by how much each wrong one misses.
%% code
%matplotlib inline
import json
import os
import tempfile

import numpy as np

from refssm.golden import FixtureError, compare_tensors, format_compare, read_fixture, write_fixture
from refssm.golden.suite import SCAN_LOSS, TOLERANCES, mamba_fixture_tensors, selective_scan_fixture_tensors
from refssm.models import mamba
from refssm.viz import new_figure

workdir = tempfile.mkdtemp(prefix="refssm_golden_")        # nothing is written into the repository
%% md
## Write one

The selective-scan fixture of the suite: random inputs "with teeth" ($\Delta$ in a realistic range, a non-zero initial
state, a skip $D$ and a gate $z$ that matter), the scan's output and final state, and the gradients of a stated scalar
loss with respect to all nine inputs. Same seed, byte-identical files.
%% code
tensors, config = selective_scan_fixture_tensors(seed=0, dtype="float64")
path = write_fixture(os.path.join(workdir, "scan"), arch="core", preset="mamba_ssm", config=config, seed=0,
                     dtype="float64", tensors=tensors, tolerances=TOLERANCES["float64"], loss=SCAN_LOSS)
manifest = json.load(open(os.path.join(path, "manifest.json")))
print(json.dumps({k: v for k, v in manifest.items() if k != "tensors"}, indent=1))
for entry in manifest["tensors"][:3] + manifest["tensors"][-3:]:
    print(f"  {entry['name']:22s} role {entry['role']:7s} shape {str(entry['shape']):14s} sha256 {entry['sha256'][:12]}...")

again = write_fixture(os.path.join(workdir, "scan_again"), arch="core", preset="mamba_ssm", config=config,
                      seed=0, dtype="float64", tensors=selective_scan_fixture_tensors(0, "float64")[0],
                      tolerances=TOLERANCES["float64"], loss=SCAN_LOSS)
for f in ("manifest.json", "tensors.safetensors"):
    assert open(os.path.join(path, f), "rb").read() == open(os.path.join(again, f), "rb").read()
print("written twice from the same seed: byte-identical")
%% md
## Read it back, verified

Reading checks every tensor's shape, dtype and sha256 against the manifest, and the manifest's own sha256 against
the one the tensor file records. Change one number in the tensor file, or loosen a tolerance in the manifest, and
the fixture is refused:
%% code
fixture = read_fixture(path)
print(f"read {len(fixture.tensors)} tensors, all hashes verified")

from safetensors.numpy import load_file, save_file
tampered = os.path.join(workdir, "tampered"); os.makedirs(tampered)
t = load_file(os.path.join(path, "tensors.safetensors"))
t["output/out"][0, 0, 0] += 1e-12                                     # one number, slightly off
save_file(t, os.path.join(tampered, "tensors.safetensors"))
open(os.path.join(tampered, "manifest.json"), "w").write(open(os.path.join(path, "manifest.json")).read())
try:
    read_fixture(tampered)
    raise AssertionError("a tampered fixture was accepted")
except FixtureError as exc:
    print("refused:", exc)

loose = os.path.join(workdir, "loose"); os.makedirs(loose)
m = json.load(open(os.path.join(path, "manifest.json")))
m["tolerances"]["output"] = 10.0                                      # anything would pass
json.dump(m, open(os.path.join(loose, "manifest.json"), "w"), indent=1, sort_keys=True)
open(os.path.join(loose, "tensors.safetensors"), "wb").write(open(os.path.join(path, "tensors.safetensors"), "rb").read())
try:
    read_fixture(loose)
    raise AssertionError("a loosened manifest was accepted")
except FixtureError as exc:
    print("refused:", exc)
%% md
## Check an implementation

A candidate is any implementation that reads the fixture's inputs and produces tensors with the same names. Here, a
fresh NumPy transcription of the official `selective_scan_ref` (what an implementer would write), run on the
fixture's inputs:
%% code
def softplus(v):
    return np.logaddexp(0.0, v)

def candidate_scan(t, *, skip=True, gate=True, zoh_b=False, use_h0=True, use_bias=True):
    """Mamba's selective scan from the fixture's inputs; the flags make it wrong in one way each."""
    u, A, B, C = t["input/u"], t["input/A"], t["input/B"], t["input/C"]
    dt = softplus(t["input/delta"] + (t["input/delta_bias"] if use_bias else 0.0))
    h = t["input/initial_state"].copy() if use_h0 else np.zeros_like(t["input/initial_state"])
    out = np.empty_like(u)
    for i in range(u.shape[1]):
        dA = dt[:, i, :, None] * A                                          # [batch, channels, N]
        B_bar = (np.expm1(dA) / A if zoh_b else dt[:, i, :, None]) * B[:, i, None, :]
        h = np.exp(dA) * h + B_bar * u[:, i, :, None]
        y = np.sum(h * C[:, i, None, :], axis=-1) + (t["input/D"] * u[:, i] if skip else 0.0)
        z = t["input/z"][:, i]
        out[:, i] = y * z / (1 + np.exp(-z)) if gate else y
    return {"output/out": out, "output/last_state": h}

rows = compare_tensors(fixture, candidate_scan(fixture.tensors), roles=("output",))
print(format_compare(rows))
assert all(r.ok for r in rows)
%% md
The report lists every compared tensor with its largest absolute difference, the normwise relative error
$\max|a - b| / \max|b|$, the tolerance from the manifest ($10^{-12}$ for float64 outputs) and the verdict.

## Perturbed implementations must fail

Five plausible mistakes, each one line: forgetting the $D$ skip, forgetting the $\operatorname{silu}(z)$ gate, using the
paper's ZOH $\bar B$ instead of the code's $\Delta B$ (notebook 1), ignoring the initial state, and dropping the
$\Delta$ bias. Every one must fail, and by a wide margin, or the fixture has no teeth:
%% code
mistakes = {"no D skip": dict(skip=False), "no silu(z) gate": dict(gate=False),
            "ZOH B_bar instead of ΔB": dict(zoh_b=True), "initial state ignored": dict(use_h0=False),
            "Δ bias ignored": dict(use_bias=False)}
worst = {}
for name, flags in mistakes.items():
    rows = compare_tensors(fixture, candidate_scan(fixture.tensors, **flags), roles=("output",))
    worst[name] = max(r.rel for r in rows)
    print(f"{name:26s} " + "  ".join(f"{r.name} rel {r.rel:.1e} {'ok' if r.ok else 'FAIL'}" for r in rows))
    assert not all(r.ok for r in rows)
    assert worst[name] > 1e6 * TOLERANCES["float64"]["output"]          # misses by a factor > 1e6
print()
print(format_compare(compare_tensors(fixture, candidate_scan(fixture.tensors, zoh_b=True), roles=("output",))))
%% code
fig, axes = new_figure(1, 1, figsize=(8, 3.2))
ax = axes[0, 0]
names = ["correct"] + list(worst)
errs = [max(r.rel for r in compare_tensors(fixture, candidate_scan(fixture.tensors), roles=("output",)))]
errs += [worst[n] for n in worst]
ax.barh(range(len(names)), np.maximum(errs, 1e-17), color=["tab:green"] + ["tab:red"] * len(worst))
ax.axvline(TOLERANCES["float64"]["output"], color="k", ls="--", lw=1, label="tolerance 1e-12")
ax.set_xscale("log")
ax.set_yticks(range(len(names)))
ax.set_yticklabels(names, fontsize=8)
ax.invert_yaxis()
ax.set_xlabel("worst normwise relative error of the outputs (log scale)")
ax.set_ylabel("candidate")
ax.set_title("A fixture with teeth: every mistake misses by many orders of magnitude")
ax.legend(fontsize=8)
fig
%% md
## A model fixture, and float32

A model fixture holds the parameters too (flattened as `layer.name`), the whole sequence output, the output of every
step and the final cache. A candidate that rebuilds the parameter tree from the fixture and runs refssm passes; the same
model with Edifice's channel-mean $\Delta$ in $\bar B$ (one flag of the other preset) fails.

A float32 fixture holds float32 inputs and parameters, and float64 results computed *from those float32 values*: the
exact answer a float32 implementation approximates, with tolerance $10^{-4}$.
%% code
cfg = dict(embed_dim=5, hidden_size=8, state_size=4, expand_factor=2, conv_size=4, num_layers=2, seq_len=12)
for dtype in ("float64", "float32"):
    t, full_config = mamba_fixture_tensors(0, dtype, preset="mamba_ssm", config=cfg)
    fx = read_fixture(write_fixture(os.path.join(workdir, f"mamba_{dtype}"), arch="mamba", preset="mamba_ssm",
                                    config=full_config, seed=0, dtype=dtype, tensors=t,
                                    tolerances=TOLERANCES[dtype]))
    model_cfg = mamba.as_config({k: v for k, v in fx.manifest["config"].items() if k != "batch"})
    params, x = fx.params(), fx.tensors["input/x"]

    def run(c, params=params, x=x):
        """A candidate: the model from the fixture's parameters, run in the fixture's dtype."""
        res = mamba.forward(params, x, c, return_sequence=True)
        cache, steps = mamba.init_cache(c, x.shape[0], dtype=x.dtype), []
        for k in range(x.shape[1]):
            y, cache = mamba.step(params, cache, x[:, k], c)
            steps.append(y)
        cand = {"output/sequence": res.output, "output/last": res.output[:, -1],
                "step/output": np.stack(steps, axis=1), "cache/h": cache.h, "cache/conv": cache.conv}
        cand.update({f"output/hidden_state_{i}": h for i, h in enumerate(res.hidden_states)})
        return cand

    good = compare_tensors(fx, run(model_cfg), roles=("output", "step", "cache"))
    bad = compare_tensors(fx, run(model_cfg.replace(b_bar="channel_mean")), roles=("output", "step", "cache"))
    print(f"{dtype}: correct model: {sum(r.ok for r in good)}/{len(good)} tensors ok, worst rel "
          f"{max(r.rel for r in good):.1e} (tolerance {TOLERANCES[dtype]['output']:.0e}); "
          f"channel-mean ΔB: {sum(r.ok for r in bad)}/{len(bad)} ok, worst rel {max(r.rel for r in bad):.1e}")
    assert all(r.ok for r in good) and not all(r.ok for r in bad)
%% md
The float32 candidate above is refssm run on the fixture's float32 values (it computes in float32 where its inputs
are float32); its distance to the float64 answer is what a float32 implementation should expect.

## Summary

* A fixture is a manifest (config, seed, tolerances, loss, one sha256 per tensor) and a safetensors file; same seed,
  same bytes; a changed number, or an edited manifest, is refused on read.
* `compare_tensors` / `format_compare` (the `refssm compare` command) report, tensor by tensor, the largest absolute
  and the normwise relative error against the manifest's tolerance.
* The fixtures have teeth: five one-line mistakes in a selective scan, and a one-flag change of convention in a whole
  model, all fail by many orders of magnitude.
%% code
import shutil
shutil.rmtree(workdir)
'''

NOTEBOOKS["09_numerical_traps"] = r'''
%% md
# 9. Numerical traps

Formulas that are equal on paper can be far apart in floating point, and formulas that look exact can leave things
out. Three traps an implementer of SSMs meets, each measured:

1. the "closed-form" scan $h_t = P_t \sum_{s \le t} b_s / P_s$ (a cumulative sum in log space) against the plain
   recurrence, in float32 and float64, as the sequence grows;
2. ZOH's $\bar B = (e^{\Delta A} - 1)/A \cdot B$ when $\Delta A$ is tiny;
3. the original API's parameter-count formula for Mamba against the exact count.
%% code
%matplotlib inline
import numpy as np

from refssm.models import mamba
from refssm.scan.numba_logdepth import linear_scan
from refssm.ssm.discretize import zoh
from refssm.verify.metrics import normwise_error
from refssm.viz import new_figure
%% md
## Trap 1: the log-space cumulative-sum scan

Unroll $h_t = a_t h_{t-1} + b_t$ (from $h_{-1} = 0$) with $P_t = a_0 a_1 \cdots a_t$:

$$h_t = \sum_{s \le t} \frac{P_t}{P_s}\, b_s = P_t \cdot \operatorname{cumsum}\!\left(\frac{b}{P}\right)_t,
\qquad P_t = \exp\Big(\sum_{s \le t} \Delta_s A\Big).$$

Two vectorised calls (`cumsum`, `exp`) instead of a loop: tempting in NumPy or any array framework. But $P_t$ decays
exponentially, so $1/P_t$ grows exponentially: the formula multiplies a huge number by a tiny one. Its relative
error grows with $|\log P_t|$ (each rounding of the running sum $\log P_t$ becomes a relative error of $P_t$), and
once $|\log P_t|$ passes $\log(\text{largest float})$, 88.7 in float32 and 709.8 in float64, $e^{-\log P}$
overflows and the output is `inf`/`nan`.

Measured on one channel, four states, $A = -(1, 2, 3, 4)$, $\Delta_t$ log-uniform in $[10^{-3}, 10^{-2}]$, against the
recurrence in float64 on the same (float32-rounded) inputs:
%% code
def sequential_scan(a, b):
    """The plain recurrence, in the dtype of a and b. a, b: [L, N]."""
    h, out = np.zeros(a.shape[1], a.dtype), np.empty_like(b)
    for t in range(len(a)):
        h = a[t] * h + b[t]
        out[t] = h
    return out

def cumsum_scan(dA, bu):
    """h_t = P_t * cumsum(bu / P)_t with log P = cumsum(dA): the tempting closed form."""
    with np.errstate(over="ignore", invalid="ignore"):
        log_P = np.cumsum(dA, axis=0)
        return np.exp(log_P) * np.cumsum(bu * np.exp(-log_P), axis=0)

def chunked_cumsum_scan(dA, bu, chunk=64):
    """The same closed form inside chunks of 64 steps, the state carried between chunks."""
    h, carry = np.empty_like(bu), np.zeros(bu.shape[1], bu.dtype)
    for s in range(0, len(bu), chunk):
        P = np.exp(np.cumsum(dA[s:s + chunk], axis=0))            # |log P| stays small
        h[s:s + chunk] = P * (carry + np.cumsum(bu[s:s + chunk] / P, axis=0))
        carry = h[min(s + chunk, len(bu)) - 1]
    return h

rng = np.random.default_rng(0)
L_max, A = 2 ** 16, -np.arange(1.0, 5.0)
dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-2), (L_max, 1)))
bu_all = dt * rng.standard_normal((L_max, 4)) * rng.standard_normal((L_max, 1))   # Delta B u

def error(x, ref):
    return normwise_error(x, ref) if np.all(np.isfinite(x)) else np.inf

lengths = 2 ** np.arange(4, 17)
errs = {k: [] for k in ("recurrence, float32", "cumsum, float32", "cumsum, float64", "chunked cumsum, float32")}
for L in lengths:
    dA32, bu32 = (dt[:L] * A).astype(np.float32), bu_all[:L].astype(np.float32)
    ref = linear_scan(np.exp(dA32.astype(np.float64)), bu32.astype(np.float64))
    errs["recurrence, float32"].append(error(sequential_scan(np.exp(dA32), bu32), ref))
    errs["cumsum, float32"].append(error(cumsum_scan(dA32, bu32), ref))
    errs["cumsum, float64"].append(error(cumsum_scan(dA32.astype(np.float64), bu32.astype(np.float64)), ref))
    errs["chunked cumsum, float32"].append(error(chunked_cumsum_scan(dA32, bu32), ref))
errs = {k: np.array(v) for k, v in errs.items()}
log_P_max = np.array([float(np.max(np.abs(np.sum(dt[:L] * A, axis=0)))) for L in lengths])
print(f"{'seq_len':>8s} {'max|log P|':>10s}" + "".join(f"{k:>25s}" for k in errs))
for i, L in enumerate(lengths):
    print(f"{L:8d} {log_P_max[i]:10.1f}" + "".join(f"{errs[k][i]:25.1e}" for k in errs))
%% code
fig, axes = new_figure(1, 1, figsize=(8, 4))
ax = axes[0, 0]
styles = {"recurrence, float32": ("k", "o"), "cumsum, float32": ("tab:red", "s"),
          "cumsum, float64": ("tab:purple", "^"), "chunked cumsum, float32": ("tab:green", "x")}
for k, e in errs.items():
    color, marker = styles[k]
    ok = np.isfinite(e)
    ax.loglog(lengths[ok], np.maximum(e[ok], 1e-17), color=color, marker=marker, ms=5, label=k)
    if (~ok).any():
        ax.scatter(lengths[~ok], np.full((~ok).sum(), 1.0), color=color, marker=marker, s=40)
ax.axhline(1.0, color="0.6", ls=":", lw=1)
ax.text(lengths[0], 1.4, "points on this line: inf / nan (overflow)", fontsize=8, color="0.3")
ax.set_ylim(1e-17, 20)
ax.set_xlabel("sequence length L")
ax.set_ylabel("normwise error vs float64 recurrence")
ax.set_title("The cumsum closed form loses digits as L grows, then overflows")
ax.legend(fontsize=8, loc="center left")
fig
%% md
What the table and picture say, asserted:

* the float32 recurrence stays at float32 round-off (about $10^{-6}$) at every length;
* the float32 cumsum form starts equally good, loses accuracy in proportion to $|\log P|$ (tens of times worse at
  $L = 4096$), and returns `inf`/`nan` once $|\log P|$ passes 88.7, at a few thousand steps here; float64 postpones
  the same failure to $|\log P| > 709.8$;
* computing the closed form only inside short chunks and carrying the state between them (the idea behind chunked
  scans such as Mamba-2's SSD algorithm) keeps every $|\log P|$ small and the accuracy of the recurrence.
%% code
rec32, cum32, cum64, chk32 = (errs[k] for k in errs)
assert np.all(rec32 < 1e-5) and np.all(chk32 < 1e-5)
i64, i4096 = list(lengths).index(64), list(lengths).index(4096)
print(f"cumsum float32 error grows {cum32[i4096] / cum32[i64]:.0f}x from L = 64 to L = 4096")
assert cum32[i4096] > 5 * cum32[i64]
assert np.all(np.isinf(cum32[log_P_max > 88.8])) and np.all(np.isfinite(cum32[log_P_max < 88.6]))
assert np.all(np.isinf(cum64[log_P_max > 709.9])) and np.all(np.isfinite(cum64[log_P_max < 709.7]))
print(f"float32 cumsum overflows from L = {lengths[np.isinf(cum32)][0]}, float64 from L = {lengths[np.isinf(cum64)][0]}")
%% md
## Trap 2: $e^{z} - 1$ for small $z$

ZOH's input matrix for one eigenvalue is $\bar b = \frac{e^{z} - 1}{z}\,\Delta b$ with $z = \Delta a$. For small $|z|$
(slow modes, small steps: common in Mamba, where $\Delta$ goes down to $10^{-3}$ and below) $e^z$ rounds to a number
near 1, and subtracting 1 cancels its leading digits: the relative error is about $\epsilon / |z|$. `np.expm1(z)`
computes $e^z - 1$ without forming $e^z$; refssm's `zoh` uses $\operatorname{expm1}(z)/z$ (and the series
$1 + z/2 + z^2/6$ below $|z| = 6\cdot 10^{-6}$).

Reference: the Taylor series $\sum_{k \ge 0} z^k / (k+1)!$, 25 terms, exact to round-off for $|z| \le 1$.
%% code
def phi1_series(z, terms=25):
    """(e^z - 1)/z = sum_k z^k / (k+1)!, by Horner; accurate for |z| <= 1."""
    out = np.zeros_like(z)
    for k in range(terms - 1, -1, -1):
        out = out * z / (k + 2) + 1.0
    return out

z = -np.logspace(-15, 0, 61)
ref = phi1_series(z)
textbook = (np.exp(z) - 1) / z
refssm_phi1 = zoh(z, np.ones_like(z), 1.0)[1]            # B_bar / (delta B) with delta = 1, A = z
err_text = np.abs(textbook - ref) / np.abs(ref)
err_refssm = np.abs(refssm_phi1 - ref) / np.abs(ref)
print(f"textbook (exp(z) - 1)/z at z = -1e-10: relative error {err_text[np.argmin(abs(z + 1e-10))]:.1e}")
print(f"refssm zoh, worst over z in [-1, -1e-15]: relative error {err_refssm.max():.1e}")
assert err_refssm.max() < 1e-15
assert err_text[np.argmin(abs(z + 1e-10))] > 1e-8

fig, axes = new_figure(1, 1, figsize=(8, 3.4))
ax = axes[0, 0]
ax.loglog(-z, np.maximum(err_text, 1e-18), "o-", ms=3, color="tab:red", label="(exp(z) - 1) / z")
ax.loglog(-z, np.maximum(err_refssm, 1e-18), "s-", ms=3, color="tab:green", label="refssm zoh: expm1(z) / z")
ax.loglog(-z, np.finfo(float).eps / -z, "k:", lw=1, label="ε / |z|")
ax.set_ylim(1e-18, 10)
ax.set_xlabel("|z| = |Δ·a|")
ax.set_ylabel("relative error of B̄")
ax.set_title("ZOH's B̄ for small steps: exp(z) - 1 cancels, expm1 does not (values < 1e-18 drawn at 1e-18)")
ax.legend(fontsize=8)
fig
%% md
## Trap 3: parameter counts that leave things out

The original API estimated Mamba's size with `2HE + KE + 2EN + 2ER + EH` per layer (plus `embed·H` for the input
projection), with `H` = hidden, `E` = inner = expand·H, `N` = state, `K` = conv, `R = max(H div 16, 1)`.
refssm keeps that as `original_param_count` and computes the **exact** count, `param_count`, which must equal the
number of scalars in the built parameter tree. The formula leaves out every bias, the norms, `A_log` and `D`, and
uses Edifice's `dt_rank` where the official module uses `ceil(H/16)`:
%% code
configs = [("recommended, embed 287", dict(embed_dim=287, **mamba.recommended_defaults())),
           ("small, H = 40", dict(embed_dim=3, hidden_size=40, state_size=16, num_layers=2)),
           ("tiny, H = 8", dict(embed_dim=8, hidden_size=8, state_size=4, num_layers=1))]
size = lambda shape: int(np.prod(shape))
rows = []
print(f"{'config':24s} {'preset':10s} {'formula':>9s} {'exact':>9s} {'tree':>9s} {'gap':>6s} {'gap %':>6s}  explained by")
for label, opts in configs:
    for preset in ("mamba_ssm", "edifice"):
        cfg = mamba.MambaConfig(preset=preset, **opts)
        exact, formula = mamba.param_count(cfg), mamba.original_param_count(cfg)
        tree = mamba.build(cfg).param_count_tree()
        assert exact == tree                                    # the exact count is exact
        shapes = [(n, s) for layer in mamba.param_shapes(cfg).values() for n, s in layer.items()]
        parts = {"biases": sum(size(s) for n, s in shapes if n == "bias"),
                 "norms": sum(size(s) for n, s in shapes if n in ("gamma", "beta")),
                 "A_log": sum(size(s) for n, s in shapes if n == "A_log"),
                 "D": sum(size(s) for n, s in shapes if n == "D"),
                 "dt_rank": cfg.num_layers * 2 * cfg.inner_size * (cfg.dt_rank_size - max(cfg.hidden_size // 16, 1))}
        assert exact - formula == sum(parts.values())            # every missing scalar accounted for
        rows.append((label, preset, parts))
        why = ", ".join(f"{k} {v}" for k, v in parts.items() if v)
        print(f"{label:24s} {preset:10s} {formula:9d} {exact:9d} {tree:9d} {exact - formula:6d} "
              f"{100 * (exact - formula) / exact:5.1f}%  {why}")
%% code
fig, axes = new_figure(1, 1, figsize=(8, 3.6))
ax = axes[0, 0]
keys = ["biases", "norms", "A_log", "D", "dt_rank"]
names = ["biases", "norms (γ, β)", "A_log", "D", "dt_rank: ceil(H/16) vs H div 16"]
left = np.zeros(len(rows))
for k, name in zip(keys, names):
    share = np.array([100 * parts[k] / sum(parts.values()) for _, _, parts in rows])
    ax.barh(np.arange(len(rows)), share, left=left, label=name)
    left += share
ax.set_yticks(range(len(rows)))
ax.set_yticklabels([f"{label}, {preset}" for label, preset, _ in rows], fontsize=8)
ax.invert_yaxis()
ax.set_xlabel("share of the gap (%)")
ax.set_ylabel("config, preset")
ax.set_title("What the original parameter-count formula leaves out")
ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
fig
%% md
## Summary

* Prefer the recurrence (sequential or parallel) to the cumsum closed form; if you need the closed form for speed,
  use it only inside short chunks. In float32 the closed form overflowed after a few thousand steps here.
* Use `expm1` (or a series) for $e^z - 1$; refssm's ZOH is accurate to a few ulps for every $z$.
* Count parameters from the tree, not from a formula: at the recommended defaults the original formula undercounts
  Mamba by 2.2 % with the official (`mamba_ssm`) conventions (mostly `A_log`) and by 0.6 % with Edifice's (biases
  and norms); for hidden sizes that are not multiples of 16 the `dt_rank` rounding adds to the gap. Every missing
  scalar is accounted for above.
'''


if __name__ == "__main__":
    sys.exit(main())
