"""DVC round trips on the reduced study run locally: push to a local-directory remote, pull into a fresh clone
(hash-identical, `dvc status` clean), one changed parameter re-runs exactly its dependent stages, and
`dvc params diff` / `dvc metrics show` print the study's parameters and metrics."""

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import copy_clone, evaluation_json_count, venv_env

pytestmark = pytest.mark.e2e


def sh(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    result = subprocess.run(cmd, cwd=cwd, env={**venv_env(), "PYTHONPATH": str(cwd / "src")}, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def dvc_outputs(clone: Path) -> dict[str, str]:
    """sha256 of every file under every output recorded in dvc.lock, except Snakemake's `.snakemake_timestamp`
    markers, which `.dvcignore` hides from DVC (so they are neither hashed, pushed nor pulled)."""
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    roots = {out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    assert roots, "dvc.lock records no outputs"
    return {str(f.relative_to(clone)): hashlib.sha256(f.read_bytes()).hexdigest()
            for root in roots for f in sorted((clone / root).rglob("*"))
            if f.is_file() and f.name != ".snakemake_timestamp"}


@pytest.fixture(scope="module")
def pushed(local_study, tmp_path_factory):
    """The locally run study, committed to dvc.lock and git, and pushed to a directory remote."""
    origin = copy_clone(local_study, tmp_path_factory.mktemp("origin"))
    remote = tmp_path_factory.mktemp("dvc-remote")
    sh(["dvc", "commit", "--force", "--quiet"], origin)
    sh(["dvc", "remote", "add", "--default", "store", str(remote)], origin)
    sh(["git", "add", "dvc.lock", ".dvc/config"], origin)
    sh(["git", "commit", "-qm", "study results recorded by DVC"], origin)
    pushed = sh(["dvc", "push"], origin)
    return origin, remote, pushed


@pytest.fixture(scope="module")
def pulled(pushed, tmp_path_factory):
    origin, _, _ = pushed
    fresh = tmp_path_factory.mktemp("fresh") / "clone"
    sh(["git", "clone", "-q", str(origin), str(fresh)], origin.parent)
    assert not (fresh / "results").exists()
    pulled = sh(["dvc", "pull"], fresh)
    return fresh, pulled


def test_push_then_pull_into_a_fresh_clone_gives_identical_artifacts(pushed, pulled):
    origin, remote, push_log = pushed
    fresh, pull_log = pulled
    files = dvc_outputs(origin)
    assert dvc_outputs(fresh) == files
    assert any(p.startswith("results/demo/pretrain/clip/seed0/model/") for p in files)
    assert any(p.startswith("results/demo/evaluate/clip-kuea/") for p in files)
    pushed_n = int(re.search(r"(\d+) files? pushed", push_log).group(1))
    assert pushed_n == sum(1 for f in (remote / "files").rglob("*") if f.is_file()) > 0
    assert re.search(r"\d+ files? (fetched|added)", pull_log), pull_log
    assert "Data and pipelines are up to date." in sh(["dvc", "status"], fresh)


def test_a_changed_parameter_reruns_exactly_the_stages_that_read_it(pulled):
    fresh, _ = pulled
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["studies"]["demo"]["evaluate"]["batch_size"] = 64
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    diff = sh(["dvc", "params", "diff"], fresh)
    assert re.search(r"params\.yaml\s+studies\.demo\.evaluate\.batch_size\s+256\s+64", diff), diff
    log = sh(["dvc", "repro", "report"], fresh)
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert ran == {"evaluate@clip-seed0", "evaluate_finetuned@clip-kuea-seed0", "report"}, log
    for skipped in ("source", "data", "teacher_weights", "teacher", "captions", "pretrain@clip-seed0",
                    "finetune@clip-kuea-seed0"):
        assert f"Stage '{skipped}' didn't change, skipping" in log, (skipped, log)
    assert "Data and pipelines are up to date." in sh(["dvc", "status"], fresh)


def test_metrics_show_prints_every_evaluation(pushed):
    origin, _, _ = pushed
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], origin))
    # per-item records (items/<suite>.json: which test images each model got right, for the report's paired
    # tests) sit in the same output; they are not metrics
    metrics = {path: data["data"] for path, data in shown[""]["data"].items()
               if path.endswith(".json") and "/items/" not in path}
    expected = sorted(str(p.relative_to(origin)) for p in (origin / "results/demo/evaluate").rglob("*.json")
                      if p.parent.name != "items")
    assert sorted(metrics) == expected and len(expected) == evaluation_json_count(origin) == 16
    retrieval = json.loads((origin / "results/demo/evaluate/clip/seed0/demo-retrieval.json").read_text())["metrics"]
    assert metrics["results/demo/evaluate/clip/seed0/demo-retrieval.json"]["metrics"] == retrieval
    table = sh(["dvc", "metrics", "show"], origin)
    assert "metrics.acc1" in table and "results/demo/evaluate/clip-kuea/seed0/demo-shape.json" in table
