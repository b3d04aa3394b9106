"""Residual gates that inject δ into the global embedding z_g (METHOD.md §3 [v2], fusion variants V5 and V6).

Both compute a per-dimension gate g = σ(W[ẑ_g; δ; ẑ_g⊙δ] + b) on the *normalised* ẑ_g = z_g/‖z_g‖ (the raw z_g
has an arbitrary norm) and the residual r = α·g⊙δ. W ~ N(0, 1/(3D)), b = 0 (g = ½ ± 0.02 at initialisation) and
α = 1; it is the projection P that makes δ, zero-initialised like ControlNet's or Fixup's last layer, so z = z_g
exactly at initialisation while P receives the full gradient α·g·∂L/∂z from the first step. (v1 zeroed α and
closed the gate, b = −4, which left P and W with gradients scaled by α·g ≈ 0: nothing could grow.)

- `SigmoidGate` (V6): z = z_g + r.
- `ConflictAwareGate` (V5): z = z_g + r′ with r′ = r − min(0, ⟨r, ẑ_g⟩)·ẑ_g, i.e. the part of r that points
  against z_g is removed. Then ⟨z − z_g, ẑ_g⟩ = max(0, ⟨r, ẑ_g⟩) ≥ 0 for every input, α and g: the injection may
  rotate z_g or reinforce it but never pulls it backwards, which is our reading of "preserves the cross-modal
  alignment up to first order" — to first order in α, cos(z, z_g) cannot decrease through a conflicting residual.

The gate and the residual add compute in fp32 whatever the autocast, as every variant's residual add does
(`dinorankclip.models.injection`), so the fusion ablation compares designs, not precisions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dinorankclip.losses.contrastive import full_precision


class GateOutput(NamedTuple):
    """z (fp32), the residual r′ added to z_g, the gate g, and the radial component ⟨r, ẑ_g⟩ of the residual before
    any removal (negative where it opposed z_g), for the injection-strength statistics."""

    z: torch.Tensor
    residual: torch.Tensor
    gate: torch.Tensor
    radial: torch.Tensor


def remove_conflict(residual: torch.Tensor, z_g: torch.Tensor) -> torch.Tensor:
    """r − min(0, ⟨r, ẑ_g⟩)·ẑ_g along the last dimension, with ẑ_g = z_g/‖z_g‖."""
    unit = F.normalize(z_g, dim=-1)
    return residual - (residual * unit).sum(dim=-1, keepdim=True).clamp(max=0) * unit


class SigmoidGate(nn.Module):
    """V6: z = z_g + α·σ(W[ẑ_g; δ; ẑ_g⊙δ] + b)⊙δ, with α = `alpha_init` and b = `bias_init` at initialisation."""

    removes_conflict = False

    def __init__(self, dim: int, bias_init: float = 0.0, alpha_init: float = 1.0) -> None:
        super().__init__()
        self.gate = nn.Linear(3 * dim, dim)
        nn.init.normal_(self.gate.weight, std=(3 * dim) ** -0.5)
        nn.init.constant_(self.gate.bias, bias_init)
        self.alpha = nn.Parameter(torch.full((), float(alpha_init)))

    def gated(self, z_g: torch.Tensor, delta: torch.Tensor) -> GateOutput:
        """z and its parts, computed in fp32 under any autocast."""
        with full_precision(z_g.device):
            z_g, delta = z_g.float(), delta.float()
            unit = F.normalize(z_g, dim=-1)
            g = torch.sigmoid(self.gate(torch.cat([unit, delta, unit * delta], dim=-1)))
            r = self.alpha * g * delta
            radial = (r * unit).sum(dim=-1, keepdim=True)
            if self.removes_conflict:
                r = r - radial.clamp(max=0) * unit
            return GateOutput(z_g + r, r, g, radial.squeeze(-1))

    def forward(self, z_g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.gated(z_g, delta).z


class ConflictAwareGate(SigmoidGate):
    """V5: the sigmoid gate's residual with its component opposing z_g removed (see `remove_conflict`)."""

    removes_conflict = True
