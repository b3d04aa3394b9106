"""Real training steps of each distinct kind of run in a study, and what they imply for the study.

A run's step is built as pretraining builds it (`build_student`, `build_objective`, `TrainStep`, AdamW over
`param_groups`, `update`) with `dinorankclip.train.synthetic`'s stand-ins for the teacher stages and the batch, at
the per-GPU batch (`batch_size` over `gpus_per_node` x `nodes` ranks). Runs whose steps cost the same (same
towers, injection, objective sizes, patch objective, caption sampling and step settings) are one kind, measured
once. On a GPU: seconds per step and peak memory against the card, projected to every (run, seed) and the study
(communication between ranks is not measured, so a projection is a lower bound). Anywhere: the bytes a run keeps
on disk (checkpoint with AdamW moments, best-epoch weights, the two exports).
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# pretrain settings that change what a step computes or holds (the rest: schedule, logging, data loading)
STEP_KEYS = ("batch_size", "precision", "grad_checkpointing", "compile", "gpus_per_node", "nodes", "grad_clip")


def kind_key(cfg: dict) -> str:
    """Equal for two resolved runs whose training steps cost the same."""
    loss = {k: v for k, v in cfg["loss"].items() if k != "rank_weight"}
    return json.dumps({"model": cfg["model"], "injection": cfg["injection"], "loss": loss,
                       "patch_loss": cfg["patch_loss"], "sampling": cfg["captions"]["sampling"],
                       "teacher": cfg["teacher"], "step": {k: cfg["pretrain"][k] for k in STEP_KEYS}},
                      sort_keys=True)


def ranks(cfg: dict) -> int:
    return max(cfg["pretrain"]["gpus_per_node"], 1) * cfg["pretrain"]["nodes"]


def per_rank_batch(cfg: dict) -> int:
    return cfg["pretrain"]["batch_size"] // ranks(cfg)


@dataclass
class BuiltStep:
    run: Callable[[], None]  # one step: forward, backward, optimizer update
    model_bytes: int  # the open_clip model: what each export and the best-epoch file hold
    state_bytes: int  # everything a checkpoint holds: trained modules and AdamW's two moments


def build_step(cfg: dict, batch: int, device: torch.device) -> BuiltStep:
    """The run's training step on a fixed synthetic batch of `batch` pairs."""
    from dinorankclip.train.objective import build_objective
    from dinorankclip.train.optim import make_optimizer, param_groups
    from dinorankclip.train.pretrain import build_student, setup_torch
    from dinorankclip.train.step import TrainStep, autocast, update
    from dinorankclip.train.synthetic import stand_in_teacher, synthetic_inputs

    opt = cfg["pretrain"]
    with tempfile.TemporaryDirectory() as tmp:
        dirs, width = stand_in_teacher(cfg, Path(tmp))
        setup_torch(cfg["seed"], opt["threads"], opt["deterministic"])
        student, _, _, _ = build_student(cfg, dirs, device)
    if opt["grad_checkpointing"]:
        student.model.set_grad_checkpointing(True)
    objective = build_objective(cfg["loss"], student.model.text_projection.shape[1], cfg["seed"])
    module = TrainStep(student, objective, cfg, gather=False).to(device).train()
    optimizer = make_optimizer(param_groups([("", module)], opt["weight_decay"]), opt)
    if opt["compile"]:
        student.compile()
    images, tokens, teacher, captions = synthetic_inputs(cfg, student.model, batch, width, device)
    precision = opt["precision"] if device.type == "cuda" else "fp32"
    steps = itertools.count()

    def run() -> None:
        with autocast(device, precision):
            loss, _ = module(images, tokens, teacher, next(steps), 1_000_000, captions)
        update(module, loss, optimizer, student.model, opt["grad_clip"])

    moments = 2 * sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)  # AdamW's fp32 moments
    return BuiltStep(run, _bytes(student.model.state_dict()), _bytes(module.state_dict()) + moments)


def _bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def kept_bytes(built: BuiltStep) -> dict[str, int]:
    """On disk per (run, seed): the checkpoint and best-epoch file while it trains (removed once its output is
    published), and the final and best exports, which stay."""
    return {"training": built.state_bytes + built.model_bytes, "exports": 2 * built.model_bytes}


def time_steps(run: Callable[[], None], steps: int, device: torch.device) -> dict:
    """Seconds per step over `steps` steps after one untimed step, and the peak memory (CUDA) of all of them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    result = {"seconds_per_step": seconds}
    if device.type == "cuda":
        result.update(peak_bytes=torch.cuda.max_memory_allocated(device),
                      card_bytes=torch.cuda.get_device_properties(device).total_memory)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def total_steps(cfg: dict, pairs: int) -> int:
    """Training steps of a run on `pairs` stored pairs: every full global batch of every epoch, capped by
    `max_steps`, as the pretraining loop counts them."""
    opt = cfg["pretrain"]
    per_epoch = (pairs - opt["val_samples"]) // opt["batch_size"]
    return min(opt["epochs"] * per_epoch, opt["max_steps"] or math.inf)


def projection(cfg: dict, pairs: int, seconds_per_step: float) -> dict:
    """Wall time and GPU-hours of one (run, seed) of `cfg` at the measured step time."""
    steps = total_steps(cfg, pairs)
    hours = steps * seconds_per_step / 3600
    return {"steps": steps, "wall_hours": hours, "gpu_hours": hours * ranks(cfg)}
