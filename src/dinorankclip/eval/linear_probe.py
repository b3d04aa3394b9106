"""Linear probe on frozen image features, clip-benchmark's protocol on any device.

clip-benchmark's `linear_probe.evaluate` hard-codes CUDA (`.cuda()`, DataParallel), so the demo cannot call it.
This module follows the same protocol (`clip_benchmark/metrics/linear_probe.py`, 1.6.2): a bias-carrying linear
layer on L2-normalised features, AdamW, cross-entropy, the cosine schedule without warm-up (clip-benchmark's own
`cosine_lr`); with a validation split, the OpenAI-style weight-decay search over `logspace(-6, 2, 97)` (7 coarse
points, then refinement around the peak with spans 8, 4, 2, 1; a point wins only by strictly higher top-1), and
the final probe retrained with the chosen decay on train + validation. Results use clip-benchmark's metric names.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from clip_benchmark.metrics.linear_probe import cosine_lr
from sklearn.metrics import balanced_accuracy_score

from dinorankclip.eval.zeroshot import topk_accuracy

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
COARSE = [i for i, wd in enumerate(WEIGHT_DECAYS) if wd in np.logspace(-6, 2, num=7).tolist()]


def train_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, lr: float, epochs: int,
                batch_size: int, seed: int, device: str = "cpu") -> torch.nn.Linear:
    """A linear classifier trained on (x, y) with AdamW and a cosine schedule over every step, seeded."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    schedule = cosine_lr(optimizer, lr, 0.0, epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    x, y = x.to(device), y.to(device)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=order).to(device)
        for i in range(steps_per_epoch):
            batch = perm[i * batch_size:(i + 1) * batch_size]
            schedule(i + epoch * steps_per_epoch)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def logits_of(model: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return model(x.to(model.weight.device)).float().cpu()


def search_weight_decay(train: tuple, val: tuple, classes: int, lr: float, epochs: int, batch_size: int, seed: int,
                        device: str = "cpu") -> float:
    """clip-benchmark's `find_peak` search: the decay with the best validation top-1 (first one on ties)."""
    def peak(candidates: list[int], best: int) -> int:
        best_acc = 0.0
        for idx in candidates:
            model = train_probe(*train, classes, WEIGHT_DECAYS[idx], lr, epochs, batch_size, seed, device)
            (acc,) = topk_accuracy(logits_of(model, val[0]), val[1], (1,))
            if best_acc < acc:
                best, best_acc = idx, acc
        return best

    idx = peak(COARSE, 0)
    span = 8
    while span > 0:
        idx = peak([max(idx - span, 0), idx, min(idx + span, len(WEIGHT_DECAYS) - 1)], 0)
        span //= 2
    return WEIGHT_DECAYS[idx]


def split_validation(n: int, proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a seeded random `proportion` of the n training samples held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * proportion))
    return perm[n_val:], perm[:n_val]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 probe: dict, seed: int, device: str = "cpu") -> dict:
    """clip-benchmark's linear-probe metrics for features already extracted. `probe`: lr, epochs, batch_size,
    val_proportion (0: no search, weight decay 0, as clip-benchmark without a validation split)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    settings = (probe["lr"], probe["epochs"], probe["batch_size"], seed, device)
    if probe["val_proportion"] > 0:
        fit, val = split_validation(len(train_x), probe["val_proportion"], seed)
        weight_decay = search_weight_decay((train_x[fit], train_y[fit]), (train_x[val], train_y[val]), classes,
                                           *settings)
    else:
        weight_decay = 0.0
    model = train_probe(train_x, train_y, classes, weight_decay, *settings)  # train + validation
    logits = logits_of(model, test_x)
    if test_y.max() >= 5:
        acc1, acc5 = topk_accuracy(logits, test_y, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, test_y, (1,)), float("nan")
    recall = balanced_accuracy_score(test_y.numpy(), logits.argmax(dim=1).numpy())
    return {"lp_acc1": acc1, "lp_acc5": acc5, "lp_mean_per_class_recall": float(recall),
            "weight_decay": weight_decay, "epochs": probe["epochs"], "seed": seed, "fewshot_k": -1, "normalized": True}
