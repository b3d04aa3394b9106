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
    """Grouped bars: one group per metric column, one bar per row, chance (a `chance` row, if any) as a dashed tick
    over each group.

    Text columns (the `run` of a labelled table) are left out."""
    table = table.select_dtypes("number")
    runs = [r for r in table.index if r != "chance"]
    x = np.arange(len(table.columns))
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(table.columns)), 3.8))
    for i, run in enumerate(runs):
        ax.bar(x - 0.4 + width * (i + 0.5), 100 * table.loc[run].to_numpy(dtype=float), width, label=run)
    levels = table.loc["chance"].to_numpy(dtype=float) if "chance" in table.index else np.full(len(x), np.nan)
    for xi, level in zip(x, levels, strict=True):
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


def classical_mds(distances: np.ndarray, dims: int = 2) -> np.ndarray:
    """Torgerson's classical MDS: points in `dims` dimensions whose distances best match `distances` (exact when
    the points span at most `dims` dimensions, e.g. three centroids)."""
    n = len(distances)
    centring = np.eye(n) - np.full((n, n), 1 / n)
    gram = -0.5 * centring @ (distances ** 2) @ centring
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:dims]
    return vectors[:, order] * np.sqrt(np.clip(values[order], 0, None))


NODE_COLOURS = {"text": "tab:blue", "z_g": "tab:orange", "z": "tab:red", "teacher": "tab:green"}


def gap_nodes(gaps: dict[str, dict], title: str, stem: Path) -> list[Path]:
    """One panel per run: the centroids of the modality-gap nodes (text, image before injection z_g, image after
    the gate z, teacher) placed by classical MDS of their distance matrix, every pair joined and labelled with its
    true distance."""
    runs = list(gaps)
    cols = min(len(runs), 5)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, run in zip(axes.flat, runs, strict=False):
        nodes, dist = gaps[run]["nodes"], np.asarray(gaps[run]["centroid_distances"], dtype=float)
        xy = classical_mds(dist)
        for i in range(len(nodes)):
            for j in range(i + 1, len(nodes)):
                ax.plot(*xy[[i, j]].T, color="0.7", linewidth=0.8, zorder=1)
                ax.annotate(f"{dist[i, j]:.2f}", xy[[i, j]].mean(axis=0), fontsize=6, color="0.3", ha="center")
        for i, node in enumerate(nodes):
            ax.scatter(*xy[i], s=40, color=NODE_COLOURS.get(node, "black"), label=node, zorder=2)
        span = max(np.ptp(xy, axis=0).max(), 1e-6)
        centre = (xy.min(axis=0) + xy.max(axis=0)) / 2  # the box's centre: the mean puts a lone node on the edge
        ax.set_xlim(centre[0] - 0.7 * span, centre[0] + 0.7 * span)
        ax.set_ylim(centre[1] - 0.7 * span, centre[1] + 0.7 * span)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(run, fontsize=8)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=n) for n, c in NODE_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, stem)
