"""dvc.yaml, generated from params.yaml: the Snakefile's stages for `dvc repro`, `dvc status`, push and pull.

DVC's templates iterate over a params key but cannot compute from one, and a study's (run, seed) pairs come from
its run list and seeds (`dinorankclip.config`), so the file is written by `dinorankclip dvc-yaml` (`make dvc.yaml`)
for the study named in params.yaml. The per-run stages iterate (`foreach`) over literal (run, seed) items, so DVC
names them `<stage>@<run>-seed<k>`. Every value that reaches a stage command is a validated name (runs and studies
match `[a-z0-9][a-z0-9-]*`, seeds are integers), never a raw string from params.

A stage started by DVC (`DVC_STAGE` is set) refuses to run when dvc.yaml no longer matches params.yaml
(`check_current`), so a stale file cannot train the wrong set of runs.

Outputs are `persist`ent: DVC does not delete them before rerunning a stage, and a stage whose new output equals
the old one byte for byte keeps the old folder (`dinorankclip.io.atomic_dir`). So `dvc repro -f` of unchanged work
leaves Snakemake's `.snakemake_timestamp` (which `.dvcignore` hides from DVC) and the folder's times as they were,
and Snakemake, which decides by times, agrees with DVC, which decides by hashes, that nothing downstream changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dinorankclip.config import STUDY_PLAN, ParamsError, finetune_runs, run_names, seeded
from dinorankclip.layout import seed_part, stage_dir

DVC_FILE = Path("dvc.yaml")
CODE = "src/dinorankclip"  # a DVC-only dependency: dvc.lock records which code made each artifact
HEADER = """\
# Generated from params.yaml by `dinorankclip dvc-yaml` (`make dvc.yaml`); do not edit by hand: change params.yaml
# and regenerate. The same stages as the Snakefile for the study in params.yaml (tests/test_workflow.py fails when
# they disagree); per-run stages are one item per (run, seed): `dvc repro pretrain@clip-seed0`. The package source is
# a dependency of every stage, so dvc.lock records which code produced each artifact.
"""


def _stage(cmd: str, deps: list[str], params: list[str], outs: list[str]) -> dict:
    # persist: DVC leaves an output in place while its stage reruns, and the stage keeps it as it is when the new
    # result is byte-identical (`dinorankclip.io.atomic_dir`), so Snakemake's timestamp of unchanged work survives
    return {"cmd": cmd, "deps": [CODE, *deps], "params": ["seed", *params],
            "outs": [{out: {"persist": True}} for out in outs]}


def _items(jobs: list[tuple[str, int]], **extra: Mapping[str, str]) -> dict:
    """The literal `foreach` items of a per-run stage: `<run>-seed<k>: {run, seed, ...}`."""
    return {f"{run}-{seed_part(seed)}": {"run": run, "seed": seed, **{k: v[run] for k, v in extra.items()}}
            for run, seed in jobs}


class _Paths:
    """Stage folders of one study as dvc.yaml writes them: whole stages, and per-run ones templated on the item."""

    def __init__(self, study: str):
        self.study = study

    def __call__(self, stage: str) -> str:
        return str(stage_dir(self.study, stage))

    def item(self, stage: str, run: str = "${item.run}") -> str:
        return f"{self(stage)}/{run}/seed${{item.seed}}"


def stages(params: Mapping[str, Any]) -> dict:
    """The `stages` of dvc.yaml for the study named in `params` (validated)."""
    study = params["study"]
    res, cli, block = _Paths(study), f"dinorankclip --study {study}", f"studies.{study}"
    per_item = "--run ${item.run} --seed ${item.seed}"
    tuned = finetune_runs(params)
    result = {
        "source": _stage(f"{cli} source", [], [f"{block}.source"], [res("source")]),
        "data": _stage(f"{cli} data", [res("source")], [f"{block}.source", f"{block}.data"], [res("data")]),
        "teacher_weights": _stage(f"{cli} teacher-weights", [res("source"), res("data")], [f"{block}.teacher"],
                                  [res("teacher_weights")]),
        "teacher": _stage(f"{cli} teacher", [res("data"), res("teacher_weights")],
                          [f"{block}.teacher", f"{block}.model"], [res("teacher")]),
        "captions": _stage(f"{cli} captions", [res("source"), res("data")], ["captions", f"{block}.captions"],
                           [res("captions")]),
    }
    # DVC templates cannot select dependencies by item, so every training lists the teacher and captions stages;
    # runs without a teacher (clip, cyclip, rankclip, fusion v1) or second captions do not read them (the Snakefile
    # leaves them out).
    trained = ["loss", "injection", "captions", "patch_loss", "teacher", "model", "pretrain"]
    result["pretrain"] = {"foreach": _items(seeded(params, run_names(params))), "do": _stage(
        f"{cli} pretrain {per_item}", [res("data"), res("teacher_weights"), res("teacher"), res("captions")],
        ["loss", "injection", "captions", "patch_loss", *(f"{block}.{key}" for key in trained), "runs.${item.run}"],
        [res.item("pretrain")])}
    evaluated = {"evaluate": (run_names(params), "pretrain")}
    if tuned:
        # likewise every fine-tuning lists the shards, the teacher cache and the teacher weights; with an image
        # folder (`finetune.data.kind: folder`) it reads only the weights, and the folder outside the DAG
        result["finetune"] = {"foreach": _items(seeded(params, list(tuned)), start=tuned), "do": _stage(
            f"{cli} finetune {per_item}",
            [res("data"), res("teacher_weights"), res("teacher"), res.item("pretrain", "${item.start}")],
            ["finetune", f"{block}.finetune", f"{block}.teacher"], [res.item("finetune")])}
        evaluated["evaluate_finetuned"] = (list(tuned), "finetune")
    for name, (runs, made_by) in evaluated.items():
        result[name] = {"foreach": _items(seeded(params, runs)), "do": _stage(
            f"{cli} evaluate {per_item}", [res("source"), res("teacher_weights"), res.item(made_by)],
            [f"{block}.evaluate", f"{block}.teacher"], [res.item("evaluate")])}
    plan = [f"{block}.{key}" for key in STUDY_PLAN if key in params["studies"][study]]
    reads = ["evaluate", "pretrain"] + (["finetune"] if tuned else [])
    result["report"] = _stage(f"{cli} report", [res(stage) for stage in reads],
                              [f"{block}.evaluate", "runs", "finetune_runs", "report", *plan], [res("report")])
    return result


def render(params: Mapping[str, Any]) -> str:
    """The text of dvc.yaml for `params`."""
    study = params["study"]
    body = {"stages": stages(params), "metrics": [str(stage_dir(study, "evaluate"))]}
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=120, default_flow_style=None)


def check_current(params: Mapping[str, Any], path: Path = DVC_FILE) -> None:
    """Raise ParamsError unless `path` holds what `render(params)` writes."""
    current = yaml.safe_load(path.read_text()) if path.is_file() else None
    if current != yaml.safe_load(render(params)):
        raise ParamsError(f"{path} does not match params.yaml (runs, seeds or the study changed); regenerate it with "
                          "`make dvc.yaml` (or `dinorankclip dvc-yaml`) before `dvc repro`")
