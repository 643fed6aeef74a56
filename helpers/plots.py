"""The few matplotlib figures the notebooks share, saved as PNG next to the executed notebook."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def pyplot():
    """matplotlib.pyplot, imported on first use (headless: matplotlib falls back to Agg without a display)."""
    import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg when there is no display

    return plt


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save `fig` as PNG at `path` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def bars(values: Mapping[str, float], title: str = "", ylabel: str = "", path: str | Path | None = None,
         hlines: Mapping[str, float] | None = None, log: bool = False):
    """A labelled bar chart of `values`, with optional horizontal reference lines; saved if `path` is given."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(values) + 2), 3.6))
    names, vals = list(values), list(values.values())
    ax.bar(names, vals, color="tab:blue")
    for label, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="gray")
        ax.text(len(names) - 0.5, y, f" {label}", va="bottom", ha="right", fontsize=8, color="gray")
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    if path:
        save(fig, path)
    return fig


def grouped_bars(table: Mapping[str, Mapping[str, float]], title: str = "", ylabel: str = "",
                 path: str | Path | None = None, errors: Mapping[str, Mapping[str, float]] | None = None,
                 hlines: Mapping[str, float] | None = None):
    """Grouped bars: `table[series][group] = value` (e.g. model → benchmark → score), optional error bars."""
    import numpy as np

    plt = pyplot()
    series = list(table)
    groups = list(dict.fromkeys(g for s in series for g in table[s]))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 3.8))
    for i, s in enumerate(series):
        vals = [table[s].get(g, np.nan) for g in groups]
        err = [errors[s].get(g, 0.0) for g in groups] if errors and s in errors else None
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=s, yerr=err, capsize=2)
    for label, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="gray", label=label)
    ax.set_xticks(x, groups, rotation=20)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        save(fig, path)
    return fig


def loss_curve(steps: Sequence[float], losses: Sequence[float], title: str = "training loss",
               path: str | Path | None = None, eval_steps: Sequence[float] = (), eval_losses: Sequence[float] = ()):
    """Training (and optional eval) loss against step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, losses, marker=".", label="train")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, marker="o", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path:
        save(fig, path)
    return fig


def scatter(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], title: str = "", xlabel: str = "",
            ylabel: str = "", path: str | Path | None = None, logx: bool = False):
    """A labelled scatter plot (e.g. score vs parameter count, perplexity vs bytes)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.scatter(xs, ys)
    for x, y, t in zip(xs, ys, labels, strict=True):
        ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path:
        save(fig, path)
    return fig
