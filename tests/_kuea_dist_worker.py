"""torchrun worker for tests/test_finetune.py: the KUEA step on each rank's slice vs the 1-process global batch.

Usage: torchrun --nproc_per_node=W tests/_kuea_dist_worker.py OUT_DIR   (gloo, CPU, float64)

Every rank builds the same global batch and tower, computes the global loss and gradients itself, then runs the
fine-tuning step (`align_terms`, which gathers z, z0 and the teacher CLS) on its own slice and averages the
gradients over ranks as DDP does. It writes OUT_DIR/rank{r}.json with the largest deviation of the loss and of
each parameter's gradient (tower and kernel) from the global batch's.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dinorankclip.losses.kernel import StudentKernel, kuea_terms
from dinorankclip.train.finetune import align_terms, frozen_copy

BATCH, FINETUNE = 12, {"w_reg": 0.3, "w_kernel": 0.5}


def build():
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8)).double()
    anchor = frozen_copy(visual)
    with torch.no_grad():
        visual[1].weight.add_(0.05 * torch.randn_like(visual[1].weight))  # a step in: z ≠ z0, the regulariser counts
    kernel = StudentKernel(0.2, 0.7).double()
    images = torch.randn(BATCH, 3, 4, 4, dtype=torch.float64)
    teacher_cls = torch.randn(BATCH, 5, dtype=torch.float64)
    return visual, anchor, kernel, images, teacher_cls


def grads(visual, kernel):
    return [p.grad.clone() for p in [*visual.parameters(), *kernel.parameters()]]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    visual, anchor, kernel, images, teacher_cls = build()
    # the definition on the whole batch, in this process alone (align_terms would gather it again)
    global_terms = kuea_terms(visual(images), anchor(images).detach(), teacher_cls, kernel.gamma, kernel.c, **FINETUNE)
    global_terms.total.backward()
    reference = grads(visual, kernel)

    visual, anchor, kernel, images, teacher_cls = build()
    own = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    local = align_terms(visual, anchor, kernel, images[own], teacher_cls[own], FINETUNE)
    local.total.backward()
    averaged = grads(visual, kernel)
    for g in averaged:
        dist.all_reduce(g)
        g /= world
    report = {"world": world, "loss": abs(local.total.item() - global_terms.total.item()),
              "kernel": abs(local.kernel.item() - global_terms.kernel.item()),
              "grads": [(a - b).abs().max().item() for a, b in zip(averaged, reference, strict=True)],
              "grad_scale": max(g.abs().max().item() for g in reference)}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
