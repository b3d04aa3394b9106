"""Local (per-rank) losses: single-process fallbacks, and a 2-rank torchrun run against the global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinorankclip.losses.contrastive import clip_loss, cyclip_loss
from dinorankclip.losses.distributed import (
    all_gather_with_grad,
    get_rank,
    get_world_size,
    is_distributed,
    local_batch,
)
from dinorankclip.losses.ranking import HighOrderRankLoss, rankclip_loss

WORKER = Path(__file__).with_name("_dist_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOLERANCE = 1e-10  # the worker runs in float64
EXPECTED_CASES = {"clip", "cyclip", "rankclip", "order0", "order1", "order3", "alip"}


def _features(batch: int = 6, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    return image, text


def _assert_gather_is_identity() -> None:
    image, text = _features()
    batch = local_batch(image, text, gather=True)
    assert batch.image is image and batch.all_text is text and batch.offset == 0 and batch.num_candidates == 6
    assert all_gather_with_grad(image) is image
    module = HighOrderRankLoss(2, dim=4, window=3, heads=1, head_dim=2)
    for loss in (clip_loss, cyclip_loss, rankclip_loss, module):
        assert torch.equal(loss(image, text, 10.0, gather=True), loss(image, text, 10.0))


def test_without_a_process_group_everything_is_local():
    assert not dist.is_initialized()
    assert (get_rank(), get_world_size(), is_distributed()) == (0, 1, False)
    _assert_gather_is_identity()


def test_world_size_one_group_needs_no_communication(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert (get_rank(), get_world_size(), is_distributed()) == (0, 1, False)
        _assert_gather_is_identity()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun not found next to the interpreter ({TORCHRUN})")
def test_two_rank_local_loss_equals_global_batch(tmp_path):
    command = [
        str(TORCHRUN),
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == 2 and report["same_permutation"]
        assert set(report["cases"]) == EXPECTED_CASES
        for case, diffs in report["cases"].items():
            assert {"loss_mean", "loss_sum", "grad_image_mean", "grad_text_own", "grad_scale_mean"} <= set(diffs)
            bad = {name: value for name, value in diffs.items() if not value < TOLERANCE}
            assert not bad, f"rank {rank}, {case}: local loss differs from the global batch: {bad}"
            assert report["large_dims"][case] == {"global": 2, "local": 1}, f"rank {rank}, {case}: B×B probe"
        assert "open_clip" in report["cases"]["clip"]
        assert sum(name.startswith("grad_param") for name in report["cases"]["order3"]) == 8  # 2 orders × 4
