"""Figures of the report, as PNG (to look at) and PDF (to put in a paper)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from dinorankclip.report.tables import SEEDS, Table  # noqa: E402


def save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    plt.close(fig)
    return paths


# Every run gets its own colour and marker (a 10-colour cycle gave 17+ runs shared colours): 40 colours from the
# tab20 and tab20b maps, and 10 marker shapes cycled against them.
PALETTE = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def run_styles(runs: list[str]) -> dict[str, tuple]:
    """{run: (colour, marker)}, distinct for up to 40 runs, in the given order."""
    return {run: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, run in enumerate(runs)}


def _metric_columns(table: Table, exclude: tuple[str, ...]) -> list[str]:
    return [c for c in table.values.select_dtypes("number").columns if c != SEEDS and c not in exclude]


def comparison_bars(table: Table, title: str, stem: Path, styles: dict[str, tuple], exclude: tuple[str, ...] = (),
                    labels: dict | None = None) -> list[Path]:
    """Grouped bars: one group per metric column, one bar per row with its 95% interval as an error bar and the
    row's marker on top, chance (a `chance` row, if any) as a labelled dashed line over each group; the legend
    sits outside the axes, so it covers no bar. `labels` maps row labels to runs (for a table indexed by variant)."""
    metrics = _metric_columns(table, exclude)
    values = table.values[metrics]
    rows = [r for r in values.index if r != "chance"]
    halves = table.intervals.reindex(index=rows, columns=metrics)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(metrics)), 4.0))
    for i, row in enumerate(rows):
        colour, marker = styles.get((labels or {}).get(row, row), ("0.5", "o"))
        positions = x - 0.4 + width * (i + 0.5)
        heights = 100 * values.loc[row].to_numpy(dtype=float)
        errors = 100 * np.nan_to_num(halves.loc[row].to_numpy(dtype=float))
        ax.bar(positions, heights, width, yerr=errors, color=colour, ecolor="0.2", capsize=1.5, label=str(row))
        ax.scatter(positions, heights, marker=marker, color="white", edgecolors="black", s=14, linewidths=0.5,
                   zorder=3)
    if "chance" in values.index:
        for j, (xi, level) in enumerate(zip(x, values.loc["chance"].to_numpy(dtype=float), strict=True)):
            if not math.isnan(level):
                ax.hlines(100 * level, xi - 0.45, xi + 0.45, colors="black", linestyles="dashed", linewidth=1,
                          label="chance (1/classes)" if j == 0 else None)
    ax.set_xticks(x, [c.replace(" ", "\n", 1) for c in metrics], fontsize=8)
    ax.set_ylabel("% (mean over seeds, 95% interval)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=1 + len(rows) // 20)
    return save(fig, stem)


def order_sweep_lines(sweep: Table, metrics: list[str], title: str, stem: Path) -> list[Path]:
    """Metric (%) against the Plackett-Luce order R, one line per benchmark metric, with 95% intervals over seeds
    as error bars where an order has several seeds."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    orders = sweep.values.index.to_numpy()
    for i, column in enumerate(metrics):
        errors = 100 * np.nan_to_num(sweep.intervals[column].reindex(sweep.values.index).to_numpy(dtype=float))
        ax.errorbar(orders, 100 * sweep.values[column].to_numpy(dtype=float), yerr=errors, marker=MARKERS[i % 10],
                    color=PALETTE[2 * i % len(PALETTE)], capsize=3, label=column)
    ax.set_xticks(orders)
    ax.set_xlabel("Plackett-Luce order R (0 = CLIP, 1 = RankCLIP)")
    ax.set_ylabel("% (mean over seeds, 95% interval)")
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
    true distance; every panel on one shared scale."""
    runs = list(gaps)
    cols = min(len(runs), 5)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    layouts = {run: classical_mds(np.asarray(gaps[run]["centroid_distances"], dtype=float)) for run in runs}
    # one scale for every panel, so distances can be compared across runs by eye
    span = max(max(np.ptp(xy, axis=0).max() for xy in layouts.values()), 1e-6)
    for ax, run in zip(axes.flat, runs, strict=False):
        nodes, dist, xy = gaps[run]["nodes"], np.asarray(gaps[run]["centroid_distances"], dtype=float), layouts[run]
        for i in range(len(nodes)):
            for j in range(i + 1, len(nodes)):
                ax.plot(*xy[[i, j]].T, color="0.7", linewidth=0.8, zorder=1)
                ax.annotate(f"{dist[i, j]:.2f}", xy[[i, j]].mean(axis=0), fontsize=7, color="0.15", ha="center",
                            va="center", bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
                            zorder=3)
        for i, node in enumerate(nodes):
            ax.scatter(*xy[i], s=40, color=NODE_COLOURS.get(node, "black"), label=node, zorder=2)
        centre = (xy.min(axis=0) + xy.max(axis=0)) / 2  # the box's centre: the mean puts a lone node on the edge
        ax.set_xlim(centre[0] - 0.65 * span, centre[0] + 0.65 * span)
        ax.set_ylim(centre[1] - 0.65 * span, centre[1] + 0.65 * span)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(run, fontsize=8)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=n) for n, c in NODE_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, stem)
