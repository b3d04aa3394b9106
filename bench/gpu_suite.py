"""Everything issue 21 measures on one GPU, in priority order, with the JSON report rewritten after every item.

A lent GPU gives minutes, so this is one prepared command that ends within a time budget (`--budget`, seconds)
and keeps whatever it measured if it is cut: the report is written (atomically) after each item, and an item that
fails is recorded with its error while the next one runs. Items, in priority order:

  environment    device, driver, torch/CUDA versions, package versions
  sync_check     one training step of drc-r3, tips-style and alip under torch.cuda.set_sync_debug_mode("error"),
                 with the batch copied in from pinned memory: proof that the step never waits for the GPU
  step_eager     samples/s, counted FLOPs, MFU and peak memory of the ViT-B-16 step at 256 and 128 per GPU, bf16,
                 for clip, rankclip, drc-r3 (cached teacher: random fp16 maps of the paper's shape) and
                 drc-r3-fusion-v1, and open_clip's own step (create_model + ClipLoss + fused AdamW) in the same
                 process (`bench/step.py` builds and times both sides)
  global_batch   the same steps at 128 per GPU with the losses ranking against the paper's global batch of 1024:
                 this rank's rows against 1024 candidates (the other 7 ranks' features are fixed random unit
                 vectors: the compute of one rank of 8, without the communication)
  losses_global  the objectives alone, forward + backward, 128 rows against 1024 candidates
  teacher        the DINOv3 ViT-B/16 teacher (random weights, timm `vit_base_patch16_dinov3`) at 224 px through the
                 teacher stage's code: forward only; decode only and decode + forward from a webdataset shard of
                 JPEGs written here (noisy smooth 256 px images, ~25 KB each at the data stage's quality 95)
  step_compiled  the step_eager measurements with torch.compile, most useful first, while the budget lasts

`summary` holds the ratios the issue's goals are judged by, and a projection of the paper study on 8 GPUs.
`--smoke` runs every item at tiny sizes on whatever device there is (the demo study's towers, batch 4, 2 steps,
torch.compile's "eager" backend) — the test suite runs it on the CPU, so the script cannot break unseen.
The script imports nothing beyond torch, timm, torchvision, numpy, PIL, yaml and the wheels bench/gpu_suite.md
lists (no MLflow, DVC or Snakemake); `imports` in the report lists the distributions it loaded.

Usage: python bench/gpu_suite.py [--out DIR] [--budget 270] [--smoke]
Writes DIR/gpu_suite.json; DIR is --out, else $OUT, else bench/results.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step as bench_step  # noqa: E402  bench/step.py: our step and open_clip's, built and timed alike

from dinorankclip.config import load_params, resolve  # noqa: E402
from dinorankclip.data import features  # noqa: E402
from dinorankclip.data.loader import Batch  # noqa: E402
from dinorankclip.io import write_json  # noqa: E402
from dinorankclip.losses import contrastive  # noqa: E402
from dinorankclip.losses.distributed import LocalBatch  # noqa: E402
from dinorankclip.models.clip import model_config  # noqa: E402
from dinorankclip.models.teacher import create_teacher, frozen, teacher_transform  # noqa: E402
from dinorankclip.train.flops import mfu, peak_flops  # noqa: E402
from dinorankclip.train.objective import build_objective  # noqa: E402
from dinorankclip.train.pretrain import batch_to  # noqa: E402

RUNS = ("clip", "rankclip", "drc-r3", "drc-r3-fusion-v1")
OPEN_CLIP = "open_clip"
SYNC_RUNS = ("drc-r3", "tips-style", "alip")
SIZES = {
    "full": dict(study="paper", batches=(256, 128), warmup=3, steps=10, sync_batch=32, world=8, per_rank=128,
                 teacher_model="vit_base_patch16_dinov3", teacher_size=224, teacher_batch=256, teacher_batches=8,
                 shard_images=1024, image_size=256, compile_backend="inductor", compile_seconds=100,
                 compiled=((256, "clip"), (256, OPEN_CLIP), (256, "drc-r3"), (128, "clip"), (128, OPEN_CLIP),
                           (256, "drc-r3-fusion-v1"), (128, "drc-r3"))),
    "smoke": dict(study="demo", batches=(4,), warmup=0, steps=1, sync_batch=4, world=4, per_rank=4,
                  teacher_model=None, teacher_size=None, teacher_batch=4, teacher_batches=2, shard_images=8,
                  image_size=64, compile_backend="eager", compile_seconds=5,
                  compiled=((4, "clip"), (4, OPEN_CLIP))),
}
STEP_SECONDS = {"full": 15, "smoke": 1}  # what one eager configuration needs, build included


def log(message: str) -> None:
    print(f"[gpu_suite] {message}", file=sys.stderr, flush=True)


class Report:
    """The JSON report, rewritten after every item; `deadline` is when the budget runs out."""

    def __init__(self, path: Path, budget: float, smoke: bool) -> None:
        self.path, self.start, self.deadline = path, time.perf_counter(), time.perf_counter() + budget
        self.data: dict = {"smoke": smoke, "budget_s": budget, "finished": False, "errors": [], "skipped": []}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def item(self, name: str, measure: Callable[[], dict]) -> None:
        """Run one item, keep its result (or its error) and write the report."""
        log(f"{name} ({self.left():.0f} s of budget left)")
        started = time.perf_counter()
        try:
            self.data[name] = measure()
        except Exception as err:  # one broken item must not cost the others their measurement
            self.data["errors"].append({"item": name, "error": repr(err), "trace": traceback.format_exc()[-4000:]})
            log(f"{name} failed: {err!r}")
        self.data.setdefault("item_seconds", {})[name] = time.perf_counter() - started
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.start
        write_json(self.path, self.data)


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Drop the last configuration's model and optimizer so the next one starts from an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(device: torch.device) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "driver": driver_version() if device.type == "cuda" else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   memory_gib=props.total_memory / 2**30)
    for dist in ("open_clip_torch", "timm", "torchvision", "webdataset", "numpy"):
        env[dist] = importlib.metadata.version(dist)
    return env


def run_cfg(sizes: SimpleNamespace, run: str, **pretrain) -> dict:
    cfg = resolve(load_params(), sizes.study, run)
    cfg["pretrain"].update(pretrain)
    return cfg


def step_args(sizes: SimpleNamespace, batch: int, cfg: dict) -> SimpleNamespace:
    return SimpleNamespace(batch=batch, warmup=sizes.warmup, steps=sizes.steps, threads=cfg["pretrain"]["threads"],
                           compile_backend=sizes.compile_backend)


def build_step(sizes, run: str, batch: int, device: torch.device, precision: str, compile: bool = False,
               gather: bool = False) -> tuple[Callable[[], None], dict]:
    """(one training step of `run` or of open_clip, the config it was built from)."""
    cfg = run_cfg(sizes, "clip" if run == OPEN_CLIP else run, compile=compile)
    args = step_args(sizes, batch, cfg)
    if run == OPEN_CLIP:
        return bench_step.open_clip_step(cfg, args, device, precision), cfg
    return bench_step.our_step(cfg, args, device, precision, gather=gather), cfg


def measure_step(sizes, run: str, batch: int, device: torch.device, precision: str, flops: int | None = None,
                 compile: bool = False, gather: bool = False) -> dict:
    """Samples/s, FLOPs, MFU and peak memory of one configuration (FLOPs counted unless given)."""
    free(device)
    run_step, cfg = build_step(sizes, run, batch, device, precision, compile, gather)
    args = step_args(sizes, batch, cfg)
    first = None
    if compile:  # the first call compiles: timed on its own, so the steps below are the compiled ones
        started = time.perf_counter()
        run_step()
        synchronize(device)
        first = time.perf_counter() - started
    counted, steps_per_s = bench_step.measure(f"{run} @ {batch}", run_step, args, device, count_flops=flops is None)
    flops = counted if flops is None else flops
    peak, _ = peak_flops(device, precision, args.threads)
    result = {"batch": batch, "samples_per_s": batch * steps_per_s, "step_ms": 1000 / steps_per_s,
              "step_flops": flops, "flops_per_sample": flops / batch, "achieved_tflops": flops * steps_per_s / 1e12,
              "mfu": mfu(flops, steps_per_s, peak), "peak_memory_gib": peak_gib(device)}
    if first is not None:
        result["first_call_s"] = first
    del run_step
    free(device)
    return result


@contextlib.contextmanager
def one_rank_of(world: int):
    """Losses called with gather=True see this rank's rows against `world` ranks' candidates: the other ranks'
    features are fixed random unit vectors, so one device does one rank's compute of a world-size job."""
    real, others = contrastive.local_batch, {}

    def local_batch(image: torch.Tensor, text: torch.Tensor, gather: bool) -> LocalBatch:
        if not gather:
            return real(image, text, gather)
        key = (image.shape, image.device)
        if key not in others:
            rows, dim = image.shape
            generator = torch.Generator(image.device).manual_seed(0)
            noise = torch.randn(2, (world - 1) * rows, dim, generator=generator, device=image.device)
            others[key] = F.normalize(noise, dim=-1)
        other_image, other_text = others[key]
        return LocalBatch(image, text, torch.cat([image, other_image.to(image.dtype)]),
                          torch.cat([text, other_text.to(text.dtype)]), 0)

    contrastive.local_batch = local_batch
    try:
        yield
    finally:
        contrastive.local_batch = real


def sync_check(sizes, device: torch.device, precision: str) -> dict:
    """One step per run with any host synchronisation an error (CUDA only; on the CPU the step just runs)."""
    results = {}
    for run in SYNC_RUNS:
        free(device)
        run_step, cfg = build_step(sizes, run, sizes.sync_batch, device, precision)
        for _ in range(sizes.warmup + 1):  # the allocator's and cuBLAS's first calls may synchronise; a step may not
            run_step()
        synchronize(device)
        checked = device.type == "cuda"
        images, tokens = torch.randn(sizes.sync_batch, 3, 8, 8), torch.zeros(sizes.sync_batch, 77, dtype=torch.long)
        host = Batch(images.pin_memory(), tokens.pin_memory(), [], None) if checked else Batch(images, tokens, [], None)
        try:
            if checked:
                torch.cuda.set_sync_debug_mode("error")
            batch_to(host, device)  # the loop's copy of a pinned batch
            run_step()
            results[run] = {"ok": True, "checked": checked}
        except RuntimeError as err:
            results[run] = {"ok": False, "checked": checked, "error": str(err), "trace": traceback.format_exc()[-3000:]}
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode(0)
        synchronize(device)
        del run_step
    free(device)
    return results


def step_table(sizes, device: torch.device, precision: str, report: Report, key: str, batches, runs,
               gather: bool = False) -> dict:
    """Eager measurements into report.data[key][batch][run], written after each configuration; returns the table."""
    table = report.data.setdefault(key, {})
    for batch in batches:
        for run in runs:
            if report.left() < STEP_SECONDS[sizes.name]:
                report.data["skipped"].append(f"{key} {run} @ {batch}: budget")
                continue
            try:
                with one_rank_of(sizes.world) if gather else contextlib.nullcontext():
                    table.setdefault(str(batch), {})[run] = measure_step(sizes, run, batch, device, precision,
                                                                         gather=gather)
            except Exception as err:
                report.data["errors"].append({"item": f"{key} {run} @ {batch}", "error": repr(err),
                                              "trace": traceback.format_exc()[-4000:]})
            report.write()
    return table


def compiled_table(sizes, device: torch.device, precision: str, report: Report) -> dict:
    """torch.compile'd steps, most useful first, each only if its compile fits in the budget left; FLOPs are the
    eager step's (compiling does not change the work; counting under compile would trace the counter too)."""
    table, eager = report.data.setdefault("step_compiled", {}), report.data.get("step_eager", {})
    for batch, run in sizes.compiled:
        flops = eager.get(str(batch), {}).get(run, {}).get("step_flops")
        if report.left() < sizes.compile_seconds or flops is None:
            report.data["skipped"].append(f"step_compiled {run} @ {batch}: "
                                          + ("budget" if flops is not None else "no eager measurement"))
            continue
        try:
            table.setdefault(str(batch), {})[run] = measure_step(sizes, run, batch, device, precision, flops,
                                                                 compile=True)
        except Exception as err:
            report.data["errors"].append({"item": f"step_compiled {run} @ {batch}", "error": repr(err),
                                          "trace": traceback.format_exc()[-4000:]})
        torch._dynamo.reset()
        report.write()
    return table


def loss_call(cfg: dict, rows: int, device: torch.device) -> Callable[[], None]:
    """Forward + backward of the run's objective (with gather) on fixed unit-norm features of `rows` rows."""
    dim = model_config(cfg["model"]["arch"])["embed_dim"]
    torch.manual_seed(cfg["seed"])
    objective = build_objective(cfg["loss"], dim, cfg["seed"]).to(device)
    image, text = (F.normalize(torch.randn(rows, dim, device=device), dim=-1).requires_grad_() for _ in range(2))
    scale, steps = torch.tensor(1 / 0.07, device=device), iter(range(10**6))

    def call() -> None:
        loss, _ = objective(image, text, scale, next(steps), 10**6, gather=True)
        loss.backward()

    return call


def losses_global(sizes, device: torch.device) -> dict:
    """Forward + backward of each objective alone: per_rank rows against world × per_rank candidates, fp32."""
    results = {}
    for run in ("clip", "rankclip", "drc-r3"):
        free(device)
        cfg = run_cfg(sizes, run)
        call = loss_call(cfg, sizes.per_rank, device)
        with one_rank_of(sizes.world):
            flops, calls_per_s = bench_step.measure(f"loss {run}", call, step_args(sizes, sizes.per_rank, cfg),
                                                    device)
        results[run] = {"rows": sizes.per_rank, "candidates": sizes.world * sizes.per_rank,
                        "ms": 1000 / calls_per_s, "flops": flops, "peak_memory_gib": peak_gib(device)}
    for run in ("rankclip", "drc-r3"):
        results[run]["ms_over_clip"] = results[run]["ms"] - results["clip"]["ms"]
    free(device)
    return results


def photo_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random image with sensor-like noise, JPEG at quality 95: decodes like a photo of that size."""
    base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(base, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def teacher(sizes, device: torch.device, workdir: Path) -> dict:
    """The teacher stage's rates: forward only, decode only, decode + forward (its serial loop over a shard)."""
    import webdataset as wds

    cfg = run_cfg(sizes, "clip")
    size = sizes.teacher_size or model_config(cfg["model"]["arch"])["vision_cfg"]["image_size"]
    spec = dict(cfg["teacher"], batch_size=sizes.teacher_batch)
    if sizes.teacher_model:
        spec.update(model=sizes.teacher_model, model_kwargs={"img_size": size})
    free(device)
    torch.manual_seed(cfg["seed"])
    model = frozen(create_teacher(spec), device)

    def forward_all(model: torch.nn.Module, batches) -> float:
        synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            features.batch_features(model, batch, spec, device)
        synchronize(device)
        return time.perf_counter() - started

    # forward only: the inputs are already on the device
    images = [torch.randn(sizes.teacher_batch, 3, size, size, device=device) for _ in range(sizes.teacher_batches)]
    forward_all(model, images[:1])  # warm-up
    forward_s = forward_all(model, images)
    forward_peak = peak_gib(device)

    rng, shard = np.random.default_rng(0), workdir / "teacher-shard.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(sizes.shard_images):
            sink.write({"__key__": f"{i:08d}", "jpg": photo_jpeg(rng, sizes.image_size), "txt": "a photo"})
    transform = teacher_transform(size)
    started = time.perf_counter()
    decoded = list(features._batches(shard, transform, sizes.teacher_batch))
    decode_s = time.perf_counter() - started
    synchronize(device)
    started = time.perf_counter()
    for _, batch in features._batches(shard, transform, sizes.teacher_batch):  # the teacher stage's serial loop
        features.batch_features(model, batch, spec, device)
    synchronize(device)
    serial_s = time.perf_counter() - started
    result = {"model": spec["model"], "image_size": size, "batch": sizes.teacher_batch, "blocks": spec["blocks"],
              "forward_images": len(images) * sizes.teacher_batch,
              "forward_images_per_s": len(images) * sizes.teacher_batch / forward_s,
              "forward_peak_memory_gib": forward_peak, "shard_images": sizes.shard_images,
              "shard_bytes_per_image": shard.stat().st_size / sizes.shard_images,
              "decode_images_per_s": sum(len(keys) for keys, _ in decoded) / decode_s,
              "decode_forward_images_per_s": sizes.shard_images / serial_s}
    del model
    free(device)
    return result


def summary(data: dict, sizes) -> dict:
    """The figures the issue's goals are judged by, from whatever was measured."""
    out: dict = {"clip_over_open_clip": {}, "mfu": {}, "overhead_over_clip_at_global_batch": {}}
    for mode in ("step_eager", "step_compiled"):
        for batch, runs in data.get(mode, {}).items():
            if "clip" in runs and OPEN_CLIP in runs:
                out["clip_over_open_clip"][f"{mode} @ {batch}"] = (runs["clip"]["samples_per_s"]
                                                                    / runs[OPEN_CLIP]["samples_per_s"])
            for run, r in runs.items():
                out["mfu"][f"{mode} {run} @ {batch}"] = r["mfu"]
    for batch, runs in data.get("global_batch", {}).items():
        if "clip" in runs:
            out["overhead_over_clip_at_global_batch"] = {
                run: r["step_ms"] / runs["clip"]["step_ms"] - 1 for run, r in runs.items() if run != "clip"}
            out["global_batch"] = sizes.world * int(batch)
        if set(RUNS) <= runs.keys():
            out["projection"] = projection(runs, sizes)
    if "teacher" in data:
        out["teacher_images_per_s"] = {k: data["teacher"][k] for k in
                                       ("forward_images_per_s", "decode_forward_images_per_s")}
    return out


def projection(rates: dict, sizes) -> dict:
    """Hours of the paper study's pretraining on 8 GPUs: each registry run at the measured rate of the configuration
    nearest to it (per-GPU 128, ranking over the global 1024), compute only (no data loading, communication,
    validation or evaluation). `approximated_by` says which runs borrow whose rate."""
    params = load_params()
    gpus, hours, nearest = sizes.world, {}, {}
    for run in params["runs"]:
        cfg = resolve(params, sizes.study, run)
        variant, order = cfg["injection"]["variant"], cfg["loss"]["order"]
        like = run if run in rates else (
            "drc-r3" if variant not in ("none", "v1") else "drc-r3-fusion-v1" if variant == "v1" else
            "rankclip" if cfg["loss"]["name"] == "plackett_luce" and order >= 1 else "clip")
        nearest[run] = like
        held_out = 0 if cfg["source"].get("validation_tsv") else cfg["pretrain"]["val_samples"]
        samples = cfg["pretrain"]["epochs"] * (features.CC3M_PAIRS - held_out)
        hours[run] = samples / (gpus * rates[like]["samples_per_s"]) / 3600
    return {"gpus": gpus, "hours_per_run": hours, "total_hours": sum(hours.values()), "budget_hours": 72,
            "approximated_by": {run: like for run, like in nearest.items() if like != run}}


def imported_distributions() -> list[str]:
    """The installed distributions whose top-level modules this process imported."""
    owners = importlib.metadata.packages_distributions()
    names = {name.split(".")[0] for name in list(sys.modules)}
    return sorted({dist for name in names for dist in owners.get(name, ())})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="report folder (default: $OUT, else bench/results)")
    p.add_argument("--budget", type=float, default=270, help="seconds to spend; items that would overrun are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device, for the test suite")
    args = p.parse_args()
    out = args.out or Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    name = "smoke" if args.smoke else "full"
    sizes = SimpleNamespace(name=name, **SIZES[name])
    device = device_of()
    precision = "bf16" if device.type == "cuda" else "fp32"
    report = Report(out / "gpu_suite.json", args.budget, args.smoke)
    report.data.update(study=sizes.study, precision=precision)

    report.item("environment", lambda: environment(device))
    report.item("sync_check", lambda: sync_check(sizes, device, precision))
    report.item("step_eager", lambda: step_table(sizes, device, precision, report, "step_eager", sizes.batches,
                                                 RUNS + (OPEN_CLIP,)))
    report.item("global_batch", lambda: step_table(sizes, device, precision, report, "global_batch",
                                                   (sizes.per_rank,), RUNS, gather=True))
    report.item("losses_global", lambda: losses_global(sizes, device))
    with tempfile.TemporaryDirectory() as workdir:
        report.item("teacher", lambda: teacher(sizes, device, Path(workdir)))
    report.item("step_compiled", lambda: compiled_table(sizes, device, precision, report))
    report.data["summary"] = summary(report.data, sizes)
    report.data["imports"] = imported_distributions()
    report.data["finished"] = True
    report.write()
    log(f"report: {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
