"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_world_cfg() -> dict:
    """The demo study resolved with a 40-image world (3 dead links, 4 undecodable files) on a free port."""
    from dinorankclip.config import resolve

    cfg = resolve(repo_params(), "demo")
    cfg["source"]["port"] = free_port()
    cfg["source"]["world"].update(train_scenes=40, eval_size=24, retrieval_size=10, dead_links=3,
                                  corrupt_files=4, malformed_rows=4)
    cfg["data"].update(shard_size=16, processes=1, threads=4)
    return cfg


def snapshot_repo(dest: Path) -> Path:
    """A fresh git clone of the working tree as it is now (tracked and untracked-but-not-ignored files)."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def venv_env() -> dict:
    """The environment with the project's venv first on PATH, as the Makefile sets it."""
    import os

    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("DINORANKCLIP_PARAMS_JSON", None)
    return env
