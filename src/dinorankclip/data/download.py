"""The `data` stage: img2dataset turns the caption list into webdataset shards, with an exact account of losses.

img2dataset writes into a staging folder outside the stage's declared output, in incremental mode, so a killed
download resumes where it stopped; a fingerprint of the caption list and the download settings guards against
resuming into shards made from something else. When it finishes, every stored image is decoded once more (a
sample that fails is removed from its shard and counted), the per-URL status that img2dataset records is tallied
into dead links and undecodable files, and the shards move into the output with a wids index.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from dinorankclip.data.server import serve_directory
from dinorankclip.io import fingerprint, prepare_staging, write_json

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def run_img2dataset(tsv: Path, staging: Path, data: dict) -> None:
    from img2dataset import download  # heavy import (albumentations, cv2): only where it is used

    download(
        url_list=str(tsv), input_format="tsv", url_col="url", caption_col="caption",
        output_format="webdataset", output_folder=str(staging / "shards"), incremental_mode="incremental",
        image_size=data["image_size"], resize_mode=data["resize_mode"], encode_quality=data["encode_quality"],
        processes_count=data["processes"], thread_count=data["threads"], timeout=data["timeout"],
        retries=data["retries"], number_sample_per_shard=data["shard_size"],
        distributor="multiprocessing", enable_wandb=False,
    )


def _bad_samples(shard: Path) -> list[str]:
    """Keys whose image does not decode completely (PIL refuses truncated data by default)."""
    bad = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                        img.load()
                except Exception:  # noqa: BLE001 - any decoder failure means the sample is unusable
                    bad.append(member.name.split(".", 1)[0])
    return bad


def _drop_samples(shard: Path, keys: set[str]) -> None:
    tmp = shard.with_suffix(".tar.tmp")
    with tarfile.open(shard) as src, tarfile.open(tmp, "w") as dst:
        for member in src:
            if member.name.split(".", 1)[0] not in keys:
                dst.addfile(member, src.extractfile(member))
    os.replace(tmp, shard)


def verify_shards(shards: list[Path], processes: int) -> dict[str, list[str]]:
    """Decode every image once more; remove failures from their shards. Returns {shard name: removed keys}."""
    with ProcessPoolExecutor(max_workers=max(1, processes)) as pool:
        bad = dict(zip([s.name for s in shards], pool.map(_bad_samples, shards), strict=True))
    for shard in shards:
        if bad[shard.name]:
            log.warning("%s: %d samples do not decode; removed: %s", shard, len(bad[shard.name]), bad[shard.name])
            _drop_samples(shard, set(bad[shard.name]))
    return {name: keys for name, keys in bad.items() if keys}


def tally(shard_dir: Path, removed: dict[str, list[str]]) -> dict:
    """Per-URL outcomes from img2dataset's parquet manifests: what was stored, what was lost and why."""
    table = pd.concat([pd.read_parquet(p, columns=["key", "url", "status", "error_message"])
                       for p in sorted(shard_dir.glob("*.parquet"))], ignore_index=True)
    status = Counter(table["status"])
    errors = Counter(table.loc[table["status"] != "success", "error_message"].fillna("unknown").str.strip())
    removed_count = sum(len(keys) for keys in removed.values())
    return {
        "urls": len(table),
        "stored": status.get("success", 0) - removed_count,
        "dead_links": status.get("failed_to_download", 0),
        "corrupt": status.get("failed_to_resize", 0) + removed_count,
        "removed_after_verification": removed,
        "errors": dict(sorted(errors.items())),
    }


def shard_index(shards: list[Path], name: str) -> dict:
    """A wids descriptor: each shard with its sample count, URLs relative to the descriptor."""
    entries = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar if m.isfile()}
        if keys:
            entries.append({"url": f"shards/{shard.name}", "nsamples": len(keys), "filesize": shard.stat().st_size})
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": entries}


def build_shards(cfg: dict, source_dir: Path, staging: Path, out: Path) -> dict:
    """Download into `staging`, verify, and move the finished shards with their index and stats into `out`."""
    data, source = cfg["data"], cfg["source"]
    tsv = source_dir / "train.tsv"
    prepare_staging(staging, fingerprint([tsv], data))
    server = (serve_directory(source_dir / "www", source["port"]) if source["kind"] == "demo_world"
              else contextlib.nullcontext())
    with server:
        run_img2dataset(tsv, staging, data)

    shard_dir = staging / "shards"
    shards = sorted(shard_dir.glob("*.tar"))
    removed = verify_shards(shards, data["processes"]) if data["verify"] else {}
    stats = tally(shard_dir, removed)
    if stats["stored"] == 0:
        raise RuntimeError(f"no image of {tsv} could be downloaded; see {shard_dir}/*.parquet for the errors")

    (out / "shards").mkdir()
    for path in sorted(shard_dir.iterdir()):
        if path.suffix in (".tar", ".parquet") or path.name.endswith("_stats.json"):
            os.replace(path, out / "shards" / path.name)
    write_json(out / "shards.json", shard_index(sorted((out / "shards").glob("*.tar")), f"{cfg['study']}-train"))
    write_json(out / "stats.json", stats)
    shutil.rmtree(staging)
    log.info("stored %d of %d images: %d dead links, %d undecodable",
             stats["stored"], stats["urls"], stats["dead_links"], stats["corrupt"])
    return stats
