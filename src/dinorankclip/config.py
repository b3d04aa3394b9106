"""Load, validate and resolve `params.yaml`: the single source of truth for every stage.

A job's configuration is resolved in three layers: the shared method defaults (`seed`, `loss`, `injection`,
`finetune`), the selected study's block (`studies.<study>`: data, model and schedule at demo or paper scale, plus
optional partial `loss`, `injection` and `finetune` for scale-dependent sizes), and, for per-run stages, the run's
entry in the registry (`runs.<run>`), which overrides any of those keys. An alias (`aliases`) resolves to the run
it names. A fine-tuned run (`finetune_runs`: name -> start run) resolves to its start run's configuration (same
architecture and injection) under its own name, with `finetune.start_run` naming the start.

A study trains the runs of its own list (`studies.<study>.runs`; default: the whole registry) and fine-tunes its own
`finetune_runs` (default: the top-level mapping). The unit of training and evaluation is a (run, seed) pair: each
run trains once per seed of `studies.<study>.seeds` (its own list, or `default`); a fine-tuned run has one seed per
seed of its start run. The study seed (`seed`) fixes everything shared by the runs — the world, the data, the
teacher, the held-out split —; a (run, seed) job's config carries its training seed as `seed` and the study seed as
`study_seed`.
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


def _strict_integer(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# JSON Schema counts 1.0 as an integer; YAML's `epochs: 1.0` is a float that range() and slicing refuse later, so
# every `type: integer` of the schema takes only true integers.
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer))


def validate_params(params: Mapping[str, Any], source: str = PARAMS_FILE) -> dict:
    """Check `params` against the JSON schema and the cross-key rules, after expanding the studies that extend
    another (`expand_studies`); raise ParamsError naming each bad key, else return the expanded parameters."""
    try:
        params = expand_studies(params)
    except ParamsError as err:
        raise ParamsError(f"{source} is invalid:\n  {err}") from None
    validator = StrictValidator(load_schema())
    problems = [_describe(e) for e in sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))]
    if not problems:
        problems = _cross_key_problems(params)
    if problems:
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    return params


def expand_studies(params: Mapping[str, Any]) -> dict:
    """`params` with every study that names another in `extends` replaced by that study's (expanded) block with
    its own keys deep-merged over it (mappings merge, lists and values replace), `extends` itself dropped.

    So a study can be another one with a few counts changed (`studies/preflight.yaml`: the paper study at CI size)
    in a file of its own, selected with Snakemake's `--configfile` (or `--params` here) without editing params.yaml.
    Validation runs on the expanded blocks, so an error names the key as the expanded study has it."""
    studies = params.get("studies")
    if not isinstance(studies, Mapping) or not any(isinstance(b, Mapping) and "extends" in b
                                                   for b in studies.values()):
        return dict(params)
    done: dict[str, Any] = {}

    def expand(name: str, chain: list[str]) -> Any:
        block = studies[name]
        if name in done or not isinstance(block, Mapping) or "extends" not in block:
            return done.setdefault(name, block)
        base, key = block["extends"], f"studies.{name}.extends"
        if not isinstance(base, str) or base not in studies:
            raise ParamsError(f"{key}: {base!r} is not one of studies ({', '.join(studies)})")
        if base in chain:
            raise ParamsError(f"{key}: studies extend each other in a cycle ({' -> '.join(chain + [base])})")
        own = {k: v for k, v in block.items() if k != "extends"}
        return done.setdefault(name, deep_merge(expand(base, chain + [base]), own))

    return {**params, "studies": {name: expand(name, [name]) for name in studies}}


def _cross_key_problems(params: Mapping[str, Any]) -> list[str]:
    """Rules a JSON schema cannot express: references between keys."""
    problems = []
    if params["study"] not in params["studies"]:
        problems.append(f"study: '{params['study']}' is not one of studies ({', '.join(params['studies'])})")
    problems += _finetune_problems(params, params.get("finetune_runs", {}), "finetune_runs")
    for alias, run in params.get("aliases", {}).items():
        if alias in params["runs"]:
            problems.append(f"aliases.{alias}: is also the name of a run")
        if run not in params["runs"]:
            problems.append(f"aliases.{alias}: names '{run}', which is not in runs")
    problems += _report_problems(params)
    for study in params["studies"]:
        for run in params["runs"]:
            cfg = resolve(params, study, run)
            taps, blocks = cfg["injection"]["taps"], cfg["teacher"]["blocks"]
            if cfg["injection"]["variant"] not in ("none", "v1") and taps is not None and len(taps) != len(blocks):
                problems.append(f"runs.{run}: injection.taps {taps} in study {study} needs one tap per teacher "
                                f"block ({blocks})")
            problems += _caption_problems(cfg, study, run)
    for study, block in params["studies"].items():
        problems += _study_run_problems(params, study, block)
        problems += _window_problems(params, study)
        ev = block["evaluate"]
        names = [benchmark_name(suite["dataset"]) for suite in ev["suites"]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"studies.{study}.evaluate.suites: benchmarks listed twice: {', '.join(duplicates)}")
        if len(names) > 1 and "{dataset_cleaned}" not in ev["dataset_root"] and "{dataset}" not in ev["dataset_root"]:
            problems.append(f"studies.{study}.evaluate.dataset_root: must contain {{dataset_cleaned}} or {{dataset}} "
                            "to hold several suites")
    return problems


def _report_problems(params: Mapping[str, Any]) -> list[str]:
    """A report table lists runs or aliases of the registry, each once: an unknown name would otherwise make the
    report skip the whole table as if the study did not train it; a declared comparison names runs, aliases or
    fine-tuned runs."""
    problems, aliases = [], params.get("aliases", {})
    known = set(params["runs"]) | set(aliases) | set(params.get("finetune_runs", {})) | {
        name for block in params["studies"].values() for name in block.get("finetune_runs", {})}
    for i, pair in enumerate(params["report"].get("comparisons", [])):
        problems += [f"report.comparisons.{i}.{key}: '{pair[key]}' is not a run, an alias or a fine-tuned run"
                     for key in ("run", "against") if pair[key] not in known]
    for table, names in params["report"].items():
        if table == "comparisons":
            continue
        for name in names:
            if name not in params["runs"] and name not in aliases:
                tuned = " (a fine-tuned run: the kuea table lists those)" if name in params.get("finetune_runs", {}) \
                    else ""
                problems.append(f"report.{table}: '{name}' is not a run or an alias of the registry{tuned}")
        canonical = [canonical_run(params, name) for name in names]
        twice = sorted({name for name in canonical if canonical.count(name) > 1})
        if twice:
            problems.append(f"report.{table}: lists a run twice (aliases count as their run): {', '.join(twice)}")
    return problems


def _finetune_problems(params: Mapping[str, Any], tuned: Mapping[str, str], key: str,
                       trained: list[str] | None = None) -> list[str]:
    """Fine-tuned runs are new names that start from a run of the registry (of the study's run list, if given)."""
    problems = []
    for name, start in tuned.items():
        if name in params["runs"] or name in params.get("aliases", {}):
            problems.append(f"{key}.{name}: is also the name of a run or an alias")
        if start not in params["runs"]:
            problems.append(f"{key}.{name}: starts from '{start}', which is not in runs (aliases are not "
                            "accepted: name the run)")
        elif trained is not None and start not in trained:
            problems.append(f"{key}.{name}: starts from '{start}', which this study does not train (its runs)")
    return problems


def _study_run_problems(params: Mapping[str, Any], study: str, block: Mapping[str, Any]) -> list[str]:
    """A study's own run list, fine-tuned runs and seeds name runs of the registry, each once."""
    problems, key = [], f"studies.{study}"
    runs = block.get("runs")
    for name in runs or []:
        if name not in params["runs"]:
            alias = params.get("aliases", {}).get(name)
            problems.append(f"{key}.runs: '{name}' is not in runs" + (f" (an alias: name '{alias}')" if alias else ""))
    if runs is not None and len(set(runs)) != len(runs):
        problems.append(f"{key}.runs: lists a run twice")
    trained = run_names(params, study)
    if "finetune_runs" in block:
        problems += _finetune_problems(params, block["finetune_runs"], f"{key}.finetune_runs", trained)
    else:
        problems += [f"{key}: fine-tuned run {name} starts from '{start}', which this study does not train; give the "
                     "study its own finetune_runs" for name, start in params.get("finetune_runs", {}).items()
                     if start in params["runs"] and start not in trained]
    for name in block.get("seeds", {}):
        if name != "default" and name not in trained:
            problems.append(f"{key}.seeds.{name}: not a run this study trains (its runs: {', '.join(trained)}; "
                            "a fine-tuned run takes its start run's seeds)")
    return problems


def _window_problems(params: Mapping[str, Any], study: str) -> list[str]:
    """An order >= 2 adds transition terms at the first `loss.window` ranking positions of a step's candidates: the
    global batch (gathered on every rank), and in validation the held-out batch, which may be smaller. A window
    wider than that would be cut without a word, so it is refused: the study says the window it trains with."""
    problems = []
    for run in (name for name in run_names(params, study) if name in params["runs"]):  # others: reported already
        cfg = resolve(params, study, run)
        loss, opt = cfg["loss"], cfg["pretrain"]
        candidates = min(opt["batch_size"], opt["val_samples"] or opt["batch_size"])
        if loss["name"] == "plackett_luce" and loss["order"] >= 2 and loss["window"] > candidates:
            problems.append(f"runs.{run}: loss.window {loss['window']} in study {study} exceeds the {candidates} "
                            f"candidates a step ranks (pretrain.batch_size {opt['batch_size']}, val_samples "
                            f"{opt['val_samples']}); set studies.{study}.loss.window <= {candidates}")
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


def load_params(paths: str | os.PathLike | list | None = None, study: str | None = None) -> dict:
    """The validated parameters: Snakemake's merged config when running under the workflow, else the file(s),
    later files merged over earlier ones (as Snakemake merges --configfile over its configfile); `study` (the
    command line's --study) replaces the file's `study` before validation."""
    if not paths and os.environ.get(PARAMS_ENV):
        params, source = json.loads(os.environ[PARAMS_ENV]), f"${PARAMS_ENV}"
    else:
        files = [Path(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths or [PARAMS_FILE])]
        params = {}
        for file in files:
            if not file.is_file():
                raise ParamsError(f"parameter file {file} not found (run from the project root or pass --params)")
            params = deep_merge(params, read_params_file(file))
        source = " + ".join(map(str, files))
    if study is not None:
        params, source = {**params, "study": study}, f"{source} with --study"
    return validate_params(params, source)


def read_params_file(file: str | os.PathLike) -> dict:
    """A parameter file's YAML; a syntax error is one ParamsError naming the file, line and column (the Snakefile
    reads params.yaml through this first: Snakemake's own message gives no line)."""
    file = Path(file)
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{file}{where}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{file}: not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ParamsError(f"{file}: holds a YAML {type(loaded).__name__}, not a mapping of parameters")
    return loaded or {}


def deep_merge(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict:
    """`base` updated recursively by `delta`; mappings merge, everything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Keys of a study block that say what the study runs, not how a job computes: not part of a job's config.
STUDY_PLAN = ("runs", "finetune_runs", "seeds")


def resolve(params: Mapping[str, Any], study: str | None = None, run: str | None = None,
            seed: int | None = None) -> dict:
    """The configuration one job sees: shared defaults, then the study block, then the run's overrides. A run's
    config carries its training seed (`seed`: the given one, else the run's first) and the study seed."""
    study = study or params["study"]
    if study not in params["studies"]:
        raise ParamsError(f"study: '{study}' is not one of studies ({', '.join(params['studies'])})")
    block = {k: v for k, v in params["studies"][study].items() if k not in STUDY_PLAN}
    config = {"study": study, "seed": params["seed"], **block,
              **{key: deep_merge(params[key], block.get(key, {})) for key in LAYERED}}
    if run is None:
        return config
    start = finetune_runs(params, study).get(run)
    if start is not None:
        config = resolve(params, study, start, seed)
        config["run"] = run
        config["finetune"]["start_run"] = start
        return config
    run = canonical_run(params, run)
    if run not in params["runs"]:
        raise ParamsError(f"runs.{run}: no such run in the registry (known: {', '.join(params['runs'])})")
    config = deep_merge(config, params["runs"][run] or {})
    config["run"] = run
    seeds = run_seeds(params, study, run)
    if seed is not None and seed not in seeds:
        raise ParamsError(f"studies.{study}.seeds: run {run} trains under seeds {seeds}, not {seed}")
    config["study_seed"], config["seed"] = params["seed"], seeds[0] if seed is None else seed
    return config


def run_names(params: Mapping[str, Any], study: str | None = None) -> list[str]:
    """The runs a study trains: its own list (`studies.<study>.runs`), else the whole registry (aliases are not
    runs)."""
    listed = params["studies"][study or params["study"]].get("runs")
    return list(params["runs"]) if listed is None else list(listed)


def finetune_runs(params: Mapping[str, Any], study: str | None = None) -> dict[str, str]:
    """{fine-tuned run: the run it starts from} of a study: its own mapping, else the top-level one."""
    block = params["studies"][study or params["study"]]
    return dict(block["finetune_runs"] if "finetune_runs" in block else params.get("finetune_runs", {}))


def evaluated_runs(params: Mapping[str, Any], study: str | None = None) -> list[str]:
    """Every run the evaluate stage scores and the report shows: the study's runs, then its fine-tuned runs."""
    return run_names(params, study) + list(finetune_runs(params, study))


def run_seeds(params: Mapping[str, Any], study: str, run: str) -> list[int]:
    """The training seeds of a run in a study: the study's list for the run, else its `default` (the study seed
    when the study names no seeds); a fine-tuned run has the seeds of its start run."""
    run = finetune_runs(params, study).get(run, canonical_run(params, run))
    seeds = params["studies"][study].get("seeds", {})
    return list(seeds.get(run, seeds.get("default", [params["seed"]])))


def seeded(params: Mapping[str, Any], runs: list[str], study: str | None = None) -> list[tuple[str, int]]:
    """(run, seed) pairs of `runs` in a study: the jobs of a per-run stage."""
    study = study or params["study"]
    return [(run, seed) for run in runs for seed in run_seeds(params, study, run)]


def model_stage(params: Mapping[str, Any], run: str, study: str | None = None) -> str:
    """The stage whose output holds a run's exported model (`<stage>/<run>/seed<k>/model`): finetune or pretrain."""
    return "finetune" if run in finetune_runs(params, study) else "pretrain"


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
