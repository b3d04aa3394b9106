"""KUEA alignment fine-tuning (METHOD.md §4): align a trained model's image tower to the teacher in kernel space.

Starting from a run's exported model, only the image tower (injected or not) and the student kernel (γ, c) train;
the text tower and the logit scale stay frozen, so the text space the tower was aligned to is kept exactly (the
loop checks, bit for bit, that nothing else moved). The loss (`dinorankclip.losses.kernel.kuea_terms`) pulls the
normalised cubic kernel of the tower's projected embeddings z towards the teacher's fixed kernel on its CLS
features (γ = 1/D, c = 1), while w_reg·‖z − z0‖² keeps z near z0 of a frozen copy of the starting tower (the
anchor), which is what keeps zero-shot and retrieval intact.

Choices, and why:
- The tower runs in eval mode throughout: batch-norm statistics (the demo's ResNet tower) stay those of the start,
  and dropout is off, so at step 0 z equals z0 exactly and the regulariser is 0. For a ViT tower, as in the KUEA
  code, eval and train mode compute the same thing.
- (γ, c) are fitted once before step 0 (`fit_kernel_ratio` on `finetune.fit_samples` images of a seeded sample):
  the KUEA code's values were fitted for ViT-L/14 against DINOv2-L and do not transfer. That same fixed sample
  measures the kernel loss before and after training (`kernel_loss_first`/`_last` in metrics.json), a number that
  does not depend on which batch happened to come last.
- The kernel math is fp32 whatever the autocast (kuea_terms); the tower forward uses bf16 autocast on GPU.
- Under torchrun, as in pretraining, each rank takes its slice of every global batch (`GlobalBatches`) and the
  trained modules (tower and kernel) are wrapped in DDP, which starts every rank from rank 0's values. The kernel
  spans the global batch: z (with gradient), z0 and the teacher CLS are gathered from every rank before the loss
  (`all_gather_with_grad`; identity in one process). Every rank then computes the same global loss, and DDP's
  gradient mean gives exactly the global-batch gradient (see `dinorankclip.losses.distributed`), so W ranks
  train what one process trains on the whole batch. Every rank fits the kernel on the same sample; only rank 0
  measures the end, exports and writes.
- AdamW with the CLIP recipe's groups (`train.optim.param_groups`: no decay on biases, norms and the kernel's
  log γ, log c) and open_clip's warmup + cosine schedule, set before each step (the KUEA code's first step runs
  at the full rate before its warmup; this one does not).
- The result is exported as a full open_clip local-dir (image tower replaced, everything else the start's), so
  stock open_clip and clip-benchmark load a fine-tuned plain model, and `load_local_dir` an injected one.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from dinorankclip.data.images import DataPathError, ImageBatch, ImageSource, check_finetune_data
from dinorankclip.data.loader import GlobalBatches, pair_loader
from dinorankclip.io import write_json
from dinorankclip.losses.distributed import all_gather_with_grad
from dinorankclip.losses.kernel import KueaTerms, StudentKernel, fit_kernel_ratio, kuea_terms
from dinorankclip.models.clip import (
    CONFIG_FILE,
    arch_of,
    export_local_dir,
    injection_of,
    load_local_dir,
    training_layout,
)
from dinorankclip.tracking import Tracker
from dinorankclip.train import ddp
from dinorankclip.train.flops import device_hours
from dinorankclip.train.optim import make_optimizer, make_schedule, param_groups
from dinorankclip.train.pretrain import setup_torch
from dinorankclip.train.step import autocast, gradient_norm

log = logging.getLogger(__name__)
# what finetune returns beside metrics.json: measured, so kept out of the DVC-tracked output (dinorankclip.timings)
TIMING_KEYS = ("fit_seconds", "train_seconds", "device_hours", "device_hours_unit")
TeacherCLS = Callable[[ImageBatch, torch.Tensor], torch.Tensor]


def preflight(cfg: dict, dirs: dict[str, Path]) -> ImageSource:
    """Everything the stage reads, checked before any model is built: the images (`finetune.data`), the start
    model, and the teacher's weights when it has to run online. `dirs` holds the data, teacher, teacher_weights
    and start (the start run's pretrain output) directories."""
    source = check_finetune_data(cfg["finetune"], dirs["data"], dirs["teacher"])
    start = dirs["start"] / "model"
    if not (start / CONFIG_FILE).is_file():
        raise DataPathError(f"finetune_runs.{cfg['run']}: no exported model at {start}; pretrain run "
                            f"{cfg['finetune']['start_run']!r} first")
    if not source.cached_teacher:
        from dinorankclip.models.teacher import WEIGHTS_FILE

        if not (dirs["teacher_weights"] / WEIGHTS_FILE).is_file():
            raise DataPathError(f"finetune.data (kind: folder) runs the teacher online, but "
                                f"{dirs['teacher_weights'] / WEIGHTS_FILE} is missing; run the teacher_weights stage")
    return source


def freeze_all_but_image_tower(model: nn.Module) -> None:
    """Only model.visual trains: the text tower, token embedding, text projection and logit scale are frozen."""
    model.requires_grad_(False)
    model.visual.requires_grad_(True)


def frozen_copy(module: nn.Module) -> nn.Module:
    """The anchor: an exact copy of the starting tower, in eval mode, outside the optimizer."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def align_terms(visual: nn.Module, anchor: nn.Module, kernel: StudentKernel, images: torch.Tensor,
                teacher_cls: torch.Tensor, finetune: dict) -> KueaTerms:
    """The KUEA loss of one (local) batch, with the kernel over the global batch under DDP."""
    images = training_layout(images, visual)
    with autocast(images.device, "bf16"):
        z = visual(images)
        with torch.no_grad():
            z0 = anchor(images)
    gathered = [all_gather_with_grad(t) for t in (z, z0, teacher_cls)]
    return kuea_terms(*gathered, kernel.gamma, kernel.c, w_reg=finetune["w_reg"], w_kernel=finetune["w_kernel"])


class Alignment(nn.Module):
    """The trained modules (tower, kernel) and the anchor as one module, so that DDP wraps what trains and
    all-reduces its gradients in the backward of `align_terms`."""

    def __init__(self, visual: nn.Module, anchor: nn.Module, kernel: StudentKernel, finetune: dict) -> None:
        super().__init__()
        self.visual, self.anchor, self.kernel, self.finetune = visual, anchor, kernel, finetune

    def forward(self, images: torch.Tensor, teacher_cls: torch.Tensor) -> KueaTerms:
        return align_terms(self.visual, self.anchor, self.kernel, images, teacher_cls, self.finetune)


def teacher_cls_reader(source: ImageSource, cfg: dict, dirs: dict[str, Path], visual: nn.Module,
                       device: torch.device) -> TeacherCLS:
    """(batch, images on device) -> teacher CLS [B, D] in float32: read from the cache, or computed online."""
    if source.cached_teacher:
        return lambda batch, images: batch.teacher_cls.to(device, non_blocking=True).float()
    from dinorankclip.models.teacher import WEIGHTS_FILE, OnlineTeacher, load_teacher

    teacher = cfg["teacher"]
    model = load_teacher(teacher, dirs["teacher_weights"] / WEIGHTS_FILE, device)
    online = OnlineTeacher(model, teacher["blocks"], teacher["grid"], visual.preprocess_cfg["mean"],
                           visual.preprocess_cfg["std"]).to(device)
    return lambda batch, images: online.cls(images)


def fit_sample(size: int, count: int, seed: int) -> list[int]:
    """The fixed, seeded sample of images the kernel is fitted on and the kernel loss is measured on."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    return sorted(torch.randperm(size, generator=generator)[: min(count, size)].tolist())


@torch.no_grad()
def embed(visual: nn.Module, dataset, indices: list[int], batch_size: int, teacher_cls: TeacherCLS,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [n, d], teacher CLS [n, D]) in float32 for the images `indices` of `dataset`, in eval mode."""
    zs, zts = [], []
    for start in range(0, len(indices), batch_size):
        batch = dataset.__getitems__(indices[start:start + batch_size])
        images = batch.images.to(device)
        with autocast(device, "bf16"):
            zs.append(visual(images).float())
        zts.append(teacher_cls(batch, images).float())
    return torch.cat(zs), torch.cat(zts)


def batches(loader) -> Iterator[tuple[int, ImageBatch]]:
    """(epoch, batch) for as long as the caller wants: the loader's seeded order, epoch after epoch."""
    epoch = 0
    while True:
        loader.batch_sampler.set_position(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every state entry outside the image tower: what fine-tuning must leave bit-identical."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("visual.")}


def check_frozen(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    moved = [k for k, v in before.items() if not torch.equal(v, after[k].to(v.device))]
    if moved:
        raise RuntimeError(f"KUEA fine-tuning changed frozen parameters outside the image tower: {moved[:5]}")


def finetune(cfg: dict, dirs: dict[str, Path], out: Path | None, tracker: Tracker,
             source: ImageSource | None = None) -> dict | None:
    """Fine-tune the image tower of run `cfg['finetune']['start_run']` (in `dirs['start']`); rank 0 exports into
    `out` and returns the metrics (the other ranks of a torchrun launch train alongside and return None).

    `source` is `preflight`'s result when the caller already checked the inputs; otherwise they are checked here,
    before any model is built.
    """
    ft = cfg["finetune"]
    source = source or preflight(cfg, dirs)
    world = ddp.init_world()
    setup_torch(cfg["seed"], ft["threads"], cfg["pretrain"]["deterministic"])  # the study's setting
    device = world.device
    start_dir = dirs["start"] / "model"
    model, transform, _ = load_local_dir(start_dir, device)
    freeze_all_but_image_tower(model)
    model.eval()  # the tower trains in eval mode (see the module doc)
    visual, anchor = model.visual, frozen_copy(model.visual)
    before = frozen_state(model)

    dataset = source.dataset(transform)
    teacher_cls = teacher_cls_reader(source, cfg, dirs, visual, device)
    sample = fit_sample(len(dataset), ft["fit_samples"], cfg["study_seed"])  # the same images for every seed
    t_fit = time.perf_counter()
    z_fit, zt_fit = embed(visual, dataset, sample, ft["batch_size"], teacher_cls, device)
    gamma, c = fit_kernel_ratio(z_fit, zt_fit, max_samples=len(sample), seed=cfg["study_seed"])
    kernel = StudentKernel(gamma, c).to(device)
    first = kuea_terms(z_fit, z_fit, zt_fit, gamma, c, w_reg=ft["w_reg"], w_kernel=ft["w_kernel"])
    fit_seconds = time.perf_counter() - t_fit
    log.info("%s: kernel fitted on %d images: gamma/c = %.4g, kernel loss %.4f", cfg["run"], len(sample), gamma / c,
             first.kernel.item())

    order = GlobalBatches(list(range(len(dataset))), ft["batch_size"], cfg["seed"], world.rank, world.size,
                          key="finetune.batch_size")
    loader = pair_loader(dataset, order, ft["workers"])
    optimizer = make_optimizer(param_groups([("visual", visual), ("kernel", kernel)], ft["weight_decay"]), ft)
    set_lr = make_schedule(optimizer, ft, ft["steps"])
    trained = ddp.wrap(Alignment(visual, anchor, kernel, ft), world)
    log.info("%s: KUEA from %s, %d %s images, %d steps of %d, %d rank(s) on %s", cfg["run"], ft["start_run"],
             len(dataset), source.kind, ft["steps"], ft["batch_size"], world.size, device)

    step_losses: list[float] = []
    start, t_data = time.perf_counter(), time.perf_counter()
    stream = batches(loader)
    progress = tqdm(total=ft["steps"], desc=f"finetune {cfg['run']}", unit="step", mininterval=5,
                    disable=not world.main)
    for step in range(ft["steps"]):
        epoch, batch = next(stream)
        t_step = time.perf_counter()
        lr = set_lr(step)
        images = batch.images.to(device, non_blocking=True)
        with FlopCounterMode(display=False) if step == 0 else nullcontext() as counter:
            terms = trained(images, teacher_cls(batch, images))
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
        if counter is not None:  # forward and backward of one step on every rank, the anchor's forward included
            flops_per_step = counter.get_total_flops() * world.size
        grad_norm = gradient_norm(list(visual.parameters()), None)
        optimizer.step()
        step_losses.append(terms.total.item())
        t_end = time.perf_counter()
        if step == 0 or (step + 1) % ft["log_every"] == 0 or step + 1 == ft["steps"]:
            tracker.log_metrics({"loss": terms.total.item(), "loss/reg": terms.reg.item(),
                                 "loss/kernel": terms.kernel.item(), "kernel_gamma": kernel.gamma.item(),
                                 "kernel_c": kernel.c.item(), "lr": lr, "grad_norm": grad_norm.item(), "epoch": epoch,
                                 "samples_per_s": ft["batch_size"] / (t_end - t_data),
                                 "data_wait_fraction": (t_step - t_data) / (t_end - t_data)}, step + 1)
        progress.set_postfix(loss=f"{terms.total.item():.4f}", kernel=f"{terms.kernel.item():.4f}", refresh=False)
        progress.update()
        t_data = time.perf_counter()
    progress.close()
    seconds = time.perf_counter() - start
    check_frozen(model, before)
    if not world.main:
        ddp.close(world)
        return None

    z_end, _ = embed(visual, dataset, sample, ft["batch_size"], teacher_cls, device)
    last = kuea_terms(z_end, z_fit, zt_fit, kernel.gamma.detach(), kernel.c.detach(), w_reg=ft["w_reg"],
                      w_kernel=ft["w_kernel"])
    model.cpu()
    (out / "model").mkdir()
    export_local_dir(model, arch_of(start_dir), out / "model", injection_of(start_dir))
    hours, unit = device_hours(seconds, device, ft["threads"], world.size)
    metrics = {"start_run": ft["start_run"], "data": source.kind, "images": len(dataset), "steps": ft["steps"],
               "batch_size": ft["batch_size"], "samples_seen": ft["steps"] * ft["batch_size"],
               "fit_samples": len(sample), "kernel_gamma_start": gamma, "kernel_c_start": c,
               "kernel_gamma_end": kernel.gamma.item(), "kernel_c_end": kernel.c.item(),
               "kernel_loss_first": first.kernel.item(), "kernel_loss_last": last.kernel.item(),
               "reg_first": first.reg.item(), "reg_last": last.reg.item(),
               "train_loss_first": step_losses[0], "train_loss_last": step_losses[-1],
               "frozen_unchanged": True, "flops_per_step": flops_per_step, "train_flops": flops_per_step * ft["steps"],
               "device": str(device), "world_size": world.size}
    write_json(out / "metrics.json", metrics)  # a function of the inputs alone: DVC tracks it
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}, ft["steps"])
    ddp.close(world)
    return metrics | dict(zip(TIMING_KEYS, (fit_seconds, seconds, hours, unit), strict=True))
