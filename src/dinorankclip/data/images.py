"""Images for KUEA fine-tuning (METHOD.md §4): the study's own shards, or an image folder such as ImageNet-1k train.

KUEA aligns the image tower alone, so only images are read — never a caption, never a class label — and both
sources give the same `ImageBatch`: images, their keys, and the teacher's CLS when it is cached.

- `finetune.data.kind: shards` (the default): the study's data stage (`shards.json`, CC3M or the demo world) with
  the teacher stage's cache beside it (`features.json`); the CLS of each image is read by key, so the teacher never
  runs during fine-tuning.
- `finetune.data.kind: folder`: every image under `finetune.data.path`, searched recursively (ImageNet's
  `train/<wnid>/<name>.JPEG` layout or a flat folder); the frozen teacher then runs on each batch.

`check_finetune_data` validates the source before any model is built, so a mistyped path or an empty folder costs
one clear error naming the key and the path, not a model load first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from dinorankclip.data.loader import check_side_count, decode_image, open_shards, read_feature
from dinorankclip.io import read_json

# What an image folder may hold, compared case-insensitively (ImageNet's train files end in .JPEG).
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FOLDER_HINT = "an image folder such as ImageNet-1k's train/ (one sub-folder per class; labels are not used)"


class DataPathError(ValueError):
    """The fine-tuning images cannot be read; the message names the `finetune.data` key and the path."""


class ImageBatch(NamedTuple):
    """Images [B,3,H,W], their keys, and the cached teacher CLS [B, D] (fp16), or None when the teacher runs online."""

    images: torch.Tensor
    keys: list[str]
    teacher_cls: torch.Tensor | None


def list_images(root: Path) -> list[Path]:
    """Every image file under `root` (recursively, following links), in sorted order so runs are reproducible."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found += [Path(folder) / name for name in sorted(files) if name.lower().endswith(FOLDER_SUFFIXES)]
    return found


class FolderImages(Dataset):
    """The images of a folder; the key of an image is its path relative to the folder."""

    def __init__(self, root: Path, files: list[Path], transform: Callable):
        self.root, self.files, self.transform = root, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))

    def __getitems__(self, indices: list[int]) -> ImageBatch:
        keys = [self.files[i].relative_to(self.root).as_posix() for i in indices]
        return ImageBatch(torch.stack([self._read(i) for i in indices]), keys, None)


class ShardImages(Dataset):
    """The images of a wids shard index with their cached teacher CLS (`.cls.npy`), read side by side by key."""

    def __init__(self, index: Path, features: Path, transform: Callable):
        self.shards, self.features = open_shards(index), open_shards(features)
        check_side_count(self.features, self.shards, features, index, "teacher")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.shards)

    def _read(self, i: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        sample = self.shards[i]
        return decode_image(sample, self.transform), sample["__key__"], read_feature(self.features, i, sample,
                                                                                      ".cls.npy")

    def __getitems__(self, indices: list[int]) -> ImageBatch:
        images, keys, cls = zip(*(self._read(i) for i in indices), strict=True)
        return ImageBatch(torch.stack(images), list(keys), torch.stack(cls))


@dataclass(frozen=True)
class ImageSource:
    """A checked source of fine-tuning images: what `check_finetune_data` found, before any model exists."""

    kind: str  # shards | folder
    path: Path  # the shard index, or the image folder
    size: int
    features: Path | None = None  # the teacher cache index (shards)
    files: tuple[Path, ...] = ()  # the images (folder)

    @property
    def cached_teacher(self) -> bool:
        """Whether the teacher's CLS comes with the images (else the teacher must run online)."""
        return self.features is not None

    def dataset(self, transform: Callable) -> Dataset:
        if self.kind == "shards":
            return ShardImages(self.path, self.features, transform)
        return FolderImages(self.path, list(self.files), transform)


def _check_index(index: Path, key: str, stage: str) -> int:
    """Number of samples of a wids index written by `stage`; a DataPathError if it is missing or empty."""
    if not index.is_file():
        raise DataPathError(f"{key}: {index} not found; run the {stage} stage first")
    try:
        size = sum(int(entry["nsamples"]) for entry in read_json(index)["shardlist"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataPathError(f"{key}: {index} is not a wids shard index ({err})") from err
    if size == 0:
        raise DataPathError(f"{key}: {index} lists no images")
    return size


def check_finetune_data(finetune: dict, data_dir: Path, teacher_dir: Path) -> ImageSource:
    """Validate the `finetune.data` source (no model is touched) and return what it holds.

    `data_dir` and `teacher_dir` are the study's data and teacher stage outputs, read when `kind` is shards.
    """
    data = finetune["data"]
    if data["kind"] == "shards":
        key = "finetune.data (kind: shards)"
        size = _check_index(data_dir / "shards.json", key, "data")
        features = teacher_dir / "features.json"
        if _check_index(features, key, "teacher") != size:
            raise DataPathError(f"{key}: {features} does not cover the {size} images of {data_dir / 'shards.json'}; "
                                "rebuild the teacher stage")
        return ImageSource("shards", data_dir / "shards.json", size, features=features)
    path = Path(data["path"])
    if not path.exists():
        raise DataPathError(f"finetune.data.path: {path} does not exist; expected {FOLDER_HINT}")
    if not path.is_dir():
        raise DataPathError(f"finetune.data.path: {path} is not a directory; expected {FOLDER_HINT}")
    files = list_images(path)
    if not files:
        raise DataPathError(f"finetune.data.path: {path} holds no images (no {'/'.join(FOLDER_SUFFIXES)} files, "
                            f"searched recursively); expected {FOLDER_HINT}")
    return ImageSource("folder", path, len(files), files=tuple(files))

