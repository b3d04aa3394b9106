"""Distillation terms (METHOD.md §3): values against brute force, invariances, and the per-scale DistillHead."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.losses.distill import DistillHead, DistillTerms, feature_distill_loss, relational_distill_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _brute_feature(student, teacher):
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for n in range(student.shape[1]):
            s, t = student[b, n].double().tolist(), teacher[b, n].double().tolist()
            dot = sum(x * y for x, y in zip(s, t, strict=True))
            norm_s = math.sqrt(sum(x * x for x in s))
            norm_t = math.sqrt(sum(y * y for y in t))
            total += 1.0 - dot / (norm_s * norm_t)
            count += 1
    return total / count


def _brute_relational(student, teacher, tau):
    def unit_rows(x):
        rows = x.double().tolist()
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows]

    def softmax(logits):
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        return [e / total for e in exps]

    total, count = 0.0, 0
    for b in range(student.shape[0]):
        fs, ft = unit_rows(student[b]), unit_rows(teacher[b])
        n = len(fs)
        for i in range(n):
            p_s = softmax([sum(x * y for x, y in zip(fs[i], fs[j], strict=True)) / tau for j in range(n)])
            p_t = softmax([sum(x * y for x, y in zip(ft[i], ft[j], strict=True)) / tau for j in range(n)])
            total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
            count += 1
    return total / count


def test_both_terms_vanish_for_identical_inputs_and_are_positive_otherwise():
    a = _rand(3, 9, 16, seed=0)
    b = _rand(3, 9, 16, seed=1)
    assert feature_distill_loss(a, a.clone()).item() <= 1e-6
    assert relational_distill_loss(a, a.clone()).item() <= 1e-6
    assert feature_distill_loss(a, b).item() > 0.1
    assert relational_distill_loss(a, b).item() > 1e-3
    # Only the direction of each patch matters for both terms.
    assert feature_distill_loss(a, 3.0 * a).item() <= 1e-6
    assert relational_distill_loss(a, 3.0 * a).item() <= 1e-6


def test_losses_are_float32_scalars_with_gradients_for_half_inputs():
    s = _rand(2, 5, 8, seed=2).half().requires_grad_()
    t = _rand(2, 5, 8, seed=3).half()
    for loss in (feature_distill_loss(s, t), relational_distill_loss(s, t)):
        assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, s)
        assert grad.abs().sum() > 0


def test_feature_term_matches_brute_force():
    s, t = _rand(3, 7, 5, seed=4), _rand(3, 7, 5, seed=5)
    assert feature_distill_loss(s, t).item() == pytest.approx(_brute_feature(s, t), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_relational_term_matches_brute_force(tau):
    s, t = _rand(2, 6, 5, seed=6), _rand(2, 6, 11, seed=7)  # widths may differ
    expected = _brute_relational(s, t, tau)
    assert expected > 0
    assert relational_distill_loss(s, t, tau=tau).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_relational_term_is_kl_teacher_to_student_not_the_reverse():
    s, t = _rand(2, 6, 5, seed=8), _rand(2, 6, 5, seed=9)
    forward, backward = relational_distill_loss(s, t), relational_distill_loss(t, s)
    assert forward.item() == pytest.approx(_brute_relational(s, t, 0.1), rel=1e-4)
    assert abs(forward.item() - backward.item()) > 1e-3


def test_both_terms_are_invariant_to_a_shared_permutation_of_patches():
    s, t = _rand(2, 12, 8, seed=10), _rand(2, 12, 8, seed=11)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(12))
    torch.testing.assert_close(relational_distill_loss(s[:, perm], t[:, perm]), relational_distill_loss(s, t),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feature_distill_loss(s[:, perm], t[:, perm]), feature_distill_loss(s, t),
                               rtol=1e-5, atol=1e-6)
    # A permutation of one side only is not a symmetry: it changes which patches are compared.
    assert abs(feature_distill_loss(s, t[:, perm]).item() - feature_distill_loss(s, t).item()) > 1e-3


def test_relational_term_is_invariant_to_an_orthogonal_rotation_of_teacher_channels_feature_term_is_not():
    s = _rand(2, 10, 16, seed=12)
    t = s + 0.3 * _rand(2, 10, 16, seed=13)
    q, _ = torch.linalg.qr(_rand(16, 16, seed=14))
    rotated = t @ q
    torch.testing.assert_close(relational_distill_loss(s, rotated), relational_distill_loss(s, t),
                               rtol=1e-4, atol=1e-6)
    assert relational_distill_loss(s, s @ q).item() <= 1e-5
    # The feature term compares channel by channel: a rotated teacher is a different target.
    assert feature_distill_loss(s, s).item() <= 1e-6
    assert feature_distill_loss(s, s @ q).item() > 0.5
    assert abs(feature_distill_loss(s, rotated).item() - feature_distill_loss(s, t).item()) > 0.1


def test_mismatched_pairs_are_rejected():
    with pytest.raises(ValueError, match="widths"):
        feature_distill_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="patch count"):
        relational_distill_loss(torch.randn(2, 4, 8), torch.randn(2, 5, 8))


def _reference_head(head, student_maps, teacher_maps):
    g = teacher_maps.shape[-1]
    features, relations = [], []
    for index, m in enumerate(student_maps):
        p = head.projectors[index](m)
        if p.shape[-1] > g:
            p = F.adaptive_avg_pool2d(p, (g, g))
        elif p.shape[-1] < g:
            p = F.interpolate(p, size=(g, g), mode="bilinear", align_corners=False)
        s = p.flatten(2).transpose(1, 2)
        t = teacher_maps[:, index].float().flatten(2).transpose(1, 2)
        features.append(_brute_feature(s, t))
        relations.append(_brute_relational(s, t, head.tau))
    return sum(features) / len(features), sum(relations) / len(relations)


def test_head_projects_resizes_and_averages_over_scales_larger_equal_and_smaller_grids():
    torch.manual_seed(0)
    head = DistillHead(student_channels=6, teacher_channels=5, num_scales=3, tau=0.2)
    student_maps = [torch.randn(2, 6, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 6, 2, 2)]
    teacher_maps = torch.randn(2, 3, 5, 4, 4).half()
    terms = head(student_maps, teacher_maps)
    assert isinstance(terms, DistillTerms)
    assert terms.feature.shape == () and terms.relational.shape == ()
    assert terms.feature.dtype == torch.float32 and terms.relational.dtype == torch.float32
    with torch.no_grad():
        feature, relational = _reference_head(head, student_maps, teacher_maps)
    assert terms.feature.item() == pytest.approx(feature, rel=1e-4)
    assert terms.relational.item() == pytest.approx(relational, rel=1e-4)


def test_head_terms_vanish_when_the_teacher_is_the_projected_student():
    torch.manual_seed(1)
    head = DistillHead(8, 4, 2)
    student_maps = [torch.randn(3, 8, 6, 6), torch.randn(3, 8, 2, 2)]
    with torch.no_grad():
        teacher = torch.stack([
            F.adaptive_avg_pool2d(head.projectors[0](student_maps[0]), (3, 3)),
            F.interpolate(head.projectors[1](student_maps[1]), size=(3, 3), mode="bilinear", align_corners=False),
        ], dim=1)
    terms = head(student_maps, teacher)
    assert terms.feature.item() <= 1e-6
    assert terms.relational.item() <= 1e-5


def test_head_gives_gradients_to_every_projector_and_to_the_student_maps():
    torch.manual_seed(2)
    head = DistillHead(8, 4, 3)
    student_maps = [torch.randn(2, 8, s, s, requires_grad=True) for s in (7, 3, 1)]
    teacher_maps = torch.randn(2, 3, 4, 3, 3).half()
    terms = head(student_maps, teacher_maps)
    (terms.feature + terms.relational).backward()
    for projector in head.projectors:
        assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    for m in student_maps:
        assert m.grad is not None and m.grad.abs().sum() > 0
    # Each term alone reaches the projectors too.
    for term in DistillTerms._fields:
        head.zero_grad()
        getattr(head(student_maps, teacher_maps), term).backward()
        assert all(p.weight.grad.abs().sum() > 0 for p in head.projectors), term


def test_head_rejects_a_scale_count_mismatch():
    head = DistillHead(8, 4, 2)
    with pytest.raises(ValueError, match="scale count mismatch"):
        head([torch.randn(2, 8, 4, 4)] * 3, torch.randn(2, 2, 4, 3, 3))
    with pytest.raises(ValueError, match="scale count mismatch"):
        head([torch.randn(2, 8, 4, 4)] * 2, torch.randn(2, 3, 4, 3, 3))
    with pytest.raises(ValueError, match="teacher width mismatch"):
        head([torch.randn(2, 8, 4, 4)] * 2, torch.randn(2, 2, 5, 3, 3))
