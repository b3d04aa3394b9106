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

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

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
    """The run's training step on a fixed synthetic batch of `batch` pairs, and what its checkpoint and exports hold."""
    from dinorankclip.train.synthetic import synthetic_step

    opt = cfg["pretrain"]
    precision = opt["precision"] if device.type == "cuda" else "fp32"
    step = synthetic_step(cfg, batch, device, precision, opt["threads"], total_steps=1_000_000)
    moments = 2 * sum(p.numel() * 4 for p in step.module.parameters() if p.requires_grad)  # AdamW's fp32 moments
    return BuiltStep(step.run, _bytes(step.student.model.state_dict()), _bytes(step.module.state_dict()) + moments)


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
    `max_steps`, as the pretraining loop counts them (the validation pairs come out of the training pairs unless
    the study has its own validation list)."""
    opt = cfg["pretrain"]
    held_out = 0 if cfg["source"].get("validation_tsv") else opt["val_samples"]
    per_epoch = (pairs - held_out) // opt["batch_size"]
    return min(opt["epochs"] * per_epoch, opt["max_steps"] or math.inf)


def projection(cfg: dict, pairs: int, seconds_per_step: float) -> dict:
    """Wall time and GPU-hours of one (run, seed) of `cfg` at the measured step time."""
    steps = total_steps(cfg, pairs)
    hours = steps * seconds_per_step / 3600
    return {"steps": steps, "wall_hours": hours, "gpu_hours": hours * ranks(cfg)}
