"""Branch L of the dual-branch student (METHOD.md §3): light adapters on the image tower's intermediate maps.

Each tapped block of the tower (a ViT block's patch tokens as a map, or a ResNet stage) gets its own adapter
1×1 conv → norm → GELU → 3×3 depthwise conv that brings it to a common width C. The 1×1 conv does the channel
mixing, the depthwise conv adds local spatial context for a few parameters (9·C), so the branch stays small next
to the tower. These maps are what the distillation pulls towards the teacher and what the fusion injects.

The norm is a per-position LayerNorm over channels rather than BatchNorm: it does not depend on the batch (the
same at train and eval time, no cross-rank statistics, defined for a batch of one at a 1×1 grid), and it tames
the growing scale of a ViT's residual stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a [B, C, H, W] map to `size`.

    Shrinking averages over areas (as the teacher cache pools its maps, so student and teacher see the same
    operator); growing is bilinear; an equal size returns the input itself.
    """
    height, width = x.shape[-2:]
    if (height, width) == tuple(size):
        return x
    if height >= size[0] and width >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class LocalAdapter(nn.Sequential):
    """One tapped map [B, in_channels, H, W] → [B, channels, H, W]: 1×1 conv → LayerNorm → GELU → 3×3 depthwise."""

    def __init__(self, in_channels: int, channels: int = 256) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, kernel_size=1),
            LayerNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels),
        )


class LocalBranch(nn.Module):
    """One `LocalAdapter` per tapped scale; maps keep their own grids (the fusion and the distillation resize)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        self.channels = channels
        self.adapters = nn.ModuleList(LocalAdapter(width, channels) for width in in_channels)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.adapters):
            raise ValueError(f"expected {len(self.adapters)} tapped maps, got {len(maps)}")
        return [adapter(m) for adapter, m in zip(self.adapters, maps, strict=True)]
