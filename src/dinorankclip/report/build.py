"""The `report` stage: every table and figure of the study, regenerated from the evaluation JSONs."""

from __future__ import annotations

import logging
from pathlib import Path

from dinorankclip.report.figures import comparison_bars
from dinorankclip.report.tables import load_results, main_table, to_markdown

log = logging.getLogger(__name__)


def build_report(study: str, evaluate_dir: Path, runs: list[str], benchmarks: list[str], out: Path) -> list[Path]:
    results = load_results(evaluate_dir, runs, benchmarks)
    table = main_table(results)
    table.to_csv(out / "main.csv")  # shortest repr that round-trips: the exact JSON values
    (out / "main.md").write_text(f"# {study}: zero-shot results (%)\n\n" + to_markdown(table))
    figures = comparison_bars(table, f"{study}: zero-shot results", out / "main")
    written = [out / "main.csv", out / "main.md", *figures]
    log.info("report: %s", ", ".join(str(p) for p in written))
    return written
