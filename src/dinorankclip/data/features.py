"""The `teacher` stage: cached teacher features, one feature shard per image shard, keyed by the image keys.

There is no augmentation in the recipe, so one teacher pass per image is exact for the whole of training. Patch
maps are pooled to a small grid and, when the teacher is wider than `pca_dim`, projected onto the principal
components of each block's features, fitted once on the first `pca_sample` images and stored with the cache
(`pca.safetensors`) — that is what keeps CC3M under 80 KB per image. Each finished shard is written atomically
into a staging folder (outside the declared output), so a killed job resumes without recomputing finished
shards; at the end a coverage check compares feature keys with image keys.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dinorankclip.data.loader import IMAGE_KEYS, check_shards
from dinorankclip.faults import kill_point
from dinorankclip.io import fingerprint, prepare_staging, read_json, write_json
from dinorankclip.models.clip import model_config
from dinorankclip.models.teacher import WEIGHTS_FILE, load_teacher, teacher_features, teacher_transform

log = logging.getLogger(__name__)
CC3M_PAIRS = 2_905_954  # pairs in the 2021 img2dataset crawl of CC3M (pixparse/cc3m-wds)


def shard_keys(tar_path: Path, suffixes: tuple[str, ...]) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar if m.isfile() and m.name.endswith(suffixes)})


def _images(shard: Path):
    """(key, RGB image) for every image in `shard`, in tar order."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(IMAGE_KEYS):
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                    yield member.name.split(".", 1)[0], img.convert("RGB")


def _batches(shard: Path, transform, size: int):
    """(keys, images [b,3,S,S]) in tar order, `size` at a time."""
    batch = []
    for key, img in _images(shard):
        batch.append((key, transform(img)))
        if len(batch) == size:
            yield [k for k, _ in batch], torch.stack([x for _, x in batch])
            batch = []
    if batch:
        yield [k for k, _ in batch], torch.stack([x for _, x in batch])


def batch_features(model, images: torch.Tensor, teacher: dict, device: torch.device) -> tuple:
    """Teacher CLS [b, C] and pooled patch maps [b, blocks, C, g, g] in float32, bf16 autocast on GPU."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        cls, patches = teacher_features(model, images.to(device), teacher["blocks"], teacher["grid"])
    return cls.float(), patches.float()


def project(patches: torch.Tensor, pca: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """[b, blocks, C, g, g] -> [b, blocks, k, g, g] on each block's principal components (identity without PCA)."""
    if pca is None:
        return patches
    centred = patches - pca["mean"][None, :, :, None, None]
    return torch.einsum("nbchw,bck->nbkhw", centred, pca["components"])


def fit_pca(model, shards: list[Path], transform, teacher: dict, device: torch.device) -> dict | None:
    """Per block, the mean and top-`pca_dim` principal directions of the pooled patch vectors of the first
    `pca_sample` images; None when the teacher is no wider than `pca_dim` (nothing to reduce)."""
    samples, seen = [], 0
    for shard in shards:
        for _, images in _batches(shard, transform, teacher["batch_size"]):
            samples.append(batch_features(model, images, teacher, device)[1].cpu())
            seen += len(images)
            if seen >= teacher["pca_sample"]:
                break
        if seen >= teacher["pca_sample"]:
            break
    maps = torch.cat(samples)[: teacher["pca_sample"]]  # [n, blocks, C, g, g]
    if maps.shape[2] <= teacher["pca_dim"]:
        return None
    vectors = maps.permute(1, 0, 3, 4, 2).flatten(1, 3).double()  # [blocks, n*g*g, C]
    mean = vectors.mean(dim=1)
    _, _, vh = torch.linalg.svd(vectors - mean[:, None], full_matrices=False)
    return {"mean": mean.float(), "components": vh[:, : teacher["pca_dim"]].transpose(1, 2).float().contiguous()}


def cache_shard(model, shard: Path, dest: Path, transform, teacher: dict, device: torch.device,
                pca: dict | None) -> int:
    """Compute and write the features of one image shard; return the number of images."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    count = 0
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for keys, images in _batches(shard, transform, teacher["batch_size"]):
            cls, patches = batch_features(model, images, teacher, device)
            patches = project(patches.cpu(), pca)
            for key, c, p in zip(keys, cls.half().cpu().numpy(), patches.half().numpy(), strict=True):
                sink.write({"__key__": key, "cls.npy": c, "patches.npy": p})
            count += len(keys)
    os.replace(tmp, dest)
    return count


def coverage(image_shards: list[Path], feature_shards: list[Path]) -> dict:
    """Compare image keys with feature keys shard by shard; raise naming the first missing or extra keys."""
    problems = []
    for img, feat in zip(image_shards, feature_shards, strict=True):
        want, have = set(shard_keys(img, IMAGE_KEYS)), set(shard_keys(feat, (".cls.npy",)))
        if want - have:
            problems.append(f"{feat.name}: no features for {sorted(want - have)[:5]} ({len(want - have)} keys)")
        if have - want:
            problems.append(f"{feat.name}: features for unknown keys {sorted(have - want)[:5]} ({len(have - want)})")
    if problems:
        raise ValueError("teacher cache coverage check failed:\n  " + "\n  ".join(problems))
    return {"shards": len(feature_shards), "checked": True}


def build_feature_cache(cfg: dict, data_dir: Path, weights_dir: Path, staging: Path, out: Path) -> tuple[dict, dict]:
    """Features for every image of the study's shards, shard by shard (resumable), then moved into `out`; return
    (stats, as written to `stats.json`; timings of this job, which stay out of the output)."""
    teacher = cfg["teacher"]
    check_shards(data_dir / "shards.json")
    index = read_json(data_dir / "shards.json")
    image_shards = [data_dir / entry["url"] for entry in index["shardlist"]]
    weights = weights_dir / WEIGHTS_FILE
    prepare_staging(staging, fingerprint([data_dir / "shards.json", weights],
                                         {"teacher": teacher, "arch": cfg["model"]}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(teacher["threads"])
    model = load_teacher(teacher, weights, device)
    transform = teacher_transform(model_config(cfg["model"]["arch"])["vision_cfg"]["image_size"])
    if not (staging / "pca.safetensors").exists():
        pca = fit_pca(model, image_shards, transform, teacher, device)
        save_file(pca or {}, str(staging / "pca.safetensors"))
    pca = load_file(str(staging / "pca.safetensors")) or None

    total = sum(entry["nsamples"] for entry in index["shardlist"])
    done = sum(entry["nsamples"] for entry in index["shardlist"] if (staging / Path(entry["url"]).name).exists())
    progress = tqdm(total=total, initial=done, desc="teacher features", unit="img", mininterval=5)
    start, computed = time.perf_counter(), 0
    for shard in image_shards:
        dest = staging / shard.name
        if dest.exists():
            continue
        n = cache_shard(model, shard, dest, transform, teacher, device, pca)
        computed += n
        progress.update(n)
        kill_point("teacher:shard")
    progress.close()
    seconds = time.perf_counter() - start

    # hard links, not moves: the finished work stays in staging until the caller has published `out`, so a job
    # killed from here on resumes with every shard instead of computing the pass again
    (out / "features").mkdir()
    os.link(staging / "pca.safetensors", out / "pca.safetensors")
    feature_shards = []
    for shard in image_shards:
        os.link(staging / shard.name, out / "features" / shard.name)
        feature_shards.append(out / "features" / shard.name)
    stats = coverage(image_shards, feature_shards)
    nbytes = sum(p.stat().st_size for p in feature_shards)
    stats.update(images=total, bytes=nbytes, bytes_per_image=nbytes / total,
                 cc3m_projected_gb=nbytes / total * CC3M_PAIRS / 1e9, model=teacher["model"],
                 blocks=teacher["blocks"], grid=teacher["grid"], dtype="float16",
                 patch_channels=pca["components"].shape[2] if pca else model.embed_dim)
    write_json(out / "features.json", {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                       "name": f"{cfg['study']}-teacher", "shardlist": [
                                           {"url": f"features/{p.name}", "nsamples": e["nsamples"],
                                            "filesize": p.stat().st_size}
                                           for p, e in zip(feature_shards, index["shardlist"], strict=True)]})
    write_json(out / "stats.json", stats)
    log.info("teacher cache: %d images, %.1f KB/image, CC3M projection %.1f GB", total,
             stats["bytes_per_image"] / 1e3, stats["cc3m_projected_gb"])
    timings = {"seconds": seconds, "images_computed": computed, "images_resumed": total - computed,
               "images_per_s": computed / seconds if computed else None, "device": device.type}
    return stats, timings
