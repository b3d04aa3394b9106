"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint holds the trained modules, the optimizer, the step (the data position and the lr schedule are pure
functions of it), and every RNG state. It is written to a temporary file, fsynced, and renamed over
`latest.pt`, so a crash during the write leaves the previous checkpoint whole; the checkpoint it replaces stays
beside it as `previous.pt`. A file that cannot be read (truncated by a full disk, a partial copy) would fail
every retry the same way, so `resumable` sets it aside under a name that says so, logs where, and resumes from
`previous.pt` (or starts afresh). Checkpoints live under `results/<study>/state/`, never in a declared output:
Snakemake deletes the outputs of a failed job.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinorankclip.errors import InputError
from dinorankclip.faults import kill_point
from dinorankclip.io import atomic_file

log = logging.getLogger(__name__)
LATEST, PREVIOUS, BEST = "latest.pt", "previous.pt", "best.pt"


class CorruptCheckpoint(InputError):
    """A checkpoint file that torch cannot read back."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _keep_previous(path: Path) -> None:
    """`path` (whole, as every checkpoint is) also becomes previous.pt: a hard link, or a copy where the filesystem
    has none; replaced in one rename, so previous.pt too is always whole."""
    tmp = path.with_name(f".{PREVIOUS}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copy2(path, tmp)
    os.replace(tmp, path.with_name(PREVIOUS))


def save(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, then one rename: `path` is always a whole checkpoint. A
    `latest.pt` being replaced is kept as `previous.pt`."""
    if path.name == LATEST and path.exists():
        _keep_previous(path)
    with atomic_file(path) as f:
        torch.save(state, f)
    kill_point(f"checkpoint:{path.name}")


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path` (tensors memory-mapped, read as they are used), or None if there is none; a
    CorruptCheckpoint naming the file if torch cannot read it. Our own files: RNG states need full unpickling."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - whatever torch raises on a damaged file, the file is unusable
        raise CorruptCheckpoint(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(saved, dict):
        raise CorruptCheckpoint(f"{path}: holds a {type(saved).__name__}, not a checkpoint")
    return saved


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to `<name>.corrupt-<UTC time>.pt` beside it; return the new path."""
    dest = path.with_name(f"{path.stem}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}{path.suffix}")
    os.replace(path, dest)
    return dest


def resumable(state: Path, stamp: str, set_aside_corrupt: bool = True) -> dict[str, Any] | None:
    """The newest readable checkpoint in `state` written for `stamp` (a run fingerprint): latest.pt, else
    previous.pt; None when there is none, or when the newest readable one was written for other settings.

    An unreadable file is logged and, with `set_aside_corrupt` (one process of a job: rank 0), renamed aside, so
    the next retry does not meet it again."""
    for name in (LATEST, PREVIOUS):
        path = state / name
        try:
            saved = load(path)
        except CorruptCheckpoint as err:
            where = f"; set aside as {set_aside(path).name}" if set_aside_corrupt else ""
            log.error("%s%s; trying the one before it", err, where)
            continue
        if saved is None:
            continue
        if saved.get("fingerprint") != stamp:
            log.warning("%s was written for other settings or data; starting afresh", path)
            return None
        if name == PREVIOUS:
            log.warning("resuming from %s (step %s): the newer checkpoint was unreadable or missing", path,
                        saved["progress"]["step"])
        return saved
    return None
