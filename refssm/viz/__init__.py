"""Plots that teach: state evolution, step sizes, impulse responses, eigenvalues,
the parallel scan's tree, the S5 kernel, the SSTransformer gate.

Every function returns a :class:`matplotlib.figure.Figure` (Agg canvas, no
pyplot, no screen) with a title and labelled axes; save it with
:func:`save_png` or let Jupyter display it (``%matplotlib inline``).
:func:`plot_main` draws an architecture's state evolution to a PNG
(``refssm plot``).

From arrays (:mod:`refssm.viz.plots`): :func:`plot_state_evolution`,
:func:`plot_delta_vs_input`, :func:`plot_impulse_response`,
:func:`plot_eigenvalues`, :func:`plot_scan_tree`, :func:`plot_s5_kernel`,
:func:`plot_gate_over_time`. From a model and an input
(:mod:`refssm.viz.models`): a ``trace_*`` per architecture keeps one layer's
internals (:func:`trace_mamba`, :func:`trace_s5`, :func:`trace_gated_ssm`,
:func:`trace_sst`), and :func:`plot_mamba_state_evolution`,
:func:`plot_mamba_delta`, :func:`plot_s5_state_evolution`,
:func:`plot_s5_model_kernel`, :func:`plot_gated_ssm_state_evolution`,
:func:`plot_sst_gate`, :func:`plot_sst_state_evolution` draw them.
"""
from ._figure import DPI, data_axes, fig_to_png, new_figure, save_png
from .models import (ARCHITECTURES, GatedSSMLayerTrace, MambaLayerTrace, S5LayerTrace,
                     SSTLayerTrace, demo_input, plot_gated_ssm_state_evolution, plot_main,
                     plot_mamba_delta, plot_mamba_state_evolution, plot_s5_model_kernel,
                     plot_s5_state_evolution, plot_sst_gate, plot_sst_state_evolution,
                     selective_copy_demo, trace_gated_ssm, trace_mamba, trace_s5, trace_sst)
from .plots import (METHODS, blelloch_trace, continuous_impulse_response,
                    discretize_eigenvalues, impulse_response, plot_delta_vs_input,
                    plot_eigenvalues, plot_gate_over_time, plot_impulse_response,
                    plot_s5_kernel, plot_scan_tree, plot_state_evolution)

__all__ = [
    "DPI", "data_axes", "fig_to_png", "new_figure", "save_png",
    "ARCHITECTURES", "GatedSSMLayerTrace", "MambaLayerTrace", "S5LayerTrace", "SSTLayerTrace",
    "demo_input", "plot_gated_ssm_state_evolution", "plot_main", "plot_mamba_delta",
    "plot_mamba_state_evolution", "plot_s5_model_kernel", "plot_s5_state_evolution",
    "plot_sst_gate", "plot_sst_state_evolution", "selective_copy_demo", "trace_gated_ssm",
    "trace_mamba", "trace_s5", "trace_sst",
    "METHODS", "blelloch_trace", "continuous_impulse_response", "discretize_eigenvalues",
    "impulse_response", "plot_delta_vs_input", "plot_eigenvalues", "plot_gate_over_time",
    "plot_impulse_response", "plot_s5_kernel", "plot_scan_tree", "plot_state_evolution",
]
