"""TIPSv2's caption sampling: each image's caption for a step is drawn from its granularities.

Two granularities per image here: the raw alt-text of the shards and the second caption of the captions stage
(synthetic, or the demo world's complete description). `captions.sampling` gives their probabilities; the draw is
made for the global batch from (seed, step), so a resumed run or another world size sees the same captions.
"""

from __future__ import annotations

import torch

from dinorankclip.losses.distributed import rank_rows, step_generator

CAPTION_STREAM = 2


def sample_captions(raw: torch.Tensor, synthetic: torch.Tensor, p_synthetic: float, seed: int,
                    step: int) -> torch.Tensor:
    """Token ids [b, L]: each row the synthetic caption with probability `p_synthetic`, else the raw one."""
    batch, rows = rank_rows(raw.shape[0])
    generator = step_generator(seed, step, CAPTION_STREAM, raw.device)
    draw = torch.rand(batch, generator=generator, device=raw.device)[rows]
    return torch.where((draw < p_synthetic)[:, None], synthetic, raw)
