"""The `report` stage: every table and figure of the study, regenerated from the evaluation JSONs.

Each table is written as CSV (the exact JSON values), markdown, LaTeX and HTML, each figure as PNG and PDF. A table
whose runs or suites are not in the study is skipped, so a reduced study still reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dinorankclip.report.figures import comparison_bars, gap_nodes, order_sweep_lines
from dinorankclip.report.render import DEFAULT, Style, to_html, to_latex, to_markdown
from dinorankclip.report.tables import (
    KERNEL_LOSS,
    compute_label,
    fusion_ablation_table,
    gap_table,
    kuea_table,
    load_compute,
    load_kernel_losses,
    load_results,
    main_table,
    order_sweep_table,
    probe_table,
    retrieval_table,
    subset_table,
)

log = logging.getLogger(__name__)


@dataclass
class ReportSpec:
    """What a study reports. `benchmarks`: the zero-shot suites (the main table's columns, in order); `seeds`:
    {run: its training seeds} (a fine-tuned run: its start run's);
    `sweep_orders`: {order-sweep run: R}; `fusion_variants`: {variant label: run}; `aliases`: {run: the label of
    the alias a table was configured with}; `kuea`: {fine-tuned run: start run}; `retrieval`, `ood`: the
    benchmarks of those tables; `probes`: the linear-probe benchmarks; `gap`: the modality-gap benchmark. Empty
    means no such table."""

    study: str
    runs: list[str]
    benchmarks: list[str]
    seeds: dict[str, list[int]]
    sweep_orders: dict[str, int] = field(default_factory=dict)
    fusion_variants: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    kuea: dict[str, str] = field(default_factory=dict)
    retrieval: list[str] = field(default_factory=list)
    ood: list[str] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)
    gap: str | None = None


def write_table(table: pd.DataFrame, title: str, stem: Path, style: Style = DEFAULT) -> list[Path]:
    """CSV (exact values: the shortest repr that round-trips), markdown, LaTeX and HTML of `table`."""
    paths = [stem.with_suffix(s) for s in (".csv", ".md", ".tex", ".html")]
    table.to_csv(paths[0])
    paths[1].write_text(f"# {title}\n\n" + to_markdown(table, style))
    paths[2].write_text(to_latex(table, title, style))
    paths[3].write_text(to_html(table, title, style))
    return paths


def build_report(spec: ReportSpec, study_dir: Path, out: Path) -> list[Path]:
    """Write every table and figure of `spec` into `out`, reading `study_dir`'s evaluate, pretrain and finetune
    outputs (results/<study>)."""
    evaluate, study = study_dir / "evaluate", spec.study
    results = load_results(evaluate, spec.runs, spec.benchmarks, spec.seeds)
    hours, unit = load_compute(study_dir, spec.runs, spec.kuea, spec.seeds)
    compute_column = compute_label(unit)
    table = main_table(results, hours, compute_column)
    written = write_table(table, f"{study}: zero-shot results (%; training compute in {unit})",
                          out / "main", Style(plain=(compute_column,)))
    written += comparison_bars(table.drop(columns=compute_column), f"{study}: zero-shot results", out / "main")
    if spec.sweep_orders:
        sweep = order_sweep_table(results, spec.sweep_orders)
        written += write_table(sweep, f"{study}: order sweep (%)", out / "order_sweep")
        written += order_sweep_lines(sweep, f"{study}: order sweep", out / "order_sweep")
    if spec.fusion_variants:
        ablation = fusion_ablation_table(results, spec.fusion_variants, spec.aliases)
        written += write_table(ablation, f"{study}: fusion ablation at R = 3 (%)", out / "fusion_ablation")
        written += comparison_bars(ablation, f"{study}: fusion ablation", out / "fusion_ablation")
    if spec.ood:
        ood = subset_table(results, spec.ood)
        written += write_table(ood, f"{study}: out-of-distribution zero-shot (%)", out / "ood")
        written += comparison_bars(ood, f"{study}: out-of-distribution", out / "ood")
    if spec.retrieval:
        retrieval = retrieval_table(results, spec.retrieval)
        written += write_table(retrieval, f"{study}: retrieval recall (%)", out / "retrieval")
        written += comparison_bars(retrieval, f"{study}: retrieval", out / "retrieval")
    if spec.probes:
        probes = probe_table(load_results(evaluate, spec.runs, spec.probes, spec.seeds, "linear_probe"), results)
        written += write_table(probes, f"{study}: fine-grained linear probe and zero-shot (%)", out / "probe")
        written += comparison_bars(probes, f"{study}: fine-grained probe", out / "probe")
    if spec.gap:
        gaps = load_results(evaluate, spec.runs, [spec.gap], spec.seeds, "modality_gap")
        gap = gap_table(gaps, spec.gap)
        written += write_table(gap, f"{study}: modality gap on {spec.gap} (L2-normalised embeddings)",
                               out / "modality_gap", Style(bold=False, plain=tuple(gap.columns)))
        written += gap_nodes({run: res[spec.gap] for run, res in gaps.items()},
                             f"{study}: modality gap on {spec.gap}", out / "modality_gap")
    if spec.kuea:
        losses = load_kernel_losses(study_dir / "finetune", list(spec.kuea), spec.seeds)
        aligned = kuea_table(results, spec.kuea, losses)
        written += write_table(aligned, f"{study}: KUEA alignment, before → after (%; {KERNEL_LOSS} on the fit sample)",
                               out / "kuea", Style(bold=False, plain=(KERNEL_LOSS,),
                                                   signed_rows=tuple(f"{run} Δ" for run in spec.kuea)))
    log.info("report: %s", ", ".join(str(p) for p in written))
    return written
