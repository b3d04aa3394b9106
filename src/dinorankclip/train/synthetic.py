"""Stand-ins for what a training step reads, so a run's step can be built and timed before any stage has run.

`stand_in_teacher` writes, in a temporary directory, the teacher stage outputs `build_student` reads (the cache's
channel width; random weights for an online teacher: speed does not depend on them); `synthetic_inputs` gives a
batch shaped as the loader yields it. Used by `bench/step.py` and `dinorankclip preflight`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from dinorankclip.config import reads_captions, teacher_stages
from dinorankclip.io import write_json
from dinorankclip.models.teacher import WEIGHTS_FILE, create_teacher

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def stand_in_teacher(cfg: dict, tmp: Path) -> tuple[dict[str, Path], int]:
    """(teacher stage dirs for `build_student`, made up in `tmp`; the cached maps' channel width, 0 without)."""
    stages = teacher_stages(cfg)
    if not stages:
        return {}, 0
    dirs = {stage: tmp / stage for stage in stages}
    for path in dirs.values():
        path.mkdir()
    if "teacher" in dirs:
        width = min(teacher_width(cfg["teacher"]["model"], json.dumps(cfg["teacher"]["model_kwargs"], sort_keys=True)),
                    cfg["teacher"]["pca_dim"])  # the cache PCA-reduces only a wider teacher
        write_json(dirs["teacher"] / "stats.json", {"patch_channels": width})
        return dirs, width
    teacher = create_teacher(cfg["teacher"])
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(dirs["teacher_weights"] / WEIGHTS_FILE))
    return dirs, min(teacher.embed_dim, cfg["teacher"]["pca_dim"])


@functools.lru_cache
def teacher_width(model: str, model_kwargs: str) -> int:
    """The feature width of a timm teacher (kwargs as JSON), built once per process."""
    return create_teacher({"model": model, "model_kwargs": json.loads(model_kwargs)}).embed_dim


def synthetic_inputs(cfg: dict, model: torch.nn.Module, batch: int, width: int, device: torch.device) -> Inputs:
    """Images, token ids, (cache runs only) teacher maps and (runs reading them) second captions shaped like a
    loader batch, from the run's seed."""
    generator = torch.Generator().manual_seed(cfg["seed"])
    size = model.visual.preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch, 3, h, w, generator=generator)
    tokens = open_clip.get_tokenizer(cfg["model"]["arch"])([f"synthetic caption {i}" for i in range(batch)])
    teacher = None
    if "teacher" in teacher_stages(cfg):
        spec = cfg["teacher"]
        teacher = torch.randn(batch, len(spec["blocks"]), width, spec["grid"], spec["grid"], generator=generator)
        teacher = teacher.half().to(device)
    captions = None
    if reads_captions(cfg):
        captions = open_clip.get_tokenizer(cfg["model"]["arch"])([f"a longer synthetic description {i}"
                                                                  for i in range(batch)]).to(device)
    return images.to(device), tokens.to(device), teacher, captions
