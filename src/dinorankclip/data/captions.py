"""The `captions` stage: a second caption per training image, joined to the shards by key.

ALIP trains on (image, raw alt-text, synthetic caption) and TIPSv2 samples captions of several granularities, so
both need a second text per image. It comes from a caption file a user made with any captioner (for the demo,
the world's complete scene description): a TSV whose header names the join column — `key<TAB>caption` (the
shard sample key) or `url<TAB>caption` (the image URL, which img2dataset keeps in each sample's .json and which
survives a re-download under other keys). The stage writes one caption shard per image shard, sample i beside
image i with the same key (the layout of the teacher cache), so the loader reads them side by side. An image the
file does not cover keeps its raw caption as its second text (marked `raw` in the shard); coverage, unused
entries and malformed rows are counted in `coverage.json`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from dinorankclip.data.loader import open_shards
from dinorankclip.data.tsv import BARE_CR, NON_UTF8, REPAIRS, read_lines
from dinorankclip.io import read_json, write_json

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


def build_captions(cfg: dict, data_dir: Path, out: Path) -> dict:
    """Caption shards beside the image shards of `data_dir`, and the coverage counts, into `out`."""
    column, captions, stats = read_caption_file(Path(cfg["captions"]["file"]))
    index = read_json(data_dir / "shards.json")
    samples = open_shards(data_dir / "shards.json")
    (out / "captions").mkdir()
    used, covered, position = set(), 0, 0
    progress = tqdm(total=len(samples), desc="captions: join", unit="img", mininterval=5)
    for entry in index["shardlist"]:
        dest = out / "captions" / Path(entry["url"]).name
        tmp = dest.with_name(f".{dest.name}.tmp")
        with wds.TarWriter(str(tmp), mtime=0) as sink:
            for i in range(position, position + entry["nsamples"]):
                sample = samples[i]
                key = join_key(sample, column)
                found = key in captions
                if found:
                    used.add(key)
                text = captions[key] if found else sample[".txt"].getvalue().decode("utf-8")
                sink.write({"__key__": sample["__key__"], "txt": text, "source.txt": "synthetic" if found else "raw"})
                covered += found
        os.replace(tmp, dest)
        position += entry["nsamples"]
        progress.update(entry["nsamples"])
    progress.close()
    write_json(out / "captions.json", {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                       "name": f"{cfg['study']}-captions", "shardlist": [
                                           {"url": f"captions/{Path(e['url']).name}", "nsamples": e["nsamples"]}
                                           for e in index["shardlist"]]})
    stats.update(join_column=column, images=position, covered=covered, missing=position - covered,
                 coverage=covered / position if position else 0.0, unused_entries=len(captions) - len(used))
    if stats["missing"]:
        log.warning("captions: %d of %d images have no entry in %s; they keep their raw caption", stats["missing"],
                    position, cfg["captions"]["file"])
    write_json(out / "coverage.json", stats)
    log.info("captions: %d of %d images covered (%.1f%%), %d unused entries, %d malformed rows", covered, position,
             100 * stats["coverage"], stats["unused_entries"], stats["malformed_rows"])
    return stats
