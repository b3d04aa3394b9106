"""Samples/s and MFU of one run's training step, next to open_clip's own training step on the same tower and batch.

Ours is built the way pretraining builds it — `setup_torch`, `build_student`, `build_objective`, `TrainStep`,
`make_optimizer(param_groups(...))`, `update` — and fed synthetic inputs of the shapes the loader yields: images at
the tower's preprocess size, token ids from the architecture's tokenizer and, for runs that distil from the
teacher cache, random fp16 teacher maps [B, S, C, g, g] as the cache stores them. The teacher stage outputs that
`build_student` reads are stood in for in a temporary directory (the cache's channel width; random weights for an
online teacher: speed does not depend on them), so no study needs to have been run.

The reference is open_clip's step: `open_clip.create_model(arch)`, `ClipLoss`, fused AdamW, the logit-scale clamp.
Both sides get the same seed, inputs, autocast, the run's `pretrain.grad_checkpointing` and `compile`, the
process-wide settings of `setup_torch` (`pretrain.deterministic`) and the same timing: `--warmup` untimed steps,
then `--steps` steps between device synchronisations. Each side's FLOPs are counted on one more step
(`dinorankclip.train.flops`), so its MFU uses its own work: injection, ranking heads and distillation make ours more
FLOPs per sample than open_clip's.
One process drives one device, so samples/s per device equals samples/s.

Usage: python bench/step.py --run clip [--study demo] [--arch ARCH] [--batch 64] [--steps 10] [--warmup 3]
       [--precision bf16|fp32] [--threads N] [--compile-backend inductor] [--out FILE]
Prints one JSON object on stdout (progress goes to stderr) and writes it to --out if given.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from dinorankclip.config import load_params, resolve
from dinorankclip.io import report_json
from dinorankclip.train.flops import mfu, peak_flops, step_flops
from dinorankclip.train.step import MAX_LOGIT_SCALE, autocast
from dinorankclip.train.synthetic import synthetic_inputs, synthetic_step


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def our_step(cfg: dict, args, device: torch.device, precision: str, gather: bool = False) -> Callable[[], None]:
    """One training step of the run on a fixed synthetic batch, built as `pretrain` builds it, down to the loop's
    device-side record of the loss and the gradient norm. `gather`: the losses gather candidates across ranks."""
    return synthetic_step(cfg, args.batch, device, precision, args.threads, args.warmup + args.steps + 1, gather,
                          args.compile_backend).run


def open_clip_step(cfg: dict, args, device: torch.device, precision: str) -> Callable[[], None]:
    """open_clip's training step (model, ClipLoss, fused AdamW, clamp) for the same architecture, seed, batch,
    gradient checkpointing and compilation."""
    opt = cfg["pretrain"]
    torch.manual_seed(cfg["seed"])
    model = open_clip.create_model(cfg["model"]["arch"]).to(device).train()
    if opt["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if opt["compile"]:
        model.compile(backend=args.compile_backend)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                                  weight_decay=opt["weight_decay"], fused=True)
    images, tokens, _, _ = synthetic_inputs(cfg, model, args.batch, 0, device)

    def run() -> None:
        with autocast(device, precision):
            loss = loss_fn(*model(images, tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, run: Callable[[], None], args, device: torch.device,
            count_flops: bool = True) -> tuple[int | None, float]:
    """(FLOPs of one step or None if not `count_flops`, steps/s over `args.steps` timed steps after `args.warmup`
    untimed ones)."""
    flops = None
    if count_flops:
        log(f"{name}: counting FLOPs of one step")
        flops = step_flops(run)
    log(f"{name}: {args.warmup} warm-up + {args.steps} timed steps")
    for _ in range(args.warmup):
        run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        run()
    synchronize(device)
    return flops, args.steps / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run name from the registry (params.yaml: runs)")
    p.add_argument("--study", help="study (default: `study` in params.yaml)")
    p.add_argument("--arch", help="open_clip architecture (default: the study's model.arch)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: the study's pretrain.precision")
    p.add_argument("--threads", type=int, help="CPU threads (default: the study's pretrain.threads)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend when pretrain.compile is on")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()

    cfg = resolve(load_params(), args.study, args.run)
    if args.arch:
        cfg["model"]["arch"] = args.arch
    args.threads = args.threads or cfg["pretrain"]["threads"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = (args.precision or cfg["pretrain"]["precision"]) if device.type == "cuda" else "fp32"

    flops, steps_per_s = measure(f"{cfg['run']} (ours)", our_step(cfg, args, device, precision), args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ref_flops, ref_steps_per_s = measure("open_clip", open_clip_step(cfg, args, device, precision), args, device)
    peak, source = peak_flops(device, precision, args.threads)

    samples_per_s, ref_samples_per_s = args.batch * steps_per_s, args.batch * ref_steps_per_s
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "run": cfg["run"], "study": cfg["study"], "arch": cfg["model"]["arch"], "batch": args.batch,
        "precision": precision, "grad_checkpointing": cfg["pretrain"]["grad_checkpointing"],
        "compile": cfg["pretrain"]["compile"], "steps": args.steps, "warmup": args.warmup,
        "samples_per_s": samples_per_s, "samples_per_s_per_device": samples_per_s,
        "step_flops": flops, "flops_per_sample": flops / args.batch, "achieved_flops_per_s": flops * steps_per_s,
        "peak_flops": peak, "peak_source": source, "mfu": mfu(flops, steps_per_s, peak),
        "open_clip_samples_per_s": ref_samples_per_s, "open_clip_step_flops": ref_flops,
        "open_clip_mfu": mfu(ref_flops, ref_steps_per_s, peak), "ratio_to_open_clip": samples_per_s / ref_samples_per_s,
    }
    report_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
