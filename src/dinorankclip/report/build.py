"""The `report` stage: every table and figure of the study, regenerated from the evaluation JSONs.

A table whose runs are not all in the study is skipped (the CLI says so), so a reduced study still reports.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from dinorankclip.report.figures import comparison_bars, order_sweep_lines
from dinorankclip.report.tables import (
    KERNEL_LOSS,
    fusion_ablation_table,
    kuea_table,
    load_kernel_losses,
    load_results,
    main_table,
    order_sweep_table,
    to_markdown,
)

log = logging.getLogger(__name__)


def write_table(table: pd.DataFrame, title: str, stem: Path, **markdown) -> list[Path]:
    """CSV (exact values) and markdown (`to_markdown` with `markdown`'s options) of `table`."""
    table.to_csv(stem.with_suffix(".csv"))  # shortest repr that round-trips: the exact JSON values
    stem.with_suffix(".md").write_text(f"# {title}\n\n" + to_markdown(table, **markdown))
    return [stem.with_suffix(".csv"), stem.with_suffix(".md")]


def build_report(study: str, evaluate_dir: Path, runs: list[str], benchmarks: list[str], sweep_orders: dict[str, int],
                 out: Path, fusion_variants: dict[str, str] | None = None,
                 aliases: dict[str, str] | None = None, kuea: dict[str, str] | None = None,
                 finetune_dir: Path | None = None) -> list[Path]:
    """Write every table and figure into `out`. `sweep_orders` maps the order-sweep runs to their order R,
    `fusion_variants` the ablation's variant labels to runs (empty: no such table); `aliases` ({run: the name the
    report configuration used}) names rows that were configured by an alias; `kuea` maps fine-tuned runs to their
    start runs (empty: no KUEA table), whose kernel losses are read from `finetune_dir`."""
    results = load_results(evaluate_dir, runs, benchmarks)
    table = main_table(results)
    written = write_table(table, f"{study}: zero-shot results (%)", out / "main")
    written += comparison_bars(table, f"{study}: zero-shot results", out / "main")
    if sweep_orders:
        sweep = order_sweep_table(results, sweep_orders)
        written += write_table(sweep, f"{study}: order sweep (%)", out / "order_sweep")
        written += order_sweep_lines(sweep, f"{study}: order sweep", out / "order_sweep")
    if fusion_variants:
        ablation = fusion_ablation_table(results, fusion_variants, aliases or {})
        written += write_table(ablation, f"{study}: fusion ablation at R = 3 (%)", out / "fusion_ablation")
        written += comparison_bars(ablation, f"{study}: fusion ablation", out / "fusion_ablation")
    if kuea:
        aligned = kuea_table(results, kuea, load_kernel_losses(finetune_dir, list(kuea)))
        written += write_table(aligned, f"{study}: KUEA alignment, before → after (%; {KERNEL_LOSS} on the fit sample)",
                               out / "kuea", bold=False, plain=(KERNEL_LOSS,),
                               signed_rows=tuple(f"{run} Δ" for run in kuea))
    log.info("report: %s", ", ".join(str(p) for p in written))
    return written
