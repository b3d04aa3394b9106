"""The CC3M caption list: two tab-separated columns (caption, url), no header, as Google distributes it.

Rows that cannot be a training pair (wrong column count, empty caption, not an http(s) URL) are dropped, each
reported with its line number, so a bad list degrades the dataset by exactly those rows and says so. A URL listed
again is dropped and counted (its image would be stored twice, under two captions). Rows break at LF only (CRLF is
accepted): a bare CR inside a caption becomes a space instead of splitting the row, and bytes that are not UTF-8
become U+FFFD; both repairs are counted.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)
MAX_REPORTED = 20
NON_UTF8, BARE_CR = "non_utf8", "bare_cr"
REPAIRS = {NON_UTF8: "bytes that are not UTF-8 replaced by U+FFFD", BARE_CR: "a CR inside the row replaced by a space"}


def read_lines(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, text, repairs) for each line of a text file, split at LF only (a CRLF ending is removed).

    Repairs name what was changed to read the line: `non_utf8` (undecodable bytes replaced by U+FFFD) and
    `bare_cr` (a CR inside the line replaced by a space). A UTF-8 byte order mark before the first line is dropped.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):  # a binary file splits at b"\n" only
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            repairs = []
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                repairs.append(NON_UTF8)
            if "\r" in text:
                text = text.replace("\r", " ")
                repairs.append(BARE_CR)
            yield number, text, repairs


@dataclass
class TsvStats:
    rows: int = 0
    kept: int = 0
    malformed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    duplicate_urls: int = 0
    repaired: dict[str, int] = field(default_factory=lambda: {NON_UTF8: 0, BARE_CR: 0})

    def reject(self, line: int, reason: str) -> None:
        self.malformed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.malformed <= MAX_REPORTED:
            log.warning("caption list line %d: %s; row dropped", line, reason)

    def repair(self, line: int, repairs: list[str]) -> None:
        for repair in repairs:
            self.repaired[repair] += 1
            if self.repaired[repair] <= MAX_REPORTED:
                log.warning("caption list line %d: %s", line, REPAIRS[repair])


def _problem(fields: list[str]) -> str | None:
    if len(fields) != 2:
        return f"expected 2 tab-separated columns (caption, url), found {len(fields)}"
    caption, url = fields
    if not caption.strip():
        return "empty caption"
    if "\ufffd" in url:
        return "url holds bytes that are not UTF-8"
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return "url is not an http(s) address"
    return None


def clean_caption_list(raw: Path, out: Path) -> TsvStats:
    """Copy the valid rows of `raw` to `out` with the header img2dataset reads (`caption`, `url`), each URL once."""
    stats, seen = TsvStats(), set()
    with open(out, "w", newline="") as dst:
        writer = csv.writer(dst, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["caption", "url"])
        for number, line, repairs in read_lines(raw):
            if not line:
                continue
            stats.rows += 1
            stats.repair(number, repairs)
            fields = line.split("\t")
            reason = _problem(fields)
            if reason:
                stats.reject(number, reason)
                continue
            caption, url = fields[0].strip(), fields[1].strip()
            digest = hashlib.blake2b(url.encode(), digest_size=16).digest()  # 16 bytes a URL, not the URL
            if digest in seen:
                stats.duplicate_urls += 1
                continue
            seen.add(digest)
            writer.writerow([caption, url])
            stats.kept += 1
    if stats.malformed > MAX_REPORTED:
        log.warning("%d more malformed rows not listed", stats.malformed - MAX_REPORTED)
    log.info("caption list %s: %d rows, %d kept, %d malformed, %d repeated URLs dropped, %d with non-UTF-8 bytes "
             "replaced, %d with a bare CR replaced", raw, stats.rows, stats.kept, stats.malformed,
             stats.duplicate_urls, stats.repaired[NON_UTF8], stats.repaired[BARE_CR])
    if stats.kept == 0:
        raise ValueError(f"{raw}: no valid (caption, url) rows among {stats.rows}")
    return stats
