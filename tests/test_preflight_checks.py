"""`dinorankclip preflight` on a small study with every input in place passes; each planted fault fails its own
check with the fix named: a missing or wrong-architecture teacher file, a suite without class names, fewer shards
than loader workers, an unparseable caption list, too little disk. The device-only checks say they were skipped."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import repo_params
from preflight_world import write_second_captions, write_suites, write_teacher

from dinorankclip.config import deep_merge, resolve, validate_params
from dinorankclip.preflight import disk, run_preflight, steps

TEACHER = {"model": "vit_tiny_patch16_dinov3_qkvb", "blocks": [1, 2, 3], "grid": 2, "pca_dim": 256,
           "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3}}


@pytest.fixture
def small(tmp_path, monkeypatch):
    """The paper study with small parts: demo towers, a tiny DINOv3 teacher file, suites of 2 shards, a local list
    whose links are refused (nothing is fetched), run in a folder of its own."""
    monkeypatch.chdir(tmp_path)
    urls = [f"http://127.0.0.1:1/img/{i}.jpg" for i in range(40)]
    Path("list.tsv").write_text("".join(f"a caption {i}\t{url}\n" for i, url in enumerate(urls)))
    Path("val.tsv").write_text("".join(f"a held-out caption {i}\thttp://127.0.0.1:1/v/{i}.jpg\n" for i in range(6)))
    write_second_captions(tmp_path / "captions.tsv", urls[:30])
    write_teacher(tmp_path / "teacher.safetensors", TEACHER["model"], kwargs=TEACHER["model_kwargs"])
    write_suites(tmp_path / "suites", shards=2)
    params = repo_params()
    params["studies"]["small"] = {
        "extends": "paper", "runs": ["clip"], "finetune_runs": {},
        "source": {"tsv": "list.tsv", "validation_tsv": "val.tsv"},
        "captions": {"source": "file", "file": "captions.tsv"}, "model": {"arch": "demo-rn-tiny"},
        "teacher": {**TEACHER, "weights": {"from": "file", "path": "teacher.safetensors"}, "pca_sample": 8},
        "pretrain": {"batch_size": 4, "val_samples": 4, "gpus_per_node": 0, "threads": 1},
        "evaluate": {"dataset_root": "suites/wds_{dataset_cleaned}", "workers": 2, "suites": [
            {"dataset": "wds/vtab/cifar10", "task": "zeroshot_classification"},
            {"dataset": "wds/mscoco_captions", "task": "zeroshot_retrieval", "recall_k": [1]}],
            "linear_probe": {"datasets": ["wds/vtab/pets"]}}}
    return validate_params(params)


def statuses(params) -> dict[str, str]:
    checks, _ = run_preflight(params, "small", sample=2)
    return {check.name: check for check in checks}


def test_every_input_in_place_passes_and_the_device_checks_say_they_were_skipped(small):
    checks = statuses(small)
    assert {name for name, check in checks.items() if check.status == "fail"} == set()
    assert checks["caption list"].values == {"rows": 40, "pairs": 40, "malformed": 0, "reasons": {}}
    assert checks["validation list"].values == {"pairs": 6, "val_samples": 4, "malformed": 0}
    assert checks["second captions"].status == "warn" and checks["second captions"].values["covered"] == 30
    assert checks["image sample"].status == "warn"  # the list's links are refused: no shard bytes measured
    assert [checks[f"suite {d}"].values["shards"] for d in ("wds/vtab/cifar10", "wds/mscoco_captions",
                                                             "wds/vtab/pets")] == [
        {"test": 2}, {"test": 2}, {"test": 2, "train": 2}]
    teacher = checks["teacher weights"]
    assert (teacher.status, teacher.values["width"], teacher.values["depth"]) == ("ok", 96, 4)
    device = {name for name, check in checks.items() if check.device_only}
    assert device == {"GPUs", "training steps", "projected time"}
    assert all(checks[name].status == "skip" for name in device)


@pytest.mark.parametrize("plant, name, found, fix", [
    (lambda: Path("teacher.safetensors").unlink(), "teacher weights",
     "teacher.weights.path: teacher.safetensors does not exist",
     "model.safetensors of the Hugging Face repo 'timm/vit_tiny_patch16_dinov3_qkvb'"),
    (lambda: write_teacher(Path("teacher.safetensors"), TEACHER["model"], kwargs={**TEACHER["model_kwargs"],
                                                                                   "embed_dim": 48}),
     "teacher weights", "shape mismatches (e.g. cls_token: file [1, 1, 48], model "
     "[1, 1, 96]", "name the file's architecture in teacher.model"),
    (lambda: Path("suites/wds_vtab-cifar10/classnames.txt").unlink(), "suite wds/vtab/cifar10",
     "no class names (classnames.txt missing or empty)", "export wds/vtab/cifar10 to suites/wds_vtab-cifar10"),
    (lambda: Path("suites/wds_vtab-pets/train/1.tar").unlink(), "suite wds/vtab/pets",
     "train: 1 of 2 shards missing (e.g. 1.tar)", "export wds/vtab/pets"),
    (lambda: Path("val.tsv").unlink(), "validation list", "source.validation_tsv: val.tsv does not exist",
     "put CC3M's validation list (Validation_GCC-1.1.0-Validation.tsv) at source.validation_tsv"),
    (lambda: Path("val.tsv").write_text("one caption\thttp://127.0.0.1:1/v.jpg\n"), "validation list",
     "val.tsv: 1 (caption, url) pairs, fewer than pretrain.val_samples 4", "lower pretrain.val_samples"),
    (lambda: Path("list.tsv").write_bytes(bytes(range(256)) * 40), "caption list",
     "list.tsv: no valid (caption, url) rows among", "put Google's CC3M training list"),
])
def test_a_planted_fault_fails_its_check_naming_the_fix(small, plant, name, found, fix):
    plant()
    checks = statuses(small)
    assert [n for n, check in checks.items() if check.status == "fail"] == [name]
    assert found in checks[name].detail and fix in checks[name].fix


def test_fewer_shards_than_loader_workers_warn_that_evaluation_runs_fewer_workers(small):
    small["studies"]["small"]["evaluate"]["workers"] = 3
    checks = statuses(small)
    assert not any(check.status == "fail" for check in checks.values())
    pets = checks["suite wds/vtab/pets"]
    assert pets.status == "warn" and pets.detail.endswith(
        "; test: 2 shard(s), so 2 loader worker(s) of evaluate.workers 3"
        "; train: 2 shard(s), so 2 loader worker(s) of evaluate.workers 3"), pets.detail
    assert pets.fix == "re-export wds/vtab/pets in >= 3 shards to use every loader worker"


def test_too_little_disk_fails_naming_what_needs_the_space(small, monkeypatch):
    checks = statuses(small)
    need = checks["disk"].values["need_bytes"]
    parts = checks["disk"].values["parts"]
    cfg = resolve(small, "small", "clip")
    # 40 listed pairs x the cache sample (CLS 96 + maps 3 x 96 x 2 x 2, fp16, tar and .npy headers), and captions
    assert parts["teacher cache"] == 40 * checks["disk"].values["per_image_bytes"]["teacher cache"] == 40 * 4096
    assert need == sum(parts.values()) and parts["exports"] > 0 and cfg["model"]["arch"] == "demo-rn-tiny"
    monkeypatch.setattr(disk, "free_bytes", lambda path: need - 1)
    checks = statuses(small)
    assert [n for n, check in checks.items() if check.status == "fail"] == ["disk"]
    assert checks["disk"].fix.startswith("free 0.0 MB there")
    monkeypatch.setattr(disk, "free_bytes", lambda path: need)
    assert statuses(small)["disk"].status == "ok"


def test_image_shards_count_the_validation_images_and_coca_captions_are_sized_at_the_lists_length(small, tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setattr(disk, "image_bytes_per_image",
                        lambda cfg, listed, count, work: {"bytes": 1000.0, "fetched": count, "failed": 0})
    parts = statuses(small)["disk"].values["parts"]
    assert parts["image shards"] == (40 + 6) * 1000.0  # data/shards and data/val: the 6 validation pairs too
    assert parts["teacher cache"] == 40 * 4096  # the training images only
    small["studies"]["small"]["captions"] = {"source": "coca"}  # written by the captions stage, not yet there
    checks = statuses(small)
    mean = (10 * len("a caption 0") + 30 * len("a caption 10")) / 40  # the list's captions
    (tmp_path / "sized").mkdir()
    assert checks["disk"].values["parts"]["caption shards"] == 40 * disk.caption_bytes_per_image(mean,
                                                                                               tmp_path / "sized")


def test_the_cli_prints_the_table_writes_the_json_and_exits_1_on_a_failure(small, tmp_path, capsys):
    from dinorankclip.cli import main

    params = {**small, "studies": {**small["studies"]}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", "params.yaml", "preflight", "--study", "small", "--json", "ok.json", "--sample", "1"]) == 0
    Path("suites/wds_vtab-cifar10/zeroshot_classification_templates.txt").write_text("\n")
    assert main(["--params", "params.yaml", "preflight", "--study", "small", "--json", "bad.json"]) == 1
    out = capsys.readouterr().out
    assert "FAIL           suite wds/vtab/cifar10" in out and "fix: export wds/vtab/cifar10" in out
    assert "SKIP (device)  GPUs" in out and "1 check(s) failed" in out
    report = json.loads(Path("bad.json").read_text())
    assert report["study"] == "small" and not report["ok"] and json.loads(Path("ok.json").read_text())["ok"]
    assert [c["name"] for c in report["checks"] if c["status"] == "fail"] == ["suite wds/vtab/cifar10"]


def test_a_run_kind_is_built_and_timed_and_projected_as_the_loop_counts_steps(small):
    cfg = resolve(small, "small", "clip")
    built = steps.build_step(cfg, 4, torch.device("cpu"))
    timed = steps.time_steps(built.run, 2, torch.device("cpu"))
    assert timed["seconds_per_step"] > 0 and "peak_bytes" not in timed  # peak memory: CUDA only
    kept = steps.kept_bytes(built)
    assert kept["exports"] == 2 * built.model_bytes and kept["training"] > 3 * built.model_bytes
    # the paper's 32 epochs of 1,000 // 4 = 250 steps (its validation pairs are a list of their own); with pairs
    # held out of the training list, (1,000 - 4) // 4 = 249; capped by max_steps when set
    assert steps.projection(cfg, 1000, 0.5) == {"steps": 32 * 250, "wall_hours": 32 * 250 * 0.5 / 3600,
                                                "gpu_hours": 32 * 250 * 0.5 / 3600}
    assert steps.projection(deep_merge(cfg, {"source": {"validation_tsv": None}}), 1000, 0.5)["steps"] == 32 * 249
    capped = deep_merge(cfg, {"pretrain": {"max_steps": 100, "gpus_per_node": 8}})
    assert steps.projection(capped, 1000, 0.5) == {"steps": 100, "wall_hours": 100 * 0.5 / 3600,
                                                   "gpu_hours": 8 * 100 * 0.5 / 3600}
    assert steps.per_rank_batch(deep_merge(cfg, {"pretrain": {"batch_size": 1024, "gpus_per_node": 8}})) == 128


def test_a_retrieval_suite_smaller_than_its_largest_recall_k_fails(small):
    small["studies"]["small"]["evaluate"]["suites"][1]["recall_k"] = [1, 5, 10]
    checks = statuses(small)
    assert [n for n, check in checks.items() if check.status == "fail"] == ["suite wds/mscoco_captions"]
    assert checks["suite wds/mscoco_captions"].detail == ("test: 8 images, fewer than the 10 that recall_k or "
                                                          "modality_gap.pairs need")


def test_coca_captions_need_their_weights_file_when_a_run_reads_them(tmp_path):
    from dinorankclip.preflight.inputs import second_captions

    params = validate_params(repo_params())
    cfg = resolve(params, "paper")
    cfg["captions"]["coca"]["weights"] = str(tmp_path / "coca.bin")
    check = second_captions(cfg, ["alip"], None)
    assert check.status == "fail", check
    assert check.detail == f"captions.coca.weights: CoCa weights file '{tmp_path}/coca.bin' not found"
    assert check.fix.startswith("Download the weights of coca_ViT-L-14 once on a machine with network"), check.fix
    assert second_captions(cfg, [], None).status == "skip"
