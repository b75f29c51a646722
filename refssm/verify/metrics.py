"""Error measures and finite differences used by every check (DESIGN.md section 4)."""
from __future__ import annotations

import numpy as np

__all__ = ["normwise_error", "reference_scale", "STRUCTURAL_ZERO", "central_difference", "BUDGETS"]

#: float64 budgets of DESIGN.md section 4 (normwise relative error).
BUDGETS = {
    "scan": 1e-12,          # engines against each other, chunked vs one call
    "step_vs_full": 1e-12,
    "discretization": 1e-12,
    "grad_fd": 1e-6,        # manual backward vs central finite differences
    "grad_autograd": 1e-10, # manual backward vs torch autograd
}


def normwise_error(a, b) -> float:
    """Normwise relative error ``max|a - b| / max(max|b|, tiny)``.

    ``b`` is the reference. Shapes must match exactly (no broadcasting).

    Examples
    --------
    >>> normwise_error(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    0.2
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"normwise_error: shapes differ, got {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    tiny = np.finfo(np.float64).tiny
    scale = max(float(np.max(np.abs(b))), tiny)
    return float(np.max(np.abs(a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)
                               - b)) / scale)


#: A reference tensor whose largest magnitude is below this fraction of the largest
#: in its group is a structural zero (see :func:`reference_scale`).
STRUCTURAL_ZERO = 1e-8


def reference_scale(b, group_scale: float) -> float:
    """The denominator of a normwise error against reference ``b`` within a group of tensors.

    ``max|b|``, unless ``b`` is a structural zero, i.e. ``max|b| <
    STRUCTURAL_ZERO * group_scale`` with ``group_scale`` the largest ``max|.|``
    of the group: then ``group_scale``. Such a reference holds only round-off
    (e.g. SSTransformer's ``attn_k.bias`` gradient without a carried cache:
    softmax ignores a shift common to all keys), and a correct candidate's own
    round-off divided by it would read as an O(1) error; measured against the
    group's scale, round-off passes and a real error still fails.

    Examples
    --------
    >>> reference_scale(np.array([2.0]), 10.0), reference_scale(np.array([1e-16]), 10.0)
    (2.0, 10.0)
    """
    scale = float(np.max(np.abs(b))) if np.size(b) else 0.0
    return group_scale if scale < STRUCTURAL_ZERO * group_scale else scale


def central_difference(f, x: np.ndarray, direction: np.ndarray, eps: float = 1e-6) -> float:
    """Directional derivative ``(f(x + eps v) - f(x - eps v)) / (2 eps)`` of a scalar ``f``.

    Comparing it with ``<grad, v>`` checks a whole gradient in one pair of
    evaluations; error is O(eps^2) plus round-off O(1e-16 / eps).

    Examples
    --------
    >>> round(central_difference(lambda x: float(np.sum(x ** 2)), np.ones(3), np.ones(3)), 8)
    6.0
    """
    return (f(x + eps * direction) - f(x - eps * direction)) / (2.0 * eps)
