"""A run's `loss` config builds the objective it names, with the rank weight following its schedule."""

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.config import resolve
from dinorankclip.losses import HighOrderRankLoss, clip_loss, cyclip_loss, rank_weight, rankclip_loss
from dinorankclip.train.objective import build_objective


def features(b=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1),
            torch.tensor(12.0))


@pytest.mark.parametrize("run, order, schedule", [("clip", 0, "cosine_ramp"), ("rankclip", 1, "linear_clamp"),
                                                  ("drc-r1", 1, "cosine_ramp"), ("drc-r3", 3, "cosine_ramp")])
def test_registry_runs_build_their_order_and_schedule(params, run, order, schedule):
    objective = build_objective(resolve(params, "demo", run)["loss"], 16, seed=0)
    assert objective.ranking.order == order and objective.weight["schedule"] == schedule
    assert len(objective.ranking.transitions) == max(order - 1, 0)


def test_order_one_objective_is_rankclip_with_the_scheduled_weight(params):
    loss = resolve(params, "demo", "rankclip")["loss"]
    objective = build_objective(loss, 16, seed=5)
    image, text, scale = features()
    for step in (0, 40, 70, 100):
        w = rank_weight("linear_clamp", step, 100)
        total, parts = objective(image, text, scale, step, 100)
        assert total.item() == pytest.approx(rankclip_loss(image, text, scale, w, tie_seed=5, step=step).item(),
                                             rel=1e-6)
        assert parts["rank_weight"] == w
    assert objective(image, text, scale, 0, 100)[0].item() == pytest.approx(clip_loss(image, text, scale).item())
    assert set(parts) == {"loss/clip", "loss/rank_cross", "loss/rank_in", "rank_weight"}


def test_high_order_objective_trains_its_transition_gates(params):
    loss = resolve(params, "demo", "drc-r3")["loss"]
    objective = build_objective(loss, 16, seed=0)
    image, text, scale = features()
    reference = HighOrderRankLoss(1, 16, lambda_cross=loss["lambda_cross"], lambda_in=loss["lambda_in"])
    w = rank_weight("cosine_ramp", 50, 100)
    total, parts = objective(image, text, scale, 50, 100)
    assert total.item() == pytest.approx(reference(image, text, scale, w, tie_seed=0, step=50).item(), rel=1e-5)
    total.backward()
    assert all(t.gate.grad is not None for t in objective.ranking.transitions)
    assert {"transition/gamma_2", "transition/gamma_3", "transition/strength_2", "transition/strength_3"} <= set(parts)


def test_cyclip_objective_is_cyclip_loss(params):
    objective = build_objective(resolve(params, "demo", "cyclip")["loss"], 16, seed=0)
    image, text, scale = features()
    assert objective(image, text, scale, 3, 10)[0].item() == pytest.approx(cyclip_loss(image, text, scale).item())


def test_unknown_objective_names_the_key():
    with pytest.raises(ValueError, match="loss.name: unknown objective 'nope'"):
        build_objective({"name": "nope"}, 16, seed=0)
