"""Runs x benchmarks tables from the evaluation JSONs, as DataFrames holding the exact JSON values (fractions).

How they print (percentages, bold) is `dinorankclip.report.render`'s job; the CSV keeps these exact values.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from dinorankclip.io import read_json
from dinorankclip.layout import seed_part

# The headline metric of each task, and how a column is labelled with it.
HEADLINE = {"zeroshot_classification": [("acc1", "top-1")],
            "zeroshot_retrieval": [("image_retrieval_recall@1", "T→I R@1"), ("text_retrieval_recall@1", "I→T R@1")]}


def required_json(path: Path, what: str, needed_by: str = "") -> dict:
    """The JSON at `path`; a missing file stops the report naming what it is, where it was looked for and, when
    given, which part of the report needs it."""
    if not path.is_file():
        raise FileNotFoundError(f"report: missing {what} {path}" + (f" ({needed_by})" if needed_by else ""))
    return read_json(path)


def seed_mean(results: list[dict]) -> dict:
    """One result from the results of several seeds: every number (nested lists included) averaged, everything
    else (names, classnames, nodes) taken from the first."""
    first = results[0]
    if isinstance(first, dict):
        return {key: seed_mean([r[key] for r in results]) for key in first}
    if isinstance(first, list):
        return [seed_mean(list(column)) for column in zip(*results, strict=True)]
    if isinstance(first, int | float) and not isinstance(first, bool):
        return sum(results) / len(results)
    return first


def load_results(evaluate_dir: Path, runs: list[str], benchmarks: list[str], seeds: dict[str, list[int]],
                 kind: str = "") -> dict[str, dict[str, dict]]:
    """{run: {benchmark: result JSON, averaged over the run's seeds}}, every file required, in the given order.
    `kind` is the sub-folder of a (run, seed)'s results that holds them: "" for zero-shot, `linear_probe`,
    `modality_gap`."""
    results = {}
    for run in runs:
        results[run] = {}
        for bench in benchmarks:
            results[run][bench] = seed_mean([
                required_json(evaluate_dir / run / seed_part(seed) / kind / f"{bench}.json", "evaluation result")
                for seed in seeds[run]])
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


def compute_label(unit: str) -> str:
    return f"compute ({unit})"


def load_compute(study_dir: Path, runs: list[str], tuned: dict[str, str],
                 seeds: dict[str, list[int]]) -> tuple[dict[str, float], str]:
    """({run: device-hours per seed}, unit) for matched-compute comparisons, from the (run, seed)s' metrics.json
    files: a pretrained run's training; a fine-tuned run's start run plus its fine-tuning. GPU-hours on GPUs,
    CPU-core-hours on CPUs (the unit is in the label; a study that mixes them says so)."""
    def read(stage: str, run: str, seed: int) -> tuple[float, str]:
        metrics = required_json(study_dir / stage / run / seed_part(seed) / "metrics.json", f"{stage} metrics",
                                "the matched-compute column")
        unit = metrics.get("device_hours_unit") or ("GPU-hours" if metrics.get("device") == "cuda"
                                                     else "CPU-core-hours")
        return metrics["device_hours"], unit

    hours, units = {}, set()
    for run in runs:
        per_seed = []
        for seed in seeds[run]:
            parts = ([read("pretrain", tuned[run], seed), read("finetune", run, seed)] if run in tuned
                     else [read("pretrain", run, seed)])
            per_seed.append(sum(h for h, _ in parts))
            units |= {u for _, u in parts}
        hours[run] = sum(per_seed) / len(per_seed)
    return hours, " + ".join(sorted(units))


def main_table(results: dict[str, dict[str, dict]], compute: dict[str, float] | None = None,
               compute_column: str = compute_label("device-hours")) -> pd.DataFrame:
    """The headline table of all runs plus a `chance` row; with `compute` ({run: device-hours}), a last column
    with each run's training compute (matched-compute comparisons; no chance value)."""
    table = headline_table(results)
    first = next(iter(results.values()))
    table.loc["chance"] = [chance(first[bench], key) for bench, key, _ in columns(results)]
    if compute is not None:
        table[compute_column] = [compute[run] for run in results] + [math.nan]
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


def load_kernel_losses(finetune_dir: Path, runs: list[str], seeds: dict[str, list[int]]
                       ) -> dict[str, tuple[float, float]]:
    """{fine-tuned run: (kernel loss before, after)}, the mean over its seeds' metrics.json (measured on the fit
    sample)."""
    losses = {}
    for run in runs:
        pairs = [(m["kernel_loss_first"], m["kernel_loss_last"]) for m in (
            required_json(finetune_dir / run / seed_part(seed) / "metrics.json", "fine-tuning metrics")
            for seed in seeds[run])]
        losses[run] = tuple(seed_mean([list(p) for p in pairs]))
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


RECALL = {"image_retrieval_recall": "T→I", "text_retrieval_recall": "I→T"}


def retrieval_table(results: dict[str, dict[str, dict]], benchmarks: list[str]) -> pd.DataFrame:
    """Runs × (retrieval benchmark, direction, R@K) for every K in the JSONs: text→image then image→text."""
    rows = {}
    for run, res in results.items():
        rows[run] = {}
        for bench in benchmarks:
            metrics = res[bench]["metrics"]
            for prefix, arrow in RECALL.items():
                ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith(prefix + "@"))
                rows[run].update({f"{bench} {arrow} R@{k}": metrics[f"{prefix}@{k}"] for k in ks})
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("run")


def subset_table(results: dict[str, dict[str, dict]], benchmarks: list[str]) -> pd.DataFrame:
    """The main table restricted to `benchmarks` (e.g. the OOD sets), chance row included."""
    return main_table({run: {b: res[b] for b in benchmarks} for run, res in results.items()})


def probe_table(probes: dict[str, dict[str, dict]], zeroshot: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """The fine-grained probe: per benchmark, the linear probe's top-1 and, when the study also has that benchmark
    as a zero-shot suite, the zero-shot top-1; chance = 1/classes where the zero-shot JSON names them."""
    rows, chance_row = {}, {}
    for run, res in probes.items():
        rows[run] = {}
        for bench, probe in res.items():
            rows[run][f"{bench} linear probe"] = probe["metrics"]["lp_acc1"]
            chance_row[f"{bench} linear probe"] = chance(probe, "acc1")
            if bench in zeroshot.get(run, {}):
                rows[run][f"{bench} zero-shot"] = zeroshot[run][bench]["metrics"]["acc1"]
                chance_row[f"{bench} zero-shot"] = chance(zeroshot[run][bench], "acc1")
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("run")
    table.loc["chance"] = [chance_row[c] for c in table.columns]
    return table


GAP_COLUMNS = {"centroid_gap": "gap ‖μ_I − μ_T‖", "alignment": "alignment", "uniformity_image": "uniformity I",
               "uniformity_text": "uniformity T"}


NODES = ("text", "z_g", "z", "teacher")  # text, image before injection, image after the gate, teacher CLS


def gap_table(gaps: dict[str, dict[str, dict]], bench: str) -> pd.DataFrame:
    """Modality gap per run on `bench`: centroid gap, alignment, uniformity (image, text), then every centroid
    distance of the node matrix in `NODES` order, empty where a run lacks a node (no injection: no z_g)."""
    pairs = [(a, b) for i, a in enumerate(NODES) for b in NODES[i + 1:]]
    rows = {}
    for run, res in gaps.items():
        result = res[bench]
        index = {node: i for i, node in enumerate(result["nodes"])}
        dist = result["centroid_distances"]
        row = {label: result["metrics"][key] for key, label in GAP_COLUMNS.items()}
        for a, b in pairs:
            row[f"d({a}, {b})"] = dist[index[a]][index[b]] if a in index and b in index else math.nan
        rows[run] = row
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("run")
    return table.dropna(axis=1, how="all")
