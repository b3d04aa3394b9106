"""The study's inputs, read where its parameters say they are, with the code the stages themselves use: the caption
list (the source stage's fetch and cleaning), the teacher file (the teacher_weights stage's loader), the second
captions (the captions stage's reader), the suites (clip-benchmark's `wds_` layout as the evaluate stage builds it)
and KUEA's image folder (the finetune stage's check). Each returns a `Check` naming the key to fix."""

from __future__ import annotations

import logging
from pathlib import Path

from dinorankclip.data.tsv import TsvStats
from dinorankclip.layout import RESULTS
from dinorankclip.preflight.result import Check

log = logging.getLogger(__name__)
SHOWN = 3  # example keys named in a mismatch


def caption_list(cfg: dict, work: Path) -> tuple[Check, Path | None, TsvStats | None]:
    """The CC3M list parses into (caption, url) pairs: (check, the cleaned list in `work`, its counts)."""
    from dinorankclip.data.source import fetch
    from dinorankclip.data.tsv import clean_caption_list

    source = cfg["source"]
    if source["kind"] != "cc3m":
        return Check("caption list", "skip", f"source.kind {source['kind']}: written by the source stage"), None, None
    raw, cleaned = work / "raw.tsv", work / "train.tsv"
    try:
        fetch(source["tsv"], raw)
        stats = clean_caption_list(raw, cleaned)
    except (OSError, ValueError) as err:
        return Check("caption list", "fail", str(err).splitlines()[0].replace(str(raw), source["tsv"]),
                     fix=f"put Google's CC3M training list (caption<TAB>url per line, no header) at source.tsv "
                         f"({source['tsv']}), or point source.tsv at it"), None, None
    share = stats.malformed / stats.rows
    status = "warn" if share > 0.01 else "ok"
    return Check("caption list", status,
                 f"{source['tsv']}: {stats.kept:,} (caption, url) pairs of {stats.rows:,} rows; {stats.malformed:,} "
                 f"malformed rows dropped ({100 * share:.2f}%)" + (": is this the CC3M list?" if status == "warn"
                                                                   else ""),
                 values={"rows": stats.rows, "pairs": stats.kept, "malformed": stats.malformed,
                         "reasons": stats.reasons}), cleaned, stats


def validation_pairs(cfg: dict, work: Path, pairs: int) -> Check:
    """Where the study validates (METHOD §6a): on its own validation list (`source.validation_tsv`), which must
    parse and hold `pretrain.val_samples` pairs, or on pairs held out of the training list (`held_out_split`)."""
    from dinorankclip.data.source import fetch
    from dinorankclip.data.tsv import clean_caption_list

    listed = cfg["source"].get("validation_tsv")
    if not listed:
        return held_out_split(cfg, pairs)
    val, raw = cfg["pretrain"]["val_samples"], work / "raw_validation.tsv"
    try:
        fetch(listed, raw, "source.validation_tsv")
        stats = clean_caption_list(raw, work / "validation.tsv")
    except (OSError, ValueError) as err:
        return Check("validation list", "fail", str(err).splitlines()[0].replace(str(raw), listed),
                     fix=f"put CC3M's validation list (Validation_GCC-1.1.0-Validation.tsv) at source.validation_tsv "
                         f"({listed}), or set source.validation_tsv: null to hold pairs out of the training list")
    values = {"pairs": stats.kept, "val_samples": val, "malformed": stats.malformed}
    if stats.kept < val:
        return Check("validation list", "fail", f"{listed}: {stats.kept:,} (caption, url) pairs, fewer than "
                     f"pretrain.val_samples {val:,}", fix="lower pretrain.val_samples", values=values)
    return Check("validation list", "ok", f"{listed}: {stats.kept:,} pairs; the first {val:,} validate every epoch "
                 "(fewer once dead links are gone); training keeps every listed pair", values=values)


def held_out_split(cfg: dict, pairs: int) -> Check:
    """Without a validation list the validation pairs are held out of the list itself (a seeded split,
    `pretrain.val_samples`): the list must hold them and at least one global batch besides."""
    opt = cfg["pretrain"]
    val, batch = opt["val_samples"], opt["batch_size"]
    if pairs < val + batch:
        return Check("held-out split", "fail", f"{pairs:,} listed pairs cannot hold pretrain.val_samples {val:,} "
                     f"plus one batch of {batch:,}", fix="lower pretrain.val_samples or pretrain.batch_size, or use "
                     "the full list", values={"pairs": pairs, "val_samples": val})
    return Check("held-out split", "ok", f"{val:,} of {pairs:,} listed pairs held out for the per-epoch validation "
                 f"loss ({100 * val / pairs:.2f}%); at most {(pairs - val) // batch:,} steps per epoch at batch "
                 f"{batch:,} (fewer once dead links are gone)", values={"pairs": pairs, "val_samples": val})


def teacher_file(cfg: dict) -> Check:
    """The teacher's weights file loads into `teacher.model` (every key and shape), and has the blocks it taps."""
    from dinorankclip.models.teacher import create_teacher

    teacher = cfg["teacher"]
    origin = teacher["weights"]["from"]
    if origin != "file":
        return Check("teacher weights", "skip", f"teacher.weights.from {origin}: "
                     + ("trained by the teacher_weights stage" if origin == "train" else "timm downloads them"))
    path, name = Path(teacher["weights"]["path"]), "teacher weights"
    if not path.is_file():
        return Check(name, "fail", f"teacher.weights.path: {path} does not exist",
                     fix=f"download model.safetensors of the Hugging Face repo 'timm/{teacher['model']}' (after "
                         f"accepting the DINOv3 licence) to {path}, or set teacher.weights.path to where it is")
    try:
        model = create_teacher(teacher, path)
    except Exception as err:  # noqa: BLE001 - any load failure is this check's finding
        return Check(name, "fail", f"{path} does not load into {teacher['model']}: {_mismatch(teacher, path, err)}",
                     fix=f"put the weights of {teacher['model']} at {path}, or name the file's architecture in "
                         "teacher.model (and its model_kwargs)")
    depth, blocks = len(model.blocks), teacher["blocks"]
    if max(blocks) >= depth:
        return Check(name, "fail", f"teacher.blocks {blocks} taps block {max(blocks)} of a {depth}-block model",
                     fix=f"choose teacher.blocks below {depth}")
    tensors = len(model.state_dict())
    return Check(name, "ok", f"{path}: {tensors} tensors load into {teacher['model']} (every key and shape); width "
                 f"{model.embed_dim}, blocks {blocks} of {depth}", values={"tensors": tensors, "depth": depth,
                                                                          "width": model.embed_dim})


def _mismatch(teacher: dict, path: Path, err: Exception) -> str:
    """Keys and shapes of the file against the architecture's (safetensors files; else the loader's message)."""
    from safetensors import SafetensorError, safe_open

    from dinorankclip.models.teacher import create_teacher

    try:
        with safe_open(str(path), "pt") as f:
            found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError):
        return str(err).strip().splitlines()[0]
    wanted = {key: tuple(v.shape) for key, v in create_teacher(teacher).state_dict().items()}
    missing, extra = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    shapes = [f"{k}: file {list(found[k])}, model {list(wanted[k])}" for k in wanted if k in found
              and found[k] != wanted[k]]
    parts = [f"{len(items)} {what} (e.g. {'; '.join(items[:SHOWN])})" for what, items in
             (("keys missing", missing), ("unexpected keys", extra), ("shape mismatches", shapes)) if items]
    return ", ".join(parts) or str(err).strip().splitlines()[0]


def captioner_weights(coca: dict, read_by: list[str]) -> Check:
    """CoCa's weights file loads into `captions.coca.model`, with the captions stage's own loader."""
    import torch

    from dinorankclip.models.captioner import load_captioner

    if not read_by:
        return Check("second captions", "skip", "captions.source coca, and no run reads second captions")
    try:
        load_captioner(coca, torch.device("cpu"))
    except (FileNotFoundError, ValueError) as err:
        message = str(err)
        return Check("second captions", "fail", message.split(". ")[0],
                     fix=message.split(". ", 1)[1] if ". " in message else "set captions.coca.weights")
    return Check("second captions", "ok", f"captions.coca.weights {coca['weights']} loads into {coca['model']}; "
                 f"read by {', '.join(read_by)}")


def second_captions(cfg: dict, read_by: list[str], listed: Path | None) -> Check:
    """The captions stage's input covers the list. Each caption source checks its own input: the file source is
    read with the stage's own reader; a source without a check here is reported as not checked."""
    source = cfg["captions"].get("source", "file")
    if source == "coca":
        return captioner_weights(cfg["captions"]["coca"], read_by)
    path = cfg["captions"]["file"]
    if not path:
        if read_by:
            return Check("second captions", "fail", f"runs {', '.join(read_by)} read second captions, but "
                         "captions.file names none", fix="set captions.file to a url<TAB>caption TSV")
        return Check("second captions", "skip", "no caption file, and no run reads second captions")
    if _stage_output(path):
        return Check("second captions", "skip", f"{path}: written by a stage of the study")
    from dinorankclip.data.captions import read_caption_file

    try:
        column, captions, stats = read_caption_file(Path(path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as err:
        return Check("second captions", "fail", str(err).splitlines()[0],
                     fix="write the captions (a 'url<TAB>caption' or 'key<TAB>caption' header, one caption per "
                         f"image) to {path}, or set captions.file")
    readers = f"read by {', '.join(read_by)}" if read_by else "read by no run of this study"
    if column == "key" or listed is None:
        return Check("second captions", "ok", f"{path}: {len(captions):,} captions keyed by {column}; coverage is "
                     f"counted by the captions stage (coverage.json); {readers}", values=stats)
    import csv

    with open(listed, newline="") as f:
        urls = [row["url"] for row in csv.DictReader(f, delimiter="\t")]
    covered = sum(url in captions for url in urls)
    status = "ok" if covered == len(urls) else "fail" if covered == 0 and read_by else "warn"
    return Check("second captions", status, f"{path}: covers {covered:,} of the {len(urls):,} listed URLs "
                 f"({100 * covered / len(urls):.1f}%; an uncovered image keeps its raw caption); {readers}",
                 fix="caption the list's images into captions.file" if status == "fail" else "",
                 values={**stats, "covered": covered, "listed": len(urls)})


def suites(cfg: dict) -> list[Check]:
    """Every dataset the evaluate stage reads, in clip-benchmark's local `wds_` layout: its splits' shards (at least
    `evaluate.workers` of them), class names and templates for classification, the retrieval marker."""
    from dinorankclip.eval.suites import dataset_root

    ev = cfg["evaluate"]
    needs: dict[str, dict] = {}

    def need(dataset: str, task: str, samples: int = 0) -> dict:
        entry = needs.setdefault(dataset, {"splits": {"test"}, "tasks": set(), "samples": 0})
        entry["tasks"].add(task)
        entry["samples"] = max(entry["samples"], samples)
        return entry

    for suite in ev["suites"]:
        need(suite["dataset"], suite["task"], max(suite.get("recall_k", [0])))  # R@k ranks k of the test images
    for dataset in ev.get("linear_probe", {}).get("datasets", []):
        need(dataset, "linear_probe")["splits"].add(ev["linear_probe"]["train_split"])
    if ev.get("modality_gap"):
        need(ev["modality_gap"]["dataset"], "zeroshot_retrieval", ev["modality_gap"]["pairs"] or 0)
    if _stage_output(ev["dataset_root"]):
        return [Check("suites", "skip", f"{ev['dataset_root']}: written by a stage of the study")]
    return [_suite(dataset, Path(dataset_root(ev["dataset_root"], dataset)), need, ev["workers"])
            if "://" not in dataset_root(ev["dataset_root"], dataset) else
            Check(f"suite {dataset}", "skip", "a remote dataset_root: read at evaluation time")
            for dataset, need in needs.items()]


def _stage_output(path: str) -> bool:
    """Whether `path` lies under results/, where only the study's own stages write (the demo's suites, captions)."""
    return Path(path).resolve().is_relative_to(RESULTS.resolve())


def _suite(dataset: str, root: Path, need: dict, workers: int) -> Check:
    name, problems, fixes, shards, capped = f"suite {dataset}", [], [], {}, []
    export = f"export {dataset} to {root} in clip-benchmark's layout (README 'Evaluation datasets')"
    if not root.is_dir():
        return Check(name, "fail", f"{root} does not exist", fix=export)
    for split in sorted(need["splits"]):
        count = _shard_count(root / split, problems)
        if count is not None:
            shards[split] = count
            if count < workers:  # the evaluate stage runs as many loader workers as there are shards
                capped.append(f"{split}: {count} shard(s), so {count} loader worker(s) of evaluate.workers {workers}")
    classifies = need["tasks"] & {"zeroshot_classification", "linear_probe"}
    if classifies and not _lines(root / "classnames.txt"):
        problems.append("no class names (classnames.txt missing or empty)")
    if "zeroshot_classification" in need["tasks"] and not _lines(root / "zeroshot_classification_templates.txt"):
        problems.append("no templates (zeroshot_classification_templates.txt missing or empty)")
    if "zeroshot_retrieval" in need["tasks"] and _lines(root / "dataset_type.txt") != ["retrieval"]:
        problems.append("dataset_type.txt does not say 'retrieval'")
    if need["samples"] and "test" in shards and not problems:
        count = _sample_count(root / "test", shards["test"])
        if count < need["samples"]:
            problems.append(f"test: {count} images, fewer than the {need['samples']} that recall_k or "
                            "modality_gap.pairs need")
            fixes.append("lower the suite's recall_k (or modality_gap.pairs), or export the whole split")
    if len(problems) > len(fixes):
        fixes.insert(0, export)
    detail = "; ".join(problems) or (f"{root}: " + ", ".join(f"{split} {n} shard(s)" for split, n in shards.items())
                                     + (f", {len(_lines(root / 'classnames.txt'))} classes" if classifies else "")
                                     + "".join(f"; {note}" for note in capped))
    if capped and not problems:
        fixes.append(f"re-export {dataset} in >= {workers} shards to use every loader worker")
    return Check(name, "fail" if problems else "warn" if capped else "ok", detail, fix="; ".join(fixes),
                 values={"root": str(root), "shards": shards})


def _shard_count(split: Path, problems: list[str]) -> int | None:
    try:
        count = int((split / "nshards.txt").read_text())
    except (OSError, ValueError):
        problems.append(f"{split.name}: no readable nshards.txt")
        return None
    missing = [f"{i}.tar" for i in range(count) if not (split / f"{i}.tar").is_file()]
    if missing:
        problems.append(f"{split.name}: {len(missing)} of {count} shards missing (e.g. {', '.join(missing[:SHOWN])})")
    return count


def _sample_count(split: Path, shards: int) -> int:
    """Samples (distinct keys) of a split, from its tar headers."""
    import tarfile

    keys = set()
    for i in range(shards):
        with tarfile.open(split / f"{i}.tar") as tar:
            keys.update(f"{i}/{member.name.split('.', 1)[0]}" for member in tar if member.isfile())
    return len(keys)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def finetune_images(cfg: dict, tuned: list[str]) -> Check:
    """KUEA's image folder (the finetune stage's own check); shards come from the study's own stages."""
    from dinorankclip.data.images import DataPathError, check_finetune_data

    if not tuned:
        return Check("KUEA images", "skip", "the study fine-tunes no run")
    data = cfg["finetune"]["data"]
    if data["kind"] != "folder":
        return Check("KUEA images", "skip", f"finetune.data.kind {data['kind']}: the data and teacher stages' output")
    try:
        source = check_finetune_data(cfg["finetune"], Path(), Path())
    except DataPathError as err:
        return Check("KUEA images", "fail", str(err), fix="put the images at finetune.data.path or change it")
    return Check("KUEA images", "ok", f"{data['path']}: {source.size:,} images for {', '.join(tuned)}",
                 values={"images": source.size})
