"""Runs x benchmarks tables from the evaluation JSONs: exact values in CSV, percentages in markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

# The headline metric of each task, and how a column is labelled with it.
HEADLINE = {"zeroshot_classification": [("acc1", "top-1")],
            "zeroshot_retrieval": [("image_retrieval_recall@1", "T→I R@1"), ("text_retrieval_recall@1", "I→T R@1")]}


def load_results(evaluate_dir: Path, runs: list[str], benchmarks: list[str]) -> dict[str, dict[str, dict]]:
    """{run: {benchmark: clip-benchmark JSON}}, every file required, in the given order."""
    results = {}
    for run in runs:
        results[run] = {}
        for bench in benchmarks:
            path = evaluate_dir / run / f"{bench}.json"
            if not path.is_file():
                raise FileNotFoundError(f"report: missing evaluation result {path}")
            results[run][bench] = json.loads(path.read_text())
    return results


def columns(results: dict[str, dict[str, dict]]) -> list[tuple[str, str, str]]:
    """(benchmark, metric key, column label) for every headline metric present."""
    first = next(iter(results.values()))
    return [(bench, key, f"{bench} {label}") for bench, res in first.items() for key, label in HEADLINE[res["task"]]]


def chance(result: dict, key: str) -> float:
    """Chance level of a headline metric: 1/classes for classification; unknown (NaN) for retrieval."""
    if key == "acc1" and result.get("classnames"):
        return 1.0 / len(result["classnames"])
    return math.nan


def main_table(results: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """One row per run plus a `chance` row; one column per headline metric; values are fractions in [0, 1]."""
    cols = columns(results)
    rows = {run: [res[bench]["metrics"][key] for bench, key, _ in cols] for run, res in results.items()}
    first = next(iter(results.values()))
    rows["chance"] = [chance(first[bench], key) for bench, key, _ in cols]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[label for *_, label in cols]).rename_axis("run")


def to_markdown(table: pd.DataFrame) -> str:
    """Percentages with one decimal; the best run per column in bold (the chance row never counts)."""
    runs = table.drop(index="chance")
    best = runs.max(axis=0)
    header = "| run | " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    for run, row in table.iterrows():
        cells = []
        for col, value in row.items():
            text = "–" if math.isnan(value) else f"{100 * value:.1f}"
            bold = run != "chance" and len(runs) > 1 and not math.isnan(value) and value == best[col]
            cells.append(f"**{text}**" if bold else text)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
