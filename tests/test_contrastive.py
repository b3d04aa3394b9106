"""CLIP and CyCLIP losses (METHOD.md §2) against open_clip and the written definitions."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from dinorankclip.losses.contrastive import clip_loss, cyclip_loss, cyclip_terms


def _features(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=1)
    return image, text


@pytest.mark.parametrize("scale", [1.0, 14.28, 100.0])
def test_clip_loss_equals_open_clip(scale):
    image, text = _features(12, 16, seed=1)
    scale_t = torch.tensor(scale)
    expected = ClipLoss()(image, text, scale_t)
    torch.testing.assert_close(clip_loss(image, text, scale_t), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clip_loss(image, text, scale), expected, rtol=1e-6, atol=1e-6)


def test_clip_loss_reduces_bf16_inputs_in_fp32():
    image, text = _features(8, 16, seed=2, dtype=torch.bfloat16)
    loss = clip_loss(image, text, 50.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, clip_loss(image.float(), text.float(), 50.0), rtol=0, atol=0)


def _cyclip_reference(image, text, scale, lambda_in, lambda_cross):
    """METHOD.md's CyCLIP line evaluated literally in float64, with explicit log-softmax cross-entropies."""
    image, text = image.double(), text.double()
    b = image.shape[0]
    s_mat = scale * image @ text.T
    g_image, g_text = scale * image @ image.T, scale * text @ text.T
    diag = torch.arange(b)
    l_clip = -0.5 * (s_mat.log_softmax(1)[diag, diag].mean() + s_mat.T.log_softmax(1)[diag, diag].mean())
    in_term = ((g_image - g_text) ** 2).mean() * b / scale**2
    cross_term = ((s_mat - s_mat.T) ** 2).mean() * b / scale**2
    return l_clip + lambda_in * in_term + lambda_cross * cross_term, l_clip, in_term, cross_term


@pytest.mark.parametrize(("lambda_in", "lambda_cross"), [(0.25, 0.25), (0.3, 0.7)])
def test_cyclip_equals_direct_formula(lambda_in, lambda_cross):
    image, text = _features(10, 8, seed=3)
    scale = 30.0
    total, l_clip, in_term, cross_term = _cyclip_reference(image, text, scale, lambda_in, lambda_cross)
    result = cyclip_terms(image, text, scale, lambda_in, lambda_cross)
    torch.testing.assert_close(result.total.double(), total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cyclip_loss(image, text, scale, lambda_in, lambda_cross), result.total)
    torch.testing.assert_close(result.parts["clip"].double(), l_clip, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.parts["cyclic_in"].double(), in_term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.parts["cyclic_cross"].double(), cross_term, rtol=1e-5, atol=1e-6)
    assert set(result.floats()) == {"total", "clip", "cyclic_in", "cyclic_cross"}


def test_cyclip_gradients_match_formula():
    image, text = _features(6, 5, seed=4, dtype=torch.float64)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    cyclip_loss(image, text, scale).backward()
    got = (image.grad, text.grad, scale.grad)
    image.grad = text.grad = scale.grad = None
    _cyclip_reference(image, text, scale, 0.25, 0.25)[0].backward()
    for a, b in zip(got, (image.grad, text.grad, scale.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
