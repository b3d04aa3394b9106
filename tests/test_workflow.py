"""The workflow definitions: lint-clean, a paper-scale dry run from a fresh clone, DVC and Snakemake in step."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO, snapshot_repo, venv_env

from dinorankclip.launch import training_command, training_resources

TEACHER_STAGES = ("teacher_weights", "teacher")
PER_RUN_LISTED = {"pretrain": TEACHER_STAGES + ("captions",), "finetune": TEACHER_STAGES}
CODE_DEP = "src/dinorankclip"  # a DVC-only dependency: dvc.lock records which code made each artifact


def run(cmd, cwd, timeout=300):
    return subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    return snapshot_repo(tmp_path_factory.mktemp("clone"))


def test_snakemake_lint_reports_nothing():
    result = run(["snakemake", "--lint"], REPO)
    assert "Lints for" not in result.stdout + result.stderr, result.stdout
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def job_counts(dry_run_output: str) -> dict[str, int]:
    lines = dry_run_output.split("Job stats:")[1].splitlines()
    counts = {}
    for line in lines[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_paper_dry_run_on_a_fresh_clone_lists_every_job(fresh_clone, params):
    result = run(["snakemake", "-n", "--profile", "slurm", "all", "--config", "study=paper"], fresh_clone)
    assert result.returncode == 0, result.stderr[-3000:]
    runs, tuned = len(params["runs"]), len(params["finetune_runs"])
    assert tuned >= 2 and params["finetune_runs"]["clip-kuea"] == "clip"
    assert job_counts(result.stdout) == {"all": 1, "data": 1, "evaluate": runs + tuned, "finetune": tuned,
                                         "pretrain": runs, "report": 1, "source": 1, "teacher": 1,
                                         "teacher_weights": 1, "captions": 1, "total": 7 + 2 * runs + 2 * tuned}
    assert "results/paper/pretrain/clip" in result.stdout and "MissingInput" not in result.stdout + result.stderr
    evaluate_inputs = "results/paper/source, results/paper/teacher_weights, results/paper/finetune/clip-kuea/seed0"
    assert f"input: {evaluate_inputs}" in result.stdout


def dry_run_jobs(cwd: Path) -> list[dict[str, str]]:
    """Every job in the demo DAG as a forced dry run lists it: its rule and its indented fields (input, output,
    wildcards, priority, ...) as text."""
    result = run(["snakemake", "-n", "--forceall"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = []
    for line in result.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            jobs.append({"rule": line.split()[1].rstrip(":")})
        elif line.startswith("    ") and jobs and ": " in line:
            key, _, value = line.strip().partition(": ")
            jobs[-1][key] = value
    return jobs


def snakemake_jobs(cwd: Path) -> dict[str, set[str]]:
    """{output path: input paths} of every job in the demo DAG, from a forced dry run's job listing."""
    return {job["output"]: set(filter(None, job.get("input", "").split(", ")))
            for job in dry_run_jobs(cwd) if job.get("output")}


def dvc_stages(cwd: Path) -> dict[str, set[str]]:
    """{output path: file dependencies} of every stage in dvc.yaml, resolved for the study in params.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(cwd)) as repo:
        return {str(out.def_path): {str(dep.def_path) for dep in stage.deps if not isinstance(dep, ParamsDependency)}
                for stage in repo.index.stages for out in stage.outs}


def covered(path: str, by: str) -> bool:
    return path == by or path.startswith(by.rstrip("/") + "/")


def test_dvc_and_snakemake_agree_on_every_stage(fresh_clone):
    snake, dvc = snakemake_jobs(fresh_clone), dvc_stages(fresh_clone)
    assert set(snake) == set(dvc), "stages with different outputs"
    for output, inputs in snake.items():
        deps = dvc[output] - {CODE_DEP}
        assert CODE_DEP in dvc[output], f"{output}: the DVC stage must depend on the package source"
        for path in inputs:
            assert any(covered(path, dep) for dep in deps), f"{output}: Snakemake input {path} missing in dvc.yaml"
        for dep in deps:
            if any(f"/{stage}/" in output and Path(dep).name in listed for stage, listed in PER_RUN_LISTED.items()):
                continue  # dvc.yaml lists these stages for every run (its templates cannot select by run)
            assert any(covered(path, dep) for path in inputs), f"{output}: dvc.yaml dependency {dep} not in Snakefile"


def test_the_teacher_and_each_finetuning_chain_are_scheduled_first(fresh_clone, params):
    """Priorities in the demo DAG: the teacher stages highest, then every fine-tuning and the pretraining of the
    run it starts from (the longest chain left once the teacher is there), and nothing else."""
    priorities = {(job["rule"], dict(pair.split("=") for pair in job.get("wildcards", "run=").split(", "))["run"]):
                  int(job["priority"]) for job in dry_run_jobs(fresh_clone) if "priority" in job}
    starts = set(params["finetune_runs"].values())
    assert starts and priorities.pop(("teacher_weights", "")) == priorities.pop(("teacher", "")) == 10
    assert set(priorities.values()) == {5}
    tuned = {("finetune", run) for run in params["finetune_runs"]}
    assert set(priorities) == {("pretrain", run) for run in starts} | tuned


def test_drift_is_detected(fresh_clone, tmp_path):
    """The comparison above can fail: drop a dependency from dvc.yaml and it must."""
    clone = tmp_path / "drift"
    shutil.copytree(fresh_clone, clone)
    dvc_yaml = yaml.safe_load((clone / "dvc.yaml").read_text())
    dvc_yaml["stages"]["evaluate"]["do"]["deps"].remove("results/demo/source")
    (clone / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    snake, dvc = snakemake_jobs(clone), dvc_stages(clone)
    evaluate = next(o for o in snake if "/evaluate/" in o)
    assert not any(covered(path, dep) for path in snake[evaluate] if "source" in path for dep in dvc[evaluate])


def test_dvc_yaml_is_generated_from_params_and_a_stale_one_stops_dvc(fresh_clone, tmp_path):
    """dvc.yaml is what `dinorankclip dvc-yaml` writes for params.yaml; after a change of the study's (run, seed)
    pairs, a stage started by `dvc repro` refuses to run until dvc.yaml is regenerated."""
    assert run(["dinorankclip", "dvc-yaml", "--check"], fresh_clone).returncode == 0
    clone = tmp_path / "stale"
    shutil.copytree(fresh_clone, clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["studies"]["demo"]["seeds"] = {"default": [0], "clip": [0, 1]}
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = run(["dvc", "repro", "--single-item", "source"], clone)
    assert stale.returncode != 0 and "dvc.yaml does not match params.yaml" in stale.stdout + stale.stderr
    assert not (clone / "results" / "demo" / "source").exists()
    assert run(["dinorankclip", "dvc-yaml"], clone).returncode == 0
    stages = dvc_stages(clone)
    assert {"results/demo/pretrain/clip/seed1", "results/demo/evaluate/clip/seed1"} <= set(stages)
    assert "results/demo/pretrain/cyclip/seed1" not in stages


def test_conda_env_pins_what_the_lock_pins(tmp_path):
    uv = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")
    regenerated = tmp_path / "envs"
    shutil.copytree(REPO / "envs", regenerated)
    shutil.copy(REPO / "uv.lock", tmp_path)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "README.md").write_text("")
    result = subprocess.run(["bash", str(regenerated / "export-from-lock.sh")], env={**venv_env(), "UV": uv},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (regenerated / "dinorankclip.yaml").read_text() == (REPO / "envs" / "dinorankclip.yaml").read_text()


def test_dvc_parses_params_with_libyaml_and_reads_the_same_values():
    """DVC parses params.yaml with ruamel's safe loader twice for every stage it commits or checks (3 s of the demo's
    `dvc commit`); ruamel.yaml.clib makes that libyaml. Its values must be the pure-Python parser's, or dvc.lock
    would record other params than before."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__module__.startswith("ruamel.yaml.clib"), "ruamel.yaml.clib is not installed"
    text = (REPO / "params.yaml").read_text()
    assert parse_yaml(text, "params.yaml") == YAML(typ="safe", pure=True).load(text)


@pytest.mark.parametrize(("gpus", "nodes", "command", "resources"), [
    # one node: no `mpi` key at all, so the jobstep runs the job in `srun -n1`, a job step that SLURM's signals reach
    (0, 1, "python -m dinorankclip --study s", {"gpu": 0, "nodes": 1, "tasks": 1}),
    # torchrun: `--` keeps the stage's `--run` from its own parser (an ambiguous abbreviation of `--run-path`)
    (8, 1, "torchrun --standalone --nproc_per_node=8 -m dinorankclip -- --study s", {"gpu": 8, "nodes": 1, "tasks": 1}),
    # K nodes: srun is told the layout and each task reads the first node from its own step (the jobstep clears
    # SLURM_JOB_NODELIST in the job's shell); run for real on two nodes in tests/test_preflight_multinode.py
    (4, 2, "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 bash -c 'exec torchrun --nnodes=2 --nproc_per_node=4 "
           "--rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID --rdzv_endpoint=$(scontrol show hostnames "
           "\"$SLURM_JOB_NODELIST\" | head -n1):29500 -m dinorankclip -- --study s \"$@\"' torchrun",
     {"gpu": 0, "nodes": 2, "tasks": 2, "gres": "gpu:4", "mpi": "srun"}),
])
def test_training_jobs_launch_one_process_torchrun_or_srun_torchrun(gpus, nodes, command, resources):
    pretrain = {"gpus_per_node": gpus, "nodes": nodes}
    assert training_command(pretrain, "s") == command
    assert training_command(pretrain, "s", "PYTHONPATH=src") == f"PYTHONPATH=src {command}"
    assert training_resources(pretrain) == {**resources, "tasks_per_gpu": 0}
