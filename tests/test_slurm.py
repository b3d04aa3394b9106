"""The study on a real one-node SLURM cluster (tests/slurm_cluster.py): `snakemake --profile slurm all` on the
reduced study sends every non-local job through sbatch with the profile's account, partitions and GPU requests;
its training job is preempted with `scancel --signal=TERM` and resumes; the evaluations and the trained weights
equal those of the same study run locally."""

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, copy_clone, evaluation_json_count, repo_params, snakemake
from safetensors.torch import load_file
from slurm_cluster import Cluster, memory_mb, scontrol, started, submissions

pytestmark = [pytest.mark.slurm, pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs jobs as their submitter only as root")]
TEST_PROFILE = REPO / "tests" / "slurm_profile"
SLURM_JOBS = {"teacher_weights": 1, "teacher": 1, "captions": 1, "pretrain": 2, "finetune": 1,
              "evaluate": 2}  # pretrain: +1 retry
GPU_RULES = {"teacher", "finetune", "evaluate"}  # gpu: 1 in profiles/default
SIGNAL_AT_STEP = 3


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def preempt_training(clone: Path, cluster: Cluster, log: Path, done: threading.Event, found: dict) -> None:
    """Once the pretraining job logs step SIGNAL_AT_STEP, send it SIGTERM through the scheduler."""
    train_log = clone / "results/demo/logs/pretrain/clip/seed0.log"
    while not done.is_set():
        jobs = submissions(log.read_text(errors="replace")) if log.exists() else []
        pretrain = [job for job, rule in jobs if rule == "pretrain"]
        if pretrain and train_log.exists() and f"step {SIGNAL_AT_STEP}/".encode() in train_log.read_bytes():
            found["job"] = pretrain[0]
            found["scancel"] = subprocess.run(["scancel", "--signal=TERM", pretrain[0]], capture_output=True,
                                              text=True, env={**os.environ, **cluster.env()})
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm_study(cluster, reduced_inputs, tmp_path_factory):
    """The reduced study through the SLURM profile (plus the test cluster's overrides), its training preempted."""
    clone = copy_clone(reduced_inputs, tmp_path_factory.mktemp("slurm"))
    log, done, found = clone / "snakemake.log", threading.Event(), {}
    watcher = threading.Thread(target=preempt_training, args=(clone, cluster, log, done, found), daemon=True)
    watcher.start()
    try:
        text = snakemake(clone, ["--profile", "slurm", "--profile", str(TEST_PROFILE), "all"], timeout=1500, log=log)
    finally:
        done.set()
        watcher.join()
    return clone, text, found


def test_every_job_but_the_local_rules_ran_through_sbatch_as_the_profile_asks(slurm_study, cluster):
    clone, log, _ = slurm_study
    jobs = submissions(log)
    assert {rule: sum(r == rule for _, r in jobs) for _, rule in jobs} == SLURM_JOBS, jobs
    assert "localrule report:" in log  # source and data, local rules too, ran before in the reduced_inputs fixture
    for job, rule in jobs:
        info = scontrol(cluster, job)
        assert info["Account"] == "my-account", (rule, info["Account"])  # slurm/config.yaml's default-resources
        assert info["Partition"] == ("gpu" if rule in GPU_RULES else "cpu"), (rule, info["Partition"])
        assert info.get("TresPerJob") == ("gres:gpu:1" if rule in GPU_RULES else None), (rule, info)
        assert info["StdOut"].startswith(str(clone / ".snakemake/slurm_logs" / f"rule_{rule}")), info["StdOut"]
    memory = {rule: memory_mb(scontrol(cluster, job)["MinMemoryNode"]) for job, rule in jobs}
    # pretrain: 60 GB per rank (one CPU process here); the other rules: the workflow profile's
    assert (memory["pretrain"], memory["teacher_weights"]) == (60000, 16000), memory
    cpus = {rule: scontrol(cluster, job)["NumCPUs"] for job, rule in jobs}
    demo = repo_params()["studies"]["demo"]
    teacher = str(demo["teacher"]["threads"])  # 1 since the demo teacher trains beside the runs that need none
    assert cpus == {"teacher_weights": teacher, "teacher": teacher, "captions": "1", "pretrain": "1", "finetune": "1",
                    "evaluate": "1"}  # threads + loader workers, as params.yaml's demo study sets them


def test_slurm_and_local_runs_give_the_same_evaluations(slurm_study, local_study):
    clone, _, _ = slurm_study
    files = sorted(p.relative_to(local_study) for p in (local_study / "results/demo/evaluate").rglob("*.json"))
    evaluations = [path for path in files if path.parent.name != "items"]  # items/: per-image records, compared too
    assert len(evaluations) == evaluation_json_count(local_study) == 16  # 2 runs x (6 suites, 1 probe, 1 gap)
    for path in files:
        assert (clone / path).read_bytes() == (local_study / path).read_bytes(), path
    # the report's numbers too, its compute column included: exact training FLOPs, not a clock reading
    tables = [pd.read_csv(root / "results/demo/report/main.csv", index_col="run") for root in (clone, local_study)]
    assert (tables[0].loc[["clip", "clip-kuea"], "train PFLOP"] > 0).all()
    pd.testing.assert_frame_equal(*tables, check_exact=True)


def test_preempted_training_checkpoints_resumes_and_ends_bit_identical(slurm_study, local_study, cluster):
    clone, log, found = slurm_study
    assert "job" in found, "the training job was never seen logging a step, so it was not signalled"
    assert found["scancel"].returncode == 0, found["scancel"].stderr
    first, retry = [job for job, rule in submissions(log) if rule == "pretrain"]
    assert first == found["job"]
    assert scontrol(cluster, first)["JobState"] == "FAILED" and scontrol(cluster, retry)["JobState"] == "COMPLETED"
    resumed = re.search(r"(\d+) steps of \d+ \((\d+) epochs\).*resumed at step (\d+)",
                        (clone / "results/demo/logs/pretrain/clip/seed0.log").read_text(errors="replace"))
    assert resumed, "the retried training job did not resume from a checkpoint"
    total, epochs, step = map(int, resumed.groups())
    # only the SIGTERM handler writes a checkpoint before the first epoch ends (checkpoint_every is 50 steps)
    assert SIGNAL_AT_STEP <= step < total // epochs, (step, total)
    for which in ("model", "best"):
        ours = load_file(clone / f"results/demo/pretrain/clip/seed0/{which}/open_clip_model.safetensors")
        theirs = load_file(local_study / f"results/demo/pretrain/clip/seed0/{which}/open_clip_model.safetensors")
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours), which


def test_start_is_idempotent_and_stop_leaves_no_daemon(cluster):
    running = cluster.running()
    assert all(running.values()), running
    since = {daemon: started(pid) for daemon, pid in running.items()}
    cluster.start()
    assert cluster.running() == running
    cluster.stop()
    assert not any(cluster.running().values())
    survivors = {daemon: pid for daemon, pid in running.items() if started(pid) == since[daemon]}
    # each daemon's process gone, a zombie, or its PID now another process's; else say what the survivor is doing
    assert not survivors, {daemon: Path(f"/proc/{pid}/status").read_text().splitlines()[:3]
                           for daemon, pid in survivors.items()}
    assert not Path("/etc/slurm/slurm.conf").is_symlink()
