"""`dinorankclip preflight --study S`: everything a study needs, checked before its GPU-hours are spent.

Inputs (`inputs`): the caption list parses; the validation list holds `val_samples` pairs (or, without one, the
training list has room for the held-out split); the teacher file loads into the named architecture; the second
captions cover the list (CoCa: its weights load); every suite has its shards (fewer than the loader workers: a
warning), class names and templates; KUEA's image folder. Space (`disk`): shards, teacher cache, captions,
checkpoints and exports, from bytes measured per image and per run, against the free disk. Device (`device`,
`steps`; marked device-only, skipped without a GPU): GPUs and driver, then a few real training steps of each
distinct kind of run at the per-GPU batch — peak memory against the card, seconds per step — projected to each
(run, seed) and the study.

Printed as a table, written as JSON with `--json`; the exit status is 1 when any check fails, each failure naming
its fix. Nothing under results/ is written.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from pathlib import Path

import torch

from dinorankclip.config import finetune_runs, reads_captions, resolve, run_names, seeded
from dinorankclip.io import write_json
from dinorankclip.preflight import disk, inputs, steps
from dinorankclip.preflight.device import gpu_check
from dinorankclip.preflight.result import Check, as_json, failed, table

log = logging.getLogger(__name__)
GIB = 2**30


def run_preflight(params: dict, study: str, timed_steps: int = 3, sample: int = 32) -> tuple[list[Check], dict]:
    """(every check, the projection) for `study`; `timed_steps` steps per run kind on a GPU, `sample` images of
    the list fetched to measure shard bytes."""
    cfg = resolve(params, study)
    runs, tuned = run_names(params, study), list(finetune_runs(params, study))
    configs = {run: resolve(params, study, run) for run in runs}
    with tempfile.TemporaryDirectory(prefix="preflight-") as tmp:
        work = Path(tmp)
        listed_check, listed, stats = inputs.caption_list(cfg, work)
        checks = [listed_check]
        pairs = stats.kept if stats else cfg["source"].get("world", {}).get("train_scenes", 0)
        validation = inputs.validation_pairs(cfg, work, pairs) if stats else None
        checks += [validation] if validation else []
        teacher = inputs.teacher_file(cfg)
        read_by = [run for run, run_cfg in configs.items() if reads_captions(run_cfg)]
        checks += [teacher, inputs.second_captions(cfg, read_by, listed), *inputs.suites(cfg),
                   inputs.finetune_images(cfg, tuned)]
        gpus = gpu_check(cfg["pretrain"]["gpus_per_node"])
        checks.append(gpus)
        device = torch.device("cuda" if gpus.status != "skip" else "cpu")
        kinds = measure_kinds(configs, device, timed_steps)
        checks += kinds["checks"]
        per_image = per_image_bytes(cfg, teacher, listed, sample, work, checks)
        images = dict.fromkeys(per_image, pairs)
        if cfg["source"].get("validation_tsv") and validation and validation.values:  # data/val: its images only
            images["image shards"] = pairs + validation.values["pairs"]
        jobs = seeded(params, runs, study)
        checks.append(disk.disk_check(images, per_image, [kinds["kept"][run] for run, _ in jobs
                                                          if run in kinds["kept"]]))  # a kind that failed: its check
        projected = project(configs, jobs, pairs, kinds["timing"], device)
        checks.append(projected.pop("check"))
    return checks, projected


def measure_kinds(configs: dict[str, dict], device: torch.device, timed_steps: int) -> dict:
    """Build each distinct kind of run once: its bytes on disk; on a GPU, its step time and peak memory."""
    groups: dict[str, list[str]] = {}
    for run, run_cfg in configs.items():
        groups.setdefault(steps.kind_key(run_cfg), []).append(run)
    kept, timing, checks = {}, {}, []
    for members in groups.values():
        run_cfg, batch = configs[members[0]], steps.per_rank_batch(configs[members[0]])
        name = f"steps {', '.join(members)}"
        try:
            built = steps.build_step(run_cfg, batch, device)
            kept.update({run: steps.kept_bytes(built) for run in members})
            if device.type == "cuda":
                measured = steps.time_steps(built.run, timed_steps, device)
                timing.update({run: measured for run in members})
                checks.append(_step_check(name, measured, batch))
        except torch.cuda.OutOfMemoryError as err:
            checks.append(Check(name, "fail", f"out of memory at the per-GPU batch {batch}: {str(err).splitlines()[0]}",
                                fix="raise pretrain.gpus_per_node or nodes (a smaller per-GPU batch), or set "
                                    "pretrain.grad_checkpointing: true", device_only=True))
        except Exception as err:  # noqa: BLE001 - a step that cannot be built is this check's finding
            log.exception("%s", name)
            checks.append(Check(name, "fail", f"the training step cannot be built or run: {err}",
                                fix="see the traceback above; the pretrain stage would fail the same way"))
        finally:
            built = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type != "cuda":
        checks.append(Check("training steps", "skip", f"device-only: {len(groups)} kind(s) of run built for their "
                            "sizes on disk; steps, peak memory and time are measured on a GPU", device_only=True))
    return {"kept": kept, "timing": timing, "checks": checks}


def _step_check(name: str, measured: dict, batch: int) -> Check:
    share = measured["peak_bytes"] / measured["card_bytes"]
    return Check(name, "fail" if share > 0.95 else "warn" if share > 0.85 else "ok",
                 f"{measured['seconds_per_step']:.3f} s/step at the per-GPU batch {batch}; peak "
                 f"{measured['peak_bytes'] / GIB:.1f} GiB of {measured['card_bytes'] / GIB:.0f} GiB "
                 f"({100 * share:.0f}%)",
                 fix="lower the per-GPU batch (more gpus_per_node or nodes) or set pretrain.grad_checkpointing: true"
                 if share > 0.95 else "", device_only=True, values={**measured, "per_gpu_batch": batch})


def per_image_bytes(cfg: dict, teacher: Check, listed: Path | None, sample: int, work: Path,
                    checks: list[Check]) -> dict[str, float]:
    """Measured bytes per image of each thing the study stores per image (image shards only from a listed sample;
    caption shards, which the captions stage writes for every study: a file's at its mean caption length, CoCa's,
    not yet written, at the list's)."""
    from dinorankclip.train.synthetic import teacher_width

    sizes = {}
    if listed is not None:
        measured = disk.image_bytes_per_image(cfg, listed, sample, work)
        if measured["bytes"] is None:
            checks.append(Check("image sample", "warn", f"none of {measured['failed']} sampled list images could be "
                                "fetched from here; shard bytes are left out of the disk check",
                                fix="run preflight where the list's URLs can be reached (the data stage's machine)"))
        else:
            sizes["image shards"] = measured["bytes"]
    width = teacher.values.get("width") or teacher_width(cfg["teacher"]["model"],
                                                         json.dumps(cfg["teacher"]["model_kwargs"], sort_keys=True))
    sizes["teacher cache"] = disk.cache_bytes_per_image(cfg["teacher"], width, work)
    captions = cfg["captions"]
    if captions.get("source", "file") == "file" and captions["file"] and Path(captions["file"]).is_file():
        from dinorankclip.data.captions import read_caption_file

        try:
            written = read_caption_file(Path(captions["file"]))[1].values()  # the stage's reader: what it stores
        except (ValueError, UnicodeDecodeError):  # the stage could not read it either: "second captions" fails
            return sizes
    elif captions.get("source") == "coca" and listed is not None:
        written = disk.listed_captions(listed)
    else:
        return sizes
    sizes["caption shards"] = disk.caption_bytes_per_image(disk.mean_caption_chars(written), work)
    return sizes


def project(configs: dict[str, dict], jobs: list[tuple[str, int]], pairs: int, timing: dict,
            device: torch.device) -> dict:
    """Each (run, seed)'s steps, wall time and GPU-hours at its kind's measured step time, and the study's sum."""
    if device.type != "cuda":
        return {"check": Check("projected time", "skip", "device-only: needs the step times measured on a GPU",
                               device_only=True)}
    if pairs <= 0:
        return {"check": Check("projected time", "skip", "no listed pairs to train on (see the caption list)",
                               device_only=True)}
    per_job = [{"run": run, "seed": seed, **steps.projection(configs[run], pairs, timing[run]["seconds_per_step"])}
               for run, seed in jobs if run in timing]
    wall, gpu_hours = sum(j["wall_hours"] for j in per_job), sum(j["gpu_hours"] for j in per_job)
    runs = "; ".join(f"{j['run']} seed {j['seed']}: {j['steps']:,} steps, {j['wall_hours']:.1f} h"
                     for j in per_job)
    check = Check("projected time", "ok", f"{len(per_job)} (run, seed) trainings on {pairs:,} pairs: "
                  f"{gpu_hours:,.0f} GPU-hours, {wall:,.1f} h of wall time one after another ({runs}); a lower "
                  "bound: communication between ranks and data loading are not in the measured steps",
                  device_only=True, values={"jobs": per_job, "gpu_hours": gpu_hours, "wall_hours": wall})
    return {"check": check, "jobs": per_job, "gpu_hours": gpu_hours, "wall_hours": wall}


def main(params: dict, study: str, json_path: Path | None, timed_steps: int, sample: int) -> int:
    """Run every check of `study`, print the table, write the JSON; 1 if anything failed."""
    checks, projected = run_preflight(params, study, timed_steps, sample)
    print(f"preflight of study {study} on {_machine()}")
    print(table(checks))
    bad = failed(checks)
    print(f"\n{len(bad)} check(s) failed" if bad else "\nevery check passed (device-only ones: see their status)")
    if json_path:
        write_json(json_path, as_json(checks, study=study, machine=_machine(), projection=projected))
    return 1 if bad else 0


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU only, torch {torch.__version__}"

