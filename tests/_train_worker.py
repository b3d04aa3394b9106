"""torchrun worker for tests/test_engine.py: one pretraining run; rank 0 writes the global-batch loss per step.

Usage: torchrun --nproc_per_node=W tests/_train_worker.py CFG_JSON DATA_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

from dinorankclip.tracking import NullTracker
from dinorankclip.train.ddp import launched_rank
from dinorankclip.train.pretrain import pretrain


class LossCurve(NullTracker):
    run_id = "worker"

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def log_metrics(self, metrics, step):
        if "loss" in metrics:
            self.losses[step] = metrics["loss"]


def main(cfg_path: str, data_dir: str, out: str) -> None:
    cfg, out = json.loads(Path(cfg_path).read_text()), Path(out)
    main_rank = launched_rank() == 0
    tracker = LossCurve() if main_rank else NullTracker()
    if main_rank:
        out.mkdir(parents=True)
    metrics = pretrain(cfg, Path(data_dir), {}, out if main_rank else None, tracker, out.with_name(out.name + "-state"))
    if main_rank:
        curve = [tracker.losses[s] for s in sorted(tracker.losses)]
        (out / "losses.json").write_text(json.dumps({"world_size": metrics["world_size"], "losses": curve}))


if __name__ == "__main__":
    main(*sys.argv[1:])
