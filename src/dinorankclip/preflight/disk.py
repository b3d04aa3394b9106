"""What a study writes, measured per item, against the free space where it is written.

Per image, each measured by writing samples with the stage's own writer and counting the bytes each occupies in
the tar (headers and padding included; a shard's end-of-archive padding, at most 10 KB, is not):
- image shards: a sample of the list's own images, downloaded and resized with img2dataset's downloader and
  resizer at the study's data settings, each with its caption and metadata, then rewritten as the data stage does;
- the teacher cache: CLS and pooled patch maps in fp16 (`.npy` and tar headers are what make 76.8 KB of arrays
  take 78.9 KB at the paper's sizes);
- caption shards, when the study has second captions (CoCa's, not yet written: at the list's mean caption length).
Each is stored for every listed pair; image shards also for the validation list's pairs (`data/val`). Per (run,
seed), from its built training step (`steps.kept_bytes`). Free space is read at `results/` (or its nearest existing
parent): the sum must fit.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from dinorankclip.layout import RESULTS
from dinorankclip.preflight.result import Check

log = logging.getLogger(__name__)
GB = 1e9
TAR_BLOCK = 512


def member_bytes(tar_path: Path) -> dict[str, int]:
    """{sample key: bytes its members occupy in the tar}: header blocks (with any extended header) and data
    padded to whole blocks."""
    sizes: dict[str, int] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            padded = -(-member.size // TAR_BLOCK) * TAR_BLOCK
            key = member.name.split(".", 1)[0]
            sizes[key] = sizes.get(key, 0) + member.offset_data - member.offset + padded
    return sizes


def per_sample(samples: list[dict], work: Path, name: str) -> float:
    """Mean bytes a sample occupies in a shard written by webdataset's TarWriter (what the stages use)."""
    path = work / f"{name}.tar"
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    sizes = member_bytes(path)
    return sum(sizes.values()) / len(sizes)


def cache_bytes_per_image(teacher: dict, width: int, work: Path) -> float:
    """A teacher cache sample: CLS [width] and maps [blocks, min(width, pca_dim), grid, grid], fp16."""
    channels = min(width, teacher["pca_dim"])
    maps = np.zeros((len(teacher["blocks"]), channels, teacher["grid"], teacher["grid"]), np.float16)
    return per_sample([{"__key__": f"{i:09d}", "cls.npy": np.zeros(width, np.float16), "patches.npy": maps}
                       for i in range(4)], work, "cache")


def caption_bytes_per_image(mean_chars: float, work: Path) -> float:
    """A caption shard sample (the captions stage's layout) with a caption of the mean length."""
    text = "x" * round(mean_chars)
    return per_sample([{"__key__": f"{i:09d}", "txt": text, "source.txt": "synthetic"} for i in range(4)], work,
                      "captions")


def image_bytes_per_image(cfg: dict, listed: Path, count: int, work: Path) -> dict:
    """Mean shard bytes per stored image over `count` images of the list, spread evenly over it, fetched and
    resized as the data stage's img2dataset does; with how many could be fetched."""
    from img2dataset.downloader import download_image_with_retry
    from img2dataset.resizer import Resizer

    from dinorankclip.data.download import normalize_shard

    data = cfg["data"]
    with open(listed, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    picked = rows[:: max(1, len(rows) // count)][:count]
    resize = Resizer(image_size=data["image_size"], resize_mode=data["resize_mode"], resize_only_if_bigger=False,
                     encode_quality=data["encode_quality"])
    samples, failed = [], 0
    for i, row in enumerate(picked):
        key = f"{i:09d}"
        _, stream, err = download_image_with_retry((key, row["url"]), data["timeout"], data["retries"], None, None)
        image, width, height, original_width, original_height, err = (resize(stream) if stream else
                                                                     (None, 0, 0, 0, 0, err))
        if image is None:
            failed += 1
            continue
        meta = {"url": row["url"], "key": key, "status": "success", "error_message": None, "width": width,
                "height": height, "original_width": original_width, "original_height": original_height,
                "exif": None, "sha256": "0" * 64}
        samples.append({"__key__": key, "jpg": image, "txt": row["caption"], "json": json.dumps(meta).encode()})
    if not samples:
        return {"bytes": None, "fetched": 0, "failed": failed}
    path = work / "images.tar"
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    normalize_shard(path)
    sizes = member_bytes(path)
    return {"bytes": sum(sizes.values()) / len(sizes), "fetched": len(samples), "failed": failed}


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path`."""
    return shutil.disk_usage(path).free


def results_root() -> Path:
    """`results/`, or its nearest existing parent (where it would be created)."""
    path = RESULTS.resolve()
    while not path.exists():
        path = path.parent
    return path


def disk_check(images: dict[str, int], per_image: dict[str, float], per_pair: list[dict[str, int]]) -> Check:
    """The bytes the study writes (for each thing stored per image: its images x its size; every (run, seed)'s
    training files and exports) against the free space under results/. Upper bound: every listed pair stored, every
    run's checkpoint at once."""
    root = results_root()
    need = {name: images[name] * size for name, size in per_image.items()}
    need["checkpoints while training"] = sum(pair["training"] for pair in per_pair)
    need["exports"] = sum(pair["exports"] for pair in per_pair)
    total, free = sum(need.values()), free_bytes(root)
    parts = ", ".join(f"{name} {_size(size)}" for name, size in need.items())
    values = {"need_bytes": total, "free_bytes": free, "parts": need, "per_image_bytes": per_image,
              "images": images, "root": str(root)}
    if total > free:
        return Check("disk", "fail", f"needs {_size(total)} under {root}, {_size(free)} free ({parts})",
                     fix=f"free {_size(total - free)} there, or make results/ a link to a larger filesystem",
                     values=values)
    return Check("disk", "ok", f"needs {_size(total)} of {_size(free)} free under {root} for "
                 f"{max(images.values(), default=0):,} images and "
                 f"{len(per_pair)} (run, seed) trainings ({parts}; "
                 + ", ".join(f"{name} {size / 1e3:.1f} KB/image" for name, size in per_image.items()) + ")",
                 values=values)


def _size(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= GB / 10 else f"{n / 1e6:,.1f} MB"


def mean_caption_chars(captions: Iterable[str]) -> float:
    """Mean length of `captions` (read with the reader of the file they come from)."""
    lengths = [len(caption) for caption in captions]
    return sum(lengths) / max(len(lengths), 1)


def listed_captions(listed: Path) -> Iterator[str]:
    """The captions of the cleaned caption list (csv-quoted where a caption needs it), as img2dataset reads them."""
    with open(listed, newline="") as f:
        yield from (row["caption"] for row in csv.DictReader(f, delimiter="\t"))

