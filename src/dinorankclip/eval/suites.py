"""The `evaluate` stage: one job per run, every suite of the study, one clip-benchmark JSON per benchmark.

Datasets are built by clip-benchmark's `build_dataset` from a `dataset_root` template (`{dataset_cleaned}` as in
its CLI), and each result is written in the schema of `clip_benchmark eval --dump_classnames`, so the files can
be compared with, or aggregated by, the stock tool (`clip_benchmark build`). Layout of a run's results:
`<benchmark>.json` (zero-shot), `linear_probe/<benchmark>.json` (the probe, clip-benchmark's linear_probe
schema), `modality_gap/<benchmark>.json` (the gap analysis, `dinorankclip.eval.modality_gap`) and
`items/<benchmark>.json` (the test size and each item's correctness, for the report's tests on one seed).
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import torch
from clip_benchmark.datasets.builder import build_dataset
from torch.utils.data import DataLoader

from dinorankclip.config import benchmark_name
from dinorankclip.eval.checks import check_class_names, check_templates, check_wds_split
from dinorankclip.eval.features import cached_features, featurize
from dinorankclip.eval.linear_probe import linear_probe
from dinorankclip.eval.modality_gap import gap_analysis, paired_embeddings
from dinorankclip.eval.zeroshot import classification_metrics, retrieval_metrics
from dinorankclip.io import write_json
from dinorankclip.models.clip import arch_of, load_local_dir

log = logging.getLogger(__name__)


def dataset_root(template: str, dataset: str) -> str:
    name = dataset.removeprefix("wds/")
    return template.format(dataset=name, dataset_cleaned=name.replace("/", "-"))


def loader_workers(ev: dict, dataset: str, split: str) -> int:
    """`evaluate.workers`, capped at the shard count of a local webdataset split (its nshards.txt): webdataset
    hands each worker whole shards, and a worker left without one fails the run ('No samples found in dataset')."""
    workers, root = ev["workers"], dataset_root(ev["dataset_root"], dataset)
    nshards = Path(root) / split / "nshards.txt"
    if not dataset.startswith("wds/") or "://" in root or not nshards.is_file():
        return workers
    shards = int(nshards.read_text().strip())
    if workers > shards:
        log.info("evaluate: %s %s has %d shard(s); %d loader workers instead of evaluate.workers %d", dataset,
                 split, shards, shards, workers)
        return shards
    return workers


def _loader(data, ev: dict, dataset: str, split: str = "test") -> DataLoader:
    """The batches of split `split` of `dataset` (built as `data`), with at most one loader worker per shard."""
    batch_size, workers = ev["batch_size"], loader_workers(ev, dataset, split)
    # webdatasets batch themselves (as clip-benchmark's CLI does); map-style datasets go through the DataLoader
    if hasattr(data, "batched"):
        return DataLoader(data.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers)
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)


def build(dataset: str, task: str, ev: dict, transform, split: str = "test"):
    """clip-benchmark's dataset `dataset` (split `split`) under the study's dataset_root, or one error naming
    where it was looked for."""
    root = dataset_root(ev["dataset_root"], dataset)
    local = "://" not in root
    if local and not Path(root).exists():
        raise FileNotFoundError(f"evaluate: dataset {dataset} not found at {root} "
                                f"(see README 'Evaluation datasets' for the dataset_root layout)")
    if local and dataset.startswith("wds/") and not (Path(root) / split / "nshards.txt").is_file():
        raise FileNotFoundError(f"evaluate: dataset {dataset} has no {split} split at {root}/{split} "
                                f"(clip-benchmark's layout needs {split}/nshards.txt and {split}/0.tar ...)")
    built = build_dataset(dataset_name=dataset, root=root, transform=transform, split=split, task=task,
                          download=False)
    if local and dataset.startswith("wds/"):
        check_suite(Path(root), split, task, built)
    return built


def check_suite(root: Path, split: str, task: str, dataset) -> None:
    """A local webdataset suite's class names, templates, labels and captions agree (`dinorankclip.eval.checks`)."""
    classes = None
    if task in ("zeroshot_classification", "linear_probe"):
        classes = dataset.classes
        check_class_names(root, classes)
    if task == "zeroshot_classification":
        check_templates(root, dataset.templates)
    check_wds_split(root, split, task, len(classes) if classes else None)


def split_size(root: str, split: str = "test") -> int | None:
    """The number of samples (distinct keys) in a local webdataset split; None for a remote dataset."""
    folder = Path(root) / split
    if "://" in root or not folder.is_dir():
        return None
    keys = set()
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys.update(member.name.split(".", 1)[0] for member in tar if member.isfile())
    return len(keys)


def evaluate_suite(model, transform, tokenizer, suite: dict, ev: dict, device: str) -> tuple[dict, dict]:
    """(the suite's result in clip-benchmark's schema, its per-item record: the test size n and, for
    classification, each item's top-1 correctness as a string of 0/1 in the dataset's order)."""
    dataset = build(suite["dataset"], suite["task"], ev, transform)
    loader = _loader(dataset, ev, suite["dataset"])
    amp = device == "cuda"
    result = {"dataset": suite["dataset"], "task": suite["task"], "language": "en"}
    if suite["task"] == "zeroshot_classification":
        result["metrics"], correct = classification_metrics(model, loader, tokenizer, dataset.classes,
                                                            dataset.templates, device, amp, suite["dataset"])
        result["classnames"] = list(dataset.classes)
        items = {"n": len(correct), "correct_top1": "".join("1" if c else "0" for c in correct)}
    elif suite["task"] == "zeroshot_retrieval":
        result["metrics"] = retrieval_metrics(model, loader, tokenizer, device, amp, suite["recall_k"])
        items = {"n": split_size(dataset_root(ev["dataset_root"], suite["dataset"]))}
    else:
        raise ValueError(f"evaluate.suites: task {suite['task']!r} of {suite['dataset']} is not supported")
    return result, {"dataset": suite["dataset"], "task": suite["task"], **items}


def evaluate_probe(model, transform, dataset: str, ev: dict, device: str, seed: int, model_dir: Path,
                   cache_dir: Path | None) -> dict:
    """clip-benchmark's linear probe on `dataset` (train split -> test split), features cached per checkpoint."""
    probe = ev["linear_probe"]
    splits = {}
    for split in (probe["train_split"], "test"):
        data = build(dataset, "linear_probe", ev, transform, split)
        loader = _loader(data, ev, dataset, split)
        splits[split] = cached_features(cache_dir, model_dir, f"{dataset}:{split}:normalized",
                                        lambda loader=loader: featurize(model, loader, device))
    metrics = linear_probe(*splits[probe["train_split"]], *splits["test"], probe, seed, device)
    return {"dataset": dataset, "task": "linear_probe", "language": "en", "metrics": metrics,
            "classnames": list(data.classes)}


def evaluate_gap(model, transform, tokenizer, cfg: dict, device: str, teacher_weights: Path) -> dict:
    """The modality-gap analysis on the pairs of `evaluate.modality_gap.dataset`, with the study's frozen teacher
    (fed the images at its own input size, as the cache stage feeds it)."""
    from dinorankclip.models.teacher import WEIGHTS_FILE, OnlineTeacher, load_teacher

    ev, gap, teacher = cfg["evaluate"], cfg["evaluate"]["modality_gap"], cfg["teacher"]
    data = build(gap["dataset"], "zeroshot_retrieval", ev, transform)
    model_t = load_teacher(teacher, teacher_weights / WEIGHTS_FILE, torch.device(device))
    online = OnlineTeacher(model_t, teacher["blocks"], teacher["grid"], model.visual.preprocess_cfg["mean"],
                           model.visual.preprocess_cfg["std"]).to(device)
    size = tuple(model_t.patch_embed.img_size)

    def teacher_cls(images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != size:
            images = torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True)
        return online.cls(images)

    loader = _loader(data, ev, gap["dataset"])
    embeddings = paired_embeddings(model, teacher_cls, loader, tokenizer, device, gap["pairs"])
    analysis = gap_analysis(embeddings["text"], embeddings["z"], embeddings["teacher_cls"], embeddings.get("z_g"),
                            gap["fit_fraction"])
    return {"dataset": gap["dataset"], "task": "modality_gap", "language": "en", **analysis}


def evaluate_run(cfg: dict, model_dir: Path, out: Path, tracker, teacher_weights: Path | None = None,
                 cache_dir: Path | None = None) -> dict[str, dict]:
    """Evaluate the exported model in `model_dir` on every suite, the linear probes and the modality gap (when
    the study declares them); write the JSONs into `out` (layout in the module doc). `cache_dir` keeps the probe
    features per checkpoint; `teacher_weights` is the teacher_weights stage's output (for the gap analysis)."""
    ev = cfg["evaluate"]
    torch.manual_seed(cfg["study_seed"])  # the evaluation protocol is the same for every training seed
    torch.set_num_threads(ev["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, transform, tokenizer = load_local_dir(model_dir, device)
    identity = {"model": arch_of(model_dir), "pretrained": str(model_dir)}
    results = {}

    def record(kind: str, name: str, result: dict) -> None:
        result.update(identity)
        write_json(out / kind / f"{name}.json", result)
        prefix = f"{kind}/{name}" if kind else name
        tracker.log_metrics({f"{prefix}/{k}": v for k, v in result["metrics"].items()
                             if isinstance(v, int | float) and not isinstance(v, bool)}, step=0)
        log.info("%s %s: %s", cfg["run"], prefix, result["metrics"])
        results[prefix] = result

    for suite in ev["suites"]:
        result, items = evaluate_suite(model, transform, tokenizer, suite, ev, device)
        record("", benchmark_name(suite["dataset"]), result)
        write_json(out / "items" / f"{benchmark_name(suite['dataset'])}.json", items)
    for dataset in ev.get("linear_probe", {}).get("datasets", []):
        record("linear_probe", benchmark_name(dataset),
               evaluate_probe(model, transform, dataset, ev, device, cfg["study_seed"], model_dir, cache_dir))
    if ev.get("modality_gap"):
        if teacher_weights is None:
            raise ValueError("evaluate.modality_gap needs the teacher_weights stage's output")
        record("modality_gap", benchmark_name(ev["modality_gap"]["dataset"]),
               evaluate_gap(model, transform, tokenizer, cfg, device, teacher_weights))
    return results
