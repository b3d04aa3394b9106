"""Contrastive objectives on L2-normalised embeddings (METHOD.md §2): CLIP (order 0) and the CyCLIP baseline.

Also holds the plumbing every batch-spanning loss of the family shares: precision handling, the local/global batch
view (`dinorankclip.losses.distributed`), the cross-modal logit rows and the `LossTerms` logging record.
All public losses take ``gather``: False (default) treats the inputs as the whole batch; True makes them this
rank's features, gathers the candidates with gradient and returns this rank's local loss (see `distributed`).
"""

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dinorankclip.losses.distributed import LocalBatch, local_batch

Scale = torch.Tensor | float


class LossTerms(NamedTuple):
    """A loss with its components: ``total`` keeps the graph (call backward on it); ``parts`` are detached.

    ``parts`` maps component names (e.g. "clip", "rank_cross", "rank_in") to detached 0-dim tensors, so logging
    them costs no device sync until `floats` is called.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]

    def floats(self) -> dict[str, float]:
        """The total and every component as Python floats, for a metrics logger."""
        return {"total": self.total.detach().item(), **{name: value.item() for name, value in self.parts.items()}}


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: reductions never run in bf16/fp16, gradcheck can use float64."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off, so the matmuls feeding the log-space reductions are not silently run in bf16."""
    return torch.autocast(device_type=device.type, enabled=False)


def prepare(image: torch.Tensor, text: torch.Tensor, scale: Scale, gather: bool) -> tuple[LocalBatch, Scale]:
    """Gather (if asked) in the input precision, then cast features and scale to the compute dtype."""
    dtype = compute_dtype(image, text)
    batch = local_batch(image, text, gather)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(dtype)
    cast = LocalBatch(*(t.to(dtype) for t in (batch.image, batch.text, batch.all_image, batch.all_text)), batch.offset)
    return cast, scale


def cross_logits(batch: LocalBatch, scale: Scale) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of S = s·I Tᵀ (its images vs all texts) and of Sᵀ (its texts vs all images), [b, B] each."""
    return scale * (batch.image @ batch.all_text.T), scale * (batch.text @ batch.all_image.T)


def clip_from_logits(s_rows: torch.Tensor, st_rows: torch.Tensor, offset: int,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """½[CE(S, diag) + CE(Sᵀ, diag)] over this rank's rows; the positive of local row i is global column offset+i.
    With `weight` ([b], this rank's rows), the mean over rows of weight_i·½[CE(S_i) + CE(Sᵀ_i)] (ALIP's gates)."""
    labels = torch.arange(s_rows.shape[0], device=s_rows.device) + offset
    if weight is None:
        return 0.5 * (F.cross_entropy(s_rows, labels) + F.cross_entropy(st_rows, labels))
    per_row = 0.5 * (F.cross_entropy(s_rows, labels, reduction="none")
                     + F.cross_entropy(st_rows, labels, reduction="none"))
    return (weight * per_row).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: Scale, *, gather: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; `scale` is exp(logit_scale), as open_clip's ClipLoss takes it.

    Reduced in fp32 (fp64 for fp64 input) with autocast off, so bf16 features cannot skew the logsumexp.
    ``gather=True``: inputs are this rank's [b, d] features and the result is its local loss (module
    `dinorankclip.losses.distributed` states the normalisation); equal to open_clip's local_loss=True,
    gather_with_grad=True ClipLoss.
    """
    with full_precision(image.device):
        batch, scale = prepare(image, text, scale, gather)
        return clip_from_logits(*cross_logits(batch, scale), batch.offset)


def cyclip_terms(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: Scale,
    lambda_in: float = 0.25,
    lambda_cross: float = 0.25,
    *,
    gather: bool = False,
) -> LossTerms:
    """CyCLIP = L_CLIP + λ_in·mean((G_I − G_T)²)·B/s² + λ_cross·mean((S − Sᵀ)²)·B/s², with its parts.

    mean(X²)·B/s² over the B×B entries is the per-row sum of (X/s)² averaged over rows, so the cyclic terms are
    computed on the unscaled similarities: exactly the definition, independent of s (no gradient to the scale),
    and as a per-row mean it is a local loss like the others under ``gather=True``.
    parts: "clip", "cyclic_in", "cyclic_cross" (unweighted).
    """
    with full_precision(image.device):
        batch, scale = prepare(image, text, scale, gather)
        clip = clip_from_logits(*cross_logits(batch, scale), batch.offset)
        in_gap = batch.image @ batch.all_image.T - batch.text @ batch.all_text.T
        cross_gap = batch.image @ batch.all_text.T - batch.text @ batch.all_image.T
        cyclic_in = in_gap.square().sum(dim=1).mean()
        cyclic_cross = cross_gap.square().sum(dim=1).mean()
        total = clip + lambda_in * cyclic_in + lambda_cross * cyclic_cross
        parts = {"clip": clip, "cyclic_in": cyclic_in, "cyclic_cross": cyclic_cross}
        return LossTerms(total, {name: value.detach() for name, value in parts.items()})


def cyclip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: Scale,
    lambda_in: float = 0.25,
    lambda_cross: float = 0.25,
    *,
    gather: bool = False,
) -> torch.Tensor:
    """Scalar CyCLIP loss (CLIP + cyclic terms); see `cyclip_terms` for the definition and the parts."""
    return cyclip_terms(image, text, scale, lambda_in, lambda_cross, gather=gather).total
