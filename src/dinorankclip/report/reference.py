"""The reference record (METHOD.md §6b): the demo's headline metrics per (run, seed) from a fresh run, committed with
the machine named, and the comparison of a user's results with it.

`write_record` stores every headline metric of every evaluated (run, seed) with the machine, the commit and the date;
`compare` puts a study's results beside it and says which cells fall outside the reference's 95% interval: the
Student-t interval over the reference's seeds, or, for a run with one seed, the binomial interval of its metric on
the suite's n items (the spread of one trained model's score across test draws, a lower bound on the seed spread).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from pathlib import Path

import pandas as pd

from dinorankclip.io import read_json, write_json
from dinorankclip.report.build import ReportSpec, load_items
from dinorankclip.report.stats import t_interval
from dinorankclip.report.tables import headline_samples, load_results

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def machine() -> dict:
    """What the record was measured on: CPU model, cores, OS, Python and torch."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def study_metrics(spec: ReportSpec, study_dir: Path) -> tuple[dict, dict]:
    """({column: {run: {seed: value}}} of every headline metric, {benchmark: test size n})."""
    results = load_results(study_dir / "evaluate", spec.runs, spec.benchmarks, spec.seeds)
    return headline_samples(results), load_items(study_dir / "evaluate", spec)[1]


def write_record(spec: ReportSpec, study_dir: Path, path: Path) -> dict:
    """Write the reference record of the study's current results to `path`."""
    samples, sizes = study_metrics(spec, study_dir)
    record = {"study": spec.study, "machine": machine(), "commit": _commit(),
              "date": datetime.date.today().isoformat(), "test_sizes": sizes,
              "metrics": {column: {run: {str(seed): value for seed, value in by_seed.items()}
                                   for run, by_seed in by_run.items()} for column, by_run in samples.items()}}
    write_json(path, record)
    return record


def interval(values: list[float], n: int | None) -> tuple[float, float]:
    """(mean, half-width): over seeds when there are several, else the binomial interval of one model on n items
    (NaN without n)."""
    mean, half = t_interval(values)
    if len(values) == 1:
        half = Z95 * math.sqrt(mean * (1 - mean) / n) if n else math.nan
    return mean, half


def compare(record: dict, spec: ReportSpec, study_dir: Path) -> pd.DataFrame:
    """One row per (run, metric) of the record that the study also has: the reference mean ± half-width, the study's
    seed mean and seeds, and whether it falls outside."""
    samples, _ = study_metrics(spec, study_dir)
    sizes = record.get("test_sizes", {})
    rows = []
    for column, by_run in record["metrics"].items():
        for run, by_seed in by_run.items():
            if column not in samples or run not in samples[column]:
                continue
            ref_mean, ref_half = interval(list(by_seed.values()), sizes.get(column.split(" ")[0]))
            ours = list(samples[column][run].values())
            mean = sum(ours) / len(ours)
            rows.append({"run": run, "metric": column, "reference": ref_mean, "±95%": ref_half,
                         "reference seeds": len(by_seed), "yours": mean, "your seeds": len(ours),
                         "difference": mean - ref_mean, "outside": abs(mean - ref_mean) > ref_half})
    return pd.DataFrame(rows)


def read_record(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"reference record {path} not found (write one with `dinorankclip reference write`)")
    return read_json(path)
