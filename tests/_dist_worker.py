"""torchrun worker for tests/test_losses_distributed.py: local losses on each rank vs the 1-process global batch.

Usage: torchrun --nproc_per_node=W tests/_dist_worker.py OUT_DIR   (gloo, CPU)

Every rank builds the same global batch (float64, with duplicated captions and images across ranks so that the
tie-break matters), computes the global loss and gradients itself, then its local loss on its own slice with
``gather=True``, and writes OUT_DIR/rank{r}.json with the largest deviation of each comparison:
  loss_mean     mean over ranks of the local losses vs the global loss (what DDP's averaging optimises)
  grad_*_mean   all-reduce-mean over ranks of the gradients of replicated leaves (the full feature tensors the rank
                slices, the logit scale, the loss module's parameters) vs the global gradients — DDP's averaging
  loss_sum      Σ_r local_r / W vs the global loss (METHOD.md's "sum over ranks" in this normalisation)
  grad_*_own    this rank's own feature-slice gradient of local_r / W, with no reduction at all, vs the global
                gradient of those rows (all_gather's backward must bring every rank's contribution home)
  open_clip     (CLIP cases) the local loss vs open_clip's ClipLoss(local_loss=True, gather_with_grad=True)
It also records whether any tensor produced by the global and the local forward had two dimensions of size B (a
B×B matrix: expected in the global run, forbidden in the local one), and whether
the tie-break permutation agreed across ranks.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dinorankclip.losses.alip import AlipObjective
from dinorankclip.losses.contrastive import clip_loss, cyclip_loss
from dinorankclip.losses.distributed import get_rank, get_world_size
from dinorankclip.losses.ranking import HighOrderRankLoss, rankclip_loss, tie_permutation

BATCH, DIM, TIE_SEED, STEP = 16, 8, 11, 5


class LargestMatrix(TorchDispatchMode):
    """Counts, over every op output, the most dimensions of size exactly BATCH (2 means a B×B matrix).

    No other size in this setup equals BATCH (b = 8, window·b = 40, d = 8, widths 6 and 12, B + 1 = 17), so a
    count of 2 can only be a B×B matrix; the global run must show one, proving the probe sees them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.most_large_dims = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.most_large_dims = max(self.most_large_dims, sum(size == BATCH for size in t.shape))
        return out


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same float64 batch on every rank; rows 3, 5, 11 share a caption and rows 4, 12 an image."""
    generator = torch.Generator().manual_seed(1234)
    image = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=1)
    text[5] = text[3]
    text[11] = text[3]
    image[12] = image[4]
    return image, text


def high_order(order: int) -> nn.Module:
    """A small order-R module, identical on every rank, with open gates so the transition path is exercised."""
    torch.manual_seed(99)
    module = HighOrderRankLoss(order, DIM, window=5, heads=2, head_dim=3, lambda_cross=0.3, lambda_in=0.2).double()
    with torch.no_grad():
        for transition, value in zip(module.transitions, (0.7, -0.6, 0.9), strict=False):
            transition.gate.fill_(value)
    return module


def alip() -> nn.Module:
    """ALIP with fixed running means (eval mode) between the batch's similarities, so some samples are gated and
    some are not; the caption is a per-row function of image and text, so gradients reach both."""
    module = AlipObjective({"alip": {"momentum": 0.99, "sharpness": 2.0}}, DIM, 0).eval()
    module.means.copy_(torch.tensor([0.6, 0.1, 0.3]))
    return module


def cases() -> dict[str, tuple[nn.Module | None, Callable[..., torch.Tensor]]]:
    """Name → (loss module or None, loss(image, text, scale, gather))."""
    ties = {"tie_seed": TIE_SEED, "step": STEP}
    modules = {order: high_order(order) for order in (0, 1, 3)}
    gated = alip()
    return {
        "alip": (gated, lambda i, t, s, g: gated(i, t, s, STEP, 10, gather=g,
                                                 caption=F.normalize(t + 0.8 * i, dim=1))[0]),
        "clip": (None, lambda i, t, s, g: clip_loss(i, t, s, gather=g)),
        "cyclip": (None, lambda i, t, s, g: cyclip_loss(i, t, s, 0.3, 0.4, gather=g)),
        "rankclip": (None, lambda i, t, s, g: rankclip_loss(i, t, s, 1.5, **ties, gather=g)),
        **{
            f"order{order}": (module, lambda i, t, s, g, m=module: m(i, t, s, 1.5, **ties, gather=g))
            for order, module in modules.items()
        },
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach() - b.detach()).abs().max().item()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / get_world_size()


def compare(module: nn.Module | None, loss_fn: Callable[..., torch.Tensor]) -> tuple[dict[str, float], dict[str, int]]:
    """All comparisons of one case; returns the deviations and the LargestMatrix counts of both forwards."""
    rank, world = get_rank(), get_world_size()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    params = list(module.parameters()) if module is not None else []

    def run(gather: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        image, text = (t.clone().requires_grad_(True) for t in global_batch())
        scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
        for p in params:
            p.grad = None
        with LargestMatrix() as probe:
            loss = loss_fn(image[rows], text[rows], scale, True) if gather else loss_fn(image, text, scale, False)
        loss.backward()
        return loss, [image.grad, text.grad, scale.grad, *(p.grad for p in params)], probe.most_large_dims

    global_loss, global_grads, global_dims = run(gather=False)
    local_loss, local_grads, local_dims = run(gather=True)
    diffs = {"loss_mean": max_diff(mean_over_ranks(local_loss), global_loss)}
    diffs["loss_sum"] = max_diff(mean_over_ranks(local_loss / world) * world, global_loss)
    names = ["image", "text", "scale", *(f"param{i}" for i in range(len(params)))]
    for name, local, expected in zip(names, local_grads, global_grads, strict=True):
        diffs[f"grad_{name}_mean"] = max_diff(mean_over_ranks(local), expected)
    for name, local, expected in zip(names[:2], local_grads[:2], global_grads[:2], strict=True):
        diffs[f"grad_{name}_own"] = max_diff(local[rows] / world, expected[rows])
    return diffs, {"global": global_dims, "local": local_dims}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = get_rank(), get_world_size()
    report = {"world": world, "cases": {}, "large_dims": {}}
    for name, (module, loss_fn) in cases().items():
        report["cases"][name], report["large_dims"][name] = compare(module, loss_fn)

    image, text = global_batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    scale = torch.tensor(9.0, dtype=torch.float64)
    expected = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
        image[rows], text[rows], scale
    )
    report["cases"]["clip"]["open_clip"] = max_diff(clip_loss(image[rows], text[rows], scale, gather=True), expected)

    perm = tie_permutation(BATCH, TIE_SEED, STEP)
    gathered = [torch.empty_like(perm) for _ in range(world)]
    dist.all_gather(gathered, perm)
    report["same_permutation"] = all(torch.equal(p, perm) for p in gathered)

    (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
