"""Loss family: contrastive (CLIP, CyCLIP), ranking (ListMLE, RankCLIP, high-order Plackett-Luce), kernel (KUEA)."""

from dinorankclip.losses.contrastive import LossTerms, clip_loss, cyclip_loss, cyclip_terms
from dinorankclip.losses.kernel import kuea_loss
from dinorankclip.losses.ranking import HighOrderRankLoss, listmle, rankclip_loss, rankclip_terms, tie_permutation
from dinorankclip.losses.schedules import rank_weight

__all__ = [
    "HighOrderRankLoss",
    "LossTerms",
    "clip_loss",
    "cyclip_loss",
    "cyclip_terms",
    "kuea_loss",
    "listmle",
    "rank_weight",
    "rankclip_loss",
    "rankclip_terms",
    "tie_permutation",
]
