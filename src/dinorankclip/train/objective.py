"""The training objective of a run, from its `loss` config: a module, so losses with parameters train with the model.

`plackett_luce` is the whole family of METHOD.md §2 — order 0 is CLIP, order 1 RankCLIP, order R >= 2 adds the
transition heads — with the rank weight following its schedule over training progress; `cyclip` is the CyCLIP
baseline; `alip` the ALIP baseline (image, raw text and synthetic caption). All return the total loss and its
detached parts (tensors: converting them syncs the device, so the loop only does it on logging steps).
"""

from __future__ import annotations

import torch
from torch import nn

from dinorankclip.losses import HighOrderRankLoss, cyclip_terms, rank_weight
from dinorankclip.losses.alip import AlipObjective


class PlackettLuceObjective(nn.Module):
    def __init__(self, loss: dict, embed_dim: int, seed: int):
        super().__init__()
        self.ranking = HighOrderRankLoss(loss["order"], embed_dim, loss["window"], loss["heads"], loss["head_dim"],
                                         loss["lambda_cross"], loss["lambda_in"])
        self.weight, self.seed = loss["rank_weight"], seed

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, step: int, total_steps: int,
                gather: bool = False) -> tuple[torch.Tensor, dict]:
        w = rank_weight(self.weight["schedule"], step, total_steps, self.weight["w_max"], self.weight["p_ramp"])
        terms = self.ranking.terms(image, text, scale, rank_weight=w, tie_seed=self.seed, step=step, gather=gather)
        # the loss parts, and the transition heads' gates γ_r and strengths (not losses)
        named = {(f"transition/{k.removeprefix('transition_')}" if k.startswith(("gamma_", "transition_"))
                  else f"loss/{k}"): v for k, v in terms.parts.items()}
        return terms.total, {**named, "rank_weight": w}


class CyclipObjective(nn.Module):
    def __init__(self, loss: dict, embed_dim: int, seed: int):
        super().__init__()
        self.lambdas = loss["cyclip"]

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, step: int, total_steps: int,
                gather: bool = False) -> tuple[torch.Tensor, dict]:
        terms = cyclip_terms(image, text, scale, self.lambdas["lambda_in"], self.lambdas["lambda_cross"],
                             gather=gather)
        return terms.total, {f"loss/{k}": v for k, v in terms.parts.items()}


OBJECTIVES = {"plackett_luce": PlackettLuceObjective, "cyclip": CyclipObjective, "alip": AlipObjective}


def build_objective(loss: dict, embed_dim: int, seed: int) -> nn.Module:
    if loss["name"] not in OBJECTIVES:
        raise ValueError(f"loss.name: unknown objective {loss['name']!r} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[loss["name"]](loss, embed_dim, seed)
