"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint holds the trained modules, the optimizer, the step (the data position and the lr schedule are pure
functions of it), and every RNG state. It is written to a temporary file, fsynced, and renamed over
`latest.pt`, so a crash during the write leaves the previous checkpoint whole. Checkpoints live under
`results/<study>/state/`, never in a declared output: Snakemake deletes the outputs of a failed job.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinorankclip.io import atomic_file

log = logging.getLogger(__name__)
LATEST, BEST = "latest.pt", "best.pt"


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


def save(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, then one rename: `path` is always a whole checkpoint."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none. Our own files: RNG states need full unpickling."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
