"""The stock `clip_benchmark eval`, installed as a user would (its own environment, a numpy it supports), gives
the same metrics as the pipeline's evaluation on the same exported demo checkpoint and demo suites.

Our environment needs numpy >= 2.4, where clip-benchmark 1.6.2's classification `accuracy()` breaks, so the
pipeline re-computes the classification metrics (`dinorankclip.eval.zeroshot`); this test is the proof that the
re-computation, the dataset plumbing and the export agree with the unmodified tool. The environment is built once
per checkout under .tools/ (git-ignored) with uv, and rebuilt when its requirements change.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import REPO, repo_params, tiny_world_cfg

from dinorankclip.config import benchmark_name
from dinorankclip.data import world
from dinorankclip.data.demo_world import write_demo_world
from dinorankclip.eval.suites import evaluate_run
from dinorankclip.losses.contrastive import clip_loss
from dinorankclip.models.clip import create_clip, export_local_dir
from dinorankclip.tracking import NullTracker

pytestmark = pytest.mark.stock_env

ENV = REPO / ".tools" / "clip-benchmark-env"
SUITES = repo_params()["studies"]["demo"]["evaluate"]["suites"]


def requirements() -> list[str]:
    """clip-benchmark as our lock pins it and a numpy it supports; torch, torchvision and open_clip as our lock pins
    them, so both sides run the same model code and uv hardlinks the GBs of torch from its cache. clip-benchmark
    1.6.2 imports requests (datasets/imagenetv2.py) without declaring it, and transformers 5 no longer brings it."""
    pins = [f"{name}=={version(name)}" for name in ("clip-benchmark", "torch", "torchvision", "open_clip_torch")]
    return [*pins, "numpy<2.4", "requests"]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (f"`{' '.join(map(str, cmd))}` exited with {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def briefly_trained(arch: str, steps: int) -> open_clip.CLIP:
    """The demo's model after a few CLIP steps on demo-world scenes and alt-texts (~15 s). A random tower predicts
    one class for every image, so every metric is chance whatever the checkpoint; this one is above chance."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model, preprocess, _ = create_clip(arch)
    tokenizer = open_clip.get_tokenizer(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        scenes = [world.sample_scene(rng) for _ in range(64)]
        images = torch.stack([preprocess(world.render(scene, 64)) for scene in scenes])
        texts = tokenizer([world.alt_text(scene, rng) for scene in scenes])
        loss = clip_loss(model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True),
                         model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def stock_env() -> Path:
    """The separate environment, built on first use (seconds when uv's cache holds torch). The stamp is written
    last, so an interrupted build is rebuilt."""
    stamp, wanted = ENV / "requirements.txt", "\n".join(requirements()) + "\n"
    if not (stamp.is_file() and stamp.read_text() == wanted):
        uv = shutil.which("uv") or REPO / ".tools" / "bin" / "uv"  # where `make install` puts it when not on PATH
        shutil.rmtree(ENV, ignore_errors=True)
        run([uv, "venv", "--quiet", "--python", sys.executable, ENV])
        run([uv, "pip", "install", "--quiet", "--python", ENV / "bin" / "python", *requirements()])
        stamp.write_text(wanted)
    numpy = run([ENV / "bin" / "python", "-c", "import numpy; print(numpy.__version__)"]).stdout.strip()
    assert tuple(map(int, numpy.split(".")[:2])) < (2, 4), f"the stock environment has numpy {numpy}"
    return ENV


@pytest.fixture(scope="module")
def results(stock_env: Path, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """{benchmark: (pipeline's JSON, stock CLI's JSON)} for every demo suite, on one exported demo checkpoint."""
    root = tmp_path_factory.mktemp("stock-clip-benchmark")
    cfg = tiny_world_cfg("clip")
    cfg["source"]["world"].update(eval_size=60, retrieval_size=40)  # recalls @5 and @10 short of 1 on 40 pairs
    write_demo_world(root / "source", cfg["source"]["world"] | {"port": cfg["source"]["port"]}, cfg["study_seed"])
    ev = cfg["evaluate"] = {k: v for k, v in cfg["evaluate"].items() if k not in ("linear_probe", "modality_gap")}
    ev["dataset_root"] = str(root / "source" / "eval" / "wds_{dataset_cleaned}")

    (root / "model").mkdir()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(ev["threads"])  # tiny tensors on shared cores (see conftest.single_thread)
        export_local_dir(briefly_trained(cfg["model"]["arch"], steps=40), cfg["model"]["arch"], root / "model")
        evaluate_run(cfg, root / "model", root / "pipeline", NullTracker())
    finally:
        torch.set_num_threads(threads)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = str(ev["threads"])  # as the pipeline's torch.set_num_threads
    common = ["--model", f"local-dir:{root / 'model'}",  # open_clip's local-dir schema: config + weights of the export
              "--pretrained", root / "model",  # ignored by the local-dir schema; names the checkpoint in the JSON
              "--dataset_root", ev["dataset_root"], "--output", root / "stock" / "{dataset}.json",
              "--batch_size", ev["batch_size"], "--num_workers", ev["workers"], "--dump_classnames", "--quiet"]
    # the pipeline autocasts on CUDA only; the CLI's default autocasts on CPU too (to bfloat16)
    common += [] if torch.cuda.is_available() else ["--no_amp"]
    (root / "stock").mkdir()
    for task in ("zeroshot_classification", "zeroshot_retrieval"):
        suites = [s for s in SUITES if s["task"] == task]
        extra = ["--recall_k", *suites[0]["recall_k"]] if task == "zeroshot_retrieval" else []
        run([stock_env / "bin" / "clip_benchmark", "eval", "--task", task,
             "--dataset", *[s["dataset"] for s in suites], *common, *extra], env=env, timeout=300)

    def load(side: str, name: str) -> dict:
        return json.loads((root / side / f"{name}.json").read_text())

    return {name: (load("pipeline", name), load("stock", name))
            for name in (benchmark_name(s["dataset"]) for s in SUITES)}


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("name", [benchmark_name(s["dataset"]) for s in SUITES])
def test_stock_cli_gives_the_pipelines_metrics(results, name):
    """Exactly equal: both sides rank the same fp32 logits (same torch, open_clip and thread count) and count hits;
    acc5 is NaN on both for suites with fewer than 5 classes."""
    ours, stock = results[name]
    assert set(ours) == set(stock), "the pipeline's JSON is not in the schema of `clip_benchmark eval`"
    assert stock["metrics"].keys() == ours["metrics"].keys()
    differ = {k: (ours["metrics"][k], stock["metrics"][k]) for k in ours["metrics"]
              if not same(ours["metrics"][k], stock["metrics"][k])}
    assert not differ, f"{name}: metric (pipeline, stock CLI) differ: {differ}"
    assert {k: v for k, v in ours.items() if k not in ("model", "metrics")} == \
        {k: v for k, v in stock.items() if k not in ("model", "metrics")}


def test_the_checkpoint_is_above_chance(results):
    """Metrics at chance (a constant prediction) would match for any checkpoint, the wrong one included."""
    margins = {name: ours["metrics"]["acc1"] - 1 / len(ours["classnames"])
               for name, (ours, _) in results.items() if ours["task"] == "zeroshot_classification"}
    assert max(margins.values()) > 0.1, margins
