"""The one upstream work-around (clip-benchmark 1.6.2 + numpy >= 2.4) stays correct, and says when to go."""

import numpy as np
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification

from dinorankclip.eval.zeroshot import topk_accuracy


def brute_force_topk(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    hits = 0
    for row, t in zip(logits.tolist(), target.tolist(), strict=True):
        ranked = sorted(range(len(row)), key=lambda j: -row[j])
        hits += t in ranked[:k]
    return hits / len(target)


def test_topk_accuracy_matches_a_brute_force_count():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(200, 7, generator=g), torch.randint(0, 7, (200,), generator=g)
    assert topk_accuracy(logits, target, (1, 3, 5)) == pytest.approx(
        [brute_force_topk(logits, target, k) for k in (1, 3, 5)], abs=1e-12)


@pytest.mark.skipif(np.lib.NumpyVersion(np.__version__) < "2.4.0", reason="the break needs numpy >= 2.4")
def test_upstream_accuracy_still_breaks_with_this_numpy():
    """When this fails, clip-benchmark accepts numpy >= 2.4: call its `evaluate` directly and drop the work-around."""
    logits, target = torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])
    with pytest.raises(TypeError, match="only 0-dimensional arrays"):
        zeroshot_classification.accuracy(logits, target, topk=(1,))
