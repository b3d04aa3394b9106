"""The ranking loss at the paper's sizes, without towers: 512-d embeddings, window K = 32, 4 heads of 64, orders 0-4,
batches of 32 and 48. The preflight study trains ViT-B-16 towers at batch 2, where a step ranks 2 candidates and
its window is 2, so the paper's window is checked here, against the loss's definition (METHOD.md §2) evaluated
position by position in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.losses.contrastive import clip_loss
from dinorankclip.losses.ranking import HighOrderRankLoss, rankclip_loss, tie_permutation

DIM, WINDOW, HEADS, HEAD_DIM = 512, 32, 4, 64  # METHOD.md's sizes; ViT-B-16's embedding width
SCALE, WEIGHT, TIE_SEED, STEP = 14.0, 1.5, 3, 7

pytestmark = pytest.mark.usefixtures("single_thread")


def features(batch: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, DIM, generator=generator, dtype=dtype), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(batch, DIM, generator=generator, dtype=dtype), dim=1)
    return image, text


def paper_loss(order: int, window: int = WINDOW) -> HighOrderRankLoss:
    """The loss with every gate open, as after training, so that the transitions move the loss well above float64
    resolution (the weights' norm does not matter: queries and keys are normalised per head)."""
    torch.manual_seed(100 + order)
    module = HighOrderRankLoss(order, DIM, window, HEADS, HEAD_DIM, lambda_cross=0.3, lambda_in=0.2).double()
    with torch.no_grad():
        for t, gate in zip(module.transitions, (0.9, -0.7, 1.1), strict=False):
            t.gate.fill_(gate)
    return module


def definition(module: HighOrderRankLoss, image: torch.Tensor, text: torch.Tensor, perm: torch.Tensor) -> float:
    """L_CLIP + w (λ_c L_cross + λ_i L_in), each ranking term the Plackett-Luce NLL of a row's reference order,
    with u_k(j) = P_j + Σ_r tanh(g_r) φ_r(j | π(k−1) … π(k−r+1)) at positions k < window (BOS before the list),
    φ_r = s·mean over heads of ⟨q̂_h, k̂_h⟩: the query (the product of the predecessors' factors) and the key cut into
    heads, each head scaled to unit norm (METHOD.md §2 [v2])."""
    b = image.shape[0]
    place = {column: slot for slot, column in enumerate(perm.tolist())}

    def nll(pred: torch.Tensor, ref: torch.Tensor, items: torch.Tensor) -> float:
        # W e for every item (and BOS, index b) and every factor: the products below only pick rows of these
        tables = [([torch.cat([items, t.bos[None]]) @ factor for factor in t.query], items @ t.key, torch.tanh(t.gate))
                  for t in module.transitions]
        total = 0.0
        for i in range(b):
            row = ref[i].tolist()
            sequence = sorted(range(b), key=lambda j: (-row[j], place[j]))
            for k in range(b - 1):  # the last position has one candidate: no choice, no loss
                rest = sequence[k:]
                utility = pred[i, rest].clone()
                for factors, keys, gamma in tables if k < module.window else ():
                    query = torch.ones(HEADS * HEAD_DIM, dtype=torch.float64)
                    for lag, projected in enumerate(factors, start=1):
                        query = query * projected[sequence[k - lag] if k - lag >= 0 else b]
                    q = F.normalize(query.view(HEADS, HEAD_DIM), dim=-1)
                    k_heads = F.normalize(keys[rest].view(len(rest), HEADS, HEAD_DIM), dim=-1)
                    utility = utility + gamma * SCALE * (k_heads * q).sum(-1).mean(-1)
                total += (torch.logsumexp(utility, 0) - utility[0]).item()
        return total / b

    with torch.no_grad():
        s, g_image, g_text = SCALE * image @ text.T, SCALE * image @ image.T, SCALE * text @ text.T
        cross = 0.5 * (nll(s, s.T, text) + nll(s.T, s, image)) / b
        inmodal = 0.5 * (nll(g_image, g_text, image) + nll(g_text, g_image, text)) / b
        return clip_loss(image, text, SCALE).item() + WEIGHT * (module.lambda_cross * cross
                                                               + module.lambda_in * inmodal)


def value(module: HighOrderRankLoss, image: torch.Tensor, text: torch.Tensor) -> float:
    with torch.no_grad():
        return module(image, text, SCALE, WEIGHT, tie_seed=TIE_SEED, step=STEP).item()


@pytest.mark.parametrize("batch", [32, 48])
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_the_paper_sized_loss_equals_its_definition(order, batch):
    module, (image, text) = paper_loss(order), features(batch, seed=order)
    got = value(module, image, text)
    if order == 0:
        assert got == clip_loss(image, text, SCALE).item()
        return
    assert got == pytest.approx(definition(module, image, text, tie_permutation(batch, TIE_SEED, STEP)), rel=1e-12)
    rankclip = rankclip_loss(image, text, SCALE, WEIGHT, 0.3, 0.2, tie_seed=TIE_SEED, step=STEP).item()
    assert got == rankclip if order == 1 else abs(got - rankclip) > 1e-6  # the transitions count at this scale


def test_a_window_of_32_covers_every_choice_of_a_batch_of_32_and_is_cut_at_48():
    image, text = features(48, seed=9)
    full, longer, shorter = (value(paper_loss(3, window), image[:32], text[:32]) for window in (32, 64, 30))
    # positions 0..30 are choices (31 is the last, single candidate): 32 and 64 give the same loss, 30 does not
    assert full == longer and abs(full - shorter) > 1e-9
    # at batch 48 the window stops at position 32: the rest of each list is ranked by the plain scores
    assert abs(value(paper_loss(3, 32), image, text) - value(paper_loss(3, 48), image, text)) > 1e-9


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_the_paper_sized_loss_trains_in_float32_at_the_largest_logit_scale(order):
    module = paper_loss(order).float()
    image, text = (x.float().requires_grad_(True) for x in features(64, seed=20 + order))
    loss = module(image, text, torch.tensor(100.0), WEIGHT, tie_seed=TIE_SEED, step=STEP)
    loss.backward()
    grads = [image.grad, text.grad, *(p.grad for p in module.parameters())]
    assert math.isfinite(loss.item()) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert len(grads) == 2 + 4 * max(order - 1, 0)  # query, key, BOS and gate of each order r >= 2
