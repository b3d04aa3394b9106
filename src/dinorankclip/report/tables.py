"""Runs × benchmarks tables from the evaluation JSONs of every (run, seed), aggregated over seeds (METHOD.md §6b).

A `Table` holds the seed means (the exact JSON values averaged; fractions for metrics), the half-widths of their
95% Student-t intervals, the number of seeds of each row, and which cells a declared comparison found significant.
How it prints (percentages, ±, marks, bold) is `dinorankclip.report.render`'s job; the CSV keeps the exact values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dinorankclip.io import read_json
from dinorankclip.layout import seed_part
from dinorankclip.report.stats import ALPHA, Comparison, holm, mcnemar_exact, paired_t, t_interval

# The headline metric of each task, and how a column is labelled with it.
HEADLINE = {"zeroshot_classification": [("acc1", "top-1")],
            "zeroshot_retrieval": [("image_retrieval_recall@1", "T→I R@1"), ("text_retrieval_recall@1", "I→T R@1")]}
SEEDS = "seeds"

# {run: {seed: value}}: one number per (run, seed)
Samples = dict[str, dict[int, float]]


def required_json(path: Path, what: str, needed_by: str = "") -> dict:
    """The JSON at `path`; a missing file stops the report naming what it is, where it was looked for and, when
    given, which part of the report needs it."""
    if not path.is_file():
        raise FileNotFoundError(f"report: missing {what} {path}" + (f" ({needed_by})" if needed_by else ""))
    return read_json(path)


def load_results(evaluate_dir: Path, runs: list[str], benchmarks: list[str], seeds: dict[str, list[int]],
                 kind: str = "") -> dict[str, dict[str, dict[int, dict]]]:
    """{run: {benchmark: {seed: result JSON}}}, every file required, in the given order. `kind` is the sub-folder of
    a (run, seed)'s results that holds them: "" for zero-shot, `linear_probe`, `modality_gap`, `items`."""
    return {run: {bench: {seed: required_json(evaluate_dir / run / seed_part(seed) / kind / f"{bench}.json",
                                              "evaluation result") for seed in seeds[run]}
                  for bench in benchmarks} for run in runs}


def first_seed(results: dict[str, dict[str, dict[int, dict]]]) -> dict[str, dict]:
    """{benchmark: result} of the first run's first seed: what the columns, class names and chance come from."""
    return {bench: next(iter(by_seed.values())) for bench, by_seed in next(iter(results.values())).items()}


def columns(results: dict[str, dict[str, dict[int, dict]]]) -> list[tuple[str, str, str]]:
    """(benchmark, metric key, column label) for every headline metric present."""
    return [(bench, key, f"{bench} {label}") for bench, res in first_seed(results).items()
            for key, label in HEADLINE[res["task"]]]


def chance(result: dict, key: str) -> float:
    """Chance level of a headline metric: 1/classes for classification; unknown (NaN) for retrieval."""
    if key == "acc1" and result.get("classnames"):
        return 1.0 / len(result["classnames"])
    return math.nan


@dataclass
class Table:
    """A report table: `values` (seed means; text columns such as `run` as they are), `intervals` (95% t half-widths
    of the numeric cells, NaN with one seed), `seeds` per row, and the cells of declared comparisons: `significant`
    (Holm-adjusted p < 0.05 within the column) and `better` (significant and higher than every reference of that row
    in this table)."""

    values: pd.DataFrame
    intervals: pd.DataFrame = field(default_factory=pd.DataFrame)
    significant: set[tuple] = field(default_factory=set)
    better: set[tuple] = field(default_factory=set)

    def with_row(self, label, values: dict) -> Table:
        """A copy with one more row (e.g. chance), without interval."""
        table = self.values.copy()
        table.loc[label] = [values.get(c, math.nan if c in table.select_dtypes("number") else "") for c in table]
        return Table(table, self.intervals, self.significant, self.better)


def summarise(samples: dict[str, Samples], rows: dict, index_name: str) -> Table:
    """A Table from per-(run, seed) samples of each column ({column: {run: {seed: value}}}), one row per
    `rows` entry ({label: run}), with the number of seeds of each row in a `seeds` column."""
    means, halves = {}, {}
    for column, by_run in samples.items():
        stats = {label: t_interval(list(by_run[run].values())) for label, run in rows.items()}
        means[column] = {label: m for label, (m, _) in stats.items()}
        halves[column] = {label: h for label, (_, h) in stats.items()}
    values = pd.DataFrame(means, index=pd.Index(list(rows), name=index_name))
    values[SEEDS] = [len(next(iter(samples.values()))[run]) for run in rows.values()] if samples else []
    return Table(values, pd.DataFrame(halves, index=values.index))


def headline_samples(results: dict[str, dict[str, dict[int, dict]]]) -> dict[str, Samples]:
    """{column label: {run: {seed: value}}} of every headline metric."""
    return {label: {run: {seed: result["metrics"][key] for seed, result in res[bench].items()}
                    for run, res in results.items()} for bench, key, label in columns(results)}


def compute_label(unit: str = "PFLOP") -> str:
    return f"train {unit}"


def training_jobs(run: str, tuned: dict[str, str]) -> list[tuple[str, str]]:
    """The (stage, run) jobs whose training a run's cost adds up: a pretrained run's pretraining; a fine-tuned run's
    start run's pretraining and its own fine-tuning."""
    return [("pretrain", tuned[run]), ("finetune", run)] if run in tuned else [("pretrain", run)]


def load_train_flops(study_dir: Path, runs: list[str], tuned: dict[str, str],
                     seeds: dict[str, list[int]]) -> Samples:
    """{run: {seed: training FLOPs}} from the (run, seed)s' metrics.json (exact: torch's flop counter times the
    steps): a pretrained run's training; a fine-tuned run's start run plus its fine-tuning."""
    def read(stage: str, run: str, seed: int) -> float:
        metrics = required_json(study_dir / stage / run / seed_part(seed) / "metrics.json", f"{stage} metrics",
                                "the training-compute column")
        return float(metrics["train_flops"])

    return {run: {seed: sum(read(stage, name, seed) for stage, name in training_jobs(run, tuned))
                  for seed in seeds[run]} for run in runs}


def main_table(results: dict[str, dict[str, dict[int, dict]]], flops: Samples | None = None) -> Table:
    """The headline table of all runs plus a `chance` row; with `flops`, a last column with each run's training
    compute in PFLOP (matched-compute comparisons; no chance value)."""
    samples = headline_samples(results)
    if flops is not None:
        samples[compute_label()] = {run: {s: v / 1e15 for s, v in by_seed.items()} for run, by_seed in flops.items()}
    table = summarise(samples, {run: run for run in results}, "run")
    first = first_seed(results)
    return table.with_row("chance", {label: chance(first[bench], key) for bench, key, label in columns(results)})


def labelled_table(results: dict[str, dict[str, dict[int, dict]]], rows: dict, index_name: str,
                   names: dict[str, str] | None = None, extra: dict[str, Samples] | None = None) -> Table:
    """Headline metrics (and `extra` columns) of the runs in `rows` ({label: run}), indexed by label in the given
    order, with a `run` column holding the run's name (or its name in `names`, e.g. the alias the table was
    configured with)."""
    names = names or {}
    table = summarise({**headline_samples(results), **(extra or {})}, rows, index_name)
    table.values.insert(0, "run", [names.get(run, run) for run in rows.values()])
    return table


def order_sweep_table(results, orders: dict[str, int], strength: dict[str, Samples]) -> Table:
    """The sweep runs' headline metrics and transition strengths, indexed by their Plackett-Luce order R."""
    return labelled_table(results, {orders[run]: run for run in sorted(orders, key=orders.get)}, "R", extra=strength)


def fusion_ablation_table(results, variants: dict[str, str], names: dict[str, str],
                          strength: dict[str, Samples]) -> Table:
    """The ablation runs' headline metrics and injection strengths indexed by fusion variant ({variant label: run}),
    plus chance."""
    table = labelled_table(results, variants, "variant", names, strength)
    first = first_seed(results)
    return table.with_row("chance", {label: chance(first[bench], key) for bench, key, label in columns(results)})


# Strength statistics of a run (metrics.json `strength`, the last validation's means) and how the tables label them.
INJECTION_STRENGTH = {"injection/angle_deg": "∠(z, z_g) °", "injection/residual_ratio": "‖r′‖/‖z_g‖",
                      "injection/gate_mean": "gate", "injection/alpha": "α",
                      "injection/conflict_share": "conflict share", "injection/conflict_removed": "removed radial"}
# What "acted" means, fixed before any result (issue 17): an angle of a degree, or a transition gate of 0.02.
ACTED_ANGLE_DEG, ACTED_GAMMA = 1.0, 0.02


def load_strength(study_dir: Path, runs: list[str], seeds: dict[str, list[int]]) -> dict[str, dict[int, dict]]:
    """{run: {seed: strength statistics}} from the pretraining metrics (empty for a run without injection or
    transitions)."""
    return {run: {seed: required_json(study_dir / "pretrain" / run / seed_part(seed) / "metrics.json",
                                      "pretrain metrics", "the strength columns").get("strength", {})
                  for seed in seeds[run]} for run in runs}


def strength_columns(strength: dict[str, dict[int, dict]], labels: dict[str, str],
                     acted: Callable[[dict], bool], acted_label: str) -> dict[str, Samples]:
    """{label: {run: {seed: value}}} of the statistics in `labels` that any run has (NaN where a run lacks one), and
    an `acted_label` column: the share of a run's seeds on which `acted` holds."""
    present = [key for key in labels if any(key in s for by_seed in strength.values() for s in by_seed.values())]
    out = {labels[key]: {run: {seed: s.get(key, math.nan) for seed, s in by_seed.items()}
                         for run, by_seed in strength.items()} for key in present}
    out[acted_label] = {run: {seed: float(acted(s)) for seed, s in by_seed.items()}
                        for run, by_seed in strength.items()}
    return out


def injection_strength_columns(strength: dict[str, dict[int, dict]]) -> dict[str, Samples]:
    return strength_columns(strength, INJECTION_STRENGTH,
                            lambda s: s.get("injection/angle_deg", 0.0) >= ACTED_ANGLE_DEG, "acted (∠ ≥ 1°)")


def transition_strength_columns(strength: dict[str, dict[int, dict]], max_order: int) -> dict[str, Samples]:
    labels = {f"transition/{kind}_{r}": f"{name}_{r}" for r in range(2, max_order + 1)
              for kind, name in (("gamma", "γ"), ("strength", "strength"))}
    return strength_columns(strength, labels, lambda s: any(
        abs(v) >= ACTED_GAMMA for k, v in s.items() if k.startswith("transition/gamma_")), "acted (γ beyond ±0.02)")


KERNEL_LOSS = "kernel loss"


def load_kernel_losses(finetune_dir: Path, runs: list[str], seeds: dict[str, list[int]]
                       ) -> dict[str, tuple[dict[int, float], dict[int, float]]]:
    """{fine-tuned run: ({seed: kernel loss before}, {seed: after})} from the (run, seed)s' metrics.json (measured on
    the fit sample)."""
    losses = {}
    for run in runs:
        metrics = {seed: required_json(finetune_dir / run / seed_part(seed) / "metrics.json", "fine-tuning metrics")
                   for seed in seeds[run]}
        losses[run] = ({s: m["kernel_loss_first"] for s, m in metrics.items()},
                       {s: m["kernel_loss_last"] for s, m in metrics.items()})
    return losses


def kuea_table(results, tuned: dict[str, str], kernel_losses) -> Table:
    """KUEA before and after, as the KUEA paper's Tables 1-2 (w/o align, w/ align): for each fine-tuned run
    ({fine-tuned: start}), a `before` row (its start run, on the fine-tuned run's seeds), an `after` row (itself)
    and `Δ` = after − before, paired by seed, over every headline metric, with the kernel loss on the fit sample
    (first → last) as the first metric column."""
    samples = headline_samples(results)
    blocks, halves = [], []
    for run, start in tuned.items():
        before, after = kernel_losses[run]
        columns_ = {KERNEL_LOSS: {"before": before, "after": after}}
        for label, by_run in samples.items():
            columns_[label] = {"before": {s: by_run[start][s] for s in by_run[run]}, "after": by_run[run]}
        for by_row in columns_.values():
            by_row["Δ"] = {s: by_row["after"][s] - by_row["before"][s] for s in by_row["after"]}
        rows = {f"{run} {when}": when for when in ("before", "after", "Δ")}
        block = summarise({c: {when: by_row[when] for when in ("before", "after", "Δ")}
                           for c, by_row in columns_.items()}, rows, "KUEA")
        block.values.insert(0, "run", [start, run, ""])
        blocks.append(block.values)
        halves.append(block.intervals)
    return Table(pd.concat(blocks).rename_axis("KUEA"), pd.concat(halves).rename_axis("KUEA"))


RECALL = {"image_retrieval_recall": "T→I", "text_retrieval_recall": "I→T"}


def retrieval_samples(results, benchmarks: list[str]) -> dict[str, Samples]:
    """{column: {run: {seed: recall}}} for every (retrieval benchmark, direction, R@K) in the JSONs: text→image then
    image→text, K ascending."""
    samples: dict[str, Samples] = {}
    for bench in benchmarks:
        for prefix, arrow in RECALL.items():
            for run, res in results.items():
                for seed, result in res[bench].items():
                    metrics = result["metrics"]
                    for k in sorted(int(m.split("@")[1]) for m in metrics if m.startswith(prefix + "@")):
                        samples.setdefault(f"{bench} {arrow} R@{k}", {}).setdefault(run, {})[seed] = \
                            metrics[f"{prefix}@{k}"]
    return samples


def retrieval_table(results, benchmarks: list[str]) -> Table:
    """Runs × (retrieval benchmark, direction, R@K) (`retrieval_samples`)."""
    return summarise(retrieval_samples(results, benchmarks), {run: run for run in results}, "run")


def subset_table(results, benchmarks: list[str]) -> Table:
    """The main table restricted to `benchmarks` (e.g. the OOD sets), chance row included."""
    return main_table({run: {b: res[b] for b in benchmarks} for run, res in results.items()})


def probe_table(probes, zeroshot) -> Table:
    """The fine-grained probe: per benchmark, the linear probe's top-1 and, when the study also has that benchmark
    as a zero-shot suite, the zero-shot top-1; chance = 1/classes where the JSONs name them."""
    samples: dict[str, Samples] = {}
    chance_row = {}
    for run, res in probes.items():
        for bench, by_seed in res.items():
            samples.setdefault(f"{bench} linear probe", {})[run] = {s: r["metrics"]["lp_acc1"]
                                                                    for s, r in by_seed.items()}
            chance_row[f"{bench} linear probe"] = chance(next(iter(by_seed.values())), "acc1")
            if bench in zeroshot.get(run, {}):
                zs = zeroshot[run][bench]
                samples.setdefault(f"{bench} zero-shot", {})[run] = {s: r["metrics"]["acc1"] for s, r in zs.items()}
                chance_row[f"{bench} zero-shot"] = chance(next(iter(zs.values())), "acc1")
    return summarise(samples, {run: run for run in probes}, "run").with_row("chance", chance_row)


GAP_COLUMNS = {"centroid_gap": "gap ‖μ_I − μ_T‖", "alignment": "alignment", "uniformity_image": "uniformity I",
               "uniformity_text": "uniformity T"}
NODES = ("text", "z_g", "z", "teacher")  # text, image before injection, image after the gate, teacher CLS


def gap_table(gaps, bench: str) -> Table:
    """Modality gap per run on `bench`: centroid gap, alignment, uniformity (image, text), then every centroid
    distance of the node matrix in `NODES` order, empty where a run lacks a node (no injection: no z_g)."""
    pairs = [(a, b) for i, a in enumerate(NODES) for b in NODES[i + 1:]]
    samples: dict[str, Samples] = {}
    for run, res in gaps.items():
        for seed, result in res[bench].items():
            index = {node: i for i, node in enumerate(result["nodes"])}
            dist = result["centroid_distances"]
            row = {label: result["metrics"][key] for key, label in GAP_COLUMNS.items()}
            for a, b in pairs:
                row[f"d({a}, {b})"] = dist[index[a]][index[b]] if a in index and b in index else math.nan
            for label, value in row.items():
                samples.setdefault(label, {}).setdefault(run, {})[seed] = value
    table = summarise(samples, {run: run for run in gaps}, "run")
    empty = [c for c in table.intervals if table.values[c].isna().all()]
    return Table(table.values.drop(columns=empty), table.intervals.drop(columns=empty))


def mark_comparisons(table: Table, samples: dict[str, Samples], comparisons: list[tuple[str, str]],
                     rows: dict, items: dict | None = None) -> list[dict]:
    """Test the declared comparisons whose runs are both rows of `table` ({label: run} in `rows`), column by column,
    Holm-adjusted within each column; mark the significant cells of the compared run (and the better ones) in
    `table`, and return one record per (comparison, column) for the comparisons table.

    Seeds are paired by value (a fine-tuned run has the seeds of its start run). Two or more paired seeds: a paired
    t-test over seeds; one: an exact McNemar test on the items' top-1 correctness where `items` has them
    ({run: {column: {seed: "0101..."}}}), conditional on the one trained model; otherwise no test.
    """
    label_of = {run: label for label, run in rows.items()}
    family = [(run, ref) for run, ref in comparisons if run in label_of and ref in label_of]
    records = []
    for column, by_run in samples.items():
        results = []
        for run, ref in family:
            paired = [s for s in by_run[run] if s in by_run[ref]]
            result = paired_t([by_run[run][s] for s in paired], [by_run[ref][s] for s in paired])
            if len(paired) == 1 and items and column in items.get(run, {}) and column in items.get(ref, {}):
                bits = (items[run][column][paired[0]], items[ref][column][paired[0]])
                result = result._replace(p=mcnemar_exact([b == "1" for b in bits[0]], [b == "1" for b in bits[1]]),
                                         test="McNemar (1 seed: conditional on one trained model)")
            results.append(result)
        for (run, ref), result, p_holm in zip(family, results, holm([r.p for r in results]), strict=True):
            records.append(comparison_record(run, ref, column, result, p_holm))
            if p_holm < ALPHA:
                table.significant.add((label_of[run], column))
    for run in {run for run, _ in family}:
        for column in samples:
            refs = [r for r in records if r["run"] == run and r["metric"] == column]
            if refs and all(r["p (Holm)"] < ALPHA and r["difference"] > 0 for r in refs):
                table.better.add((label_of[run], column))
    return records


def comparison_record(run: str, reference: str, column: str, result: Comparison, p_holm: float) -> dict:
    return {"run": run, "reference": reference, "metric": column, "difference": result.difference,
            "±95%": result.half_width, "seeds": result.seeds, "test": result.test or "none",
            "p": result.p, "p (Holm)": p_holm}
