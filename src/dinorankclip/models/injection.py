"""The dual-branch student's image side (METHOD.md §3): an open_clip image tower with DINOv3-distilled injection.

`InjectedImageEncoder` wraps an open_clip image tower (`VisionTransformer` or `ModifiedResNet`, i.e. `model.visual`)
and is a drop-in replacement for it:

    model.visual = InjectedImageEncoder(model.visual, variant="v5")
    model.encode_image(images, normalize=True)    # unchanged open_clip call; the embedding is z (after injection)
    out = model.visual.features(images)           # InjectedFeatures(z, z_g, maps) for training and analysis

`forward(x)` returns z only, so `CLIP.encode_image`, `CLIP.forward` and evaluation code keep working. `features(x)`
returns, from one pass of the tower:

- ``z_g``: the tower's own projected embedding [B, D], bit-identical to the un-wrapped `tower(x)`, not normalised;
- ``z``: the injected embedding [B, D], not normalised (z = z_g for V1 and the distill-only control, and exactly
  at initialisation for all); the residual is added in fp32 whatever the autocast;
- ``maps``: the branch-L maps, one [B, C, h_s, w_s] per tapped block in tap order (empty for V1); these are the
  student maps for `dinorankclip.losses.distill`;
- ``strength``: detached batch statistics of how far the injection moved z (`injection_strength`; empty when
  nothing is injected).

Under DistributedDataParallel call `features` from inside the forward of the module DDP wraps (DDP only needs its
own forward to run). Weight decay: exclude the names in `no_weight_decay()` (α, every bias and norm of the
injection, the refiner's query token, plus the tower's own exclusions); all of them have ndim < 2 or are listed by
the tower, so open_clip's usual "ndim < 2 or bias/norm/logit_scale" rule gives the same split.

Fusion variants (the ablation of METHOD.md §3, `FUSION_VARIANTS`):
V1 no injection (no branch L); V2 fused map → global average → linear residual z = z_g + δ; V3 = V2 + CBAM;
V4 = V3 + self-attention refiner; V5 = V4 + conflict-aware gate (the full model); V6 = V4 + plain sigmoid gate;
`distill`, the distill-only control: branch L distilled into the tower's taps, nothing injected (z = z_g), which
separates "distillation shapes the tower" from "injection carries the teacher into z". Every variant zero-initialises
the projection P, so δ = 0 at start (METHOD.md §3 [v2]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn

from dinorankclip import diagnostics
from dinorankclip.losses.contrastive import full_precision
from dinorankclip.models.fusion import MultiScaleFusion
from dinorankclip.models.gate import ConflictAwareGate, GateOutput, SigmoidGate
from dinorankclip.models.local_branch import LocalBranch


@dataclass(frozen=True)
class FusionVariant:
    """Which parts of the injection a fusion variant uses: branch L (distilled), the injection of δ into z, and how;
    `gate` is None for an ungated residual z = z_g + δ."""

    inject: bool
    cbam: bool = False
    refiner: bool = False
    gate: type[SigmoidGate] | None = None
    branch: bool = True


FUSION_VARIANTS: dict[str, FusionVariant] = {
    "v1": FusionVariant(inject=False, branch=False),
    "distill": FusionVariant(inject=False),
    "v2": FusionVariant(inject=True),
    "v3": FusionVariant(inject=True, cbam=True),
    "v4": FusionVariant(inject=True, cbam=True, refiner=True),
    "v5": FusionVariant(inject=True, cbam=True, refiner=True, gate=ConflictAwareGate),
    "v6": FusionVariant(inject=True, cbam=True, refiner=True, gate=SigmoidGate),
}


class InjectedFeatures(NamedTuple):
    """One pass of the injected encoder: z (injected), z_g (the tower's own), the branch-L maps, and the injection's
    strength statistics (see module doc)."""

    z: torch.Tensor
    z_g: torch.Tensor
    maps: list[torch.Tensor]
    strength: dict[str, torch.Tensor]


@torch.no_grad()
def injection_strength(z_g: torch.Tensor, residual: torch.Tensor, gate: SigmoidGate | None = None,
                       gated: GateOutput | None = None) -> dict[str, torch.Tensor]:
    """How far the injection moved the embedding (METHOD.md §3 [v2]), batch means as 0-dim tensors (no sync):
    `angle_deg` ∠(z, z_g) in degrees — from atan2 of the tangential and radial parts, exact at small angles where
    acos(cos) loses it to rounding —, `residual_ratio` ‖r′‖/‖z_g‖; with a gate also `gate_mean`, `alpha`,
    `conflict_share` (the share of samples whose residual had a component opposing z_g) and `conflict_removed` (the
    radial magnitude the conflict removal took away, relative to ‖z_g‖; 0 for the plain gate, which removes
    nothing). Empty when the running step computes no diagnostics (`dinorankclip.diagnostics`)."""
    if not diagnostics.computed():
        return {}
    z_g, residual = z_g.float(), residual.float()
    norm = z_g.norm(dim=-1)
    unit = z_g / norm.clamp_min(1e-12).unsqueeze(-1)
    radial = (residual * unit).sum(dim=-1)
    tangential = (residual - radial.unsqueeze(-1) * unit).norm(dim=-1)
    stats = {"angle_deg": torch.rad2deg(torch.atan2(tangential, norm + radial)).mean(),
             "residual_ratio": (residual.norm(dim=-1) / norm).mean()}
    if gate is not None:
        opposed = (gated.radial < 0).float()
        removed = -gated.radial.clamp(max=0) / norm if gate.removes_conflict else torch.zeros_like(norm)
        stats.update(gate_mean=gated.gate.mean(), alpha=gate.alpha.detach().float(), conflict_share=opposed.mean(),
                     conflict_removed=removed.mean())
    return stats


def default_taps(depth: int, count: int = 3) -> list[int]:
    """`count` evenly spaced 0-based block indices ending at the last block: 12 blocks → [3, 7, 11], 4 → [1, 2, 3]."""
    step = max(depth // count, 1)
    return sorted({depth - 1 - step * k for k in range(count) if depth - 1 - step * k >= 0})


def _resnet_stages(tower: ModifiedResNet) -> list[nn.Module]:
    return [tower.layer1, tower.layer2, tower.layer3, tower.layer4]


def tap_widths(tower: nn.Module) -> list[int]:
    """Channel width of every tappable block: a ViT's residual blocks, or a ModifiedResNet's four stages."""
    if isinstance(tower, VisionTransformer):
        return [tower.transformer.width] * len(tower.transformer.resblocks)
    if isinstance(tower, ModifiedResNet):
        return [stage[-1].bn3.num_features for stage in _resnet_stages(tower)]
    raise TypeError(f"injection supports open_clip VisionTransformer and ModifiedResNet towers, not "
                    f"{type(tower).__name__}")


def forward_taps(tower: nn.Module, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the tower's projected embedding, its NCHW maps at `taps`) from one pass, computed as `tower(x)` computes it.

    ModifiedResNet is walked by hand: its `forward_intermediates` in open_clip 3.3.0 truncates the stages whenever
    stop_early is off, so the pooled output would be wrong for taps that end before the last stage.
    """
    if isinstance(tower, ModifiedResNet):
        x = tower.stem(x)
        maps = []
        for index, stage in enumerate(_resnet_stages(tower)):
            x = stage(x)
            if index in taps:
                maps.append(x)
        return tower.attnpool(x), maps
    out = tower.forward_intermediates(x, indices=list(taps), output_fmt="NCHW")
    return out["image_features"], out["image_intermediates"]


def tap_maps(tower: nn.Module, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
    """The NCHW maps at `taps` alone, from a pass that stops after the last of them (no pooled embedding)."""
    if isinstance(tower, ModifiedResNet):
        x = tower.stem(x)
        maps = []
        for index, stage in enumerate(_resnet_stages(tower)[: max(taps) + 1]):
            x = stage(x)
            if index in taps:
                maps.append(x)
        return maps
    return tower.forward_intermediates(x, indices=list(taps), output_fmt="NCHW", stop_early=True,
                                       intermediates_only=True)["image_intermediates"]


class InjectedImageEncoder(nn.Module):
    """An open_clip image tower plus branch L, multi-scale fusion and residual injection (see the module doc).

    Args:
        tower: `model.visual` of an open_clip CLIP (VisionTransformer or ModifiedResNet); its parameters are shared.
        variant: "v1" … "v6" (`FUSION_VARIANTS`).
        taps: sorted 0-based indices of the blocks (ViT) or stages (ResNet: 0 = layer1 … 3 = layer4) whose outputs
            feed branch L; default `default_taps(depth)`. Ignored for V1.
        channels: branch-L and fusion width C (default 256; keep it ≲ the tower width on tiny towers).
        reduction, spatial_kernel: CBAM's MLP reduction and spatial kernel size.
        heads, refiner_depth, max_grid: refiner heads, blocks, and the cap on the fusion grid.
        gate_bias: initial gate bias b of V5/V6.
    """

    def __init__(self, tower: nn.Module, variant: str = "v5", taps: Sequence[int] | None = None,
                 channels: int = 256, *, reduction: int = 16, spatial_kernel: int = 7, heads: int = 8,
                 refiner_depth: int = 2, max_grid: int = 14, gate_bias: float = 0.0) -> None:
        super().__init__()
        if variant not in FUSION_VARIANTS:
            raise ValueError(f"unknown fusion variant {variant!r}; expected one of {sorted(FUSION_VARIANTS)}")
        widths = tap_widths(tower)
        self.tower = tower
        self.variant = variant
        spec = FUSION_VARIANTS[variant]
        self.taps: list[int] = []
        self.branch: LocalBranch | None = None
        self.fusion: MultiScaleFusion | None = None
        self.gate: SigmoidGate | None = None
        if not spec.branch:
            return
        if isinstance(getattr(tower, "patch_dropout", None), PatchDropout):
            raise ValueError("injection needs the full patch grid; build the tower without patch dropout")
        self.taps = list(default_taps(len(widths)) if taps is None else taps)
        if not self.taps or self.taps != sorted(set(self.taps)) or not 0 <= self.taps[0] <= self.taps[-1] < len(widths):
            raise ValueError(f"taps must be sorted, distinct block indices in [0, {len(widths)}), got {self.taps}")
        embed_dim = tower.output_dim
        self.branch = LocalBranch([widths[i] for i in self.taps], channels)
        if not spec.inject:
            return
        self.fusion = MultiScaleFusion(len(self.taps), channels, embed_dim, cbam=spec.cbam, refiner=spec.refiner,
                                       reduction=reduction, spatial_kernel=spatial_kernel, heads=heads,
                                       refiner_depth=refiner_depth, max_grid=max_grid)
        self.gate = spec.gate(embed_dim, gate_bias) if spec.gate is not None else None

    def features(self, x: torch.Tensor) -> InjectedFeatures:
        """z, z_g, the branch-L maps and the injection's strength from one pass of the tower (see the module doc)."""
        if self.branch is None:
            z_g = self.tower(x)
            return InjectedFeatures(z_g, z_g, [], {})
        z_g, taken = forward_taps(self.tower, x, self.taps)
        maps = self.branch(taken)
        if self.fusion is None:
            return InjectedFeatures(z_g, z_g, maps, {})
        delta = self.fusion(maps)
        if self.gate is None:
            with full_precision(z_g.device):
                residual = delta.float()
                z = z_g.float() + residual
            return InjectedFeatures(z, z_g, maps, injection_strength(z_g, residual))
        gated = self.gate.gated(z_g, delta)
        return InjectedFeatures(gated.z, z_g, maps, injection_strength(z_g, gated.residual, self.gate, gated))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The injected embedding z (not normalised), as an open_clip tower returns its embedding; a variant that
        injects nothing (V1, distill-only) is the tower alone at inference. Computes no strength statistics: only
        z leaves (evaluation, KUEA fine-tuning)."""
        if self.fusion is None:
            return self.tower(x)
        with diagnostics.computing(False):
            return self.features(x).z

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    @property
    def preprocess_cfg(self) -> dict:
        """The tower's preprocessing config (what open_clip reads from `model.visual`)."""
        return self.tower.preprocess_cfg

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """open_clip's `lock_image_tower`: freeze the tower; the injection (branch L, fusion, gate) stays trainable."""
        self.tower.lock(unlocked_groups, freeze_bn_stats)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) to exclude from weight decay: the tower's own exclusions and
        every injection parameter with ndim < 2 (α, biases, norm weights, the refiner's query token)."""
        tower_names = getattr(self.tower, "no_weight_decay", set)()
        injection = (f"{name}.{param}" for name in ("branch", "fusion", "gate") if getattr(self, name) is not None
                     for param, value in getattr(self, name).named_parameters() if value.ndim < 2)
        return {f"tower.{name}" for name in tower_names} | set(injection)
