"""Loss family: contrastive (CLIP, CyCLIP), ranking (ListMLE, RankCLIP, high-order Plackett-Luce), kernel (KUEA),
distillation (branch L towards the DINOv3 teacher)."""

from dinorankclip.losses.contrastive import LossTerms, clip_loss, cyclip_loss, cyclip_terms
from dinorankclip.losses.distill import DistillHead, DistillTerms, feature_distill_loss, relational_distill_loss
from dinorankclip.losses.kernel import kuea_loss
from dinorankclip.losses.ranking import HighOrderRankLoss, listmle, rankclip_loss, rankclip_terms, tie_permutation
from dinorankclip.losses.schedules import rank_weight

__all__ = [
    "DistillHead",
    "DistillTerms",
    "HighOrderRankLoss",
    "LossTerms",
    "clip_loss",
    "cyclip_loss",
    "cyclip_terms",
    "feature_distill_loss",
    "kuea_loss",
    "listmle",
    "rank_weight",
    "rankclip_loss",
    "rankclip_terms",
    "relational_distill_loss",
    "tie_permutation",
]
