"""The run's picture: held-out metric against cumulative bytes on the wire (log x)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], metric: str, path: Path,
              title: str = "") -> None:
    """One line per run: ``metric`` of each evaluated round against cum_bytes (round 0 drawn at 1 byte)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (label, rows) in enumerate(runs):
        pts = [(max(r["cum_bytes"], 1), r["eval"][metric]) for r in rows if "eval" in r and metric in r["eval"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            # ten colours, then the same colours dashed: every line stays distinguishable
            ax.plot(xs, ys, marker="o", markersize=3, label=label, linestyle="-" if i < 10 else "--")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the wire (up + down)")
    ax.set_ylabel(f"held-out {metric}")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
