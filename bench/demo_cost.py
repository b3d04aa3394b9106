"""CPU-seconds per job of a study's stages, from Snakemake's benchmark files and the jobs' own cost lines.

Every rule writes `<results>/benchmarks/<stage>/<job>.tsv` (Snakemake's `benchmark:` directive: `s` wall seconds,
`cpu_time` user + system seconds of the job's processes, `max_rss` MB) and its log `<results>/logs/<stage>/<job>.log`.
Jobs of this commit on log two lines (`dinorankclip.cli`): their start-up (CPU-s from process start until the
stage's code is imported and its MLflow run started) and their whole CPU-s at the end. The logged total is exact;
Snakemake samples `cpu_time` every 30 s once a job is 15 s old, so it can miss up to a job's last 30 s. A job's CPU is
therefore the logged total where there is one, else `cpu_time`; `--compare` uses `cpu_time` for a stage unless both
sides logged every job of it, so two commits are compared by the same measure.

Under `make demo`'s fork server (src/dinorankclip/forkserver.py) a job's processes are a waiting process (all that
`cpu_time` sees) and a fork of the server (all that its logged total counts), and the libraries were loaded once, by
the server (`<results>/logs/forkserver.log`). A forked job's CPU is its logged total plus an equal share of that
loading; a stage with forked jobs on either side is compared by each side's own measure ("mixed").

Usage: python bench/demo_cost.py [RESULTS_DIR (default results/demo)] [--compare OTHER_RESULTS_DIR]
       [--out bench/results/demo_cost.json]
Prints the per-stage table (and the ratios this / other with --compare) and writes the JSON report to --out.
"""

import argparse
import csv
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

from dinorankclip.cli import FINISHED, STARTUP
from dinorankclip.forkserver import FORKED, SERVED
from dinorankclip.io import write_json

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "demo_cost.json"


class Job(NamedTuple):
    stage: str
    name: str
    wall: float  # Snakemake's `s`
    cpu_benchmark: float | None  # Snakemake's `cpu_time` (None: NA, a job too short to sample)
    max_rss: float | None
    startup_cpu: float | None  # from the job's log, summed over its processes (ranks; not a torchrun launcher)
    logged_cpu: float | None
    server_share: float | None = None  # a forked job's share of the fork server's loading (None: not forked)

    @property
    def cpu(self) -> float | None:
        if self.logged_cpu is None:
            return self.cpu_benchmark
        return self.logged_cpu + (self.server_share or 0.0)


def number(text: str) -> float | None:
    return None if text in ("", "NA", "-") else float(text)


def logged(log: Path, pattern) -> float | None:
    """The CPU-s of the job's lines matching `pattern`, summed over its processes; None without such a line."""
    if not log.is_file():
        return None
    found = [float(m["cpu"]) for m in pattern.finditer(log.read_text(errors="replace"))]
    return sum(found) if found else None


def server_share(results: Path) -> float:
    """CPU-s the fork server spent loading libraries per job it ran, over every workflow run it recorded (0: none)."""
    log = results / "logs" / "forkserver.log"
    runs = [(float(m["cpu"]), int(m["jobs"])) for m in SERVED.finditer(log.read_text())] if log.is_file() else []
    jobs = sum(n for _, n in runs)
    return sum(cpu for cpu, _ in runs) / jobs if jobs else 0.0


def read_jobs(results: Path) -> list[Job]:
    """One Job per benchmark file under `results`/benchmarks (a file of repeats: their means): a study-wide job's
    `<stage>/<stage>.tsv`, a (run, seed)'s `<stage>/<run>/seed<k>.tsv`."""
    share = server_share(results)
    root = results / "benchmarks"
    files = sorted(root.glob("*/**/*.tsv"))
    if not files:
        raise FileNotFoundError(f"{results}/benchmarks: no Snakemake benchmark files (<stage>/<job>.tsv)")
    jobs = []
    for file in files:
        with file.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows or not {"s", "cpu_time", "max_rss"} <= rows[0].keys():
            raise ValueError(f"{file}: not a Snakemake benchmark file (columns s, cpu_time, max_rss)")

        def mean(column: str, rows=rows, file=file) -> float | None:
            try:
                values = [number(row[column]) for row in rows]
            except ValueError as err:
                raise ValueError(f"{file}: column {column}: {err}") from None
            return None if None in values else statistics.fmean(values)

        stage, *job = file.relative_to(root).with_suffix("").parts
        log = results / "logs" / stage / f"{'/'.join(job)}.log"
        forked = log.is_file() and FORKED.search(log.read_text(errors="replace")) is not None
        jobs.append(Job(stage, "/".join(job), mean("s"), None if forked else mean("cpu_time"),
                        None if forked else mean("max_rss"), logged(log, STARTUP), logged(log, FINISHED),
                        share if forked else None))
    return jobs


def spread(values: list[float]) -> dict | None:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "total": sum(values)} \
        if values else None


def summary(jobs: list[Job]) -> dict:
    """Per-job CPU-s and wall-s of a group of jobs, with the start-up / work split of those that log it."""
    cpu = [j.cpu for j in jobs if j.cpu is not None]
    split = [j for j in jobs if j.startup_cpu is not None and j.logged_cpu is not None]
    rss = [j.max_rss for j in jobs if j.max_rss is not None]
    sources = {"log" if j.logged_cpu is not None else "benchmark" for j in jobs if j.cpu is not None}
    return {"jobs": len(jobs), "cpu_s": spread(cpu), "wall_s": spread([j.wall for j in jobs]),
            "cpu_source": sorted(sources), "forked": sum(j.server_share is not None for j in jobs),
            "benchmark_cpu_s": spread([j.cpu_benchmark for j in jobs if j.cpu_benchmark is not None]),
            "startup_cpu_s": spread([j.startup_cpu for j in split]),
            "work_cpu_s": spread([j.logged_cpu - j.startup_cpu for j in split]),
            "max_rss_mb": max(rss) if rss else None}


def report(results: Path) -> dict:
    jobs = read_jobs(results)
    stages = sorted({j.stage for j in jobs})
    return {"results": str(results), "stages": {s: summary([j for j in jobs if j.stage == s]) for s in stages},
            "all": summary(jobs), "server_share_cpu_s": server_share(results)}


def ratios(this: dict, other: dict) -> dict:
    """this / other per stage (and over all jobs): CPU-s per job, by the measure both sides have, and wall-s per job."""
    out = {}
    for stage in sorted(this["stages"].keys() & other["stages"].keys()) + ["all"]:
        a = this["all"] if stage == "all" else this["stages"][stage]
        b = other["all"] if stage == "all" else other["stages"][stage]
        both_logged = a["cpu_source"] == b["cpu_source"] == ["log"]
        measure = "log" if both_logged else "mixed" if a["forked"] or b["forked"] else "benchmark"
        key = "benchmark_cpu_s" if measure == "benchmark" else "cpu_s"
        cpu = a[key]["mean"] / b[key]["mean"] if a[key] and b[key] else None
        out[stage] = {"cpu_per_job": cpu, "cpu_measure": measure,
                      "wall_per_job": a["wall_s"]["mean"] / b["wall_s"]["mean"]}
    return out


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rep: dict) -> str:
    head = ("stage", "jobs", "CPU-s/job", "min", "max", "CPU-s all", "wall-s/job", "start-up", "work", "RSS MB")
    rows = [head]
    for stage, s in [*rep["stages"].items(), ("all", rep["all"])]:
        cpu, su, wk = s["cpu_s"] or {}, s["startup_cpu_s"] or {}, s["work_cpu_s"] or {}
        rows.append((stage, str(s["jobs"]), fmt(cpu.get("mean")), fmt(cpu.get("min")), fmt(cpu.get("max")),
                     fmt(cpu.get("total")), fmt(s["wall_s"]["mean"]), fmt(su.get("mean")), fmt(wk.get("mean")),
                     fmt(s["max_rss_mb"], 0)))
    return render(rows)


def ratio_table(compare: dict) -> str:
    rows = [("stage", "CPU/job ratio", "measure", "wall/job ratio")]
    rows += [(stage, fmt(r["cpu_per_job"], 2), r["cpu_measure"], fmt(r["wall_per_job"], 2))
             for stage, r in compare.items()]
    return render(rows)


def render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", type=Path, default=Path("results/demo"), help="a study's results folder")
    p.add_argument("--compare", type=Path, help="another commit's results folder: ratios this / other per stage")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report")
    args = p.parse_args(argv)
    try:
        rep = report(args.results)
        if args.compare:
            rep["compare"] = {"other": str(args.compare), "ratios": ratios(rep, report(args.compare))}
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.results}: CPU-s and wall-s per job (start-up / work: jobs that log them)")
    print(table(rep))
    if rep["all"]["forked"]:
        print(f"{rep['all']['forked']} jobs ran as forks of the fork server: each carries "
              f"{rep['server_share_cpu_s']:.2f} CPU-s of its loading, besides its own CPU-s")
    if args.compare:
        print(f"\nthis / {args.compare}:")
        print(ratio_table(rep["compare"]["ratios"]))
    write_json(args.out, rep)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
