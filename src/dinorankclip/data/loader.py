"""Training pairs from the webdataset shards, by random access (wids), in a seeded order per epoch.

Random access makes the data position of a run a single number (the step), which is what exact resume and
equal global batches across world sizes need; the per-epoch permutation depends only on (seed, epoch).
Samples are fetched a whole batch at a time (`__getitems__`), so captions are tokenised in one call.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import wids
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_KEYS = (".jpg", ".jpeg", ".png", ".webp")


class ShardPairs(Dataset):
    """Batches of (images [B,3,H,W], token ids [B,L], sample keys) from the samples of a wids shard index."""

    def __init__(self, index: Path, transform: Callable, tokenizer: Callable):
        # identity localname: read the shards where they are instead of copying them into a cache
        self.shards = wids.ShardListDataset(str(index), localname=lambda url: url, transformations=[])
        self.transform, self.tokenizer = transform, tokenizer

    def __len__(self) -> int:
        return len(self.shards)

    def _read(self, i: int) -> tuple[torch.Tensor, str, str]:
        sample = self.shards[i]
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None or ".txt" not in sample:
            raise KeyError(f"{sample['__shard__']}: sample {sample['__key__']} lacks an image or a caption")
        with Image.open(io.BytesIO(sample[image_key].getvalue())) as img:
            image = self.transform(img.convert("RGB"))
        return image, sample[".txt"].getvalue().decode("utf-8"), sample["__key__"]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images, captions, keys = zip(*(self._read(i) for i in indices), strict=True)
        return torch.stack(images), self.tokenizer(list(captions)), list(keys)

    def __getitem__(self, i: int):
        image, caption, key = self._read(i)
        return image, self.tokenizer([caption])[0], key


class EpochPermutation(Sampler[int]):
    """A permutation of the dataset drawn from (seed, epoch), optionally starting part-way through."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.size, generator=generator)[self.start:].tolist()

    def __len__(self) -> int:
        return self.size - self.start


def _batch_as_is(batch):
    return batch


def pair_loader(dataset: ShardPairs, batch_size: int, seed: int, workers: int) -> DataLoader:
    """Batches of `batch_size`, dropping the ragged tail so every step sees a full global batch."""
    if len(dataset) < batch_size:
        raise ValueError(f"pretrain.batch_size: {batch_size} exceeds the {len(dataset)} training samples")
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochPermutation(len(dataset), seed),
                      drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                      collate_fn=_batch_as_is)
