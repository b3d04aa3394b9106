"""The frozen DINOv3 teacher from timm: built from a model name, weights from a local file (offline first).

`teacher.init` says where weights come from: `file` (a safetensors or torch state dict at `teacher.weights`),
`hub` (timm's pretrained download, only when asked and online) or `random` (the demo's stand-in until a trained
demo teacher exists). A missing weights file is one error that names the file and how to get it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision import transforms

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_teacher(teacher: dict, device: torch.device) -> nn.Module:
    """A frozen timm model in eval mode with requires_grad off."""
    name, init = teacher["model"], teacher["init"]
    kwargs = dict(teacher.get("model_kwargs") or {})
    if init == "file":
        weights = Path(teacher["weights"] or "")
        if not teacher["weights"] or not weights.is_file():
            raise FileNotFoundError(
                f"teacher.weights: DINOv3 weights file {str(weights) or '(unset)'!r} not found. Download "
                f"{name} once on a machine with network (e.g. the model.safetensors of the Hugging Face repo "
                f"'timm/{name}', after accepting the DINOv3 licence) and put it at that path, or set "
                f"teacher.weights to where it is.")
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    elif init == "hub":
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    else:
        log.warning("teacher %s is randomly initialised (teacher.init: random)", name)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model.eval().requires_grad_(False)
    return model.to(device)


def teacher_transform(image_size: int) -> transforms.Compose:
    """The student's centre crop (bicubic resize of the short side, centre crop), with ImageNet statistics."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@torch.no_grad()
def teacher_features(model: nn.Module, images: torch.Tensor, blocks: list[int], grid: int) -> tuple:
    """(CLS of the last block after the final norm [B, C], patch maps of `blocks` pooled to grid [B, n, C, g, g])."""
    final, maps = model.forward_intermediates(images, indices=blocks, output_fmt="NCHW")
    pooled = torch.stack([nn.functional.adaptive_avg_pool2d(m, grid) for m in maps], dim=1)
    return final[:, 0], pooled
