"""refssm.viz: every plot is a Figure with a title and labelled axes; plot_main writes a PNG.

Also the numbers behind the pictures (impulse responses, discretised
eigenvalues, the Blelloch schedule, a model trace) are checked against an
independent computation, so a plot can't be pretty and wrong.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from refssm.models import gated_ssm, mamba, s5
from refssm.models import ss_transformer as sst
from refssm.ssm.discretize import bilinear, euler, zoh
from refssm.ssm.selective_scan import selective_scan_forward
from refssm.verify.metrics import normwise_error
from refssm.viz import (ARCHITECTURES, blelloch_trace, continuous_impulse_response, data_axes,
                        discretize_eigenvalues, fig_to_png, impulse_response, plot_delta_vs_input,
                        plot_eigenvalues, plot_gate_over_time, plot_gated_ssm_state_evolution,
                        plot_impulse_response, plot_main, plot_mamba_delta,
                        plot_mamba_state_evolution, plot_s5_kernel, plot_s5_model_kernel,
                        plot_s5_state_evolution, plot_scan_tree, plot_sst_gate,
                        plot_sst_state_evolution, plot_state_evolution, save_png,
                        selective_copy_demo, trace_gated_ssm, trace_mamba, trace_s5, trace_sst)

RNG = np.random.default_rng(0)


def _small_mamba(preset="mamba_ssm"):
    cfg = mamba.MambaConfig(embed_dim=3, hidden_size=8, state_size=4, num_layers=2, preset=preset)
    return mamba.MambaModel(cfg, mamba.random_params(cfg, seed=1))


def _small_s5():
    return s5.build(embed_dim=3, hidden_size=6, state_size=8, num_layers=2, seed=2)


def _small_gated(preset="causal"):
    return gated_ssm.build(embed_dim=3, hidden_size=8, state_size=2, num_layers=2, preset=preset,
                           seed=3)


def _small_sst(preset="mamba_ssm"):
    return sst.build(embed_dim=3, hidden_size=8, state_size=4, num_layers=2, num_heads=2,
                     head_dim=4, preset=preset, seed=4)


def _figures():
    """One call of every plot function: name -> zero-argument factory."""
    h = np.cumsum(RNG.standard_normal((30, 3, 5)), axis=0)
    delta = np.exp(RNG.uniform(-6, -1, (30, 3)))
    k = np.arange(40.0)
    K = np.exp(-0.1 * k)[:, None, None] * RNG.standard_normal((1, 4, 4))
    gate = 1 / (1 + np.exp(-RNG.standard_normal((30, 6))))
    x = RNG.standard_normal((1, 12, 3))
    return {
        "state_evolution": lambda: plot_state_evolution(h, inputs=np.sin(k[:30]), delta=delta),
        "state_evolution_complex": lambda: plot_state_evolution(h + 1j * h, part="abs",
                                                                channels=[1]),
        "delta_vs_input": lambda: plot_delta_vs_input(delta, RNG.standard_normal((30, 2))),
        "delta_vs_input_relative": lambda: plot_delta_vs_input(delta, np.ones(30), relative=True),
        "impulse_response": lambda: plot_impulse_response(np.array([-0.5 + 2j, -0.5 - 2j]), 1.0,
                                                          1.0, 0.4, steps=20),
        "eigenvalues": lambda: plot_eigenvalues(np.array([-0.5 + 3j, -0.5 - 3j, -1.0]), 0.3),
        "eigenvalues_dense_no_delta":
            lambda: plot_eigenvalues(-np.eye(3) + np.triu(np.ones((3, 3)), 1)),
        "scan_tree": lambda: plot_scan_tree(6),
        "s5_kernel": lambda: plot_s5_kernel(K, input_feature=1),
        "s5_kernel_siso": lambda: plot_s5_kernel(np.exp(-0.1 * k)),
        "gate_over_time": lambda: plot_gate_over_time(gate, inputs=np.cos(k[:30])),
        "mamba_state_evolution": lambda: plot_mamba_state_evolution(_small_mamba(), x, layer=2),
        "mamba_delta": lambda: plot_mamba_delta(_small_mamba("edifice"), x),
        "s5_state_evolution": lambda: plot_s5_state_evolution(_small_s5(), x, layer=2, part="abs"),
        "s5_model_kernel": lambda: plot_s5_model_kernel(_small_s5(), seq_len=20, input_feature=2),
        "gated_ssm_state_evolution": lambda: plot_gated_ssm_state_evolution(_small_gated(), x),
        "gated_ssm_legacy": lambda: plot_gated_ssm_state_evolution(_small_gated("edifice"), x),
        "sst_gate": lambda: plot_sst_gate(_small_sst(), x, layer=2),
        "sst_state_evolution": lambda: plot_sst_state_evolution(_small_sst(), x),
        "sst_state_evolution_ema": lambda: plot_sst_state_evolution(_small_sst("edifice"), x),
    }


@pytest.mark.parametrize("name", sorted(_figures()))
def test_every_plot_has_a_title_and_labelled_axes(name):
    fig = _figures()[name]()
    assert isinstance(fig, Figure)
    assert fig._suptitle is not None and fig._suptitle.get_text().strip(), "no figure title"
    axes = data_axes(fig)
    assert axes, "no axes"
    for ax in axes:
        assert ax.get_xlabel().strip(), f"{name}: an axes without an x label"
        assert ax.get_ylabel().strip(), f"{name}: an axes without a y label"
    for ax in fig.axes:
        if ax not in axes:                                   # colour bars say what colour means
            assert ax.get_ylabel().strip() or ax.get_xlabel().strip(), \
                f"{name}: unlabelled colorbar"
    png = fig_to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_plot_main_writes_a_png(arch, tmp_path):
    out = tmp_path / "sub" / f"{arch}.png"
    fig = plot_main(arch, out, seq_len=24)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert isinstance(fig, Figure) and fig._suptitle.get_text()


def test_plot_main_rejects_unknown_arch_and_options(tmp_path):
    with pytest.raises(ValueError, match="arch: expected one of"):
        plot_main("lstm", tmp_path / "x.png")
    with pytest.raises(ValueError, match="unknown option"):
        plot_main("mamba", tmp_path / "x.png", hidden=3)
    assert not (tmp_path / "x.png").exists()


def test_no_pyplot_no_screen(tmp_path):
    """The plots never import pyplot (no global state, no display), whatever MPLBACKEND says."""
    code = ("import sys, refssm.viz as v; v.plot_main('scan', sys.argv[1]); "
            "print('matplotlib.pyplot' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")],
                         capture_output=True, text=True, timeout=120,
                         env={"MPLBACKEND": "TkAgg", "PATH": "", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    assert (tmp_path / "a.png").stat().st_size > 0


def test_save_png_creates_folders(tmp_path):
    path = save_png(plot_scan_tree(4), tmp_path / "a" / "b" / "tree.png", dpi=50)
    assert path.exists() and path.stat().st_size > 0


# ---------------------------------------------------------------------------
# the numbers behind the pictures
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler", "mamba"])
def test_impulse_response_equals_running_the_recurrence(method):
    A = np.array([-0.3 + 2j, -0.3 - 2j, -1.5])
    B = np.array([1.0, 1.0, 0.5])
    C = np.array([0.5, 0.5, 2.0])
    delta, steps = 0.2, 30
    rule = {"zoh": zoh, "bilinear": bilinear, "euler": euler, "mamba": zoh}[method]
    A_bar, B_bar = rule(A, B, delta)
    if method == "mamba":
        B_bar = delta * B
    h, ys = np.zeros(3, complex), []
    for k in range(steps):
        h = A_bar * h + B_bar * (1.0 if k == 0 else 0.0)
        ys.append(np.real(C @ h))
    assert normwise_error(impulse_response(A, B, C, delta, steps, method), np.array(ys)) < 1e-14


def test_discrete_response_converges_to_continuous():
    A = np.array([-1.0, -0.2 + 1j, -0.2 - 1j])
    t = np.arange(200) * 0.01
    y = impulse_response(A, 1.0, 1.0, 0.01, 200, "zoh") / 0.01
    h = continuous_impulse_response(A, 1.0, 1.0, t + 0.005)        # ZOH pulse ~ midpoint
    assert normwise_error(y, h) < 1e-4


def test_discretize_eigenvalues_matches_the_rules():
    lam = np.array([-1.0 + 2j, -0.1, -3.0 - 0.5j])
    for method, rule in [("zoh", zoh), ("bilinear", bilinear), ("euler", euler)]:
        assert np.array_equal(discretize_eigenvalues(lam, 0.3, method),
                              rule(lam, np.ones(3), 0.3)[0])
    with pytest.raises(ValueError, match="method"):
        discretize_eigenvalues(lam, 0.3, "rk4")


@pytest.mark.parametrize("L", list(range(1, 34)))
def test_blelloch_trace_ends_with_exclusive_prefixes(L):
    levels, total = blelloch_trace(L)
    rows = levels[-1]["rows"]
    assert rows[0] is None
    assert all(rows[t] == (0, t - 1) for t in range(1, L))
    assert total == (0, L - 1)
    Lp = len(rows)
    assert Lp >= L and Lp & (Lp - 1) == 0
    combines = sum(1 for lv in levels for _, dst, kind in lv["edges"] if kind == "combine"
                   and lv["phase"] == "up-sweep") // 2
    assert combines == Lp - 1                                # the up-sweep's work


def test_trace_mamba_is_the_model():
    model = _small_mamba()
    x = RNG.standard_normal((2, 10, 3))
    out = model.forward(x, return_sequence=True)
    for layer in (1, 2):
        tr = trace_mamba(model, x, layer=layer, batch=1)
        assert tr.states.shape == (10, 16, 4) and tr.delta.shape == (10, 16)
        # against the model itself: the layer's input and its final state (the y check
        # below only ties the trace to itself)
        assert np.array_equal(tr.x, out.hidden_states[layer - 1][1])
        assert normwise_error(tr.states[-1], out.state.h[1, layer - 1]) < 1e-14
        y = np.einsum("tcn,tn->tc", tr.states, tr.C)
        assert normwise_error(y, tr.y_core) < 1e-14
        assert np.all(tr.delta > 0)
    with pytest.raises(ValueError, match="layer"):
        trace_mamba(model, x, layer=3)
    with pytest.raises(ValueError, match="batch"):
        trace_mamba(model, x, batch=2)


def test_trace_s5_is_the_model():
    model = _small_s5()
    x = RNG.standard_normal((2, 9, 3))
    out = model.forward(x, return_sequence=True)
    for layer in (1, 2):
        tr = trace_s5(model, x, layer=layer, batch=1)
        assert normwise_error(tr.states[-1], out.state.h[1, layer - 1]) < 1e-14
        D = model.params[f"s5_block_{layer}_ssm_ssm"]["D"]
        y = 2 * np.real(tr.states @ tr.C_tilde.T) + D * tr.u
        assert normwise_error(y, tr.y) < 1e-14
        assert np.allclose(tr.Lambda_bar, np.exp(tr.Lambda * tr.step), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="paper's S5 SSM"):
        trace_s5(s5.build(embed_dim=3, hidden_size=4, state_size=4, preset="edifice"), x)


def test_trace_gated_ssm_is_the_model():
    model = _small_gated()
    x = RNG.standard_normal((2, 9, 3))
    out = model.forward(x, return_sequence=True)
    for layer in (1, 2):
        tr = trace_gated_ssm(model, x, layer=layer, batch=0)
        assert normwise_error(tr.context[-1], out.state.context[0, layer - 1]) < 1e-14
        assert np.all((tr.g > 0.5) & (tr.g < 1)) and np.all((tr.s > 0) & (tr.s < 1))
    assert trace_gated_ssm(_small_gated("edifice"), x).scan_mode == "legacy"


@pytest.mark.parametrize("preset", ["mamba_ssm", "edifice"])
def test_trace_sst_is_the_model(preset):
    model = _small_sst(preset)
    x = RNG.standard_normal((2, 9, 3))
    out = model.forward(x, return_sequence=True)
    for layer in (1, 2):
        tr = trace_sst(model, x, layer=layer, batch=1)
        last = tr.states[-1, 0] if preset == "edifice" else tr.states[-1]
        assert normwise_error(last, out.state.ssm[1, layer - 1]) < 1e-14
        assert np.all((tr.gate > 0) & (tr.gate < 1))
        assert (tr.delta is None) == (preset == "edifice")


def test_selective_copy_demo_copies():
    ex = selective_copy_demo(64, 4, seed=5)
    out, _, _ = selective_scan_forward(ex["u"], ex["delta_raw"], ex["A"], ex["B"], ex["C"],
                                       delta_softplus=True)
    assert normwise_error(out[0, ex["read_pos"], 0], ex["data"]) < 0.05
    with pytest.raises(ValueError, match="seq_len"):
        selective_copy_demo(8, 4)


def test_bad_input_is_refused_with_a_clear_message():
    h = np.zeros((10, 2, 3))
    with pytest.raises(ValueError, match=r"channels: expected indices in \[0, 2\)"):
        plot_state_evolution(h, channels=[5])
    with pytest.raises(ValueError, match="inputs: expected seq_len 10"):
        plot_state_evolution(h, inputs=np.zeros(9))
    with pytest.raises(ValueError, match="every step size > 0"):
        plot_delta_vs_input(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        plot_gate_over_time(np.full((10, 2), 1.5))
    with pytest.raises(ValueError, match="seq_len: expected 1 to 32"):
        plot_scan_tree(64)
    with pytest.raises(ValueError, match="square"):
        plot_eigenvalues(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="input_feature"):
        plot_s5_kernel(np.zeros((5, 2, 2)), input_feature=2)


def test_state_evolution_draws_what_its_title_says():
    # part="abs" of a real state drew the signed values under the title "(abs part)"; a zero
    # or negative delta vanished from the log axis without a word
    h = np.array([[[-2.0, 1.0]], [[0.5, -3.0]], [[1.0, 1.0]]])          # [seq_len 3, 1, 2]
    fig = plot_state_evolution(h, part="abs")
    drawn = [a for a in fig.axes if a.get_images()][0].get_images()[0].get_array()
    assert np.array_equal(np.asarray(drawn), np.abs(h[:, 0]).T)        # [state, seq_len]
    with pytest.raises(ValueError, match="'real' or 'abs' for real states"):
        plot_state_evolution(h, part="imag")
    with pytest.raises(ValueError, match=r"delta: expected every step size > 0 .* got min -0.01"):
        plot_state_evolution(h, delta=np.array([0.05, -0.01, 0.05]))


def test_kernel_size_leaves_exact_zeros_out_of_the_log_axis():
    # they were drawn at 2.2e-308, stretching the axis to 1e-323 and flattening the rest
    K = np.zeros((6, 2, 2))
    K[0], K[2] = 1.0, 0.5
    fig = plot_s5_kernel(K)
    ax2 = [a for a in fig.axes if a.get_yscale() == "log"][0]
    drawn = ax2.get_lines()[0].get_ydata()
    assert np.isnan(drawn[[1, 3, 4, 5]]).all() and np.all(drawn[[0, 2]] > 0.1)
    assert ax2.get_ylim()[0] > 1e-3
    assert "exact zeros not drawn" in ax2.get_lines()[0].get_label()
