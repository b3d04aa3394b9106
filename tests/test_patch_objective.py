"""TIPSv2's components: iBOT++ against iBOT and a direct computation, the head-only EMA, the masks and the caption
sampling (both drawn from (seed, step) over the global batch)."""

import copy

import pytest
import torch
from helpers import repo_params

from dinorankclip.config import resolve
from dinorankclip.losses.ibot import ibot_loss
from dinorankclip.models.clip import create_clip
from dinorankclip.train.caption_sampling import sample_captions
from dinorankclip.train.objective import build_objective
from dinorankclip.train.optim import make_optimizer, param_groups
from dinorankclip.train.patch import PatchObjective, token_masks
from dinorankclip.train.step import TrainStep, update
from dinorankclip.train.student import Student


def scores(seed, shape=(3, 5, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_ibot_plus_averages_every_token_and_ibot_only_the_masked_ones():
    student, teacher, center = scores(0), scores(1), scores(2, (7,))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) < 0.4
    per_token = torch.zeros(3, 5, dtype=torch.float64)
    for b in range(3):
        for n in range(5):
            p_t = torch.softmax((teacher[b, n] - center) / 0.04, -1)
            per_token[b, n] = -(p_t * torch.log_softmax(student[b, n] / 0.1, -1)).sum()
    plus = ibot_loss(student, teacher, mask, center, 0.1, 0.04, all_tokens=True)
    masked_only = ibot_loss(student, teacher, mask, center, 0.1, 0.04, all_tokens=False)
    assert torch.allclose(plus, per_token.mean(), rtol=1e-12)
    assert torch.allclose(masked_only, per_token[mask].mean(), rtol=1e-12)
    assert not torch.allclose(plus, masked_only)


def test_ibot_plus_with_every_token_masked_equals_ibot():
    student, teacher, center = scores(4), scores(5), scores(6, (7,))
    everything = torch.ones(3, 5, dtype=torch.bool)
    assert torch.equal(ibot_loss(student, teacher, everything, center, 0.1, 0.04, all_tokens=True),
                       ibot_loss(student, teacher, everything, center, 0.1, 0.04, all_tokens=False))


def test_the_teacher_side_gets_no_gradient():
    student, teacher = scores(7).requires_grad_(), scores(8).requires_grad_()
    ibot_loss(student, teacher, torch.ones(3, 5, dtype=torch.bool), torch.zeros(7), 0.1, 0.04, True).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_masks_are_one_global_draw_sliced_by_rank(monkeypatch):
    import dinorankclip.losses.distributed as dist

    whole = token_masks(8, 16, (0.25, 0.5), seed=3, step=7)
    counts = whole.sum(1)
    assert ((counts >= 4) & (counts <= 8)).all()
    assert torch.equal(token_masks(8, 16, (1.0, 1.0), 3, 7), torch.ones(8, 16, dtype=torch.bool))
    assert not torch.equal(whole, token_masks(8, 16, (0.25, 0.5), seed=3, step=8))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        assert torch.equal(token_masks(4, 16, (0.25, 0.5), 3, 7), whole[4 * rank: 4 * rank + 4])


def test_caption_sampling_draws_each_caption_with_its_probability(monkeypatch):
    raw, syn = torch.zeros(4000, 3, dtype=torch.long), torch.ones(4000, 3, dtype=torch.long)
    picked = sample_captions(raw, syn, 0.3, seed=0, step=5)
    assert picked[:, 0].float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert (picked == picked[:, :1]).all()  # whole captions, never mixed tokens
    assert torch.equal(sample_captions(raw, syn, 0.0, 0, 5), raw) and torch.equal(sample_captions(raw, syn, 1.0, 0, 5),
                                                                                  syn)
    import dinorankclip.losses.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert torch.equal(sample_captions(raw[:2000], syn[:2000], 0.3, 0, 5), picked[2000:])


def tips_step(patch_loss="ibot_plus"):
    cfg = resolve(repo_params(), "demo", "tips-style")
    cfg["patch_loss"]["name"] = patch_loss
    torch.manual_seed(0)
    model, _, _ = create_clip(cfg["model"]["arch"])
    student = Student(model, patch=PatchObjective(model.visual, cfg["patch_loss"], cfg["seed"]))
    objective = build_objective(cfg["loss"], model.text_projection.shape[1], cfg["seed"])
    return cfg, TrainStep(student, objective, cfg, gather=False)


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 400, (n, 24), generator=g), \
        torch.randint(1, 400, (n, 24), generator=g)


def test_head_only_ema_moves_the_teacher_head_by_the_formula_and_nothing_else():
    cfg, step = tips_step()
    patch = step.student.patch
    with torch.no_grad():
        for p in patch.head.parameters():
            p.add_(torch.randn_like(p))  # make the heads differ
    teacher0 = copy.deepcopy(patch.teacher_head.state_dict())
    head0 = copy.deepcopy(patch.head.state_dict())
    backbone0 = copy.deepcopy(step.student.model.state_dict())
    step.after_step()
    m = cfg["patch_loss"]["head_ema"]
    for name, value in patch.teacher_head.state_dict().items():
        assert torch.allclose(value, m * teacher0[name] + (1 - m) * head0[name], rtol=0, atol=1e-7), name
    assert all(torch.equal(v, head0[k]) for k, v in patch.head.state_dict().items())
    assert all(torch.equal(v, backbone0[k]) for k, v in step.student.model.state_dict().items())


def test_a_training_update_trains_the_student_head_and_only_averages_the_teacher_head():
    cfg, step = tips_step()
    optimizer = make_optimizer(param_groups([("", step)], 0.1), {**cfg["pretrain"], "lr": 1e-2})
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in step.student.patch.teacher_head.parameters())
    assert id(step.student.patch.mask_patch) in trained
    teacher0 = copy.deepcopy(step.student.patch.teacher_head.state_dict())
    images, tokens, captions = batch()
    loss, terms = step(images, tokens, None, 0, 10, captions)
    assert terms["loss/patch"] > 0
    update(step, loss, optimizer, step.student.model, None)
    m = cfg["patch_loss"]["head_ema"]
    head = step.student.patch.head.state_dict()
    for name, value in step.student.patch.teacher_head.state_dict().items():
        assert torch.allclose(value, m * teacher0[name] + (1 - m) * head[name], rtol=0, atol=1e-7), name
    assert step.student.patch.center.abs().sum() > 0  # the teacher centre followed the batch


def test_the_masked_view_replaces_exactly_the_masked_cells():
    _, step = tips_step()
    patch = step.student.patch
    with torch.no_grad():
        patch.mask_patch.fill_(7.0)
    images = torch.zeros(2, 3, 32, 32)
    masks = torch.zeros(2, patch.grid * patch.grid, dtype=torch.bool)
    masks[1, patch.grid + 2] = True  # row 1, column 2
    out = patch.masked(images, masks)
    cell = patch.cell
    assert out[0].abs().sum() == 0
    assert (out[1, :, cell:2 * cell, 2 * cell:3 * cell] == 7).all()
    assert out[1].abs().sum() == 7 * 3 * cell * cell


def test_caption_sampling_feeds_the_text_tower_the_drawn_captions(monkeypatch):
    _, step = tips_step()
    seen = []
    encode = step.student.model.encode_text
    monkeypatch.setattr(step.student.model, "encode_text", lambda tokens, normalize: seen.append(tokens) or
                        encode(tokens, normalize=normalize))
    images, tokens, captions = batch()
    step(images, tokens, None, 3, 10, captions)
    assert torch.equal(seen[0], sample_captions(tokens, captions, 0.5, step.seed, 3))


def test_the_patch_objective_refuses_an_injected_tower():
    cfg = resolve(repo_params(), "demo", "drc-r3")
    model, _, _ = create_clip(cfg["model"]["arch"], cfg["injection"], len(cfg["teacher"]["blocks"]))
    with pytest.raises(ValueError, match="patch_loss: needs a plain open_clip ViT or ModifiedResNet"):
        PatchObjective(model.visual, resolve(repo_params(), "demo", "tips-style")["patch_loss"], 0)


def test_a_vit_tower_uses_its_last_block_tokens():
    cfg = resolve(repo_params(), "demo", "tips-style")["patch_loss"]
    model, _, _ = create_clip("demo-vit-tiny")
    patch = PatchObjective(model.visual, {**cfg, "tap": None}, 0)
    assert patch.tap == 1 and patch.grid == 4 and patch.cell == 8  # 32px in 8px patches
    image, loss = patch(model.visual, torch.randn(2, 3, 32, 32), 0)
    assert image.shape == (2, 64) and torch.allclose(image.norm(dim=-1), torch.ones(2)) and loss > 0


@pytest.mark.parametrize("arch, tap", [("demo-rn-tiny", 1), ("demo-vit-tiny", 0)])
def test_the_masked_pass_stops_at_the_tap_with_the_maps_of_the_full_pass(arch, tap):
    from dinorankclip.models.injection import forward_taps, tap_maps

    model, _, _ = create_clip(arch)
    model.eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tap_maps(model.visual, images, [tap])[0], forward_taps(model.visual, images, [tap])[1][0],
                          rtol=0, atol=1e-6)
