"""`dinorankclip <stage>`: the one entry point that Snakemake rules and DVC stages call.

Each stage resolves its configuration from params.yaml (validated first), writes its output directory
atomically, records its resolved config next to the output, and is one MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import yaml

from dinorankclip.config import (
    ParamsError,
    benchmark_name,
    canonical_run,
    evaluated_runs,
    finetune_runs,
    load_params,
    model_stage,
    resolve,
    run_names,
    run_seeds,
    seeded,
    suite_names,
)
from dinorankclip.faults import kill_point
from dinorankclip.io import atomic_dir, atomic_write_bytes, write_json
from dinorankclip.layout import stage_dir, state_dir, study_dir
from dinorankclip.timings import record as record_timings

log = logging.getLogger("dinorankclip")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


# What a job cost, in its log for bench/demo_cost.py: the fixed part (logged once the stage's code is imported and
# its MLflow run started) and the whole (logged at the end; Snakemake's benchmark `cpu_time` is sampled every 30 s,
# so it misses up to the last 30 s of a job).
STARTUP_LINE = "start-up: %.2f s wall, %.2f CPU-s (imports, configuration, MLflow) before the stage's work"
FINISHED_LINE = "job finished: %.2f s wall, %.2f CPU-s"
STARTUP = re.compile(r"start-up: (?P<wall>[\d.]+) s wall, (?P<cpu>[\d.]+) CPU-s")
FINISHED = re.compile(r"job finished: (?P<wall>[\d.]+) s wall, (?P<cpu>[\d.]+) CPU-s")


def process_age() -> float:
    """Wall seconds since this process started (Linux: its start time in clock ticks after boot, from /proc)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the child processes it has waited for (git, workers)."""
    return sum(os.times()[:4])


@contextlib.contextmanager
def startup_gc():
    """The cyclic garbage collector paused while a job starts, and what start-up built frozen (`log_startup`).

    Importing torch, open_clip and MLflow allocates millions of long-lived objects; every full collection walks all of
    them again, which was a third of a job's import CPU-s. Frozen, they are skipped by the collections of the stage's
    work as well. On leaving, the collector is as it was.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def log_startup() -> None:
    """Log what the job spent before its stage's work (interpreter, imports, configuration and MLflow), and end
    start-up: what it built is frozen out of garbage collection, which resumes for the work."""
    gc.freeze()
    gc.enable()
    log.info(STARTUP_LINE, process_age(), cpu_seconds())


def write_config(cfg: dict, out: Path) -> None:
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def cmd_source(cfg: dict, args, tracker) -> None:
    from dinorankclip.data.source import build_source

    log_startup()
    with atomic_dir(stage_dir(cfg["study"], "source")) as out:
        stats = build_source(cfg, out)
        write_config(cfg, out)
    tracker.log_metrics({k: v for k, v in stats.items() if isinstance(v, int)}, step=0)


def cmd_data(cfg: dict, args, tracker) -> None:
    from dinorankclip.data.download import build_shards

    log_startup()
    study = cfg["study"]
    with atomic_dir(stage_dir(study, "data")) as out:
        stats = build_shards(cfg, stage_dir(study, "source"), state_dir(study, "data"), out)
        write_config(cfg, out)
        kill_point("data:publish")
    kill_point("data:published")
    shutil.rmtree(state_dir(study, "data"))  # the staging goes only once the output it made is published
    tracker.log_metrics({k: v for k, v in stats.items() if isinstance(v, int)}, step=0)
    tracker.log_artifact(stage_dir(study, "data") / "stats.json")


def cmd_teacher_weights(cfg: dict, args, tracker) -> None:
    from dinorankclip.models.teacher import build_teacher_weights

    log_startup()
    study = cfg["study"]
    with atomic_dir(stage_dir(study, "teacher_weights")) as out:
        stats = build_teacher_weights(cfg, stage_dir(study, "source"), stage_dir(study, "data"), out)
        timings = {key: stats.pop(key) for key in ("train_seconds",) if key in stats}  # the demo teacher's clock
        write_config(cfg, out)
        write_json(out / "stats.json", stats)
    tracker.log_metrics({f"val_accuracy/{k}": v for k, v in stats.get("val_accuracy", {}).items()}, step=0)
    record_timings(cfg, "teacher_weights", timings, tracker)


def cmd_teacher(cfg: dict, args, tracker) -> None:
    from dinorankclip.data.features import build_feature_cache

    log_startup()
    study = cfg["study"]
    with atomic_dir(stage_dir(study, "teacher")) as out:
        stats, timings = build_feature_cache(cfg, stage_dir(study, "data"), stage_dir(study, "teacher_weights"),
                                             state_dir(study, "teacher"), out)
        write_config(cfg, out)
    shutil.rmtree(state_dir(study, "teacher"))  # published: the staged shards (hard links of the output's) can go
    tracker.log_metrics({k: v for k, v in stats.items() if isinstance(v, int | float)}, step=0)
    record_timings(cfg, "teacher", timings, tracker)


def cmd_captions(cfg: dict, args, tracker) -> None:
    from dinorankclip.data.captions import build_captions

    log_startup()
    study = cfg["study"]
    with atomic_dir(stage_dir(study, "captions")) as out:
        stats = build_captions(cfg, stage_dir(study, "data"), state_dir(study, "captions"), out)
        write_config(cfg, out)
    tracker.log_metrics({k: v for k, v in stats.items() if isinstance(v, int | float)}, step=0)


def cmd_pretrain(cfg: dict, args, tracker) -> None:
    """Rank 0 writes the output directory; under torchrun the other ranks train alongside and write nothing."""
    from dinorankclip.train.pretrain import TIMING_KEYS, pretrain, prune_state

    log_startup()
    study, job = cfg["study"], (cfg["run"], cfg["seed"])
    inputs = (stage_dir(study, "data"), {name: stage_dir(study, name) for name in READ_BY_PRETRAIN})
    state, samples = state_dir(study, "pretrain", *job), state_dir(study, "samples")
    if tracker.run_id is None:
        pretrain(cfg, *inputs, None, tracker, state, samples)
        return
    with atomic_dir(stage_dir(study, "pretrain", *job)) as out:
        write_config(cfg, out)
        metrics = pretrain(cfg, *inputs, out, tracker, state, samples)
    tracker.log_artifact(stage_dir(study, "pretrain", *job) / "metrics.json")
    record_timings(cfg, "pretrain", {key: metrics[key] for key in TIMING_KEYS}, tracker)
    tracker.drain()  # every metric in the store before the checkpoints go: a store that is away fails the job here
    prune_state(state)


def finetune_dirs(cfg: dict) -> dict[str, Path]:
    """What the finetune stage of a fine-tuned run reads: the study's data and teacher stages, and its start run
    (the same seed)."""
    study = cfg["study"]
    return {**{name: stage_dir(study, name) for name in ("data",) + TEACHER_STAGES},
            "start": stage_dir(study, "pretrain", cfg["finetune"]["start_run"], cfg["seed"])}


def cmd_finetune(cfg: dict, args, tracker) -> None:
    """Rank 0 writes the output directory; under torchrun the other ranks train alongside and write nothing."""
    from dinorankclip.train.ddp import launched_rank
    from dinorankclip.train.finetune import TIMING_KEYS as FINETUNE_TIMING_KEYS
    from dinorankclip.train.finetune import finetune

    log_startup()
    done = stage_dir(cfg["study"], "finetune", cfg["run"], cfg["seed"])
    if launched_rank() != 0:
        finetune(cfg, finetune_dirs(cfg), None, tracker, args.source)
        return
    with atomic_dir(done) as out:
        write_config(cfg, out)
        metrics = finetune(cfg, finetune_dirs(cfg), out, tracker, args.source)
    tracker.log_artifact(done / "metrics.json")
    record_timings(cfg, "finetune", {key: metrics[key] for key in FINETUNE_TIMING_KEYS}, tracker)


def preflight_finetune(cfg: dict, args) -> None:
    """The finetune stage's inputs, checked before MLflow or any model is touched (a bad path is one error)."""
    from dinorankclip.train.finetune import preflight

    args.source = preflight(cfg, finetune_dirs(cfg))


def cmd_evaluate(cfg: dict, args, tracker) -> None:
    from dinorankclip.eval.suites import evaluate_run

    log_startup()
    study, job = cfg["study"], (cfg["run"], cfg["seed"])
    model_dir = stage_dir(study, args.model_stage, *job) / "model"
    written = stage_dir(study, "evaluate", *job)
    with atomic_dir(written) as out:
        evaluate_run(cfg, model_dir, out, tracker, stage_dir(study, "teacher_weights"), state_dir(study, "features"))
    for path in sorted(written.rglob("*.json")):
        tracker.log_artifact(path, str(Path("evaluation") / path.parent.relative_to(written)))


def cmd_report(cfg: dict, args, tracker) -> None:
    from dinorankclip.report.build import build_report
    from dinorankclip.report.measured import write_measured_cost

    log_startup()
    study, spec = cfg["study"], args.report_spec
    with atomic_dir(stage_dir(study, "report")) as out:
        build_report(spec, study_dir(study), out)
    for path in sorted(stage_dir(study, "report").iterdir()):
        tracker.log_artifact(path, "report")
    # clock readings, beside the jobs' timings and out of the stage's output
    for path in write_measured_cost(study, study_dir(study) / "timings", spec.runs, spec.kuea, spec.seeds):
        tracker.log_artifact(path, "timings")
    print(f"report: {stage_dir(study, 'report').resolve()}")


def report_spec(params: dict, cfg: dict):
    """What the study's report shows: every evaluated run on every suite, and the tables whose runs exist."""
    from dinorankclip.report.build import ReportSpec

    study, ev = cfg["study"], cfg["evaluate"]
    runs = evaluated_runs(params)
    return ReportSpec(
        study=study, runs=runs, benchmarks=suite_names(params, study),
        seeds={run: run_seeds(params, study, run) for run in runs}, comparisons=report_comparisons(params, runs),
        sweep_orders={run: c["loss"]["order"] for run, c in report_runs(params, study, "order_sweep").items()},
        fusion_variants={FUSION_LABELS.get(c["injection"]["variant"], c["injection"]["variant"]): run
                         for run, c in report_runs(params, study, "fusion_ablation").items()},
        aliases={run: f"{alias} = {run}" for alias, run in params.get("aliases", {}).items()},
        kuea=finetune_runs(params),
        retrieval=[benchmark_name(s["dataset"]) for s in ev["suites"] if s["task"] == "zeroshot_retrieval"],
        ood=[benchmark_name(s["dataset"]) for s in ev["suites"] if s.get("group") == "ood"],
        probes=[benchmark_name(d) for d in ev.get("linear_probe", {}).get("datasets", [])],
        gap=benchmark_name(ev["modality_gap"]["dataset"]) if ev.get("modality_gap") else None)


def report_comparisons(params: dict, runs: list[str]) -> list[tuple[str, str]]:
    """The declared (run, reference) comparisons (`report.comparisons`, aliases resolved) whose runs this study
    evaluates; the others are logged and left out."""
    pairs = [(canonical_run(params, c["run"]), canonical_run(params, c["against"]))
             for c in params["report"].get("comparisons", [])]
    missing = [f"{a} vs {b}" for a, b in pairs if a not in runs or b not in runs]
    if missing:
        log.info("report.comparisons: not in this study, left out: %s", "; ".join(missing))
    return [(a, b) for a, b in pairs if a in runs and b in runs]


def report_runs(params: dict, study: str, table: str) -> dict[str, dict]:
    """{run: resolved config} of a report table's runs (aliases resolved); empty (no table) unless the study trains
    all of them."""
    names, trained = params["report"][table], run_names(params, study)
    missing = [name for name in names if canonical_run(params, name) not in trained]
    if missing:
        log.info("report.%s: runs not in this study (%s); the table is skipped", table, ", ".join(missing))
        return {}
    return {canonical_run(params, name): resolve(params, study, name) for name in names}


FUSION_LABELS = {"v1": "V1 no injection", "distill": "V1 +distillation (control)", "v2": "V2 linear residual",
                 "v3": "V3 +CBAM", "v4": "V4 +refiner", "v5": "V5 +conflict-aware gate", "v6": "V6 +plain gate"}


STAGES = {"source": cmd_source, "data": cmd_data, "teacher-weights": cmd_teacher_weights, "teacher": cmd_teacher,
          "captions": cmd_captions, "pretrain": cmd_pretrain, "finetune": cmd_finetune, "evaluate": cmd_evaluate,
          "report": cmd_report}
PER_RUN = {"pretrain", "finetune", "evaluate"}
PREFLIGHT = {"finetune": preflight_finetune}
TEACHER_STAGES = ("teacher_weights", "teacher")
READ_BY_PRETRAIN = TEACHER_STAGES + ("captions",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinorankclip", description=__doc__.splitlines()[0])
    p.add_argument("--params", action="append", metavar="FILE",
                   help="parameter file (default: params.yaml, or the workflow's merged config); given more than once, "
                        "later files are merged over earlier ones, as Snakemake's --configfile does")
    p.add_argument("--study", help="study to run (default: `study` in the parameters)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name in STAGES:
        s = sub.add_parser(name, help=f"run the {name} stage")
        if name in PER_RUN:
            s.add_argument("--run", required=True, help="run name from the registry (params.yaml: runs, or "
                                                          "finetune_runs for finetune and evaluate)")
            s.add_argument("--seed", type=int, help="training seed of the run (studies.<study>.seeds; default: the "
                                                    "run's first)")
    sub.add_parser("check", help="validate the parameters and print the runs and suites")
    ref = sub.add_parser("reference", help="write the study's results as the reference record, or compare them with "
                                            "it (which cells fall outside the reference's 95%% intervals)")
    ref.add_argument("action", choices=["write", "compare"])
    ref.add_argument("--file", type=Path, help="the record (default: docs/reference/<study>.json)")
    ref.add_argument("--json", type=Path, help="compare: also write the comparison as JSON here")
    pre = sub.add_parser("preflight", help="check everything a study needs before it runs (inputs, disk, GPUs, "
                                           "step time and memory); exit 1 naming the fix of any failure")
    pre.add_argument("--study", default=argparse.SUPPRESS, help="the study to check (default: `study`)")
    pre.add_argument("--json", type=Path, metavar="FILE", help="also write every check as JSON")
    pre.add_argument("--steps", type=int, default=3, help="timed training steps per kind of run (GPU only)")
    pre.add_argument("--sample", type=int, default=32, help="list images fetched to measure shard bytes per image")
    dvc = sub.add_parser("dvc-yaml", help="write dvc.yaml for the study in the parameters (the DVC view of the DAG)")
    dvc.add_argument("--check", action="store_true", help="only check that dvc.yaml is current (exit 2 if not)")
    return p


def cmd_reference(params: dict, cfg: dict, args) -> int:
    """Write the reference record from the study's results, or compare the results with it (exit 0 either way:
    cells outside an interval are information, printed and counted, not a failure)."""
    from dinorankclip.report.reference import compare, read_record, write_record

    spec, study = report_spec(params, cfg), cfg["study"]
    path = args.file or Path("docs") / "reference" / f"{study}.json"
    if args.action == "write":
        write_record(spec, study_dir(study), path)
        print(f"wrote {path}")
        return 0
    record = read_record(path)
    table = compare(record, spec, study_dir(study))
    if args.json:
        write_json(args.json, table.to_dict(orient="records"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"{int(table['outside'].sum())} of {len(table)} cells outside the reference's 95% intervals ({path}: "
          f"{record['machine']['cpu']}, {record['machine']['cores']} cores, commit {record['commit'][:8]}, "
          f"{record['date']})")
    return 0


def cmd_dvc_yaml(params: dict, args) -> None:
    from dinorankclip.dvc_yaml import DVC_FILE, check_current, render

    if args.check:
        check_current(params)
        return
    text = render(params)
    if not DVC_FILE.is_file() or DVC_FILE.read_text() != text:
        atomic_write_bytes(DVC_FILE, text.encode())
        print(f"wrote {DVC_FILE} for study {params['study']}")


def check_run_stage(params: dict, command: str, run: str | None) -> None:
    """A fine-tuned run is made by finetune, every other run of the study by pretrain; evaluate takes either."""
    tuned, study = finetune_runs(params), params["study"]
    if command == "finetune" and run not in tuned:
        raise ParamsError(f"finetune --run {run}: not in finetune_runs of study {study} (known: "
                          f"{', '.join(tuned) or 'none'})")
    if command == "pretrain" and run in tuned:
        raise ParamsError(f"pretrain --run {run}: a fine-tuned run (finetune_runs); run the finetune stage")
    trained = run_names(params)
    if command in ("pretrain", "evaluate") and run not in tuned and canonical_run(params, run) not in trained:
        raise ParamsError(f"{command} --run {run}: not a run of study {study} (studies.{study}.runs: "
                          f"{', '.join(trained)})")


def main(argv: list[str] | None = None) -> int:
    with startup_gc():
        return run(argv)


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.study)
        if args.command == "dvc-yaml":
            cmd_dvc_yaml(params, args)
            return 0
        if os.environ.get("DVC_STAGE"):  # started by `dvc repro`: its dvc.yaml must describe these parameters
            from dinorankclip.dvc_yaml import check_current

            check_current(params)
        check_run_stage(params, args.command, getattr(args, "run", None))
        cfg = resolve(params, None, getattr(args, "run", None), getattr(args, "seed", None))
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "preflight":
        from dinorankclip.preflight import main as preflight

        return preflight(params, cfg["study"], args.json, args.steps, args.sample)
    if args.command == "check":
        jobs = seeded(params, run_names(params))
        print(f"study {cfg['study']}: runs {', '.join(run_names(params))}; "
              f"fine-tuned {', '.join(f'{k} (from {v})' for k, v in finetune_runs(params).items()) or 'none'}; "
              f"{len(jobs)} (run, seed) trainings; suites {', '.join(suite_names(params, cfg['study']))}")
        return 0
    if args.command == "reference":
        return cmd_reference(params, cfg, args)
    if args.command in PREFLIGHT:
        from dinorankclip.data.images import DataPathError

        try:
            PREFLIGHT[args.command](cfg, args)
        except DataPathError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args.model_stage = model_stage(params, cfg.get("run", ""))
    if args.command == "report":
        args.report_spec = report_spec(params, cfg)
    from dinorankclip.errors import InputError
    from dinorankclip.train.preemption import EXIT_STATUS, Preempted

    try:
        with tracked(cfg, args.command) as tracker:
            STAGES[args.command](cfg, args, tracker)
    except Preempted as stop:
        log.warning("%s", stop)
        return EXIT_STATUS
    except InputError as err:  # a bad input file: one message naming it, as for bad parameters
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info(FINISHED_LINE, process_age(), cpu_seconds())
    return 0


@contextlib.contextmanager
def tracked(cfg: dict, stage: str):
    """The job's MLflow run (rank 0 only under torchrun), keyed by what the job computes: a training by its checkpoint
    fingerprint, so a preempted or killed job continues its own run and a job of other settings starts a new one."""
    from dinorankclip.tracking import NullTracker, job_key, job_run
    from dinorankclip.train.ddp import launched_rank

    if launched_rank() != 0:
        yield NullTracker()
        return
    study = study_dir(cfg["study"])
    key, resume = job_key(study, stage, cfg), False
    if stage == "pretrain":
        from dinorankclip.train.pretrain import tracking_key

        stamp, resume = tracking_key(cfg, stage_dir(cfg["study"], "data"),
                                     state_dir(cfg["study"], "pretrain", cfg["run"], cfg["seed"]))
        key = job_key(study, stage, cfg, stamp)
    with job_run(cfg, study, stage, key, resume) as tracker:
        yield tracker


if __name__ == "__main__":
    sys.exit(main())
