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


def control(study: Path, work: Path, threads: int = 2) -> dict:
    """Shape top-1 of the frozen-trunk V5 with the true and with the shuffled teacher features, and the margin."""
    import torch
    import yaml

    from dinorankclip.config import resolve

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = resolve(params, "demo", "drc-r3", 0)
    cfg["pretrain"].update(threads=threads)
    cfg["evaluate"]["dataset_root"] = str(study / "source" / "eval" / "wds_{dataset_cleaned}")
    torch.set_num_threads(threads)
    shuffled = shuffled_cache(study / "teacher", work / "teacher-shuffled")
    scores = {name: shape_accuracy(cfg, train_frozen_trunk(cfg, study, teacher, work / name))
              for name, teacher in (("true", study / "teacher"), ("shuffled", shuffled))}
    return {**scores, "margin": scores["true"] - scores["shuffled"]}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(control(Path(sys.argv[1]).resolve(), Path(tmp)), indent=2))
