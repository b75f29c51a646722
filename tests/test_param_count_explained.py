"""The original API's approximate ``param_count`` formulas, explained term by term.

For every architecture and preset (recommended defaults, embed_dim 287, as
``refssm verify`` runs them) and for random configs: the formula's own terms
sum to ``original_param_count``, the exact terms to ``param_count``, and the
named differences account for the whole gap exactly; plus pinned facts read
off Edifice's code (``lib/edifice/ssm/common.ex``, ``gated_ssm.ex``, ``s5.ex``).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refssm.models import gated_ssm as G
from refssm.models import mamba as M
from refssm.models import s5 as S5
from refssm.models import ss_transformer as SST
from refssm.verify.core import Figure
from refssm.verify.models import (
    KINDS,
    _check_counts,
    _config,
    available_archs,
    compare_count_terms,
    count_differences,
    explain_original_count,
)
from refssm.verify.report import format_markdown, format_table

CASES = [(arch, mod, preset) for arch, mod, presets in available_archs() for preset in presets]
IDS = [f"{arch}/{preset}" for arch, _, preset in CASES]


def check_accounting(mod, c):
    """The invariants, for any architecture with an original formula."""
    terms = mod.original_param_count_terms(c)
    assert all(isinstance(v, int) and v >= 0 for v in terms.values())
    assert sum(terms.values()) == mod.original_param_count(c)
    assert sum(mod.param_count_breakdown(c).values()) == mod.param_count(c)
    gap = mod.param_count(c) - mod.original_param_count(c)
    rows = compare_count_terms(mod, c)
    assert sum(r.exact for r in rows) == mod.param_count(c)
    assert sum(r.original for r in rows) == mod.original_param_count(c)
    assert sum(r.exact - r.original for r in rows) == gap
    diffs = count_differences(mod, c)
    assert sum(d.amount for d in diffs) == gap                  # the whole gap, named
    assert not [d for d in diffs if "unexplained" in d.words], diffs
    for r in rows:                                               # ... and row by row
        assert sum(d.amount for d in diffs if d.term == r.term) == r.exact - r.original, r
        assert r.note
    for d in diffs:
        assert d.kind in KINDS and d.amount != 0 and d.words
        if d.kind == "leaves out":
            assert d.amount > 0
        if d.kind == "adds":
            assert d.amount < 0
    # every original term lands in some row; rows with a difference say why
    text = explain_original_count(mod, c)
    for kind in KINDS:
        total = sum(d.amount for d in diffs if d.kind == kind)
        assert (f"{kind} {total:+,}:" in text) == any(d.kind == kind for d in diffs)
    assert f"gap {gap:+,}" in text
    return rows, diffs, text


# --------------------------------------------------------------------------
# Every architecture and preset at the recommended defaults (embed_dim 287)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("arch,mod,preset", CASES, ids=IDS)
def test_defaults_terms_sum_and_gap_is_named(arch, mod, preset):
    c = _config(mod, preset)
    assert c.embed_dim == 287
    if mod.original_param_count(c) is None:
        assert mod.original_param_count_terms(c) is None
        rows = compare_count_terms(mod, c)
        assert sum(r.exact for r in rows) == mod.param_count(c)
        assert all(r.original is None for r in rows)
        assert count_differences(mod, c) == []
        assert "no original formula" in explain_original_count(mod, c)
        return
    rows, diffs, text = check_accounting(mod, c)
    assert 2 <= len(text.splitlines()) <= 5                     # a few lines


@pytest.mark.parametrize("arch,mod,preset", CASES, ids=IDS)
def test_verify_figure_carries_the_explanation(arch, mod, preset):
    c = _config(mod, preset)
    figs = _check_counts(arch, mod, preset, c)
    assert figs[0].value == 0 and figs[0].ok
    if mod.original_param_count(c) is None:
        assert len(figs) == 1
        return
    fig = figs[1]
    assert fig.budget == float("inf") and fig.ok
    assert fig.detail == explain_original_count(mod, c)
    gap = mod.param_count(c) - mod.original_param_count(c)
    assert fig.value == pytest.approx(abs(gap) / mod.param_count(c))


def test_table_and_markdown_print_multiline_explanations():
    c = _config(G, "causal")
    fig = Figure("gated_ssm", "causal", "param_count: original formula's relative gap", 0.36,
                 float("inf"), True, explain_original_count(G, c))
    table = format_table([fig])
    tail = table.split("against the exact count:\n", 1)[1].splitlines()
    assert tail[0].startswith("  gated_ssm/causal: exact 1,455,712 vs original formula 929,536")
    assert all(line.startswith("    ") for line in tail[1:]) and len(tail) >= 3
    assert all(len(line) <= 110 for line in tail[1:])
    joined = " ".join(line.strip() for line in tail)
    assert "miscounts +520,192" in joined and "leaves out +5,984" in joined
    md = format_markdown([fig])
    row = [line for line in md.splitlines() if line.startswith("| gated_ssm")]
    assert len(row) == 1 and "<br>" in row[0]                  # one table row, still


# --------------------------------------------------------------------------
# Random configs
# --------------------------------------------------------------------------
sizes = dict(embed_dim=st.integers(1, 40), hidden_size=st.integers(1, 48),
             expand_factor=st.integers(1, 3), num_layers=st.integers(1, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sz=st.fixed_dictionaries(sizes), state=st.integers(1, 12), conv=st.integers(1, 6),
       preset=st.sampled_from(tuple(M.PRESETS)),
       flags=st.fixed_dictionaries({}, optional=dict(
           norm=st.sampled_from(["rms", "layer"]), final_norm=st.booleans(),
           a_param=st.sampled_from(["learned", "fixed"]), d_skip=st.booleans(),
           x_proj=st.sampled_from(["fused", "split"]),
           dt_rank=st.one_of(st.sampled_from(["ceil", "floor"]), st.integers(1, 5)),
           proj_bias=st.booleans(), conv_bias=st.booleans())))
def test_mamba_random_configs(sz, state, conv, preset, flags):
    c = M.MambaConfig(**sz, state_size=state, conv_size=conv, preset=preset, **flags)
    check_accounting(M, c)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sz=st.fixed_dictionaries(sizes), state=st.integers(1, 8), extra=st.integers(0, 30),
       conv=st.integers(1, 6), preset=st.sampled_from(tuple(G.PRESETS)))
def test_gated_ssm_random_configs(sz, state, extra, conv, preset):
    sz = dict(sz, hidden_size=state + extra)                   # dt_rank = H div N >= 1
    c = G.GatedSSMConfig(**sz, state_size=state, conv_size=conv, preset=preset)
    check_accounting(G, c)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sz=st.fixed_dictionaries(sizes), half=st.integers(1, 6), preset=st.sampled_from(
    tuple(S5.PRESETS)), conj_sym=st.booleans(), bidirectional=st.booleans(),
       ffn_expand=st.integers(1, 5))
def test_s5_random_configs(sz, half, preset, conj_sym, bidirectional, ffn_expand):
    sz = {k: v for k, v in sz.items() if k != "expand_factor"}
    c = S5.S5Config(**sz, state_size=2 * half, preset=preset, conj_sym=conj_sym,
                    bidirectional=bidirectional and preset == "s5", ffn_expand=ffn_expand)
    check_accounting(S5, c)


# --------------------------------------------------------------------------
# Pinned facts (Edifice's formulas as read off its code)
# --------------------------------------------------------------------------
def _rows(mod, c):
    return {r.term: r for r in compare_count_terms(mod, c)}


def _diffs(mod, c):
    return count_differences(mod, c)


def test_mamba_formula_terms_and_what_it_omits():
    c = M.MambaConfig(embed_dim=287)                           # mamba_ssm preset
    H, E, N, K, L, R = 256, 512, 16, 4, 2, 16
    assert M.original_param_count_terms(c) == {
        "input_projection": 287 * H, "in_proj": L * 2 * H * E, "conv": L * K * E,
        "bc_proj": L * 2 * E * N, "dt_rank": L * E * R, "dt_proj": L * R * E,
        "out_proj": L * E * H}
    rows = _rows(M, c)
    # omitted entirely: norms, final norm, A_log, D
    for term, exact in [("norm", L * H), ("final_norm", H), ("A_log", L * E * N), ("D", L * E)]:
        assert (rows[term].exact, rows[term].original) == (exact, 0), term
    # omitted biases: the input projection's and the conv's and dt_proj's
    assert rows["input_projection"].exact - rows["input_projection"].original == H
    assert rows["conv"].exact - rows["conv"].original == L * E
    assert rows["dt_proj"].exact - rows["dt_proj"].original == L * E
    # the fused x_proj E x (R + 2N) is the size of Edifice's bc_proj + dt_rank kernels
    assert rows["x_proj"].exact == rows["x_proj"].original == L * E * (R + 2 * N)
    kinds = {d.kind for d in _diffs(M, c)}
    assert kinds == {"leaves out"}
    words = " ".join(d.words for d in _diffs(M, c))
    for name in ("A_log", "D", "final_norm", "RMSNorm"):
        assert name in words


def test_mamba_edifice_preset_differs_only_by_biases_and_norms():
    c = M.MambaConfig(embed_dim=287, preset="edifice")
    diffs = _diffs(M, c)
    assert {d.group for d in diffs} == {"biases", "norms"}
    H, E, N, L = 256, 512, 16, 2
    assert sum(d.amount for d in diffs if d.group == "norms") == L * 2 * H     # LayerNorm
    assert sum(d.amount for d in diffs if d.group == "biases") == (
        H + L * (2 * E + E + 2 * N + 16 + E + H))


def test_mamba_dt_rank_ceil_against_the_formulas_floor():
    # hidden 200: ceil(200/16) = 13 for mamba_ssm, the formula's max(200 div 16, 1) = 12
    c = M.MambaConfig(embed_dim=200, hidden_size=200, state_size=8, num_layers=1)
    E = 400
    rank = [d for d in _diffs(M, c) if d.kind == "miscounts"]
    assert {d.term for d in rank} == {"x_proj", "dt_proj"}
    assert all(d.amount == E and "13" in d.group and "12" in d.group for d in rank)
    assert "dt_rank R = 13" in explain_original_count(M, c)


def test_gated_ssm_conv_is_counted_as_4_taps_but_is_a_dense_inner_by_inner():
    c = G.GatedSSMConfig(embed_dim=287)
    E, L = 512, 2
    assert G.original_param_count_terms(c)["conv"] == L * c.conv_size * E == L * 4 * E
    row = _rows(G, c)["conv_proj"]
    assert (row.exact, row.original) == (L * (E * E + E), L * 4 * E)
    mis = [d for d in _diffs(G, c) if d.kind == "miscounts"]
    assert len(mis) == 1 and mis[0].amount == L * (E * E - 4 * E)
    assert "dense conv_proj E x E" in mis[0].words
    # the formula's 4 is a literal: conv_size does not change it
    c3 = G.GatedSSMConfig(embed_dim=287, conv_size=3)
    assert G.original_param_count_terms(c3)["conv"] == L * 4 * E
    assert G.original_param_count(c3) == G.original_param_count(c)
    assert "though conv_size = 3" in explain_original_count(G, c3)
    # biases and LayerNorms are the rest of the gap
    rest = [d for d in _diffs(G, c) if d.kind == "leaves out"]
    assert {d.group for d in rest} == {"biases", "norms"}


def test_s5_encoder_term_does_not_exist():
    for preset in S5.PRESETS:
        c = S5.S5Config(embed_dim=287, preset=preset)
        H, N, L = 256, 64, 4
        assert S5.original_param_count_terms(c)["encoder"] == L * H * N
        row = _rows(S5, c)["encoder"]
        assert (row.exact, row.original) == (0, L * H * N)
        adds = [d for d in _diffs(S5, c) if d.kind == "adds"]
        assert len(adds) == 1 and adds[0].amount == -L * H * N
        assert "encoder" in explain_original_count(S5, c)


def test_s5_paper_ssm_is_not_the_one_the_formula_counts():
    c = S5.S5Config(embed_dim=287)                             # the paper's SSM
    H, N, L, P = 256, 64, 4, 32
    row = _rows(S5, c)["ssm"]
    assert row.exact == L * (2 * P + 2 * P * H + 2 * H * P + H + P)
    assert row.original == L * (2 * H * N + H * H)
    mis = {d.words.split(",")[0]: d.amount for d in _diffs(S5, c) if d.kind == "miscounts"}
    assert mis == {"D": L * (H - H * H)}        # B~, C~ (P = N/2 complex) have b/c_proj's size


def test_ss_transformer_has_no_original_formula():
    c = SST.as_config(dict(embed_dim=287))
    assert SST.original_param_count(c) is None and SST.original_param_count_terms(c) is None
    assert compare_count_terms(SST, c)[0].original is None
