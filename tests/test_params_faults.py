"""Bad parameters stop before anything runs, with one error naming the key, file or line (issue 20, items 7, 8, 9
and 10): integers written as floats, report tables naming unknown runs, study names that would reach a shell, and
YAML syntax errors."""

import copy
import logging
import re
import subprocess

import pytest
import yaml
from helpers import REPO, only_runs, snapshot_repo, venv_env

from dinorankclip.config import (
    ParamsError,
    StrictValidator,
    load_params,
    load_schema,
    read_params_file,
    validate_params,
)
from dinorankclip.dvc_yaml import render

# Keys whose schema type is `number`: a float is as good as an integer there.
REAL_VALUED = {"w_max", "gate_bias", "weight", "lambda_kd", "relational", "w_reg", "w_kernel", "lr", "weight_decay",
               "timeout", "deadline", "sample_cache_mb", "val_proportion", "synthetic", "raw"}


def integer_leaves(node, path=()):
    """(path, value) of every integer in the parameters (booleans are not integers)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from integer_leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from integer_leaves(value, (*path, i))
    elif isinstance(node, int) and not isinstance(node, bool):
        yield path, node


def set_at(params, path, value):
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def test_every_integer_of_params_yaml_written_as_a_float_is_refused_naming_its_key(params):
    """`epochs: 1.0` passed the schema (JSON Schema counts 1.0 as an integer) and crashed in range() later."""
    leaves, validator = list(integer_leaves(params)), StrictValidator(load_schema())
    accepted = set()
    for path, value in leaves:
        bad = copy.deepcopy(params)
        set_at(bad, path, float(value))
        errors = list(validator.iter_errors(bad))
        if not errors:
            accepted.add(path)
        assert all(tuple(e.absolute_path) == path for e in errors), errors  # the error is at the key itself
    epochs = copy.deepcopy(params)
    epochs["studies"]["demo"]["pretrain"]["epochs"] = 1.0
    with pytest.raises(ParamsError, match=r"studies\.demo\.pretrain\.epochs: 1\.0 is not of type 'integer'"):
        validate_params(epochs)
    # only keys the schema declares real-valued take a float; every count, size, seed and index is refused
    assert {path[-1] for path in accepted} <= REAL_VALUED, sorted(accepted)
    refused = {path[-1] for path, _ in leaves if path not in accepted}
    assert {"epochs", "batch_size", "steps", "seed", "shard_size", "threads", "grid", "order", "max_grid",
            "fit_samples", "warmup_steps", "val_samples", "port", "pairs"} <= refused


@pytest.mark.parametrize("value", [True, "4", 4.5])
def test_integers_refuse_booleans_strings_and_fractions(params, value):
    params["studies"]["demo"]["pretrain"]["epochs"] = value
    with pytest.raises(ParamsError, match=r"studies\.demo\.pretrain\.epochs: .* is not of type 'integer'"):
        validate_params(params)


def test_a_report_table_naming_an_unknown_run_fails_check(params, tmp_path, capsys):
    """It passed `check`, and the report then skipped the whole table as if the study did not train it."""
    from dinorankclip.cli import main

    params["report"]["order_sweep"].append("drc-r9")
    params["report"]["fusion_ablation"].append("clip-kuea")
    params["report"]["fusion_ablation"].append("drc-r3")  # drc-r3-fusion-v5 is its alias: listed twice
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["--params", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert "report.order_sweep: 'drc-r9' is not a run or an alias of the registry" in err
    assert "report.fusion_ablation: 'clip-kuea' is not a run or an alias of the registry (a fine-tuned run" in err
    assert "report.fusion_ablation: lists a run twice (aliases count as their run): drc-r3" in err


def test_a_study_that_does_not_train_a_tables_runs_skips_it_with_a_log_line(params, caplog):
    from dinorankclip.cli import report_runs

    only_runs(params["studies"]["demo"], ["clip", "drc-r0", "drc-r1"], {"clip-kuea": "clip"})
    validate_params(params)
    with caplog.at_level(logging.INFO, logger="dinorankclip"):
        assert report_runs(params, "demo", "order_sweep") == {}
    assert "report.order_sweep: runs not in this study (drc-r2, drc-r3, drc-r4); the table is skipped" in caplog.text
    params["studies"]["demo"]["runs"] = None
    assert list(report_runs(params, "demo", "order_sweep")) == params["report"]["order_sweep"]


HOSTILE = "x;touch {marker};#"


def test_a_study_name_with_shell_characters_is_refused_before_dvc_yaml_is_written(params, tmp_path):
    """`study: "x;touch ...;#"` once reached dvc.yaml's stage commands and ran in the shell."""
    marker = tmp_path / "pwned"
    hostile = HOSTILE.format(marker=marker)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    runs = [
        ["dinorankclip", "--study", hostile, "dvc-yaml"],
        ["dinorankclip", "--study", hostile, "check"],
        ["dinorankclip", "--study", hostile, "source"],
    ]
    for cmd in runs:
        result = subprocess.run(cmd, cwd=work, env=venv_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (cmd, result.stderr)
        assert "study: " in result.stderr and "does not match '^[a-z0-9][a-z0-9-]*$'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    params["study"] = hostile
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(["dinorankclip", "dvc-yaml"], cwd=work, env=venv_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "study: " in result.stderr, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["params.yaml"]  # no dvc.yaml, no results
    assert not marker.exists()


def test_a_study_block_with_shell_characters_in_its_name_is_refused(params):
    params["studies"][HOSTILE.format(marker="/tmp/x")] = params["studies"]["demo"]
    with pytest.raises(ParamsError, match=r"studies: 'x;touch /tmp/x;#' does not match"):
        validate_params(params)


def test_every_stage_command_of_dvc_yaml_holds_only_validated_names(params):
    rendered = yaml.safe_load(render(params))["stages"]
    commands = [stage.get("cmd") or stage["do"]["cmd"] for stage in rendered.values()]
    allowed = r"^dinorankclip --study [a-z0-9-]+ [a-z-]+( --run \$\{item\.run\} --seed \$\{item\.seed\})?$"
    assert commands and all(re.fullmatch(allowed, cmd) for cmd in commands), commands
    items = [item for stage in rendered.values() for item in stage.get("foreach", {}).values()]
    assert items and all(re.fullmatch(r"[a-z0-9][a-z0-9-]*", item["run"]) and
                         isinstance(item["seed"], int) for item in items)


def test_snakemake_refuses_a_hostile_study_before_any_job(tmp_path):
    clone = snapshot_repo(tmp_path / "clone")
    marker = tmp_path / "pwned"
    result = subprocess.run(["snakemake", "-n", "--config", f"study={HOSTILE.format(marker=marker)}"], cwd=clone,
                            env=venv_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "study: 'x;touch" in result.stdout + result.stderr and "does not match" in result.stdout + result.stderr
    assert not marker.exists() and not (clone / "results").exists()


BROKEN = "captions:\n  file: [unclosed\n  sampling: {raw: 1.0, synthetic: 0.0}\n"


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\n" + BROKEN)
    with pytest.raises(ParamsError, match=r"params\.yaml, line 4, column \d+: not valid YAML: ") as err:
        load_params(path)
    assert str(path) in str(err.value)
    path.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ParamsError, match="holds a YAML list, not a mapping"):
        read_params_file(path)


def test_snakemake_names_the_line_of_a_yaml_syntax_error_in_params_yaml(tmp_path):
    clone = snapshot_repo(tmp_path / "clone")
    lines = (REPO / "params.yaml").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("captions:"))
    lines.insert(at + 1, "  broken: [unclosed\n")
    (clone / "params.yaml").write_text("".join(lines))
    result = subprocess.run(["snakemake", "-n"], cwd=clone, env=venv_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert f"params.yaml, line {at + 3}, column" in result.stdout + result.stderr, result.stdout + result.stderr
