"""Loss family: contrastive (CLIP, CyCLIP), ranking (ListMLE, high-order Plackett-Luce), distillation, kernel (KUEA)."""

from dinorankclip.losses.contrastive import clip_loss

__all__ = ["clip_loss"]
