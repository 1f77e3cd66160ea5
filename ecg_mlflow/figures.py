"""Matplotlib figures for runs and reports (Agg backend: no display needed).

Every function returns a :class:`matplotlib.figure.Figure`; the caller saves or logs it and
closes it (``plt.close(fig)``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on CI machines and inside `mlflow run`

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _draw_confusion(ax: Axes, cm: np.ndarray, classes: Sequence[str], title: str) -> None:
    """Draw ``cm`` ``(k, k)`` (rows true, columns predicted) on ``ax``: counts in the cells,
    colour = row-normalised fraction, so rare classes are as visible as common ones."""
    cm = np.asarray(cm)
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix must be ({k}, {k}) for classes {list(classes)}, got shape {cm.shape}")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), labels=list(classes))
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8 if k <= 6 else 6,
                    color="white" if frac[i, j] > 0.5 else "black")


def plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """Confusion matrix ``(k, k)`` as a heat map: counts in cells, row-normalised colour."""
    size = max(3.5, 0.45 * len(classes) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    _draw_confusion(ax, cm, classes, title)
    return fig


def plot_confusion_pair(cms: Mapping[str, np.ndarray], classes: Sequence[str], title: str) -> Figure:
    """Several confusion matrices ``(k, k)`` side by side, one panel per entry (panel title = key)."""
    if not cms:
        raise ValueError("plot_confusion_pair needs at least one confusion matrix")
    size = max(3.5, 0.45 * len(classes) + 1.5)
    fig, axes = plt.subplots(1, len(cms), figsize=(size * len(cms), size + 0.9), layout="constrained",
                             squeeze=False)
    for ax, (name, cm) in zip(axes[0], cms.items()):
        _draw_confusion(ax, cm, classes, name)
    fig.suptitle(title)
    return fig


def plot_difference_bars(panels: Mapping[str, tuple[Sequence[str], Sequence[float]]], xlabel: str,
                         title: str) -> Figure:
    """One panel per metric: horizontal bars of per-patient differences ``(n,)``, sorted ascending.

    ``panels`` maps a metric name to (patient labels, differences); green bars = gain, red = loss.
    """
    if not panels:
        raise ValueError("plot_difference_bars needs at least one panel")
    n_max = max(len(labels) for labels, _ in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 0.6, max(2.2, 0.2 * n_max + 1.2)),
                             layout="constrained", squeeze=False)
    for ax, (name, (labels, diffs)) in zip(axes[0], panels.items()):
        if len(labels) != len(diffs):
            raise ValueError(f"panel {name!r}: labels and diffs must have the same length, "
                             f"got {len(labels)} and {len(diffs)}")
        d = np.asarray(diffs, dtype=np.float64)
        order = np.argsort(d, kind="stable")
        d = d[order]
        ax.barh(range(len(d)), d, color=np.where(d >= 0, "tab:green", "tab:red"))
        ax.set_yticks(range(len(d)), labels=[str(labels[i]) for i in order], fontsize=6)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(f"{name} (n={len(d)})", fontsize=9)
    fig.suptitle(title)
    return fig


def plot_paired_scatter(panels: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
                        ylabel: str, title: str) -> Figure:
    """One scatter panel per metric: ``x`` against ``y`` (each ``(n,)``), with the diagonal y = x.

    Points above the diagonal are patients where ``y`` (e.g. transfer) scores higher.
    """
    if not panels:
        raise ValueError("plot_paired_scatter needs at least one panel")
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), layout="constrained", squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, (x, y)) in zip(axes.flat, panels.items()):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"panel {name!r}: x and y must have the same shape, got {x.shape} and {y.shape}")
        # Zoom on the data (with a margin) so that differences near the diagonal stay visible.
        lo = float(min(x.min(), y.min())) if x.size else 0.0
        hi = float(max(x.max(), y.max())) if x.size else 1.0
        pad = 0.06 * (hi - lo) if hi > lo else 1.0
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
        ax.scatter(x, y, s=14, alpha=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title(f"{name} (n={x.size})", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title)
    return fig


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for embedding in HTML or logging)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
