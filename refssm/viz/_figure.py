"""Figure plumbing shared by every plot: no pyplot, no screen, modest size.

Every plot is a :class:`matplotlib.figure.Figure` with an Agg canvas attached
(``FigureCanvasAgg``), created without :mod:`matplotlib.pyplot`: nothing
global is touched, nothing needs a display, and a figure is freed as soon as
it is no longer referenced (pyplot keeps every figure alive until closed). In
Jupyter, ``%matplotlib inline`` displays a returned figure as a PNG at the
figure's own dpi (:data:`DPI`).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI", "new_figure", "save_png", "fig_to_png", "data_axes"]

#: Default resolution: 80 dots per inch keeps a 8 x 5 inch figure near 40 kB.
DPI = 80

#: ``Axes.get_label()`` of a colorbar's axes (matplotlib's own marker).
_COLORBAR_LABEL = "<colorbar>"


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize=None, sharex=False,
               height_ratios=None, width_ratios=None, dpi: float = DPI):
    """A constrained-layout figure with an Agg canvas and a grid of axes.

    Parameters
    ----------
    nrows, ncols : int
    figsize : (float, float), optional
        Inches; default 8 wide, 2.4 per row.
    sharex : bool or str
        Shared x limits; every panel still shows its tick labels.
    height_ratios, width_ratios : sequence of float, optional
    dpi : float

    Returns
    -------
    fig : Figure
    axes : ndarray of Axes ``[nrows, ncols]``

    Examples
    --------
    >>> fig, axes = new_figure(2, 1)
    >>> axes.shape, type(fig.canvas).__name__
    ((2, 1), 'FigureCanvasAgg')
    """
    if figsize is None:
        figsize = (8.0, 0.6 + 2.4 * nrows)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    gridspec_kw = {}
    if height_ratios is not None:
        gridspec_kw["height_ratios"] = list(height_ratios)
    if width_ratios is not None:
        gridspec_kw["width_ratios"] = list(width_ratios)
    axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=False, gridspec_kw=gridspec_kw)
    if sharex:
        for ax in axes.flat:                 # every panel keeps its own time ticks and label
            ax.tick_params(labelbottom=True)
    return fig, axes


def save_png(fig: Figure, path, *, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG (Agg, no screen); returns the path.

    Parent folders are created. ``dpi`` defaults to the figure's own.

    Examples
    --------
    >>> import tempfile, os
    >>> fig, _ = new_figure()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save_png(fig, os.path.join(d, "sub", "a.png"))
    ...     p.stat().st_size > 0
    True
    """
    path = Path(os.fspath(path))
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi if dpi is not None else fig.dpi)
    return path


def fig_to_png(fig: Figure, *, dpi: float | None = None) -> bytes:
    """The PNG bytes of ``fig``.

    Examples
    --------
    >>> fig, _ = new_figure()
    >>> fig_to_png(fig)[:4]
    b'\\x89PNG'
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else fig.dpi)
    return buf.getvalue()


def data_axes(fig: Figure) -> list:
    """The axes of ``fig`` that hold data (every axes but the colorbars).

    Examples
    --------
    >>> import numpy as np
    >>> fig, axes = new_figure()
    >>> im = axes[0, 0].imshow(np.zeros((2, 2)))
    >>> _ = fig.colorbar(im, ax=axes[0, 0])
    >>> len(fig.axes), len(data_axes(fig))
    (2, 1)
    """
    return [ax for ax in fig.axes if ax.get_label() != _COLORBAR_LABEL]
