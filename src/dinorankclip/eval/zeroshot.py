"""Zero-shot metrics through clip-benchmark's own classifier and retrieval code.

The one work-around: clip-benchmark 1.6.2's `zeroshot_classification.accuracy()` converts a 1-element array to
a Python float, which numpy >= 2.4 refuses (`TypeError: only 0-dimensional arrays ...`), and the SLURM executor
plugin needs numpy >= 2.4. So classification metrics use clip-benchmark's `zero_shot_classifier` and
`run_classification`, then the same three metrics computed here. `tests/test_clip_benchmark_compat.py` fails once
upstream accepts numpy >= 2.4, which is the signal to call `zeroshot_classification.evaluate` directly again.
"""

from __future__ import annotations

import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from sklearn.metrics import balanced_accuracy_score

from dinorankclip.errors import InputError


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """Fraction of rows whose target is among the k largest logits, for each k: hits / rows, as clip-benchmark."""
    pred = logits.topk(max(topk), dim=1).indices
    hit = pred == target.view(-1, 1)
    return [hit[:, :k].any(dim=1).sum().item() / len(target) for k in topk]


def check_targets(target: torch.Tensor, classnames, dataset: str) -> None:
    """Every label indexes a class name. A local webdataset suite is checked sample by sample before this
    (`dinorankclip.eval.checks`); this catches any other dataset, whose samples have only their position."""
    bad = ((target < 0) | (target >= len(classnames))).nonzero().flatten()
    if len(bad):
        first = bad[0].item()
        raise InputError(f"{dataset}: sample {first} (in loader order) has label {target[first].item()}, outside its "
                         f"{len(classnames)} class names; {len(bad)} such sample(s): the class list does not match "
                         "the labels")


def classification_metrics(model, dataloader, tokenizer, classnames, templates, device: str, amp: bool,
                           dataset: str = "the dataset") -> tuple[dict, list[bool]]:
    """clip-benchmark's three metrics, and whether each test item's top-1 prediction is right (in the dataset's
    order: what a McNemar test between two models on one seed compares)."""
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, classnames, templates, device, amp)
    logits, target = zeroshot_classification.run_classification(model, classifier, dataloader, device, amp=amp)
    check_targets(target, classnames, dataset)
    if len(classnames) >= 5:
        acc1, acc5 = topk_accuracy(logits, target, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, target, (1,)), float("nan")
    predicted = logits.argmax(dim=1)
    recall = balanced_accuracy_score(target.numpy(), predicted.numpy())
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(recall)}, (predicted == target).tolist()


def retrieval_metrics(model, dataloader, tokenizer, device: str, amp: bool, recall_k: list[int]) -> dict:
    return zeroshot_retrieval.evaluate(model, dataloader, tokenizer, device, amp=amp, recall_k_list=recall_k)
