"""KUEA fine-tuning: only the image tower and the kernel move, the text tower stays bit-identical, the kernel loss
falls, bad data paths fail before any model is built, and the image-folder option runs with the online teacher."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from helpers import free_port, make_image_shards, repo_params
from safetensors.torch import load_file, save_file

from dinorankclip.config import resolve
from dinorankclip.data import features
from dinorankclip.data.images import DataPathError, ShardImages, check_finetune_data, list_images
from dinorankclip.losses.kernel import StudentKernel, fit_kernel_ratio
from dinorankclip.models.clip import WEIGHTS_FILE, create_clip, export_local_dir, load_local_dir
from dinorankclip.models.teacher import WEIGHTS_FILE as TEACHER_WEIGHTS
from dinorankclip.models.teacher import create_teacher
from dinorankclip.train import finetune as ft
from dinorankclip.train.optim import make_optimizer, param_groups

ARCH = "demo-rn-tiny"
TORCHRUN = Path(sys.executable).with_name("torchrun")


pytestmark = pytest.mark.usefixtures("single_thread")


class NullTracker:
    def __init__(self):
        self.steps = []

    def log_metrics(self, metrics, step):
        self.steps.append((step, dict(metrics)))

    def log_artifact(self, *args):
        pass


def config(variant="none", **finetune):
    """The demo's clip-kuea run, shrunk to a few steps on a few images (and injected for variant != none)."""
    cfg = resolve(repo_params(), "demo", "clip-kuea")
    cfg["teacher"].update(batch_size=8, threads=1)
    cfg["injection"].update(variant=variant, channels=8, heads=2, refiner_depth=1)
    cfg["finetune"].update({"steps": 6, "batch_size": 8, "fit_samples": 24, "log_every": 2, "lr": 1e-3,
                            "warmup_steps": 1, "threads": 1, **finetune})
    return cfg


def export_start(cfg, root):
    """A seeded, randomly initialised start model exported like the pretrain stage exports it."""
    torch.manual_seed(3)
    model, _, spec = create_clip(ARCH, cfg["injection"], len(cfg["teacher"]["blocks"]))
    (root / "model").mkdir(parents=True)
    export_local_dir(model.eval(), ARCH, root / "model", spec)
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The stage outputs fine-tuning reads: shards (40 images), a random teacher's weights and its feature cache."""
    root = tmp_path_factory.mktemp("study")
    images = make_image_shards(root / "data", [24, 16])
    cfg = config()
    torch.manual_seed(1)
    (root / "teacher_weights").mkdir()
    save_file(create_teacher(cfg["teacher"]).state_dict(), str(root / "teacher_weights" / TEACHER_WEIGHTS))
    (root / "teacher").mkdir()
    features.build_feature_cache(cfg, root / "data", root / "teacher_weights", root / "staging", root / "teacher")
    return root, images


def dirs(root, start):
    return {"data": root / "data", "teacher": root / "teacher", "teacher_weights": root / "teacher_weights",
            "start": start}


def test_cached_teacher_cls_arrives_with_its_image(study):
    root, _ = study
    model, transform, _ = load_local_dir(export_start(config(), root / "cls-start") / "model")
    dataset = ShardImages(root / "data/shards.json", root / "teacher/features.json", transform)
    batch = dataset.__getitems__([30, 2])
    assert batch.keys == ["000010006", "000000002"] and batch.teacher_cls.shape == (2, 96)
    with tarfile.open(root / "teacher/features/00001.tar") as tar:
        cls = np.load(io.BytesIO(tar.extractfile("000010006.cls.npy").read()))
    assert torch.equal(batch.teacher_cls[0], torch.from_numpy(cls))


@pytest.mark.parametrize("variant", ["none", "v5"])
def test_only_the_image_tower_and_the_kernel_change(study, tmp_path, variant):
    root, _ = study
    cfg = config(variant)
    start = export_start(cfg, tmp_path / "start")
    out = tmp_path / "out"
    out.mkdir()
    tracker = NullTracker()
    metrics = ft.finetune(cfg, dirs(root, start), out, tracker)

    before, after = load_file(str(start / "model" / WEIGHTS_FILE)), load_file(str(out / "model" / WEIGHTS_FILE))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    text = [k for k in before if not k.startswith("visual.")]
    assert len(text) > 10 and "token_embedding.weight" in text and "logit_scale" in text
    assert all(torch.equal(before[k], after[k]) for k in text)  # the text tower is bit-identical
    assert changed and all(k.startswith("visual.") for k in changed)
    trainable = [k for k in before if k.startswith("visual.") and "running_" not in k and "num_batches" not in k]
    assert len(changed) > len(trainable) // 2  # the tower really trained
    assert not any("running_" in k for k in changed)  # eval mode: batch-norm statistics are those of the start
    if variant == "v5":
        assert any(k.startswith("visual.gate.") for k in changed)
        assert any(k.startswith("visual.tower.") for k in changed)
    # the student kernel trained too, and stayed positive
    assert metrics["kernel_gamma_end"] != metrics["kernel_gamma_start"] and metrics["kernel_c_end"] > 0
    assert metrics["reg_first"] == 0.0 and metrics["reg_last"] > 0 and metrics["frozen_unchanged"] is True
    assert tracker.steps[0][0] == 1 and tracker.steps[0][1]["loss/reg"] == 0.0  # z = z0 at step 0
    assert metrics["steps"] == 6 and metrics["fit_samples"] == 24 and metrics["images"] == 40


def test_export_loads_in_stock_open_clip_with_the_start_text_tower(study, tmp_path):
    root, _ = study
    cfg = config()
    start = export_start(cfg, tmp_path / "start")
    (tmp_path / "out").mkdir()
    ft.finetune(cfg, dirs(root, start), tmp_path / "out", NullTracker())
    stock, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out' / 'model'}")
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{start / 'model'}")
    stock.eval(), reference.eval()
    tokens = open_clip.get_tokenizer(ARCH)(["a red circle", "two shapes: a blue square and a green star"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(stock.encode_text(tokens), reference.encode_text(tokens))
        assert not torch.allclose(stock.encode_image(images), reference.encode_image(images))


def test_kernel_loss_falls_on_a_fixed_batch():
    """The loop's own step (align_terms, the optimizer groups) on one batch: the kernel term falls, the regulariser
    starts at exactly 0 and the kernel parameters get no weight decay.

    The tower is a linear map: a randomly initialised ResNet sends every input to nearly one direction, where the
    normalised kernel is flat. w_reg is small because the regulariser is in absolute units of the embedding and
    the kernel is scale-free: at w_reg = 1 the balance point is a displacement of order 0.1/‖z‖ (see README)."""
    torch.manual_seed(0)
    visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32))
    anchor = ft.frozen_copy(visual)
    images, teacher_cls = torch.randn(32, 3, 8, 8), torch.randn(32, 12)
    with torch.no_grad():
        kernel = StudentKernel(*fit_kernel_ratio(visual(images), teacher_cls))
    groups = param_groups([("visual", visual), ("kernel", kernel)], 1e-4)
    assert {id(kernel.log_gamma), id(kernel.log_c)} <= {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    optimizer = make_optimizer(groups, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8})
    kernels = []
    for step in range(30):
        terms = ft.align_terms(visual, anchor, kernel, images, teacher_cls, {"w_reg": 0.01, "w_kernel": 0.5})
        if step == 0:
            assert terms.reg.item() == 0.0 and terms.total.item() == 0.5 * terms.kernel.item()
        kernels.append(terms.kernel.item())
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    assert kernels[-1] < 0.8 * kernels[0], kernels


@pytest.fixture
def no_model(monkeypatch):
    """Building or loading any model fails the test: the data checks must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the data path was checked")

    monkeypatch.setattr(ft, "load_local_dir", forbidden)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    monkeypatch.setattr(open_clip, "create_model", forbidden)
    monkeypatch.setattr("dinorankclip.models.teacher.create_teacher", forbidden)


@pytest.mark.parametrize("layout, message", [
    ("missing", r"finetune\.data\.path: \S+/imagenet/train does not exist; expected an image folder"),
    ("file", r"finetune\.data\.path: \S+/imagenet/train is not a directory"),
    ("empty", r"finetune\.data\.path: \S+/imagenet/train holds no images \(no \.jpg/\.jpeg/\.png/\.webp/\.bmp files, "
              r"searched recursively\)"),
])
def test_a_bad_image_folder_is_one_error_before_any_model(study, tmp_path, no_model, layout, message):
    root, _ = study
    folder = tmp_path / "imagenet" / "train"
    if layout == "file":
        folder.parent.mkdir()
        folder.write_text("not a folder")
    elif layout == "empty":
        (folder / "n01440764").mkdir(parents=True)  # a class folder with no image in it
        (folder / "n01440764" / "README.txt").write_text("no images here")
    cfg = config(data={"kind": "folder", "path": str(folder)})
    (tmp_path / "out").mkdir()
    with pytest.raises(DataPathError, match=message):
        ft.finetune(cfg, dirs(root, tmp_path / "start"), tmp_path / "out", NullTracker())


def test_missing_shards_or_teacher_cache_name_the_stage_to_run(study, tmp_path, no_model):
    root, _ = study
    finetune = config()["finetune"]
    with pytest.raises(DataPathError, match=r"finetune\.data \(kind: shards\): \S+shards\.json not found; run the "
                                            r"data stage first"):
        check_finetune_data(finetune, tmp_path / "data", root / "teacher")
    with pytest.raises(DataPathError, match=r"\S+features\.json not found; run the teacher stage first"):
        check_finetune_data(finetune, root / "data", tmp_path / "teacher")


def test_cli_stops_on_a_bad_folder_before_mlflow_or_a_model(tmp_path, monkeypatch, capsys, no_model):
    from dinorankclip import cli, tracking

    def no_run(*args, **kwargs):
        raise AssertionError("an MLflow run was started before the data path was checked")

    monkeypatch.setattr(tracking, "job_run", no_run)
    params = repo_params()
    params["studies"]["demo"]["finetune"]["data"] = {"kind": "folder", "path": str(tmp_path / "nowhere")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--params", "params.yaml", "finetune", "--run", "clip-kuea"]) == 2
    assert f"error: finetune.data.path: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert cli.main(["--params", "params.yaml", "finetune", "--run", "clip"]) == 2
    assert "finetune --run clip: not in finetune_runs of study demo (known: clip-kuea, drc-r3-kuea)" in \
        capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_an_image_folder_trains_with_the_online_teacher_and_no_labels(study, tmp_path):
    root, images = study
    folder = tmp_path / "train"
    for i, (key, image) in enumerate(sorted(images.items())[:20]):
        (folder / f"n{i % 3:08d}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"n{i % 3:08d}" / f"{key}.JPEG", format="JPEG")
    (folder / "LOC_synset_mapping.txt").write_text("n00000000 not an image\n")
    found = list_images(folder)
    assert len(found) == 20 and found == sorted(found) and found[0].name == "000000000.JPEG"
    cfg = config(data={"kind": "folder", "path": str(folder)}, fit_samples=12, steps=3)
    start = export_start(cfg, tmp_path / "start")
    (tmp_path / "out").mkdir()
    # the teacher runs online: no data or teacher stage is read
    stage_dirs = dirs(root, start) | {"data": tmp_path / "no-data", "teacher": tmp_path / "no-teacher"}
    metrics = ft.finetune(cfg, stage_dirs, tmp_path / "out", NullTracker())
    assert metrics["data"] == "folder" and metrics["images"] == 20 and metrics["fit_samples"] == 12
    assert metrics["kernel_loss_first"] > 0 and metrics["reg_first"] == 0.0
    assert json.loads((tmp_path / "out/model/open_clip_config.json").read_text())["arch"] == ARCH


def test_the_fit_sample_is_seeded_and_capped():
    assert ft.fit_sample(10, 1024, 0) == list(range(10))
    first = ft.fit_sample(1000, 50, 0)
    assert first == ft.fit_sample(1000, 50, 0) != ft.fit_sample(1000, 50, 1)
    assert len(first) == 50 and first == sorted(first)



@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun not found next to the interpreter ({TORCHRUN})")
def test_two_ranks_align_over_the_global_batch(tmp_path):
    """Under DDP each rank holds half the batch; the gathered kernel makes its loss the global one, and the
    rank-averaged gradients of the tower and of (γ, c) equal the global batch's."""
    command = [str(TORCHRUN), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(Path(__file__).with_name("_kuea_dist_worker.py")), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == 2 and report["grad_scale"] > 1e-3
        assert report["loss"] < 1e-12 and report["kernel"] < 1e-12
        assert len(report["grads"]) == 4 and max(report["grads"]) < 1e-12, report  # weight, bias, log γ, log c
