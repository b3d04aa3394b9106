"""Residual gates that inject δ into the global embedding z_g (METHOD.md §3, fusion variants V5 and V6).

Both compute a per-dimension gate g = σ(W[z_g; δ; z_g⊙δ] + b) and the residual r = α·g⊙δ. The bias b starts at −4
(g ≈ 0.02: the gate opens only when training finds it useful) and the scalar α at 0, so z = z_g exactly at
initialisation while W and δ are random: ∂z/∂α = g⊙δ ≠ 0 and α learns from the first step (a zero W or δ instead
would leave α without gradient).

- `SigmoidGate` (V6): z = z_g + r.
- `ConflictAwareGate` (V5): z = z_g + r′ with r′ = r − min(0, ⟨r, ẑ_g⟩)·ẑ_g, i.e. the part of r that points
  against z_g is removed. Then ⟨z − z_g, ẑ_g⟩ = max(0, ⟨r, ẑ_g⟩) ≥ 0 for every input, α and g: the injection may
  rotate z_g or reinforce it but never pulls it backwards, which is our reading of "preserves the cross-modal
  alignment up to first order" — to first order in α, cos(z, z_g) cannot decrease through a conflicting residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def remove_conflict(residual: torch.Tensor, z_g: torch.Tensor) -> torch.Tensor:
    """r − min(0, ⟨r, ẑ_g⟩)·ẑ_g along the last dimension, with ẑ_g = z_g/‖z_g‖."""
    unit = F.normalize(z_g, dim=-1)
    opposing = (residual * unit).sum(dim=-1, keepdim=True).clamp(max=0)
    return residual - opposing * unit


class SigmoidGate(nn.Module):
    """V6: z = z_g + α·σ(W[z_g; δ; z_g⊙δ] + b)⊙δ, with α = 0 and b = `bias_init` at initialisation."""

    def __init__(self, dim: int, bias_init: float = -4.0) -> None:
        super().__init__()
        self.gate = nn.Linear(3 * dim, dim)
        nn.init.normal_(self.gate.weight, std=(3 * dim) ** -0.5)
        nn.init.constant_(self.gate.bias, bias_init)
        self.alpha = nn.Parameter(torch.zeros(()))

    def residual(self, z_g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """r = α·g⊙δ."""
        g = torch.sigmoid(self.gate(torch.cat([z_g, delta, z_g * delta], dim=-1)))
        return self.alpha * g * delta

    def forward(self, z_g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return z_g + self.residual(z_g, delta)


class ConflictAwareGate(SigmoidGate):
    """V5: the sigmoid gate's residual with its component opposing z_g removed (see `remove_conflict`)."""

    def residual(self, z_g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return remove_conflict(super().residual(z_g, delta), z_g)
