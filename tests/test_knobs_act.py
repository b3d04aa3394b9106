"""The two knobs of the study can act (METHOD.md §2 and §3 [v2]): the transition gates of the high-order loss leave
zero under training, and an order-2 model captures what an order-1 model cannot on orders planted by a first-order
Markov chain. (The injection's knob — the gradient reaching P at step 0 — is tested in test_injection.py.)"""

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.losses.ranking import HighOrderRankLoss, _plackett_luce_nll, _TransitionContext
from dinorankclip.train.objective import PlackettLuceObjective

pytestmark = pytest.mark.usefixtures("single_thread")


def test_transition_gates_leave_zero_within_50_adam_steps_at_a_constant_rank_weight():
    """|γ_r| ≥ 0.02 after 50 steps at the demo's learning rate, on a fixed batch of a tiny two-tower model."""
    torch.manual_seed(0)
    loss_cfg = {"order": 3, "window": 8, "heads": 2, "head_dim": 32, "lambda_cross": 1 / 16, "lambda_in": 1 / 16,
                "rank_weight": {"schedule": "constant", "w_max": 2.0, "p_ramp": 2 / 3}}
    objective = PlackettLuceObjective(loss_cfg, 64, seed=0)
    image_in = torch.randn(64, 32)
    text_in = image_in + 0.5 * torch.randn(64, 32)
    image_tower, text_tower = torch.nn.Linear(32, 64), torch.nn.Linear(32, 64)
    logit_scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1/0.07), open_clip's start
    params = [*objective.parameters(), *image_tower.parameters(), *text_tower.parameters(), logit_scale]
    optimizer = torch.optim.Adam(params, lr=3e-3, betas=(0.9, 0.98), eps=1e-6)
    for step in range(50):
        optimizer.zero_grad()
        loss, terms = objective(F.normalize(image_tower(image_in), dim=-1), F.normalize(text_tower(text_in), dim=-1),
                                logit_scale.exp(), step, 1000)
        loss.backward()
        optimizer.step()
    gammas = {k: v.item() for k, v in terms.items() if k.startswith("transition/gamma_")}
    assert set(gammas) == {"transition/gamma_2", "transition/gamma_3"}
    assert all(abs(g) >= 0.02 for g in gammas.values()), gammas
    assert all(terms[f"transition/strength_{r}"] > 0 for r in (2, 3))


def _markov_orders(items: torch.Tensor, first: torch.Tensor, transition: torch.Tensor, rows: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Reference orders drawn from a Plackett–Luce process whose utilities at position k are first + T[π(k−1)]."""
    n = items.shape[0]
    orders = torch.empty(rows, n, dtype=torch.long)
    for i in range(rows):
        placed = torch.zeros(n, dtype=torch.bool)
        utility = first
        for k in range(n):
            logits = utility.masked_fill(placed, -torch.inf)
            choice = torch.multinomial(logits.softmax(0), 1, generator=generator).item()
            orders[i, k], placed[choice] = choice, True
            utility = first + transition[choice]
    return orders


def test_order_two_fits_orders_planted_by_a_first_order_markov_chain_at_least_5_percent_better():
    generator = torch.Generator().manual_seed(1)
    n, dim, scale = 12, 16, 6.0
    items = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    a, b = torch.randn(dim, dim, generator=generator), torch.randn(dim, dim, generator=generator)
    transition = scale * F.normalize(items @ a, dim=-1) @ F.normalize(items @ b, dim=-1).T  # inside the order-2 family
    first = 0.5 * torch.randn(n, generator=generator)
    orders = _markov_orders(items, first, transition, rows=256, generator=generator)

    def fit(order: int) -> float:
        torch.manual_seed(2)
        module = HighOrderRankLoss(order, dim, window=n, heads=1, head_dim=dim)
        scores = torch.nn.Parameter(torch.zeros(n))
        optimizer = torch.optim.Adam([scores, *module.parameters()], lr=0.05)
        for _ in range(300):
            optimizer.zero_grad()
            pred = scores.expand(len(orders), n)
            context = _TransitionContext(module.transitions, items, scale, n, 1, {r: [] for r in range(2, order + 1)})
            nll = _plackett_luce_nll(pred, orders, context if module.transitions else None).mean()
            nll.backward()
            optimizer.step()
        return nll.item()

    first_order, second_order = fit(1), fit(2)
    assert second_order <= 0.95 * first_order, (first_order, second_order)
