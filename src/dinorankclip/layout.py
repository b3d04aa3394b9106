"""Where every artifact of a study lives. Snakemake rules build their paths from these same functions.

Declared outputs (Snakemake outputs, DVC outs) are `results/<study>/<stage>`, or `results/<study>/<stage>/<run>/seed<k>`
for the per-run stages (a (run, seed) pair is the unit of training and evaluation). Resumable work in progress
lives under `results/<study>/state/`, which is no stage's output: Snakemake deletes the outputs of a
failed job, and a preempted job must find its staging and checkpoints again. Measured durations of a job live in
`results/<study>/timings/` (`dinorankclip.timings`), also no stage's output: they differ on every run.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path("results")


def study_dir(study: str) -> Path:
    return RESULTS / study


def seed_part(seed: int) -> str:
    """The path component of a training seed: `seed<k>`."""
    return f"seed{seed}"


def _under(path: Path, run: str | None, seed: int | None) -> Path:
    if run is None:
        return path
    return path / run if seed is None else path / run / seed_part(seed)


def stage_dir(study: str, stage: str, run: str | None = None, seed: int | None = None) -> Path:
    return _under(study_dir(study) / stage, run, seed)


def state_dir(study: str, stage: str, run: str | None = None, seed: int | None = None) -> Path:
    return _under(study_dir(study) / "state" / stage, run, seed)


def timings_file(study: str, stage: str, run: str | None = None, seed: int | None = None) -> Path:
    """`results/<study>/timings/<stage>.json`, or `.../timings/<stage>/<run>/seed<k>.json` for a per-run job."""
    base = study_dir(study) / "timings" / stage
    return base.with_suffix(".json") if run is None else _under(base, run, seed).with_suffix(".json")
