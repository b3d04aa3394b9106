"""Names shared by the rules: the study, its (run, seed) pairs, paths (from dinorankclip.layout) and the job command."""

import json
import os

from dinorankclip.config import (
    evaluated_runs,
    finetune_runs,
    finetune_stages,
    model_stage,
    pretrain_stages,
    resolve,
    run_names,
    seeded,
)
from dinorankclip.launch import training_command, training_host, training_resources
from dinorankclip.layout import seed_part, stage_dir, study_dir

STUDY = config["study"]
RUNS = run_names(config)
# Fine-tuned runs (KUEA) -> the run each starts from; evaluated and reported like every run in RUNS.
FINETUNED = finetune_runs(config)
EVALUATED = evaluated_runs(config)
# (run, seed) pairs, the unit of training and evaluation, as the zipped wildcard lists of `expand(..., zip, ...)`.
def pairs(runs):
    jobs = seeded(config, runs)
    return {"run": [run for run, _ in jobs], "seed": [seed for _, seed in jobs]}
# Jobs import the package from this checkout, so a `conda:` env needs only the dependencies.
SRC = os.path.relpath(os.path.join(workflow.basedir, "src"))
PACKAGE = f"PYTHONPATH={SRC}${{PYTHONPATH:+:$PYTHONPATH}}"
CLI = f"{PACKAGE} python -m dinorankclip --study {STUDY}"
TRAINING = config["studies"][STUDY]["pretrain"]
TRAINING_RESOURCES = training_resources(TRAINING)
TRAINING_HOST = training_host(TRAINING)
EVALUATE = config["studies"][STUDY]["evaluate"]
FINETUNE = resolve(config, STUDY)["finetune"]
# Scheduling priorities, highest first. The teacher stages gate most pretrain jobs: scheduled first, they do not
# wait behind runs that need no teacher. A fine-tuning's start run heads the longest chain left (pretrain, finetune,
# two evaluations): started last, it ends the study on one core.
CRITICAL_PATH = 10
FINETUNE_CHAIN = 5


wildcard_constraints:
    run="[a-z0-9][a-z0-9-]*",
    seed="[0-9]+",


def cpus(threads, workers=0):
    """A job's CPUs: its torch threads and its loader processes. Also given as `cpus_per_task`, which the SLURM
    plugin sends to sbatch as is: Snakemake caps `threads` at --cores, the controller's own core count."""
    return threads + workers


def out(stage, run=None, seed=None):
    return str(stage_dir(STUDY, stage, run, seed))


def job_file(kind, stage, run, seed, suffix):
    """results/<study>/<kind>/<stage>/<stage><suffix>, or .../<stage>/<run>/seed<k><suffix> for a per-run job."""
    name = f"{run}/{seed_part(seed)}" if run else stage
    return str(study_dir(STUDY) / kind / stage / f"{name}{suffix}")


def log_file(stage, run=None, seed=None):
    return job_file("logs", stage, run, seed, ".log")


def benchmark_file(stage, run=None, seed=None):
    return job_file("benchmarks", stage, run, seed, ".tsv")


def settings(*sections, run=None, seed=None):
    """The resolved config sections a job depends on, as JSON: a params rerun trigger for Snakemake."""
    cfg = resolve(config, STUDY, run, None if seed is None else int(seed))
    return json.dumps({key: cfg[key] for key in ("seed",) + sections}, sort_keys=True)
