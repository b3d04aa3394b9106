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


KERNEL_LOSS = "kernel loss"


def load_kernel_losses(finetune_dir: Path, runs: list[str]) -> dict[str, tuple[float, float]]:
    """{fine-tuned run: (kernel loss before, after)} from each run's metrics.json (measured on its fit sample)."""
    losses = {}
    for run in runs:
        path = finetune_dir / run / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"report: missing fine-tuning metrics {path}")
        metrics = json.loads(path.read_text())
        losses[run] = (metrics["kernel_loss_first"], metrics["kernel_loss_last"])
    return losses


def kuea_table(results: dict[str, dict[str, dict]], tuned: dict[str, str],
               kernel_losses: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """KUEA before and after, as the KUEA paper's Tables 1-2 (w/o align, w/ align): for each fine-tuned run
    ({fine-tuned: start}), a `before` row (its start run), an `after` row (itself) and `Δ` = after − before, over
    every headline metric, with the kernel loss on the fit sample (first → last) as the first metric column."""
    rows = {f"{run} {when}": name for run, start in tuned.items() for when, name in (("before", start), ("after", run))}
    table = labelled_table(results, rows, "KUEA")
    table.insert(1, KERNEL_LOSS, [kernel_losses[run][i] for run in tuned for i in (0, 1)])
    blocks = []
    for run in tuned:
        pair = table.loc[[f"{run} before", f"{run} after"]]
        delta = pair.select_dtypes("number").diff().iloc[[1]].set_axis([f"{run} Δ"])
        delta.insert(0, "run", "")
        blocks += [pair, delta]
    return pd.concat(blocks).rename_axis("KUEA")


def _cell(value: float, percent: bool, signed: bool) -> str:
    if math.isnan(value):
        return "–"
    if percent:
        return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def to_markdown(table: pd.DataFrame, bold: bool = True, plain: tuple[str, ...] = (),
                signed_rows: tuple = ()) -> str:
    """Metrics as percentages with one decimal, the best per column in bold (a `chance` row never counts);
    text columns (e.g. the run of a sweep row) are copied as they are. `plain` columns are not percentages (four
    significant digits); `signed_rows` (differences) print with a sign; `bold=False` marks nothing."""
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
            text = _cell(value, col not in plain, label in signed_rows)
            marked = bold and label != "chance" and len(metrics) > 1 and not math.isnan(value) and value == best[col]
            cells.append(f"**{text}**" if marked else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
