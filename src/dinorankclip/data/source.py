"""The `source` stage: obtain the caption list (generate the demo world, or fetch the CC3M TSV) and clean it.

Both studies end with the same artifact, `results/<study>/source/train.tsv` plus `source_stats.json`, so the
download stage downstream is one code path. The demo source also carries the images the local server will
serve and the evaluation suites.
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


def fetch(location: str, dest: Path) -> None:
    """Copy a local file or download an http(s)/file URL to `dest`, with a message naming what failed."""
    if "://" not in location:
        src = Path(location)
        if not src.is_file():
            raise FileNotFoundError(f"source.tsv: {src} does not exist (download the CC3M caption list there)")
        shutil.copyfile(src, dest)
        return
    log.info("downloading %s", location)
    try:
        with urllib.request.urlopen(location, timeout=60) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as err:
        raise OSError(f"source.tsv: could not download {location}: {err}") from err


def build_source(cfg: dict, out: Path) -> dict:
    """Write the study's source directory into `out` (a fresh directory); return its stats."""
    source = cfg["source"]
    stats: dict = {"kind": source["kind"]}
    raw = out / "raw.tsv"
    if source["kind"] == "demo_world":
        stats["planted"] = write_demo_world(out, source["world"] | {"port": source["port"]}, cfg["seed"])
    else:
        fetch(source["tsv"], raw)
    tsv_stats = clean_caption_list(raw, out / "train.tsv")
    stats.update(rows=tsv_stats.rows, kept=tsv_stats.kept, malformed=tsv_stats.malformed,
                 malformed_reasons=tsv_stats.reasons, duplicate_urls=tsv_stats.duplicate_urls,
                 repaired=tsv_stats.repaired)
    write_json(out / "source_stats.json", stats)
    return stats
