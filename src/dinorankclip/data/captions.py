"""The `captions` stage: a second caption per training image, beside the image shards and keyed like them.

ALIP trains on (image, raw alt-text, synthetic caption) and TIPSv2 samples captions of several granularities, so
both need a second text per image. `captions.source` says where it comes from:

- `file`: a caption file a user made with any captioner (for the demo, the world's complete scene description):
  a TSV whose header names the join column — `key<TAB>caption` (the shard sample key) or `url<TAB>caption` (the
  image URL, which img2dataset keeps in each sample's .json and which survives a re-download under other keys);
- `coca`: written here by open_clip's CoCa from local weights (`dinorankclip.models.captioner`), batched, on the
  GPU when there is one. Each finished shard is kept in a staging folder outside the declared output, so a
  killed job resumes without captioning those images again (as the teacher cache does).

Either way the stage writes one caption shard per image shard, sample i beside image i with the same key (the
layout of the teacher cache), so the loader reads them side by side. An image without a second caption (not in
the file, or an empty generated one) keeps its raw caption (marked `raw` in the shard); `coverage.json` counts
covered and missing images, and for a file its unused entries and malformed rows.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinorankclip.data.loader import decode_image, open_shards
from dinorankclip.data.tsv import BARE_CR, NON_UTF8, REPAIRS, read_lines
from dinorankclip.io import fingerprint, prepare_staging, read_json, write_json

log = logging.getLogger(__name__)
JOIN_COLUMNS = ("key", "url")
SHOWN = 5  # malformed lines named in the log


def read_caption_file(path: Path) -> tuple[str, dict[str, str], dict]:
    """(join column, {key or url: caption}, counts) from a caption TSV with a `key|url<TAB>caption` header."""
    if not path.is_file():
        raise FileNotFoundError(f"captions.file: {path} does not exist (a TSV with a 'url<TAB>caption' or "
                                f"'key<TAB>caption' header)")
    lines = list(read_lines(path))
    header = lines[0][1].split("\t") if lines else []
    if len(header) != 2 or header[0] not in JOIN_COLUMNS or header[1] != "caption":
        raise ValueError(f"captions.file: {path} line 1 must be the header 'url<TAB>caption' or "
                         f"'key<TAB>caption', not {lines[0][1]!r}" if lines else f"captions.file: {path} is empty")
    captions, malformed, duplicates = {}, [], 0
    repaired = {NON_UTF8: [], BARE_CR: []}
    for number, line, repairs in lines[1:]:
        for repair in repairs:
            repaired[repair].append(number)
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            malformed.append(number)
            continue
        key, caption = fields[0].strip(), fields[1].strip()
        duplicates += key in captions
        captions[key] = caption
    for what, numbers in [("malformed rows skipped", malformed), *((REPAIRS[k], v) for k, v in repaired.items())]:
        if numbers:
            log.warning("%s: %d rows: %s (lines %s%s)", path, len(numbers), what,
                        ", ".join(map(str, numbers[:SHOWN])), ", ..." if len(numbers) > SHOWN else "")
    return header[0], captions, {"rows": len(lines) - 1, "malformed_rows": len(malformed),
                                 "malformed_lines": malformed[:SHOWN], "duplicate_keys": duplicates,
                                 "repaired": {k: len(v) for k, v in repaired.items()}}


def join_key(sample: dict, column: str) -> str:
    """The value of the join column for one shard sample: its key, or the URL img2dataset recorded."""
    if column == "key":
        return sample["__key__"]
    return json.loads(sample[".json"].getvalue())["url"]


def write_caption_shard(dest: Path, rows: Iterable[tuple[str, str, str]]) -> None:
    """One caption shard of (key, second caption, `synthetic` or `raw`) samples, written whole or not at all."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for key, text, source in rows:
            sink.write({"__key__": key, "txt": text, "source.txt": source})
    os.replace(tmp, dest)


def join_file(cfg: dict, data_dir: Path, index: dict, out: Path) -> dict:
    """Caption shards from the study's caption file into `out/captions`; the counts of the join."""
    column, captions, stats = read_caption_file(Path(cfg["captions"]["file"]))
    samples = open_shards(data_dir / "shards.json")
    used, covered, position = set(), 0, 0
    progress = tqdm(total=len(samples), desc="captions: join", unit="img", mininterval=5)
    for entry in index["shardlist"]:
        rows = []
        for i in range(position, position + entry["nsamples"]):
            sample = samples[i]
            key = join_key(sample, column)
            if key in captions:
                used.add(key)
                rows.append((sample["__key__"], captions[key], "synthetic"))
            else:
                rows.append((sample["__key__"], sample[".txt"].getvalue().decode("utf-8"), "raw"))
        write_caption_shard(out / "captions" / Path(entry["url"]).name, rows)
        covered += sum(source == "synthetic" for _, _, source in rows)
        position += entry["nsamples"]
        progress.update(entry["nsamples"])
    progress.close()
    stats.update(join_column=column, covered=covered, unused_entries=len(captions) - len(used))
    log.info("captions: %d unused entries and %d malformed rows in %s", stats["unused_entries"],
             stats["malformed_rows"], cfg["captions"]["file"])
    return stats


class ShardImages(Dataset):
    """(key, raw caption, transformed image) of sample i of a wids shard index: what the captioner reads."""

    def __init__(self, index: Path, transform):
        self.samples, self.transform = open_shards(index), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, str, torch.Tensor]:
        sample = self.samples[i]
        return sample["__key__"], sample[".txt"].getvalue().decode("utf-8"), decode_image(sample, self.transform)


def tally(shard: Path) -> tuple[int, int]:
    """(samples, synthetic captions) in a caption shard."""
    with tarfile.open(shard) as tar:
        sources = [tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(".source.txt")]
    return len(sources), sources.count(b"synthetic")


def generate_captions(cfg: dict, data_dir: Path, index: dict, staging: Path, out: Path) -> dict:
    """Caption shards written by CoCa, shard by shard into `staging` (resumable), then moved to `out/captions`."""
    from dinorankclip.models.captioner import caption_images, load_captioner
    from dinorankclip.models.teacher import sha256

    coca = cfg["captions"]["coca"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(coca["threads"])
    model, transform, tokenizer = load_captioner(coca, device)
    decoding = {key: coca[key] for key in ("model", "max_length", "min_length")}
    prepare_staging(staging, fingerprint([data_dir / "shards.json", coca["weights"]], decoding))
    images = ShardImages(data_dir / "shards.json", transform)
    names = [Path(entry["url"]).name for entry in index["shardlist"]]
    done = sum(e["nsamples"] for e, name in zip(index["shardlist"], names, strict=True) if (staging / name).exists())
    progress = tqdm(total=len(images), initial=done, desc="captions: CoCa", unit="img", mininterval=5)
    start, computed, position = time.perf_counter(), 0, 0
    for entry, name in zip(index["shardlist"], names, strict=True):
        span = range(position, position + entry["nsamples"])
        position += entry["nsamples"]
        if (staging / name).exists():
            continue
        rows = []
        for keys, raw, batch in DataLoader(images, batch_size=coca["batch_size"], sampler=span,
                                           num_workers=coca["workers"]):
            texts = caption_images(model, tokenizer, batch.to(device), coca)
            rows += [(k, t, "synthetic") if t else (k, r, "raw") for k, r, t in zip(keys, raw, texts, strict=True)]
            progress.update(len(keys))
        write_caption_shard(staging / name, rows)
        computed += len(span)
    progress.close()
    seconds = time.perf_counter() - start
    covered = 0
    for entry, name in zip(index["shardlist"], names, strict=True):  # every shard checked before any leaves staging
        samples, synthetic = tally(staging / name)
        if samples != entry["nsamples"]:
            raise ValueError(f"{staging / name}: {samples} captions for the {entry['nsamples']} images of "
                             f"{entry['url']}; delete {staging} and rerun the captions stage")
        covered += synthetic
    for name in names:
        os.replace(staging / name, out / "captions" / name)
    return {"model": coca["model"], "weights": str(coca["weights"]), "sha256": sha256(Path(coca["weights"])),
            **decoding, "device": device.type, "covered": covered,
            "images_per_s": computed / seconds if computed else None}


def build_captions(cfg: dict, data_dir: Path, staging: Path, out: Path) -> dict:
    """Caption shards beside the image shards of `data_dir`, from `captions.source`, and the coverage counts,
    into `out`; `staging` holds the captioner's finished shards until all are done."""
    source = cfg["captions"]["source"]
    index = read_json(data_dir / "shards.json")
    (out / "captions").mkdir()
    if source == "file":
        stats = join_file(cfg, data_dir, index, out)
    else:
        stats = generate_captions(cfg, data_dir, index, staging, out)
    write_json(out / "captions.json", {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                       "name": f"{cfg['study']}-captions", "shardlist": [
                                           {"url": f"captions/{Path(e['url']).name}", "nsamples": e["nsamples"]}
                                           for e in index["shardlist"]]})
    images = sum(entry["nsamples"] for entry in index["shardlist"])
    stats.update(source=source, images=images, missing=images - stats["covered"],
                 coverage=stats["covered"] / images if images else 0.0)
    if stats["missing"]:
        log.warning("captions: %d of %d images have no second caption from %s; they keep their raw caption",
                    stats["missing"], images, cfg["captions"]["file"] if source == "file" else "the captioner")
    write_json(out / "coverage.json", stats)
    log.info("captions (%s): %d of %d images covered (%.1f%%)", source, stats["covered"], images,
             100 * stats["coverage"])
    return stats
