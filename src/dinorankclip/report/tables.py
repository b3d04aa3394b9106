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


def headline_table(results: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """One row per run, one column per headline metric; values are fractions in [0, 1], exactly as in the JSONs."""
    cols = columns(results)
    rows = {run: [res[bench]["metrics"][key] for bench, key, _ in cols] for run, res in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[label for *_, label in cols]).rename_axis("run")


def main_table(results: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """The headline table of all runs plus a `chance` row."""
    table = headline_table(results)
    first = next(iter(results.values()))
    table.loc["chance"] = [chance(first[bench], key) for bench, key, _ in columns(results)]
    return table


def labelled_table(results: dict[str, dict[str, dict]], rows: dict, index_name: str,
                   names: dict[str, str] | None = None) -> pd.DataFrame:
    """Headline metrics of the runs in `rows` ({label: run}), indexed by label in the given order, with a `run`
    column holding the run's name (or its name in `names`, e.g. the alias the table was configured with)."""
    names = names or {}
    table = headline_table({label: results[run] for label, run in rows.items()})
    table.insert(0, "run", [names.get(run, run) for run in rows.values()])
    table.index = pd.Index(list(rows), name=index_name)
    return table


def order_sweep_table(results: dict[str, dict[str, dict]], orders: dict[str, int]) -> pd.DataFrame:
    """The sweep runs' headline metrics indexed by their Plackett-Luce order R, with the run name as a column."""
    return labelled_table(results, {orders[run]: run for run in sorted(orders, key=orders.get)}, "R")


def fusion_ablation_table(results: dict[str, dict[str, dict]], variants: dict[str, str],
                          names: dict[str, str]) -> pd.DataFrame:
    """The ablation runs' headline metrics indexed by fusion variant ({variant label: run}), plus chance."""
    table = labelled_table(results, variants, "variant", names)
    first = next(iter(results.values()))
    table.loc["chance"] = ["", *(chance(first[bench], key) for bench, key, _ in columns(results))]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """Metrics as percentages with one decimal, the best per column in bold (a `chance` row never counts);
    text columns (e.g. the run of a sweep row) are copied as they are."""
    metrics = table.select_dtypes("number").drop(index="chance", errors="ignore")
    best = metrics.max(axis=0)
    header = f"| {table.index.name} | " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    for label, row in table.iterrows():
        cells = []
        for col, value in row.items():
            if col not in metrics.columns:
                cells.append(str(value))
                continue
            text = "–" if math.isnan(value) else f"{100 * value:.1f}"
            bold = label != "chance" and len(metrics) > 1 and not math.isnan(value) and value == best[col]
            cells.append(f"**{text}**" if bold else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
