"""One training forward of the dual-branch student: embeddings for the objective, distillation terms for branch L.

`Student` holds everything a step differentiates or reads — the open_clip model (its image tower injected or not),
the distillation head, and, when the teacher runs online, the frozen teacher — so a single module is what the
optimizer sees and what DistributedDataParallel will wrap. Runs without a teacher (`injection.variant` none or
v1) return no distillation terms and cost nothing extra.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dinorankclip.losses.distill import DistillHead, DistillTerms
from dinorankclip.losses.schedules import rank_weight
from dinorankclip.models.injection import InjectedImageEncoder


class StepOutput(NamedTuple):
    image: torch.Tensor  # [B, D] normalised (injected) image embeddings
    text: torch.Tensor  # [B, D] normalised text embeddings
    scale: torch.Tensor  # the learned logit scale, exp'ed
    distill: DistillTerms | None
    caption: torch.Tensor | None = None  # [B, D] normalised embeddings of the second captions (ALIP)
    patch: torch.Tensor | None = None  # the patch objective's loss (iBOT / iBOT++)
    strength: dict[str, torch.Tensor] | None = None  # the injection's strength statistics (detached batch means)


def distills(model: nn.Module) -> bool:
    """Whether the model has a branch L to distil (injection variants v2..v6)."""
    return isinstance(model.visual, InjectedImageEncoder) and model.visual.branch is not None


class Student(nn.Module):
    """open_clip model + distillation head (+ online teacher) (+ patch objective);
    `forward(images, tokens, teacher_maps, captions, step)`.

    `teacher_maps` are the cached teacher patch maps [B, S, C_t, g, g] of the batch; None with an online teacher,
    which computes them from the images (`dinorankclip.models.teacher.OnlineTeacher`). `captions` are the token
    ids of the second captions, encoded by the same text tower in the same call (ALIP).
    """

    def __init__(self, model: nn.Module, teacher_channels: int | None = None, tau: float = 0.1,
                 online_teacher: nn.Module | None = None, patch: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.distill = None
        if distills(model):
            if teacher_channels is None:
                raise ValueError("an injected student needs the teacher's channel width for its distillation head")
            self.distill = DistillHead(model.visual.branch.channels, teacher_channels, len(model.visual.taps), tau)
        self.online_teacher = online_teacher
        self.patch = patch

    def encode_texts(self, tokens: torch.Tensor, captions: torch.Tensor | None):
        """(text, second-caption) embeddings, from one pass of the text tower over both when there are two."""
        if captions is None:
            return self.model.encode_text(tokens, normalize=True), None
        both = self.model.encode_text(torch.cat([tokens, captions]), normalize=True)
        return both[: len(tokens)], both[len(tokens):]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, teacher_maps: torch.Tensor | None = None,
                captions: torch.Tensor | None = None, step: int = 0) -> StepOutput:
        text, caption = self.encode_texts(tokens, captions)
        scale = self.model.logit_scale.exp()
        if self.patch is not None:
            image, patch = self.patch(self.model.visual, images, step)
            return StepOutput(image, text, scale, None, caption, patch)
        if self.distill is None:
            return StepOutput(self.model.encode_image(images, normalize=True), text, scale, None, caption)
        features = self.model.visual.features(images)
        if self.online_teacher is not None:
            teacher_maps = self.online_teacher(images)
        if teacher_maps is None and self.training:
            raise ValueError("this run distils from the teacher, but the batch has no teacher features")
        distill = None if teacher_maps is None else self.distill(features.maps, teacher_maps)  # validation may lack it
        return StepOutput(F.normalize(features.z, dim=-1), text, scale, distill, caption, strength=features.strength)


def distill_weight(injection: dict, loss: dict, step: int, total_steps: int) -> float:
    """λ_kd·w(t)/w_max: the run's rank-weight ramp scaled to [0, 1] (evaluated with w_max = 1), times λ_kd."""
    ramp = loss["rank_weight"]
    return injection["distill"]["lambda_kd"] * rank_weight(ramp["schedule"], step, total_steps, 1.0,
                                                           ramp.get("p_ramp", 2 / 3))


def distill_loss(terms: DistillTerms, injection: dict) -> torch.Tensor:
    """feature + relational·(relational weight), before the ramp."""
    return terms.feature + injection["distill"]["relational"] * terms.relational
