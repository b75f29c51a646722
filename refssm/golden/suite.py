"""The fixture suite written by ``refssm golden --out DIR``.

Every fixture *has teeth* (DESIGN.md section 5): parameters from the models'
``random_params`` (every parameter away from the value that would hide a bug;
``delta`` well inside Edifice's clip ``[0.001, 0.1]``; slow decay so the state
carries), ``seq_len`` beyond the conv window, and a non-zero carried state in
the core fixtures. ``tests/test_golden.py`` proves it: perturbed
implementations (no ``D``, channel-mean delta, fixed ``A``, a conv window one
short) fail ``compare``.

dtypes: a ``float64`` fixture holds float64 inputs and results, tolerances
``1e-12`` (outputs, steps, caches) and ``1e-10`` (gradients). A ``float32``
fixture holds float32 inputs and parameters (what a float32 implementation
is given) with the float64 results *computed from those float32 values*, the
exact answer the candidate approximates; tolerance ``1e-4`` normwise.

Same seed -> byte-identical files.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .fixture import write_fixture

__all__ = ["TOLERANCES", "write_suite", "mamba_fixture_tensors", "selective_scan_fixture_tensors",
           "discretization_fixture_tensors", "SUITE"]

TOLERANCES = {
    "float64": {"output": 1e-12, "step": 1e-12, "cache": 1e-12, "grad": 1e-10, "core": 1e-12},
    "float32": {"output": 1e-4, "step": 1e-4, "cache": 1e-4, "grad": 1e-4, "core": 1e-4},
}

SCAN_LOSS = "sum(input/w_out * output/out) + sum(input/w_state * output/last_state)"
MODEL_LOSS = "sum(input/w_out * output/sequence)"


def _round_to(dtype, tree):
    """Round every array to ``dtype`` and back to float64 (the values a float32 candidate sees)."""
    if isinstance(tree, dict):
        return {k: _round_to(dtype, v) for k, v in tree.items()}
    if tree is None:
        return None
    return np.asarray(tree, dtype=dtype).astype(np.float64)


def _stored(dtype, arr):
    return np.asarray(arr, dtype=dtype)


# ---------------------------------------------------------------------------
# Core fixtures
# ---------------------------------------------------------------------------

def discretization_fixture_tensors(seed: int, dtype: str):
    """ZOH, bilinear and Euler of a diagonal complex system and Mamba's convention.

    Complex values are stored as separate ``_re``/``_im`` tensors.
    """
    from ..ssm import discretize as dz

    rng = np.random.default_rng(seed)
    N, M = 6, 3
    lam = _round_to(dtype, -rng.uniform(0.05, 2.0, N)) + 1j * _round_to(dtype, rng.uniform(-3, 3, N))
    B = _round_to(dtype, rng.standard_normal((N, M))) + 1j * _round_to(dtype, rng.standard_normal((N, M)))
    delta = _round_to(dtype, np.exp(rng.uniform(np.log(1e-3), np.log(0.5), N)))
    t = {"input/lambda_re": lam.real, "input/lambda_im": lam.imag, "input/B_re": B.real,
         "input/B_im": B.imag, "input/delta": delta}
    for method in ("zoh", "bilinear", "euler"):
        A_bar, B_bar = getattr(dz, method)(lam, B, delta)
        t[f"core/{method}_A_bar_re"] = A_bar.real
        t[f"core/{method}_A_bar_im"] = A_bar.imag
        t[f"core/{method}_B_bar_re"] = B_bar.real
        t[f"core/{method}_B_bar_im"] = B_bar.imag
    # Mamba: A [channels, N] real, delta [batch, L, channels], B [batch, L, N]
    Am = _round_to(dtype, -np.tile(np.arange(1.0, 5.0), (3, 1)))
    dm = _round_to(dtype, rng.uniform(1e-3, 0.1, (2, 5, 3)))
    Bm = _round_to(dtype, rng.standard_normal((2, 5, 4)))
    A_bar, B_bar = dz.mamba_discretize(Am, Bm, dm)
    t.update({"input/mamba_A": Am, "input/mamba_delta": dm, "input/mamba_B": Bm,
              "core/mamba_A_bar": A_bar, "core/mamba_B_bar": B_bar})
    inputs = {k: _stored(dtype, v) for k, v in t.items() if k.startswith("input/")}
    results = {k: v for k, v in t.items() if not k.startswith("input/")}
    return {**inputs, **results}, {"N": N, "M": M}


def selective_scan_fixture_tensors(seed: int, dtype: str, *, preset="mamba_ssm"):
    """The selective scan with every option on, its final state and all 9 gradients."""
    from ..ssm.selective_scan import selective_scan_backward, selective_scan_forward

    rng = np.random.default_rng(seed)
    batch, L, ch, N = 2, 24, 6, 4
    opts = dict(delta_softplus=True)
    if preset == "edifice":
        opts.update(delta_clip=(1e-3, 0.1), delta_b_mean=True)
    # raw delta so that softplus(delta + bias) lies in ~[0.01, 0.08]: inside the clip
    args = dict(
        u=rng.standard_normal((batch, L, ch)),
        delta=rng.uniform(-4.5, -2.6, (batch, L, ch)),
        A=-np.tile(np.arange(1.0, N + 1), (ch, 1)) * rng.uniform(0.5, 1.5, (ch, 1)),
        B=rng.standard_normal((batch, L, N)), C=rng.standard_normal((batch, L, N)),
        D=1.0 + 0.5 * rng.standard_normal(ch), z=rng.standard_normal((batch, L, ch)),
        delta_bias=0.05 * rng.standard_normal(ch),
        initial_state=rng.standard_normal((batch, ch, N)),
    )
    args = _round_to(dtype, args)
    W = _round_to(dtype, rng.standard_normal((batch, L, ch)))
    Wh = _round_to(dtype, rng.standard_normal((batch, ch, N)))
    out, last, saved = selective_scan_forward(**args, **opts)
    grads = selective_scan_backward(W, Wh, saved)
    t = {f"input/{k}": _stored(dtype, v) for k, v in args.items()}
    t["input/w_out"] = _stored(dtype, W)
    t["input/w_state"] = _stored(dtype, Wh)
    t["output/out"] = out
    t["output/last_state"] = last
    for k, g in grads.items():
        if g is not None:
            t[f"grad/input/{k}"] = g
    config = dict(batch=batch, seq_len=L, channels=ch, state=N, **{
        k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()})
    return t, config


# ---------------------------------------------------------------------------
# Model fixtures
# ---------------------------------------------------------------------------

def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _flatten_params(params: dict, dtype: str) -> dict:
    return {f"{layer}.{name}": _stored(dtype, arr)
            for layer, p in params.items() for name, arr in p.items()}


def s5_scan_fixture_tensors(seed: int, dtype: str):
    """The S5 SSM layer (ZOH, conjugate symmetry) with a carried state, and its gradients.

    Complex states are stored as ``_re``/``_im`` pairs; parameters in refssm's
    real layout (``B [P, H, 2]``, ``C [H, P, 2]``: last axis = real, imaginary).
    Loss: ``sum(w_out * out) + sum(w_state_re * Re(last) + w_state_im * Im(last))``.
    """
    from ..ssm import s5

    rng = np.random.default_rng(seed)
    batch, L, H, P = 2, 24, 5, 8
    params = _round_to(dtype, s5.init_s5_ssm(H, P, rng=rng))
    u = _round_to(dtype, rng.standard_normal((batch, L, H)))
    Ps = params["Lambda_re"].shape[0]
    h0 = (_round_to(dtype, rng.standard_normal((batch, Ps)))
          + 1j * _round_to(dtype, rng.standard_normal((batch, Ps))))
    W = _round_to(dtype, rng.standard_normal((batch, L, H)))
    Wr = _round_to(dtype, rng.standard_normal((batch, Ps)))
    Wi = _round_to(dtype, rng.standard_normal((batch, Ps)))
    y, last, saved = s5.s5_ssm_forward(params, u, initial_state=h0)
    g = s5.s5_ssm_backward(W, Wr + 1j * Wi, saved)
    t = {f"input/{k}": _stored(dtype, v) for k, v in params.items()}
    t.update({"input/u": _stored(dtype, u), "input/initial_state_re": _stored(dtype, h0.real),
              "input/initial_state_im": _stored(dtype, h0.imag), "input/w_out": _stored(dtype, W),
              "input/w_state_re": _stored(dtype, Wr), "input/w_state_im": _stored(dtype, Wi)})
    t["output/out"] = y
    t["output/last_state_re"] = last.real
    t["output/last_state_im"] = last.imag
    for k, v in g.items():
        if np.iscomplexobj(v):
            t[f"grad/input/{k}_re"], t[f"grad/input/{k}_im"] = v.real, v.imag
        else:
            t[f"grad/input/{k}"] = v
    return t, dict(batch=batch, seq_len=L, hidden_size=H, state_size=P, conj_sym=True,
                   discretization="zoh")


def gated_ema_fixture_tensors(seed: int, dtype: str, *, scan_mode: str = "causal"):
    """GatedSSM's gated core (gates + EMA), its last context and all gradients.

    Loss: ``sum(w_out * out)`` (+ ``sum(w_context * last_context)`` in causal mode).
    """
    from ..ssm.gated_ema import gated_ema_backward, gated_ema_forward

    rng = np.random.default_rng(seed)
    batch, L, E, N = 2, 24, 6, 4
    args = _round_to(dtype, dict(x=rng.standard_normal((batch, L, E)),
                                 delta=rng.uniform(0.2, 2.0, (batch, L, E)),
                                 B=0.5 * rng.standard_normal((batch, L, N)),
                                 C=0.5 * rng.standard_normal((batch, L, N))))
    causal = scan_mode == "causal"
    ctx0 = _round_to(dtype, rng.standard_normal((batch, E))) if causal else None
    W = _round_to(dtype, rng.standard_normal((batch, L, E)))
    Wc = _round_to(dtype, rng.standard_normal((batch, E))) if causal else None
    y, last, saved = gated_ema_forward(**args, scan_mode=scan_mode, initial_context=ctx0)
    g = gated_ema_backward(W, Wc, saved)
    t = {f"input/{k}": _stored(dtype, v) for k, v in args.items()}
    t["input/w_out"] = _stored(dtype, W)
    t["output/out"] = y
    if causal:
        t["input/initial_context"] = _stored(dtype, ctx0)
        t["input/w_context"] = _stored(dtype, Wc)
        t["output/last_context"] = last
    for k, v in g.items():
        if v is not None:
            t[f"grad/input/{k}"] = v
    return t, dict(batch=batch, seq_len=L, inner=E, state=N, alpha=0.9, scan_mode=scan_mode)


def _cache_tensors(cache) -> dict:
    """``cache/<field>`` for every array of a model's cache (a NamedTuple)."""
    out = {}
    for name, v in cache._asdict().items():
        if isinstance(v, np.ndarray):
            if np.iscomplexobj(v):
                out[f"cache/{name}_re"], out[f"cache/{name}_im"] = v.real, v.imag
            else:
                out[f"cache/{name}"] = v
    return out


def mamba_fixture_tensors(seed: int, dtype: str, *, preset: str, config: dict):
    """Mamba: see :func:`model_fixture_tensors`."""
    return model_fixture_tensors(seed, dtype, arch="mamba", preset=preset, config=config)


def model_fixture_tensors(seed: int, dtype: str, *, arch: str, preset: str, config: dict):
    """A model: input, parameters, last/sequence outputs, per-block hidden states, every
    step, the final cache, and (where the model has a manual backward) gradients."""
    import importlib

    mod = importlib.import_module(f"refssm.models.{arch}")
    cfg = mod.as_config(dict(config, preset=preset))
    rng = np.random.default_rng(seed)
    params = _round_to(dtype, mod.random_params(cfg, seed=seed))
    batch, L = 2, config.get("seq_len") or 12
    x = _round_to(dtype, rng.standard_normal((batch, L, cfg.embed_dim)))
    W = _round_to(dtype, rng.standard_normal((batch, L, cfg.hidden_size)))
    res = mod.forward(params, x, cfg, return_sequence=True)
    t = {"input/x": _stored(dtype, x), "input/w_out": _stored(dtype, W)}
    t.update(_flatten_params(params, dtype))
    t["output/sequence"] = res.output
    t["output/last"] = res.output[:, -1]
    for i, hs in enumerate(res.hidden_states):
        t[f"output/hidden_state_{i}"] = hs
    if getattr(cfg, "scan_mode", "causal") == "causal":     # GatedSSM legacy cannot step
        cache = mod.init_cache(cfg, batch)
        steps = []
        for k in range(L):
            y, cache = mod.step(params, cache, x[:, k], cfg)
            steps.append(y)
        t["step/output"] = np.stack(steps, axis=1)            # [batch, seq_len, hidden]
        t.update(_cache_tensors(cache))
    if hasattr(mod, "backward") and hasattr(mod, "forward_with_saved"):
        _, saved = mod.forward_with_saved(params, x, cfg, return_sequence=True)
        grads = mod.backward(W, saved)
        t["grad/input/x"] = grads.x
        for layer, p in grads.params.items():
            for name, g in p.items():
                t[f"grad/{layer}.{name}"] = g
    full_config = {f.name: _plain(getattr(cfg, f.name)) for f in cfg.__dataclass_fields__.values()}
    full_config["batch"] = batch
    full_config["seq_len"] = L
    return t, full_config


#: (name, arch, preset, maker, kwargs) of every fixture in the suite, per dtype.
SUITE = [
    ("core_discretization", "core", "-", discretization_fixture_tensors, {}),
    ("core_selective_scan_mamba_ssm", "core", "mamba_ssm", selective_scan_fixture_tensors,
     {"preset": "mamba_ssm"}),
    ("core_selective_scan_edifice", "core", "edifice", selective_scan_fixture_tensors,
     {"preset": "edifice"}),
]
SUITE.append(("core_s5_ssm", "core", "s5", s5_scan_fixture_tensors, {}))
for _mode in ("causal", "legacy"):
    SUITE.append((f"core_gated_ema_{_mode}", "core", _mode, gated_ema_fixture_tensors,
                  {"scan_mode": _mode}))

#: Two configs per architecture: a small one, and a wider/deeper one with other sizes.
_MODEL_CONFIGS = {
    "mamba": (("mamba_ssm", "edifice"),
              dict(embed_dim=5, hidden_size=8, state_size=4, expand_factor=2, conv_size=4,
                   num_layers=2, seq_len=12),
              dict(embed_dim=24, hidden_size=24, state_size=8, expand_factor=2, conv_size=3,
                   num_layers=3, seq_len=20)),
    "gated_ssm": (("causal", "edifice"),
                  dict(embed_dim=5, hidden_size=8, state_size=4, expand_factor=2, conv_size=4,
                       num_layers=2, seq_len=12),
                  dict(embed_dim=24, hidden_size=32, state_size=8, expand_factor=2, conv_size=3,
                       num_layers=3, seq_len=20)),
    "s5": (("s5", "edifice"),
           dict(embed_dim=5, hidden_size=8, state_size=4, num_layers=2, seq_len=12),
           dict(embed_dim=16, hidden_size=16, state_size=8, num_layers=3, seq_len=20)),
    "ss_transformer": (("mamba_ssm", "edifice"),
                       dict(embed_dim=5, hidden_size=8, state_size=4, num_layers=2, num_heads=2,
                            head_dim=4, expand_factor=2, conv_size=4, seq_len=12),
                       dict(embed_dim=16, hidden_size=16, state_size=4, num_layers=3,
                            num_heads=4, head_dim=3, expand_factor=2, conv_size=3, seq_len=20)),
}
for _arch, (_presets, _small, _wide) in _MODEL_CONFIGS.items():
    for _preset in _presets:
        for _size, _cfg in (("small", _small), ("wide", _wide)):
            SUITE.append((f"{_arch}_{_preset}_{_size}", _arch, _preset, model_fixture_tensors,
                          {"arch": _arch, "preset": _preset, "config": dict(_cfg, dropout=0.0)}))


def write_suite(out_dir, seed: int = 0, dtypes=("float64", "float32"), progress=sys.stderr,
                only=None):
    """Write every fixture of :data:`SUITE` under ``out_dir/<dtype>/<name>``; returns the paths."""
    paths = []
    for dtype in dtypes:
        for name, arch, preset, maker, kwargs in SUITE:
            if only and name not in only:
                continue
            if progress:
                print(f"  {dtype}/{name}", file=progress, flush=True)
            tensors, config = maker(seed, dtype, **kwargs)
            if name.startswith("core_selective"):
                loss = SCAN_LOSS
            elif name.startswith("core_s5"):
                loss = ("sum(input/w_out * output/out) + sum(input/w_state_re * "
                        "output/last_state_re + input/w_state_im * output/last_state_im)")
            elif name.startswith("core_gated_ema"):
                loss = "sum(input/w_out * output/out)" + (
                    " + sum(input/w_context * output/last_context)" if "causal" in name else "")
            else:
                loss = MODEL_LOSS if any(k.startswith("grad/") for k in tensors) else ""
            path = os.path.join(out_dir, dtype, name)
            write_fixture(path, arch=arch, preset=preset, config=config, seed=seed, dtype=dtype,
                          tensors=tensors, tolerances=TOLERANCES[dtype], loss=loss)
            paths.append(path)
    return paths
