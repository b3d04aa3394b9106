"""params.yaml validation (errors name the key) and the three-layer resolution of a job's configuration."""

import json

import pytest

from dinorankclip.config import (
    PARAMS_ENV,
    ParamsError,
    deep_merge,
    evaluated_runs,
    finetune_runs,
    finetune_stages,
    load_params,
    model_stage,
    pretrain_stages,
    resolve,
    run_names,
    run_seeds,
    seeded,
    suite_names,
    teacher_stages,
    validate_params,
)


def test_repository_params_are_valid(params):
    validate_params(params)
    assert "clip" in run_names(params)
    assert suite_names(params, "demo")[:2] == ["demo-colour", "demo-shape"]
    assert "vtab-cifar10" in suite_names(params, "paper")


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["studies"]["demo"]["pretrain"].update(lr=-1), "studies.demo.pretrain.lr: -1 is less than"),
    (lambda p: p["studies"]["demo"]["pretrain"].update(lrr=1), "studies.demo.pretrain.lrr: unknown key"),
    (lambda p: p["studies"]["paper"]["teacher"].pop("blocks"), "studies.paper.teacher.blocks: required key"),
    (lambda p: p.update(study="nope"), "study: 'nope' is not one of studies"),
    (lambda p: p["runs"].update({"Bad_Name": {}}), "runs: 'Bad_Name' does not match"),
    (lambda p: p["runs"].update(x={"loss": {"name": "nonsense"}}), "runs.x.loss.name: 'nonsense' is not one of"),
    (lambda p: p["studies"]["demo"]["source"].pop("world"), "studies.demo.source.world: required key"),
    (lambda p: p["studies"]["demo"]["evaluate"]["suites"][5].pop("recall_k"),
     "studies.demo.evaluate.suites.5.recall_k: required key"),
    (lambda p: p["studies"]["demo"]["evaluate"]["suites"].append(
        {"dataset": "wds/demo-shape", "task": "zeroshot_classification"}), "benchmarks listed twice: demo-shape"),
    (lambda p: p["runs"]["drc-r3"].update(injection={"variant": "v7"}), "runs.drc-r3.injection.variant: 'v7' is not"),
    (lambda p: p["aliases"].update({"drc-r9": "drc-r8"}), "aliases.drc-r9: names 'drc-r8', which is not in runs"),
    (lambda p: p["aliases"].update({"clip": "drc-r3"}), "aliases.clip: is also the name of a run"),
    (lambda p: p["finetune_runs"].update(rankclip="clip"), "finetune_runs.rankclip: is also the name of a run"),
    (lambda p: p["finetune_runs"].update({"x-kuea": "nope"}), "finetune_runs.x-kuea: starts from 'nope', which is not"),
    (lambda p: p["finetune_runs"].update({"v5-kuea": "drc-r3-fusion-v5"}), "aliases are not accepted: name the run"),
    (lambda p: p["studies"]["demo"]["finetune"].update(data={"kind": "folder"}),
     "studies.demo.finetune.data.path: required key is missing"),
    (lambda p: p["finetune"].update(steps=0), "finetune.steps: 0 is less than the minimum of 1"),
    (lambda p: p["studies"]["paper"]["evaluate"]["linear_probe"].update(val_proportion=1.5),
     "studies.paper.evaluate.linear_probe.val_proportion: 1.5 is greater than or equal to the maximum of 1"),
    (lambda p: p["studies"]["paper"]["evaluate"]["linear_probe"].update(datasets=["cars"]),
     "studies.paper.evaluate.linear_probe.datasets.0: 'cars' does not match"),
    (lambda p: p["studies"]["demo"]["evaluate"]["modality_gap"].pop("fit_fraction"),
     "studies.demo.evaluate.modality_gap.fit_fraction: required key is missing"),
    (lambda p: p["studies"]["paper"]["evaluate"]["suites"][0].update(group="odd"),
     "studies.paper.evaluate.suites.0.group: 'odd' is not one of ['ood']"),
    (lambda p: p["studies"]["demo"]["source"]["world"].update(probe_train_size=-1),
     "studies.demo.source.world.probe_train_size: -1 is less than the minimum of 0"),
    (lambda p: p["studies"]["demo"]["injection"].update(taps=[0, 1]),
     "runs.drc-r0: injection.taps [0, 1] in study demo needs one tap per teacher block ([1, 2, 3])"),
    (lambda p: p["runs"]["tips-style"].update(captions={"sampling": {"raw": 0.5, "synthetic": 0.6}}),
     "runs.tips-style: captions.sampling {'raw': 0.5, 'synthetic': 0.6} in study demo must sum to 1"),
    (lambda p: p["studies"]["paper"]["captions"]["coca"].update(weights=None),
     "studies.paper.captions.coca.weights: run alip reads second captions (ALIP or caption sampling) from "
     "captions.source coca, but the study names no CoCa weights file"),
    (lambda p: p["studies"]["demo"]["captions"].update(file=None),
     "studies.demo.captions.file: run alip reads second captions"),
    (lambda p: p["captions"]["coca"].update(min_length=30),
     "studies.paper.captions.coca.min_length: 30 must be below max_length 30"),
    (lambda p: p["runs"]["drc-r3"].update(patch_loss={"name": "ibot"}),
     "runs.drc-r3: patch_loss.name ibot needs injection.variant none"),
    (lambda p: p["patch_loss"].update(mask_ratio=[0.1]), "patch_loss.mask_ratio: [0.1] is too short"),
    (lambda p: p["runs"]["alip"].update(loss={"alip": {"momentum": 1.0}}),
     "runs.alip.loss.alip.momentum: 1.0 is greater than or equal to the maximum of 1"),
])
def test_bad_value_fails_naming_the_key(params, mutate, message):
    mutate(params)
    with pytest.raises(ParamsError) as err:
        validate_params(params, "params.yaml")
    assert message in str(err.value)


def test_every_error_is_reported_at_once(params):
    params["seed"] = -1
    params["studies"]["demo"]["data"]["threads"] = 0
    with pytest.raises(ParamsError) as err:
        validate_params(params)
    assert "seed:" in str(err.value) and "studies.demo.data.threads:" in str(err.value)


def test_resolution_layers_defaults_study_and_run(params):
    params["runs"]["fast"] = {"pretrain": {"epochs": 1}, "loss": {"name": "clip"}}
    cfg = resolve(params, "demo", "fast")
    assert cfg["pretrain"]["epochs"] == 1
    assert cfg["pretrain"]["lr"] == params["studies"]["demo"]["pretrain"]["lr"]  # untouched keys survive
    assert cfg["model"] == params["studies"]["demo"]["model"]
    assert (cfg["study"], cfg["run"], cfg["seed"]) == ("demo", "fast", params["seed"])
    assert resolve(params, "paper")["model"]["arch"] == "ViT-B-16"
    with pytest.raises(ParamsError, match="runs.nope: no such run"):
        resolve(params, "demo", "nope")


def test_injection_layers_and_aliases_resolve(params):
    cfg = resolve(params, "demo", "drc-r3-fusion-v5")
    assert cfg["run"] == "drc-r3" and cfg["injection"]["variant"] == "v5" and cfg["loss"]["order"] == 3
    assert cfg["injection"]["channels"] == params["studies"]["demo"]["injection"]["channels"] != 256
    assert cfg["injection"]["distill"] == params["injection"]["distill"]
    assert resolve(params, "paper", "clip")["injection"]["variant"] == "none"
    assert "drc-r3-fusion-v5" not in run_names(params) and "drc-r3-fusion-v6" in run_names(params)
    assert teacher_stages(resolve(params, "demo", "drc-r3-fusion-v1")) == []
    assert teacher_stages(resolve(params, "demo", "drc-r3-fusion-v2")) == ["teacher"]
    params["runs"]["drc-r3"]["injection"]["teacher"] = "online"
    assert teacher_stages(resolve(params, "demo", "drc-r3")) == ["teacher_weights"]


def test_runs_reading_second_captions_read_the_captions_stage(params):
    assert pretrain_stages(resolve(params, "demo", "alip")) == ["captions"]
    assert pretrain_stages(resolve(params, "demo", "tips-style")) == ["captions"]
    assert pretrain_stages(resolve(params, "demo", "clip")) == []
    assert pretrain_stages(resolve(params, "paper", "drc-r3-fusion-v2")) == ["teacher"]


def test_deep_merge_does_not_alias_its_inputs():
    base = {"a": {"b": [1, 2]}, "c": 1}
    merged = deep_merge(base, {"a": {"d": 3}})
    merged["a"]["b"].append(9)
    assert merged == {"a": {"b": [1, 2, 9], "d": 3}, "c": 1} and base == {"a": {"b": [1, 2]}, "c": 1}


def test_workflow_config_reaches_jobs_through_the_environment(params, monkeypatch, tmp_path):
    params["studies"]["demo"]["pretrain"]["epochs"] = 2
    monkeypatch.setenv(PARAMS_ENV, json.dumps(params))
    assert load_params()["studies"]["demo"]["pretrain"]["epochs"] == 2
    monkeypatch.delenv(PARAMS_ENV)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_cli_rejects_bad_params_with_exit_code_2(params, tmp_path, capsys):
    import yaml

    from dinorankclip.cli import main

    params["studies"]["demo"]["data"]["timeout"] = "soon"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    assert main(["--params", str(bad), "check"]) == 2
    assert "studies.demo.data.timeout: 'soon' is not of type 'number'" in capsys.readouterr().err


def test_a_finetuned_run_resolves_to_its_start_under_its_own_name(params):
    cfg = resolve(params, "demo", "drc-r3-kuea")
    start = resolve(params, "demo", "drc-r3")
    assert cfg["run"] == "drc-r3-kuea" and cfg["finetune"]["start_run"] == "drc-r3"
    assert cfg["model"] == start["model"] and cfg["injection"] == start["injection"]  # the start's architecture
    assert cfg["finetune"]["steps"] == params["studies"]["demo"]["finetune"]["steps"] != params["finetune"]["steps"]
    assert cfg["finetune"]["w_kernel"] == params["finetune"]["w_kernel"]  # method default where the study is silent
    assert resolve(params, "paper", "clip-kuea")["finetune"]["lr"] == 1e-5
    assert "clip-kuea" not in run_names(params) and evaluated_runs(params)[-2:] == ["clip-kuea", "drc-r3-kuea"]
    assert (model_stage(params, "clip-kuea"), model_stage(params, "clip")) == ("finetune", "pretrain")
    assert finetune_stages(cfg) == ["data", "teacher"]
    params["studies"]["demo"]["finetune"]["data"] = {"kind": "folder", "path": "data/imagenet/train"}
    assert finetune_stages(resolve(params, "demo", "clip-kuea")) == ["teacher_weights"]


def test_a_study_runs_its_own_list_fine_tuned_runs_and_seeds(params):
    demo = params["studies"]["demo"]
    assert run_names(params, "demo") == list(params["runs"]) and run_seeds(params, "demo", "cyclip") == [0]
    assert run_seeds(params, "demo", "drc-r3") == [0, 1, 2]  # the demo's primary comparisons: 3 seeds
    demo.update(runs=["clip", "drc-r3"], finetune_runs={"drc-r3-kuea": "drc-r3"},
                seeds={"default": [3], "drc-r3": [0, 1, 2]})
    validate_params(params)
    assert run_names(params, "demo") == ["clip", "drc-r3"] and run_names(params, "paper") == list(params["runs"])
    assert finetune_runs(params, "demo") == {"drc-r3-kuea": "drc-r3"} and "clip-kuea" in finetune_runs(params, "paper")
    assert seeded(params, evaluated_runs(params, "demo"), "demo") == [
        ("clip", 3), ("drc-r3", 0), ("drc-r3", 1), ("drc-r3", 2),
        ("drc-r3-kuea", 0), ("drc-r3-kuea", 1), ("drc-r3-kuea", 2)]  # a fine-tuned run: its start run's seeds
    assert run_seeds(params, "demo", "drc-r3-fusion-v5") == [0, 1, 2]  # an alias: its run's seeds
    cfg = resolve(params, "demo", "drc-r3", 2)
    assert (cfg["seed"], cfg["study_seed"]) == (2, params["seed"])
    assert resolve(params, "demo", "clip")["seed"] == 3  # the run's first seed by default
    assert resolve(params, "demo", "drc-r3-kuea", 1)["seed"] == 1
    assert "seeds" not in resolve(params, "demo") and "runs" not in resolve(params, "demo")  # plan, not settings
    with pytest.raises(ParamsError, match=r"studies.demo.seeds: run drc-r3 trains under seeds \[0, 1, 2\], not 5"):
        resolve(params, "demo", "drc-r3", 5)


@pytest.mark.parametrize("study_block, message", [
    ({"runs": ["clip", "nope"]}, "studies.demo.runs: 'nope' is not in runs"),
    ({"runs": ["clip", "drc-r3-fusion-v5"]}, "'drc-r3-fusion-v5' is not in runs (an alias: name 'drc-r3')"),
    ({"runs": ["clip", "clip"]}, "studies.demo.runs: lists a run twice"),
    ({"runs": ["clip"]}, "studies.demo: fine-tuned run drc-r3-kuea starts from 'drc-r3', which this study does not"),
    ({"runs": ["clip"], "finetune_runs": {"x-kuea": "drc-r3"}},
     "studies.demo.finetune_runs.x-kuea: starts from 'drc-r3', which this study does not train"),
    ({"runs": ["clip"], "finetune_runs": {}, "seeds": {"cyclip": [1]}},
     "studies.demo.seeds.cyclip: not a run this study trains"),
    ({"seeds": {"default": []}}, "studies.demo.seeds.default: [] should be non-empty"),
    ({"seeds": {"clip": [1, 1]}}, "studies.demo.seeds.clip: [1, 1] has non-unique elements"),
    ({"seeds": {"clip": [-1]}}, "studies.demo.seeds.clip.0: -1 is less than the minimum of 0"),
    ({"pretrain": {"max_steps": 0}}, "studies.demo.pretrain.max_steps: 0 is less than the minimum of 1"),
])
def test_bad_study_plans_fail_naming_the_key(params, study_block, message):
    params["studies"]["demo"] = deep_merge(params["studies"]["demo"], study_block)
    with pytest.raises(ParamsError) as err:
        validate_params(params, "params.yaml")
    assert message in str(err.value)


def test_later_params_files_merge_over_earlier_ones_as_snakemake_configfiles_do(tmp_path):
    from helpers import REPO

    extra = tmp_path / "subset.yaml"
    extra.write_text("study: paper\nstudies:\n  paper:\n    runs: [clip]\n    finetune_runs: {}\n"
                     "    pretrain: {max_steps: 3}\n")
    params = load_params([REPO / "params.yaml", extra])
    assert run_names(params) == ["clip"] and evaluated_runs(params) == ["clip"]
    assert resolve(params, None, "clip")["pretrain"]["max_steps"] == 3
    assert resolve(params, None, "clip")["pretrain"]["lr"] == 5e-4  # the rest of the paper study is kept
    extra.write_text("studies: [unclosed\n")
    with pytest.raises(ParamsError, match=r"subset.yaml, line 2, column 1: not valid YAML"):
        load_params([REPO / "params.yaml", extra])
