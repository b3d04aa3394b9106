"""ALIP's gates and loss: the gates against a direct computation on hand-made embeddings, the loss against the
per-sample weighted InfoNCE written out, and the special case of identical raw and synthetic captions."""

import math

import torch
import torch.nn.functional as F

from dinorankclip.losses.alip import LCG_TOLERANCE, AlipObjective, gate_weights
from dinorankclip.losses.contrastive import clip_loss

ALIP = {"alip": {"momentum": 0.99, "sharpness": 2.0}}


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_gates_equal_the_definition_on_hand_made_embeddings():
    # sample 0: raw text = caption (consistent); 1: caption orthogonal to the text; 2: text and caption at 60 degrees
    v = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    t = unit([1, 0, 0], [0, 1, 0], [0, 1, 1])
    c = unit([1, 0, 0], [1, 0, 0], [0, 0, 1])
    means = torch.tensor([0.8, 0.5, 0.4], dtype=torch.float64)
    g = gate_weights(v, t, c, means, 2.0)
    s_tc = [1.0, 0.0, math.cos(math.pi / 4)]
    s_it = [1.0, 1.0, math.cos(math.pi / 4)]
    s_ic = [1.0, 0.0, 1.0]
    for i in range(3):
        lcg = min(math.exp(2 * (s_tc[i] - 0.8)), 1.0)
        fired = lcg < 1
        assert math.isclose(g.sample[i].item(), lcg, rel_tol=1e-12)
        assert math.isclose(g.text[i].item(), math.exp(2 * (s_it[i] - 0.5)) if fired else 1.0, rel_tol=1e-12)
        assert math.isclose(g.caption[i].item(), math.exp(2 * (s_ic[i] - 0.4)) if fired else 1.0, rel_tol=1e-12)
    assert g.sample[0] == 1 and g.sample[1] < 1 and g.text[1] > 1  # the DCG weight is not clamped


def weighted_infonce(v, t, scale, w):
    logits = scale * v @ t.T
    labels = torch.arange(len(v))
    per = 0.5 * (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels,
                                                                                    reduction="none"))
    return (w * per).mean()


def test_loss_is_the_gated_sum_of_two_weighted_infonce_terms_and_the_means_follow_the_batch():
    torch.manual_seed(0)
    v, t, c = (F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1) for _ in range(3))
    objective = AlipObjective(ALIP, 4, 0).train()
    loss, terms = objective(v, t, torch.tensor(10.0, dtype=torch.float64), 0, 10, caption=c)
    m = 0.99 + 0.01 * torch.stack([(t * c).sum(-1).mean(), (v * t).sum(-1).mean(), (v * c).sum(-1).mean()])
    assert torch.allclose(objective.means, m)
    g = gate_weights(v, t, c, m, 2.0)
    expected = weighted_infonce(v, t, 10.0, g.sample * g.text) + weighted_infonce(v, c, 10.0, g.sample * g.caption)
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert torch.allclose(terms["loss/alip_text"] + terms["loss/alip_caption"], loss)
    before = objective.means.clone()
    objective.eval()(v, t, torch.tensor(10.0, dtype=torch.float64), 1, 10, caption=c)
    assert torch.equal(objective.means, before)  # evaluation does not move the running means


def test_identical_raw_and_synthetic_captions_reduce_to_twice_clip():
    """With t = c every LCG weight is 1 (t·c is 1, the running mean stays 1), so the DCG never fires and
    L = L_it + L_ic = 2 L_CLIP, at every step (ALIP's consistent-caption case)."""
    torch.manual_seed(1)
    objective = AlipObjective(ALIP, 8, 0).train()
    for step in range(5):
        v, t = F.normalize(torch.randn(16, 8), dim=-1), F.normalize(torch.randn(16, 8), dim=-1)
        scale = torch.tensor(14.0)
        loss, terms = objective(v, t, scale, step, 5, caption=t.clone())
        assert terms["loss/lcg_fired"] == 0
        assert torch.allclose(loss, 2 * clip_loss(v, t, scale), rtol=1e-6)
    assert abs(objective.means[0].item() - 1) < LCG_TOLERANCE


def test_gradient_flows_to_both_texts_but_not_through_the_weights():
    torch.manual_seed(2)
    v, t, c = (F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).requires_grad_() for _ in range(3))
    objective = AlipObjective(ALIP, 4, 0).train()
    loss, _ = objective(v, t, torch.tensor(5.0, dtype=torch.float64), 0, 1, caption=c)
    loss.backward()
    objective.means.fill_(1.0)
    g = gate_weights(v.detach(), t.detach(), c.detach(),
                     0.99 + 0.01 * torch.stack([(t * c).sum(-1).mean(), (v * t).sum(-1).mean(),
                                                (v * c).sum(-1).mean()]).detach(), 2.0)
    vv, tt, cc = (x.detach().clone().requires_grad_() for x in (v, t, c))
    (weighted_infonce(vv, tt, 5.0, g.sample * g.text) + weighted_infonce(vv, cc, 5.0, g.sample * g.caption)).backward()
    for a, b in ((v, vv), (t, tt), (c, cc)):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10)
