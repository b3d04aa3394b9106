"""ALIP's adaptive contrastive objective (Yang et al., ICCV 2023), on (image, raw text, synthetic caption) triples.

Two gates weight the per-sample InfoNCE terms of two contrastive branches, image-text and image-caption
(docs/alip-tips-notes.md gives the definitions, their source and what was chosen here):

- the Language Consistency Gate (LCG) weights sample i by how its raw text agrees with its synthetic caption,
  relative to a running mean: W^s_i = min(exp(k·(t_i·c_i − m_tc)), 1);
- the Description Consistency Gate (DCG) weights the two pairs of a sample the LCG found inconsistent by how each
  text agrees with the image, relative to its own running mean: W^t_i = exp(k·(v_i·t_i − m_it)),
  W^c_i = exp(k·(v_i·c_i − m_ic)); 1 for samples the LCG kept.

L = L_it + L_ic, each the mean over samples of W^s_i·W^pair_i·½(CE_i2t(i) + CE_t2i(i)). The weights are detached;
the running means are exponential moving averages of the global-batch mean similarities, updated (in training mode
only) before the weights are computed, and start at 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dinorankclip.losses.contrastive import LossTerms, clip_from_logits, cross_logits, full_precision, prepare
from dinorankclip.losses.distributed import LocalBatch, all_gather_with_grad

# A sample counts as inconsistent (its LCG weight < 1) only below 1 − this: identical raw and synthetic captions
# give t·c = 1 up to rounding, and must leave every gate shut (ALIP's special case, see the notes).
LCG_TOLERANCE = 1e-6


class Gates(NamedTuple):
    """Per-sample weights of this rank's rows: LCG (sample), DCG image-text and image-caption (pair)."""

    sample: torch.Tensor
    text: torch.Tensor
    caption: torch.Tensor


def gate_weights(v: torch.Tensor, t: torch.Tensor, c: torch.Tensor, means: torch.Tensor,
                 sharpness: float) -> Gates:
    """LCG and DCG weights from normalised embeddings [B, D] and the running means (m_tc, m_it, m_ic)."""
    s_tc, s_it, s_ic = (t * c).sum(-1), (v * t).sum(-1), (v * c).sum(-1)
    sample = torch.exp(sharpness * (s_tc - means[0])).clamp(max=1.0)
    inconsistent = sample < 1.0 - LCG_TOLERANCE
    ones = torch.ones_like(sample)
    text = torch.where(inconsistent, torch.exp(sharpness * (s_it - means[1])), ones)
    caption = torch.where(inconsistent, torch.exp(sharpness * (s_ic - means[2])), ones)
    return Gates(torch.where(inconsistent, sample, ones), text, caption)


def batch_similarities(v: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(mean t·c, mean v·t, mean v·c) over the batch: what the running means follow."""
    return torch.stack([(t * c).sum(-1).mean(), (v * t).sum(-1).mean(), (v * c).sum(-1).mean()])


class AlipObjective(nn.Module):
    """The ALIP loss with its three running means as buffers (checkpointed, so a resumed run is identical)."""

    uses_captions = True

    def __init__(self, loss: dict, embed_dim: int, seed: int):
        super().__init__()
        self.momentum, self.sharpness = loss["alip"]["momentum"], loss["alip"]["sharpness"]
        self.register_buffer("means", torch.ones(3, dtype=torch.float64))

    @torch.no_grad()
    def gates(self, raw: LocalBatch, syn: LocalBatch) -> Gates:
        """This rank's gate weights; the running means follow the global batch (updated in training mode)."""
        if self.training:
            current = batch_similarities(raw.all_image, raw.all_text, syn.all_text).to(self.means.dtype)
            self.means.mul_(self.momentum).add_((1 - self.momentum) * current)
        return gate_weights(raw.image, raw.text, syn.text, self.means.to(raw.image.dtype), self.sharpness)

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, step: int, total_steps: int,
                gather: bool = False, caption: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        if caption is None:
            raise ValueError("loss.name alip needs a synthetic caption per sample (the captions stage)")
        with full_precision(image.device):
            raw, scale = prepare(image, text, scale, gather)
            # the caption branch shares the image rows and the gathered images; only the captions are gathered
            captions = caption.to(raw.image.dtype)
            syn = LocalBatch(raw.image, captions, raw.all_image,
                             all_gather_with_grad(captions) if gather else captions, raw.offset)
            g = self.gates(raw, syn)
            it = clip_from_logits(*cross_logits(raw, scale), raw.offset, g.sample * g.text)
            ic = clip_from_logits(*cross_logits(syn, scale), syn.offset, g.sample * g.caption)
        parts = LossTerms(it + ic, {"alip_text": it.detach(), "alip_caption": ic.detach(),
                                    "lcg_mean": g.sample.mean(), "lcg_fired": (g.sample < 1).float().mean()})
        return parts.total, {f"loss/{k}": v for k, v in parts.parts.items()}
