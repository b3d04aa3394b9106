"""The `report` stage: every table and figure of the study, regenerated from the evaluation JSONs of every (run, seed).

Each table is written as CSV (the exact values: seed means, the half-widths of their 95% intervals as `<column>
±95%` columns, seeds), markdown, LaTeX and HTML, each figure as PNG and PDF, and every caption says what a cell is:
mean ± interval over how many seeds, the test size n of each suite, and what the marks mean. A table whose runs or
suites are not in the study is skipped, so a reduced study still reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dinorankclip.io import read_json
from dinorankclip.layout import seed_part
from dinorankclip.report.figures import comparison_bars, gap_nodes, order_sweep_lines, run_styles
from dinorankclip.report.render import DEFAULT, Style, to_html, to_latex, to_markdown
from dinorankclip.report.stats import ALPHA
from dinorankclip.report.tables import (
    KERNEL_LOSS,
    SEEDS,
    Table,
    columns,
    compute_label,
    fusion_ablation_table,
    gap_table,
    headline_samples,
    injection_strength_columns,
    kuea_table,
    load_kernel_losses,
    load_results,
    load_strength,
    load_train_flops,
    main_table,
    mark_comparisons,
    order_sweep_table,
    probe_table,
    retrieval_samples,
    retrieval_table,
    subset_table,
    transition_strength_columns,
)

log = logging.getLogger(__name__)


@dataclass
class ReportSpec:
    """What a study reports. `benchmarks`: the zero-shot suites (the main table's columns, in order); `seeds`:
    {run: its training seeds} (a fine-tuned run: its start run's); `comparisons`: the declared (run, reference)
    pairs (METHOD.md §6b), canonical run names; `sweep_orders`: {order-sweep run: R}; `fusion_variants`: {variant
    label: run}; `aliases`: {run: the label of the alias a table was configured with}; `kuea`: {fine-tuned run:
    start run}; `retrieval`, `ood`: the benchmarks of those tables; `probes`: the linear-probe benchmarks; `gap`: the
    modality-gap benchmark. Empty means no such table."""

    study: str
    runs: list[str]
    benchmarks: list[str]
    seeds: dict[str, list[int]]
    comparisons: list[tuple[str, str]] = field(default_factory=list)
    sweep_orders: dict[str, int] = field(default_factory=dict)
    fusion_variants: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    kuea: dict[str, str] = field(default_factory=dict)
    retrieval: list[str] = field(default_factory=list)
    ood: list[str] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)
    gap: str | None = None


MARKS = ("* marks a cell whose difference from a declared reference run is significant (paired t-test over seeds, "
         "or exact McNemar with one seed, α = 0.05, Holm within the column; see comparisons); bold marks a cell "
         "significantly better than each of its references in this table.")


def caption(spec: ReportSpec, sizes: dict[str, int | None], rows: list[str], tested: bool = True) -> str:
    """What every cell of a table is: mean ± 95% interval over seeds, how many seeds each run has, the test size
    of each suite, and (when the table carries comparisons) what the marks mean."""
    by_count: dict[int, list[str]] = {}
    for run in rows:
        by_count.setdefault(len(spec.seeds[run]), []).append(run)
    seeds = "; ".join(f"{n} seed{'s' if n > 1 else ''}: {', '.join(runs)}" for n, runs in sorted(by_count.items(),
                                                                                                reverse=True))
    n = ", ".join(f"{bench} n = {size}" for bench, size in sizes.items() if size)
    text = (f"Mean over seeds ± half-width of the 95% Student-t interval (df = seeds − 1; no interval with 1 seed). "
            f"{seeds}. Test sizes: {n or 'unknown'}.")
    return text + (" " + MARKS if tested else "")


def write_table(table: Table, title: str, text: str, stem: Path, style: Style = DEFAULT) -> list[Path]:
    """CSV (exact values: means, then each numeric column's interval half-width as `<column> ±95%`), markdown,
    LaTeX and HTML of `table`, each with its title and caption."""
    paths = [stem.with_suffix(s) for s in (".csv", ".md", ".tex", ".html")]
    halves = table.intervals.reindex(index=table.values.index)
    halves = halves[[c for c in halves.columns if c != SEEDS and halves[c].notna().any()]]
    pd.concat([table.values, halves.add_suffix(" ±95%")], axis=1).to_csv(paths[0])
    paths[1].write_text(f"# {title}\n\n{text}\n\n" + to_markdown(table, style))
    paths[2].write_text(to_latex(table, f"{title}. {text}", style))
    paths[3].write_text(to_html(table, f"{title}\n{text}", style))
    return paths


def load_items(evaluate_dir: Path, spec: ReportSpec) -> tuple[dict, dict[str, int | None]]:
    """({run: {top-1 column: {seed: per-item correctness}}} for the McNemar tests, {benchmark: test size n}) from the
    evaluations' `items/` records (absent records leave a run without one-seed tests and a suite without n)."""
    items, sizes = {}, {}
    for run in spec.runs:
        for seed in spec.seeds[run]:
            for bench in spec.benchmarks:
                path = evaluate_dir / run / seed_part(seed) / "items" / f"{bench}.json"
                if not path.is_file():
                    continue
                record = read_json(path)
                sizes.setdefault(bench, record.get("n"))
                if "correct_top1" in record:
                    items.setdefault(run, {}).setdefault(f"{bench} top-1", {})[seed] = record["correct_top1"]
    return items, {bench: sizes.get(bench) for bench in spec.benchmarks}


def build_report(spec: ReportSpec, study_dir: Path, out: Path) -> list[Path]:
    """Write every table and figure of `spec` into `out`, reading `study_dir`'s evaluate, pretrain and finetune
    outputs (results/<study>)."""
    evaluate, study = study_dir / "evaluate", spec.study
    results = load_results(evaluate, spec.runs, spec.benchmarks, spec.seeds)
    items, sizes = load_items(evaluate, spec)
    samples = headline_samples(results)
    styles = run_styles(spec.runs)
    every_run = {run: run for run in spec.runs}
    flops = load_train_flops(study_dir, spec.runs, spec.kuea, spec.seeds)
    table = main_table(results, flops)
    records = mark_comparisons(table, samples, spec.comparisons, every_run, items)
    text = caption(spec, sizes, spec.runs) + f" {compute_label()}: exact training FLOPs (torch's counter × steps)."
    written = write_table(table, f"{study}: zero-shot results (%)", text, out / "main",
                          Style(plain=(compute_label(),)))
    written += comparison_bars(table, f"{study}: zero-shot results", out / "main", styles, exclude=(compute_label(),))
    if records:
        written += write_comparisons(records, study, out / "comparisons")
    if spec.sweep_orders:
        sweep_runs = list(spec.sweep_orders)
        strength = transition_strength_columns(load_strength(study_dir, sweep_runs, spec.seeds),
                                               max(spec.sweep_orders.values()))
        sweep = order_sweep_table(results, spec.sweep_orders, strength)
        mark_comparisons(sweep, samples, spec.comparisons, {spec.sweep_orders[r]: r for r in sweep_runs}, items)
        written += write_table(sweep, f"{study}: order sweep (%; transition gates γ_r and strengths)",
                               caption(spec, sizes, sweep_runs) + " " + STRENGTH_NOTE, out / "order_sweep",
                               Style(plain=tuple(strength)))
        written += order_sweep_lines(sweep, [label for *_, label in columns(results)],
                                     f"{study}: order sweep", out / "order_sweep")
    if spec.fusion_variants:
        fusion_runs = list(spec.fusion_variants.values())
        strength = injection_strength_columns(load_strength(study_dir, fusion_runs, spec.seeds))
        ablation = fusion_ablation_table(results, spec.fusion_variants, spec.aliases, strength)
        mark_comparisons(ablation, samples, spec.comparisons, spec.fusion_variants, items)
        written += write_table(ablation, f"{study}: fusion ablation at R = 3 (%; injection strength)",
                               caption(spec, sizes, fusion_runs) + " " + STRENGTH_NOTE, out / "fusion_ablation",
                               Style(plain=tuple(strength)))
        written += comparison_bars(ablation, f"{study}: fusion ablation", out / "fusion_ablation", styles,
                                   exclude=tuple(strength), labels=spec.fusion_variants)
    if spec.ood:
        ood = subset_table(results, spec.ood)
        mark_comparisons(ood, {c: v for c, v in samples.items() if c.split(" ")[0] in spec.ood}, spec.comparisons,
                         every_run, items)
        written += write_table(ood, f"{study}: out-of-distribution zero-shot (%)", caption(spec, sizes, spec.runs),
                               out / "ood")
        written += comparison_bars(ood, f"{study}: out-of-distribution", out / "ood", styles)
    if spec.retrieval:
        retrieval = retrieval_table(results, spec.retrieval)
        mark_comparisons(retrieval, retrieval_samples(results, spec.retrieval), spec.comparisons, every_run)
        written += write_table(retrieval, f"{study}: retrieval recall (%)", caption(spec, sizes, spec.runs),
                               out / "retrieval")
        written += comparison_bars(retrieval, f"{study}: retrieval", out / "retrieval", styles)
    if spec.probes:
        probes = probe_table(load_results(evaluate, spec.runs, spec.probes, spec.seeds, "linear_probe"), results)
        written += write_table(probes, f"{study}: fine-grained linear probe and zero-shot (%)",
                               caption(spec, sizes, spec.runs, tested=False), out / "probe")
        written += comparison_bars(probes, f"{study}: fine-grained probe", out / "probe", styles)
    if spec.gap:
        gaps = load_results(evaluate, spec.runs, [spec.gap], spec.seeds, "modality_gap")
        gap = gap_table(gaps, spec.gap)
        written += write_table(gap, f"{study}: modality gap on {spec.gap} (L2-normalised embeddings)",
                               caption(spec, sizes, spec.runs, tested=False), out / "modality_gap",
                               Style(plain=tuple(gap.values.columns)))
        written += gap_nodes({run: next(iter(res[spec.gap].values())) for run, res in gaps.items()},
                             f"{study}: modality gap on {spec.gap} (first seed of each run)", out / "modality_gap")
    if spec.kuea:
        written += write_kuea(spec, study_dir, results, samples, items, sizes, out)
    log.info("report: %s", ", ".join(str(p) for p in written))
    return written


STRENGTH_NOTE = ("Strength columns: the last validation pass's means (METHOD.md §2-3), printed as numbers, not %; "
                 "`acted` is the share of seeds on which the knob acted (fixed thresholds: ∠(z, z_g) ≥ 1°, a "
                 "transition gate γ beyond ±0.02).")


def write_comparisons(records: list[dict], study: str, stem: Path) -> list[Path]:
    """The declared comparisons of the main table: one row per comparison, one column per metric, each cell the mean
    difference run − reference over the paired seeds (percentage points) with its 95% interval and marks; and a
    second table (`<stem>_p`) with the Holm-adjusted p-value of each cell and the test that gave it."""
    frame = pd.DataFrame(records)
    frame["comparison"] = frame["run"] + " − " + frame["reference"]
    wide = {name: frame.pivot(index="comparison", columns="metric", values=name)
            for name in ("difference", "±95%", "p (Holm)")}
    order = list(dict.fromkeys(frame["comparison"]))
    metrics = list(dict.fromkeys(frame["metric"]))
    values, halves, adjusted = (wide[name].reindex(index=order, columns=metrics) for name in wide)
    values.insert(0, SEEDS, frame.groupby("comparison")["seeds"].max().reindex(order))
    table = Table(values.rename_axis("comparison"), halves.rename_axis("comparison"))
    table.significant = {(row, col) for row in order for col in metrics if adjusted.at[row, col] < ALPHA}
    table.better = {(row, col) for row, col in table.significant if values.at[row, col] > 0}
    tests = frame.groupby("comparison")["test"].agg(lambda t: ", ".join(sorted(set(t)))).reindex(order)
    text = ("Declared before any result (params.yaml report.comparisons). Each cell: the mean over paired seeds of "
            "run − reference in percentage points, ± the half-width of its 95% t-interval; seeds: how many were "
            "paired. McNemar (one seed) compares one trained model of each run and gives no interval. * significant "
            "at α = 0.05 after Holm's correction within the column (the main table's comparisons); bold: "
            "significantly better. Adjusted p-values: comparisons_p.")
    written = write_table(table, f"{study}: declared comparisons (run − reference)", text, stem,
                          Style(signed_rows=tuple(order)))
    p_table = Table(adjusted.assign(test=tests).rename_axis("comparison"))
    written += write_table(p_table, f"{study}: declared comparisons, Holm-adjusted p-values",
                           "Holm within each metric column over the comparisons listed; test: the test of each row.",
                           stem.with_name(stem.name + "_p"), Style(plain=tuple(metrics)))
    return written


def write_kuea(spec: ReportSpec, study_dir: Path, results, samples, items, sizes, out: Path) -> list[Path]:
    """The KUEA table (before, after, Δ paired by seed), its Δ rows marked by the declared comparisons."""
    losses = load_kernel_losses(study_dir / "finetune", list(spec.kuea), spec.seeds)
    aligned = kuea_table(results, spec.kuea, losses)
    pairs = Table(pd.DataFrame())
    rows = {f"{run} after": run for run in spec.kuea} | {f"{run} before": start for run, start in spec.kuea.items()}
    mark_comparisons(pairs, samples, spec.comparisons, rows, items)
    aligned.significant |= {(label.replace(" after", " Δ"), c) for label, c in pairs.significant if "after" in label}
    aligned.better |= {(label.replace(" after", " Δ"), c) for label, c in pairs.better if "after" in label}
    text = caption(spec, sizes, list(spec.kuea)) + f" {KERNEL_LOSS}: on the fit sample, first → last."
    return write_table(aligned, f"{spec.study}: KUEA alignment, before → after (%; {KERNEL_LOSS} as a number)", text,
                       out / "kuea", Style(plain=(KERNEL_LOSS,), signed_rows=tuple(f"{run} Δ" for run in spec.kuea)))
