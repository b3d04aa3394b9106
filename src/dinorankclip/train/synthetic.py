"""Stand-ins for what a training step reads, so a run's step can be built and timed before any stage has run.

`stand_in_teacher` writes, in a temporary directory, the teacher stage outputs `build_student` reads (the cache's
channel width; random weights for an online teacher: speed does not depend on them); `synthetic_inputs` gives a
batch shaped as the loader yields it; `synthetic_step` builds the run's whole training step on them. Used by
`bench/step.py`, `bench/gpu_suite.py` and `dinorankclip preflight`.
"""

from __future__ import annotations

import functools
import itertools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from dinorankclip import diagnostics
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


@dataclass
class SyntheticStep:
    run: Callable[[], None]  # one step: forward, backward, update, and the loop's device-side record of them
    student: torch.nn.Module  # the `Student` (its `.model` is what an export holds)
    module: torch.nn.Module  # the `TrainStep`: student, objective and heads, everything a checkpoint holds


def synthetic_step(cfg: dict, batch: int, device: torch.device, precision: str, threads: int, total_steps: int,
                   gather: bool = False, compile_backend: str = "inductor") -> SyntheticStep:
    """The run's training step on a fixed synthetic batch of `batch` pairs, built as `pretrain` builds it
    (`build_student` after `setup_torch`, `build_objective`, `TrainStep`, AdamW over `param_groups`, `update`, the
    loop's `StepLedger`, diagnostics on the steps the loop logs); `total_steps` sets where the schedules are;
    `gather`: the losses gather candidates across ranks."""
    from dinorankclip.train.ledger import StepLedger
    from dinorankclip.train.objective import build_objective
    from dinorankclip.train.optim import make_optimizer, param_groups
    from dinorankclip.train.pretrain import build_student, logs_after, setup_torch
    from dinorankclip.train.step import TrainStep, autocast, update

    opt = cfg["pretrain"]
    with tempfile.TemporaryDirectory() as tmp:
        dirs, width = stand_in_teacher(cfg, Path(tmp))
        # seeds and determinism as pretraining sets them, after the stand-in's own init
        setup_torch(cfg["seed"], threads, opt["deterministic"])
        student, _, _, _ = build_student(cfg, dirs, device)
    if opt["grad_checkpointing"]:
        student.model.set_grad_checkpointing(True)
    objective = build_objective(cfg["loss"], student.model.text_projection.shape[1], cfg["seed"])
    module = TrainStep(student, objective, cfg, gather=gather).to(device).train()
    optimizer = make_optimizer(param_groups([("", module)], opt["weight_decay"]), opt)
    if opt["compile"]:
        student.compile(backend=compile_backend)
    images, tokens, teacher, captions = synthetic_inputs(cfg, student.model, batch, width, device)
    steps, ledger = itertools.count(), StepLedger(device)

    def run() -> None:
        step = next(steps)
        with autocast(device, precision), diagnostics.computing(logs_after(step + 1, opt["log_every"], total_steps)):
            loss, _ = module(images, tokens, teacher, step, total_steps, captions)
        ledger.record(step, loss.detach(), update(module, loss, optimizer, student.model, opt["grad_clip"]))

    return SyntheticStep(run, student, module)
