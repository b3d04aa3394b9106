"""One training step of a run: the forward that gives the loss, and the update that applies it.

`TrainStep` holds every trained module of a run — the student (model, distillation head, online teacher) and the
objective (transition heads of the ranking loss) — so one DistributedDataParallel wrapper averages all their
gradients, which the local losses need (`dinorankclip.losses.distributed`). The pretraining loop and
`bench/step.py` both call these two functions, so the benchmark times exactly what training runs.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from dinorankclip.losses import clip_loss
from dinorankclip.models.clip import training_layout
from dinorankclip.train.caption_sampling import sample_captions
from dinorankclip.train.student import Student, distill_loss, distill_weight

MAX_LOGIT_SCALE = math.log(100.0)


class NonFiniteLoss(FloatingPointError):
    """The loss or the gradient went NaN/inf again after a rollback (or with no checkpoint to roll back to)."""


class TrainStep(nn.Module):
    """student + objective of the run resolved in `cfg`; `forward(images, tokens, teacher, step, total_steps,
    captions)` → (loss, detached terms); in eval mode the terms add the CLIP selection criterion, and the loss is
    None where the batch lacks what the objective reads (see `forward`).

    `captions` (the second caption of each image, or None) feed the run's caption sampling (`captions.sampling`)
    and an objective that reads both texts (ALIP).
    """

    def __init__(self, student: Student, objective: nn.Module, cfg: dict, gather: bool):
        super().__init__()
        self.student, self.objective = student, objective
        self.injection, self.loss_cfg, self.gather = cfg["injection"], cfg["loss"], gather
        self.p_synthetic = float(cfg["captions"]["sampling"]["synthetic"])
        self.patch_weight, self.seed = cfg["patch_loss"]["weight"], cfg["seed"]
        self.reads_captions = getattr(objective, "uses_captions", False)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, teacher: torch.Tensor | None, step: int,
                total_steps: int, captions: torch.Tensor | None = None) -> tuple[torch.Tensor | None, dict]:
        if self.p_synthetic and self.training:  # validation reads the raw captions (METHOD.md §6a)
            tokens = sample_captions(tokens, captions, self.p_synthetic, self.seed, step)
        images = training_layout(images, self.student.model.visual)
        out = self.student(images, tokens, teacher, captions if self.reads_captions else None, step)
        # validation pairs of a study's own list carry no second captions or teacher features: the objective then
        # runs on what it can (its transition terms), but its value is not the run's objective and is not returned
        runnable = not (self.reads_captions and out.caption is None)
        complete = runnable and not (self.student.distill is not None and out.distill is None)
        if self.training and not complete:
            raise ValueError("a training batch lacks the second captions this run's objective reads")
        extra = {"caption": out.caption.float()} if self.reads_captions and runnable else {}
        # the objective (and the distillation terms) run in fp32 whatever the autocast of the towers
        with torch.autocast(device_type=images.device.type, enabled=False):
            loss, terms = self.objective(out.image.float(), out.text.float(), out.scale.float(), step, total_steps,
                                         gather=self.gather, **extra) if runnable else (None, {})
            if out.distill is not None:
                kd_weight = distill_weight(self.injection, self.loss_cfg, step, total_steps)
                loss = loss + kd_weight * distill_loss(out.distill, self.injection)
                terms.update({"loss/distill_feature": out.distill.feature.detach(),
                              "loss/distill_relational": out.distill.relational.detach(),
                              "distill_weight": kd_weight})
            if out.patch is not None:
                loss = loss + self.patch_weight * out.patch
                terms["loss/patch"] = out.patch.detach()
            if not self.training:  # the criterion that selects `best/` for every run alike (METHOD.md §6a)
                terms["selection/clip"] = clip_loss(out.image.float(), out.text.float(), out.scale.float().detach(),
                                                    gather=self.gather).detach()
        terms.update({f"injection/{k}": v for k, v in (out.strength or {}).items()})
        terms["logit_scale"] = out.scale.detach()
        return (loss if complete else None), terms

    def after_step(self) -> None:
        """Updates that follow the optimizer step: the patch objective's head-only EMA."""
        if self.student.patch is not None:
            self.student.patch.after_step()


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; fp32 (no context) otherwise — CPU bf16 is slower than fp32 here."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gradient_norm(parameters, clip: float | None) -> torch.Tensor:
    """The gradients' total 2-norm, clipping them to `clip` when given. Without a clip the norm is only read:
    `clip_grad_norm_(inf)` would also multiply every gradient by 1.0, a pass over all of them that changes no bit."""
    if clip:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def update(step_module: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
           model: nn.Module, grad_clip: float | None) -> torch.Tensor:
    """Backward, optional clipping, AdamW step, and the logit-scale clamp of the CLIP recipe; returns the grad norm.

    Nothing here waits for the device: whether the loss and the gradient norm are finite is the caller's to record
    on the device (`dinorankclip.train.ledger.StepLedger`) and read at its next check point. An update made with a
    non-finite gradient has then already been applied, which is why the loop rolls back to a checkpoint.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = gradient_norm(list(step_module.parameters()), grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    step_module.after_step()
    return grad_norm
