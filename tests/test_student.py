"""The dual-branch student in training: teacher features read by key, distillation only with a branch L, the gate
opening under the real objective, and the ramp that weights the distillation."""

import open_clip
import pytest
import torch
from helpers import TEACHER_SHAPE, make_image_shards, repo_params, write_features

from dinorankclip.config import resolve
from dinorankclip.data.loader import ShardPairs
from dinorankclip.models.clip import create_clip
from dinorankclip.train.objective import build_objective
from dinorankclip.train.student import Student, distill_weight


@pytest.fixture
def data(tmp_path):
    make_image_shards(tmp_path / "data", [5, 3])
    return tmp_path / "data"


def pairs(data, features):
    model, transform, _ = create_clip("demo-rn-tiny")
    return ShardPairs(data / "shards.json", transform, open_clip.get_tokenizer("demo-rn-tiny"), features)


def test_teacher_features_arrive_with_their_images(data, tmp_path):
    keys = {"00000.tar": [f"00000{i:04d}" for i in range(5)], "00001.tar": [f"00001{i:04d}" for i in range(3)]}
    batch = pairs(data, write_features(tmp_path / "teacher", keys)).__getitems__([6, 0, 3])
    assert batch.keys == ["000010001", "000000000", "000000003"]
    assert batch.teacher.shape == (3, *TEACHER_SHAPE) and batch.teacher.dtype == torch.float16
    expected = torch.tensor([int(k) / 1e9 for k in batch.keys], dtype=torch.float16)
    assert torch.equal(batch.teacher[:, 1, 2, 1, 0], expected)
    assert pairs(data, None).__getitems__([0]).teacher is None


def test_a_feature_out_of_step_with_its_image_is_named(data, tmp_path):
    keys = {"00000.tar": ["000000000", "000000001", "000000002", "000000004", "000000003"],
            "00001.tar": [f"00001{i:04d}" for i in range(3)]}
    dataset = pairs(data, write_features(tmp_path / "teacher", keys))
    dataset.__getitems__([0, 1, 2])
    with pytest.raises(KeyError, match=r"sample 000000003 of .*00000.tar meets 000000004 of .*features/00000.tar"):
        dataset.__getitems__([3])


def test_a_cache_of_another_size_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match=r"7 samples for 8 images in .*; rebuild the teacher stage"):
        pairs(data, write_features(tmp_path / "teacher", {"00000.tar": [f"00000{i:04d}" for i in range(7)]}))


def injected_cfg(variant):
    cfg = resolve(repo_params(), "demo", "drc-r3")
    cfg["injection"].update(variant=variant, channels=8, heads=2, refiner_depth=1)
    return cfg


@pytest.mark.parametrize("variant, distils", [("none", False), ("v1", False), ("v2", True), ("v5", True)])
def test_only_a_branch_l_is_distilled(variant, distils):
    cfg = injected_cfg(variant)
    torch.manual_seed(0)
    model, _, _ = create_clip("demo-rn-tiny", cfg["injection"], 3)
    student = Student(model, teacher_channels=TEACHER_SHAPE[1])
    images, tokens = torch.randn(4, 3, 32, 32), open_clip.get_tokenizer("demo-rn-tiny")(["a red circle"] * 4)
    teacher = torch.randn(4, *TEACHER_SHAPE)
    out = student(images, tokens, teacher if distils else None)
    assert (out.distill is not None) == distils and (student.distill is not None) == distils
    assert torch.allclose(out.image.norm(dim=-1), torch.ones(4)) and out.image.shape == out.text.shape == (4, 64)
    if distils:
        assert out.distill.feature > 0 and out.distill.relational > 0
        with pytest.raises(ValueError, match="the batch has no teacher features"):
            student(images, tokens, None)


def test_the_gate_opens_under_the_real_objective_and_the_embedding_leaves_the_tower():
    cfg = injected_cfg("v5")
    torch.manual_seed(0)
    model, _, _ = create_clip("demo-rn-tiny", cfg["injection"], 3)
    student = Student(model, teacher_channels=TEACHER_SHAPE[1])
    objective = build_objective(cfg["loss"], 64, cfg["seed"])
    images = torch.randn(8, 3, 32, 32)
    tokens = open_clip.get_tokenizer("demo-rn-tiny")([f"{n} shapes" for n in range(8)])
    teacher = torch.randn(8, *TEACHER_SHAPE)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.visual.tower(images))
    model.train()
    optimizer = torch.optim.Adam(list(student.parameters()) + list(objective.parameters()), lr=1e-2)
    for step in range(3):
        out = student(images, tokens, teacher)
        loss, _ = objective(out.image, out.text, out.scale, step + 50, 100)
        optimizer.zero_grad()
        (loss + out.distill.feature + out.distill.relational).backward()
        optimizer.step()
    model.eval()
    assert model.visual.gate.alpha.item() != 0
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), model.visual.tower(images))


def test_distillation_follows_the_rank_weight_ramp_scaled_to_one():
    cfg = injected_cfg("v5")
    weights = [distill_weight(cfg["injection"], cfg["loss"], step, 300) for step in (0, 100, 200, 299)]
    ramp = cfg["loss"]["rank_weight"]
    assert ramp["schedule"] == "cosine_ramp" and ramp["p_ramp"] == pytest.approx(2 / 3)
    assert weights == pytest.approx([0.0, 0.5, 1.0, 1.0])  # λ_kd·½(1 − cos(π·min((step/300)/(2/3), 1)))
