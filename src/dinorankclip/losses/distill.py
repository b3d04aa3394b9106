"""Distillation of branch-L student maps towards cached teacher maps (METHOD.md §3, "Distillation").

The teacher (DINOv3, or the demo stand-in) sees local structure that web captions under-describe: which colour sits
where, how many objects there are, how parts relate. The contrastive and ranking losses only ever see the caption, so
that knowledge reaches the student through its branch-L maps, pulled towards the teacher's cached patch maps with
two complementary terms, per scale:

- a *feature* term, the mean over patches of 1 − cos(F, D). It compares channels one by one, so it depends on the
  teacher's channel basis (the cache stores a PCA-rotated, truncated basis), which the student has no reason to
  share; a learned 1×1 projector per scale maps the student width C to the cached teacher width first;
- a *relational* term, KL(softmax(D̂D̂ᵀ/τ) ‖ softmax(F̂F̂ᵀ/τ)) row by row over the patch-by-patch cosine-similarity
  matrices. Gram matrices of unit vectors are unchanged by any orthogonal change of channel basis (a PCA rotation of
  the teacher, say) and permuting the patches of both maps in the same way only permutes rows and columns of both
  matrices, so the term transfers *which patches are alike*, not the teacher's coordinates. Here it is computed on
  the projected student map too, so both terms shape the same representation (a 1×1 projector is per-patch linear,
  so the relational structure it sees is that of the branch-L map up to that linear map).

Student maps are brought to the teacher grid with `dinorankclip.models.local_branch.resize_map`: a finer student map
is area-pooled, the operator the teacher cache pooled its maps with, so both sides summarise the same image regions
(a coarser one is upsampled bilinearly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dinorankclip.models.local_branch import resize_map


class DistillTerms(NamedTuple):
    """The two distillation terms, each a scalar averaged over scales (see the module doc)."""

    feature: torch.Tensor
    relational: torch.Tensor


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, same_channels: bool) -> None:
    if student.ndim != 3 or teacher.ndim != 3:
        raise ValueError(f"expected [B, N, C] student and teacher, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in batch or "
                         f"patch count")
    if same_channels and student.shape[2] != teacher.shape[2]:
        raise ValueError(f"feature distillation needs equal widths; student has {student.shape[2]} channels, "
                         f"teacher {teacher.shape[2]} (project the student first)")


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over batch and patches of 1 − cos(student patch, teacher patch), cosine along channels; [B, N, C] each."""
    _check_pair(student, teacher, same_channels=True)
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    return (1.0 - cos).mean()


def relational_distill_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """KL(P_t ‖ P_s) between row-softmaxed patch-similarity matrices, averaged over rows and batch.

    student [B, N, Cs], teacher [B, N, Ct] (widths may differ); per sample P_t = softmax(D̂D̂ᵀ/τ) and
    P_s = softmax(F̂F̂ᵀ/τ) row-wise, with F̂, D̂ the patches L2-normalised along channels. Computed in float32.
    """
    _check_pair(student, teacher, same_channels=False)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    log_p_s = torch.log_softmax(s @ s.transpose(1, 2) / tau, dim=-1)
    log_p_t = torch.log_softmax(t @ t.transpose(1, 2) / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean()


class DistillHead(nn.Module):
    """Per-scale 1×1 projectors (student width → teacher width) and the two distillation terms.

    `forward(student_maps, teacher_maps)`: student_maps is a list of S maps [B, C, h, w] (branch L, any grid),
    teacher_maps the cached [B, S, Ct, g, g] (fp16 in the cache). Each student map is projected by its scale's 1×1
    conv, resized to (g, g) with `resize_map` and flattened to [B, g·g, Ct]. The feature term and the relational term
    both use this projected map; student and teacher are cast to float32 for the losses.
    Returns `DistillTerms(feature, relational)`, each the mean over scales.
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_scales: int, tau: float = 0.1) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be at least 1, got {num_scales}")
        self.tau = tau
        self.teacher_channels = teacher_channels
        self.projectors = nn.ModuleList(
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1) for _ in range(num_scales)
        )

    def forward(self, student_maps: Sequence[torch.Tensor], teacher_maps: torch.Tensor) -> DistillTerms:
        if teacher_maps.ndim != 5:
            raise ValueError(f"teacher maps must be [B, S, Ct, g, g], got {tuple(teacher_maps.shape)}")
        if len(student_maps) != len(self.projectors) or teacher_maps.shape[1] != len(self.projectors):
            raise ValueError(f"scale count mismatch: head has {len(self.projectors)} projectors, got "
                             f"{len(student_maps)} student maps and {teacher_maps.shape[1]} teacher scales")
        if teacher_maps.shape[2] != self.teacher_channels:
            raise ValueError(f"teacher width mismatch: head projects to {self.teacher_channels} channels, teacher "
                             f"maps have {teacher_maps.shape[2]}")
        grid = tuple(teacher_maps.shape[-2:])
        features, relations = [], []
        for index, (projector, student) in enumerate(zip(self.projectors, student_maps, strict=True)):
            projected = resize_map(projector(student), grid)
            if projected.shape[0] != teacher_maps.shape[0]:
                raise ValueError(f"batch mismatch at scale {index}: student {projected.shape[0]}, teacher "
                                 f"{teacher_maps.shape[0]}")
            s = projected.flatten(2).transpose(1, 2).float()
            t = teacher_maps[:, index].flatten(2).transpose(1, 2).float()
            features.append(feature_distill_loss(s, t))
            relations.append(relational_distill_loss(s, t, self.tau))
        return DistillTerms(torch.stack(features).mean(), torch.stack(relations).mean())
