"""Exported models load in stock open_clip (local-dir) and give bit-identical embeddings."""

import open_clip
import pytest
import torch

from dinorankclip.models.clip import create_clip, export_local_dir, load_local_dir, training_layout


def test_export_round_trips_bit_exactly_through_stock_open_clip(tmp_path):
    torch.manual_seed(0)
    model, _, _ = create_clip("demo-rn-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # not the init value, so a silent re-init would show
    model.eval()
    export_local_dir(model, "demo-rn-tiny", tmp_path)
    stock, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    stock.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["a small red circle", "two shapes"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), stock.encode_image(images))
        assert torch.equal(model.encode_text(tokens), stock.encode_text(tokens))
    assert stock.logit_scale.item() == 2.5
    assert preprocess.transforms[0].size == 32
    assert load_local_dir(tmp_path)[0].training is False


def test_unknown_architecture_and_missing_export_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model.arch: unknown architecture 'no-such-arch'"):
        create_clip("no-such-arch")
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json"):
        load_local_dir(tmp_path)


def trained_injected(variant: str):
    """A demo-tower student with injection whose gate, branch and projection are all away from their init."""
    torch.manual_seed(0)
    injection = {"variant": variant, "channels": 16, "taps": [0, 1, 2], "reduction": 4, "spatial_kernel": 3,
                 "heads": 2, "refiner_depth": 1, "max_grid": 4, "gate_bias": -4.0}
    model, _, spec = create_clip("demo-rn-tiny", {**injection, "taps": None}, 3)
    assert spec["taps"] == [1, 2, 3]  # evenly spaced, ending at the last stage, one per teacher block
    model, _, spec = create_clip("demo-rn-tiny", injection, 3)
    with torch.no_grad():
        for param in model.visual.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model.eval(), spec


@pytest.mark.parametrize("variant", ["v1", "v4", "v5"])
def test_injected_export_reloads_bit_exactly_here_and_in_clip_benchmark(tmp_path, variant):
    from clip_benchmark.models import MODEL_TYPES, load_clip

    from dinorankclip.eval.model_type import register

    model, spec = trained_injected(variant)
    export_local_dir(model, "demo-rn-tiny", tmp_path, spec)
    register()
    assert "dinorankclip" in MODEL_TYPES
    images = torch.randn(3, 3, 32, 32)
    reloaded, transform, _ = load_clip("dinorankclip", "ignored", str(tmp_path), None, "cpu")
    for other in (load_local_dir(tmp_path)[0], reloaded):
        assert type(other.visual).__name__ == "InjectedImageEncoder" and other.visual.variant == variant
        assert other.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(value, other.state_dict()[name]) for name, value in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), other.encode_image(images))
    assert transform.transforms[0].size == 32


def test_injected_export_is_refused_by_stock_open_clip(tmp_path):
    """The stock loader cannot build the injected tower: it fails loudly rather than dropping the injection."""
    model, spec = trained_injected("v5")
    export_local_dir(model, "demo-rn-tiny", tmp_path, spec)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("injected", [False, True])
def test_training_layout_is_channels_last_for_a_resnet_tower_with_the_same_values_and_gradients(injected):
    torch.manual_seed(0)
    model = trained_injected("v4")[0] if injected else create_clip("demo-rn-tiny")[0]
    model.train()
    images = torch.randn(8, 3, 32, 32)
    laid = training_layout(images, model.visual)
    assert laid.is_contiguous(memory_format=torch.channels_last)
    assert not images.is_contiguous(memory_format=torch.channels_last) and torch.equal(laid, images)
    grads = []
    for batch in (images, laid):
        model.zero_grad(set_to_none=True)
        model.encode_image(batch).square().sum().backward()
        grads.append({name: p.grad for name, p in model.visual.named_parameters() if p.grad is not None})
    # sums in another order: equal to within 2e-5 of the largest gradient (measured 3e-6; a key bias's, zero in exact
    # arithmetic, is all rounding), not element by element
    scale = max(grad.abs().max().item() for grad in grads[0].values())
    for name, param in model.visual.named_parameters():
        if name in grads[1]:  # the gradients keep the parameters' (default) layout: optimizer state and
            assert grads[1][name].is_contiguous() and param.is_contiguous(), name  # checkpoints are as before
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=2e-5 * scale, msg=name)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    vit = create_clip("demo-vit-tiny")[0]
    assert training_layout(images, vit.visual) is images  # a ViT's patch embedding gains nothing from it
