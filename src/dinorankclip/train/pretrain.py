"""The pretraining loop: one flat loop for every run in the registry (nanoGPT style), 1 process or torchrun DDP.

Everything that makes two runs differ comes from the resolved config; everything else — initialisation, data
order, tie-breaking, masks — comes from the run's training seed (`seed`), while the held-out split comes from the
study seed (`study_seed`), the same for every run and seed; so runs of one study are matched and a rerun is
identical.
A run survives preemption: SIGTERM/SIGUSR1 checkpoint it at the next check point, and the next start resumes
from the newest checkpoint (`pretrain.resume: latest`) to the same weights an uninterrupted run reaches.

The host waits for the device only at check points — log steps, checkpoint steps and epoch ends — so between them
it queues steps ahead of the GPU. There the step losses, a non-finite flag (`dinorankclip.train.ledger`) and the
signal flag are read; a non-finite step since the last check point rolls the run back to its last checkpoint once,
and no checkpoint is ever written from non-finite weights.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from dinorankclip import diagnostics
from dinorankclip.config import reads_captions
from dinorankclip.data.loader import GlobalBatches, ShardPairs, pair_loader, split_indices
from dinorankclip.io import fingerprint, read_json, write_json
from dinorankclip.models.clip import create_clip, export_local_dir
from dinorankclip.train import checkpoint, ddp
from dinorankclip.train.flops import device_hours, mfu, peak_flops
from dinorankclip.train.ledger import StepLedger
from dinorankclip.train.objective import build_objective
from dinorankclip.train.optim import make_optimizer, make_schedule, param_groups
from dinorankclip.train.patch import PatchObjective
from dinorankclip.train.preemption import Preempted, stop_on_signals
from dinorankclip.train.step import NonFiniteLoss, TrainStep, autocast, update
from dinorankclip.train.student import Student, distills

log = logging.getLogger(__name__)
# what export returns beside metrics.json: measured, so kept out of the DVC-tracked output (dinorankclip.timings)
TIMING_KEYS = ("train_seconds", "device_hours", "device_hours_unit", "peak_flops_per_device", "peak_flops_source",
               "resumes", "rollbacks")
# settings that change how a run is executed or observed, not what it computes: a checkpoint stays valid
EXECUTION_KEYS = ("threads", "workers", "log_every", "checkpoint_every", "resume", "compile", "grad_checkpointing",
                  "deterministic", "sample_cache_mb")


def setup_torch(seed: int, threads: int, deterministic: bool) -> torch.device:
    """Seed, threads and `pretrain.deterministic`: on, deterministic kernels make a resumed run bit-identical; off
    (the paper's GPU default), cuDNN autotunes and no slow deterministic fallbacks are forced, and a resumed run is
    exact in data order and state but not bit for bit."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode; read at its start
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # deterministic mode also fills every new tensor with NaN, a check for reads of uninitialised memory that costs
    # ~5% of a demo step's CPU and changes no result; the bit-identical resume tests are the check that matters
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not deterministic
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def logs_after(done: int, log_every: int, total_steps: int) -> bool:
    """Whether the loop logs once `done` steps are done: every `log_every`-th step and the last. Steps that do not
    log compute no diagnostics (`dinorankclip.diagnostics`): nothing reads them."""
    return done % log_every == 0 or done == total_steps


def build_student(cfg: dict, stage_dirs: dict[str, Path], device: torch.device):
    """(Student, transform, injection spec, teacher feature index or None) for the run described by `cfg`."""
    injection = cfg["injection"]
    model, transform, spec = create_clip(cfg["model"]["arch"], injection, len(cfg["teacher"]["blocks"]))
    if cfg["patch_loss"]["name"] != "none":
        return Student(model, patch=PatchObjective(model.visual, cfg["patch_loss"], cfg["seed"])), transform, spec, None
    if not distills(model):
        return Student(model), transform, spec, None
    if injection["teacher"] == "online":
        from dinorankclip.models.teacher import WEIGHTS_FILE, OnlineTeacher, load_teacher

        frozen = load_teacher(cfg["teacher"], stage_dirs["teacher_weights"] / WEIGHTS_FILE, device)
        online = OnlineTeacher(frozen, cfg["teacher"]["blocks"], cfg["teacher"]["grid"],
                               model.visual.tower.preprocess_cfg["mean"], model.visual.tower.preprocess_cfg["std"])
        return Student(model, frozen.embed_dim, injection["distill"]["tau"], online), transform, spec, None
    cache = stage_dirs["teacher"]
    width = read_json(cache / "stats.json")["patch_channels"]
    return Student(model, width, injection["distill"]["tau"]), transform, spec, cache / "features.json"


def run_fingerprint(cfg: dict, data_dir: Path) -> str:
    """What a checkpoint was trained on: the run's computing settings and the shard index. A checkpoint of other
    settings is never resumed."""
    settings = {key: cfg[key] for key in ("seed", "loss", "injection", "teacher", "model", "captions", "patch_loss")}
    settings["pretrain"] = {k: v for k, v in cfg["pretrain"].items() if k not in EXECUTION_KEYS}
    return fingerprint([data_dir / "shards.json"], settings)


def tracking_key(cfg: dict, data_dir: Path, state: Path) -> tuple[str, bool]:
    """(the run's fingerprint, whether the job will resume from a checkpoint in `state`): the MLflow run of a
    training is keyed by the fingerprint, so a job continues the run of its own checkpoint and never one of other
    settings. Reads the checkpoint's header only (tensors are memory-mapped); an unreadable one is set aside."""
    stamp = run_fingerprint(cfg, data_dir)
    return stamp, cfg["pretrain"]["resume"] == "latest" and checkpoint.resumable(state, stamp) is not None


def batch_to(batch, device: torch.device):
    """(images, tokens, teacher maps or None, second-caption tokens or None) on `device`."""
    return tuple(None if x is None else x.to(device, non_blocking=True)
                 for x in (batch.images, batch.tokens, batch.teacher, batch.captions))


def validation_split(dataset: ShardPairs, data_dir: Path, transform, tokenizer, opt: dict, study_seed: int
                     ) -> tuple[ShardPairs, list[int], list[int]]:
    """(validation set, training indices, validation indices): the study's own validation list when
    the data stage downloaded one (`data/val`: its first `val_samples` pairs, read without teacher features or second
    captions, which only training needs; every training pair trains), else a seeded held-out slice of the training
    pairs, the same for every run and seed (METHOD.md §6a)."""
    val_index = data_dir / "val" / "shards.json"
    if not val_index.is_file():
        train_idx, val_idx = split_indices(len(dataset), opt["val_samples"], study_seed)
        return dataset, train_idx, val_idx
    validation = ShardPairs(val_index, transform, tokenizer)
    return validation, list(range(len(dataset))), list(range(min(opt["val_samples"], len(validation))))


def captions_index(cfg: dict, stage_dirs: dict[str, Path]) -> Path | None:
    """The captions stage's index when the run reads second captions (ALIP, caption sampling), else None."""
    return stage_dirs["captions"] / "captions.json" if reads_captions(cfg) else None


# What validation averages besides the losses: how strongly the injection and the transition heads act.
STRENGTH_PREFIXES = ("injection/", "transition/")


@torch.no_grad()
def validate(step_module: TrainStep, dataset: ShardPairs, batches: GlobalBatches, world: ddp.World, step: int,
             total_steps: int, precision: str) -> dict[str, float]:
    """Means over the held-out global batches, in eval mode, at the current step: `val_loss`, the plain CLIP loss
    on the raw captions that selects `best/` for every run alike (METHOD.md §6a); `val_objective`, the run's own
    objective, where the validation pairs carry what it reads (a study's own validation list has no teacher features
    or second captions); and the strength statistics of the injection and of the transition heads (`injection/*`,
    `transition/*`)."""
    step_module.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in pair_loader(dataset, batches, workers=0, device=world.device):
        images, tokens, teacher, captions = batch_to(batch, world.device)
        with autocast(world.device, precision):
            loss, terms = step_module(images, tokens, teacher, step, total_steps, captions)
        values = {"val_loss": terms["selection/clip"], **({} if loss is None else {"val_objective": loss.detach()}),
                  **{k: v for k, v in terms.items() if k.startswith(STRENGTH_PREFIXES)}}
        sums = {k: sums.get(k, 0) + v.float() for k, v in values.items()}
        count += 1
    step_module.train()
    stacked = torch.stack([sums[k] for k in sorted(sums)]) / count
    if world.size > 1:
        torch.distributed.all_reduce(stacked)
        stacked /= world.size
    return dict(zip(sorted(sums), stacked.tolist(), strict=True))


class Progress:
    """What a run has done so far; saved in every checkpoint so a resumed job reports the whole run."""

    def __init__(self) -> None:
        self.step, self.seconds, self.epoch_losses, self.train_losses, self.val_losses = 0, 0.0, [], [], []
        self.best_val, self.best_epoch, self.flops_per_step, self.resumes = math.inf, -1, 0, 0
        self.val_objectives: list[float] = []
        self.strength: dict[str, float] = {}  # the last validation's strength statistics
        self.rollbacks = 0  # to the last checkpoint after a non-finite step; a second non-finite step stops the run

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def pretrain(cfg: dict, data_dir: Path, stage_dirs: dict[str, Path], out: Path | None, tracker,
             state: Path, sample_cache: Path | None = None) -> dict | None:
    """Train the run described by `cfg` on the shards in `data_dir` (with the outputs of the other stages it
    reads in `stage_dirs`: teacher, teacher_weights, captions), checkpointing into `state`; rank 0 exports the
    model into `out`. `sample_cache`: a folder the in-memory samples are saved in and loaded from by every job of
    the same inputs (`dinorankclip.data.loader.PairCache`)."""
    opt = cfg["pretrain"]
    world = ddp.init_world()
    setup_torch(cfg["seed"], opt["threads"], opt["deterministic"])
    student, transform, spec, features = build_student(cfg, stage_dirs, world.device)
    model = student.model
    if opt["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    objective = build_objective(cfg["loss"], model.text_projection.shape[1], cfg["seed"])
    step_module = TrainStep(student, objective, cfg, gather=world.size > 1)
    step_module.to(world.device).train()

    import open_clip

    tokenizer = open_clip.get_tokenizer(cfg["model"]["arch"])
    dataset = ShardPairs(data_dir / "shards.json", transform, tokenizer, features, captions_index(cfg, stage_dirs),
                         opt["sample_cache_mb"], sample_cache)
    val_dataset, train_idx, val_idx = validation_split(dataset, data_dir, transform, tokenizer, opt,
                                                       cfg["study_seed"])
    batches = GlobalBatches(train_idx, opt["batch_size"], cfg["seed"], world.rank, world.size)
    val_batches = (GlobalBatches(val_idx, min(opt["batch_size"], len(val_idx) // world.size * world.size),
                                 cfg["seed"], world.rank, world.size, shuffle=False) if val_idx else None)
    loader = pair_loader(dataset, batches, opt["workers"], world.device)
    steps_per_epoch = batches.batches_per_epoch
    total_steps = min(opt["epochs"] * steps_per_epoch, opt["max_steps"] or math.inf)
    epochs = math.ceil(total_steps / steps_per_epoch)  # the last one partial under a step cap
    optimizer = make_optimizer(param_groups([("", step_module)], opt["weight_decay"]), opt)
    set_lr = make_schedule(optimizer, opt, total_steps)

    progress, stamp = Progress(), run_fingerprint(cfg, data_dir)
    resumed = resume(state, stamp, step_module, optimizer, progress, world.main) if opt["resume"] == "latest" else False
    trained = ddp.wrap(step_module, world)
    if opt["compile"]:
        student.compile()
    peak, peak_source = peak_flops(world.device, opt["precision"], opt["threads"])
    log.info("%s seed %d: %d training + %d held-out samples, %d steps of %d (%d epochs%s), %d rank(s) on %s%s",
             cfg["run"], cfg["seed"], len(train_idx), len(val_idx), total_steps, opt["batch_size"], epochs,
             f", capped at pretrain.max_steps {opt['max_steps']}" if opt["max_steps"] else "", world.size, world.device,
             f", resumed at step {progress.step}" if resumed else "")

    saved_step = progress.step if resumed else "none yet"

    def save(path: Path) -> None:
        nonlocal saved_step
        saved_step = progress.step
        if world.main:
            tracker.flush()  # the metrics up to a checkpoint are stored with it: a resumed job logs only later steps
            checkpoint.save(path, {"fingerprint": stamp, "modules": step_module.state_dict(),
                                   "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(),
                                   "progress": progress.state_dict()})
        ddp.barrier(world)

    bar = tqdm(total=total_steps, initial=progress.step, desc=f"pretrain {cfg['run']}", unit="step",
               mininterval=5, disable=not world.main)
    ledger = StepLedger(world.device)

    def settle() -> bool:
        """A check point's host sync: the losses since the last one go into `progress`. After a non-finite step the
        run rolls back to the last checkpoint (False), once; a second one, or none to roll back to, stops it."""
        losses, bad = ledger.settle()
        progress.seconds = time.perf_counter() - job_start  # the device has caught up with the host
        if bad is None:
            progress.epoch_losses.extend(losses)
            return True
        where = f"the last good checkpoint is {state / checkpoint.LATEST} (step {saved_step})"
        if progress.rollbacks or saved_step == "none yet":
            raise NonFiniteLoss(f"{cfg['run']}: {bad}; {where}" + ("; rolled back once already" if progress.rollbacks
                                                                    else ""))
        if ddp.any_rank(bool(stop), world):
            raise Preempted(f"{cfg['run']}: stopped by signal at step {progress.step}/{total_steps} after a {bad}, "
                            f"so nothing was saved; {where}, and running the job again resumes it")
        log.warning("%s: %s; rolling back to %s (step %s)", cfg["run"], bad, state / checkpoint.LATEST, saved_step)
        resumes = progress.resumes  # this job's count, whatever the checkpoint says
        restore(checkpoint.load(state / checkpoint.LATEST), step_module, optimizer, progress)
        progress.resumes, progress.rollbacks = resumes, 1
        bar.n = progress.step
        return False

    job_start = time.perf_counter() - progress.seconds
    with stop_on_signals() as stop:
        for epoch in epochs_left(progress, epochs):  # an epoch is done when its end is; again after a rollback
            batches.set_position(epoch, progress.step - epoch * steps_per_epoch)
            window, rolled_back = Window(), False
            t_data = time.perf_counter()
            for batch in loader:
                t_step = time.perf_counter()
                step = progress.step
                lr = set_lr(step)
                images, tokens, teacher, captions = batch_to(batch, world.device)
                with FlopCounterMode(display=False) if not progress.flops_per_step else nullcontext() as counter:
                    with autocast(world.device, opt["precision"]), \
                            diagnostics.computing(logs_after(step + 1, opt["log_every"], total_steps)):
                        loss, terms = trained(images, tokens, teacher, step, total_steps, captions)
                    grad_norm = update(step_module, loss, optimizer, model, opt["grad_clip"])
                if counter is not None:
                    progress.flops_per_step = counter.get_total_flops() * world.size
                # the global-batch loss (what one process would have computed), kept on the device until a check point
                ledger.record(step, ddp.mean(loss, world), grad_norm)
                progress.step += 1
                window.add(t_step - t_data)
                bar.update()
                log_step = logs_after(progress.step, opt["log_every"], total_steps)
                save_step = opt["checkpoint_every"] and progress.step % opt["checkpoint_every"] == 0
                # check points, the only steps that wait for the device: finiteness, losses, signals, logs, saves
                if log_step or save_step or progress.step % steps_per_epoch == 0:
                    if not settle():
                        rolled_back = True
                        break  # the epochs restart at the checkpoint's position
                    preempted = ddp.any_rank(bool(stop), world)
                    loss_value = progress.epoch_losses[-1]
                    if log_step:
                        seconds = time.perf_counter() - window.start  # the window's steps, now finished on the device
                        metrics = {"loss": loss_value, **{k: float(v) for k, v in terms.items()}, "lr": lr,
                                   "grad_norm": grad_norm.item(), "epoch": epoch,
                                   "samples_per_s": window.steps * opt["batch_size"] / seconds,
                                   "samples_per_s_per_device": window.steps * opt["batch_size"] / seconds / world.size,
                                   "data_wait_fraction": window.wait / seconds,
                                   "mfu": mfu(progress.flops_per_step / world.size, window.steps / seconds, peak)}
                        tracker.log_metrics(metrics, progress.step)
                        if world.main:
                            log.info("step %d/%d epoch %d loss %.4f lr %.2e %.0f samples/s mfu %.2f%% eta %s",
                                     progress.step, total_steps, epoch, metrics["loss"], lr, metrics["samples_per_s"],
                                     100 * metrics["mfu"], _eta(bar))
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", refresh=False)
                    if preempted or save_step:
                        save(state / checkpoint.LATEST)
                    if preempted:
                        raise Preempted(f"{cfg['run']}: stopped by signal at step {progress.step}/{total_steps}; "
                                        f"checkpoint {state / checkpoint.LATEST}; running the job again resumes it")
                    window = Window()
                    if progress.step == total_steps:  # a step cap ends the run part-way through this epoch
                        break
                t_data = time.perf_counter()
            if not rolled_back:
                end_epoch(progress, epoch, step_module, val_dataset, val_batches, world, total_steps, opt, tracker,
                          state)
                save(state / checkpoint.LATEST)
    bar.close()
    if not world.main:
        ddp.close(world)
        return None
    metrics = export(cfg, model, spec, progress, state, out, world, peak, peak_source)
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, progress.step)
    ddp.close(world)
    return metrics


def epochs_left(progress: Progress, epochs: int) -> Iterator[int]:
    """The epoch the run is in, read afresh each time: the next one after an epoch end, the checkpoint's after a
    rollback."""
    while len(progress.train_losses) < epochs:
        yield len(progress.train_losses)


class Window:
    """Steps and data-loader wait since the last check point. The host runs ahead of the device between check
    points, so a step's own wall time means nothing; rates are taken over the steps between two host syncs."""

    def __init__(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def add(self, wait: float) -> None:
        self.steps += 1
        self.wait += wait


def _eta(bar: tqdm) -> str:
    rate = bar.format_dict.get("rate")
    return tqdm.format_interval((bar.total - bar.n) / rate) if rate else "?"


def resume(state: Path, stamp: str, step_module: nn.Module, optimizer: torch.optim.Optimizer,
           progress: Progress, main: bool = True) -> bool:
    """Load the newest readable checkpoint of these settings in `state` (`checkpoint.resumable`) into the modules,
    optimizer, RNGs and progress; the main process sets an unreadable one aside."""
    saved = checkpoint.resumable(state, stamp, set_aside_corrupt=main)
    if saved is None:
        return False
    restore(saved, step_module, optimizer, progress)
    progress.resumes += 1
    return True


def restore(saved: dict, step_module: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    """Put a checkpoint's modules, optimizer, RNG states and progress back: on resume, and on a rollback."""
    step_module.load_state_dict(saved["modules"])
    optimizer.load_state_dict(saved["optimizer"])
    checkpoint.set_rng_state(saved["rng"])
    progress.load_state_dict(saved["progress"])


def end_epoch(progress: Progress, epoch: int, step_module: TrainStep, dataset: ShardPairs,
              val_batches: GlobalBatches | None, world: ddp.World, total_steps: int, opt: dict, tracker,
              state: Path) -> None:
    """Validation on the held-out split; the model of the epoch with the lowest CLIP validation loss is kept in
    `state` (METHOD.md §6a)."""
    metrics = {"epoch_train_loss": sum(progress.epoch_losses) / max(len(progress.epoch_losses), 1)}
    progress.train_losses.append(metrics["epoch_train_loss"])
    progress.epoch_losses = []
    if val_batches is not None:
        val = validate(step_module, dataset, val_batches, world, progress.step, total_steps, opt["precision"])
        progress.val_losses.append(val["val_loss"])
        progress.val_objectives.append(val.get("val_objective"))
        progress.strength = {k: v for k, v in val.items() if k.startswith(STRENGTH_PREFIXES)}
        metrics.update({k if k.startswith("val_") else f"val/{k}": v for k, v in val.items()})
        if val["val_loss"] < progress.best_val:
            progress.best_val, progress.best_epoch = val["val_loss"], epoch
            if world.main:
                checkpoint.save(state / checkpoint.BEST, {"model": step_module.student.model.state_dict(),
                                                          "epoch": epoch, "val_loss": val["val_loss"]})
    tracker.log_metrics(metrics, progress.step)
    if world.main:
        log.info("epoch %d: train loss %.4f%s", epoch, metrics["epoch_train_loss"],
                 f", validation CLIP loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")


def export(cfg: dict, model: nn.Module, spec: dict | None, progress: Progress, state: Path, out: Path,
           world: ddp.World, peak: float, peak_source: str) -> dict:
    """The final model (`model/`), the best-validation model (`best/`) and the run's metrics into `out`; return
    the metrics with the job's timings (`TIMING_KEYS`), which stay out of `out`."""
    model.eval()
    arch = cfg["model"]["arch"]
    (out / "model").mkdir()
    export_local_dir(model.cpu(), arch, out / "model", spec)
    best = checkpoint.load(state / checkpoint.BEST)
    if best is not None:
        model.load_state_dict(best["model"])
        (out / "best").mkdir()
        export_local_dir(model, arch, out / "best", spec)
    opt, device = cfg["pretrain"], world.device
    hours, unit = device_hours(progress.seconds, device, opt["threads"], world.size)
    metrics = {"steps": progress.step, "samples_seen": progress.step * opt["batch_size"],
               "epochs": len(progress.train_losses), "seed": cfg["seed"],
               "final_epoch_train_loss": progress.train_losses[-1], "val_loss": progress.val_losses,
               "val_objective": progress.val_objectives, "strength": progress.strength,
               "best_epoch": progress.best_epoch,
               "best_val_loss": progress.best_val if progress.best_epoch >= 0 else None,
               "device": str(device.type), "world_size": world.size,
               "train_flops": progress.flops_per_step * progress.step, "flops_per_step": progress.flops_per_step}
    write_json(out / "metrics.json", metrics)  # a function of the inputs alone: DVC tracks it
    timings = {"train_seconds": progress.seconds, "device_hours": hours, "device_hours_unit": unit,
               "peak_flops_per_device": peak, "peak_flops_source": peak_source, "resumes": progress.resumes,
               "rollbacks": progress.rollbacks}
    return metrics | timings



def prune_state(state: Path) -> None:
    """Remove a finished run's resume files (checkpoint, best-epoch weights, MLflow run id): called once its output,
    which holds the final and best exports, is published. Until then they stay, because Snakemake deletes the
    output of a job that fails and its retry resumes from them; after, resuming has nothing left to do (a rerun
    that is asked for trains afresh)."""
    if not state.is_dir():
        return
    freed = sum(path.stat().st_size for path in state.rglob("*") if path.is_file())
    shutil.rmtree(state)
    log.info("removed %s (%.2f GB of checkpoints): the run's outputs are published", state, freed / 1e9)
