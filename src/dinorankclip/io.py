"""Atomic writes: a killed job leaves either the previous artifact or none, never a half-written one.

Temporary files and folders are created with the modes the user's umask gives (not the 0600/0700 of `tempfile`),
so outputs on a shared cluster filesystem are as readable to the group as anything else the user writes.
"""

from __future__ import annotations

import contextlib
import filecmp
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)


def _temporary_name(path: Path) -> Path:
    """A hidden name beside `path` (`.<name>.tmp-<random>`) for the temporary that will be renamed over it."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


def remove_leftovers(final: Path) -> None:
    """Remove the temporary folders of `final` that a killed job left behind (one job writes an output at a time:
    Snakemake and DVC lock their outputs)."""
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        log.info("removing %s, left by a job that was killed while writing %s", leftover, final)
        shutil.rmtree(leftover, ignore_errors=True)


# Files a workflow tool keeps inside an output folder for its own bookkeeping, not part of the stage's result.
TOOL_FILES = frozenset({".snakemake_timestamp"})


def same_tree(a: Path, b: Path) -> bool:
    """Whether folders `a` and `b` hold the same files with the same bytes (tool bookkeeping files aside)."""
    def listing(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in TOOL_FILES)

    files = listing(a)
    return files == listing(b) and all(filecmp.cmp(a / name, b / name, shallow=False) for name in files)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; on success it replaces `final` in one rename. When `final`
    already holds exactly what was written (a rerun of unchanged work: DVC keeps outputs in place, `persist`), the
    existing folder stays, with its times and Snakemake's timestamp, and the new copy is dropped.

    Leftovers of an earlier killed attempt at `final` are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = _temporary_name(final)
    tmp.mkdir(mode=0o777)  # the umask applies
    try:
        yield tmp
        if final.is_dir() and same_tree(tmp, final):
            log.info("%s: unchanged, kept as it was", final)
            return
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file beside it, fsynced and renamed over `path` when the
    block ends; removed, leaving `path` as it was, if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def report_json(report: Any, out: str | os.PathLike | None) -> None:
    """A benchmark's report: written (atomically) to `out` when given, and printed on stdout."""
    if out is not None:
        write_json(out, report)
    print(json.dumps(report, indent=2))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def fingerprint(files: list[str | os.PathLike], settings: Any) -> str:
    """sha256 over `settings` (as JSON) and the bytes of `files`: what a staging folder was built from."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def prepare_staging(staging: Path, stamp: str) -> None:
    """Reuse `staging` (resumable work outside a stage's declared output) only if it was built from `stamp`."""
    stamp_file = staging / "FINGERPRINT"
    if staging.exists() and (not stamp_file.exists() or stamp_file.read_text() != stamp):
        log.info("staging %s holds work on other inputs; starting afresh", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file whose bytes depend only on its contents, written atomically.

    safetensors keeps `__metadata__` in a hash map, so two saves of the same tensors with two or more metadata
    entries differ in key order from process to process, and DVC sees a changed file. The header is rewritten
    with the metadata sorted (tensor entries keep safetensors' own order; data offsets are relative to the end
    of the header, so its length may change), padded with spaces to 8 bytes as safetensors pads it."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(path, len(text).to_bytes(8, "little") + text + data[8 + length:])
