"""The `data` stage: img2dataset turns the caption list into webdataset shards, with an exact account of losses.

img2dataset writes into a staging folder outside the stage's declared output, in incremental mode, so a killed
download resumes where it stopped; a fingerprint of the caption list and the download settings guards against
resuming into shards made from something else. When it finishes, every shard is rewritten in key order with
every image decoded once more (a sample that fails is removed and counted), the per-URL status img2dataset
records is tallied into dead links and undecodable files (`downloads.tsv`, `stats.json`), and the shards are
linked into the output with a wids index. Every request goes through the egress proxy (`egress`: address policy,
deadline, size cap), and images are turned upright and brought to 8 bits before img2dataset resizes them
(`decode`).

The output is built whole before it is published (one rename, by the caller), and the staging folder stays until
then, so a kill at any point leaves either the previous output or the complete new one, and a rerun finds its
staging intact. The counts come from what is on disk: a sample is stored if its shard holds it, and the stage
refuses to publish counts that disagree with the shards or the caption list.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from dinorankclip.data.decode import count_fixes, upright_images
from dinorankclip.data.egress import AddressPolicy, Limits, egress_proxy, routed_through
from dinorankclip.data.server import serve_directory
from dinorankclip.data.source import VALIDATION_TSV
from dinorankclip.io import fingerprint, prepare_staging, write_json

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def run_img2dataset(tsv: Path, staging: Path, data: dict) -> None:
    """img2dataset over the caption list; its timeout is only a backstop, as the egress proxy it is routed through
    enforces `data.timeout` and `data.deadline` on every request."""
    from img2dataset import download  # heavy import (albumentations, cv2): only where it is used

    download(
        url_list=str(tsv), input_format="tsv", url_col="url", caption_col="caption",
        output_format="webdataset", output_folder=str(staging / "shards"), incremental_mode="incremental",
        image_size=data["image_size"], resize_mode=data["resize_mode"], encode_quality=data["encode_quality"],
        processes_count=data["processes"], thread_count=data["threads"], timeout=data["deadline"] + data["timeout"],
        retries=data["retries"], number_sample_per_shard=data["shard_size"],
        distributor="multiprocessing", enable_wandb=False,
    )


@contextlib.contextmanager
def guarded_download(cfg: dict, source_dir: Path) -> Iterator[None]:
    """The world the download runs in: every request through the egress proxy (address policy, deadline, size
    cap), and for the demo its local server, the one loopback address allowed without a `data.allow` entry."""
    data, source = cfg["data"], cfg["source"]
    allow = list(data.get("allow", []))
    server = contextlib.nullcontext()
    if source["kind"] == "demo_world":
        allow.append(f"127.0.0.1:{source['port']}")
        server = serve_directory(source_dir / "www", source["port"])
    policy = AddressPolicy.parse(allow)
    limits = Limits(deadline=data["deadline"], timeout=data["timeout"], max_bytes=data["max_bytes"])
    with server, egress_proxy(policy, limits, processes=data["processes"]) as proxy, routed_through(proxy.url):
        yield
    counts = proxy.counts
    log.info("egress: %d http requests, %d https tunnels; %d refused by the address policy, %d unreachable, "
             "%d past data.deadline, %d silent past data.timeout, %d over data.max_bytes", counts["http"],
             counts["https"], counts["refused"], counts["unreachable"], counts["deadline"], counts["idle"],
             counts["too_large"])


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


def forget_lost_shards(shard_dir: Path) -> None:
    """Make img2dataset redo every shard whose record says done but whose tar is gone.

    In incremental mode img2dataset skips a shard once its `<shard>_stats.json` exists; without the tar, the
    shard's images would be counted from its parquet file and never stored.
    """
    for done in sorted(shard_dir.glob("*_stats.json")):
        shard = done.name.removesuffix("_stats.json")
        if not (shard_dir / f"{shard}.tar").exists():
            log.warning("staging shard %s is recorded as done but its tar is missing; downloading it again", shard)
            done.unlink()
            (shard_dir / f"{shard}.parquet").unlink(missing_ok=True)


def url_outcomes(shard_dir: Path) -> pd.DataFrame:
    """One row per URL of the caption list, in key order: key, url, img2dataset status, error message, the sha256
    of the downloaded bytes, shard."""
    tables = []
    for parquet in sorted(shard_dir.glob("*.parquet")):
        if not parquet.with_suffix(".tar").exists():
            raise RuntimeError(f"{parquet} records downloads but {parquet.with_suffix('.tar').name} is missing; "
                               f"remove {shard_dir.parent} and run the data stage again")
        table = pd.read_parquet(parquet, columns=["key", "url", "status", "error_message", "sha256"])
        tables.append(table.assign(shard=parquet.with_suffix(".tar").name))
    table = pd.concat(tables, ignore_index=True)
    table["error_message"] = table["error_message"].fillna("").str.strip()
    return table.sort_values("key", ignore_index=True)


def shard_keys(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        return {m.name.split(".", 1)[0] for m in tar if m.isfile()}


def tally(table: pd.DataFrame, shards: list[Path], fixes_dir: Path) -> dict:
    """What was stored (the samples the shards hold), what was lost and why, and how many stored images were
    fixed before they were resized (`decode`: EXIF orientation, 16-bit samples).

    A download img2dataset recorded as a success whose sample the shard no longer holds was removed by the
    verification pass; a sample in a shard without a recorded success means the staging folder is inconsistent.
    """
    held = {shard.name: shard_keys(shard) for shard in shards}
    succeeded = table.loc[table["status"] == "success"].groupby("shard")["key"].agg(set).to_dict()
    removed = {}
    for name, keys in held.items():
        if stray := keys - succeeded.get(name, set()):
            raise RuntimeError(f"{name} holds samples with no recorded download ({sorted(stray)[:5]}); remove the "
                               "staging folder and run the data stage again")
        if lost := sorted(succeeded.get(name, set()) - keys):
            removed[name] = lost
    status = Counter(table["status"])
    errors = Counter(table.loc[table["status"] != "success", "error_message"].replace("", "unknown"))
    removed_count = sum(len(keys) for keys in removed.values())
    stored = set().union(*held.values())
    return {
        "urls": len(table),
        "stored": len(stored),
        "fixed": count_fixes(fixes_dir, table.loc[table["key"].isin(stored), "sha256"]),
        "dead_links": status.get("failed_to_download", 0),
        "corrupt": status.get("failed_to_resize", 0) + removed_count,
        "removed_after_verification": removed,
        "errors": dict(sorted(errors.items())),
    }


def caption_rows(tsv: Path) -> int:
    """Rows of a cleaned caption list (the header excluded): one per URL img2dataset must account for."""
    with open(tsv, newline="") as f:
        return sum(1 for _ in csv.reader(f, delimiter="\t")) - 1


def check_counts(stats: dict, index: dict, tsv: Path) -> None:
    """Refuse to publish counts that disagree with the shards or with the caption list."""
    indexed = sum(entry["nsamples"] for entry in index["shardlist"])
    expected = caption_rows(tsv)
    if stats["stored"] != indexed or stats["urls"] != expected or \
            stats["stored"] + stats["dead_links"] + stats["corrupt"] != stats["urls"]:
        raise RuntimeError(f"data stage counts do not add up: {expected} rows in {tsv}, {stats['urls']} download "
                           f"records, {indexed} samples in the shards, stats {stats}")


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link (no copy of the bytes, and `src` stays where a rerun looks for it), or a copy across devices."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def shard_index(shards: list[Path], name: str) -> dict:
    """A wids descriptor: each shard with its sample count, URLs relative to the descriptor."""
    entries = []
    for shard in shards:
        if keys := shard_keys(shard):
            entries.append({"url": f"shards/{shard.name}", "nsamples": len(keys), "filesize": shard.stat().st_size})
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": entries}


def build_shards(cfg: dict, source_dir: Path, staging: Path, out: Path) -> dict:
    """Download the training list into `staging`, verify, and write the complete output (shards, index, manifest,
    stats) into `out`; the study's validation list, when the source stage wrote one, likewise into `out/val`
    (staging `staging/val`, started afresh with the training staging), with its stats under `validation`.

    `staging` is left in place: the caller removes it once `out` is published.
    """
    stats = build_split(cfg, source_dir, source_dir / "train.tsv", staging, out, "train")
    if (source_dir / VALIDATION_TSV).is_file():
        (out / "val").mkdir()
        stats["validation"] = build_split(cfg, source_dir, source_dir / VALIDATION_TSV, staging / "val", out / "val",
                                          "validation")
        write_json(out / "stats.json", stats)
    return stats


def build_split(cfg: dict, source_dir: Path, tsv: Path, staging: Path, out: Path, split: str) -> dict:
    """One caption list downloaded into `staging` and written, verified, into `out` (see `build_shards`)."""
    data = cfg["data"]
    prepare_staging(staging, fingerprint([tsv], data))
    shard_dir = staging / "shards"
    forget_lost_shards(shard_dir)
    with guarded_download(cfg, source_dir), upright_images(staging / "fixes"):
        run_img2dataset(tsv, staging, data)

    shards = sorted(shard_dir.glob("*.tar"))
    normalize_shards(shards, data["processes"])
    outcomes = url_outcomes(shard_dir)
    stats = tally(outcomes, shards, staging / "fixes")
    if stats["stored"] == 0:
        raise RuntimeError(f"no image of {tsv} could be downloaded; see {shard_dir}/*.parquet for the errors")

    (out / "shards").mkdir()
    for shard in shards:
        link_or_copy(shard, out / "shards" / shard.name)
    index = shard_index(sorted((out / "shards").glob("*.tar")), f"{cfg['study']}-{split}")
    check_counts(stats, index, tsv)
    outcomes.drop(columns=["shard", "sha256"]).to_csv(out / "downloads.tsv", sep="\t", index=False)
    write_json(out / "shards.json", index)
    write_json(out / "stats.json", stats)
    log.info("%s: stored %d of %d images: %d dead links, %d undecodable; fixed before resizing: %s", split,
             stats["stored"], stats["urls"], stats["dead_links"], stats["corrupt"], stats["fixed"])
    return stats
