"""Snakemake and DVC agree about what is up to date (issue 20, items 6 and 12), on the reduced study run locally.

Snakemake decides by modification times (a directory output by its `.snakemake_timestamp`), DVC by content hashes.
They used to disagree: timings inside DVC-tracked JSONs made a killed and resumed job look changed to DVC although
its results were byte-identical; a DVC rerun deleted Snakemake's timestamps, so Snakemake wanted to rerun what DVC
called up to date; `dvc metrics show` listed the empty timestamp files; reruns added duplicate MLflow runs. Each
test starts from a copy of the study with its outputs recorded in dvc.lock.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import copy_clone, venv_env

pytestmark = pytest.mark.e2e

CLEAN = "Data and pipelines are up to date."
NOTHING = "Nothing to be done (all requested files are present and up to date)."


def sh(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 1800, check: bool = True) -> str:
    result = subprocess.run(cmd, cwd=cwd, env={**venv_env(), "PYTHONPATH": str(cwd / "src"), **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    assert not check or result.returncode == 0, \
        f"{cmd} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def dvc_status(clone: Path) -> str:
    return sh(["dvc", "status"], clone).strip()


def snakemake_dry(clone: Path) -> str:
    out = sh(["snakemake", "-n", "all"], clone)
    return NOTHING if NOTHING in out else out[-3000:]


def assert_agree(clone: Path) -> None:
    """Both tools call the study up to date."""
    assert dvc_status(clone) == CLEAN
    assert snakemake_dry(clone) == NOTHING


@pytest.fixture(scope="module")
def recorded(local_study, tmp_path_factory) -> Path:
    """The reduced study run by Snakemake, its outputs recorded in dvc.lock (what `make demo` leaves)."""
    clone = copy_clone(local_study, tmp_path_factory.mktemp("recorded"))
    sh(["dvc", "commit", "--force", "--quiet"], clone)
    assert_agree(clone)
    return clone


@pytest.fixture
def study(recorded, tmp_path) -> Path:
    return copy_clone(recorded, tmp_path / "study")


def live_runs(clone: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{clone / 'results/demo/mlflow.db'}")
    experiment = client.get_experiment_by_name("dinorankclip/demo")
    return client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")


def test_no_empty_timestamp_rows_in_dvc_metrics(recorded):
    shown = sh(["dvc", "metrics", "show"], recorded)
    assert ".snakemake_timestamp" not in shown and "results/demo/evaluate/clip/seed0/demo-colour.json" in shown
    assert (recorded / "results/demo/evaluate/clip/seed0/.snakemake_timestamp").exists()  # Snakemake's, kept


def test_a_forced_dvc_rerun_of_an_evaluation_then_the_report_leaves_both_tools_agreeing(study):
    before = live_runs(study, "evaluate/clip/seed0")
    assert len(before) == 1
    log = sh(["dvc", "repro", "-s", "-f", "evaluate@clip-seed0"], study)
    assert "Running stage 'evaluate@clip-seed0'" in log
    assert "results/demo/evaluate/clip/seed0: unchanged, kept as it was" in log
    log = sh(["dvc", "repro", "report"], study)
    assert "Stage 'report' didn't change, skipping" in log
    assert_agree(study)
    (after,) = live_runs(study, "evaluate/clip/seed0")  # the rerun replaced the earlier run: no duplicate
    assert after.info.run_id != before[0].info.run_id


@pytest.mark.parametrize("stage", ["source", "data", "teacher_weights", "teacher", "captions", "pretrain@clip-seed0",
                                   "finetune@clip-kuea-seed0", "evaluate_finetuned@clip-kuea-seed0", "report"])
def test_a_forced_dvc_rerun_of_each_stage_kind_changes_nothing_for_either_tool(study, stage):
    log = sh(["dvc", "repro", "-s", "-f", stage], study)
    assert f"Running stage '{stage}'" in log and "unchanged, kept as it was" in log, log[-3000:]
    assert_agree(study)


def test_a_snakemake_forcerun_leaves_dvc_clean(study):
    log = sh(["snakemake", "--forcerun", "pretrain", "all"], study)
    ran = set(re.findall(r"^(?:local)?rule (\w+):", log, re.M))
    assert ran == {"pretrain", "finetune", "evaluate", "report", "all"}, ran
    assert dvc_status(study) == CLEAN
    assert len(live_runs(study, "pretrain/clip/seed0")) == 1 and len(live_runs(study, "report")) == 1


def test_make_demo_twice_records_once(study):
    """The Makefile's demo recipe (its install step taken as done): the first run records the outputs, the second
    finds no job run since and records nothing."""
    shutil.rmtree(study / "results/demo/report")  # one job for the first `make demo`
    make = ["make", "-o", ".venv/.installed", "-o", "install", "demo"]
    first = sh(make, study)
    assert "dvc commit: recording the outputs in dvc.lock" in first
    second = sh(make, study)
    assert NOTHING in second and "dvc.lock: current (no job ran since the last dvc commit)" in second
    assert_agree(study)


def test_a_killed_and_resumed_teacher_job_leaves_dvc_status_clean(study):
    """Killed after its first feature shard (DVC keeps the old output meanwhile), then rerun: the finished shard
    is reused, the cache comes out byte-identical, and no stage downstream looks changed."""
    killed = subprocess.run(["dvc", "repro", "-s", "-f", "teacher"], cwd=study, capture_output=True, text=True,
                            env={**venv_env(), "DINORANKCLIP_KILL_AT": "teacher:shard"}, timeout=1800)
    assert killed.returncode != 0 and "kill point teacher:shard reached: SIGKILL" in killed.stdout + killed.stderr
    assert any((study / "results/demo/state/teacher").glob("*.tar"))  # the finished shard survives in staging
    sh(["dvc", "repro", "-s", "-f", "teacher"], study)
    timings = json.loads((study / "results/demo/timings/teacher.json").read_text())
    assert timings["images_resumed"] > 0 and timings["images_computed"] > 0
    assert_agree(study)


def test_a_killed_and_resumed_pretraining_job_leaves_dvc_status_clean(study):
    """Trained again from scratch, killed right after its first checkpoint, resumed: the same bytes as before."""
    # the first run pruned its checkpoints once its output was published, so this one starts from scratch
    assert not (study / "results/demo/state/pretrain/clip/seed0").exists()
    killed = subprocess.run(["dvc", "repro", "-s", "-f", "pretrain@clip-seed0"], cwd=study, capture_output=True,
                            text=True, env={**venv_env(), "DINORANKCLIP_KILL_AT": "checkpoint:latest.pt"},
                            timeout=1800)
    assert killed.returncode != 0
    assert "kill point checkpoint:latest.pt reached: SIGKILL" in killed.stdout + killed.stderr
    assert (study / "results/demo/state/pretrain/clip/seed0/latest.pt").exists()
    log = sh(["dvc", "repro", "-s", "-f", "pretrain@clip-seed0"], study)
    assert "unchanged, kept as it was" in log
    timings = json.loads((study / "results/demo/timings/pretrain/clip/seed0.json").read_text())
    assert timings["resumes"] == 1
    assert_agree(study)
