"""TIPSv2's patch objective as an option of the pretraining run: iBOT or iBOT++ on the image tower, head-only EMA.

The teacher is the student's own image tower on the unmasked image (no gradient through its targets) followed by
an EMA copy of the prototype head: only the head is averaged, the backbone has no second copy (TIPSv2's
"head-only EMA"). The same unmasked pass gives the image embedding the contrastive objective uses, so the option
costs one more tower pass, on the masked image.

Masking is done in pixel space: a masked token's image patch is replaced by a learned patch (one for all
positions). For a ViT whose tokens are its patches this is iBOT's learned mask token pushed through the patch
embedding (for ViT-B/16 the patch embedding is a 768 → 768 linear map, so nothing is lost); for a ResNet the tokens
are a stage's feature map (`patch_loss.tap`) and the patches are the image regions of its cells. Which tokens are
masked is drawn from (seed, step) over the global batch, so runs resume and scale across ranks exactly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from dinorankclip.losses.distributed import get_world_size, is_distributed, rank_rows, step_generator
from dinorankclip.losses.ibot import PATCH_LOSSES, PrototypeHead, ema_update, ibot_loss
from dinorankclip.models.injection import forward_taps, tap_maps, tap_widths

MASK_STREAM = 1


def default_tap(tower: nn.Module) -> int:
    """The last block (ViT) or stage (ResNet): its tokens are the tower's finest complete description."""
    return len(tap_widths(tower)) - 1


@torch.no_grad()
def tap_grid(tower: nn.Module, tap: int, size: int) -> int:
    """The side of the token map at `tap`, from one probe pass in eval mode (batch-norm statistics untouched)."""
    training = tower.training
    tower.eval()
    grid = tap_maps(tower, torch.zeros(1, 3, size, size), [tap])[0].shape[-1]
    tower.train(training)
    return grid


def token_masks(local: int, tokens: int, ratio: tuple[float, float], seed: int, step: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[local, tokens] bool on `device`: per image a ratio drawn from U(ratio) and that share of its tokens at
    random, drawn for the whole global batch from (seed, step) so any world size masks the same tokens."""
    batch, rows = rank_rows(local)
    generator = step_generator(seed, step, MASK_STREAM, device)
    share = torch.empty(batch, device=device).uniform_(*ratio, generator=generator)
    count = (share * tokens).round().long()
    order = torch.rand(batch, tokens, generator=generator, device=device).argsort(dim=1)
    masks = order < count[:, None]
    return masks[rows]


class PatchObjective(nn.Module):
    """Learned mask patch, student prototype head, its EMA copy (the teacher head) and the teacher centre."""

    def __init__(self, tower: nn.Module, cfg: dict, seed: int):
        super().__init__()
        if cfg["name"] not in PATCH_LOSSES:
            raise ValueError(f"patch_loss.name: unknown {cfg['name']!r} (known: none, {', '.join(PATCH_LOSSES)})")
        if not isinstance(tower, VisionTransformer) and not hasattr(tower, "attnpool"):
            raise ValueError(f"patch_loss: needs a plain open_clip ViT or ModifiedResNet image tower, not "
                             f"{type(tower).__name__} (an injected tower: use injection.variant none)")
        self.cfg, self.seed = cfg, seed
        self.tap = default_tap(tower) if cfg["tap"] is None else cfg["tap"]
        size = tower.image_size if isinstance(tower.image_size, int) else tower.image_size[0]
        grid = tap_grid(tower, self.tap, size)
        if size % grid:
            raise ValueError(f"patch_loss.tap: {self.tap} gives a {grid}x{grid} map, which does not tile the "
                             f"{size}px image")
        self.grid, self.cell = grid, size // grid
        self.mask_patch = nn.Parameter(torch.zeros(3, self.cell, self.cell))
        width = tap_widths(tower)[self.tap]
        self.head = PrototypeHead(width, cfg["hidden"], cfg["bottleneck"], cfg["prototypes"])
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(cfg["prototypes"]))

    @staticmethod
    def as_tokens(tap_map: torch.Tensor) -> torch.Tensor:
        return tap_map.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, N, C]

    def masked(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """`images` with the patches of masked tokens replaced by the learned patch."""
        pixels = masks.view(-1, 1, self.grid, self.grid).to(images.dtype)
        pixels = pixels.repeat_interleave(self.cell, 2).repeat_interleave(self.cell, 3)
        fill = self.mask_patch.repeat(1, self.grid, self.grid).to(images.dtype)
        return images * (1 - pixels) + fill * pixels

    def forward(self, tower: nn.Module, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised image embeddings of the unmasked images, the patch loss)."""
        embedding, maps = forward_taps(tower, images, [self.tap])
        visible = self.as_tokens(maps[0])
        masks = token_masks(visible.shape[0], visible.shape[1], tuple(self.cfg["mask_ratio"]), self.seed, step,
                            images.device)
        # the masked view is needed only up to the tap: its pass stops there
        student_tokens = self.as_tokens(tap_maps(tower, self.masked(images, masks), [self.tap])[0])
        with torch.no_grad():
            teacher = self.teacher_head(visible.detach())
        loss = ibot_loss(self.head(student_tokens), teacher, masks, self.center, self.cfg["student_temp"],
                         self.cfg["teacher_temp"], all_tokens=self.cfg["name"] == "ibot_plus")
        if self.training:
            self.update_center(teacher)
        return F.normalize(embedding, dim=-1), loss

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        mean = teacher.float().mean(dim=(0, 1))
        if is_distributed():
            torch.distributed.all_reduce(mean)
            mean /= get_world_size()
        self.center.mul_(self.cfg["center_momentum"]).add_(mean, alpha=1 - self.cfg["center_momentum"])

    def after_step(self) -> None:
        """Head-only EMA: the teacher head follows the student head; nothing else has a second copy."""
        ema_update(self.teacher_head, self.head, self.cfg["head_ema"])
