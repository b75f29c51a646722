"""Primitives, each a ``*_forward`` (output and minimal named saved values) with
its ``*_backward`` next to it: dense, LayerNorm, RMSNorm, SiLU, softplus,
causal depthwise conv1d, dropout. The models' forwards are built from these.
"""
from refssm.ops.activations import (
    inverse_softplus,
    sigmoid,
    silu_backward,
    silu_forward,
    softplus_backward,
    softplus_forward,
)
from refssm.ops.conv import (
    causal_depthwise_conv1d_backward,
    causal_depthwise_conv1d_forward,
    causal_depthwise_conv1d_step,
)
from refssm.ops.dense import dense_backward, dense_forward
from refssm.ops.dropout import dropout_backward, dropout_forward
from refssm.ops.norms import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

__all__ = [
    "dense_forward", "dense_backward",
    "layer_norm_forward", "layer_norm_backward",
    "rms_norm_forward", "rms_norm_backward",
    "silu_forward", "silu_backward",
    "softplus_forward", "softplus_backward",
    "sigmoid", "inverse_softplus",
    "causal_depthwise_conv1d_forward", "causal_depthwise_conv1d_backward",
    "causal_depthwise_conv1d_step",
    "dropout_forward", "dropout_backward",
]
