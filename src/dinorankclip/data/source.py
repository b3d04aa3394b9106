"""The `source` stage: obtain the caption list (generate the demo world, or fetch the CC3M TSV) and clean it.

Both studies end with the same artifact, `results/<study>/source/train.tsv` plus `source_stats.json`, so the
download stage downstream is one code path; a study that names its own validation list (`source.validation_tsv`:
CC3M's, in the training list's layout) also gets `validation.tsv`, downloaded by the same stage into `data/val/`.
The demo source also carries the images the local server will serve and the evaluation suites.
"""

from __future__ import annotations

import logging
import shutil
import urllib.request
from pathlib import Path

from dinorankclip.data.demo_world import write_demo_world
from dinorankclip.data.tsv import clean_caption_list
from dinorankclip.io import write_json

log = logging.getLogger(__name__)
VALIDATION_TSV = "validation.tsv"  # the cleaned validation list, when the study names one (`source.validation_tsv`)


def fetch(location: str, dest: Path, key: str = "source.tsv") -> None:
    """Copy a local file or download an http(s)/file URL to `dest`, with a message naming the key and what
    failed."""
    if "://" not in location:
        src = Path(location)
        if not src.is_file():
            raise FileNotFoundError(f"{key}: {src} does not exist (download the CC3M caption list there)")
        shutil.copyfile(src, dest)
        return
    log.info("downloading %s", location)
    try:
        with urllib.request.urlopen(location, timeout=60) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as err:
        raise OSError(f"{key}: could not download {location}: {err}") from err


def list_stats(tsv_stats) -> dict:
    return dict(rows=tsv_stats.rows, kept=tsv_stats.kept, malformed=tsv_stats.malformed,
                malformed_reasons=tsv_stats.reasons, duplicate_urls=tsv_stats.duplicate_urls,
                repaired=tsv_stats.repaired)


def build_source(cfg: dict, out: Path) -> dict:
    """Write the study's source directory into `out` (a fresh directory); return its stats."""
    source = cfg["source"]
    stats: dict = {"kind": source["kind"]}
    raw = out / "raw.tsv"
    if source["kind"] == "demo_world":
        stats["planted"] = write_demo_world(out, source["world"] | {"port": source["port"]}, cfg["seed"])
    else:
        fetch(source["tsv"], raw)
    stats.update(list_stats(clean_caption_list(raw, out / "train.tsv")))
    if source.get("validation_tsv"):  # the study's own validation pairs (CC3M's validation list), for §6a
        fetch(source["validation_tsv"], out / "raw_validation.tsv", "source.validation_tsv")
        stats["validation"] = list_stats(clean_caption_list(out / "raw_validation.tsv", out / VALIDATION_TSV))
    write_json(out / "source_stats.json", stats)
    return stats
