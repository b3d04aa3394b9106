"""The masked-image patch objective of iBOT and TIPSv2's iBOT++, with the prototype head and its EMA update.

A teacher head sees the patch tokens of the unmasked image, a student head those of the masked image; both map a
token to K prototype scores. The loss is the cross-entropy between the teacher's centred, sharpened distribution
and the student's, per token:

    iBOT:   mean over the masked tokens only          (Zhou et al., ICLR 2022)
    iBOT++: mean over every token, masked and visible (TIPSv2: "unmasked tokens also contribute to the loss")

so with every token masked the two are equal. docs/alip-tips-notes.md says what was reconstructed and chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinorankclip.losses.contrastive import compute_dtype

PATCH_LOSSES = ("ibot", "ibot_plus")


def ibot_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: float, all_tokens: bool) -> torch.Tensor:
    """Cross-entropy H(P_t, P_s) averaged over masked tokens (iBOT) or all tokens (iBOT++, `all_tokens`).

    student, teacher: prototype scores [B, N, K]; mask: [B, N] bool, True where the student's token was masked;
    center: [K], subtracted from the teacher scores before its softmax (no gradient flows to the teacher).
    """
    dtype = compute_dtype(student, teacher)
    targets = F.softmax((teacher.detach().to(dtype) - center) / teacher_temp, dim=-1)
    per_token = -(targets * F.log_softmax(student.to(dtype) / student_temp, dim=-1)).sum(-1)
    if all_tokens:
        return per_token.mean()
    weights = mask.float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


class PrototypeHead(nn.Module):
    """MLP → L2-normalised bottleneck → cosine scores against K L2-normalised prototypes (iBOT's head, with the
    weight-normalised last layer written as normalised prototypes)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * bottleneck ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(tokens), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target ← momentum·target + (1 − momentum)·source, parameter by parameter (the modules share a structure)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
