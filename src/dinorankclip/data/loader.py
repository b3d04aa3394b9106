"""Training pairs from the webdataset shards, by random access (wids), in a seeded order per epoch.

Random access makes the data position of a run a single number (the step), which is what exact resume and
equal global batches across world sizes need; the per-epoch permutation depends only on (seed, epoch).
Samples are fetched a whole batch at a time (`__getitems__`), so captions are tokenised in one call.
With a teacher feature index (the `teacher` stage's `features.json`, one feature shard per image shard, same
sizes), sample i of the features is read beside sample i of the images and their keys must agree.

The recipe has no augmentation, so a sample is the same tensor in every epoch: a small dataset is read once into
memory (`PairCache`, when `pretrain.sample_cache_mb` holds it) instead of decoding every JPEG every epoch, and,
given a cache folder, once per study: the first job saves what it read under a key of its exact inputs and every
later job of the same inputs loads it (the demo's 26 pretraining jobs each spent ~5 CPU-s decoding the same 8,000
images).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL
import torch
import wids
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dinorankclip.errors import InputError
from dinorankclip.io import atomic_file, fingerprint

log = logging.getLogger(__name__)
IMAGE_KEYS = (".jpg", ".jpeg", ".png", ".webp")


class Batch(NamedTuple):
    """Images [B,3,H,W], token ids [B,L], sample keys, the teacher's patch maps [B,S,C,g,g] (fp16) or None, and
    the token ids of each image's second caption [B,L] (the captions stage) or None."""

    images: torch.Tensor
    tokens: torch.Tensor
    keys: list[str]
    teacher: torch.Tensor | None
    captions: torch.Tensor | None = None


def tar_sample_count(path: Path) -> int:
    """Samples in a tar shard as wids counts them (consecutive members sharing the part of the name before the
    first dot); an InputError naming the file when it is unreadable or ends inside a member."""
    size, count, last = path.stat().st_size, 0, None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise InputError(f"{path}: ends inside {member.name} (truncated)")
                key = member.name.split("/")[-1].split(".", 1)[0]
                if key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a readable tar shard ({err})") from None
    return count


def check_shards(index: Path) -> None:
    """Every shard of a wids index is there as the index describes it: its recorded size (`filesize`, written by
    the data and teacher stages), else its sample count. A shard cut short (a full disk, a partial copy) would
    otherwise end in an IndexError from wids after some steps of training, naming nothing."""
    for entry in json.loads(index.read_text())["shardlist"]:
        path = index.parent / entry["url"]
        if not path.is_file():
            raise InputError(f"{index}: shard {entry['url']} is missing ({path})")
        if "filesize" in entry:
            if path.stat().st_size != entry["filesize"]:
                raise InputError(f"{path}: {path.stat().st_size} bytes, but {index} records {entry['filesize']}: "
                                 "the shard was truncated or replaced; rebuild the stage that wrote it")
            continue
        found = tar_sample_count(path)
        if found != entry["nsamples"]:
            raise InputError(f"{path}: {found} samples, but {index} lists {entry['nsamples']}; rebuild the stage "
                             "that wrote it")


def open_shards(index: Path) -> wids.ShardListDataset:
    """The samples of a wids shard index, by random access, after `check_shards`."""
    check_shards(index)
    # identity localname: read the shards where they are instead of copying them into a cache
    return wids.ShardListDataset(str(index), localname=lambda url: url, transformations=[])


def decode_image(sample: dict, transform: Callable):
    """The sample's image (jpg, png, ...) decoded to RGB and transformed; a KeyError names a sample without one."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise KeyError(f"{sample['__shard__']}: sample {sample['__key__']} has no image")
    with Image.open(io.BytesIO(sample[image_key].getvalue())) as img:
        return transform(img.convert("RGB"))


def aligned_field(side: wids.ShardListDataset, i: int, sample: dict, field: str, what: str):
    """Field `field` of sample i of a side dataset (teacher features, second captions), which must carry the
    image's key; `what` names the side in the error."""
    other = side[i]
    if other["__key__"] != sample["__key__"] or field not in other:
        raise KeyError(f"{what} out of step with the images: sample {sample['__key__']} of "
                       f"{sample['__shard__']} meets {other['__key__']} of {other['__shard__']}"
                       + ("" if field in other else f" (no {field.lstrip('.')})"))
    return other[field]


def read_feature(features: wids.ShardListDataset, i: int, sample: dict, field: str) -> torch.Tensor:
    """Array `field` (e.g. `.patches.npy`, `.cls.npy`) of feature sample i, which must carry the image's key."""
    return torch.from_numpy(np.load(aligned_field(features, i, sample, field, "teacher features")))


def check_side_count(side: wids.ShardListDataset, shards: wids.ShardListDataset, side_index: Path, index: Path,
                     stage: str) -> None:
    """A side dataset (teacher cache, caption shards) holds one sample per image, or the caller reads the wrong
    ones."""
    if len(side) != len(shards):
        raise ValueError(f"{side_index}: {len(side)} samples for {len(shards)} images in {index}; rebuild the "
                         f"{stage} stage")


class ShardPairs(Dataset):
    """`Batch`es from the samples of a wids shard index, with the cached teacher features and the second captions
    when their indexes are given; served from memory (`PairCache`) when all samples fit in `cache_mb` MB, read
    from `saved_in` when a job of the same inputs saved them there."""

    def __init__(self, index: Path, transform: Callable, tokenizer: Callable, features: Path | None = None,
                 captions: Path | None = None, cache_mb: float = 0, saved_in: Path | None = None):
        self.shards = open_shards(index)
        self.features = open_shards(features) if features is not None else None
        self.captions = open_shards(captions) if captions is not None else None
        for side, side_index, stage in ((self.features, features, "teacher"), (self.captions, captions, "captions")):
            if side is not None:
                check_side_count(side, self.shards, side_index, index, stage)
        self.transform, self.tokenizer = transform, tokenizer
        self.cache = PairCache.of(self, cache_mb, saved_in) if cache_mb > 0 else None

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, i: int, image: Callable) -> tuple[Any, str, str, torch.Tensor | None, str | None]:
        """Sample i: (`image` of its decoded RGB image, caption, key, teacher maps or None, second caption or None)."""
        sample = self.shards[i]
        if ".txt" not in sample:
            raise KeyError(f"{sample['__shard__']}: sample {sample['__key__']} has no caption")
        teacher = None if self.features is None else read_feature(self.features, i, sample, ".patches.npy")
        second = None if self.captions is None else \
            aligned_field(self.captions, i, sample, ".txt", "second captions").getvalue().decode("utf-8")
        return decode_image(sample, image), sample[".txt"].getvalue().decode("utf-8"), sample["__key__"], \
            teacher, second

    def __getitems__(self, indices: list[int]) -> Batch:
        if self.cache is not None:
            return self.cache.batch(indices)
        images, captions, keys, teacher, second = zip(*(self.read(i, self.transform) for i in indices), strict=True)
        return Batch(torch.stack(images), self.tokenizer(list(captions)), list(keys),
                     None if self.features is None else torch.stack(teacher),
                     None if self.captions is None else self.tokenizer(list(second)))


def split_transform(transform: Callable) -> tuple[Callable, Callable]:
    """(the PIL steps of an image transform, its Normalize) for a torchvision Compose that ends in ToTensor +
    Normalize, as open_clip's evaluation transform does; a ValueError for any other transform."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(transform, "transforms", ()))
    cut = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
    if cut is None or len(steps) != cut + 2 or not isinstance(steps[-1], Normalize):
        raise ValueError(f"{CACHE_KEY}: the image transform {transform!r} does not end in ToTensor + Normalize, so "
                         "its pixels cannot be cached exactly; set it to 0")
    return Compose(steps[:cut]), steps[-1]


def pixels_of(image_steps: Callable) -> Callable:
    """What the cache keeps of an image: the uint8 [H, W, 3] pixels after `image_steps` (resize, crop; PIL's own)."""
    def pixels(img: Image.Image) -> np.ndarray:
        out = image_steps(img)
        if getattr(out, "mode", None) != "RGB":
            raise ValueError(f"{CACHE_KEY}: the image transform's PIL steps give {out!r}, not an RGB image; set it "
                             "to 0")
        return np.asarray(out)
    return pixels


def to_normalized(pixels: torch.Tensor, normalize: Callable) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W]: ToTensor's ops (CHW, float, / 255) then `normalize`. Every op is
    elementwise, so each image comes out bit for bit as the whole transform makes it from its PIL image."""
    return normalize(pixels.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255))


CACHE_KEY = "pretrain.sample_cache_mb"
CACHE_FORMAT = 1  # of the saved PairCache; a new layout gets new keys


def tokenizer_identity(tokenizer: Callable) -> dict:
    """What fixes a tokenizer's output besides its library's version: its class and its plain settings (an open_clip
    SimpleTokenizer's context length and special-token ids; an HFTokenizer's name)."""
    plain = {k: v for k, v in vars(tokenizer).items() if isinstance(v, str | int | float | bool | type(None))}
    return {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", **plain}


def pair_cache_key(pairs: ShardPairs, image_steps: Callable) -> str:
    """sha256 over the bytes of every shard the cache reads (images, teacher features, second captions) and what
    turns them into the cache (the image steps, the tokenizer, the versions of the libraries that run them): a
    saved cache is read back only for exactly these inputs."""
    import open_clip
    import torchvision

    sides = [side for side in (pairs.shards, pairs.features, pairs.captions) if side is not None]
    files = [shard["url"] for side in sides for shard in side.shards]
    return fingerprint(files, {"format": CACHE_FORMAT, "features": pairs.features is not None,
                               "captions": pairs.captions is not None, "shards": [len(side.shards) for side in sides],
                               "image_steps": repr(image_steps),
                               "tokenizer": tokenizer_identity(pairs.tokenizer), "pillow": PIL.__version__,
                               "torchvision": torchvision.__version__, "open_clip": open_clip.__version__})


class PairCache(NamedTuple):
    """Every sample of a `ShardPairs`, read once: resized and cropped uint8 pixels [N, H, W, 3], token ids [N, L],
    keys, teacher maps [N, S, C, g, g] or None, second-caption token ids [N, L] or None. A batch of it equals what
    the shards give (the transform's tail applied per batch; tokenisation is per caption)."""

    pixels: torch.Tensor
    tokens: torch.Tensor
    keys: list[str]
    teacher: torch.Tensor | None
    captions: torch.Tensor | None
    normalize: Callable

    @classmethod
    def of(cls, pairs: ShardPairs, budget_mb: float, saved_in: Path | None = None) -> PairCache | None:
        """The cache of `pairs`, or None (they stream) when its size, estimated from sample 0, exceeds `budget_mb`.
        With `saved_in`, loaded from `<saved_in>/<pair_cache_key>.pt` if a job saved it, else read from the shards
        and saved there (atomically: jobs that start together each read the shards and the last rename wins)."""
        image_steps, normalize = split_transform(pairs.transform)
        pixels = pixels_of(image_steps)
        first = pairs.read(0, pixels)
        per_sample = first[0].nbytes + pairs.tokenizer([first[1]]).nbytes * (1 if first[4] is None else 2) + \
            (0 if first[3] is None else first[3].nbytes)
        size_mb = per_sample * len(pairs) / 2**20
        if size_mb > budget_mb:
            log.info("%d samples need ~%.0f MB in memory, over %s = %g: streamed from the shards", len(pairs),
                     size_mb, CACHE_KEY, budget_mb)
            return None
        start = time.perf_counter()
        saved = None if saved_in is None else Path(saved_in) / f"{pair_cache_key(pairs, image_steps)}.pt"
        if saved is not None and saved.is_file():
            cache = cls(**torch.load(saved, weights_only=True), normalize=normalize)
            log.info("%d samples held in memory (%.0f MB, loaded in %.1f s from %s)", len(pairs), size_mb,
                     time.perf_counter() - start, saved)
            return cache
        images, captions, keys, teacher, second = zip(first, *(pairs.read(i, pixels) for i in range(1, len(pairs))),
                                                      strict=True)
        cache = cls(torch.from_numpy(np.stack(images)), pairs.tokenizer(list(captions)), list(keys),
                    None if first[3] is None else torch.stack(teacher),
                    None if first[4] is None else pairs.tokenizer(list(second)), normalize)
        log.info("%d samples held in memory (%.0f MB, read in %.1f s)", len(pairs), size_mb,
                 time.perf_counter() - start)
        if saved is not None:
            with atomic_file(saved) as f:
                torch.save({k: v for k, v in cache._asdict().items() if k != "normalize"}, f)
        return cache

    def batch(self, indices: list[int]) -> Batch:
        rows = torch.as_tensor(indices)
        return Batch(to_normalized(self.pixels[rows], self.normalize), self.tokens[rows],
                     [self.keys[i] for i in indices], None if self.teacher is None else self.teacher[rows],
                     None if self.captions is None else self.captions[rows])


def split_indices(size: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) sample indices: a fixed seeded draw of `held_out` samples, the same for every run."""
    if held_out >= size:
        raise ValueError(f"pretrain.val_samples: {held_out} leaves no training samples out of {size}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held_out:]), sorted(order[:held_out])


class GlobalBatches(Sampler[list[int]]):
    """This rank's slice of every global batch of an epoch, from a permutation drawn from (seed, epoch); `key`
    names the batch size in errors.

    Every rank draws the same permutation and cuts the same global batches (the ragged tail dropped), so a step's
    global batch does not depend on the world size; `set_position(epoch, batch)` starts part-way through an epoch,
    which is all a resumed run needs to see the samples it would have seen.
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, key: str = "pretrain.batch_size"):
        if len(indices) < batch_size:
            raise ValueError(f"{key}: {batch_size} exceeds the {len(indices)} samples of the split")
        if batch_size % world:
            raise ValueError(f"{key}: {batch_size} is not divisible by the {world} ranks")
        self.indices, self.batch_size, self.seed, self.shuffle = torch.tensor(indices), batch_size, seed, shuffle
        self.local = batch_size // world
        self.offset = rank * self.local
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start = epoch, batch

    def __iter__(self) -> Iterator[list[int]]:
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = order[torch.randperm(len(order), generator=generator)]
        for b in range(self.start, self.batches_per_epoch):
            first = b * self.batch_size + self.offset
            yield order[first:first + self.local].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


def _batch_as_is(batch):
    return batch


def pair_loader(dataset: Dataset, batches: GlobalBatches, workers: int,
                device: torch.device | None = None) -> DataLoader:
    """A loader over `batches` (this rank's slices of the global batches); samples are read a batch at a time.

    For a CUDA `device` the batches come in pinned memory, so their `non_blocking` copies to the GPU are
    asynchronous and overlap the step instead of stalling the host."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, persistent_workers=workers > 0,
                      collate_fn=_batch_as_is, pin_memory=device is not None and device.type == "cuda")
