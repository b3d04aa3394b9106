"""Where every artifact of a study lives. Snakemake rules build their paths from these same functions.

Declared outputs (Snakemake outputs, DVC outs) are `results/<study>/<stage>[/<run>]`. Resumable work in
progress lives under `results/<study>/state/`, which is no stage's output: Snakemake deletes the outputs of a
failed job, and a preempted job must find its staging and checkpoints again.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path("results")


def study_dir(study: str) -> Path:
    return RESULTS / study


def stage_dir(study: str, stage: str, run: str | None = None) -> Path:
    path = study_dir(study) / stage
    return path / run if run is not None else path


def state_dir(study: str, stage: str, run: str | None = None) -> Path:
    path = study_dir(study) / "state" / stage
    return path / run if run is not None else path
