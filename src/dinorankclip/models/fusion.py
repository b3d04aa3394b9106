"""Multi-scale fusion (METHOD.md §3): branch-L maps → one vector δ ∈ R^D that is injected into the embedding.

Pipeline: resize every map to one grid, concatenate, 1×1 conv back to C channels; optionally CBAM (channel then
spatial attention, Woo et al. 2018) to re-weight what the maps say and where; then either a self-attention refiner
that reads the map into a learnable query token, or a plain global average; finally the projection P: R^C → R^D.
The ablation variants (`dinorankclip.models.injection`) switch CBAM and the refiner on and off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dinorankclip.models.local_branch import resize_map


class ChannelAttention(nn.Module):
    """M_c = σ(MLP(avg-pool F) + MLP(max-pool F)); returns M_c ⊙ F. The MLP (C → C/r → C, ReLU) is shared."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)
        peak = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(peak)) * x


class SpatialAttention(nn.Module):
    """M_s = σ(conv_k×k([mean_c F; max_c F])); returns M_s ⊙ F (one weight per position, shared by channels)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats)) * x


class CBAM(nn.Sequential):
    """Channel attention, then spatial attention on its output (the order of the CBAM paper)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__(ChannelAttention(channels, reduction), SpatialAttention(kernel_size))


def sincos_2d(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes [height·width, dim] in row-major order (dim divisible by 4).

    Computed for whatever grid arrives, so the refiner has no size baked into its parameters.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    angle_x = cols.reshape(-1, 1) * omega
    angle_y = rows.reshape(-1, 1) * omega
    return torch.cat([angle_x.sin(), angle_x.cos(), angle_y.sin(), angle_y.cos()], dim=1).to(dtype)


class AttentionRefiner(nn.Module):
    """Read a map [B, C, H, W] into z_loc ∈ R^C through a learnable query token and pre-LN transformer blocks.

    Patch tokens are the map's content, layer-normalised per token, plus fixed 2-D sine-cosine position codes
    (attention alone is blind to layout, and spatial relations are among what the captions under-describe); the
    query token has none. The normalisation matters: the codes have unit amplitude whatever the map's scale, and on
    the demo the branch maps are ~10× smaller, so without it the tokens were position codes with a trace of content
    and z_loc came out the same for every image (its spread across images 1% of its norm after training: the
    injected δ was a constant offset). The query's final state, after a closing LayerNorm (pre-LN blocks leave the
    stream un-normalised), is z_loc. The query is stored as a vector [C] so that a generic "no decay for ndim < 2"
    rule leaves it alone.
    """

    def __init__(self, channels: int, depth: int = 2, heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if channels % 4 or channels % heads:
            raise ValueError(f"refiner width {channels} must be divisible by 4 and by heads={heads}")
        self.query = nn.Parameter(torch.randn(channels) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(channels, heads, dim_feedforward=int(mlp_ratio * channels), dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.content_norm = nn.LayerNorm(channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        content = self.content_norm(x.flatten(2).transpose(1, 2))
        patches = content + sincos_2d(height, width, channels, x.device, content.dtype)
        tokens = torch.cat([self.query.to(x.dtype).expand(batch, 1, channels), patches], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])


class MultiScaleFusion(nn.Module):
    """Branch-L maps (one per scale, C channels each) → δ = P(z_loc) ∈ R^D.

    The common grid is the finest incoming grid capped at `max_grid` (coarser maps are upsampled, finer ones
    area-pooled), so the refiner's token count, and its cost, stay bounded. P is zero-initialised (METHOD.md §3 [v2]:
    the branch's last layer, not its gate, starts at zero), so every variant starts with z = z_g exactly while P
    receives the full gradient from the first step.
    """

    def __init__(self, num_scales: int, channels: int, embed_dim: int, *, cbam: bool, refiner: bool,
                 reduction: int = 16, spatial_kernel: int = 7, heads: int = 8, refiner_depth: int = 2,
                 max_grid: int = 14) -> None:
        super().__init__()
        self.max_grid = max_grid
        self.merge = nn.Conv2d(num_scales * channels, channels, kernel_size=1)
        self.attention = CBAM(channels, reduction, spatial_kernel) if cbam else nn.Identity()
        self.refiner = AttentionRefiner(channels, refiner_depth, heads) if refiner else None
        self.projection = nn.Linear(channels, embed_dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def fused_map(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Resize to the common grid, concatenate, merge with the 1×1 conv, then (if enabled) CBAM: [B, C, g, g']."""
        size = (min(max(m.shape[-2] for m in maps), self.max_grid), min(max(m.shape[-1] for m in maps), self.max_grid))
        return self.attention(self.merge(torch.cat([resize_map(m, size) for m in maps], dim=1)))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = self.fused_map(maps)
        z_loc = self.refiner(fused) if self.refiner is not None else fused.mean(dim=(2, 3))
        return self.projection(z_loc)
