"""The training engine: bit-identical resume after SIGTERM, atomic checkpoints, the NaN guard, validation and the
best checkpoint, and a 2-process torchrun (gloo) run that follows the 1-process loss curve."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_image_shards, repo_params, write_features
from safetensors.torch import load_file

from dinorankclip.config import resolve
from dinorankclip.data.captions import build_captions
from dinorankclip.tracking import NullTracker
from dinorankclip.train import checkpoint, pretrain
from dinorankclip.train.preemption import Preempted
from dinorankclip.train.step import NonFiniteLoss, TrainStep

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("_train_worker.py")
# 64 pairs: 8 held out, 56 in batches of 16 → 3 steps per epoch, 6 steps in 2 epochs
SMALL = {"epochs": 2, "batch_size": 16, "val_samples": 8, "checkpoint_every": 0, "log_every": 1, "threads": 1,
         "warmup_steps": 2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Image shards, a teacher cache and second captions of the same keys: what the data, teacher and captions
    stages leave."""
    root = tmp_path_factory.mktemp("inputs")
    make_image_shards(root / "data", [40, 24])
    keys = {"00000.tar": [f"00000{i:04d}" for i in range(40)], "00001.tar": [f"00001{i:04d}" for i in range(24)]}
    write_features(root / "teacher", keys)
    (root / "captions").mkdir()
    file = root / "synthetic.tsv"
    file.write_text("key\tcaption\n" + "".join(f"{k}\ta longer description of {k}\n" for ks in keys.values()
                                                for k in ks[::2]))  # every other image: the rest keep their own
    build_captions({"study": "demo", "captions": {"source": "file", "file": str(file)}}, root / "data",
                   root / "captions-staging", root / "captions")
    return root / "data", {"teacher": root / "teacher", "teacher_weights": root / "unused",
                           "captions": root / "captions"}


def run_cfg(run: str, **pretrain_overrides) -> dict:
    cfg = resolve(repo_params(), "demo", run)
    cfg["pretrain"].update(SMALL, **pretrain_overrides)
    return cfg


class Recorder(NullTracker):
    run_id = "recorder"

    def __init__(self) -> None:
        self.metrics: dict[int, dict] = {}

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)


def train(cfg, inputs, root: Path, name: str, tracker=None):
    out = root / name
    out.mkdir(exist_ok=True)
    return pretrain.pretrain(cfg, *inputs, out, tracker or Recorder(), root / "state" / name)


def weights(out: Path, which: str = "model") -> dict:
    return load_file(out / which / "open_clip_model.safetensors")


def signal_after(monkeypatch, steps: int, signum: int = signal.SIGTERM) -> None:
    """Deliver a real signal to this process right after the `steps`-th optimizer update."""
    real, done = pretrain.update, [0]

    def update_then_signal(*args, **kwargs):
        norm = real(*args, **kwargs)
        done[0] += 1
        if done[0] == steps:
            os.kill(os.getpid(), signum)
        return norm

    monkeypatch.setattr(pretrain, "update", update_then_signal)


# drc-r3: injection with distillation, transition heads, tie-break generator, data position; stop 4 is mid-epoch
# (second batch of the second epoch), 3 the last step of an epoch. alip: the gates' running means; tips-style: caption
# sampling, masks, the teacher centre and the EMA head.
@pytest.mark.parametrize("run, stop", [("drc-r3", 4), ("drc-r3", 3), ("alip", 4), ("tips-style", 4)])
def test_sigterm_then_restart_ends_bit_identical(inputs, tmp_path, monkeypatch, run, stop):
    cfg = run_cfg(run)
    uninterrupted = train(cfg, inputs, tmp_path, "once")

    signal_after(monkeypatch, stop)
    with pytest.raises(Preempted, match=f"stopped by signal at step {stop}/6"):
        train(cfg, inputs, tmp_path, "twice")
    assert checkpoint.load(tmp_path / "state/twice" / checkpoint.LATEST)["progress"]["step"] == stop
    assert not (tmp_path / "twice/model").exists()
    monkeypatch.undo()
    resumed = train(cfg, inputs, tmp_path, "twice")

    assert resumed["resumes"] == 1 and uninterrupted["resumes"] == 0
    for which in ("model", "best"):
        a, b = weights(tmp_path / "once", which), weights(tmp_path / "twice", which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    timing = {"train_seconds", "device_hours", "resumes", "peak_flops_per_device"}
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in uninterrupted.items() if k not in timing}


def test_sigusr1_checkpoints_too_and_a_checkpoint_of_other_settings_is_not_resumed(inputs, tmp_path, monkeypatch):
    cfg = run_cfg("clip")
    signal_after(monkeypatch, 2, signal.SIGUSR1)
    with pytest.raises(Preempted):
        train(cfg, inputs, tmp_path, "run")
    monkeypatch.undo()
    other = run_cfg("clip", lr=1e-4)
    assert train(other, inputs, tmp_path, "run")["resumes"] == 0


def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.LATEST
    checkpoint.save(path, {"step": 1, "w": torch.ones(3)})

    def half_written(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    saved = checkpoint.load(path)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.LATEST, checkpoint.PREVIOUS]
    assert checkpoint.load(tmp_path / checkpoint.PREVIOUS)["step"] == 1


def test_a_planted_nan_stops_the_run_and_keeps_the_last_good_checkpoint(inputs, tmp_path, monkeypatch):
    cfg = run_cfg("clip", checkpoint_every=2)
    real_forward = TrainStep.forward

    def nan_at_step_4(self, images, tokens, teacher, step, total_steps, captions=None):
        loss, terms = real_forward(self, images, tokens, teacher, step, total_steps, captions)
        return (loss * float("nan") if step == 4 else loss), terms

    monkeypatch.setattr(TrainStep, "forward", nan_at_step_4)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss nan .* at step 4; the last good checkpoint is .* "
                                            r"\(step 4\)"):
        train(cfg, inputs, tmp_path, "run")
    saved = checkpoint.load(tmp_path / "state/run" / checkpoint.LATEST)
    assert saved["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["modules"].values() if v.is_floating_point())
    assert not (tmp_path / "run/model").exists()


def test_validation_each_epoch_keeps_the_best_model_and_records_compute(inputs, tmp_path):
    recorder = Recorder()
    metrics = train(run_cfg("clip"), inputs, tmp_path, "run", recorder)
    assert len(metrics["val_loss"]) == 2 and metrics["best_val_loss"] == min(metrics["val_loss"])
    assert metrics["best_epoch"] == metrics["val_loss"].index(min(metrics["val_loss"]))
    best = torch.load(tmp_path / "state/run" / checkpoint.BEST, weights_only=False)
    exported = weights(tmp_path / "run", "best")
    assert all(torch.equal(exported[k], best["model"][k]) for k in exported)
    assert metrics["flops_per_step"] > 0 and metrics["train_flops"] == 6 * metrics["flops_per_step"]
    assert metrics["device_hours"] > 0 and metrics["device_hours_unit"] == "CPU-core-hours"
    assert [s for s, m in recorder.metrics.items() if "val_loss" in m] == [3, 6]
    step = recorder.metrics[5]
    assert {"loss", "lr", "grad_norm", "logit_scale", "samples_per_s", "data_wait_fraction", "mfu"} <= step.keys()
    assert 0 < step["mfu"] < 1 and 0 <= step["data_wait_fraction"] < 1


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_two_gloo_ranks_follow_the_one_process_loss_curve(inputs, tmp_path):
    cfg = run_cfg("drc-r3", epochs=1)
    cfg["model"]["arch"] = "demo-vit-tiny"  # no batch norm: SyncBatchNorm has no CPU path
    cfg["injection"]["variant"] = "none"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    curves = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={world}", str(WORKER), str(tmp_path / "cfg.json"),
               str(inputs[0]), str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((out / "losses.json").read_text())
        assert result["world_size"] == world
        curves[world] = result["losses"]
    assert len(curves[1]) == 3 and len(set(curves[1])) == 3
    assert curves[2] == pytest.approx(curves[1], rel=1e-5)


def test_gradient_checkpointing_recomputes_the_same_steps(inputs, tmp_path, monkeypatch):
    import open_clip.transformer

    cfg = run_cfg("clip", epochs=1)
    cfg["model"]["arch"] = "demo-vit-tiny"  # open_clip checkpoints transformer blocks (its ResNet ignores the flag)
    plain = train(cfg, inputs, tmp_path, "plain")
    real, calls = open_clip.transformer.checkpoint, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip.transformer, "checkpoint", counting)
    cfg["pretrain"]["grad_checkpointing"] = True
    checkpointed = train(cfg, inputs, tmp_path, "checkpointed")
    assert calls[0] > 0
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "checkpointed")
    assert all(torch.equal(a[k], b[k]) for k in a) and plain["val_loss"] == checkpointed["val_loss"]


def test_training_seeds_differ_an_identical_seed_repeats_and_the_split_is_the_study_seeds(inputs, tmp_path,
                                                                                         monkeypatch):
    splits = []
    real_split = pretrain.split_indices
    monkeypatch.setattr(pretrain, "split_indices", lambda *a: splits.append(a) or real_split(*a))
    cfg = run_cfg("drc-r3", epochs=1)
    seed0 = train(cfg, inputs, tmp_path, "seed0")
    cfg1 = {**cfg, "seed": 1}
    seed1, again = train(cfg1, inputs, tmp_path, "seed1"), train(cfg1, inputs, tmp_path, "seed1-again")
    a, b, c = (weights(tmp_path / name) for name in ("seed0", "seed1", "seed1-again"))
    assert all(torch.equal(b[k], c[k]) for k in b) and seed1["val_loss"] == again["val_loss"]
    assert not torch.equal(a["text_projection"], b["text_projection"])  # another initialisation
    assert seed0["val_loss"] != seed1["val_loss"] and (seed0["seed"], seed1["seed"]) == (0, 1)
    assert {s[2] for s in splits} == {cfg["study_seed"]}  # one held-out split for every seed


def test_a_step_cap_ends_the_run_part_way_and_the_schedule_spans_the_capped_run(inputs, tmp_path):
    full, capped = Recorder(), Recorder()
    train(run_cfg("clip"), inputs, tmp_path, "full", full)
    metrics = train(run_cfg("clip", max_steps=4), inputs, tmp_path, "capped", capped)
    assert (metrics["steps"], metrics["epochs"], len(metrics["val_loss"])) == (4, 2, 2)  # the 2nd epoch is partial
    assert max(capped.metrics) == 4 and "val_loss" in capped.metrics[4]
    # warmup (2 steps) then a cosine over the remaining 2 capped steps, not over the 4 of the full run
    assert capped.metrics[2]["lr"] == full.metrics[2]["lr"] and capped.metrics[4]["lr"] < full.metrics[4]["lr"]


def test_a_validation_list_validates_every_run_on_its_pairs_and_training_keeps_all_pairs(inputs, tmp_path):
    """With data/val (a study's own validation list), training uses every training pair, validation reads the
    first val_samples pairs of the list — without teacher features or second captions, which only training needs —
    and selects on the CLIP loss; the run's own objective is not claimed for pairs that lack its inputs."""
    import shutil

    data_dir, stages = inputs
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    make_image_shards(data / "val", [12])
    recorder = Recorder()
    metrics = train(run_cfg("drc-r3", val_samples=10, batch_size=16), (data, stages), tmp_path, "listed", recorder)
    assert metrics["steps"] == 2 * (64 // 16)  # all 64 training pairs: 4 steps an epoch
    assert len(metrics["val_loss"]) == 2 and all(v is None for v in metrics["val_objective"])
    assert metrics["best_epoch"] in (0, 1) and "transition/gamma_3" in metrics["strength"]
    assert "injection/angle_deg" in metrics["strength"]


def test_every_logged_training_step_carries_the_strength_statistics(inputs, tmp_path):
    """The loop computes the injection's and the transition heads' strength only on the steps it logs
    (`dinorankclip.diagnostics`): each of those steps must still log them."""
    recorder = Recorder()
    metrics = train(run_cfg("drc-r3", log_every=4), inputs, tmp_path, "logged", recorder)
    logged = sorted(step for step, values in recorder.metrics.items() if "lr" in values)
    assert metrics["steps"] == 6 and logged == [4, 6]  # every 4th step and the last
    strength = {"transition/strength_2", "transition/strength_3", "injection/angle_deg"}
    assert all(strength <= recorder.metrics[step].keys() for step in logged)
