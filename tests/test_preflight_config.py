"""Studies selected from a file of their own: `extends`, merged over params.yaml by Snakemake's --configfile and by
`--params`, expanded before validation (errors name the key), and seen by the jobs; the ranking window refused
when a step ranks fewer candidates."""

import subprocess

import pytest
import yaml
from helpers import REPO, only_runs, snapshot_repo, venv_env

from dinorankclip.config import (
    ParamsError,
    deep_merge,
    expand_studies,
    load_params,
    resolve,
    run_names,
    validate_params,
)

PREFLIGHT = REPO / "studies" / "preflight.yaml"


def test_a_study_extends_another_with_its_own_keys_deep_merged(params):
    params["studies"]["small"] = {"extends": "paper", "runs": ["clip"], "finetune_runs": {},
                                  "pretrain": {"batch_size": 4}, "evaluate": {"suites": [
                                      {"dataset": "wds/vtab/cifar10", "task": "zeroshot_classification"}]}}
    params["studies"]["smaller"] = {"extends": "small", "pretrain": {"max_steps": 1}}
    expanded = validate_params(params)
    assert "extends" not in expanded["studies"]["small"] and "extends" in params["studies"]["small"]  # input kept
    small, smaller, paper = (resolve(expanded, name) for name in ("small", "smaller", "paper"))
    assert small["pretrain"] == {**paper["pretrain"], "batch_size": 4}  # a mapping merges key by key
    assert small["evaluate"]["suites"] == [{"dataset": "wds/vtab/cifar10", "task": "zeroshot_classification"}]
    assert small["evaluate"]["linear_probe"] == paper["evaluate"]["linear_probe"]  # a list replaces, the rest stays
    assert smaller["pretrain"] == {**small["pretrain"], "max_steps": 1}  # a chain of two
    assert run_names(expanded, "smaller") == ["clip"] and small["teacher"] == paper["teacher"]


@pytest.mark.parametrize("blocks, message", [
    ({"x": {"extends": "nope"}}, "studies.x.extends: 'nope' is not one of studies"),
    ({"x": {"extends": ["paper"]}}, "studies.x.extends: ['paper'] is not one of studies"),
    ({"x": {"extends": "y"}, "y": {"extends": "x"}}, "studies.y.extends: studies extend each other in a cycle "
                                                     "(x -> y -> x)"),
    ({"x": {"extends": "paper", "pretrain": {"lr": -1}}},
     "studies.x.pretrain.lr: -1 is less than or equal to the minimum of 0"),
    ({"x": {"extends": "paper", "teacher": {"blockz": [1]}}}, "studies.x.teacher.blockz: unknown key"),
    ({"x": {"extends": "demo", "runs": ["clip", "drc-r3"], "pretrain": {"batch_size": 4}}},
     "runs.drc-r3: loss.window 8 in study x exceeds the 4 candidates a step ranks (pretrain.batch_size 4, "
     "val_samples 256); set studies.x.loss.window <= 4"),
    ({"x": {"extends": "demo", "pretrain": {"val_samples": 6}}},
     "runs.drc-r2: loss.window 8 in study x exceeds the 6 candidates"),
])
def test_an_extended_study_is_validated_after_expansion_naming_the_key(params, blocks, message):
    params["studies"].update(blocks)
    with pytest.raises(ParamsError) as err:
        validate_params(params, "params.yaml")
    assert str(err.value).startswith("params.yaml is invalid:\n  ") and message in str(err.value)


def test_the_window_rule_only_looks_at_the_runs_a_study_trains(params):
    only_runs(params["studies"]["demo"], ["clip", "rankclip", "drc-r1"], {})  # orders 0 and 1 have no window
    params["studies"]["demo"]["pretrain"]["batch_size"] = 4
    validate_params(params)
    assert expand_studies(params) == params  # nothing to expand: the same parameters


def test_the_preflight_study_is_the_paper_study_except_counts():
    params = load_params([REPO / "params.yaml", PREFLIGHT])
    raw = yaml.safe_load(PREFLIGHT.read_text())["studies"]["preflight"]
    assert raw["extends"] == "paper"
    paper, preflight = resolve(params, "paper", "drc-r3"), resolve(params, "preflight", "drc-r3")
    # every setting the block does not name is the paper's, down to the teacher file's path and the suites' root
    assert deep_merge(paper, {k: v for k, v in raw.items() if k not in ("extends", "runs", "finetune_runs")}) == {
        **preflight, "study": "paper"}
    assert preflight["model"]["arch"] == "ViT-B-16" and preflight["teacher"]["blocks"] == [5, 8, 11]
    assert preflight["teacher"]["weights"]["path"] == paper["teacher"]["weights"]["path"]
    assert (preflight["pretrain"]["batch_size"], preflight["pretrain"]["max_steps"]) == (2, 1)


def test_snakemake_merges_a_study_file_over_params_yaml_and_jobs_see_the_expanded_study(tmp_path):
    """`snakemake --configfile <study file> --config study=<name>` with a nested override: the source job (a local
    caption list) writes the configuration it resolved, which has the file's keys, the extended study's others and
    the command line's study."""
    clone = snapshot_repo(tmp_path / "clone")
    (clone / "list.tsv").write_text("a red circle\thttp://127.0.0.1:9/a.jpg\nno url here\n")
    (clone / "tiny.yaml").write_text(yaml.safe_dump({"studies": {"tiny": {
        "extends": "paper", "runs": ["clip"], "finetune_runs": {},
        "source": {"tsv": "list.tsv", "validation_tsv": None}, "data": {"shard_size": 5}}}}))
    result = subprocess.run(["snakemake", "--cores", "1", "results/tiny/source", "--configfile", "tiny.yaml",
                             "--config", "study=tiny"], cwd=clone, env=venv_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load((clone / "results/tiny/source/config.yaml").read_text())
    assert cfg["study"] == "tiny" and cfg["source"] == {"kind": "cc3m", "tsv": "list.tsv", "validation_tsv": None}
    paper = yaml.safe_load((REPO / "params.yaml").read_text())["studies"]["paper"]
    assert cfg["data"] == {**paper["data"], "shard_size": 5} and cfg["teacher"] == paper["teacher"]
    assert (clone / "results/tiny/source/train.tsv").read_text() == "caption\turl\na red circle\thttp://127.0.0.1:9/a.jpg\n"
    assert (clone / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()  # nothing edited


def dry_run_jobs(clone, *args) -> dict[str, dict]:
    """{rule: resources} of a paper-study dry run through the SLURM profile."""
    result = subprocess.run(["snakemake", "-n", "--profile", "slurm", "all", "--config", "study=paper", *args],
                            cwd=clone, env=venv_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs, current = {}, None
    for line in result.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            current = jobs.setdefault(line.rstrip(":").split()[-1], {})
        elif line.startswith("    resources: ") and current is not None:
            current.update(item.split("=", 1) for item in line.split(": ", 1)[1].split(", "))
    return jobs


def test_cpus_memory_and_gpus_reach_sbatch_as_configured(tmp_path):
    """The paper study's dry run: every job's CPUs (threads + loader workers, per rank) as cpus_per_task, which
    the plugin passes to sbatch, whatever --cores caps `threads` at on the machine running Snakemake; pretrain's
    memory per rank. (The data stage as a cluster job runs for real in tests/test_preflight_study.py.)"""
    clone = snapshot_repo(tmp_path / "clone")
    jobs = dry_run_jobs(clone, "--cores", "2")
    assert {rule: resources.get("cpus_per_task") for rule, resources in jobs.items()} == {
        "source": None, "data": "16", "teacher_weights": "8", "teacher": "8", "captions": "14", "pretrain": "128",
        "finetune": "16", "evaluate": "16", "report": None, "all": None}
    assert (jobs["pretrain"]["gpu"], jobs["pretrain"]["mem_mb"]) == ("8", "480000")  # 8 ranks x 60 GB
    assert jobs["captions"]["gpu"] == "1"  # the paper's second captions are CoCa's
    (clone / "four.yaml").write_text("studies: {paper: {pretrain: {gpus_per_node: 4, workers: 2}}}\n")
    pretrain = dry_run_jobs(clone, "--configfile", "four.yaml")["pretrain"]
    assert (pretrain["gpu"], pretrain["mem_mb"], pretrain["cpus_per_task"]) == ("4", "240000", "40")
