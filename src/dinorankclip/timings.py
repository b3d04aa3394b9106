"""Measured durations of a job (wall time, rates, device-hours): to MLflow and to a sidecar file, never into a
DVC-tracked output.

A stage's declared output must be a function of its inputs alone, or `dvc status` calls unchanged work stale:
one resumed teacher job used to make the teacher stage, every pretraining and both fine-tunings "changed" with
byte-identical features, because `images_per_s` and `train_seconds` sat in their JSONs. So what a clock measures
goes to `results/<study>/timings/<stage>.json` (per-run stages: `timings/<stage>/<run>/seed<k>.json`; paths from
`dinorankclip.layout.timings_file`), written atomically when the job ends and replaced by its next run, and to the
job's MLflow run as `timing/<key>` metrics. Neither Snakemake nor DVC declares these files, so they never make a
stage look changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dinorankclip.io import write_json
from dinorankclip.layout import timings_file


def record(cfg: Mapping[str, Any], stage: str, timings: Mapping[str, Any], tracker) -> None:
    """Write a job's `timings` to its sidecar file and log the numeric ones to its MLflow run."""
    run = cfg.get("run")  # per-run jobs' configs name their run
    identity = {"stage": stage} | ({"run": run, "seed": cfg["seed"]} if run else {})
    write_json(timings_file(cfg["study"], stage, run, cfg["seed"] if run else None), {**identity, **timings})
    tracker.log_metrics({f"timing/{k}": v for k, v in timings.items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and v == v}, step=0)
