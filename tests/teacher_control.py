"""The positive control of the teacher pathway (issue 17): with the image trunk frozen at its random initialisation,
V5 trained with the true teacher features against V5 trained with the same features shuffled across images, on the
demo world, scored zero-shot on demo-shape.

Both runs have the same capacity — branch L, fusion, gate and text tower train, the trunk's weights do not — so the
margin is the information the teacher's features carry about each image. A test configuration, not a registry run:
the trunk's parameters are frozen at their initialisation while its batch norms keep normalising with the batch's
statistics, as in any training step (frozen at their initial running statistics, 0 and 1, the random ResNet's
activations were unnormalised and its features carried nothing: a linear probe on its z_g was at chance). The
shuffled cache keeps every key and shape. Usable as a script on a finished demo (prints JSON):

    python tests/teacher_control.py results/demo
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shuffled_cache(teacher_dir: Path, out: Path, seed: int = 0) -> Path:
    """A copy of a teacher cache whose feature payloads are permuted across images (keys and layout kept)."""
    shutil.copytree(teacher_dir, out)
    shards = sorted((out / "features").glob("*.tar"))
    members = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members += [(shard, m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    keys = sorted({name.split(".", 1)[0] for _, name, _ in members})
    order = keys[:]
    random.Random(seed).shuffle(order)
    donor = dict(zip(keys, order, strict=True))
    payload = {name: data for _, name, data in members}
    for shard in shards:
        names = [name for s, name, _ in members if s == shard]
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name in names:
                key, suffix = name.split(".", 1)
                data = payload[f"{donor[key]}.{suffix}"]
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


class Distillation:
    """A tracker that keeps the distillation terms of the first and the last logged step."""

    run_id = None
    keys = ("loss/distill_feature", "loss/distill_relational")

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def log_metrics(self, metrics, step) -> None:
        values = {k: float(metrics[k]) for k in self.keys if k in metrics}
        if values:
            self.first = self.first or values
            self.last = values

    def __getattr__(self, name):  # flush, log_artifact, set_tags, ...: nothing to record
        return lambda *args, **kwargs: None


def train_frozen_trunk(cfg: dict, study: Path, teacher_dir: Path, out: Path, tracker=None) -> Path:
    """Pretrain `cfg`'s run with the image tower's weights frozen at their initialisation; the exported model's
    folder."""
    from dinorankclip.tracking import NullTracker
    from dinorankclip.train import pretrain

    build = pretrain.build_student

    def locked(*args, **kwargs):
        student, *rest = build(*args, **kwargs)
        student.model.visual.tower.requires_grad_(False)
        return (student, *rest)

    pretrain.build_student = locked
    try:
        out.mkdir(parents=True)
        pretrain.pretrain(cfg, study / "data", {"teacher": teacher_dir, "teacher_weights": study / "teacher_weights",
                                                "captions": study / "captions"}, out, tracker or NullTracker(),
                          out / "state")
    finally:
        pretrain.build_student = build
    return out / "model"


def shape_accuracy(cfg: dict, model_dir: Path) -> float:
    """Zero-shot top-1 of an exported model on demo-shape, as the evaluate stage computes it."""
    from dinorankclip.eval.suites import evaluate_suite
    from dinorankclip.models.clip import load_local_dir

    model, transform, tokenizer = load_local_dir(model_dir, "cpu")
    suite = next(s for s in cfg["evaluate"]["suites"] if s["dataset"] == "wds/demo-shape")
    return evaluate_suite(model, transform, tokenizer, suite, cfg["evaluate"], "cpu")[0]["metrics"]["acc1"]


def shape_probes(cfg: dict, transform, readouts) -> dict[str, float]:
    """The linear probe's demo-shape top-1 (clip-benchmark's protocol, the evaluate stage's own) on each feature
    `readouts(images)` returns ({name: [B, ...] tensor}), each flattened and L2-normalised."""
    import torch

    from dinorankclip.eval.linear_probe import linear_probe
    from dinorankclip.eval.suites import _loader, build

    ev = cfg["evaluate"]

    @torch.no_grad()
    def features(split: str) -> dict[str, tuple]:
        out: dict[str, list] = {}
        targets = []
        data = build("wds/demo-shape", "linear_probe", ev, transform, split)
        for images, target in _loader(data, ev, "wds/demo-shape", split):
            for name, x in readouts(images).items():
                out.setdefault(name, []).append(torch.nn.functional.normalize(x.float().flatten(1), dim=-1))
            targets.append(torch.as_tensor(target))
        y = torch.cat(targets)
        return {name: (torch.cat(x), y) for name, x in out.items()}

    train, test = features("train"), features("test")
    return {name: linear_probe(*train[name], *test[name], ev["linear_probe"], cfg["study_seed"], "cpu")["lp_acc1"]
            for name in train}


def probe_accuracies(cfg: dict, model_dir: Path) -> dict[str, float]:
    """Where the shape information is, after training: the probe (`shape_probes`) on branch L's maps (the distilled
    ones, every position), on the tower's z_g, on the fused δ = P(z_loc) and on the injected z. A teacher that
    reached branch L but not z shows as a high probe on the maps beside a low one on δ or z."""
    import torch

    from dinorankclip.models.clip import load_local_dir

    model, transform, _ = load_local_dir(model_dir, "cpu")
    visual = model.visual

    def readouts(images):
        f = visual.features(images)
        maps = torch.cat([m.flatten(1) for m in f.maps], dim=1)
        return {"branch_maps": maps, "z_g": f.z_g, "delta": visual.fusion(f.maps), "z": f.z}

    return shape_probes(cfg, transform, readouts)


def teacher_probe_accuracies(cfg: dict, study: Path) -> dict[str, float]:
    """The same probe on what the teacher hands over: its CLS token and its cached maps (the study's blocks, pooled
    to the grid, projected on the cache's PCA), computed on the demo-shape images. The ceiling of the pathway: a
    branch L distilled from these maps cannot say more about shape than they do."""
    import torch
    from safetensors.torch import load_file

    from dinorankclip.data.features import batch_features, project
    from dinorankclip.models.clip import model_config
    from dinorankclip.models.teacher import WEIGHTS_FILE, load_teacher, teacher_transform

    device, spec = torch.device("cpu"), cfg["teacher"]
    teacher = load_teacher(spec, study / "teacher_weights" / WEIGHTS_FILE, device)
    pca = load_file(str(study / "teacher" / "pca.safetensors")) or None
    transform = teacher_transform(model_config(cfg["model"]["arch"])["vision_cfg"]["image_size"])

    def readouts(images):
        cls, patches = batch_features(teacher, images, spec, device)
        return {"teacher_cls": cls, "teacher_maps": project(patches, pca)}

    return shape_probes(cfg, transform, readouts)


def control(study: Path, work: Path, threads: int = 2, diagnose: bool = False) -> dict:
    """Shape top-1 of the frozen-trunk V5 with the true and with the shuffled teacher features, and the margin;
    with `diagnose`, each run's strength statistics and where its shape information is (`probe_accuracies`)."""
    import torch
    import yaml

    from dinorankclip.config import resolve

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = resolve(params, "demo", "drc-r3", 0)
    cfg["pretrain"].update(threads=threads)
    cfg["evaluate"]["dataset_root"] = str(study / "source" / "eval" / "wds_{dataset_cleaned}")
    torch.set_num_threads(threads)
    shuffled = shuffled_cache(study / "teacher", work / "teacher-shuffled")
    trackers = {"true": Distillation(), "shuffled": Distillation()}
    models = {name: train_frozen_trunk(cfg, study, teacher, work / name, trackers[name])
              for name, teacher in (("true", study / "teacher"), ("shuffled", shuffled))}
    scores = {name: shape_accuracy(cfg, model) for name, model in models.items()}
    result = {**scores, "margin": scores["true"] - scores["shuffled"],
              "distill_feature_last": {name: t.last["loss/distill_feature"] for name, t in trackers.items()}}
    if diagnose:
        result["diagnosis"] = {name: {"strength": json.loads((model.parent / "metrics.json").read_text())["strength"],
                                      "distillation_first_last": [trackers[name].first, trackers[name].last],
                                      "probe_shape_top1": probe_accuracies(cfg, model)}
                               for name, model in models.items()}
        result["diagnosis"]["teacher_probe_shape_top1"] = teacher_probe_accuracies(cfg, study)
    return result


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(control(Path(sys.argv[1]).resolve(), Path(tmp), diagnose=True), indent=2))
