"""The CC3M caption list: two tab-separated columns (caption, url), no header, as Google distributes it.

Rows that cannot be a training pair (wrong column count, empty caption, not an http(s) URL) are dropped, each
reported with its line number, so a bad list degrades the dataset by exactly those rows and says so.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)
MAX_REPORTED = 20


@dataclass
class TsvStats:
    rows: int = 0
    kept: int = 0
    malformed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def reject(self, line: int, reason: str) -> None:
        self.malformed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.malformed <= MAX_REPORTED:
            log.warning("caption list line %d: %s; row dropped", line, reason)


def _problem(fields: list[str]) -> str | None:
    if len(fields) != 2:
        return f"expected 2 tab-separated columns (caption, url), found {len(fields)}"
    caption, url = fields
    if not caption.strip():
        return "empty caption"
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return "url is not an http(s) address"
    return None


def clean_caption_list(raw: Path, out: Path) -> TsvStats:
    """Copy the valid rows of `raw` to `out` with the header img2dataset reads (`caption`, `url`)."""
    stats = TsvStats()
    with open(raw, encoding="utf-8", errors="replace", newline="") as src, open(out, "w", newline="") as dst:
        writer = csv.writer(dst, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["caption", "url"])
        for number, line in enumerate(src, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            stats.rows += 1
            fields = line.split("\t")
            reason = _problem(fields)
            if reason:
                stats.reject(number, reason)
                continue
            writer.writerow([fields[0].strip(), fields[1].strip()])
            stats.kept += 1
    if stats.malformed > MAX_REPORTED:
        log.warning("%d more malformed rows not listed", stats.malformed - MAX_REPORTED)
    if stats.kept == 0:
        raise ValueError(f"{raw}: no valid (caption, url) rows among {stats.rows}")
    return stats
