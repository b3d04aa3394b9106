"""Figures of the report, as PNG (to look at) and PDF (to put in a paper)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    plt.close(fig)
    return paths


def comparison_bars(table: pd.DataFrame, title: str, stem: Path) -> list[Path]:
    """Grouped bars: one group per metric column, one bar per row, chance as a dashed tick over each group.

    Text columns (the `run` of a labelled table) are left out."""
    table = table.select_dtypes("number")
    runs = [r for r in table.index if r != "chance"]
    x = np.arange(len(table.columns))
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(table.columns)), 3.8))
    for i, run in enumerate(runs):
        ax.bar(x - 0.4 + width * (i + 0.5), 100 * table.loc[run].to_numpy(dtype=float), width, label=run)
    for xi, level in zip(x, table.loc["chance"].to_numpy(dtype=float), strict=True):
        if not math.isnan(level):
            ax.hlines(100 * level, xi - 0.45, xi + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(x, [c.replace(" ", "\n", 1) for c in table.columns], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(len(runs), 4))
    return save(fig, stem)


def order_sweep_lines(sweep: pd.DataFrame, title: str, stem: Path) -> list[Path]:
    """Metric (%) against the Plackett-Luce order R, one line per benchmark metric."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    orders = sweep.index.to_numpy()
    for column in sweep.columns.drop("run"):
        ax.plot(orders, 100 * sweep[column].to_numpy(dtype=float), marker="o", label=column)
    ax.set_xticks(orders)
    ax.set_xlabel("Plackett-Luce order R (0 = CLIP, 1 = RankCLIP)")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save(fig, stem)
