"""Load, validate and resolve `params.yaml`: the single source of truth for every stage.

A job's configuration is resolved in three layers: the shared method defaults (`seed`, `loss`, `injection`,
`finetune`), the selected study's block (`studies.<study>`: data, model and schedule at demo or paper scale, plus
optional partial `loss`, `injection` and `finetune` for scale-dependent sizes), and, for per-run stages, the run's
entry in the registry (`runs.<run>`), which overrides any of those keys. An alias (`aliases`) resolves to the run
it names. A fine-tuned run (`finetune_runs`: name -> start run) resolves to its start run's configuration (same
architecture and injection) under its own name, with `finetune.start_run` naming the start.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PARAMS_FILE = "params.yaml"
# Snakemake passes its merged configuration (params.yaml + --config/--configfile) to every job through this
# variable, so a job sees exactly the configuration the workflow validated.
PARAMS_ENV = "DINORANKCLIP_PARAMS_JSON"
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "params.schema.yaml"


# Sections with shared method defaults at the top level that a study block may partly override.
LAYERED = ("loss", "injection", "finetune", "captions", "patch_loss")


class ParamsError(ValueError):
    """A parameter file that fails validation; the message names every bad key."""


def load_schema() -> dict:
    if not SCHEMA_PATH.is_file():
        raise ParamsError(f"parameter schema not found at {SCHEMA_PATH}; install the project editable (uv sync)")
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(path: list) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line per error, starting with the dotted key so a user can find it in params.yaml."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return "; ".join(f"{_key_path(path + [k])}: unknown key" for k in unknown)
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return "; ".join(f"{_key_path(path + [k])}: required key is missing" for k in missing)
    return f"{_key_path(path)}: {error.message}"


def validate_params(params: Mapping[str, Any], source: str = PARAMS_FILE) -> None:
    """Check `params` against the JSON schema and the cross-key rules; raise ParamsError naming each bad key."""
    validator = jsonschema.Draft202012Validator(load_schema())
    problems = [_describe(e) for e in sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))]
    if not problems:
        problems = _cross_key_problems(params)
    if problems:
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(problems))


def _cross_key_problems(params: Mapping[str, Any]) -> list[str]:
    """Rules a JSON schema cannot express: references between keys."""
    problems = []
    if params["study"] not in params["studies"]:
        problems.append(f"study: '{params['study']}' is not one of studies ({', '.join(params['studies'])})")
    for name, start in params.get("finetune_runs", {}).items():
        if name in params["runs"] or name in params.get("aliases", {}):
            problems.append(f"finetune_runs.{name}: is also the name of a run or an alias")
        if start not in params["runs"]:
            problems.append(f"finetune_runs.{name}: starts from '{start}', which is not in runs (aliases are not "
                            "accepted: name the run)")
    for alias, run in params.get("aliases", {}).items():
        if alias in params["runs"]:
            problems.append(f"aliases.{alias}: is also the name of a run")
        if run not in params["runs"]:
            problems.append(f"aliases.{alias}: names '{run}', which is not in runs")
    for study in params["studies"]:
        for run in params["runs"]:
            cfg = resolve(params, study, run)
            taps, blocks = cfg["injection"]["taps"], cfg["teacher"]["blocks"]
            if cfg["injection"]["variant"] not in ("none", "v1") and taps is not None and len(taps) != len(blocks):
                problems.append(f"runs.{run}: injection.taps {taps} in study {study} needs one tap per teacher "
                                f"block ({blocks})")
            problems += _caption_problems(cfg, study, run)
    for study, block in params["studies"].items():
        ev = block["evaluate"]
        names = [benchmark_name(suite["dataset"]) for suite in ev["suites"]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"studies.{study}.evaluate.suites: benchmarks listed twice: {', '.join(duplicates)}")
        if len(names) > 1 and "{dataset_cleaned}" not in ev["dataset_root"] and "{dataset}" not in ev["dataset_root"]:
            problems.append(f"studies.{study}.evaluate.dataset_root: must contain {{dataset_cleaned}} or {{dataset}} "
                            "to hold several suites")
    return problems


def _caption_problems(cfg: Mapping[str, Any], study: str, run: str) -> list[str]:
    """A run reading second captions needs the study's caption file or captioner weights; the patch objective
    needs a plain tower."""
    problems = []
    captions = cfg["captions"]
    sampling = captions["sampling"]
    if abs(sampling["raw"] + sampling["synthetic"] - 1) > 1e-9:
        problems.append(f"runs.{run}: captions.sampling {sampling} in study {study} must sum to 1")
    coca = captions["source"] == "coca"
    key, value, what = ("coca.weights", captions["coca"]["weights"], "CoCa weights file") if coca else \
        ("file", captions["file"], "caption file")
    if reads_captions(cfg) and not value:
        problems.append(f"studies.{study}.captions.{key}: run {run} reads second captions (ALIP or caption "
                        f"sampling) from captions.source {captions['source']}, but the study names no {what}")
    if reads_captions(cfg) and coca and captions["coca"]["min_length"] >= captions["coca"]["max_length"]:
        problems.append(f"studies.{study}.captions.coca.min_length: {captions['coca']['min_length']} must be below "
                        f"max_length {captions['coca']['max_length']}")
    if cfg["patch_loss"]["name"] != "none" and cfg["injection"]["variant"] != "none":
        problems.append(f"runs.{run}: patch_loss.name {cfg['patch_loss']['name']} needs injection.variant none "
                        f"(the patch objective reads a plain image tower), not {cfg['injection']['variant']}")
    return problems


def load_params(path: str | os.PathLike | None = None) -> dict:
    """The validated parameters: Snakemake's merged config when running under the workflow, else the file."""
    if path is None and os.environ.get(PARAMS_ENV):
        params, source = json.loads(os.environ[PARAMS_ENV]), f"${PARAMS_ENV}"
    else:
        file = Path(path or PARAMS_FILE)
        if not file.is_file():
            raise ParamsError(f"parameter file {file} not found (run from the project root or pass --params)")
        params, source = yaml.safe_load(file.read_text()), str(file)
    validate_params(params, source)
    return params


def deep_merge(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict:
    """`base` updated recursively by `delta`; mappings merge, everything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve(params: Mapping[str, Any], study: str | None = None, run: str | None = None) -> dict:
    """The configuration one job sees: shared defaults, then the study block, then the run's overrides."""
    study = study or params["study"]
    if study not in params["studies"]:
        raise ParamsError(f"study: '{study}' is not one of studies ({', '.join(params['studies'])})")
    block = params["studies"][study]
    config = {"study": study, "seed": params["seed"], **block,
              **{key: deep_merge(params[key], block.get(key, {})) for key in LAYERED}}
    start = params.get("finetune_runs", {}).get(run)
    if start is not None:
        config = resolve(params, study, start)
        config["run"] = run
        config["finetune"]["start_run"] = start
        return config
    if run is not None:
        run = params.get("aliases", {}).get(run, run)
        if run not in params["runs"]:
            raise ParamsError(f"runs.{run}: no such run in the registry (known: {', '.join(params['runs'])})")
        config = deep_merge(config, params["runs"][run] or {})
        config["run"] = run
    return config


def run_names(params: Mapping[str, Any]) -> list[str]:
    """Every run in the registry; each study trains and evaluates all of them (aliases are not runs)."""
    return list(params["runs"])


def finetune_runs(params: Mapping[str, Any]) -> dict[str, str]:
    """{fine-tuned run: the run it starts from}; the finetune stage trains them, every study evaluates them."""
    return dict(params.get("finetune_runs", {}))


def evaluated_runs(params: Mapping[str, Any]) -> list[str]:
    """Every run the evaluate stage scores and the report shows: the registry, then the fine-tuned runs."""
    return run_names(params) + list(finetune_runs(params))


def model_stage(params: Mapping[str, Any], run: str) -> str:
    """The stage whose output holds a run's exported model (`<stage>/<run>/model`): finetune or pretrain."""
    return "finetune" if run in finetune_runs(params) else "pretrain"


def finetune_stages(cfg: Mapping[str, Any]) -> list[str]:
    """The data and teacher stages a fine-tuned run reads: the study's shards with the cached teacher CLS, or,
    for an image folder, only the teacher's weights (the teacher then runs on each batch)."""
    return ["data", "teacher"] if cfg["finetune"]["data"]["kind"] == "shards" else ["teacher_weights"]


def reads_captions(cfg: Mapping[str, Any]) -> bool:
    """Whether a resolved run reads a second caption per image: ALIP's objective, or caption sampling."""
    return cfg["loss"]["name"] == "alip" or cfg["captions"]["sampling"]["synthetic"] > 0


def pretrain_stages(cfg: Mapping[str, Any]) -> list[str]:
    """Every stage besides `data` a resolved run's pretraining reads: its teacher stages, and `captions` when it
    reads second captions."""
    return teacher_stages(cfg) + (["captions"] if reads_captions(cfg) else [])


def teacher_stages(cfg: Mapping[str, Any]) -> list[str]:
    """The teacher stages a resolved run reads: none without a branch L to distil, else the feature cache
    (`teacher`) or, with an online teacher, only its weights (`teacher_weights`)."""
    injection = cfg["injection"]
    if injection["variant"] in ("none", "v1"):
        return []
    return ["teacher_weights"] if injection["teacher"] == "online" else ["teacher"]


def canonical_run(params: Mapping[str, Any], name: str) -> str:
    """The run a name stands for: itself, or the run its alias names."""
    return params.get("aliases", {}).get(name, name)


def benchmark_name(dataset: str) -> str:
    """clip-benchmark's `dataset_cleaned`: the dataset name without `wds/`, slashes as dashes."""
    return dataset.removeprefix("wds/").replace("/", "-")


def suite_names(params: Mapping[str, Any], study: str) -> list[str]:
    """The benchmark names of a study's suites: one evaluation JSON per run and benchmark."""
    return [benchmark_name(suite["dataset"]) for suite in params["studies"][study]["evaluate"]["suites"]]
