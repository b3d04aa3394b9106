"""One job of two commits, run back to back on one machine: the per-job cost compared without the noise of a whole demo.

A whole `make demo` per commit takes 20-30 minutes on a 2-core machine, and two of them in a row rarely see the same
load. This runs the same (stage, run) job of two finished checkouts alternately (A B B A A B ...), each in a scratch
copy of its study (results hard-linked; the MLflow store copied, since jobs write to it), and measures each job's
process (user + system CPU-s of it and its children, wall-s, peak RSS) with `wait4`. The jobs read their own
commit's finished inputs, so each side runs exactly the job its `make demo` runs.

Each checkout needs `.venv` and a finished `results/<study>`. A commit from before the (run, seed) layout (no
`seed<k>` folders) is run without `--seed`.

Usage: python bench/job_ab.py OLD_CHECKOUT NEW_CHECKOUT [--job pretrain:drc-r3 ...] [--reps 3] [--study demo]
       [--out bench/results/job_ab.json]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dinorankclip.io import write_json

DEFAULT_JOBS = ("pretrain:drc-r3", "evaluate:drc-r3", "finetune:drc-r3-kuea")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "job_ab.json"
SEED = 0


def scratch_study(checkout: Path, study: str, into: Path) -> Path:
    """A working copy of `checkout` in `into`: its files linked, its study's results hard-linked, its MLflow store a
    real copy. A job replaces its outputs by renames and never writes into an input, so the checkout is untouched."""
    into.mkdir(parents=True)
    for entry in checkout.iterdir():
        if entry.name not in ("results", ".git"):
            (into / entry.name).symlink_to(entry)
    results = into / "results" / study
    shutil.copytree(checkout / "results" / study, results, copy_function=os.link,
                    ignore=shutil.ignore_patterns("mlflow.db", "state"))
    shutil.copy2(checkout / "results" / study / "mlflow.db", results / "mlflow.db")
    return into


def job_paths(tree: Path, study: str, stage: str, run: str) -> tuple[list[str], list[Path]]:
    """The job's CLI arguments and the folders it writes (removed before each repetition)."""
    done = tree / "results" / study / stage / run
    seeded = (done / f"seed{SEED}").is_dir()
    args = ["--run", run] + (["--seed", str(SEED)] if seeded else [])
    part = [f"seed{SEED}"] if seeded else []
    return args, [done.joinpath(*part), tree.joinpath("results", study, "state", stage, run, *part)]


def run_job(tree: Path, python: Path, stage: str, args: list[str], outputs: list[Path], log: Path) -> dict:
    """One run of the job in `tree`: its CPU-s (user + system of the process and its children), wall-s, peak RSS."""
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as the Makefile runs jobs
    env.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    start = time.perf_counter()
    with log.open("w") as out:
        job = subprocess.Popen([str(python), "-m", "dinorankclip", stage, *args], cwd=tree, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(job.pid, 0)  # this job's own rusage (and its waited-for children's)
    wall = time.perf_counter() - start
    job.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait for it again
    if job.returncode != 0:
        sys.exit(f"error: {stage} {' '.join(args)} in {tree} exited {job.returncode}; its log: {log}")
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "wall_s": round(wall, 3),
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}


VERSIONS = "import platform, torch, open_clip, mlflow; print(platform.python_version(), 'torch', torch.__version__, " \
           "'open_clip', open_clip.__version__, 'mlflow', mlflow.__version__)"


def machine() -> str:
    """CPU model and count: per-job CPU-s compare only on one machine (machines of this kind differ up to 2.5x)."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    return f"{os.cpu_count()} x {names[0] if names else os.uname().machine}"


def summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 3),
            "sd": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--job", action="append", help=f"stage:run (default: {' '.join(DEFAULT_JOBS)})")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--study", default="demo")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    for side, checkout in sides.items():
        if not (checkout / ".venv" / "bin" / "python").exists() or not (checkout / "results" / args.study).is_dir():
            sys.exit(f"error: {side} checkout {checkout} needs .venv and a finished results/{args.study}")
    commits = {side: subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "?" for side, path in sides.items()}
    versions = {side: subprocess.run([str(path / ".venv" / "bin" / "python"), "-c", VERSIONS], capture_output=True,
                                     text=True).stdout.strip() for side, path in sides.items()}
    report = {"commits": commits, "versions": versions, "machine": machine(), "reps": args.reps, "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="job_ab-") as tmp:
        trees = {side: scratch_study(path, args.study, Path(tmp) / side) for side, path in sides.items()}
        for job in args.job or DEFAULT_JOBS:
            stage, run = job.split(":")
            runs = {"old": [], "new": []}
            for rep in range(args.reps):
                for side in ("old", "new") if rep % 2 == 0 else ("new", "old"):  # A B B A: drift hits both sides
                    job_args, outputs = job_paths(trees[side], args.study, stage, run)
                    measured = run_job(trees[side], sides[side] / ".venv" / "bin" / "python", stage, job_args,
                                       outputs, Path(tmp) / f"{side}-{stage}.log")
                    runs[side].append(measured)
                    print(f"{stage:9s} {run:14s} {side} ({commits[side]}) rep {rep}: {measured['cpu_s']:7.2f} CPU-s "
                          f"{measured['wall_s']:7.2f} s", flush=True)
            entry = {side: {key: summary([r[key] for r in found]) for key in ("cpu_s", "wall_s", "max_rss_mb")}
                     for side, found in runs.items()}
            entry["ratio_cpu"] = round(entry["new"]["cpu_s"]["mean"] / entry["old"]["cpu_s"]["mean"], 3)
            entry["ratio_wall"] = round(entry["new"]["wall_s"]["mean"] / entry["old"]["wall_s"]["mean"], 3)
            report["jobs"][job] = entry
    print(f"\nnew {commits['new']} / old {commits['old']}, {args.reps} runs each, alternating:")
    print(f"{'job':24s} {'old CPU-s':>14s} {'new CPU-s':>14s} {'CPU ratio':>9s} {'wall ratio':>10s}")
    for job, entry in report["jobs"].items():
        old, new = entry["old"]["cpu_s"], entry["new"]["cpu_s"]
        print(f"{job:24s} {old['mean']:7.2f} ± {old['sd']:4.2f} {new['mean']:7.2f} ± {new['sd']:4.2f} "
              f"{entry['ratio_cpu']:9.2f} {entry['ratio_wall']:10.2f}")
    write_json(args.out, report)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
