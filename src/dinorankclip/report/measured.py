"""The measured training cost of each run: device-hours and wall seconds from the jobs' timing sidecars.

The report's compute column is exact work (FLOPs), the same on every machine; what a run cost in hours depends on
the machine and its load, so it is a different kind of number. It is read from `results/<study>/timings/` (written
by the jobs, never declared to DVC or Snakemake) and written next to them, as `timings/compute.{csv,md,tex,html}`,
not into the report stage's output: a table of clock readings there would make `dvc status` call an unchanged
report stale. A (run, seed) without a sidecar (results copied from elsewhere, a job from before sidecars) is left
out of its row and named in the caption.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dinorankclip.io import read_json
from dinorankclip.layout import seed_part
from dinorankclip.report.render import Style
from dinorankclip.report.tables import Samples, Table, summarise, training_jobs

log = logging.getLogger("dinorankclip")
COLUMNS = {"device_hours": "device-hours", "train_seconds": "train seconds"}


def load_measured(timings_dir: Path, runs: list[str], tuned: dict[str, str], seeds: dict[str, list[int]]
                  ) -> tuple[dict[str, Samples], set[str], list[str]]:
    """({column: {run: {seed: value}}} summed over a fine-tuned run's start run and its fine-tuning, the device
    units the jobs reported (GPU or CPU), the (run, seed)s without a complete set of sidecars)."""
    samples: dict[str, Samples] = {label: {} for label in COLUMNS.values()}
    units, missing = set(), []
    for run in runs:
        jobs = training_jobs(run, tuned)
        for seed in seeds[run]:
            paths = [timings_dir / stage / name / f"{seed_part(seed)}.json" for stage, name in jobs]
            if not all(path.is_file() for path in paths):
                missing.append(f"{run}/{seed_part(seed)}")
                continue
            records = [read_json(path) for path in paths]
            units |= {record["device_hours_unit"] for record in records}
            for key, label in COLUMNS.items():
                samples[label].setdefault(run, {})[seed] = sum(float(record[key]) for record in records)
    return samples, units, missing


def measured_cost_table(samples: dict[str, Samples]) -> Table:
    """Mean ± 95% interval over seeds of each run's measured cost (runs without any sidecar are left out)."""
    rows = {run: run for run in samples[COLUMNS["device_hours"]]}
    return summarise(samples, rows, "run")


def write_measured_cost(study: str, timings_dir: Path, runs: list[str], tuned: dict[str, str],
                        seeds: dict[str, list[int]]) -> list[Path]:
    """Write `timings_dir/compute.*` (nothing when no job left a sidecar); the paths written."""
    from dinorankclip.report.build import write_table

    samples, units, missing = load_measured(timings_dir, runs, tuned, seeds)
    if not samples[COLUMNS["device_hours"]]:
        log.info("measured cost: no timing sidecars under %s; table not written", timings_dir)
        return []
    text = (f"Measured on the machines that ran the jobs (device-hours in {' and '.join(sorted(units))}: GPUs × "
            "wall hours, or CPU threads × wall hours; a fine-tuned run adds its start run). Clock readings depend on "
            "the machine and its load, unlike the report's FLOP column. Mean ± 95% interval over seeds.")
    if missing:
        text += f" Without timings (left out): {', '.join(missing)}."
        log.warning("measured cost: no timings for %s", ", ".join(missing))
    return write_table(measured_cost_table(samples), f"{study}: measured training cost", text,
                       timings_dir / "compute", Style(plain=tuple(COLUMNS.values())))
