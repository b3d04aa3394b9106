"""The positive control of the teacher pathway (issue 17): with the image trunk frozen at its random initialisation,
V5 trained with the true teacher features against V5 trained with the same features shuffled across images, on the
demo world, scored zero-shot on demo-shape.

Both runs have the same capacity — branch L, fusion, gate and text tower train, the trunk does not — so the margin is
the information the teacher's features carry about each image. A test configuration, not a registry run: the trunk
is locked the way open_clip's `lock_image_tower` locks it (parameters and batch-norm statistics), and the shuffled
cache keeps every key and shape. Usable as a script on a finished demo (prints JSON):

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


def train_frozen_trunk(cfg: dict, study: Path, teacher_dir: Path, out: Path) -> Path:
    """Pretrain `cfg`'s run with the image tower locked at its initialisation; the exported model's folder."""
    from dinorankclip.tracking import NullTracker
    from dinorankclip.train import pretrain

    build = pretrain.build_student

    def locked(*args, **kwargs):
        student, *rest = build(*args, **kwargs)
        student.model.visual.lock(0, freeze_bn_stats=True)
        return (student, *rest)

    pretrain.build_student = locked
    try:
        out.mkdir(parents=True)
        pretrain.pretrain(cfg, study / "data", {"teacher": teacher_dir, "teacher_weights": study / "teacher_weights",
                                                "captions": study / "captions"}, out, NullTracker(), out / "state")
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


def probe_accuracies(cfg: dict, model_dir: Path) -> dict[str, float]:
    """Where the shape information is, after training: the linear probe's demo-shape top-1 (clip-benchmark's
    protocol, the evaluate stage's own) on the tower's z_g, on the branch's fused δ = P(z_loc) and on the injected
    z. A teacher that reached branch L but not z shows as a high probe on δ beside a low one on z."""
    import torch

    from dinorankclip.eval.linear_probe import linear_probe
    from dinorankclip.eval.suites import _loader, build
    from dinorankclip.models.clip import load_local_dir

    model, transform, _ = load_local_dir(model_dir, "cpu")
    visual, ev = model.visual, cfg["evaluate"]

    @torch.no_grad()
    def features(split: str) -> dict[str, tuple]:
        out: dict[str, list] = {"z_g": [], "delta": [], "z": []}
        targets = []
        data = build("wds/demo-shape", "linear_probe", ev, transform, split)
        for images, target in _loader(data, ev, "wds/demo-shape", split):
            f = visual.features(images)
            delta = visual.fusion(f.maps)
            for name, x in (("z_g", f.z_g), ("delta", delta), ("z", f.z)):
                out[name].append(torch.nn.functional.normalize(x.float(), dim=-1))
            targets.append(torch.as_tensor(target))
        y = torch.cat(targets)
        return {name: (torch.cat(x), y) for name, x in out.items()}

    train, test = features("train"), features("test")
    return {name: linear_probe(*train[name], *test[name], ev["linear_probe"], cfg["study_seed"], "cpu")["lp_acc1"]
            for name in train}


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
    models = {name: train_frozen_trunk(cfg, study, teacher, work / name)
              for name, teacher in (("true", study / "teacher"), ("shuffled", shuffled))}
    scores = {name: shape_accuracy(cfg, model) for name, model in models.items()}
    result = {**scores, "margin": scores["true"] - scores["shuffled"]}
    if diagnose:
        result["diagnosis"] = {name: {"strength": json.loads((model.parent / "metrics.json").read_text())["strength"],
                                      "probe_shape_top1": probe_accuracies(cfg, model)}
                               for name, model in models.items()}
    return result


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(control(Path(sys.argv[1]).resolve(), Path(tmp), diagnose=True), indent=2))
