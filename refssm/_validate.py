"""Input checks shared by every public function.

Bad input gets a clear ``ValueError`` that names what was expected and what
came, never a wrong number. Every check here is cheap (shape and dtype look
ups, one ``isfinite`` pass) next to the computation it guards.
"""
from __future__ import annotations

import numpy as np

__all__ = ["as_float_array", "check_shape", "check_finite", "result_dtype"]

_FLOAT_KINDS = ("f",)


def as_float_array(x, name: str, *, allow_complex: bool = False, ndim=None) -> np.ndarray:
    """Return ``x`` as a floating ndarray (no copy if already one), or raise.

    Parameters
    ----------
    x : array_like
        The value to check.
    name : str
        Argument name used in the error message.
    allow_complex : bool
        Accept complex arrays (S5's parameters); otherwise complex is an error.
    ndim : int or tuple of int, optional
        Allowed numbers of dimensions.

    Raises
    ------
    ValueError
        If ``x`` is not a real (or, when allowed, complex) floating array of an
        allowed rank, or holds NaN/inf.

    Examples
    --------
    >>> as_float_array(np.ones(3), "u").dtype
    dtype('float64')
    >>> as_float_array(np.arange(3), "u")
    Traceback (most recent call last):
    ...
    ValueError: u: expected a floating-point array (float32 or float64), got dtype int64
    """
    arr = np.asarray(x)
    kinds = _FLOAT_KINDS + (("c",) if allow_complex else ())
    if arr.dtype.kind not in kinds or arr.dtype.itemsize < 4:
        what = "a floating-point array (float32 or float64)"
        if allow_complex:
            what = "a floating-point or complex array"
        raise ValueError(f"{name}: expected {what}, got dtype {arr.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            raise ValueError(
                f"{name}: expected {' or '.join(str(a) for a in allowed)} dimensions, "
                f"got shape {arr.shape}"
            )
    check_finite(arr, name)
    return arr


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` if ``arr`` holds NaN or inf, saying how many and where first."""
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name}: expected finite values, got {len(bad)} NaN/inf entries "
            f"(first at index {first}: {arr[first]!r})"
        )


def check_shape(arr: np.ndarray, expected: tuple, name: str, what: str = "") -> None:
    """Raise ``ValueError`` unless ``arr.shape == expected``.

    ``what`` names the layout (for example ``"[batch, seq_len, channels]"``).
    """
    if tuple(arr.shape) != tuple(expected):
        layout = f" {what}" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{layout}, got {tuple(arr.shape)}")


def result_dtype(*arrays) -> np.dtype:
    """The floating dtype a computation on ``arrays`` runs in (float32 only if all are)."""
    dts = [np.asarray(a).dtype for a in arrays if a is not None]
    dt = np.result_type(*dts) if dts else np.dtype(np.float64)
    if dt.kind == "c":
        return dt
    return np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float64)
