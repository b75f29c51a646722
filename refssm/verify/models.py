"""Oracle checks of the four architectures, at their recommended defaults.

Every architecture module offers the same functions (``as_config``,
``recommended_defaults``, ``random_params``, ``forward``, ``init_cache``,
``step``, ``param_shapes``, ``param_count``, ``param_count_breakdown``,
``original_param_count``, ``build``); the checks here use only those, so an
architecture joins ``refssm verify`` by being listed in :data:`ARCHS`.

Checks (each returns :class:`~refssm.verify.core.Figure` values):

* parameter count: the exact formula against the scalars in the built tree
  (must be 0 apart), and the original API's approximate formula's gap,
  explained term by term (:func:`explain_original_count`);
* step vs full: stepping frame by frame against the full forward at *every
  prefix* (forward on ``x[:, :t+1]``), max normwise error;
* chunked vs one call: the sequence split in two with the carried state;
* scan engines inside the model (where the architecture has engines).

Inputs are the architectures' ``random_params`` (parameters with teeth: gates
unsaturated, ``delta`` inside any clip, slow decay) and a random ``x``.
"""
from __future__ import annotations

import importlib

import numpy as np

from .core import Figure, _fig
from .metrics import BUDGETS, normwise_error

__all__ = ["ARCHS", "available_archs", "model_checks", "explain_original_count"]

#: (arch name, module, presets) in the order of the report. Missing modules are skipped.
ARCHS = (
    ("mamba", "refssm.models.mamba", ("mamba_ssm", "edifice")),
    ("gated_ssm", "refssm.models.gated_ssm", ("default", "edifice")),
    ("s5", "refssm.models.s5", ("paper", "edifice")),
    ("ss_transformer", "refssm.models.ss_transformer", ("default", "edifice")),
)

EMBED_DIM = 287      # the seeds' example embed_dim
SEQ_LEN = 60         # recommended_defaults' window_size: one second at 60 fps


def available_archs():
    """``[(arch, module, presets)]`` for the architectures whose module imports."""
    out = []
    for arch, modname, presets in ARCHS:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        valid = getattr(mod, "PRESETS", None)
        if valid is not None:
            presets = tuple(p for p in valid)
        out.append((arch, mod, presets))
    return out


def _config(mod, preset, **extra):
    opts = dict(mod.recommended_defaults(), embed_dim=EMBED_DIM, **extra)
    opts["dropout"] = opts.get("dropout", 0.0)   # inference: dropout is off unless training
    return mod.as_config(dict(opts, preset=preset))


def explain_original_count(mod, config) -> str:
    """The original API's formula against the exact count, term by term.

    Returns a one-line explanation: the exact total, the approximate total,
    and the exact terms the formula leaves out or miscounts.
    """
    exact = mod.param_count(config)
    approx = mod.original_param_count(config)
    terms = mod.param_count_breakdown(config)
    parts = ", ".join(f"{k} {v}" for k, v in terms.items() if v)
    return f"exact {exact} = {parts}; original formula {approx} (gap {exact - approx:+d})"


def _check_counts(arch, mod, preset, c):
    model = mod.build(c, seed=0)
    tree = sum(int(np.asarray(a).size) for p in model.params.values() for a in p.values())
    exact = mod.param_count(c)
    approx = mod.original_param_count(c)
    if approx is None:
        return [_fig(arch, preset, "param_count: exact formula - counted tree", abs(exact - tree),
                     0, f"{exact} = {tree} scalars")]
    return [
        _fig(arch, preset, "param_count: exact formula - counted tree", abs(exact - tree), 0,
             f"{exact} = {tree} scalars"),
        Figure(arch, preset, "param_count: original formula's relative gap",
               abs(exact - approx) / exact, float("inf"), True,
               explain_original_count(mod, c)),
    ]


def _check_step_vs_full(arch, mod, preset, c, rng):
    params = mod.random_params(c, seed=1)
    batch = 2
    x = rng.standard_normal((batch, SEQ_LEN, c.embed_dim))
    full = mod.forward(params, x, c, return_sequence=True).output
    cache = mod.init_cache(c, batch)
    worst_seq = 0.0
    worst_prefix = 0.0
    # Every prefix through the full forward's output at t; plus separate forwards on
    # a few prefixes (length 1, inside the conv window, half, all), which pin causality.
    prefixes = {1, 3, SEQ_LEN // 2, SEQ_LEN}
    for t in range(SEQ_LEN):
        y, cache = mod.step(params, cache, x[:, t], c)
        worst_seq = max(worst_seq, normwise_error(y, full[:, t]))
        if t + 1 in prefixes:
            prefix = mod.forward(params, x[:, :t + 1], c).output          # last timestep
            worst_prefix = max(worst_prefix, normwise_error(y, prefix))
    split = SEQ_LEN // 3
    first = mod.forward(params, x[:, :split], c, return_sequence=True)
    second = mod.forward(params, x[:, split:], c, state=first.state, return_sequence=True)
    chunk = normwise_error(np.concatenate([first.output, second.output], axis=1), full)
    return [
        _fig(arch, preset, "step vs full: every prefix", max(worst_seq, worst_prefix),
             BUDGETS["step_vs_full"], f"{SEQ_LEN} steps, batch {batch}, forward on each prefix"),
        _fig(arch, preset, "chunked (carried state) vs one call", chunk, BUDGETS["scan"],
             f"split at {split} of {SEQ_LEN}"),
    ]


def _check_engines(arch, mod, preset, c, rng):
    import inspect

    if "engine" not in inspect.signature(mod.forward).parameters:
        return []
    params = mod.random_params(c, seed=2)
    x = rng.standard_normal((2, SEQ_LEN, c.embed_dim))
    ref = mod.forward(params, x, c, return_sequence=True, engine="numpy").output
    figs = []
    for engine in ("numba", "logdepth"):
        try:
            out = mod.forward(params, x, c, return_sequence=True, engine=engine).output
        except ValueError as exc:   # an architecture may not offer every engine
            if "engine" in str(exc):
                continue
            raise
        figs.append(_fig(arch, preset, f"model forward: {engine} engine vs numpy",
                         normwise_error(out, ref), BUDGETS["scan"], "whole sequence"))
    return figs


def model_checks(seed: int = 0):
    """One check function per available architecture, for :func:`run_checks`."""
    checks = []
    for arch, mod, presets in available_archs():
        def check(arch=arch, mod=mod, presets=presets):
            rng = np.random.default_rng(seed)
            figs = []
            for preset in presets:
                c = _config(mod, preset)
                figs += _check_counts(arch, mod, preset, c)
                if getattr(c, "scan_mode", "causal") == "causal":
                    figs += _check_step_vs_full(arch, mod, preset, c, rng)
                figs += _check_engines(arch, mod, preset, c, rng)
            return figs
        check.__name__ = f"check_{arch}"
        checks.append(check)
    return checks
