"""Image features of a frozen model, cached per checkpoint: computed once, never reused for another checkpoint.

clip-benchmark caches linear-probe features under `<feature_root>/<model>-<pretrained>-<dataset>`, so evaluating a
new checkpoint at the same path silently reuses the old one's features. Here the cache key is a sha256 over the
bytes of the exported model's files (config and weights) and what was featurised (dataset, split, normalisation),
so a changed checkpoint gets a new key and stale features cannot be read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from dinorankclip.io import atomic_file, fingerprint
from dinorankclip.models.clip import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)


def checkpoint_key(model_dir: Path, **settings) -> str:
    """sha256 of the export's files and `settings`: the identity of a set of features."""
    return fingerprint([Path(model_dir) / CONFIG_FILE, Path(model_dir) / WEIGHTS_FILE], settings)


@torch.no_grad()
def featurize(model, loader, device: str, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [N, d] float32, integer targets [N]) over a classification loader, as clip-benchmark's
    `Featurizer` computes them (L2-normalised when `normalize`)."""
    features, targets = [], []
    for images, target in loader:
        with torch.autocast(device, enabled=device == "cuda"):
            feature = model.encode_image(images.to(device))
        feature = feature.float()
        features.append((F.normalize(feature, dim=-1) if normalize else feature).cpu())
        targets.append(torch.as_tensor(target))
    return torch.cat(features), torch.cat(targets)


def cached_features(cache_dir: Path | None, model_dir: Path, name: str, compute) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute()`'s (features, targets), read from `cache_dir/<key>.pt` when this checkpoint computed them before
    (`name` describes the dataset, split and settings). `cache_dir=None` always computes."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{checkpoint_key(model_dir, name=name)}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        log.info("features of %s: cached (%s)", name, path)
        return cached["features"], cached["targets"]
    features, targets = compute()
    with atomic_file(path) as f:
        torch.save({"features": features, "targets": targets, "name": name}, f)
    return features, targets
