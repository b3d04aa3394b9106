"""The training loop waits for the device only at check points (log steps, checkpoint steps, epoch ends): no host
read of a tensor on the other steps, a non-finite step seen late is rolled back once, and no checkpoint holds NaN.

On the CPU nothing is asynchronous, so "waits for the device" is counted as the Python-level calls that would wait
on a GPU (`.item()`, `bool()`, `.tolist()`, ...). Syncs inside C++ kernels are not visible here;
`bench/gpu_suite.py` runs a step under `torch.cuda.set_sync_debug_mode("error")` on a GPU for those.
"""

import hashlib
import os
import signal
import sys
from collections import defaultdict

import pytest
import torch
from test_engine import Recorder, inputs, run_cfg, train, weights  # noqa: F401  (inputs: the shared fixture)

from dinorankclip.losses.distributed import step_generator
from dinorankclip.losses.ranking import tie_permutation
from dinorankclip.train import checkpoint, pretrain
from dinorankclip.train.caption_sampling import CAPTION_STREAM, sample_captions
from dinorankclip.train.ledger import NonFinite, StepLedger
from dinorankclip.train.patch import MASK_STREAM, token_masks
from dinorankclip.train.preemption import Preempted
from dinorankclip.train.step import NonFiniteLoss, TrainStep

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
LOADER = os.path.join("torch", "utils", "data", "")


def in_loader() -> bool:
    """Whether the caller runs inside torch's DataLoader (sampler, dataset, collate): host tensors by design, in
    loader workers on a GPU run."""
    frame = sys._getframe(2)
    while frame is not None:
        if LOADER in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class HostReads:
    """Host reads of tensors per training step: from the forward of step s to the forward of step s + 1, which
    covers the update of s, the check point after it (if any) and the loading of the next batch."""

    def __init__(self, monkeypatch) -> None:
        self.step: int | None = None
        self.calls: dict[int, list[str]] = defaultdict(list)
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        real_forward = TrainStep.forward

        def forward(module, images, tokens, teacher, step, *args, **kwargs):
            if torch.is_grad_enabled():  # a training step, not the validation pass
                self.step = step
            return real_forward(module, images, tokens, teacher, step, *args, **kwargs)

        monkeypatch.setattr(TrainStep, "forward", forward)

    def _counted(self, name: str, real):
        def counted(tensor, *args, **kwargs):
            if self.step is not None and not in_loader():
                self.calls[self.step].append(name)
            return real(tensor, *args, **kwargs)

        return counted


# 56 training pairs in batches of 8: 7 steps in one epoch; check points after steps 4 (log) and 7 (log, epoch end)
@pytest.mark.parametrize("run", ["drc-r3", "tips-style", "alip"])
def test_no_host_read_of_a_tensor_between_check_points(inputs, tmp_path, monkeypatch, run):  # noqa: F811
    cfg = run_cfg(run, epochs=1, batch_size=8, log_every=4)
    reads = HostReads(monkeypatch)
    metrics = train(cfg, inputs, tmp_path, "run")
    assert metrics["steps"] == 7
    check_points = {3, 6}  # the steps (0-based) after which the loop syncs
    assert all(reads.calls[s] for s in check_points), "the counter sees the check points' reads"
    assert {s: reads.calls[s] for s in range(7) if s not in check_points and reads.calls[s]} == {}


def nan_at(monkeypatch, step: int, times: int) -> list[int]:
    """Make the loss NaN at training step `step` the first `times` times that step runs; returns the count of runs."""
    real_forward, runs = TrainStep.forward, [0]

    def forward(module, images, tokens, teacher, s, *args, **kwargs):
        loss, terms = real_forward(module, images, tokens, teacher, s, *args, **kwargs)
        if s == step and torch.is_grad_enabled():
            runs[0] += 1
            if runs[0] <= times:
                loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(TrainStep, "forward", forward)
    return runs


def saved_steps(monkeypatch) -> list[tuple[int, bool]]:
    """(step, every weight finite) of each latest.pt written."""
    real, saves = checkpoint.save, []

    def save(path, state):
        if "progress" in state:
            finite = all(torch.isfinite(v).all() for v in state["modules"].values() if v.is_floating_point())
            saves.append((state["progress"]["step"], bool(finite)))
        real(path, state)

    monkeypatch.setattr(checkpoint, "save", save)
    return saves


# 2 epochs of 3 steps, a log every 5: check points after steps 3 (epoch end, saved), 5 (log) and 6; step 3 (0-based,
# the first of epoch 2) goes NaN, poisons the weights, and is seen at the log after step 5
NAN_RUN = {"log_every": 5, "checkpoint_every": 0}


def test_a_nan_seen_at_the_next_log_step_rolls_back_once_and_the_run_ends_as_if_it_never_happened(
        inputs, tmp_path, monkeypatch):  # noqa: F811
    cfg = run_cfg("clip", **NAN_RUN)
    clean = train(cfg, inputs, tmp_path, "clean")
    runs = nan_at(monkeypatch, 3, times=1)
    saves = saved_steps(monkeypatch)
    recorder = Recorder()
    rolled = train(cfg, inputs, tmp_path, "rolled", recorder)
    assert runs[0] == 2 and rolled["rollbacks"] == 1 and clean["rollbacks"] == 0
    assert saves == [(3, True), (6, True)]
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "rolled")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rolled["val_loss"] == clean["val_loss"] and rolled["final_epoch_train_loss"] == clean[
        "final_epoch_train_loss"]
    assert sorted(recorder.metrics) == [3, 5, 6] and torch.isfinite(torch.tensor(recorder.metrics[5]["loss"]))


def test_a_second_nan_stops_the_run_naming_the_first_bad_step_and_the_checkpoint(inputs, tmp_path, monkeypatch):  # noqa: F811
    cfg = run_cfg("clip", **NAN_RUN)
    nan_at(monkeypatch, 3, times=2)
    saves = saved_steps(monkeypatch)
    with pytest.raises(NonFiniteLoss, match=r"clip: non-finite loss nan \(gradient norm nan\) at step 3; the last "
                                            r"good checkpoint is .*latest\.pt \(step 3\); rolled back once already"):
        train(cfg, inputs, tmp_path, "run")
    assert saves == [(3, True)]
    assert not (tmp_path / "run/model").exists()


def test_a_nan_before_any_checkpoint_stops_at_once(inputs, tmp_path, monkeypatch):  # noqa: F811
    nan_at(monkeypatch, 1, times=1)
    with pytest.raises(NonFiniteLoss, match=r"at step 1; the last good checkpoint is .* \(step none yet\)$"):
        train(run_cfg("clip", **NAN_RUN), inputs, tmp_path, "run")


def test_a_checkpoint_asked_for_while_a_nan_is_pending_is_not_written(inputs, tmp_path, monkeypatch):  # noqa: F811
    cfg = run_cfg("clip", **NAN_RUN)
    train(cfg, inputs, tmp_path, "clean")
    nan_at(monkeypatch, 3, times=1)
    real_update, done = pretrain.update, [0]

    def update_then_sigterm(*args, **kwargs):  # SIGTERM right after the NaN step's update
        norm = real_update(*args, **kwargs)
        done[0] += 1
        if done[0] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return norm

    monkeypatch.setattr(pretrain, "update", update_then_sigterm)
    saves = saved_steps(monkeypatch)
    with pytest.raises(Preempted, match=r"stopped by signal at step 5/6 after a non-finite loss nan .* at step 3, "
                                        r"so nothing was saved"):
        train(cfg, inputs, tmp_path, "run")
    assert saves == [(3, True)]
    monkeypatch.undo()
    resumed = train(cfg, inputs, tmp_path, "run")
    assert resumed["resumes"] == 1
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_periodic_checkpoints_skip_a_pending_nan_and_every_written_one_is_finite(inputs, tmp_path, monkeypatch):  # noqa: F811
    # a checkpoint every 2 steps: the check after step 4 finds step 3's NaN, rolls back to step 3 instead of saving
    nan_at(monkeypatch, 3, times=1)
    saves = saved_steps(monkeypatch)
    metrics = train(run_cfg("clip", log_every=5, checkpoint_every=2), inputs, tmp_path, "run")
    assert metrics["rollbacks"] == 1
    assert saves == [(2, True), (3, True), (4, True), (6, True), (6, True)]


def test_a_signal_is_honoured_at_the_next_check_point(inputs, tmp_path, monkeypatch):  # noqa: F811
    real_update, done = pretrain.update, [0]

    def update_then_sigterm(*args, **kwargs):
        norm = real_update(*args, **kwargs)
        done[0] += 1
        if done[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return norm

    monkeypatch.setattr(pretrain, "update", update_then_sigterm)
    with pytest.raises(Preempted, match="stopped by signal at step 3/6"):  # the epoch end; no log before it
        train(run_cfg("clip", **NAN_RUN), inputs, tmp_path, "run")


def test_the_ledger_keeps_losses_and_the_first_non_finite_step_until_settled():
    ledger = StepLedger(torch.device("cpu"))
    assert ledger.settle() == ([], None)
    one = torch.tensor(1.0)
    for step, loss, norm in [(7, 2.5, 1.0), (8, float("inf"), 3.0), (9, 1.5, float("nan")), (10, 0.5, 2.0)]:
        ledger.record(step, torch.tensor(loss), torch.tensor(norm) * one)
    losses, bad = ledger.settle()
    assert losses == [2.5, float("inf"), 1.5, 0.5] and bad == NonFinite(8, float("inf"), 3.0)
    assert str(bad) == "non-finite loss inf (gradient norm 3.0) at step 8"
    ledger.record(11, torch.tensor(0.25), torch.tensor(1.0))
    assert ledger.settle() == ([0.25], None)


def test_setup_torch_switches_deterministic_algorithms_both_ways():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        pretrain.setup_torch(0, torch.get_num_threads(), True)
        assert torch.are_deterministic_algorithms_enabled()
        pretrain.setup_torch(0, torch.get_num_threads(), False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = False


def legacy_tie_permutation(n: int, seed: int, step: int) -> torch.Tensor:
    """The host-side permutation of earlier versions, written out: blake2b of (seed, step) seeds a CPU generator."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.randperm(n, generator=torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))


def test_tie_permutation_on_the_cpu_is_the_earlier_one():
    for n, seed, step in [(12, 3, 7), (1024, 0, 0), (5, 1, 2)]:
        assert torch.equal(tie_permutation(n, seed, step), legacy_tie_permutation(n, seed, step))
        assert torch.equal(tie_permutation(n, seed, step, "cpu"), legacy_tie_permutation(n, seed, step))


def test_masks_and_caption_draws_on_the_cpu_are_the_earlier_ones():
    generator = torch.Generator().manual_seed((3 * 1_000_003 + 7) * 101 + MASK_STREAM)
    share = torch.empty(8).uniform_(0.25, 0.5, generator=generator)
    order = torch.rand(8, 16, generator=generator).argsort(dim=1)
    assert torch.equal(token_masks(8, 16, (0.25, 0.5), 3, 7), order < (share * 16).round().long()[:, None])
    raw, synthetic = torch.zeros(6, 4, dtype=torch.long), torch.ones(6, 4, dtype=torch.long)
    draw = torch.rand(6, generator=step_generator(3, 7, CAPTION_STREAM))
    assert torch.equal(sample_captions(raw, synthetic, 0.5, 3, 7)[:, 0], (draw < 0.5).long())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tie_permutation_drawn_on_the_gpu_is_a_permutation_fixed_by_seed_and_step():
    device = torch.device("cuda")
    perm = tie_permutation(1024, 3, 7, device)
    assert perm.device.type == "cuda" and torch.equal(perm.sort().values.cpu(), torch.arange(1024))
    assert torch.equal(perm, tie_permutation(1024, 3, 7, device))
    assert not torch.equal(perm, tie_permutation(1024, 3, 8, device))
    masks = token_masks(8, 196, (0.1, 0.5), 3, 7, device)
    assert masks.device.type == "cuda" and torch.equal(masks, token_masks(8, 196, (0.1, 0.5), 3, 7, device))


@pytest.mark.parametrize("poison", [None, float("nan")])
def test_the_gradient_norm_without_a_clip_is_clip_grad_norm_inf_without_its_pass_over_the_gradients(poison):
    """`gradient_norm(params, None)`: the same norm as `clip_grad_norm_(params, inf)`, and the finite gradients it
    leaves are bit-identical to those that clipping by inf multiplies by 1.0 (a non-finite norm is rolled back)."""
    from dinorankclip.train.step import gradient_norm

    def grads():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False))
        net[0].bias.requires_grad_(False)  # a parameter without a gradient
        net(torch.randn(11, 7)).square().sum().backward()
        if poison is not None:
            net[2].weight.grad[0, 0] = poison
        return list(net.parameters())

    read, clipped = grads(), grads()
    norm = gradient_norm(read, None)
    reference = torch.nn.utils.clip_grad_norm_(clipped, float("inf"))
    assert torch.equal(norm, reference) or (norm.isnan() and reference.isnan())
    if poison is None:
        assert norm > 0.5
        for a, b in zip(read, clipped, strict=True):
            assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
        clip = grads()  # with a clip: clip_grad_norm_ itself
        assert torch.equal(gradient_norm(clip, 0.5), norm)
        assert torch.nn.utils.get_total_norm([p.grad for p in clip if p.grad is not None]) <= 0.5 + 1e-6
