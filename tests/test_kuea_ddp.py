"""KUEA fine-tuning under torchrun: two gloo ranks, each on its half of every global batch, train the weights one
process trains on the whole batch, and only rank 0 writes the stage's output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, make_image_shards, repo_params
from safetensors.torch import load_file, save_file

from dinorankclip.config import resolve
from dinorankclip.data import features
from dinorankclip.layout import stage_dir
from dinorankclip.models.clip import WEIGHTS_FILE, create_clip, export_local_dir
from dinorankclip.models.teacher import WEIGHTS_FILE as TEACHER_WEIGHTS
from dinorankclip.models.teacher import create_teacher

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("_kuea_ddp_worker.py")
STUDY, RUN = "t", "clip-kuea"
pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun not found next to python ({TORCHRUN})")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A directory holding what the finetune stage of the demo's clip-kuea reads (24 images in 2 shards, a random
    teacher's cache, a random demo-rn-tiny start: a ResNet tower with batch norm), and the resolved config."""
    root = tmp_path_factory.mktemp("kuea-ddp")
    cfg = resolve(repo_params(), "demo", RUN) | {"study": STUDY}
    cfg["teacher"].update(batch_size=8, threads=1)
    cfg["finetune"].update(steps=4, batch_size=8, fit_samples=16, log_every=1, lr=1e-3, warmup_steps=1, threads=1,
                           workers=0)
    results = root / stage_dir(STUDY, "data").parent
    make_image_shards(results / "data", [12, 12])
    torch.manual_seed(1)
    (results / "teacher_weights").mkdir()
    save_file(create_teacher(cfg["teacher"]).state_dict(), str(results / "teacher_weights" / TEACHER_WEIGHTS))
    (results / "teacher").mkdir()
    features.build_feature_cache(cfg, results / "data", results / "teacher_weights", root / "staging",
                                 results / "teacher")
    torch.manual_seed(3)
    start = root / stage_dir(STUDY, "pretrain", cfg["finetune"]["start_run"], cfg["seed"]) / "model"
    start.mkdir(parents=True)
    export_local_dir(create_clip(cfg["model"]["arch"])[0].eval(), cfg["model"]["arch"], start)
    (root / "cfg.json").write_text(json.dumps(cfg))
    return root, start


def finetune(root: Path, world: int) -> Path:
    """Run the stage on `world` ranks; its output, moved aside (the next run writes the same path)."""
    cmd = [str(TORCHRUN), "--nnodes=1", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), str(root / "cfg.json")]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    written = root / stage_dir(STUDY, "finetune", RUN)
    assert [p.name for p in written.iterdir()] == ["seed0"]  # one output, no other rank's temporary directory
    return shutil.move(root / stage_dir(STUDY, "finetune", RUN, 0), root / f"world{world}")


def test_two_ranks_train_the_weights_one_process_trains(study):
    root, start = study
    one, two = finetune(root, 1), finetune(root, 2)
    metrics = {w: json.loads((out / "metrics.json").read_text()) for w, out in ((1, one), (2, two))}
    assert metrics[1]["world_size"] == 1 and metrics[2]["world_size"] == 2
    for key in ("kernel_gamma_start", "kernel_c_start", "train_loss_first", "train_loss_last", "kernel_loss_last"):
        assert metrics[2][key] == pytest.approx(metrics[1][key], rel=1e-5), key

    before = load_file(str(start / WEIGHTS_FILE))
    a, b = load_file(str(one / "model" / WEIGHTS_FILE)), load_file(str(two / "model" / WEIGHTS_FILE))
    assert a.keys() == b.keys() == before.keys()
    moved = max((a[k] - before[k]).abs().max().item() for k in a if a[k].is_floating_point())
    apart = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    # trained, and the same training: float32 sums in another order (per rank, then all-reduced), through 4 steps
    assert moved > 1e-4 and apart < 1e-3 * moved, (moved, apart)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("visual."))  # the text tower, untouched
