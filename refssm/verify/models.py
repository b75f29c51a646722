"""Oracle checks of the four architectures, at their recommended defaults.

Every architecture module offers the same functions (``as_config``,
``recommended_defaults``, ``random_params``, ``forward``, ``init_cache``,
``step``, ``param_shapes``, ``param_count``, ``param_count_breakdown``,
``original_param_count``, ``build``); the checks here use only those, so an
architecture joins ``refssm verify`` by being listed in :data:`ARCHS`.

Checks (each returns :class:`~refssm.verify.core.Figure` values):

* parameter count: the exact formula against the scalars in the built tree
  (must be 0 apart), and the original API's approximate formula's gap,
  explained term by term (:func:`compare_count_terms` sets the exact breakdown
  beside the formula's own terms, :func:`count_differences` names every
  difference, :func:`explain_original_count` says it in a few lines);
* step vs full: stepping frame by frame against the full forward at *every
  prefix* (forward on ``x[:, :t+1]``), max normwise error;
* chunked vs one call: the sequence split in two with the carried state;
* scan engines inside the model (where the architecture has engines).

Inputs are the architectures' ``random_params`` (parameters with teeth: gates
unsaturated, ``delta`` inside any clip, slow decay) and a random ``x``.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

import numpy as np

from ..models._common import count_params
from .core import Figure, _fig
from .metrics import BUDGETS, normwise_error, reference_scale

__all__ = ["ARCHS", "available_archs", "model_checks", "explain_original_count",
           "compare_count_terms", "count_differences", "CountTerm", "CountDifference", "KINDS"]

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


# ---------------------------------------------------------------------------
# The original API's approximate param_count, term by term against the exact one
# ---------------------------------------------------------------------------

#: The kinds of difference, in the order the explanation lists them.
KINDS = ("miscounts", "adds", "leaves out")


class CountTerm(NamedTuple):
    """One row of :func:`compare_count_terms`.

    ``exact`` is the sum of the model's :func:`param_count_breakdown` entries
    the row covers, ``original`` the sum of the original formula's
    ``original_param_count_terms`` entries (None when the architecture has no
    original formula); ``note`` says in words what differs and why.
    """

    term: str
    exact: int
    original: Optional[int]
    note: str


class CountDifference(NamedTuple):
    """One named difference: ``amount`` scalars of ``exact - original`` in the row ``term``.

    ``kind`` is one of :data:`KINDS`: the formula *leaves out* parameters the
    model has (``amount > 0``), *adds* parameters the model does not have
    (``amount < 0``), or *miscounts* a layer it does count (a wrong shape;
    either sign). ``group`` gathers like differences in the explanation
    (``"biases"``, ``"norms"``, ...; empty for a difference standing alone).
    """

    term: str
    kind: str
    amount: int
    words: str
    group: str = ""


class _Row(NamedTuple):
    term: str
    exact_keys: tuple          # keys of param_count_breakdown
    original_keys: tuple       # keys of original_param_count_terms
    alike: str                 # what the formula counts right ("" if nothing)
    parts: tuple               # ((kind, amount, words, group), ...)


def _omit(amount, words, group=""):
    return ("leaves out", int(amount), words, group)


def _bias(amount, term):
    return _omit(amount, term, "biases")


def _norm(amount, term):
    return _omit(amount, term, "norms")


def _input_projection_row(c):
    H = c.hidden_size
    if c.embed_dim == H:
        return _Row("input_projection", ("input_projection",), ("input_projection",),
                    "none (embed_dim == hidden_size)", ())
    return _Row("input_projection", ("input_projection",), ("input_projection",),
                "kernel embed x H counted alike", (_bias(H, "input_projection"),))


def _mamba_rows(c):
    """Edifice ``Common.param_count/1`` against :mod:`refssm.models.mamba`'s exact count."""
    H, E, N, L = c.hidden_size, c.inner_size, c.state_size, c.num_layers
    R, R0 = c.dt_rank_size, max(H // 16, 1)
    how = {"ceil": "ceil(H/16)", "floor": "max(H div 16, 1)"}.get(c.dt_rank, "set")
    rank = f"dt_rank R = {R} ({how}), the formula's max(H div 16, 1) = {R0}"
    rms = c.norm == "rms"
    norm = "RMSNorm gamma" if rms else "LayerNorm gamma+beta"
    rows = [_input_projection_row(c)]
    rows.append(_Row("norm", ("norm",), (), "",
                     (_norm(L * (H if rms else 2 * H), f"per-block {norm}"),)))
    rows.append(_Row("in_proj", ("in_proj",), ("in_proj",), "kernel H x 2E counted alike",
                     (_bias(L * 2 * E, "in_proj"),) if c.proj_bias else ()))
    rows.append(_Row("conv", ("conv",), ("conv",), "depthwise kernel K x E counted alike",
                     (_bias(L * E, "conv"),) if c.conv_bias else ()))
    parts = []
    if c.x_proj == "fused":
        alike = ("one fused x_proj E x (R + 2N), no bias, counted as Edifice's split bc_proj "
                 "E x 2N + dt_rank E x R'")
    else:
        alike = "bc_proj E x 2N and dt_rank E x R kernels counted alike"
        parts += [_bias(L * 2 * N, "bc_proj"), _bias(L * R, "dt_rank")]
    if R != R0:
        parts.append(("miscounts", L * E * (R - R0), "x_proj", rank))
    rows.append(_Row("x_proj", ("x_proj",), ("bc_proj", "dt_rank"), alike, tuple(parts)))
    parts = [_bias(L * E, "dt_proj")]
    if R != R0:
        parts.append(("miscounts", L * (R - R0) * E, "dt_proj", rank))
    rows.append(_Row("dt_proj", ("dt_proj",), ("dt_proj",), "kernel R x E counted alike",
                     tuple(parts)))
    if c.a_param == "learned":
        rows.append(_Row("A_log", ("A_log",), (), "",
                         (_omit(L * E * N, "A_log (E x N/layer)"),)))
    if c.d_skip:
        rows.append(_Row("D", ("D",), (), "", (_omit(L * E, "D (E/layer)"),)))
    rows.append(_Row("out_proj", ("out_proj",), ("out_proj",), "kernel E x H counted alike",
                     (_bias(L * H, "out_proj"),) if c.proj_bias else ()))
    if c.final_norm:
        rows.append(_Row("final_norm", ("final_norm",), (), "",
                         (_norm(H if rms else 2 * H, "final_norm"),)))
    return rows


def _gated_ssm_rows(c):
    """Edifice ``GatedSSM.param_count/1`` against :mod:`refssm.models.gated_ssm`'s exact count."""
    H, E, N, K, L = c.hidden_size, c.inner_size, c.state_size, c.conv_size, c.num_layers
    R = c.dt_rank_size
    taps = "a literal 4" if K == 4 else f"a literal 4, though conv_size = {K}"
    conv = (f"conv counted as 4E/layer, {L * 4 * E:,} in all (\"conv (simplified)\": 4 taps "
            f"per channel, {taps}), but the model's conv is a parameter-free window mean, then a "
            f"dense conv_proj E x E/layer, {L * E * E:,} in all (its bias below)")
    return [
        _input_projection_row(c),
        _Row("norm", ("norm",), (), "", (_norm(L * 2 * H, "per-block LayerNorm gamma+beta"),)),
        _Row("in_proj", ("in_proj",), ("in_proj",), "kernel H x 2E counted alike",
             (_bias(L * 2 * E, "in_proj"),)),
        _Row("conv_proj", ("conv_proj",), ("conv",), "",
             (("miscounts", L * (E * E - 4 * E), conv, ""), _bias(L * E, "conv_proj"))),
        _Row("bc_proj", ("bc_proj",), ("bc_proj",), "kernel E x 2N counted alike",
             (_bias(L * 2 * N, "bc_proj"),)),
        _Row("dt_rank", ("dt_rank",), ("dt_rank",), f"kernel E x R (R = H div N = {R}) "
             "counted alike", (_bias(L * R, "dt_rank"),)),
        _Row("dt_proj", ("dt_proj",), ("dt_proj",), "kernel R x E counted alike",
             (_bias(L * E, "dt_proj"),)),
        _Row("out_proj", ("out_proj",), ("out_proj",), "kernel E x H counted alike",
             (_bias(L * H, "out_proj"),)),
    ]


def _s5_rows(c):
    """Edifice ``S5.param_count/1`` against :mod:`refssm.models.s5`'s exact count."""
    H, N, L, F = c.hidden_size, c.state_size, c.num_layers, c.ffn_inner
    rows = [
        _input_projection_row(c),
        _Row("encoder", (), ("encoder",), "",
             (("adds", -L * H * N, "encoder H x N/layer, a layer the model does not have "
               "(Edifice's S5 build dropped it; its formula still counts it)", ""),)),
        _Row("ssm_norm", ("ssm_norm",), (), "", (_norm(L * 2 * H, "ssm_norm"),)),
    ]
    if c.ssm == "edifice":
        rows.append(_Row("ssm", ("ssm",), ("bc_proj", "d_proj"),
                         "b_proj, c_proj H x N and d_proj H x H kernels counted alike",
                         (_bias(L * (2 * N + H), "ssm b_proj+c_proj+d_proj"),)))
    else:
        Ps = c.ssm_states
        n_C = 2 if c.bidirectional else 1
        parts = []
        bc = L * (2 * Ps * H + n_C * 2 * H * Ps - 2 * H * N)
        if bc:
            parts.append(("miscounts", bc,
                          f"the paper's B~ (P x H complex) and C~ (H x P complex"
                          f"{', C1 and C2' if n_C == 2 else ''}) with P = {Ps} stored states, "
                          f"counted as b_proj, c_proj H x N/layer", ""))
        same = "" if bc else " (its B~, C~, P = N/2 complex, have the size of b_proj, c_proj)"
        parts.append(("miscounts", L * (H - H * H),
                      "D, a vector (H/layer) in the paper's SSM, counted as Edifice's dense "
                      f"d_proj H x H/layer{same}", ""))
        parts.append(_omit(L * 3 * Ps, f"Lambda (P complex) and log_step (P) per layer, P = {Ps}"))
        alike = ("the formula counts Edifice's input-projected SSM, not the paper's" +
                 ("; B~, C~ (P = N/2 complex) have the size of b_proj, c_proj" if not bc else ""))
        rows.append(_Row("ssm", ("ssm",), ("bc_proj", "d_proj"), alike, tuple(parts)))
    rows.append(_Row("ffn_norm", ("ffn_norm",), (), "", (_norm(L * 2 * H, "ffn_norm"),)))
    parts = [_bias(L * (2 * F + H), "ffn gate+up+down")]
    if F != 4 * H:
        parts.append(("miscounts", L * 3 * H * (F - 4 * H),
                      f"SwiGLU inner size ffn_expand x H = {F}, the formula's fixed 4H = "
                      f"{4 * H}", ""))
    rows.append(_Row("ffn", ("ffn",), ("ffn_gate_up", "ffn_down"),
                     "SwiGLU gate, up H x F and down F x H kernels counted alike"
                     if F == 4 * H else "", tuple(parts)))
    rows.append(_Row("final_norm", ("final_norm",), (), "", (_norm(2 * H, "final_norm"),)))
    return rows


#: The term-by-term explainers, by model module (its last name). An architecture
#: without one is explained generically: terms matched by name.
_EXPLAINERS = {"mamba": _mamba_rows, "gated_ssm": _gated_ssm_rows, "s5": _s5_rows}


def _generic_rows(exact_terms, original_terms):
    rows = []
    for key in dict.fromkeys([*exact_terms, *original_terms]):
        ex, orig = exact_terms.get(key, 0), original_terms.get(key, 0)
        ek = (key,) if key in exact_terms else ()
        ok = (key,) if key in original_terms else ()
        if key not in original_terms:
            parts = (_omit(ex, key),)
        elif key not in exact_terms:
            parts = (("adds", -orig, f"{key}: not in the model", ""),)
        elif ex != orig:
            parts = (("miscounts", ex - orig, f"{key}: counted as {orig:,}", ""),)
        else:
            parts = ()
        rows.append(_Row(key, ek, ok, "counted alike" if ok and ex == orig else "", parts))
    return rows


def _count_rows(mod, config):
    """``[(CountTerm, [CountDifference], original keys)]``, or None without an original formula.

    The exact and original columns are read from the module's own
    ``param_count_breakdown`` and ``original_param_count_terms``; the differences
    are derived independently from the config, so a difference that does not
    add up is reported as ``"unexplained"`` (the tests keep that from happening).
    """
    c = mod.as_config(config)
    exact_terms = mod.param_count_breakdown(c)
    original_terms = _original_terms(mod, c)
    if original_terms is None:
        return None
    name = mod.__name__.rsplit(".", 1)[-1]
    explainer = _EXPLAINERS.get(name)
    rows = explainer(c) if explainer else _generic_rows(exact_terms, original_terms)
    # every term of both sides is in exactly one row; any left over stands alone
    used_e = [k for r in rows for k in r.exact_keys]
    used_o = [k for r in rows for k in r.original_keys]
    rest = _generic_rows({k: v for k, v in exact_terms.items() if k not in used_e},
                         {k: v for k, v in original_terms.items() if k not in used_o})
    out = []
    for r in rows + rest:
        ex = sum(exact_terms[k] for k in r.exact_keys)
        orig = sum(original_terms[k] for k in r.original_keys)
        diffs = [CountDifference(r.term, kind, amount, words, group)
                 for kind, amount, words, group in r.parts if amount]
        left = (ex - orig) - sum(d.amount for d in diffs)
        if left:
            diffs.append(CountDifference(r.term, "miscounts", left,
                                         f"{r.term}: unexplained difference", ""))
        if not (ex or orig or diffs):
            continue
        notes = [r.alike] if r.alike else []
        for d in diffs:
            what = {"biases": f"{d.words} bias", "norms": d.words}.get(d.group, d.words)
            if d.group not in ("", "biases", "norms"):
                what = f"{d.group} ({d.words})"
            notes.append(f"{d.kind} {what} ({d.amount:+,})")
        row = CountTerm(r.term, int(ex), int(orig), "; ".join(notes) or "counted alike")
        out.append((row, diffs, r.original_keys))
    return out


def _original_terms(mod, c):
    terms_fn = getattr(mod, "original_param_count_terms", None)
    if terms_fn is not None:
        return terms_fn(c)
    total = mod.original_param_count(c)
    return None if total is None else {"original_param_count": total}


def compare_count_terms(mod, config) -> list:
    """The exact breakdown beside the original API's formula, term by term.

    Returns ``[CountTerm(term, exact, original, note)]`` (plain 4-tuples too):
    one row per exact term of ``mod.param_count_breakdown`` (several original
    terms may fall in one row, e.g. Mamba's fused ``x_proj`` against Edifice's
    ``bc_proj`` + ``dt_rank``), plus rows for what only the formula counts (S5's
    ``encoder``). ``exact`` sums to ``mod.param_count(config)``, ``original`` to
    ``mod.original_param_count(config)``, and ``note`` names every difference
    (:func:`count_differences` has them one by one). Without an original
    formula (SSTransformer) every row has ``original=None``.

    Examples
    --------
    >>> from refssm.models import gated_ssm
    >>> row = {r.term: r for r in compare_count_terms(gated_ssm, dict(embed_dim=287))}["conv_proj"]
    >>> row.exact, row.original
    (525312, 4096)
    """
    rows = _count_rows(mod, config)
    if rows is None:
        c = mod.as_config(config)
        note = "no original formula to compare (the original API has no param_count)"
        return [CountTerm(k, int(v), None, note) for k, v in mod.param_count_breakdown(c).items()
                if v]
    return [row for row, _, _ in rows]


def count_differences(mod, config) -> list:
    """Every named difference between the exact count and the original formula.

    ``[CountDifference(term, kind, amount, words, group)]``; the amounts sum
    to ``param_count - original_param_count`` exactly (empty without an
    original formula).
    """
    rows = _count_rows(mod, config)
    return [] if rows is None else [d for _, diffs, _ in rows for d in diffs]


def _fmt_parts(diffs, signed):
    """``"biases 4,960 (in_proj 2,048, ...); A_log (...): 16,384"``: groups gathered in place."""
    fmt = (lambda n: f"{n:+,}") if signed else (lambda n: f"{abs(n):,}")
    items, groups = [], {}
    for d in diffs:
        if not d.group:
            items.append(d)
        elif d.group in groups:
            groups[d.group].append(d)
        else:
            groups[d.group] = [d]
            items.append(d.group)
    text = []
    for item in items:
        if isinstance(item, str):
            members = groups[item]
            inner = ", ".join(f"{d.words} {fmt(d.amount)}" for d in members)
            if len(items) == 1:             # the kind's total, on the line already
                text.append(f"{item} ({inner})")
            else:
                sep = " " if item in ("biases", "norms") else ": "
                text.append(f"{item}{sep}{fmt(sum(d.amount for d in members))} ({inner})")
        elif len(items) == 1:               # the kind's total, on the line already
            text.append(item.words)
        else:
            text.append(f"{item.words}: {fmt(item.amount)}")
    return "; ".join(text)


def explain_original_count(mod, config) -> str:
    """The original API's formula against the exact count, term by term, in words.

    A few lines: the totals and the gap; then the differences by kind
    (``miscounts``, ``adds``, ``leaves out``; biases and norms gathered), each
    with its size, together accounting for the whole gap; then the terms the
    formula counts alike. Without an original formula, one line saying so.

    Examples
    --------
    >>> from refssm.models import mamba
    >>> text = explain_original_count(mamba, dict(embed_dim=287, preset="edifice"))
    >>> print(text.splitlines()[0])
    exact 935,520 vs original formula 929,536: gap +5,984 (+0.6% of exact)
    >>> "leaves out +5,984: biases 4,960 (input_projection 256, in_proj 2,048," in text
    True
    >>> "norms 1,024 (per-block LayerNorm gamma+beta 1,024)" in text
    True
    """
    c = mod.as_config(config)
    exact = mod.param_count(c)
    rows = _count_rows(mod, c)
    if rows is None:
        return (f"exact {exact:,}; no original formula to compare (the original API has no "
                f"param_count for this architecture)")
    approx = mod.original_param_count(c)
    gap = exact - approx
    lines = [f"exact {exact:,} vs original formula {approx:,}: gap {gap:+,} "
             f"({gap / exact:+.1%} of exact)"]
    diffs = [d for _, ds, _ in rows for d in ds]
    for kind in KINDS:
        ds = [d for d in diffs if d.kind == kind]
        if ds:
            total = sum(d.amount for d in ds)
            lines.append(f"{kind} {total:+,}: {_fmt_parts(ds, signed=kind == 'miscounts')}")
    alike = [row.term if tuple(keys) in ((row.term,), ()) else
             f"{row.term} (as {' + '.join(keys)})"
             for row, ds, keys in rows
             if row.original and all(d.kind == "leaves out" for d in ds)]
    if alike:
        lines.append(f"counted alike: {', '.join(alike)} (kernels)")
    return "\n".join(lines)


def _check_counts(arch, mod, preset, c):
    model = mod.build(c, seed=0)
    tree = count_params(model.params)
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
             BUDGETS["step_vs_full"], f"{SEQ_LEN} steps, batch {batch}, each against the full "
             f"forward at its t, and a separate forward of the prefixes {sorted(prefixes)}"),
        _fig(arch, preset, "chunked (carried state) vs one call", chunk, BUDGETS["scan"],
             f"split at {split} of {SEQ_LEN}"),
    ]


def _engine_free(c) -> bool:
    """True when the config computes no scan an engine could change: the SSTransformer's
    ``ssm_path='ema'`` (its ``edifice`` preset) is NumPy only and ignores ``engine``, so an
    engine-vs-numpy row would compare the same code with itself (0.00e+00, vacuous)."""
    return getattr(c, "ssm_path", None) == "ema"


def _other_engines(run):
    """``(engine, run(engine))`` for each scan engine besides NumPy the architecture offers."""
    for engine in ("numba", "logdepth", "fft"):
        try:
            result = run(engine)
        except ValueError as exc:   # an architecture may not offer every engine
            if str(exc).startswith("engine: expected one of"):
                continue                # any other refusal (a growing FFT kernel) is a failure
            raise
        yield engine, result


def _check_engines(arch, mod, preset, c, rng):
    import inspect

    if "engine" not in inspect.signature(mod.forward).parameters or _engine_free(c):
        return []
    params = mod.random_params(c, seed=2)
    x = rng.standard_normal((2, SEQ_LEN, c.embed_dim))
    ref = mod.forward(params, x, c, return_sequence=True, engine="numpy").output
    figs = []
    for engine, res in _other_engines(
            lambda e: mod.forward(params, x, c, return_sequence=True, engine=e)):
        out = res.output
        figs.append(_fig(arch, preset, f"model forward: {engine} engine vs numpy",
                         normwise_error(out, ref), BUDGETS["scan"], "whole sequence"))
    return figs


def _check_backward(arch, mod, preset, c, rng):
    """The whole-model manual backward vs central finite differences along random directions.

    Loss ``<W, output>`` over the whole sequence. Two unit directions: one in
    the input, one over the whole parameter tree at once; relative error
    ``|<grad, V> - fd| / |fd|`` with step ``1e-4`` along the unit direction
    (truncation and round-off both near 1e-9 here). Also every other scan
    engine's backward against the NumPy engine's (normwise).
    """
    if not (hasattr(mod, "forward_with_saved") and hasattr(mod, "backward")):
        return []
    params = mod.random_params(c, seed=3)
    x = rng.standard_normal((2, SEQ_LEN, c.embed_dim))
    res, saved = mod.forward_with_saved(params, x, c, return_sequence=True)
    W = rng.standard_normal(res.output.shape)
    g = mod.backward(W, saved)

    def loss(p, x_):
        return float(np.sum(W * mod.forward(p, x_, c, return_sequence=True).output))

    eps = 1e-4
    Vx = rng.standard_normal(x.shape)
    Vx /= np.linalg.norm(Vx)
    Vp = {layer: {k: rng.standard_normal(np.shape(v)) for k, v in p.items()}
          for layer, p in params.items()}
    norm = np.sqrt(sum(float(np.sum(v * v)) for p in Vp.values() for v in p.values()))
    Vp = {layer: {k: v / norm for k, v in p.items()} for layer, p in Vp.items()}

    def shifted(s):
        return {layer: {k: v + s * Vp[layer][k] for k, v in p.items()}
                for layer, p in params.items()}

    pairs = [(float(np.sum(g.x * Vx)),
              (loss(params, x + eps * Vx) - loss(params, x - eps * Vx)) / (2 * eps)),
             (sum(float(np.sum(g.params[layer][k] * Vp[layer][k]))
                  for layer in params for k in params[layer]),
              (loss(shifted(eps), x) - loss(shifted(-eps), x)) / (2 * eps))]
    worst = max(abs(an - fd) / max(abs(fd), 1e-300) for an, fd in pairs)
    figs = [_fig(arch, preset, "model backward vs finite differences", worst,
                 BUDGETS["grad_fd"], f"<W, output>; one unit direction in x, one over all "
                 f"parameters; relative; seq_len {SEQ_LEN}")]
    for engine, (_, s_e) in ([] if _engine_free(c) else _other_engines(
            lambda e: mod.forward_with_saved(params, x, c, return_sequence=True, engine=e))):
        g_e = mod.backward(W, s_e)
        pairs = [(g_e.x, g.x)] + [(g_e.params[layer][k], g.params[layer][k])
                                  for layer in params for k in params[layer]]
        # normwise per array, structural zeros against the tree's largest gradient
        scale = max(float(np.max(np.abs(b))) for _, b in pairs)
        err = max(float(np.max(np.abs(a - b))) / reference_scale(b, scale) for a, b in pairs)
        figs.append(_fig(arch, preset, f"model backward: {engine} engine vs numpy", err,
                         BUDGETS["scan"], "dx and every parameter gradient, worst (normwise "
                         "per array; structural zeros against the largest gradient)"))
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
                figs += _check_backward(arch, mod, preset, c, rng)
            return figs
        check.__name__ = f"check_{arch}"
        checks.append(check)
    return checks
