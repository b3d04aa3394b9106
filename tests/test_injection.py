"""The injected image encoder (METHOD.md §3 [v2]): exact identity at initialisation, the conflict-aware gate's
guarantee, fp32 residual adds under bf16 autocast, gradient reaching P from the first step, the strength statistics,
weight-decay names, argument checks, and drop-in use as `model.visual`."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from dinorankclip.models.clip import create_clip
from dinorankclip.models.gate import ConflictAwareGate, SigmoidGate
from dinorankclip.models.injection import FUSION_VARIANTS, InjectedImageEncoder, default_taps, injection_strength

VARIANTS = ["v1", "distill", "v2", "v3", "v4", "v5", "v6"]
INJECTED = ["v2", "v3", "v4", "v5", "v6"]
GATED = ["v5", "v6"]
TOWERS = ["resnet", "vit"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tower(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "resnet":
        tower = create_clip("demo-rn-tiny")[0].visual
        assert isinstance(tower, ModifiedResNet)
    else:
        tower = VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=2, mlp_ratio=4.0,
                                  output_dim=32)
    return tower.eval()


def wrap(tower, variant, **kwargs):
    return InjectedImageEncoder(tower, variant, channels=32, heads=2, **kwargs).eval()


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomise_gate(encoder, alpha, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        encoder.gate.alpha.fill_(alpha)
        encoder.gate.gate.weight.copy_(torch.randn(encoder.gate.gate.weight.shape, generator=generator))
        encoder.gate.gate.bias.copy_(torch.randn(encoder.gate.gate.bias.shape, generator=generator))
        projection = encoder.fusion.projection
        projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_wrapped_tower_is_bit_identical_at_initialisation(kind, variant):
    tower = make_tower(kind)
    x = images()
    with torch.no_grad():
        expected = tower(x)
        encoder = wrap(tower, variant)
        out = encoder(x)
        feats = encoder.features(x)
    assert torch.equal(out, expected)
    assert torch.equal(feats.z_g, expected)
    assert torch.equal(feats.z, expected)
    if variant == "v1":
        assert feats.maps == [] and encoder.branch is None
    else:
        assert len(feats.maps) == len(encoder.taps) == 3
        assert all(m.shape[:2] == (3, 32) for m in feats.maps)
    spec = FUSION_VARIANTS[variant]
    assert (encoder.gate is not None) == (spec.gate is not None)
    assert (encoder.fusion is not None) == spec.inject
    if spec.gate is not None:  # v2: P zero, α = 1, b = 0 (g = 1/2 ± 0.02)
        assert type(encoder.gate) is spec.gate
        assert encoder.gate.alpha.item() == 1.0 and encoder.gate.gate.bias.abs().sum() == 0
        g = encoder.gate.gated(feats.z_g, torch.zeros(feats.z_g.shape)).gate  # δ = P(z_loc) = 0 at initialisation
        assert (g - 0.5).abs().max() < 0.1 and (g - 0.5).std() < 0.03
    if spec.inject:
        assert encoder.fusion.projection.weight.abs().sum() == 0
        assert feats.strength["angle_deg"] == 0 and feats.strength["residual_ratio"] == 0
    else:
        assert feats.strength == {}


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("taps", [[0], [0, 2], [1, 3]])
def test_z_g_is_the_tower_output_for_taps_that_end_early(kind, taps):
    tower = make_tower(kind)
    x = images()
    with torch.no_grad():
        expected = tower(x)
        feats = wrap(tower, "v5", taps=taps).features(x)
    assert torch.equal(feats.z_g, expected)
    assert len(feats.maps) == len(taps)


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("variant", GATED)
def test_gated_variants_inject_once_alpha_and_gate_are_nonzero(kind, variant):
    encoder = wrap(make_tower(kind), variant)
    randomise_gate(encoder, alpha=0.7)
    with torch.no_grad():
        feats = encoder.features(images())
    assert not torch.equal(feats.z, feats.z_g)
    assert (feats.z - feats.z_g).abs().max() > 1e-3
    radial = ((feats.z - feats.z_g) * F.normalize(feats.z_g, dim=-1)).sum(-1)
    if variant == "v5":
        assert (radial >= -1e-5 * (feats.z_g.norm(dim=-1) + feats.z.norm(dim=-1))).all()


def _radial(gate, z_g, delta):
    with torch.no_grad():
        z = gate(z_g, delta)
    return ((z - z_g) * F.normalize(z_g, dim=-1)).sum(-1), z


@pytest.mark.parametrize("alpha", [-100.0, -7.0, -0.5, 0.5, 7.0, 100.0])
def test_conflict_aware_gate_never_pulls_back_along_z_g_while_the_plain_gate_does(alpha):
    dim, rows = 16, 512
    generator = torch.Generator().manual_seed(int(abs(alpha) * 10) + (alpha < 0))
    z_g = torch.randn(rows, dim, generator=generator) * torch.rand(rows, 1, generator=generator).mul(10)
    delta = torch.randn(rows, dim, generator=generator) * 3
    aware, plain = ConflictAwareGate(dim), SigmoidGate(dim)
    with torch.no_grad():
        aware.gate.weight.copy_(torch.randn(aware.gate.weight.shape, generator=generator))
        aware.gate.bias.copy_(torch.randn(dim, generator=generator))
        aware.alpha.fill_(alpha)
    plain.load_state_dict(aware.state_dict())

    radial_aware, z_aware = _radial(aware, z_g, delta)
    radial_plain, z_plain = _radial(plain, z_g, delta)
    scale = z_g.norm(dim=-1) + (z_plain - z_g).norm(dim=-1)
    assert (radial_aware >= -1e-5 * scale).all()
    assert (radial_plain < -1e-3 * scale).any()  # the plain gate does oppose z_g on some rows

    # Exactly the opposing radial part is removed: radial_aware = max(0, radial_plain), tangential parts agree.
    torch.testing.assert_close(radial_aware, radial_plain.clamp(min=0), rtol=1e-4, atol=1e-4 * scale.max().item())
    unit = F.normalize(z_g, dim=-1)
    tangential_aware = (z_aware - z_g) - radial_aware[:, None] * unit
    tangential_plain = (z_plain - z_g) - radial_plain[:, None] * unit
    torch.testing.assert_close(tangential_aware, tangential_plain, rtol=1e-4, atol=1e-4 * scale.max().item())


def _tower_projection(encoder) -> torch.Tensor:
    """The last linear map of the tower: the ViT's `proj`, the ResNet's attention-pool output projection."""
    tower = encoder.tower
    return tower.proj if isinstance(tower, VisionTransformer) else tower.attnpool.c_proj.weight


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("variant", INJECTED)
def test_the_projection_p_learns_from_the_first_step_as_fast_as_the_towers_own(kind, variant):
    """v2's point: at step 0, with z = z_g exactly, the gradient reaching P is non-zero, and through the gate (V5,
    V6) of the same order as the gradient reaching the tower's own projection (v1's was scaled by α·g ≈ 0). The
    ungated V2/V3 read the plain average of the branch maps, whose scale is the branch's own, so only non-zero is
    asserted for them."""
    encoder = wrap(make_tower(kind), variant).train()
    x = images(8)
    target = F.normalize(torch.randn(8, encoder.tower.output_dim, generator=torch.Generator().manual_seed(5)), dim=-1)
    loss = -(F.normalize(encoder(x), dim=-1) * target).sum(-1).mean()  # a cosine objective, as the losses read z
    loss.backward()
    p_grad = encoder.fusion.projection.weight.grad.norm().item()
    tower_grad = _tower_projection(encoder).grad.norm().item()
    assert p_grad > 0
    if variant in GATED:
        assert 0.05 < p_grad / tower_grad < 20, (p_grad, tower_grad)
    if encoder.gate is not None:
        assert encoder.gate.alpha.grad.item() == 0  # δ = 0: α learns once P has moved


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("variant", ["v2", "v3", "v4", "v5", "v6"])
def test_a_few_sgd_steps_move_the_encoder_away_from_the_tower(kind, variant):
    encoder = wrap(make_tower(kind), variant).train()
    x = images(4)
    target = torch.randn(4, encoder.tower.output_dim, generator=torch.Generator().manual_seed(6))
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = F.mse_loss(encoder(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    if encoder.gate is not None:
        assert encoder.gate.alpha.item() != 1.0
    encoder.eval()
    with torch.no_grad():
        z, z_g = encoder(x), encoder.tower(x)
    assert not torch.equal(z, z_g)
    assert (z - z_g).abs().max() > 1e-6


def test_on_an_opposing_delta_v5_keeps_the_radial_part_and_v6_does_not():
    """⟨z − z_g, ẑ_g⟩ ≥ −1e-6·‖r‖ for V5 on δ = −c·z_g, and the same bound fails for V6."""
    dim = 16
    z_g = torch.randn(6, dim, generator=torch.Generator().manual_seed(9)) * 4
    delta = -3.0 * z_g
    for gate, holds in ((ConflictAwareGate(dim), True), (SigmoidGate(dim), False)):
        out = gate.gated(z_g, delta)
        radial = ((out.z - z_g) * F.normalize(z_g, dim=-1)).sum(-1)
        r = gate.alpha * out.gate * delta
        assert bool((radial >= -1e-6 * r.norm(dim=-1)).all()) is holds
        assert (out.radial < 0).all()  # the residual before removal opposed z_g in every row


@pytest.mark.parametrize("variant", INJECTED)
def test_every_residual_add_computes_in_fp32_under_bf16_autocast(variant):
    encoder = wrap(make_tower("vit"), variant)
    with torch.no_grad():
        encoder.fusion.projection.weight.normal_(0, 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = encoder.features(images())
            delta = encoder.fusion(feats.maps)
    assert feats.z_g.dtype == torch.bfloat16 and feats.z.dtype == torch.float32
    if encoder.gate is None:
        assert torch.equal(feats.z, feats.z_g.float() + delta.float())
    else:
        expected = encoder.gate.gated(feats.z_g.float(), delta.float())
        assert torch.equal(feats.z, expected.z)


def test_strength_statistics_measure_the_angle_the_residual_and_the_conflicts():
    dim = 8
    z_g = torch.zeros(4, dim)
    z_g[:, 0] = 2.0
    gate = ConflictAwareGate(dim)
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.alpha.fill_(2.0)  # g = 1/2: r = δ
    delta = torch.zeros(4, dim)
    delta[0, 1] = 2.0  # 45°: tangential 2 against ‖z_g‖ 2
    delta[1, 0] = -1.0  # opposing, removed: 0°
    delta[2, 0], delta[2, 1] = -1.0, 1.0  # opposing part removed: atan(1/2)
    gated = gate.gated(z_g, delta)
    stats = injection_strength(z_g, gated.residual, gate, gated)
    expected_angle = (45.0 + 0.0 + math.degrees(math.atan(0.5)) + 0.0) / 4
    assert stats["angle_deg"].item() == pytest.approx(expected_angle, rel=1e-6)
    assert stats["residual_ratio"].item() == pytest.approx((1.0 + 0 + 0.5 + 0) / 4, rel=1e-6)
    assert stats["conflict_share"].item() == 0.5 and stats["gate_mean"].item() == 0.5
    assert stats["conflict_removed"].item() == pytest.approx((0.5 + 0.5) / 4, rel=1e-6)  # |−1|/2 in two rows
    assert stats["alpha"].item() == 2.0
    plain = SigmoidGate(dim)
    plain.load_state_dict(gate.state_dict())
    assert injection_strength(z_g, plain.gated(z_g, delta).residual, plain, plain.gated(z_g, delta))[
        "conflict_removed"].item() == 0


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_weight_decay_names_are_real_parameters(kind, variant):
    encoder = wrap(make_tower(kind), variant)
    params = dict(encoder.named_parameters())
    names = encoder.no_weight_decay()
    assert names <= set(params), sorted(names - set(params))
    tower_names = {f"tower.{n}" for n in getattr(encoder.tower, "no_weight_decay", set)()}
    assert tower_names <= names
    if kind == "vit":
        assert {"tower.class_embedding", "tower.positional_embedding"} <= names
    injection = {n for n in params if not n.startswith("tower.")}
    assert {n for n in injection if params[n].ndim < 2} == names - tower_names
    if variant in GATED:
        assert "gate.alpha" in names
    if variant == "v1":
        assert names == tower_names
    if variant == "distill":  # branch L alone
        assert {n.split(".")[0] for n in names - tower_names} == {"branch"}
    if variant in ("v4", "v5", "v6"):
        assert "fusion.refiner.query" in names


@pytest.mark.parametrize("kind", TOWERS)
def test_bad_variant_and_bad_taps_raise(kind):
    tower = make_tower(kind)
    with pytest.raises(ValueError, match="unknown fusion variant 'v7'"):
        InjectedImageEncoder(tower, "v7")
    with pytest.raises(ValueError, match="unknown fusion variant"):
        InjectedImageEncoder(tower, "V5")
    for taps in ([3, 1], [1, 1], [4], [-1], [], [0, 4]):
        with pytest.raises(ValueError, match="taps must be sorted"):
            InjectedImageEncoder(tower, "v5", taps=taps, channels=32, heads=2)


def test_patch_dropout_and_unknown_towers_are_rejected():
    tower = VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=2, mlp_ratio=4.0,
                              output_dim=32, patch_dropout=0.5)
    with pytest.raises(ValueError, match="patch dropout"):
        InjectedImageEncoder(tower, "v5", channels=32, heads=2)
    with pytest.raises(TypeError, match="VisionTransformer and ModifiedResNet"):
        InjectedImageEncoder(torch.nn.Linear(4, 4), "v5")


def test_default_taps():
    assert default_taps(12) == [3, 7, 11]
    assert default_taps(4) == [1, 2, 3]
    assert default_taps(24) == [7, 15, 23]
    assert default_taps(2) == [0, 1]
    assert default_taps(1) == [0]


def _vit_clip():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=4, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1),
    )


@pytest.mark.parametrize("kind", TOWERS)
def test_model_visual_can_be_replaced_and_encode_image_keeps_working(kind):
    model = create_clip("demo-rn-tiny")[0] if kind == "resnet" else _vit_clip()
    model.eval()
    x = images()
    tokens = torch.randint(0, 1000, (3, model.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.encode_image(x, normalize=True)
        before_raw = model.encode_image(x)
        text = model.encode_text(tokens, normalize=True)
    model.visual = InjectedImageEncoder(model.visual, "v5", channels=32, heads=2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x, normalize=True), before)
        assert torch.equal(model.encode_image(x), before_raw)
        out = model(x, tokens)
    image_features = out["image_features"] if isinstance(out, dict) else out[0]
    assert torch.equal(image_features, before)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3))

    randomise_gate(model.visual, alpha=0.7)
    with torch.no_grad():
        after = model.encode_image(x, normalize=True)
        feats = model.visual.features(x)
        assert torch.equal(model.encode_text(tokens, normalize=True), text)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, F.normalize(feats.z, dim=-1))
    torch.testing.assert_close(F.normalize(feats.z_g, dim=-1), before)
    assert any(name.startswith("visual.gate.") for name in model.state_dict())


@pytest.mark.parametrize("kind", TOWERS)
def test_lock_image_tower_freezes_the_tower_and_leaves_the_injection_trainable(kind):
    model = create_clip("demo-rn-tiny")[0] if kind == "resnet" else _vit_clip()
    tower = model.visual
    model.visual = InjectedImageEncoder(tower, "v5", channels=32, heads=2)
    if kind == "resnet":  # built by open_clip's factory, which sets the preprocessing config
        assert model.visual.preprocess_cfg == tower.preprocess_cfg and tower.preprocess_cfg["size"] == 32
    model.lock_image_tower()
    assert not any(p.requires_grad for p in model.visual.tower.parameters())
    injection = [p for name, p in model.visual.named_parameters() if not name.startswith("tower.")]
    assert injection and all(p.requires_grad for p in injection)


@pytest.mark.parametrize("scale", [0.03, 1.0])
def test_the_refiner_reads_the_maps_content_at_any_scale(scale):
    """z_loc differs from image to image as much for faint branch maps as for strong ones: the content is
    normalised before the unit-amplitude position codes are added (without it, maps at the demo's scale gave the
    same z_loc for every image, and δ was a constant offset)."""
    from dinorankclip.models.fusion import AttentionRefiner

    torch.manual_seed(0)
    refiner = AttentionRefiner(16, depth=1, heads=2).eval()
    with torch.no_grad():
        z_loc = refiner(torch.randn(64, 16, 4, 4) * scale)
    mean = z_loc.mean(0)
    assert ((z_loc - mean).norm(dim=1).mean() / mean.norm()).item() > 0.4
