"""Exported models load in stock open_clip (local-dir) and give bit-identical embeddings."""

import open_clip
import pytest
import torch

from dinorankclip.models.clip import create_clip, export_local_dir, load_local_dir


def test_export_round_trips_bit_exactly_through_stock_open_clip(tmp_path):
    torch.manual_seed(0)
    model, _ = create_clip("demo-rn-tiny")
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
