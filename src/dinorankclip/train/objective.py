"""The training objective of a run, chosen by `loss.name`: a module so losses with parameters train with the model."""

from __future__ import annotations

import torch
from torch import nn

from dinorankclip.losses import clip_loss


class ClipObjective(nn.Module):
    """Order 0: symmetric InfoNCE."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, progress: float):
        loss = clip_loss(image, text, scale)
        return loss, {"loss/clip": loss.detach()}


OBJECTIVES = {"clip": ClipObjective}


def build_objective(loss_cfg: dict, embed_dim: int) -> nn.Module:
    name = loss_cfg["name"]
    if name not in OBJECTIVES:
        raise ValueError(f"loss.name: unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]()
