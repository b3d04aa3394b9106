"""The frozen DINOv3 teacher from timm, and the `teacher_weights` stage that decides where its weights come from.

`teacher.weights.from` is `file` (a local safetensors or torch state dict — offline first; the paper study),
`hub` (timm's own download, only when asked and online) or `train` (the demo's stand-in, trained on the demo world
by `dinorankclip.models.demo_teacher`). Whatever the source, the stage writes the weights to
`results/<study>/teacher_weights/model.safetensors`, which every later use of the teacher loads. A missing file
is one error that names the file and how to get it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"


def create_teacher(teacher: dict, weights: Path | None = None, hub: bool = False) -> nn.Module:
    """The timm model named by `teacher.model`: from a weights file, from the hub, or randomly initialised."""
    kwargs = dict(teacher["model_kwargs"])
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    return timm.create_model(teacher["model"], pretrained=weights is not None or hub, num_classes=0, **kwargs)


def frozen(model: nn.Module, device: torch.device) -> nn.Module:
    return model.eval().requires_grad_(False).to(device)


def load_teacher(teacher: dict, weights: Path, device: torch.device) -> nn.Module:
    """The frozen teacher (eval mode, no grad) with the weights the teacher_weights stage provided."""
    return frozen(create_teacher(teacher, weights), device)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_teacher_weights(cfg: dict, source_dir: Path, data_dir: Path, out: Path) -> dict:
    """Provide the teacher's weights in `out` (a fresh directory); return what was done, for the record."""
    teacher, origin = cfg["teacher"], cfg["teacher"]["weights"]["from"]
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(teacher["threads"])
    if origin == "file":
        path = Path(teacher["weights"].get("path") or "")
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher.weights.path: DINOv3 weights file {str(path)!r} not found. Download {teacher['model']} "
                f"once on a machine with network (the model.safetensors of the Hugging Face repo "
                f"'timm/{teacher['model']}', after accepting the DINOv3 licence) and put it at that path, or set "
                f"teacher.weights.path to where it is.")
        model, stats = create_teacher(teacher, path), {"from": "file", "file": str(path), "sha256": sha256(path)}
    elif origin == "hub":
        model, stats = create_teacher(teacher, hub=True), {"from": "hub"}
    else:
        from dinorankclip.models.demo_teacher import train_demo_teacher

        model = create_teacher(teacher)
        image_size = teacher["model_kwargs"]["img_size"]
        stats = {"from": "train", **train_demo_teacher(model, data_dir, source_dir / "scenes.jsonl", image_size,
                                                        teacher["train"], cfg["seed"])}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"model": teacher["model"]})
    return stats


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


class OnlineTeacher(nn.Module):
    """The frozen teacher run on each training batch (`injection.teacher: online`, or KUEA on an image folder),
    instead of the cache.

    The batch arrives normalised with the student's statistics; it is mapped back to pixels and renormalised with
    ImageNet's, so the teacher sees what the cache stage would have shown it. No PCA: the distillation head
    projects to the teacher's full width. Parameters stay frozen and out of the optimizer (requires_grad off).
    """

    def __init__(self, model: nn.Module, blocks: list[int], grid: int, student_mean, student_std) -> None:
        super().__init__()
        self.model, self.blocks, self.grid = model, list(blocks), grid
        shift = torch.tensor(student_mean) - torch.tensor(IMAGENET_MEAN)
        self.register_buffer("scale", (torch.tensor(student_std) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("shift", (shift / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> OnlineTeacher:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS [B, C], pooled patch maps [B, n, C, g, g]) in float32, as the cache stage computes them."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            cls, maps = teacher_features(self.model, images * self.scale + self.shift, self.blocks, self.grid)
        return cls.float(), maps.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The patch maps: what branch L is distilled towards."""
        return self.features(images)[1]

    def cls(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS feature: what KUEA aligns the image tower's kernel to."""
        return self.features(images)[0]
