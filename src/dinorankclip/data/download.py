"""The `data` stage: img2dataset turns the caption list into webdataset shards, with an exact account of losses.

img2dataset writes into a staging folder outside the stage's declared output, in incremental mode, so a killed
download resumes where it stopped; a fingerprint of the caption list and the download settings guards against
resuming into shards made from something else. When it finishes, every shard is rewritten in key order with
every image decoded once more (a sample that fails is removed and counted), the per-URL status img2dataset
records is tallied into dead links and undecodable files (`downloads.tsv`, `stats.json`), and the shards move
into the output with a wids index.
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


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # PIL refuses truncated data by default
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means the sample is unusable
        return False


def normalize_shard(shard: Path) -> list[str]:
    """Rewrite `shard` with its samples in key order and fixed tar headers, dropping samples whose image does
    not decode; return the dropped keys.

    img2dataset writes samples in the order its threads finish, so the same download gives different tars;
    sorted, byte-identical shards make a sample's position (what the loader indexes) a function of its key.
    """
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    samples: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members:
        samples.setdefault(name.split(".", 1)[0], []).append((name, data))
    bad = sorted(key for key, files in samples.items()
                 if not any(n.lower().endswith(IMAGE_EXTENSIONS) and _decodes(d) for n, d in files))
    tmp = shard.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as out:
        for key in sorted(set(samples) - set(bad)):
            for name, data in sorted(samples[key]):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o444
                out.addfile(info, io.BytesIO(data))
    os.replace(tmp, shard)
    return bad


def normalize_shards(shards: list[Path], processes: int) -> dict[str, list[str]]:
    """`normalize_shard` over all shards in parallel; returns {shard name: dropped keys} for shards that lost any."""
    with ProcessPoolExecutor(max_workers=max(1, processes)) as pool:
        bad = dict(zip([s.name for s in shards], pool.map(normalize_shard, shards), strict=True))
    for name, keys in bad.items():
        if keys:
            log.warning("%s: %d samples do not decode; removed: %s", name, len(keys), keys)
    return {name: keys for name, keys in bad.items() if keys}


def url_outcomes(shard_dir: Path) -> pd.DataFrame:
    """One row per URL of the caption list, in key order: key, url, img2dataset status, error message."""
    table = pd.concat([pd.read_parquet(p, columns=["key", "url", "status", "error_message"])
                       for p in sorted(shard_dir.glob("*.parquet"))], ignore_index=True)
    table["error_message"] = table["error_message"].fillna("").str.strip()
    return table.sort_values("key", ignore_index=True)


def tally(table: pd.DataFrame, removed: dict[str, list[str]]) -> dict:
    """What was stored, what was lost and why."""
    status = Counter(table["status"])
    errors = Counter(table.loc[table["status"] != "success", "error_message"].replace("", "unknown"))
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
    removed = normalize_shards(shards, data["processes"])
    outcomes = url_outcomes(shard_dir)
    stats = tally(outcomes, removed)
    if stats["stored"] == 0:
        raise RuntimeError(f"no image of {tsv} could be downloaded; see {shard_dir}/*.parquet for the errors")

    (out / "shards").mkdir()
    for shard in shards:
        os.replace(shard, out / "shards" / shard.name)
    outcomes.to_csv(out / "downloads.tsv", sep="\t", index=False)
    write_json(out / "shards.json", shard_index(sorted((out / "shards").glob("*.tar")), f"{cfg['study']}-train"))
    write_json(out / "stats.json", stats)
    shutil.rmtree(staging)
    log.info("stored %d of %d images: %d dead links, %d undecodable",
             stats["stored"], stats["urls"], stats["dead_links"], stats["corrupt"])
    return stats
