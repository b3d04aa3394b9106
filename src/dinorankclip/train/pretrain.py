"""The pretraining loop: one flat loop for every run in the registry (nanoGPT style), CPU or GPU.

Everything that makes two runs differ comes from the resolved config; everything else — initialisation, data
order, batch boundaries — comes from the seed, so runs of one study are matched and a rerun is identical.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dinorankclip.data.loader import ShardPairs, pair_loader
from dinorankclip.io import read_json, write_json
from dinorankclip.models.clip import create_clip, export_local_dir
from dinorankclip.tracking import Tracker
from dinorankclip.train.objective import build_objective
from dinorankclip.train.optim import make_optimizer, make_schedule, param_groups
from dinorankclip.train.student import Student, distill_loss, distill_weight, distills

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100.0)


def setup_torch(seed: int, threads: int) -> torch.device:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_student(cfg: dict, teacher_dirs: dict[str, Path], device: torch.device):
    """(Student, transform, injection spec, teacher feature index or None) for the run described by `cfg`."""
    injection = cfg["injection"]
    model, transform, spec = create_clip(cfg["model"]["arch"], injection, len(cfg["teacher"]["blocks"]))
    if not distills(model):
        return Student(model), transform, spec, None
    if injection["teacher"] == "online":
        from dinorankclip.models.teacher import WEIGHTS_FILE, OnlineTeacher, load_teacher

        frozen = load_teacher(cfg["teacher"], teacher_dirs["teacher_weights"] / WEIGHTS_FILE, device)
        online = OnlineTeacher(frozen, cfg["teacher"]["blocks"], cfg["teacher"]["grid"],
                               model.visual.tower.preprocess_cfg["mean"], model.visual.tower.preprocess_cfg["std"])
        return Student(model, frozen.embed_dim, injection["distill"]["tau"], online), transform, spec, None
    cache = teacher_dirs["teacher"]
    width = read_json(cache / "stats.json")["patch_channels"]
    return Student(model, width, injection["distill"]["tau"]), transform, spec, cache / "features.json"


def pretrain(cfg: dict, data_dir: Path, teacher_dirs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    """Train the run described by `cfg` on the shards in `data_dir` (with the teacher stage outputs in
    `teacher_dirs` when it distils); export the model into `out`."""
    opt, injection = cfg["pretrain"], cfg["injection"]
    device = setup_torch(cfg["seed"], opt["threads"])
    arch = cfg["model"]["arch"]
    student, transform, spec, features = build_student(cfg, teacher_dirs, device)
    model = student.model
    objective = build_objective(cfg["loss"], model.text_projection.shape[1], cfg["seed"])
    student.to(device).train()
    objective.to(device).train()

    import open_clip

    dataset = ShardPairs(data_dir / "shards.json", transform, open_clip.get_tokenizer(arch), features)
    loader = pair_loader(dataset, opt["batch_size"], cfg["seed"], opt["workers"])
    steps_per_epoch = len(dataset) // opt["batch_size"]
    total_steps = opt["epochs"] * steps_per_epoch
    optimizer = make_optimizer(param_groups([("student", student), ("objective", objective)], opt["weight_decay"]),
                               opt)
    set_lr = make_schedule(optimizer, opt, total_steps)
    log.info("%s: %d samples, %d steps of %d (%d epochs), device %s", cfg["run"], len(dataset), total_steps,
             opt["batch_size"], opt["epochs"], device)

    step, start = 0, time.perf_counter()
    epoch_losses: list[float] = []
    progress = tqdm(total=total_steps, desc=f"pretrain {cfg['run']}", unit="step", mininterval=5)
    for epoch in range(opt["epochs"]):
        loader.sampler.set_position(epoch)
        epoch_losses = []
        t_data = time.perf_counter()
        for batch in loader:
            t_step = time.perf_counter()
            lr = set_lr(step)
            images, tokens = batch.images.to(device, non_blocking=True), batch.tokens.to(device, non_blocking=True)
            teacher = batch.teacher.to(device, non_blocking=True) if batch.teacher is not None else None
            out_step = student(images, tokens, teacher)
            loss, terms = objective(out_step.image, out_step.text, out_step.scale, step, total_steps)
            if out_step.distill is not None:
                kd_weight = distill_weight(injection, cfg["loss"], step, total_steps)
                loss = loss + kd_weight * distill_loss(out_step.distill, injection)
                terms.update({"loss/distill_feature": out_step.distill.feature.detach(),
                              "loss/distill_relational": out_step.distill.relational.detach(),
                              "distill_weight": kd_weight})
            if spec is not None and spec["variant"] in ("v5", "v6"):
                terms["gate_alpha"] = model.visual.gate.alpha.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf"))
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            epoch_losses.append(loss.item())
            t_end = time.perf_counter()
            if step % opt["log_every"] == 0 or step == total_steps:
                tracker.log_metrics({"loss": loss.item(), **{k: float(v) for k, v in terms.items()}, "lr": lr,
                                     "logit_scale": out_step.scale.item(), "grad_norm": grad_norm.item(),
                                     "epoch": epoch,
                                     "samples_per_s": opt["batch_size"] / (t_end - t_data),
                                     "data_wait_fraction": (t_step - t_data) / (t_end - t_data)}, step)
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
            progress.update()
            t_data = time.perf_counter()
    progress.close()
    seconds = time.perf_counter() - start

    model.eval()
    (out / "model").mkdir()
    export_local_dir(model.cpu(), arch, out / "model", spec)
    metrics = {"steps": step, "samples_seen": step * opt["batch_size"], "epochs": opt["epochs"],
               "final_epoch_train_loss": sum(epoch_losses) / max(len(epoch_losses), 1),
               "train_seconds": seconds, "device": str(device),
               "device_hours": seconds / 3600 * (1 if device.type == "cuda" else opt["threads"])}
    if spec is not None and spec["variant"] in ("v5", "v6"):
        metrics["gate_alpha"] = model.visual.gate.alpha.item()
    write_json(out / "metrics.json", metrics)
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, step)
    return metrics
