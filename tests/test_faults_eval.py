"""Evaluation suites that do not agree with themselves (issue 20, items 2 and 8): a class list one line short, a
template without `{c}`, a retrieval sample without a caption. The evaluate stage used to exit 0 with a wrong top-1
(or end in a traceback inside webdataset); now it exits 2 with one error naming the file and the sample, and
publishes nothing."""

import io
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import only_runs, repo_params, venv_env

from dinorankclip.data import demo_suites
from dinorankclip.data.demo_world import write_eval_suite
from dinorankclip.errors import InputError
from dinorankclip.eval.checks import check_class_names, check_templates, check_wds_split
from dinorankclip.eval.zeroshot import check_targets


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar member by member: `edit(name, bytes)` returns the new bytes, or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = edit(member.name, data)
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder with a two-suite demo study (colour, retrieval), their suites on disk and an exported
    (untrained) model of `clip` seed 0: what the evaluate stage reads."""
    from dinorankclip.models.clip import create_clip, export_local_dir

    params = repo_params()
    demo = params["studies"]["demo"]
    only_runs(demo, ["clip"], {})
    demo["evaluate"].update(dataset_root=str(tmp_path / "suites/wds_{dataset_cleaned}"), batch_size=64, suites=[
        {"dataset": "wds/demo-colour", "task": "zeroshot_classification"},
        {"dataset": "wds/demo-retrieval", "task": "zeroshot_retrieval", "recall_k": [1, 5]}])
    demo["evaluate"].pop("linear_probe")
    demo["evaluate"].pop("modality_gap")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rng = random.Random(0)
    for suite in (demo_suites.colour_suite(rng, 24), demo_suites.retrieval_suite(rng, 10)):
        write_eval_suite(suite, tmp_path / "suites" / f"wds_{suite.name}", 64)
    torch.manual_seed(0)
    model_dir = tmp_path / "results/demo/pretrain/clip/seed0/model"
    model_dir.mkdir(parents=True)
    export_local_dir(create_clip("demo-rn-tiny")[0].eval(), "demo-rn-tiny", model_dir)
    return tmp_path


def evaluate(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["dinorankclip", "evaluate", "--run", "clip", "--seed", "0"], cwd=project, env=venv_env(),
                          capture_output=True, text=True, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    lines = result.stderr.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")):]


def test_a_class_list_one_line_short_and_a_retrieval_sample_without_caption_stop_the_evaluate_stage(project):
    """One project (a fresh MLflow store takes half a minute to create): the intact suites evaluate, then each
    fault exits 2 naming the file and the samples, and the published results stay as they were."""
    result = evaluate(project)
    assert result.returncode == 0, result.stderr[-3000:]
    out = project / "results/demo/evaluate/clip/seed0"
    assert sorted(p.name for p in out.glob("*.json")) == ["demo-colour.json", "demo-retrieval.json"]
    published = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    colour = project / "suites/wds_demo-colour"
    names = (colour / "classnames.txt").read_text().splitlines()
    (colour / "classnames.txt").write_text("\n".join(names[:-1]) + "\n")
    result = evaluate(project)
    assert result.returncode == 2, result.stderr[-3000:]
    error = error_lines(result)
    assert error[0] == f"error: evaluation suite {colour} (test): 4 bad sample(s):", result.stderr[-3000:]
    assert len(error) == 5 and all(
        line.startswith(f"  {colour}/test/0.tar: sample s0") and line.endswith(
            f": label 5 is outside the 5 classes of {colour}/classnames.txt (0..4): the class list is shorter than "
            "the labels") for line in error[1:]), error
    assert "Traceback" not in result.stderr

    (colour / "classnames.txt").write_text("\n".join(names) + "\n")
    retrieval = project / "suites/wds_demo-retrieval/test/0.tar"
    rewrite_tar(retrieval, lambda name, data: None if name == "s0000003.txt" else data)
    result = evaluate(project)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result)[1] == f"  {retrieval}: sample s0000003: no caption (txt is missing or blank)"
    assert "Traceback" not in result.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == published


def test_class_names_and_templates_are_checked_line_by_line(tmp_path):
    check_class_names(tmp_path, ["red", "blue"])
    with pytest.raises(InputError, match=r"classnames\.txt: line 3 repeats the class name 'red' of line 1"):
        check_class_names(tmp_path, ["red", "blue", "red"])
    with pytest.raises(InputError, match=r"classnames\.txt: blank class name on line\(s\) \[2\]"):
        check_class_names(tmp_path, ["red", "", "blue"])
    with pytest.raises(InputError, match=r"classnames\.txt: missing or empty"):
        check_class_names(tmp_path, None)
    check_templates(tmp_path, ["a {c} circle", "{c}"])
    with pytest.raises(InputError, match=r"templates\.txt: line 2 'a circle' has no \{c\}"):
        check_templates(tmp_path, ["a {c} circle", "a circle"])
    with pytest.raises(InputError, match=r"templates\.txt: line 1 'a \{shape\} \{c\}' is not a format string"):
        check_templates(tmp_path, ["a {shape} {c}"])
    with pytest.raises(InputError, match=r"templates\.txt: missing or empty"):
        check_templates(tmp_path, [])


def test_every_sample_of_a_split_is_checked(tmp_path):
    rng = random.Random(1)
    root = tmp_path / "wds_demo-colour"
    write_eval_suite(demo_suites.colour_suite(rng, 12), root, 32)
    assert check_wds_split(root, "test", "zeroshot_classification", 6) == 12
    rewrite_tar(root / "test/0.tar", lambda name, data: {"s0000002.cls": b"x1", "s0000005.cls": b"-1"}.get(name, data)
                if not name.startswith("s0000007.") or name.endswith(".cls") else None)
    with pytest.raises(InputError) as err:
        check_wds_split(root, "test", "zeroshot_classification", 6)
    lines = str(err.value).splitlines()
    assert lines[0] == f"evaluation suite {root} (test): 3 bad sample(s):"
    assert lines[1:] == [f"  {root}/test/0.tar: sample s0000002: label b'x1' is not an integer",
                         f"  {root}/test/0.tar: sample s0000005: label -1 is outside the 6 classes of "
                         f"{root}/classnames.txt (0..5): the class list is shorter than the labels",
                         f"  {root}/test/0.tar: sample s0000007: no image (webp/png/jpg/jpeg)"]
    (root / "test/nshards.txt").write_text("2\n")
    with pytest.raises(InputError, match=r"test/1\.tar: missing \(.*nshards\.txt says 2 shards\)"):
        check_wds_split(root, "test", "zeroshot_classification", 6)
    (root / "test/nshards.txt").write_text("1\n")
    data = (root / "test/0.tar").read_bytes()
    (root / "test/0.tar").write_bytes(data[:700])
    with pytest.raises(InputError, match=r"0\.tar: not a readable tar"):
        check_wds_split(root, "test", "zeroshot_classification", 6)


def test_retrieval_samples_need_a_caption_line(tmp_path):
    root = tmp_path / "wds_demo-retrieval"
    write_eval_suite(demo_suites.retrieval_suite(random.Random(2), 5), root, 32)
    assert check_wds_split(root, "test", "zeroshot_retrieval") == 5
    rewrite_tar(root / "test/0.tar", lambda name, data: b"\n  \n" if name == "s0000001.txt" else data)
    with pytest.raises(InputError, match=r"sample s0000001: no caption \(txt is missing or blank\)"):
        check_wds_split(root, "test", "zeroshot_retrieval")


def test_labels_of_any_dataset_are_checked_against_its_class_names():
    check_targets(torch.tensor([0, 2, 1]), ["a", "b", "c"], "wds/x")
    with pytest.raises(InputError, match=r"wds/x: sample 1 \(in loader order\) has label 3, outside its 3 class "
                                         r"names; 2 such sample"):
        check_targets(torch.tensor([0, 3, 1, 4]), ["a", "b", "c"], "wds/x")
