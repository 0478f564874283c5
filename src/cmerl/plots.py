"""Matplotlib figures shared by the run card (:mod:`cmerl.training.checkpoints`) and the report
(:mod:`cmerl.report`): curves of logged metrics against the training step, and the Agg setup.

Matplotlib is imported on first use (it is slow to import and only figures need it) and always runs on
the Agg backend, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A line gets a marker at each point when it has fewer points than this.
MARKER_BELOW = 30


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    # deferred: matplotlib (optional plots)
    import matplotlib  # here, not at module level: a slow import that only figures need

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # deferred: matplotlib (optional plots)

    return plt


def save_figure(fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG (``dpi`` dots per inch; folders created) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


@dataclass(frozen=True)
class CurvePanel:
    """One panel of :func:`plot_curves`: each of ``keys`` a line against ``step``; ``legend`` names the
    lines by key (for a panel of one key, use the key as ``title`` instead)."""

    keys: tuple[str, ...]
    title: str = ""
    ylabel: str = ""
    legend: bool = True


def plot_curves(rows: Sequence[Mapping[str, Any]], panels: Sequence[CurvePanel], path: Path, *,
                panel_size: tuple[float, float] = (6.0, 3.8), dpi: int = 110, markersize: float | None = None,
                title_fontsize: float | None = None) -> bool:
    """Metric curves as one PNG with ``panels`` side by side; returns False (no file written) when there
    is nothing to plot.

    rows: logged steps, each with a ``step`` and metric values (a missing or None value is skipped).
    A panel's line for ``key`` joins ``(row["step"], row[key])`` over the rows that have the key, with
    markers when it has fewer than :data:`MARKER_BELOW` points; keys without a value draw nothing, and
    panels none of whose keys has a value are left out. panel_size: (width, height) in inches of one
    panel; markersize and title_fontsize: matplotlib's (None: its defaults). Grid on, x axis "step".
    """
    shown = []
    for panel in panels:
        lines = [(key, [(r["step"], r[key]) for r in rows if r.get(key) is not None]) for key in panel.keys]
        lines = [(key, pts) for key, pts in lines if pts]
        if lines:
            shown.append((panel, lines))
    if not shown:
        return False
    plt = pyplot()
    width, height = panel_size
    fig, axes = plt.subplots(1, len(shown), figsize=(width * len(shown), height), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], shown):
        for key, pts in lines:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < MARKER_BELOW else None,
                    markersize=markersize, label=key)
        ax.set_xlabel("step")
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize=title_fontsize)
        ax.grid(alpha=0.3)
        if panel.legend:
            ax.legend(fontsize=8)
    save_figure(fig, path, dpi=dpi)
    return True
