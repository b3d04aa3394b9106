"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


def only_runs(study: dict, runs: list[str], finetune_runs: dict[str, str]) -> dict:
    """Cut a study block down to `runs` and `finetune_runs`, dropping the seed lists of runs it no longer trains
    (the params check refuses seeds for a run the study does not train)."""
    study.update(runs=runs, finetune_runs=finetune_runs)
    if "seeds" in study:
        study["seeds"] = {name: seeds for name, seeds in study["seeds"].items() if name == "default" or name in runs}
    return study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_world_params() -> dict:
    """params.yaml with the demo study shrunk to a 40-image world (3 dead links, 4 undecodable files) on a free
    port."""
    params = repo_params()
    demo = params["studies"]["demo"]
    demo["source"]["port"] = free_port()
    demo["source"]["world"].update(train_scenes=40, eval_size=24, retrieval_size=10, probe_train_size=10,
                                   dead_links=3, corrupt_files=4, malformed_rows=4)
    demo["data"].update(shard_size=16, processes=1, threads=4)
    return params


def tiny_world_cfg(run: str | None = None) -> dict:
    """The demo study of `tiny_world_params`, resolved (for `run`'s first seed if given)."""
    from dinorankclip.config import resolve

    return resolve(tiny_world_params(), "demo", run)


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


def make_image_shards(data_dir, counts):
    """Shards of demo scenes under data_dir/shards with a wids index, like the data stage writes."""
    import io
    import json
    import random

    import webdataset as wds
    from PIL import Image

    from dinorankclip.data import world
    from dinorankclip.data.demo_world import jpeg_bytes
    from dinorankclip.io import write_json

    rng = random.Random(0)
    (data_dir / "shards").mkdir(parents=True)
    entries, images = [], {}
    for s, n in enumerate(counts):
        with wds.TarWriter(str(data_dir / "shards" / f"{s:05d}.tar"), mtime=0) as sink:
            for i in range(n):
                key, jpeg = f"{s:05d}{i:04d}", jpeg_bytes(world.render(world.sample_scene(rng), 64))
                images[key] = Image.open(io.BytesIO(jpeg)).convert("RGB")  # what the stage decodes
                sink.write({"__key__": key, "jpg": jpeg, "txt": f"a caption of {key}",
                            "json": json.dumps({"url": f"http://127.0.0.1/{key}.jpg", "key": key}).encode()})
        entries.append({"url": f"shards/{s:05d}.tar", "nsamples": n})
    write_json(data_dir / "shards.json", {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries})
    return images


TEACHER_SHAPE = (3, 8, 2, 2)  # blocks, channels, grid


def write_features(root, shards: dict[str, list[str]]):
    """A teacher cache whose patches encode their key: every value is int(key) / 1e9."""
    import numpy as np
    import webdataset as wds

    from dinorankclip.io import write_json

    (root / "features").mkdir(parents=True)
    entries = []
    for name, keys in shards.items():
        with wds.TarWriter(str(root / "features" / name), mtime=0) as sink:
            for key in keys:
                sink.write({"__key__": key, "cls.npy": np.zeros(8, np.float16),
                            "patches.npy": np.full(TEACHER_SHAPE, int(key) / 1e9, np.float16)})
        entries.append({"url": f"features/{name}", "nsamples": len(keys)})
    write_json(root / "features.json", {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries})
    write_json(root / "stats.json", {"patch_channels": TEACHER_SHAPE[1]})
    return root / "features.json"


def reduced_study(clone: Path, port: int) -> dict:
    """Shrink the demo study in a clone's own params.yaml to the smallest one that still has every stage:
    one pretraining run (`clip`, one seed) and its KUEA fine-tuning, on a 1,000-scene world, with per-step log
    lines, and its dvc.yaml. The report's comparison tables are skipped by the report stage itself (their runs are
    not in the study)."""
    from dinorankclip.dvc_yaml import render

    params = repo_params()
    demo = params["studies"]["demo"]
    only_runs(demo, ["clip"], {"clip-kuea": "clip"})  # the study's own lists; the registry stays
    demo["seeds"] = {"default": [0]}  # one seed: the multi-seed paths are the full demo's (test_demo_e2e.py)
    demo["source"]["port"] = port
    demo["source"]["world"].update(train_scenes=1000, eval_size=100, retrieval_size=100, probe_train_size=60,
                                   dead_links=2, corrupt_files=2, malformed_rows=2)
    demo["data"].update(shard_size=250)
    demo["teacher"]["train"].update(epochs=1)
    demo["teacher"].update(pca_sample=200)
    demo["finetune"].update(fit_samples=128, steps=10, batch_size=32, warmup_steps=2, log_every=5)
    demo["pretrain"].update(epochs=2, batch_size=32, warmup_steps=5, val_samples=128, log_every=1)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (clone / "dvc.yaml").write_text(render(params))  # DVC's view of the reduced study (`dinorankclip dvc-yaml`)
    return params


def evaluation_json_count(clone: Path, study: str = "demo") -> int:
    """The JSONs the evaluate stage writes in a clone's study: per evaluated run, one per zero-shot suite, one per
    linear-probe dataset and one for the modality gap."""
    from dinorankclip.config import evaluated_runs, seeded

    params = yaml.safe_load((clone / "params.yaml").read_text())
    ev = params["studies"][study]["evaluate"]
    per_run = len(ev["suites"]) + len(ev.get("linear_probe", {}).get("datasets", [])) + bool(ev.get("modality_gap"))
    return per_run * len(seeded(params, evaluated_runs(params, study), study))


def snakemake(clone: Path, args: list[str], timeout: int, log: Path | None = None) -> str:
    """`snakemake <args>` in a clone with the project's venv, under `timeout -k` (the SLURM plugin can hang
    ignoring SIGTERM); its output goes to `log` (default: clone/snakemake.log) and is returned."""
    import subprocess

    log = log or clone / "snakemake.log"
    with open(log, "w") as out:
        rc = subprocess.run(["timeout", "-k", "10", str(timeout), "snakemake", *args], cwd=clone, env=venv_env(),
                            stdout=out, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    assert rc == 0, f"snakemake {' '.join(args)} exited {rc} in {clone}:\n{text[-4000:]}"
    return text


def copy_clone(src: Path, dest: Path) -> Path:
    """A copy of a clone with its results and Snakemake metadata (times kept, so nothing looks outdated)."""
    import shutil

    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    return dest
