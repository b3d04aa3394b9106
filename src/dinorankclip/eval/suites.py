"""The `evaluate` stage: one job per run, every suite of the study, one clip-benchmark JSON per benchmark.

Datasets are built by clip-benchmark's `build_dataset` from a `dataset_root` template (`{dataset_cleaned}` as in
its CLI), and each result is written in the schema of `clip_benchmark eval --dump_classnames`, so the files can
be compared with, or aggregated by, the stock tool (`clip_benchmark build`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from clip_benchmark.datasets.builder import build_dataset
from torch.utils.data import DataLoader

from dinorankclip.config import benchmark_name
from dinorankclip.eval.zeroshot import classification_metrics, retrieval_metrics
from dinorankclip.io import write_json
from dinorankclip.models.clip import arch_of, load_local_dir

log = logging.getLogger(__name__)


def dataset_root(template: str, dataset: str) -> str:
    name = dataset.removeprefix("wds/")
    return template.format(dataset=name, dataset_cleaned=name.replace("/", "-"))


def _loader(dataset, batch_size: int, workers: int) -> DataLoader:
    # webdatasets batch themselves (as clip-benchmark's CLI does); map-style datasets go through the DataLoader
    if hasattr(dataset, "batched"):
        return DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def evaluate_suite(model, transform, tokenizer, suite: dict, ev: dict, device: str) -> dict:
    root = dataset_root(ev["dataset_root"], suite["dataset"])
    if not Path(root).exists() and "://" not in root:
        raise FileNotFoundError(f"evaluate: dataset {suite['dataset']} not found at {root} "
                                f"(see README 'Evaluation datasets' for the dataset_root layout)")
    dataset = build_dataset(dataset_name=suite["dataset"], root=root, transform=transform, split="test",
                            task=suite["task"], download=False)
    loader = _loader(dataset, ev["batch_size"], ev["workers"])
    amp = device == "cuda"
    result = {"dataset": suite["dataset"], "task": suite["task"], "language": "en"}
    if suite["task"] == "zeroshot_classification":
        result["metrics"] = classification_metrics(model, loader, tokenizer, dataset.classes, dataset.templates,
                                                   device, amp)
        result["classnames"] = list(dataset.classes)
    elif suite["task"] == "zeroshot_retrieval":
        result["metrics"] = retrieval_metrics(model, loader, tokenizer, device, amp, suite["recall_k"])
    else:
        raise ValueError(f"evaluate.suites: task {suite['task']!r} of {suite['dataset']} is not supported")
    return result


def evaluate_run(cfg: dict, model_dir: Path, out: Path, tracker) -> dict[str, dict]:
    """Evaluate the exported model in `model_dir` on every suite; write `<benchmark>.json` files into `out`."""
    ev = cfg["evaluate"]
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(ev["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, transform, tokenizer = load_local_dir(model_dir, device)
    results = {}
    for suite in ev["suites"]:
        name = benchmark_name(suite["dataset"])
        result = evaluate_suite(model, transform, tokenizer, suite, ev, device)
        result.update(model=arch_of(model_dir), pretrained=str(model_dir))
        write_json(out / f"{name}.json", result)
        tracker.log_metrics({f"{name}/{k}": v for k, v in result["metrics"].items()}, step=0)
        log.info("%s %s: %s", cfg["run"], name, result["metrics"])
        results[name] = result
    return results
