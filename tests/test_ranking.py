"""ListMLE, RankCLIP and the high-order Plackett–Luce family (METHOD.md §2) against brute force and the nesting."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.func import functional_call

from dinorankclip.losses.contrastive import clip_loss
from dinorankclip.losses.ranking import (
    HighOrderRankLoss,
    _TransitionContext,
    listmle,
    rankclip_loss,
    rankclip_terms,
    tie_permutation,
)
from dinorankclip.losses.schedules import constant, cosine_ramp, get_schedule, linear_clamp, rank_weight

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def _features(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=1)
    return image, text


def _tie_key(perm: torch.Tensor | None, n: int) -> list[int]:
    """Where each column sits in the tie-break permutation (its index when there is none)."""
    if perm is None:
        return list(range(n))
    place = [0] * n
    for slot, column in enumerate(perm.tolist()):
        place[column] = slot
    return place


def _reference_sequence(ref_row: list[float], place: list[int]) -> list[int]:
    """Columns by descending reference value, tied columns in the order of the tie-break permutation."""
    return sorted(range(len(ref_row)), key=lambda j: (-ref_row[j], place[j]))


def _brute_listmle(pred: torch.Tensor, ref: torch.Tensor, perm: torch.Tensor | None, eps: float = 0.0) -> float:
    """−log of the product of sequential softmax choice probabilities, float64, averaged over rows.

    ``eps`` > 0 evaluates RankCLIP's released variant term by term: log(Σ_{m≥k} exp(p_m − max) + eps) − (p_k − max).
    """
    total = 0.0
    place = _tie_key(perm, pred.shape[1])
    for p_row, r_row in zip(pred.double().tolist(), ref.double().tolist(), strict=True):
        sequence = _reference_sequence(r_row, place)
        if eps:
            top = max(p_row)
            total += sum(
                math.log(sum(math.exp(p_row[m] - top) for m in sequence[k:]) + eps) - (p_row[j] - top)
                for k, j in enumerate(sequence)
            )
            continue
        remaining, probability = set(range(len(p_row))), 1.0
        for j in sequence:
            probability *= math.exp(p_row[j]) / sum(math.exp(p_row[m]) for m in remaining)
            remaining.remove(j)
        total -= math.log(probability)
    return total / pred.shape[0]


@pytest.mark.parametrize("case", range(8))
def test_listmle_equals_brute_force_plackett_luce(case):
    generator = torch.Generator().manual_seed(100 + case)
    rows, n = 1 + case % 4, (2, 6, 3, 5, 4, 6, 1, 5)[case]
    pred = 3 * torch.randn(rows, n, generator=generator)
    ref = torch.randn(rows, n, generator=generator)
    if case % 2:  # ties: a few distinct values repeated along each row
        ref = torch.randint(0, 3, (rows, n), generator=generator).float()
    for tie_seed, step in [(0, 0), (7, 3), (7, 4)]:
        expected = _brute_listmle(pred, ref, tie_permutation(n, tie_seed, step))
        got = listmle(pred, ref, tie_seed=tie_seed, step=step)
        assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    expected = _brute_listmle(pred, ref, None)
    assert listmle(pred, ref, tie_seed=None).item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_listmle_tie_break_changes_the_value_when_tied_items_differ():
    pred = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    ref = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = {round(listmle(pred, ref, tie_seed=0, step=step).item(), 6) for step in range(12)}
    assert len(values) > 1
    assert all(
        v == pytest.approx(_brute_listmle(pred, ref, tie_permutation(4, 0, s)), abs=1e-5)
        for s, v in zip(range(12), [listmle(pred, ref, tie_seed=0, step=s).item() for s in range(12)], strict=True)
    )


@pytest.mark.parametrize("factor", [1e-3, 0.5, 7.0, 1e4])
def test_listmle_ignores_the_reference_scale(factor):
    generator = torch.Generator().manual_seed(5)
    pred, ref = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    ref[:, 3] = ref[:, 1]  # exact ties survive any positive scaling
    assert torch.equal(listmle(pred, factor * ref, tie_seed=2, step=1), listmle(pred, ref, tie_seed=2, step=1))


def test_listmle_sends_no_gradient_to_the_reference():
    generator = torch.Generator().manual_seed(6)
    pred = torch.randn(3, 5, generator=generator, requires_grad=True)
    ref = torch.randn(3, 5, generator=generator, requires_grad=True)
    listmle(pred, ref).backward()
    assert ref.grad is None or not ref.grad.any()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_listmle_released_eps_matches_its_definition_and_only_deviates_at_high_scale():
    image, text = _features(8, 16, seed=7)
    perm = tie_permutation(8, 0, 0)
    for scale in (5.0, 77.0):
        pred, ref = scale * image @ text.T, scale * text @ image.T
        released = listmle(pred, ref, released_eps=True)
        assert released.item() == pytest.approx(_brute_listmle(pred, ref, perm, eps=1e-10), rel=1e-5)
        exact = listmle(pred, ref)
        if scale == 5.0:
            assert released.item() == pytest.approx(exact.item(), rel=1e-6)
    assert released.item() > exact.item() + 1.0  # at scale 77 the eps caps many terms


def test_gradcheck_listmle():
    generator = torch.Generator().manual_seed(8)
    pred = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: listmle(p, ref), (pred,))


def test_rankclip_equals_its_definition_through_listmle():
    image, text = _features(9, 6, seed=9)
    scale, weight, lam_c, lam_i = 20.0, 1.5, 0.2, 0.3
    s_mat, g_image, g_text = scale * image @ text.T, scale * image @ image.T, scale * text @ text.T
    b = image.shape[0]
    l_cross = 0.5 * (listmle(s_mat, s_mat.T, step=4) + listmle(s_mat.T, s_mat, step=4)) / b
    l_in = 0.5 * (listmle(g_image, g_text, step=4) + listmle(g_text, g_image, step=4)) / b
    expected = clip_loss(image, text, scale) + weight * (lam_c * l_cross + lam_i * l_in)
    result = rankclip_terms(image, text, scale, weight, lam_c, lam_i, step=4)
    torch.testing.assert_close(result.total, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rankclip_loss(image, text, scale, weight, lam_c, lam_i, step=4), result.total)
    torch.testing.assert_close(result.parts["rank_cross"], l_cross.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.parts["rank_in"], l_in.detach(), rtol=1e-6, atol=1e-6)
    assert set(result.floats()) == {"total", "clip", "rank_cross", "rank_in"}


def _brute_high_order(module, heads, head_dim, image, text, scale, weight, perm) -> float:
    """The order-R loss of METHOD.md §2 evaluated position by position and head by head in float64."""
    image, text = image.double(), text.double()
    b = image.shape[0]
    place = _tie_key(perm, b)
    s_mat, g_image, g_text = scale * image @ text.T, scale * image @ image.T, scale * text @ text.T

    def phi(t, items, predecessors, j):
        """s·mean_h⟨q̂_h, k̂_h⟩: the query is the product of the factors' projections, normalised per head after
        the product, as the key (QK-norm, METHOD.md §2 [v2])."""
        embeds = [items[a] if a is not None else t.bos.double() for a in predecessors]
        key = items[j] @ t.key.double()
        value = 0.0
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            query = torch.ones(head_dim, dtype=torch.float64)
            for factor, e in zip(t.query.double(), embeds, strict=True):
                query = query * (e @ factor)[cols]
            value += (query / query.norm() @ key[cols] / key[cols].norm()).item()
        return scale * value / heads

    def term(pred, ref, items):
        total = 0.0
        for i in range(b):
            sequence = _reference_sequence(ref[i].tolist(), place)
            for k, chosen in enumerate(sequence):
                utilities = {}
                for j in sequence[k:]:
                    u = pred[i, j].item()
                    if k < module.window:
                        for t in module.transitions:
                            lags = range(1, t.order)
                            predecessors = [sequence[k - m] if k - m >= 0 else None for m in lags]
                            u += math.tanh(t.gate.item()) * phi(t, items, predecessors, j)
                    utilities[j] = u
                total += math.log(sum(math.exp(u) for u in utilities.values())) - utilities[chosen]
        return total / b

    l_clip = clip_loss(image, text, scale).item()
    l_cross = 0.5 * (term(s_mat, s_mat.T, text) + term(s_mat.T, s_mat, image)) / b
    l_in = 0.5 * (term(g_image, g_text, image) + term(g_text, g_image, text)) / b
    return l_clip + weight * (module.lambda_cross * l_cross + module.lambda_in * l_in)


def _open_gates(module: HighOrderRankLoss, values=(0.6, -0.5, 0.8)) -> None:
    with torch.no_grad():
        for t, value in zip(module.transitions, values, strict=False):
            t.gate.fill_(value)


@pytest.mark.parametrize(("order", "window"), [(2, 3), (3, 3), (4, 3), (3, 8)])
def test_high_order_equals_brute_force(order, window):
    torch.manual_seed(order)
    heads, head_dim = 2, 3
    module = HighOrderRankLoss(
        order, dim=4, window=window, heads=heads, head_dim=head_dim, lambda_cross=0.3, lambda_in=0.2
    )
    _open_gates(module, (1.2, -0.9, 1.1))
    image, text = _features(5, 4, seed=10 + order, dtype=torch.float64)
    with torch.no_grad():
        got = module(image, text, 6.0, 1.5, tie_seed=1, step=2).item()
        expected = _brute_high_order(module, heads, head_dim, image, text, 6.0, 1.5, tie_permutation(5, 1, 2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert got != pytest.approx(rankclip_loss(image, text, 6.0, 1.5, 0.3, 0.2, tie_seed=1, step=2).item(), rel=1e-4)


def test_order_zero_is_clip():
    image, text = _features(10, 8, seed=11)
    module = HighOrderRankLoss(0, dim=8)
    assert list(module.parameters()) == []
    loss = module(image, text, 30.0, rank_weight=2.0)
    assert torch.equal(loss, clip_loss(image, text, 30.0))
    torch.testing.assert_close(loss, ClipLoss()(image, text, torch.tensor(30.0)), rtol=1e-6, atol=1e-6)
    assert set(module.terms(image, text, 30.0).floats()) == {"total", "clip"}


def test_order_one_is_rankclip_bit_for_bit():
    image, text = _features(16, 8, seed=12)
    scale = torch.tensor(25.0, requires_grad=True)
    leaves = [image.clone().requires_grad_(True), text.clone().requires_grad_(True)]
    expected = rankclip_loss(*leaves, scale, 1.7, tie_seed=5, step=9)
    expected.backward()
    expected_grads = [leaves[0].grad, leaves[1].grad, scale.grad]
    leaves = [image.clone().requires_grad_(True), text.clone().requires_grad_(True)]
    scale.grad = None
    got = HighOrderRankLoss(1, dim=8)(*leaves, scale, 1.7, tie_seed=5, step=9)
    got.backward()
    assert torch.equal(got, expected)
    for a, b in zip([leaves[0].grad, leaves[1].grad, scale.grad], expected_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_higher_orders_start_at_order_one_and_leave_it_after_a_step(order):
    torch.manual_seed(20 + order)
    module = HighOrderRankLoss(order, dim=8, window=6, heads=2, head_dim=4)
    image, text = _features(24, 8, seed=13)
    torch.testing.assert_close(module(image, text, 20.0, step=3), rankclip_loss(image, text, 20.0, step=3))
    # float64 from here on: at this init scale the transitions move the loss by ~1e-5, below float32 resolution
    module.double()
    image, text = image.double(), text.double()
    reference = rankclip_loss(image, text, 20.0, step=3)
    loss = module(image, text, 20.0, step=3)
    torch.testing.assert_close(loss, reference, rtol=1e-13, atol=1e-13)
    loss.backward()
    assert all(t.gate.grad.abs() > 0 for t in module.transitions)
    torch.optim.Adam(module.parameters(), lr=0.1).step()
    assert abs(module(image, text, 20.0, step=3).item() - reference.item()) > 1e-8


@pytest.mark.parametrize("lower", [1, 2, 3])
def test_zero_gates_above_r_recover_order_r(lower):
    torch.manual_seed(30)
    image, text = _features(12, 8, seed=14, dtype=torch.float64)
    big = HighOrderRankLoss(4, dim=8, window=5, heads=2, head_dim=4).double()
    _open_gates(big)
    small = HighOrderRankLoss(lower, dim=8, window=5, heads=2, head_dim=4).double()
    for source, target in zip(big.transitions, small.transitions, strict=False):
        target.load_state_dict(source.state_dict())
    before = big(image, text, 15.0, step=1)
    with torch.no_grad():
        for t in big.transitions[lower - 1 :]:
            t.gate.zero_()
    expected = small(image, text, 15.0, step=1)
    torch.testing.assert_close(big(image, text, 15.0, step=1), expected, rtol=1e-13, atol=1e-13)
    assert abs(before.item() - expected.item()) > 1e-8  # the zeroed orders did contribute
    if lower >= 2:
        assert abs(expected.item() - rankclip_loss(image, text, 15.0, step=1).item()) > 1e-8


def test_gradcheck_high_order_with_open_gates():
    """Every input but the logit scale, which the transitions read detached (METHOD.md §2 [v2]): its gradient is
    the first-order terms' alone, which a finite difference through φ would not give."""
    torch.manual_seed(40)
    module = HighOrderRankLoss(3, dim=4, window=3, heads=2, head_dim=2).double()
    _open_gates(module)
    names = [name for name, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    image, text = _features(5, 4, seed=15, dtype=torch.float64)
    scale = torch.tensor(4.0, dtype=torch.float64)

    def loss(image, text, *flat):
        return functional_call(module, dict(zip(names, flat, strict=True)), (image, text, scale, 1.3))

    assert torch.autograd.gradcheck(loss, (image.requires_grad_(True), text.requires_grad_(True), *params))


def test_the_scale_reaches_the_transitions_detached():
    """The transitions read s without gradient (else they would push s towards its clamp)."""
    torch.manual_seed(41)
    module = HighOrderRankLoss(3, dim=4, window=3, heads=2, head_dim=2)
    _open_gates(module)
    items = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_(True)
    scale = torch.tensor(5.0, requires_grad=True)
    context = _TransitionContext(module.transitions, items, scale, 3, 2, {2: [], 3: []})
    context(torch.stack([torch.randperm(6) for _ in range(4)]), torch.zeros(4, 6)).sum().backward()
    assert scale.grad is None and items.grad.abs().sum() > 0


@pytest.mark.parametrize("gamma", [1.0, -1.0])
def test_transition_utilities_are_bounded_by_the_scale(gamma):
    """|γ_r·φ_r| ≤ s for any weights: QK-norm makes φ_r a scaled mean of cosines."""
    torch.manual_seed(42)
    module = HighOrderRankLoss(3, dim=16, window=8, heads=4, head_dim=8)
    with torch.no_grad():
        for t in module.transitions:
            t.gate.fill_(math.atanh(gamma * (1 - 1e-7)))
            t.query.mul_(1e3)  # the norm of W no longer matters
    items = torch.nn.functional.normalize(torch.randn(32, 16), dim=-1)
    strength = {2: [], 3: []}
    context = _TransitionContext(module.transitions, items, 100.0, 8, 4, strength)
    order = torch.stack([torch.randperm(32) for _ in range(5)])
    utility = context(order, torch.zeros(5, 32))
    assert utility.abs().max() <= 2 * 100.0 * (1 + 1e-5)  # two orders, each |γ φ| ≤ s
    for r in (2, 3):
        single = _TransitionContext(module.transitions[r - 2: r - 1], items, 100.0, 8, 4, {r: []})
        phi = single(order, torch.zeros(5, 32))
        assert phi.abs().max() <= 100.0 * (1 + 1e-5) and phi.abs().max() > 10.0


def test_transition_strength_is_the_spread_of_gamma_phi_against_the_scores():
    torch.manual_seed(43)
    module = HighOrderRankLoss(2, dim=8, window=4, heads=2, head_dim=4)
    image, text = _features(10, 8, seed=18)
    assert module.terms(image, text, 20.0).parts["transition_strength_2"] == 0  # γ = 0
    _open_gates(module, (0.7,))
    items = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    pred = torch.randn(3, 10) * 4
    order = torch.stack([torch.randperm(10) for _ in range(3)])
    strength = {2: []}
    utility = _TransitionContext(module.transitions, items, 20.0, 4, 2, strength)(order, pred)
    phi = utility - pred.unsqueeze(1)
    expected = (phi.std(dim=2) / pred.std(dim=1, keepdim=True)).mean()
    torch.testing.assert_close(strength[2][0], expected)
    assert 0 < expected


@pytest.fixture
def _flush_denormals():
    """At scale 100, exp(u − max) lands in float32 denormals, which CPUs compute ~20× slower; flushing them to zero
    changes no sum here (every logsumexp includes a term equal to 1) and keeps this test fast."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.usefixtures("_flush_denormals")
@pytest.mark.parametrize(("order", "batch"), [(0, 4096), (1, 4096), (3, 1024)])
def test_finite_at_scale_100_in_float32(order, batch):
    torch.manual_seed(50)
    image, text = _features(batch, 16, seed=16)
    image[1::7] = image[0]  # near-duplicates and exact ties stress both the sort and the suffix sums
    text[3::11] = text[2]
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(100.0, requires_grad=True)
    module = HighOrderRankLoss(order, dim=16, heads=2, head_dim=16)
    _open_gates(module)
    loss = module(image, text, scale, 2.0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [image.grad, text.grad, scale.grad, *(p.grad for p in module.parameters())]
    assert all(torch.isfinite(g).all() for g in grads)


def test_duplicate_captions_are_deterministic_per_step():
    image, text = _features(12, 8, seed=17)
    text[5] = text[2]
    text[9] = text[2]
    assert torch.equal((image @ text.T)[:, 2], (image @ text.T)[:, 5])  # the references really tie
    assert torch.equal(tie_permutation(12, 3, 7), tie_permutation(12, 3, 7))
    assert not torch.equal(tie_permutation(12, 3, 7), tie_permutation(12, 3, 8))
    torch.manual_seed(60)
    module = HighOrderRankLoss(3, dim=8, window=4, heads=2, head_dim=4)
    _open_gates(module)
    for loss in (rankclip_loss, module):
        first = loss(image, text, 20.0, tie_seed=3, step=7)
        torch.manual_seed(123)  # the global RNG must not matter
        assert torch.equal(loss(image, text, 20.0, tie_seed=3, step=7), first)
        values = {loss(image, text, 20.0, tie_seed=3, step=s).item() for s in range(6)}
        assert len(values) > 1  # tied captions whose images differ: the tie order changes the likelihood


def test_invalid_module_arguments_are_rejected():
    with pytest.raises(ValueError, match="order"):
        HighOrderRankLoss(-1, dim=8)
    with pytest.raises(ValueError, match="window"):
        HighOrderRankLoss(2, dim=8, window=0)


@pytest.mark.parametrize(
    ("p", "linear", "cosine"),
    [(0.0, 0.0, 0.0), (1 / 3, 1.0, 1.0), (2 / 3, 2.0, 2.0), (1.0, 2.0, 2.0), (1 / 6, 0.5, None)],
)
def test_schedules_exact_values(p, linear, cosine):
    assert linear_clamp(p) == pytest.approx(linear, abs=1e-12)
    assert min(max(3 * p, 0), 2) == pytest.approx(linear_clamp(p), abs=1e-12)
    if cosine is not None:
        assert cosine_ramp(p) == pytest.approx(cosine, abs=1e-12)
    assert cosine_ramp(1 / 6) == pytest.approx(2 * 0.5 * (1 - math.cos(math.pi / 4)), abs=1e-12)
    assert constant(p) == 2.0
    assert get_schedule("cosine_ramp") is cosine_ramp


def test_schedules_clamp_progress_and_reject_unknown_names():
    assert linear_clamp(-0.5) == 0.0 and cosine_ramp(-0.5) == 0.0
    assert cosine_ramp(1.5) == 2.0
    assert rank_weight("linear_clamp", 50, 300) == pytest.approx(0.5)
    assert rank_weight("constant", 0, 10, w_max=1.5) == 1.5
    with pytest.raises(ValueError, match="'cosine'.*linear_clamp"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match="total_steps"):
        rank_weight("constant", 0, 0)


def test_bench_quick_grid_and_fitted_exponents(tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loss_scaling.py"), "--quick", "--repeats", "1", "--threads", "1"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    grid = {(r["order"], r["batch"]) for r in report["results"]}
    assert grid == {(order, batch) for order in range(5) for batch in (128, 256)}
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in report["results"])
    for order in range(5):
        rows = sorted((r["batch"], r["seconds"]) for r in report["results"] if r["order"] == order)
        slope = math.log(rows[1][1] / rows[0][1]) / math.log(rows[1][0] / rows[0][0])  # two points: exact fit
        assert report["exponents"][str(order)] == pytest.approx(slope, rel=1e-9)
