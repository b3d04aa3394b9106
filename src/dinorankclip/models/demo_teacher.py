"""The demo's DINOv3 stand-in: a small DINOv3-architecture ViT taught the scene layout the captions under-describe.

No DINOv3 weights can be downloaded here, and a random teacher would only distil noise. So the demo study trains
the timm DINOv3 architecture (RoPE, registers, layer scale) for a minute on the world's own images with the
generator's attribute labels — per grid cell: colour, shape and size (or empty); per image: the object count —
then freezes it. Cell heads read the mean of the patch tokens that cover the cell, so the knowledge lands in the
patch maps the feature cache pools, like DINOv3's local features. The paper study never trains its teacher.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from dinorankclip.data import world as w
from dinorankclip.data.loader import IMAGE_KEYS
from dinorankclip.models.teacher import teacher_transform

COLOURS, SHAPES, SIZES = list(w.COLOURS), list(w.SHAPES), list(w.SIZES)
EMPTY = "empty"
log = logging.getLogger(__name__)


def cell_labels(scene: dict) -> torch.Tensor:
    """[GRID*GRID, 3] class indices (colour, shape, size) per cell in reading order; the last class is `empty`."""
    labels = torch.tensor([[len(COLOURS), len(SHAPES), len(SIZES)]] * (w.GRID * w.GRID))
    for obj in scene["objects"]:
        labels[obj["row"] * w.GRID + obj["col"]] = torch.tensor(
            [COLOURS.index(obj["colour"]), SHAPES.index(obj["shape"]), SIZES.index(obj["size"])])
    return labels


class AttributeHeads(nn.Module):
    """Per-cell colour/shape/size classifiers on pooled patch tokens and a count classifier on the CLS token."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.size = nn.Linear(width, len(SIZES) + 1)
        self.count = nn.Linear(width, w.GRID * w.GRID)

    def forward(self, tokens: torch.Tensor, prefix: int) -> dict[str, torch.Tensor]:
        cls, patches = tokens[:, 0], tokens[:, prefix:]
        side = int(patches.shape[1] ** 0.5)
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        cells = F.adaptive_avg_pool2d(grid, w.GRID).flatten(2).transpose(1, 2)  # [B, cells, C]
        return {"colour": self.colour(cells), "shape": self.shape(cells), "size": self.size(cells),
                "count": self.count(cls)}


def attribute_loss(logits: dict[str, torch.Tensor], cells: torch.Tensor, count: torch.Tensor):
    """Summed cross-entropies of the four heads, and the accuracy of each."""
    losses, accuracy = [], {}
    for i, name in enumerate(("colour", "shape", "size")):
        losses.append(F.cross_entropy(logits[name].flatten(0, 1), cells[..., i].flatten()))
        accuracy[name] = (logits[name].argmax(-1) == cells[..., i]).float().mean().item()
    losses.append(F.cross_entropy(logits["count"], count))
    accuracy["count"] = (logits["count"].argmax(-1) == count).float().mean().item()
    return sum(losses), accuracy


def labelled_images(data_dir: Path, scenes_file: Path, image_size: int):
    """(images [N,3,S,S] in the teacher's normalisation, cell labels [N,cells,3], counts [N]) of every shard sample."""
    scenes = {}
    with open(scenes_file) as f:
        for line in f:
            scene = json.loads(line)
            scenes[scene["url"]] = scene
    transform = teacher_transform(image_size)
    images, cells, counts = [], [], []
    for shard in sorted((data_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                key = name[: -len(".json")]
                scene = scenes[json.load(tar.extractfile(member))["url"]]
                image_name = next(f"{key}{ext}" for ext in IMAGE_KEYS if f"{key}{ext}" in members)
                with Image.open(io.BytesIO(tar.extractfile(members[image_name]).read())) as img:
                    images.append(transform(img.convert("RGB")))
                cells.append(cell_labels(scene))
                counts.append(len(scene["objects"]) - 1)
    return torch.stack(images), torch.stack(cells), torch.tensor(counts)


def train_demo_teacher(model: nn.Module, data_dir: Path, scenes_file: Path, image_size: int, train: dict,
                       seed: int) -> dict:
    """Train `model` (a timm DINOv3-architecture ViT) with attribute heads; return held-out accuracies."""
    images, cells, counts = labelled_images(data_dir, scenes_file, image_size)
    n_val = max(1, int(len(images) * train["val_fraction"]))
    heads = AttributeHeads(model.embed_dim)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"], fused=True)
    steps = train["epochs"] * ((len(images) - n_val) // train["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, train["lr"], total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    progress = tqdm(total=steps, desc="demo teacher", unit="step", mininterval=5)
    for _ in range(train["epochs"]):
        order = torch.randperm(len(images) - n_val, generator=generator) + n_val
        for i in range(len(order) // train["batch_size"]):
            idx = order[i * train["batch_size"]:(i + 1) * train["batch_size"]]
            loss, _ = attribute_loss(heads(model.forward_features(images[idx]), model.num_prefix_tokens),
                                     cells[idx], counts[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            progress.update()
    progress.close()
    model.eval()
    with torch.no_grad():
        _, accuracy = attribute_loss(heads(model.forward_features(images[:n_val]), model.num_prefix_tokens),
                                     cells[:n_val], counts[:n_val])
    log.info("demo teacher: held-out accuracy %s after %.0f s", accuracy, time.perf_counter() - start)
    return {"val_accuracy": accuracy, "train_seconds": time.perf_counter() - start, "images": len(images),
            "steps": steps}
